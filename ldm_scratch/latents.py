"""Stage 2 in the latent, step 0: encode the training set ONCE with the frozen autoencoder, and cache the latents.

Rombach et al. 2022 (Sec. 3-4): the diffusion model of a latent diffusion model never sees pixels.
Stage 1 is finished and frozen, so each training image always maps to the same latent; encoding it
again at every epoch would spend most of a CPU step in the encoder for nothing. We encode once,
multiply by the measured `scale_factor` (the unit-variance rescaling of Sec. 4.3.2, SD's 0.18215),
and train the denoiser on the cached z0 (N, c, H/f, W/f).

A cache is only valid for the autoencoder that wrote it: new weights or a new scale_factor mean a
new latent space, and a denoiser trained on the old latents would decode to garbage. So the cache
file records a fingerprint (a sha256 of the autoencoder, plus the dataset's name, size and image
shape); `cached_latents` re-encodes when it does not match, and `check_latent_cache` refuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm  # text bars: a saved notebook keeps their last state (a widget shows 0%)

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from ldm_scratch.config import config_to_dict
from ldm_scratch.device import autocast

CACHE_FORMAT = 1     # bump when the cache's layout changes: older files are then re-encoded
HASH_CHUNK = 1 << 20  # read model files 1 MiB at a time: an SD-sized model.pt (~335 MB) never sits in memory twice


@torch.no_grad()
def encode_images(ae: AutoencoderKL, images: Tensor, batch_size: int = 256, precision: str = "auto",
                  progress: bool = True) -> Tensor:
    """images (N, C, H, W) in [-1, 1] -> z0 = (mode(q(z|x)) - shift_factor) * scale_factor (N, c, H/f, W/f),
    CPU float32 (shift_factor is 0 for the SD layout).

    Why the mode (the posterior mean) and not a sample: a cache freezes whatever we store. LDM draws
    a fresh posterior sample each time it sees an image; a cached *sample* would instead bake one
    arbitrary draw of encoder noise into the data forever, noise the denoiser would then learn as if
    it were content. The mean is the one deterministic, most likely latent, and it is what the decoder
    reconstructs best. With LDM's tiny KL weight the posterior std is small beside the spread of the
    means, so the two give nearly the same distribution (and the same scale_factor, autoencoder.py).
    Runs on the autoencoder's device, batch by batch, under bf16 autocast where `precision` allows.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (N, C, H, W), got {shape}")
    if images.shape[0] == 0 or batch_size < 1:
        raise ValueError(f"need at least one image and batch_size >= 1; got {images.shape[0]} images, "
                         f"batch_size {batch_size}")
    was_training = ae.training
    ae.eval()  # dropout off: encode the model exactly as it will decode
    device = next(ae.parameters()).device
    out = []
    for x in tqdm(images.split(batch_size), desc="encode", disable=not progress):
        with autocast(device, precision):
            z = ae.encode(x.to(device)).mode()  # (B, C, H, W) -> (B, c, H/f, W/f)
        out.append(ae.scale_latents(z.float()).cpu())  # (z - shift_factor) * scale_factor
    ae.train(was_training)
    return torch.cat(out)  # (N, c, H/f, W/f)


def autoencoder_fingerprint(ae: AutoencoderKL, ae_folder: str | os.PathLike | None = None) -> str:
    """sha256 that changes whenever the latent space does.

    With `ae_folder` (where the autoencoder was saved): of its model.pt and config.json bytes (the
    config holds scale_factor). Without: of every state_dict tensor (name, dtype, shape, bytes) and
    the config, scale_factor included. The two kinds differ for the same weights, so a cache must be
    checked the way it was written (with or without the folder).
    """
    h = hashlib.sha256()
    if ae_folder is not None:
        for name in ("model.pt", "config.json"):
            path = Path(ae_folder) / name
            if not path.is_file():
                raise CheckpointError(f"{path}: file not found (needed to fingerprint the autoencoder)")
            h.update(name.encode())
            with open(path, "rb") as fh:
                while chunk := fh.read(HASH_CHUNK):
                    h.update(chunk)
        return h.hexdigest()
    for k, v in sorted(ae.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype (bf16 included)
    h.update(json.dumps(config_to_dict(ae.cfg), sort_keys=True).encode())  # scale_factor lives here
    return h.hexdigest()


def _key(ae: AutoencoderKL, ae_folder: str | os.PathLike | None, images: Tensor, dataset_id: str) -> dict:
    """What a cache must match to be reused: the autoencoder, the dataset, its size and image shape."""
    return {"format": CACHE_FORMAT, "autoencoder": autoencoder_fingerprint(ae, ae_folder),
            "dataset_id": str(dataset_id), "n": int(images.shape[0]), "image_shape": list(images.shape[1:])}


def _read_cache(cache_file: Path) -> tuple[dict, Tensor]:
    """(key, latents) from a cache file; a CheckpointError naming the file if it is not one."""
    state = safe_torch_load(cache_file)
    if not isinstance(state, dict) or not isinstance(state.get("key"), dict) \
            or not isinstance(state.get("latents"), Tensor):
        raise CheckpointError(f"{cache_file}: not a latent cache (expected a dict with 'key' and 'latents')")
    return state["key"], state["latents"]


def _mismatch(found: dict, wanted: dict) -> str:
    """One line naming what differs, e.g. "autoencoder (sha256 1a2b3c4d.. vs 5e6f7a8b..)"."""
    parts = []
    for k in wanted:
        a, b = found.get(k), wanted[k]
        if a != b:
            if k == "autoencoder" and isinstance(a, str):
                a, b = f"sha256 {a[:8]}..", f"{b[:8]}.."
            parts.append(f"{k} ({a} in the cache vs {b} now)")
    return ", ".join(parts)


def cached_latents(ae: AutoencoderKL, ae_folder: str | os.PathLike | None, images: Tensor,
                   cache_file: str | os.PathLike, dataset_id: str, **encode_kw) -> Tensor:
    """The scaled latents of `images` (N, c, H/f, W/f), read from `cache_file` when it was written by
    this autoencoder for this dataset, else encoded (encode_images(**encode_kw)) and written atomically.

    A stale cache (other weights, other scale_factor, other data) or an unreadable one is replaced,
    with a one-line message saying why: a cache is derived data, so rebuilding it is always safe.
    """
    cache_file = Path(cache_file)
    key = _key(ae, ae_folder, images, dataset_id)
    if cache_file.exists():
        try:
            found, z = _read_cache(cache_file)
            why = _mismatch(found, key)
            if not why and z.shape[0] == images.shape[0]:
                return z
            why = why or f"it holds {z.shape[0]} latents for {images.shape[0]} images"
        except CheckpointError as e:
            why = str(e)
        print(f"latent cache {cache_file} is stale: {why}; re-encoding")
    z = encode_images(ae, images, **encode_kw)
    atomic_torch_save({"key": key, "latents": z}, cache_file)
    return z


def check_latent_cache(cache_file: str | os.PathLike, ae: AutoencoderKL,
                       ae_folder: str | os.PathLike | None = None) -> None:
    """Raise CheckpointError naming `cache_file` if it was not written by this autoencoder (or is not a
    cache at all). For code that loads a cache explicitly instead of through cached_latents."""
    cache_file = Path(cache_file)
    found, _ = _read_cache(cache_file)
    wanted = autoencoder_fingerprint(ae, ae_folder)
    if found.get("format") != CACHE_FORMAT:
        raise CheckpointError(f"{cache_file}: latent cache format {found.get('format')!r}, expected {CACHE_FORMAT}; "
                              f"delete it to re-encode")
    if found.get("autoencoder") != wanted:
        raise CheckpointError(f"{cache_file}: these latents were encoded by another autoencoder "
                              f"({_mismatch(found, {'autoencoder': wanted})}); delete the file or "
                              f"re-encode with cached_latents (a fingerprint with ae_folder differs from one without)")
