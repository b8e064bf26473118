"""Command-line flags generated from the config dataclasses (config.py), and the training data.

Every flag of a training command is a config field, generated from the dataclass so the two cannot
drift: `--kl-weight` is LossConfig.kl_weight, `--batch-size` TrainConfig.batch_size. An unknown flag
or value is an error that lists the valid ones (argparse's choices do it).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import torch

from ldm_scratch.diffusion import PREDICTIONS, SCHEDULES

# The string fields whose valid values are a closed set.
CHOICES = {"precision": ("auto", "bf16", "fp32"), "disc_loss": ("hinge", "vanilla"),
           "perceptual_net": ("default", "contrastive", "vgg16", "none"), "schedule": SCHEDULES, "prediction": PREDICTIONS,
           "adamw": ("auto", "fused", "foreach", "loop")}
# Fields the command sets itself: the data decides the channels and size; the scale and shift are measured.
NOT_FLAGS = {"in_channels", "out_channels", "sample_size", "scale_factor", "shift_factor"}
# The valid range of each numeric field, checked when the flag is parsed (argparse's error, exit status 2,
# before any work): (low, low_inclusive, high, high_inclusive); None = unbounded. A field not listed must be
# finite and >= 0. Every value must be finite (NaN and inf never pass).
POSITIVE, AT_LEAST_1 = (0.0, False, None, False), (1, True, None, False)
FIELD_RANGES: dict[str, tuple] = {
    "lr": POSITIVE, "disc_lr": POSITIVE, "mlp_ratio": POSITIVE, "logit_std": POSITIVE, "shift": POSITIVE,
    "adaptive_weight_max": POSITIVE,
    "steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "log_every": AT_LEAST_1, "num_timesteps": AT_LEAST_1,
    "ch": AT_LEAST_1, "ch_mult": AT_LEAST_1, "num_res_blocks": AT_LEAST_1, "z_channels": AT_LEAST_1,
    "norm_groups": AT_LEAST_1, "num_heads": AT_LEAST_1, "patch_size": AT_LEAST_1, "hidden_size": AT_LEAST_1,
    "depth": AT_LEAST_1, "disc_channels": AT_LEAST_1, "disc_layers": AT_LEAST_1, "max_length": AT_LEAST_1,
    "dim": AT_LEAST_1, "attn_resolutions": AT_LEAST_1,
    "betas": (0.0, True, 1.0, False), "ema_decay": (0.0, True, 1.0, True), "dropout": (0.0, True, 1.0, False),
    "beta_start": (0.0, False, 1.0, False), "beta_end": (0.0, False, 1.0, False),
    "seed": (0, True, 2 ** 63 - 1, True),
    "logit_mean": (None, False, None, False), "logvar_init": (None, False, None, False),
}
DEFAULT_RANGE = (0, True, None, False)


def _range_text(rng: tuple) -> str:
    lo, lo_in, hi, hi_in = rng
    parts = ([f"{'>=' if lo_in else '>'} {lo:g}"] if lo is not None else []) + \
            ([f"{'<=' if hi_in else '<'} {hi:g}"] if hi is not None else [])
    return " and ".join(parts) if parts else "finite"


def checked(kind: type, name: str) -> Any:
    """An argparse type: parse with `kind`, then require a finite value in FIELD_RANGES[name]."""
    rng = FIELD_RANGES.get(name, DEFAULT_RANGE)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        lo, lo_in, hi, hi_in = rng
        ok = math.isfinite(value) and (lo is None or (value >= lo if lo_in else value > lo)) and \
            (hi is None or (value <= hi if hi_in else value < hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {_range_text(rng)}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
# Photo crops drawn per epoch; the crops are random, so this only sets how often the order repeats.
PHOTO_CROPS = 8192


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field (default None = keep the preset's value)."""
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in NOT_FLAGS:
            continue
        default = getattr(cls(), f.name)
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f"(default {default})"}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kw.update(nargs="+", type=checked(type(default[0]), f.name))
        elif isinstance(default, (int, float)):
            kw["type"] = checked(type(default), f.name)
        else:
            kw["type"] = type(default)
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def apply_flags(cfg: Any, args: argparse.Namespace) -> Any:
    """A copy of cfg with every field given on the command line replaced."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg)
             if f.name not in NOT_FLAGS and getattr(args, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return dataclasses.replace(cfg, **given)


# ----------------------------------------------------------------------------- data
def build_data(name: str, image_size: int | None, seed: int,
               data_dir: str | None = None) -> torch.utils.data.Dataset:
    """The training images of --data: mnist5k (1 x 32 x 32 digits), colored (3 x 32 x 32 captioned
    coloured digits), photos (random 3 x S x S crops; photos-aug adds 90-degree rotations and shuffled colour
    channels; photos-more draws from data.EXTRA_PHOTOS too) or folder (the user's own images)."""
    from ldm_scratch import data
    if name == "mnist5k":
        return data.MNIST5k("train", pad_to=image_size or 32)
    if name == "colored":
        # 3 x 32 x 32 tinted digits over textures. Items are (x, label, caption): the stage-1 task reads
        # only batch[0] (stage1.images_of), like mnist5k's (x, label). The dataset's own seed stays 0,
        # the one latent training and adherence.fit_adherence use, so --seed changes the training, not the data.
        if image_size not in (None, data.ColoredDigits.SIZE):
            raise ValueError(f"--data colored is {data.ColoredDigits.SIZE} x {data.ColoredDigits.SIZE}; "
                             f"got --image-size {image_size}")
        return data.ColoredDigits("train")
    if name in ("photos", "photos-aug", "photos-more"):
        names = data.TRAIN_PHOTOS + (data.EXTRA_PHOTOS if name == "photos-more" else ())
        return data.PhotoCrops(size=image_size or 64, length=PHOTO_CROPS, names=names, seed=seed,
                               augment=name == "photos-aug")
    if name == "folder":
        from ldm_scratch.loaders import ImageFolder
        if not data_dir:
            raise ValueError("--data folder needs --data-dir DIR (a folder of PNG/JPEG images, searched recursively)")
        return ImageFolder(data_dir, size=image_size or 64)
    raise ValueError(f"unknown data {name!r}; valid: {', '.join(DATASETS)}")


DATASETS = ("mnist5k", "colored", "photos", "photos-aug", "photos-more", "folder")
