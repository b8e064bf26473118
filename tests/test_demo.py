"""The README's main job in quick mode: `python -m ldm_scratch demo --quick` writes its models,
grids and a report with measured PSNR/SSIM next to the non-learned floor."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_writes_models_grids_and_report(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "ldm_scratch", "demo", "--quick", "--steps-scale", "0.1",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"mnist_f4", "photo_f8", "photo_f4"}
    for name in ("mnist_f4", "photo_f8", "photo_f4"):
        assert (out / name / "model" / "config.json").is_file() and (out / name / "model" / "model.pt").is_file()
    text = (out / "report.md").read_text()
    assert "astronaut" in text and "floor" in text.lower()
    assert list(out.glob("*.png")), "the demo should write reconstruction grids"
