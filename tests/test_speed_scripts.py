"""scripts/compile_step_times.py and scripts/train_rate_ab.py: the parts that run without compiling or timing."""
import pytest
import torch

from test_ae_recipe import load_script


def test_compile_step_times_cell_trains_the_eager_dit():
    cell = load_script("compile_step_times").one_cell("dit", "eager", steps=12)
    assert set(cell) == {"first_s", "ms", "loss"}
    assert cell["ms"] > 0 and cell["first_s"] > 0 and 0 < cell["loss"] < 2  # an eps-prediction MSE near 1 at first


def test_train_rate_ab_refuses_a_long_run_no_longer_than_the_short_one():
    with pytest.raises(SystemExit, match="must exceed"):
        load_script("train_rate_ab").main(["--trees", ".", "--short", "100", "--long", "100"])



def test_sample_throughput_compares_batch_sizes_in_one_process(tmp_path, capsys):
    from test_pipeline import make
    make("class").save_pretrained(tmp_path / "pipe")
    load_script("sample_throughput").main([str(tmp_path / "pipe"), "--images", "7", "--steps", "2", "--threads", "1",
                                           "--compare-batch-sizes", "3", "7", "--repeat", "2"])
    out = capsys.readouterr().out
    assert out.count("batches of 3:") == 2 and out.count("batches of 7:") == 2  # two rounds, one call per size each
    assert "median of 2: batches of 3" in out.splitlines()[-1] and "batches of 7" in out.splitlines()[-1]


def test_sample_throughput_refuses_a_batch_size_below_one(tmp_path):
    with pytest.raises(SystemExit):
        load_script("sample_throughput").main([str(tmp_path), "--compare-batch-sizes", "0"])


def test_train_rate_ab_refuses_a_baseline_env_without_a_value():
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        load_script("train_rate_ab").main(["--trees", ".", ".", "--baseline-env", "LDM_MALLOC_TUNING"])


def test_page_faults_refuses_a_count_below_one(tmp_path):
    with pytest.raises(SystemExit):
        load_script("page_faults").main([str(tmp_path), "--calls", "0"])


def test_page_faults_cell_counts_faults_and_times_for_the_eager_denoiser(tmp_path):
    from test_pipeline import make
    make("class").save_pretrained(tmp_path / "pipe")
    cell = load_script("page_faults").one_cell(str(tmp_path / "pipe"), batch_size=2, eager=True, calls=2)
    assert len(cell["blocks"]) == 3 and all(b["ms"] > 0 and b["faults"] >= 0 for b in cell["blocks"])
    assert cell["tuned"] in (True, False)  # True on Linux/glibc (importing the package tuned it), else False


def test_guided_forward_inputs_are_the_guided_batch_of_a_class_denoiser():
    from types import SimpleNamespace

    from ldm_scratch.bench_profile import guided_forward_inputs
    cfg = SimpleNamespace(in_channels=4, sample_size=8, num_classes=10)
    x, t, y = guided_forward_inputs(cfg, batch_size=50, t=300)
    assert x.shape == (100, 4, 8, 8) and t.shape == (100,) and (t == 300).all()
    assert y.min() >= 0 and y.max() <= 10 and (y == 10).any()  # classes and the null class (index 10)
    again = guided_forward_inputs(cfg, batch_size=50, t=300)
    assert torch.equal(x, again[0]) and torch.equal(y, again[2])  # seeded: the same batch every time
