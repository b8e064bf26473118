"""The benchmark suite (ldm_scratch/bench.py) in quick mode: it runs end to end, writes bench.md and
bench.json, and every table row names machine, threads, dtype, batch and input. Timings are not checked:
they depend on the machine and on whatever else runs on it."""
import json
import sys

import pytest

from ldm_scratch import bench

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
