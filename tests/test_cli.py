"""The command line: a 3-step stage-1 run writes a loadable model folder with a measured scale
factor; an unknown preset, flag or value exits non-zero and lists the valid ones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "ldm_scratch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_autoencoder_writes_model_folder(tmp_path):
    pytest.importorskip("ldm_scratch.losses")
    pytest.importorskip("ldm_scratch.data")
    out = tmp_path / "run"
    r = run_cli("train-autoencoder", "--preset", "tiny", "--data", "mnist5k", "--steps", "3",
                "--batch-size", "4", "--disc-start", "2", "--precision", "fp32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "model" / "config.json").read_text())
    scale = cfg["config"]["scale_factor"]
    assert scale != 1.0 and 0 < scale < 1e3  # measured, not the placeholder
    assert cfg["config"]["in_channels"] == 1  # set from the data
    assert (out / "model" / "model.pt").is_file()
    assert (out / "checkpoint.pt").is_file() and (out / "loss.png").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    from ldm_scratch.autoencoder import AutoencoderKL
    assert AutoencoderKL.from_pretrained(out / "model").scale_factor == pytest.approx(scale)


@pytest.mark.parametrize("args, expected", [
    (["train-autoencoder", "--preset", "huge"], "small-f4"),
    (["train-autoencoder", "--precision", "fp8"], "bf16"),
    (["train-autoencoder", "--data", "imagenet"], "mnist5k"),
    (["train-autoencoder", "--no-such-flag", "1"], "unrecognized arguments"),
    (["dream"], "train-autoencoder"),
])
def test_bad_arguments_list_valid_values(args, expected, capsys):
    from ldm_scratch.__main__ import main  # in-process: argparse exits before any work starts
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code != 0
    assert expected in capsys.readouterr().err


def test_bad_arguments_exit_nonzero_in_a_subprocess():
    r = run_cli("train-autoencoder", "--preset", "huge", timeout=60)
    assert r.returncode != 0 and "small-f8" in r.stderr


def test_flags_map_onto_config_fields():
    from ldm_scratch.__main__ import apply_flags, build_parser
    from ldm_scratch.config import LossConfig, TrainConfig
    args = build_parser().parse_args(["train-autoencoder", "--kl-weight", "0.5", "--batch-size", "7",
                                      "--betas", "0.9", "0.99", "--no-mid-attention"])
    assert apply_flags(LossConfig(), args).kl_weight == 0.5
    assert apply_flags(TrainConfig(), args).batch_size == 7
    assert apply_flags(TrainConfig(), args).betas == (0.9, 0.99)
    assert args.mid_attention is False
    assert apply_flags(TrainConfig(), args).lr == TrainConfig().lr  # not given: unchanged


def test_train_autoencoder_on_a_users_image_folder(tmp_path):
    """--data folder trains on the user's own PNG/JPEG files; a missing --data-dir is a clear error."""
    pytest.importorskip("ldm_scratch.losses")
    import numpy as np
    from skimage import io
    rng = np.random.default_rng(0)
    for i in range(4):
        io.imsave(tmp_path / f"img{i}.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), check_contrast=False)
    out = tmp_path / "run"
    r = run_cli("train-autoencoder", "--preset", "tiny", "--data", "folder", "--data-dir", str(tmp_path),
                "--image-size", "16", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "model" / "config.json").read_text())["config"]["in_channels"] == 3
    r = run_cli("train-autoencoder", "--data", "folder", "--steps", "1", "--out", str(out), timeout=60)
    assert r.returncode != 0 and "--data-dir" in r.stderr
