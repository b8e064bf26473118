"""The benchmark suite (ldm_scratch/bench.py) in quick mode: it runs end to end, writes bench.md and
bench.json, and every table row names machine, threads, dtype, batch and input. Timings are not checked:
they depend on the machine and on whatever else runs on it (the breakdown's shares and MFU only for range).
The breakdown's op categories (bench_profile.categorise) are checked on fake event names and trees."""
import argparse
import json
import sys

import pytest
import torch

from ldm_scratch import bench, bench_profile

BASE = ["machine", "threads", "dtype", "batch", "input"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_quick_run_writes_every_section(quick_run):
    _, report, _ = quick_run
    assert list(report["sections"]) == list(bench.SECTIONS)
    assert report["threads"] == 1 and report["quick"] is True
    for key, sec in report["sections"].items():
        assert sec["rows"], key
        for row in sec["rows"]:
            assert all(row.get(c) is not None for c in BASE), (key, row)


def test_compare_rows_have_ours_diffusers_and_ratios(quick_run):
    pytest.importorskip("diffusers")  # an optional dependency: without it the column is skipped (tested below)
    rows = quick_run[1]["sections"]["compare"]["rows"]
    assert len(rows) == 4  # AE, class U-Net, cross-attention U-Net, DiT (quick: one autoencoder)
    for row in rows:
        for side in ("ours", "diffusers"):
            assert row[side]["fwd_bwd_ms"] > 0 and row[side]["fwd_ms"] > 0 and row[side]["gflops"] > 0
        assert row["ratio"]["fwd_bwd_ms"] == pytest.approx(row["ours"]["fwd_bwd_ms"] / row["diffusers"]["fwd_bwd_ms"])


def test_levers_are_relative_to_fp32(quick_run):
    rows = quick_run[1]["sections"]["levers"]["rows"]
    models = {r["model"] for r in rows}
    assert len(models) == 4
    for m in models:
        levers = {r["lever"]: r for r in rows if r["model"] == m}
        assert levers["fp32"]["x_fp32"] == 1.0 and "bf16" in levers
    assert all(r["lever"] != "compile" for r in rows)  # only with --compile


def test_sampling_times_both_cfg_modes_and_latent_decode(quick_run):
    rows = quick_run[1]["sections"]["sampling"]["rows"]
    assert {(r["model"].split()[0], r["cfg"]) for r in rows} == {
        (kind, mode) for kind in ("pixel", "latent") for mode in ("batched", "separate")}
    assert all((r["decode_ms"] > 0) == r["model"].startswith("latent") for r in rows)


def test_latent_is_cheaper_than_pixel_in_flops(quick_run):
    rows = quick_run[1]["sections"]["latent_vs_pixel"]["rows"]
    assert rows[0]["gflops_per_step"] > rows[1]["gflops_per_step"]
    assert rows[2]["gflops_per_step"] > 48 * rows[3]["gflops_per_step"]  # 512x512x3 vs 64x64x4: 48x the values


def test_markdown_tables_are_well_formed(quick_run):
    _, report, md = quick_run
    assert md.count("\n## ") == len(bench.SECTIONS)
    for block in md.split("\n## ")[1:]:
        table = [l for l in block.splitlines() if l.startswith("|")]
        header = table[0].strip("|").split("|")
        assert [h.strip() for h in header[:5]] == BASE
        assert all(l.count("|") == table[0].count("|") for l in table)
        assert len(table) >= 3


def test_without_diffusers_the_column_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    assert bench.main(["--quick", "--only", "compare", "--out", str(tmp_path)]) == 0
    sec = json.loads((tmp_path / "bench.json").read_text())["sections"]["compare"]
    assert any("diffusers not importable" in n for n in sec["notes"])
    assert all(r["diffusers"] is None and r["ratio"]["fwd_ms"] is None for r in sec["rows"])


def test_bad_arguments_are_errors(tmp_path, capsys):
    assert bench.main(["--threads", "0", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        bench.main(["--device", "tpu"])


# -------------------------------------------------------------------------------------------------
# 5. breakdown: the op categories (pure functions, fake events) and the section in quick mode
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, category", [
    ("aten::mm", "matmul_conv"), ("aten::addmm", "matmul_conv"), ("aten::bmm", "matmul_conv"),
    ("aten::linear", "matmul_conv"), ("aten::mkldnn_convolution", "matmul_conv"),
    ("aten::convolution_backward", "matmul_conv"), ("aten::_convolution", "matmul_conv"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_softmax", "attention"), ("aten::_softmax_backward_data", "attention"),
    ("aten::native_group_norm", "norm"), ("aten::native_group_norm_backward", "norm"),
    ("aten::native_layer_norm_backward", "norm"), ("aten::layer_norm", "norm"),
    ("aten::silu", "pointwise"), ("aten::gelu_backward", "pointwise"), ("aten::add_", "pointwise"),
    ("aten::mul", "pointwise"), ("aten::mse_loss", "pointwise"),
    ("aten::copy_", "data_movement"), ("aten::_to_copy", "data_movement"), ("aten::to", "data_movement"),
    ("aten::contiguous", "data_movement"), ("aten::cat", "data_movement"), ("aten::empty", "data_movement"),
    ("aten::clone", "data_movement"), ("aten::view", "data_movement"),
    ("autograd::engine::evaluate_function: MmBackward0", None), ("MmBackward0", None),
    ("torch::autograd::AccumulateGrad", None), ("Optimizer.step#AdamW.step", None),
    ("optimizer", "optimizer"), ("ema", "ema"),
])
def test_categorise_maps_op_names(name, category):
    assert bench_profile.categorise(name) == category


def test_categorise_sends_everything_inside_a_range_to_it():
    assert bench_profile.categorise("aten::_fused_adamw_", "optimizer") == "optimizer"
    assert bench_profile.categorise("aten::mm", "optimizer") == "optimizer"  # not matmul: it is the optimizer's
    assert bench_profile.categorise("Optimizer.step#AdamW.step", "optimizer") == "optimizer"
    assert bench_profile.categorise("aten::_foreach_lerp_", "ema") == "ema"
    assert bench_profile.categorise("aten::_foreach_lerp_") == "pointwise"


class _Event:
    """The part of torch.autograd.profiler_util.FunctionEvent that category_times reads."""

    def __init__(self, name, us, children=()):
        self.name, self.us, self.cpu_children, self.cpu_parent = name, us, list(children), None
        for c in self.cpu_children:
            c.cpu_parent = self


def test_category_times_walks_the_tree_and_attributes_range_children():
    adamw = _Event("aten::_fused_adamw_", 30.0)
    opt = _Event("optimizer", 5.0, [_Event("Optimizer.step#AdamW.step", 10.0, [adamw])])
    linear = _Event("aten::linear", 2.0, [_Event("aten::t", 1.0), _Event("aten::addmm", 50.0)])
    ema = _Event("ema", 1.0, [_Event("aten::_foreach_lerp_", 8.0)])
    roots = [linear, _Event("aten::native_group_norm", 7.0), _Event("MmBackward0", 4.0), opt, ema]
    events = roots + [e for r in roots for e in r.cpu_children] + [adamw]  # flat, as prof.events() is
    totals = bench_profile.category_times(events, lambda e: e.us)
    assert set(totals) == set(bench_profile.CATEGORIES)
    assert totals["matmul_conv"] == 52.0 and totals["data_movement"] == 1.0 and totals["norm"] == 7.0
    assert totals["optimizer"] == 45.0 and totals["ema"] == 9.0 and totals["attention"] == 0.0
    pct = bench_profile.shares_pct(totals, wall=200.0)  # 114 categorised, 86 left for "other"
    assert pct["other"] == pytest.approx(43.0) and sum(pct.values()) == pytest.approx(100.0)
    over = bench_profile.shares_pct({"matmul_conv": 300.0, "norm": 100.0}, wall=200.0)  # overlapping threads
    assert over == pytest.approx({"matmul_conv": 75.0, "norm": 25.0, "other": 0.0})
    with pytest.raises(ValueError, match="positive"):
        bench_profile.shares_pct(totals, wall=0.0)


def _quick_args(**changes):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--quick"])
    args.reps, args.warmup = 1, 1
    vars(args).update(changes)
    return args


def _check_breakdown_row(row):
    shares = {k: v for k, v in row.items() if k.startswith("pct_")}
    assert set(shares) == {f"pct_{c}" for c in bench_profile.CATEGORIES + ("other",)}
    assert all(0.0 <= v <= 100.0 for v in shares.values()), shares
    assert sum(shares.values()) == pytest.approx(100.0, abs=1.0)
    assert row["peak_gflops_s"] > 0 and row["gflops_s"] > 0 and row["step_ms"] > 0
    assert 0.0 < row["mfu"] <= 1.5
    assert row["mfu"] == pytest.approx(row["gflops_s"] / row["peak_gflops_s"])


def test_breakdown_runs_in_quick_mode_on_one_small_model():
    rows, notes = bench.breakdown(_quick_args(), torch.device("cpu"), models=["DiT"])
    assert [r["step"] for r in rows] == ["train", "guided sample"]
    for row in rows:
        _check_breakdown_row(row)
        assert all(row.get(c) is not None for c in BASE)
    train, sample = rows
    assert train["pct_optimizer"] > 0 and train["pct_ema"] > 0  # the ranges were seen
    assert sample["pct_optimizer"] == 0 and sample["pct_ema"] == 0
    assert any("matmul peak" in n for n in notes)


def test_breakdown_section_covers_every_model_and_step(quick_run):
    rows = quick_run[1]["sections"]["breakdown"]["rows"]
    kinds = [(r["model"].split()[0], r["step"]) for r in rows]
    assert kinds == [("AE", "train"), ("UNet", "train"), ("UNet", "guided sample"), ("UNet", "train"),
                     ("UNet", "guided sample"), ("DiT", "train"), ("DiT", "guided sample")]
    for row in rows:
        _check_breakdown_row(row)


def test_breakdown_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="no benchmark model matches"):
        bench.breakdown(_quick_args(), torch.device("cpu"), models=["VAE-XL"])
