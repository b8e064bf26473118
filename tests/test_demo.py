"""The README's main job in quick mode: `python -m ldm_scratch demo --quick` loads the shipped colored-f4
autoencoder (or, with `--stage1 train`, trains one), trains the text-to-image denoiser on the captioned
coloured digits and writes the pipeline, the prompt grid, the guidance sweep and a report;
`demo-autoencoders` (the stage-1 photo showcase) still writes its models and PSNR/SSIM beside the floor."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    # the test process waits while the command runs, so the command may use up to two of the cores, unless the
    # suite set a thread count (scripts/test.sh runs the tests in parallel workers with one thread each)
    env = dict(os.environ, MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    return subprocess.run([sys.executable, "-m", "ldm_scratch", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_demo_quick_default_uses_the_shipped_autoencoder(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--quick", "--steps-scale", "0.1", "--minutes-scale", "1000", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["autoencoder"]["preset"] == "colored-f4 (shipped)"
    assert not (out / "autoencoder").exists()  # nothing trained for stage 1
    from ldm_scratch.pretrained import load_autoencoder
    assert report["autoencoder"]["scale_factor"] == load_autoencoder("colored-f4").scale_factor
    # the shipped codec beats the non-learned floor on the held-out digits, as its README says
    assert report["autoencoder"]["heldout_psnr"] > report["autoencoder"]["floor_psnr"]
    assert (out / "denoiser/pipeline/model_index.json").is_file() and (out / "prompts.png").is_file()
    text = (out / "report.md").read_text()
    assert "colored-f4 (shipped)" in text and "real-image statistics" in text
    # every score also read with the real images' statistics (the second eye), each a rate in [0, 1]
    assert report["adherence_stats"] in ("real images", "reconstructions")
    for row in report["sweep"] + report["samplers"] + [report["reconstructions"]]:
        assert set(row["second"]) == {"digit_acc", "color_acc", "background_acc", "all_acc"}
        assert all(0.0 <= v <= 1.0 for v in row["second"].values())


def test_demo_quick_trains_both_stages_and_reports(tmp_path):
    out = tmp_path / "demo"
    # --minutes-scale: quick mode's per-phase time caps never bind, so the steps (and the results) do not depend
    # on how busy the machine is; the resume below must reproduce them
    r = run("demo", "--quick", "--stage1", "train", "--steps-scale", "0.1", "--minutes-scale", "1000",
            "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("report.json", "report.md", "prompts.png", "guidance_sweep.png", "autoencoder_heldout.png",
              "autoencoder/model/config.json", "denoiser/latents.pt", "denoiser/pipeline/model_index.json",
              "denoiser/pipeline/text_encoder/model.pt"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    assert [s["guidance_scale"] for s in report["sweep"]] == [1.0, 2.0, 3.0, 5.0]
    assert set(report["reconstructions"]) >= {"digit_acc", "color_acc", "background_acc", "all_acc"}
    assert report["denoiser"]["conditioning"] == "text" and report["denoiser"]["steps"] >= 1
    assert len(report["phases"]) == 5 and report["machine"]["threads"] >= 1
    # the best guidance scored again through other samplers (deterministic DDIM and eta 1)
    assert [(s["sampler"], s["eta"]) for s in report["samplers"]] == [("ddim", 0.0), ("ddim", 0.0), ("ddim", 1.0)]
    best = max(report["sweep"], key=lambda s: s["all_acc"])["guidance_scale"]
    assert {s["guidance_scale"] for s in report["samplers"]} == {best}
    text = (out / "report.md").read_text()
    assert "reconstructions" in text and "a red 7 on grass" in text
    # --resume after an interruption between the phases: stage 1 reloads its finished checkpoint, stage 2 (no
    # checkpoint yet) trains from scratch, and the results come out the same
    shutil.rmtree(out / "denoiser")
    r = run("demo", "--quick", "--stage1", "train", "--steps-scale", "0.1", "--minutes-scale", "1000",
            "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert again["denoiser"]["steps"] == report["denoiser"]["steps"]
    assert again["autoencoder"]["scale_factor"] == report["autoencoder"]["scale_factor"]
    assert again["sweep"] == report["sweep"] and again["reconstructions"] == report["reconstructions"]


def test_demo_autoencoders_writes_models_grids_and_report(tmp_path):
    out = tmp_path / "demo"
    r = run("demo-autoencoders", "--quick", "--steps-scale", "0.05", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"mnist_f4", "photo_f8", "photo_f4"}
    for name in ("mnist_f4", "photo_f8", "photo_f4"):
        assert (out / name / "model" / "config.json").is_file() and (out / name / "model" / "model.pt").is_file()
    text = (out / "report.md").read_text()
    assert "astronaut" in text and "floor" in text.lower()
    assert list(out.glob("*.png")), "the demo should write reconstruction grids"


def test_demo_refuses_a_non_positive_minutes_scale(tmp_path):
    r = run("demo", "--quick", "--minutes-scale", "0", "--out", str(tmp_path / "demo"))
    assert r.returncode != 0 and "--minutes-scale must be > 0" in r.stderr
    assert not (tmp_path / "demo" / "autoencoder").exists()  # refused before any training
