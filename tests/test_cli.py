"""The command line: a 3-step stage-1 run writes a loadable model folder with a measured scale
factor; an unknown preset, flag or value exits non-zero and lists the valid ones."""
import argparse
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


# ----------------------------------------------------------------------------- stage 2 in the latent (latent diffusion)
# In-process main() calls: one interpreter start instead of one per command keeps these seconds, not minutes.
LATENT_RUN = ["--steps", "3", "--batch-size", "8", "--precision", "fp32", "--sample-steps", "2",
              "--sample-every", "0", "--ckpt-every", "0"]


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    """Untrained tiny autoencoders saved as folders: 1 channel (mnist5k) and 3 (colored)."""
    import dataclasses
    import torch
    from ldm_scratch.autoencoder import AutoencoderKL
    from ldm_scratch.config import AUTOENCODER_PRESETS, get_preset
    root = tmp_path_factory.mktemp("ae")
    for c in (1, 3):
        torch.manual_seed(0)
        cfg = dataclasses.replace(get_preset(AUTOENCODER_PRESETS, "tiny"), in_channels=c, scale_factor=0.8)
        AutoencoderKL(cfg).save_pretrained(root / f"ae{c}")
    return root


@pytest.mark.parametrize("data, conditioning, denoiser, channels", [
    ("mnist5k", "class", "dit", 1),     # classes, the transformer: accuracy and FID beside its floor
    ("colored", "text", "unet", 3),     # captions, the U-Net: prompt adherence beside its ceiling
])
def test_latent_training_writes_pipeline_and_eval(autoencoders, tmp_path, capsys, data, conditioning, denoiser,
                                                  channels):
    from ldm_scratch.__main__ import main
    out = tmp_path / "run"
    args = ["train-diffusion", "--space", "latent", "--autoencoder", str(autoencoders / f"ae{channels}"),
            "--data", data, "--conditioning", conditioning, "--denoiser", denoiser, "--eval-per-class", "1",
            "--out", str(out), *LATENT_RUN]
    if conditioning == "text":
        args += ["--context-dim", "16"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["denoiser"] == denoiser and index["conditioning"] == conditioning
    assert (out / "latents.pt").is_file() and (out / "samples" / "final.png").is_file()
    ev = json.loads((out / "eval.json").read_text())
    assert ev["steps"] == 3 and ev["denoiser"] == denoiser
    if conditioning == "class":
        assert 0 <= ev["eval"]["cond_acc"] <= 1 and ev["eval"]["fid"] > ev["eval"]["fid_real_vs_real"] > 0
        # resume: the same run folder goes on from step 3 to 5, re-using the latent cache
        assert main([*args[:-len(LATENT_RUN)], *LATENT_RUN[:1], "5", *LATENT_RUN[2:], "--resume"]) == 0
        assert len((out / "log.jsonl").read_text().splitlines()) == 5
        assert "re-encoding" not in capsys.readouterr().out
        assert json.loads((out / "eval.json").read_text())["steps"] == 5
        # a prompt to a class model: one line, exit 2
        assert main(["sample", "--model", str(out / "pipeline"), "--prompt", "a red 7 on grass"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "class_labels" in err[0]
    else:
        for key in ("adherence", "reconstructions"):
            assert set(ev["eval"][key]) >= {"digit_acc", "color_acc", "background_acc", "all_acc"}
        png = tmp_path / "grid.png"
        assert main(["sample", "--model", str(out / "pipeline"), "--prompt", "a red 7 on grass", "a blue 1 on plain",
                     "--num-images", "2", "--steps", "2", "--guidance", "2", "--out", str(png)]) == 0
        assert png.stat().st_size > 0
        # an unknown word samples, as [unk], with one warning that names it and lists the vocabulary
        with pytest.warns(UserWarning, match=r"\['purple'\] encoded as \[unk\].*magenta"):
            assert main(["sample", "--model", str(out / "pipeline"), "--prompt", "a purple 7 on grass",
                         "--num-images", "1", "--steps", "1", "--out", str(png)]) == 0


@pytest.mark.parametrize("extra, expected", [
    ([], "--autoencoder"),                                               # latent space needs stage 1
    (["--autoencoder", "AE3", "--hidden-size", "8"], "--denoiser dit"),  # a DiT flag on the U-Net
    (["--autoencoder", "AE3", "--data", "mnist5k"], "takes 3"),          # 1-channel digits, 3-channel autoencoder
    (["--autoencoder", "AE1", "--conditioning", "text"], "--data colored"),  # no captions in mnist5k
    (["--autoencoder", "AE3", "--data", "colored", "--preset", "dit-tiny"], "not a 'unet' preset"),
    (["--autoencoder", "AE1", "--objective", "flow", "--schedule", "cosine"], "--schedule: for --objective ddpm"),
    (["--autoencoder", "AE1", "--t-sampling", "uniform", "--shift", "3"],
     "--shift, --t-sampling: for --objective flow"),
])
def test_latent_flag_errors_are_one_line(autoencoders, tmp_path, capsys, extra, expected):
    from ldm_scratch.__main__ import main
    extra = [str(autoencoders / "ae3") if a == "AE3" else str(autoencoders / "ae1") if a == "AE1" else a
             for a in extra]
    assert main(["train-diffusion", "--space", "latent", *extra, "--out", str(tmp_path), *LATENT_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_pixel_space_refuses_latent_flags(capsys):
    from ldm_scratch.__main__ import main
    assert main(["train-diffusion", "--data", "colored", "--steps", "1"]) == 2
    assert "--space latent" in capsys.readouterr().err
    assert main(["train-diffusion", "--objective", "flow", "--steps", "1"]) == 2  # pixel space: DDPM only, for now
    assert "--objective flow: for --space latent" in capsys.readouterr().err


def test_latent_flow_run_trains_evaluates_and_samples(autoencoders, tmp_path, capsys):
    """--objective flow end to end: train, the evaluation through the pipeline's default sampler (Euler), the
    saved objective, then `sample` with Euler (default) and Heun; DDPM's samplers and eta are refused."""
    from ldm_scratch.__main__ import main
    out = tmp_path / "run"
    assert main(["train-diffusion", "--space", "latent", "--autoencoder", str(autoencoders / "ae1"),
                 "--objective", "flow", "--t-sampling", "uniform", "--shift", "2", "--eval-per-class", "1",
                 "--out", str(out), *LATENT_RUN]) == 0, capsys.readouterr().err[-2000:]
    scheduler = json.loads((out / "pipeline" / "scheduler" / "config.json").read_text())
    assert scheduler == {"objective": "flow", "t_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0,
                         "shift": 2.0}
    ev = json.loads((out / "eval.json").read_text())
    assert ev["objective"] == "flow" and 0 <= ev["eval"]["cond_acc"] <= 1
    base = ["sample", "--model", str(out / "pipeline"), "--class-labels", "1", "7", "--num-images", "2",
            "--steps", "2", "--precision", "fp32"]
    for sampler in ([], ["--sampler", "heun"]):
        png = tmp_path / f"grid{len(sampler)}.png"
        assert main([*base, *sampler, "--out", str(png)]) == 0, capsys.readouterr().err[-2000:]
        assert png.stat().st_size > 0
    capsys.readouterr()  # the progress bars so far
    for bad, expected in ((["--sampler", "ddim"], "--sampler ddim: this pipeline's objective is 'flow'; its "
                                                  "samplers: euler, heun"),
                          (["--eta", "0.5"], "eta is DDIM's noise")):
        assert_one_line_error(main, [*base, *bad, "--out", str(tmp_path / "x.png")], capsys, expected)
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- sample: bad input, one line each
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """An untrained tiny pixel model folder (OUT/model) and a tiny text pipeline folder (OUT/pipeline)."""
    import dataclasses
    import torch
    from ldm_scratch.autoencoder import AutoencoderKL
    from ldm_scratch.config import AUTOENCODER_PRESETS, UNET_PRESETS, DiffusionConfig, TextEncoderConfig, get_preset
    from ldm_scratch.diffusion import GaussianDiffusion
    from ldm_scratch.pipeline import LatentDiffusionPipeline
    from ldm_scratch.stage2 import DiffusionTask
    from ldm_scratch.text import TextEncoder, Tokenizer
    from ldm_scratch.unet import UNet
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    pixel = dataclasses.replace(get_preset(UNET_PRESETS, "tiny"), num_classes=10, sample_size=16)
    DiffusionTask(pixel, DiffusionConfig(), precision="fp32").finish(root / "pixel", grid=False)
    tok = Tokenizer.from_captions(["a red 7 on grass", "a blue 1 on plain"])
    ae = AutoencoderKL(dataclasses.replace(get_preset(AUTOENCODER_PRESETS, "tiny"), in_channels=3, scale_factor=0.8))
    te = TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, max_length=tok.max_length, dim=16, depth=1,
                                       num_heads=2))
    unet = UNet(dataclasses.replace(get_preset(UNET_PRESETS, "tiny-latent"), context_dim=16))
    LatentDiffusionPipeline(ae, unet, GaussianDiffusion(DiffusionConfig()), tok, te).save_pretrained(
        root / "text" / "pipeline")
    return {"pixel": root / "pixel" / "model", "text": root / "text" / "pipeline"}


def sample_args(saved_models, kind, out):
    cond = ["--class-labels", "3"] if kind == "pixel" else ["--prompt", "a red 7"]
    return ["sample", "--model", str(saved_models[kind]), *cond, "--num-images", "1", "--steps", "1",
            "--precision", "fp32", "--out", str(out)]


def assert_one_line_error(main, argv, capsys, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("kind", ["pixel", "text"])
def test_sample_runs_on_both_saved_folders(saved_models, tmp_path, kind):
    """The fixtures are valid: the errors below come from the flags, not from a broken folder."""
    from ldm_scratch.__main__ import main
    assert main(sample_args(saved_models, kind, tmp_path / "ok.png")) == 0
    assert (tmp_path / "ok.png").stat().st_size > 0


@pytest.mark.parametrize("kind", ["pixel", "text"])
@pytest.mark.parametrize("flag, value", [("--num-images", "0"), ("--num-images", "-2"), ("--steps", "0"),
                                         ("--steps", "-5"), ("--steps", "1001")])
def test_sample_refuses_counts_out_of_range(saved_models, tmp_path, capsys, kind, flag, value):
    """A count of 0, a negative one, or more DDIM steps than the model's T = 1000: an error, and no image."""
    from ldm_scratch.__main__ import main
    out = tmp_path / "x.png"
    assert_one_line_error(main, [*sample_args(saved_models, kind, out), flag, value], capsys, flag)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["pixel", "text"])
@pytest.mark.parametrize("flag, value", [("--guidance-scale", "nan"), ("--guidance-scale", "-1"),
                                         ("--guidance-scale", "inf"), ("--eta", "1.5"), ("--eta", "-0.1"),
                                         ("--eta", "nan")])
def test_sample_refuses_non_finite_or_out_of_range_floats(saved_models, tmp_path, capsys, kind, flag, value):
    from ldm_scratch.__main__ import main
    out = tmp_path / "x.png"
    assert_one_line_error(main, [*sample_args(saved_models, kind, out), flag, value], capsys, flag)
    assert not out.exists()


@pytest.mark.parametrize("kind, expected", [("pixel", "unknown sampler 'euler'; valid samplers: ddim, ddpm"),
                                            ("text", "--sampler euler: this pipeline's objective is 'ddpm'; its "
                                                     "samplers: ddim, ddpm")])
def test_sample_refuses_a_flow_sampler_on_a_ddpm_model(saved_models, tmp_path, capsys, kind, expected):
    from ldm_scratch.__main__ import main
    out = tmp_path / "x.png"
    assert_one_line_error(main, [*sample_args(saved_models, kind, out), "--sampler", "euler"], capsys, expected)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["pixel", "text"])
def test_sample_refuses_a_negative_seed(saved_models, tmp_path, capsys, kind):
    from ldm_scratch.__main__ import main
    assert_one_line_error(main, [*sample_args(saved_models, kind, tmp_path / "x.png"), "--seed", "-1"], capsys,
                          "--seed")


def test_sample_refuses_a_value_of_the_wrong_type(saved_models, tmp_path, capsys):
    from ldm_scratch.__main__ import main  # argparse: exit 2 before any work, naming the flag
    with pytest.raises(SystemExit) as e:
        main([*sample_args(saved_models, "text", tmp_path / "x.png"), "--steps", "two"])
    assert e.value.code == 2 and "--steps: invalid int value" in capsys.readouterr().err


def test_sample_names_a_missing_or_wrong_model_folder(saved_models, tmp_path, capsys):
    """No such folder, a file, a folder holding neither layout (listing both), a run folder (pointing inside)."""
    from ldm_scratch.__main__ import main
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")

    assert_one_line_error(main, ["sample", "--model", str(tmp_path / "no" / "such"), "--prompt", "a"], capsys,
                          "no such folder")
    assert_one_line_error(main, ["sample", "--model", str(tmp_path / "file.txt")], capsys, "is a file")
    assert_one_line_error(main, ["sample", "--model", str(tmp_path / "empty"), "--prompt", "a"], capsys,
                          "neither a pipeline folder (model_index.json) nor a model folder (config.json + model.pt)")
    run_folder = saved_models["text"].parent  # OUT, holding OUT/pipeline
    assert_one_line_error(main, ["sample", "--model", str(run_folder), "--prompt", "a"], capsys,
                          f"did you mean {saved_models['text']}?")


# ---------------------------------------------------------------- every numeric config flag, swept
def _config_flags(command: str) -> list:
    from ldm_scratch.__main__ import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [a for a in sub._actions if a.option_strings and "checked" in getattr(a.type, "__qualname__", "")]


def _sweep_cases():
    from ldm_scratch.cli.flags import DEFAULT_RANGE, FIELD_RANGES
    cases = []
    for command in ("train-autoencoder", "train-diffusion"):
        for action in _config_flags(command):
            lo, lo_in, hi, hi_in = FIELD_RANGES.get(action.dest, DEFAULT_RANGE)
            bad = ["nan", "inf", "-inf", "abc"] + (["-1"] if lo is not None else [])
            if lo is not None and not lo_in:
                bad.append(str(lo))                        # an open bound: the bound itself is refused
            if hi is not None:
                bad.append(str(hi + 1))
            good = str(lo if lo is not None and lo_in else (lo + (1 if hi is None else (hi - lo) / 2)) if lo is not None
                       else -1.5)
            cases += [(command, action.option_strings[0], v, False) for v in bad] + [(command, action.option_strings[0],
                                                                                       good, True)]
    return cases


SWEEP = _sweep_cases()


def test_the_sweep_covers_every_numeric_field():
    flags = {flag for _, flag, _, _ in SWEEP}
    assert {"--lr", "--steps", "--batch-size", "--betas", "--ema-decay", "--kl-weight", "--ch-mult", "--depth",
            "--logit-std", "--beta-end", "--seed"} <= flags
    assert "--scale-factor" not in flags and "--shift-factor" not in flags   # measured, not set


@pytest.mark.parametrize("command, flag, value, valid", SWEEP, ids=[f"{c}{f}={v}" for c, f, v, _ in SWEEP])
def test_numeric_flags_refuse_nan_inf_words_and_out_of_range(command, flag, value, valid, capsys):
    """Each numeric config flag, with NaN, inf, a word, -1 and its bounds: argparse refuses the bad ones with the
    flag named (exit status 2, before any work) and takes a value inside the range."""
    from ldm_scratch.__main__ import build_parser
    argv = [command, flag, value] + (["0.5"] if flag == "--betas" else [])
    if valid:
        build_parser().parse_args(argv)
        return
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and ("must be" in err or "expected" in err), err
