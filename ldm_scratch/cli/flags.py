"""Command-line flags generated from the config dataclasses (config.py), and the training data.

Every flag of a training command is a config field, generated from the dataclass so the two cannot
drift: `--kl-weight` is LossConfig.kl_weight, `--batch-size` TrainConfig.batch_size. An unknown flag
or value is an error that lists the valid ones (argparse's choices do it).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from ldm_scratch.diffusion import PREDICTIONS, SCHEDULES

# The string fields whose valid values are a closed set.
CHOICES = {"precision": ("auto", "bf16", "fp32"), "disc_loss": ("hinge", "vanilla"),
           "perceptual_net": ("default", "vgg16", "none"), "schedule": SCHEDULES, "prediction": PREDICTIONS,
           "adamw": ("auto", "fused", "foreach", "loop")}
# Fields the command sets itself: the data decides the channels and size; the scale factor is measured.
NOT_FLAGS = {"in_channels", "out_channels", "sample_size", "scale_factor"}
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
            kw.update(nargs="+", type=type(default[0]))
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
    coloured digits), photos (random 3 x S x S crops) or folder (the user's own images)."""
    from ldm_scratch import data
    if name == "mnist5k":
        return data.MNIST5k("train", pad_to=image_size or 32)
    if name == "colored":
        # 3 x 32 x 32 tinted digits over textures. Items are (x, label, caption): the stage-1 task reads
        # only batch[0] (stage1.images_of), like mnist5k's (x, label). The dataset's own seed stays 0,
        # the one stage 3 and adherence.fit_adherence use, so --seed changes the training, not the data.
        if image_size not in (None, data.ColoredDigits.SIZE):
            raise ValueError(f"--data colored is {data.ColoredDigits.SIZE} x {data.ColoredDigits.SIZE}; "
                             f"got --image-size {image_size}")
        return data.ColoredDigits("train")
    if name == "photos":
        return data.PhotoCrops(size=image_size or 64, length=PHOTO_CROPS, seed=seed)
    if name == "folder":
        from ldm_scratch.loaders import ImageFolder
        if not data_dir:
            raise ValueError("--data folder needs --data-dir DIR (a folder of PNG/JPEG images, searched recursively)")
        return ImageFolder(data_dir, size=image_size or 64)
    raise ValueError(f"unknown data {name!r}; valid: {', '.join(DATASETS)}")


DATASETS = ("mnist5k", "colored", "photos", "folder")
