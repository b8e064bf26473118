"""scripts/ae_recipe.py: the photo-autoencoder trials' command lines (no training here)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.cli.stage1 import train_autoencoder_parser
from ldm_scratch.cli.flags import apply_flags
from ldm_scratch.config import AUTOENCODER_PRESETS, AutoencoderConfig, get_preset

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """A script of scripts/ as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_script("ae_recipe")


def _cli_config(argv):
    args = train_autoencoder_parser().parse_args(argv)
    return apply_flags(get_preset(AUTOENCODER_PRESETS, args.preset, "autoencoder"), args)


def test_capacity_flags_reach_the_trained_model(recipe):
    """--ch / --ch-mult / --norm-groups / --num-res-blocks change the model train-autoencoder builds, and the
    step-0 row is built from the same widths (so its parameter count matches the trained one's)."""
    args = recipe.parse_args(["--shortcuts", "residual", "--ch", "40", "--ch-mult", "1", "2", "4", "4",
                              "--norm-groups", "8", "--num-res-blocks", "2"])
    cfg = _cli_config(recipe.variant_argv(args, "residual", 3e-5))
    assert (cfg.ch, cfg.ch_mult, cfg.norm_groups, cfg.num_res_blocks) == (40, (1, 2, 4, 4), 8, 2)
    assert cfg.shortcut == "residual" and cfg.z_channels == 4  # the rest is still the preset's
    assert recipe.residual_config(args) == cfg  # the step-0 row's untrained codec has the trained model's layout
    n_cli = sum(p.numel() for p in AutoencoderKL(cfg).parameters())
    base = _cli_config(recipe.variant_argv(recipe.parse_args([]), "residual", 3e-5))
    assert n_cli > sum(p.numel() for p in AutoencoderKL(base).parameters())
    assert (base.ch, base.ch_mult, base.num_res_blocks) == (32, (1, 2, 2, 4), 1)  # no flag: the preset's widths


def test_steps_replace_the_wall_clock(recipe):
    argv = recipe.variant_argv(recipe.parse_args(["--steps", "4600", "--minutes", "30"]), "residual", 3e-5)
    parsed = train_autoencoder_parser().parse_args(argv)
    assert parsed.steps == 4600 and parsed.max_minutes >= recipe.NEVER  # the step count decides
    argv = recipe.variant_argv(recipe.parse_args(["--minutes", "30"]), "residual", 3e-5)
    parsed = train_autoencoder_parser().parse_args(argv)
    assert parsed.steps == recipe.NEVER and parsed.max_minutes == 30  # the clock decides


def test_data_choice(recipe):
    """--augment / --more-photos pick train-autoencoder's --data; both at once is refused, not silently one."""
    for flags, name in (([], "photos"), (["--augment"], "photos-aug"), (["--more-photos"], "photos-more")):
        parsed = train_autoencoder_parser().parse_args(recipe.variant_argv(recipe.parse_args(flags), "residual", 3e-5))
        assert parsed.data == name
    with pytest.raises(ValueError, match="pick one"):
        recipe.variant_argv(recipe.parse_args(["--augment", "--more-photos"]), "residual", 3e-5)


# ----------------------------------------------------------------------------- scripts/photo_codec_errors.py

@pytest.fixture(scope="module")
def errors():
    return load_script("photo_codec_errors")


def _step0_codec(levels=4):
    """The untrained residual f = 8 codec: area-down, then nearest-up (every branch starts at zero)."""
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(in_channels=3, ch=8, ch_mult=(1,) * levels, num_res_blocks=1, z_channels=4,
                                           norm_groups=4, shortcut="residual")).eval()


def test_codec_error_views_on_the_untrained_codec(errors):
    """Closed forms for the codec that IS area-down / nearest-up: it keeps every block's mean, so its mean signed
    error per channel is 0; it acts on each 8 x 8 block alone, so tiles equal the whole; the bins' error shares sum
    to 1; and nearest-up is worse than the bicubic floor (MSE ratio above 1) wherever blocks are not flat."""
    model = _step0_codec()
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g) * 1.6 - 0.8, size=(96, 128),
                                        mode="bicubic", align_corners=False).clamp(-1, 1)
    rec = errors.reconstruct(model, x)
    assert torch.allclose((rec - x).mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(errors.reconstruct_tiles(model, x, 32), rec, atol=1e-5)
    rows = errors.by_activity(x, rec, errors.floor_reconstruction(x, 8), 8)
    assert len(rows) == 5 and sum(r["blocks"] for r in rows) == 12 * 16
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-5)
    assert all(r["ratio"] > 1 for r in rows)
