"""Load real Stable Diffusion VAE weights into our AutoencoderKL (Rombach et al. 2022, Sec. 3; the
`kl-f8` model that SD v1/v2 ship as their first stage).

The same network circulates under two names for every parameter:
  diffusers  `encoder.down_blocks.0.resnets.1.conv1.weight`  (folders with diffusion_pytorch_model.*)
  CompVis    `encoder.down.0.block.1.conv1.weight`           (the original .ckpt, under `first_stage_model.`)
  ours       `encoder.down.0.blocks.1.conv1.weight`
Two layout differences matter beyond renaming:
  - the decoder's levels: ours and diffusers' are numbered in the order they run (deepest first);
    CompVis numbers them by resolution, so its `decoder.up.3` is our `decoder.up.0`;
  - CompVis writes the attention's q, k, v, proj_out as 1x1 convs, weights (C, C, 1, 1); ours are
    Linear layers, (C, C). A 1x1 conv over positions is exactly a Linear over channels.
The rules below only rename; they know no sizes, so a small config converts as well as the SD one.
Every key must be accounted for: unknown names and missing weights raise CheckpointError listing them,
never a silent partial load.

Where it sits: `load_sd_vae(path)` gives a frozen-ready AutoencoderKL with scale_factor 0.18215 from the
"sd" preset; notebooks use it to compare our small autoencoders with SD's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import CheckpointError, check_state_dict, read_json, safe_torch_load
from ldm_scratch.config import AUTOENCODER_PRESETS, AutoencoderConfig, get_preset

# ResnetBlock sub-modules: their name -> ours.
_DIFFUSERS_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "skip"}
_COMPVIS_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                   "nin_shortcut": "skip"}  # "network in network" = the 1x1 conv on the skip path
# SelfAttention2d sub-modules: their name -> ours.
_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                   # the names diffusers used before v0.14, still inside many SD v1 files on disk
                   "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_COMPVIS_ATTN = {"norm": "norm", "q": "q", "k": "k", "v": "v", "proj_out": "proj_out"}
# CompVis training checkpoints also hold the stage-1 loss (LPIPS network, discriminator, logvar):
# training state, not part of the autoencoder, so it is dropped by name.
_COMPVIS_IGNORED_PREFIXES = ("loss.",)
SD_PREFIX = "first_stage_model."  # where a full SD .ckpt keeps its VAE


def _diffusers_module(path: str) -> str | None:
    """A diffusers module path (a key without .weight/.bias) -> ours; None if no rule applies."""
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv", path):
        return path
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", path):
        return f"{m[1]}.norm_out"
    if (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", path)) and m[3] in _DIFFUSERS_RESNET:
        return f"encoder.down.{m[1]}.blocks.{m[2]}.{_DIFFUSERS_RESNET[m[3]]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"encoder.down.{m[1]}.downsample.conv"
    if (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", path)) and m[3] in _DIFFUSERS_RESNET:
        return f"decoder.up.{m[1]}.blocks.{m[2]}.{_DIFFUSERS_RESNET[m[3]]}"  # same level order as ours
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        return f"decoder.up.{m[1]}.upsample.conv"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)", path)) and m[3] in _DIFFUSERS_RESNET:
        return f"{m[1]}.mid_block{int(m[2]) + 1}.{_DIFFUSERS_RESNET[m[3]]}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.([\w.]+)", path)) and m[2] in _DIFFUSERS_ATTN:
        return f"{m[1]}.mid_attn.{_DIFFUSERS_ATTN[m[2]]}"
    return None


def _compvis_module(path: str, num_levels: int) -> str | None:
    """A CompVis module path -> ours; None if no rule applies. num_levels = len(ch_mult)."""
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)|quant_conv|post_quant_conv", path):
        return path
    if (m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)", path)) and m[3] in _COMPVIS_RESNET:
        return f"encoder.down.{m[1]}.blocks.{m[2]}.{_COMPVIS_RESNET[m[3]]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv", path):
        return f"encoder.down.{m[1]}.downsample.conv"
    # CompVis numbers decoder levels by resolution (up.0 = full size); ours run deepest first.
    if (m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)", path)) and m[3] in _COMPVIS_RESNET:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.blocks.{m[2]}.{_COMPVIS_RESNET[m[3]]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv", path):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)", path)) and m[3] in _COMPVIS_RESNET:
        return f"{m[1]}.mid_block{m[2]}.{_COMPVIS_RESNET[m[3]]}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", path)) and m[2] in _COMPVIS_ATTN:
        return f"{m[1]}.mid_attn.{_COMPVIS_ATTN[m[2]]}"
    return None


def _rename(sd: dict[str, torch.Tensor], module_fn: Callable[[str], str | None],
            layout: str) -> dict[str, torch.Tensor]:
    """Apply module_fn to every key; collect every unknown key and report them all at once."""
    out: dict[str, torch.Tensor] = {}
    unknown, clashes = [], []
    for key, value in sd.items():
        path, _, param = key.rpartition(".")
        ours = module_fn(path) if param in ("weight", "bias") else None
        if ours is None:
            unknown.append(key)
            continue
        new_key = f"{ours}.{param}"
        if new_key in out:  # e.g. a file holding both the old `query` and the new `to_q` names
            clashes.append(f"{key} -> {new_key}")
        if re.search(r"mid_attn\.(q|k|v|proj_out)\.weight$", new_key) and value.dim() == 4:
            if value.shape[2:] != (1, 1):
                raise CheckpointError(f"{key}: expected a 1x1 conv weight (C, C, 1, 1), got {tuple(value.shape)}")
            value = value[:, :, 0, 0]  # 1x1 conv (C_out, C_in, 1, 1) -> Linear (C_out, C_in)
        out[new_key] = value
    if unknown or clashes:
        lines = [f"{layout} state dict: cannot map every key onto AutoencoderKL"]
        for title, items in (("unknown", unknown), ("mapped twice", clashes)):
            if items:
                more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:10])}{more}")
        raise CheckpointError("\n".join(lines))
    return out


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> ours. Raises CheckpointError listing any key it cannot map."""
    return _rename(sd, _diffusers_module, "diffusers")


def convert_compvis_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis (LDM / SD .ckpt) names -> ours. Accepts a full SD state dict (keeps `first_stage_model.*`)
    or a bare VAE one; drops the stage-1 loss's `loss.*` weights. Raises CheckpointError on unknown keys."""
    if any(k.startswith(SD_PREFIX) for k in sd):
        # a whole SD model: the U-Net and text encoder live beside the VAE under other prefixes
        sd = {k[len(SD_PREFIX):]: v for k, v in sd.items() if k.startswith(SD_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith(_COMPVIS_IGNORED_PREFIXES)}
    # The number of levels fixes the decoder's index reversal; read it off the keys, not a config.
    levels = {int(m[1]) for k in sd if (m := re.match(r"(?:encoder\.down|decoder\.up)\.(\d+)\.", k))}
    num_levels = max(levels) + 1 if levels else 0
    return _rename(sd, lambda path: _compvis_module(path, num_levels), "CompVis")


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'diffusers' or 'compvis', from the key names (a .safetensors file can hold either)."""
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        return "diffusers"
    if any(k.startswith(SD_PREFIX) or ".down." in k or ".up." in k or ".mid." in k for k in sd):
        return "compvis"
    raise CheckpointError(f"neither a diffusers nor a CompVis VAE state dict; first keys: {list(sd)[:5]}")


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                          "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def _find_weight_file(folder: Path) -> Path:
    """A diffusers VAE folder, or a whole pipeline folder with the VAE in `vae/`."""
    for base in (folder, folder / "vae"):
        for name in DIFFUSERS_WEIGHT_NAMES:
            if (base / name).is_file():
                return base / name
    raise CheckpointError(f"{folder}: no VAE weights found; looked for {', '.join(DIFFUSERS_WEIGHT_NAMES)} "
                          f"in the folder and in its vae/ subfolder")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file  # optional dependency: only .safetensors files need it
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the `safetensors` package "
                              f"(pip install safetensors), or give a .bin/.ckpt file instead") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"{path}: corrupt or truncated .safetensors file ({type(e).__name__}: {e})") from None


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = safe_torch_load(path)
    except CheckpointError as e:
        if "weights_only" not in str(e):
            raise
        raise CheckpointError(
            f"{e}\nPyTorch Lightning .ckpt files may pickle training objects (callbacks, optimizer "
            f"classes) next to the weights, and weights_only=True refuses anything but tensors and plain "
            f"data, since unpickling can run code. If you trust the file, extract the weights once: "
            f"torch.save(torch.load(p, weights_only=False)['state_dict'], 'vae.pt'); or use the "
            f".safetensors release of the same weights.") from None
    # Lightning nests the weights under "state_dict" beside plain data such as global_step.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected a dict of tensors; non-tensor entries: {bad[:10]}")
    return obj


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the raw (unconverted) state dict from a folder, .safetensors, .bin/.pt/.pth or .ckpt file."""
    path = Path(path)
    if path.is_dir():
        path = _find_weight_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _load_torch(path)
    raise CheckpointError(f"{path}: unknown extension {path.suffix!r}; expected .safetensors, .bin, .pt, .pth "
                          f"or .ckpt, or a diffusers folder")


def load_sd_vae(path: str | os.PathLike, cfg: AutoencoderConfig | None = None) -> AutoencoderKL:
    """Stable Diffusion's VAE (diffusers or CompVis layout, detected from the names) as our AutoencoderKL.

    cfg defaults to the "sd" preset (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4, scale_factor 0.18215),
    with scale_factor taken from a diffusers folder's config.json ("scaling_factor") when there is one.
    Returned in eval mode: it is a finished stage 1. Any unknown, missing or wrongly-shaped weight raises
    CheckpointError naming the keys and the file.
    """
    path = Path(path)
    if path.is_dir():
        path = _find_weight_file(path)
    if cfg is None:
        cfg = get_preset(AUTOENCODER_PRESETS, "sd", "autoencoder")
        # A diffusers folder records its own scale factor (SDXL's VAE: same network, 0.13025).
        diffusers_cfg = path.parent / "config.json"
        if diffusers_cfg.is_file():
            cfg.scale_factor = float(read_json(diffusers_cfg).get("scaling_factor", cfg.scale_factor))
    raw = load_state_dict_file(path)
    layout = detect_layout(raw)
    try:
        sd = convert_diffusers_state_dict(raw) if layout == "diffusers" else convert_compvis_state_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = AutoencoderKL(cfg)
    check_state_dict(model, sd, f"{path} ({layout} layout, converted)")
    model.load_state_dict(sd)  # copies, casting fp16 files to the model's fp32
    return model.eval()
