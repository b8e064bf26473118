"""Pretrained stage-1 autoencoders shipped with the package, so the latent denoisers (stage 2 in the latent) need not retrain stage 1.

Where it sits: the first room of the pipeline, already built. 05_latent_diffusion, 06_dit and
07_text_to_image load one of these frozen KL autoencoders (Rombach et al. 2022, Sec. 3) and spend
their CPU minutes on the denoiser instead. The two digit codecs are the `small-f4` preset trained by the
package's own `train-autoencoder` command (scripts/train_stage1_weights.py rebuilds them); the photo codec
`photo-f8c4` is a residual autoencoder (SD's 48x: 512 x 512 x 3 -> 64 x 64 x 4) trained 30 minutes by
scripts/ae_recipe.py. ldm_scratch/weights/README.md records how (command, steps, wall time, held-out PSNR/SSIM).

A model is a folder (checkpoint.py): config.json, with the measured scale_factor, and model.pt. The
weights may be stored in float16 to halve the file (the README says whether, and what it costs in
PSNR); loading always gives float32 modules.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REBUILD = "python scripts/train_stage1_weights.py"

# name -> (folder under ldm_scratch/weights/, one-line description)
PRETRAINED_AUTOENCODERS: dict[str, tuple[str, str]] = {
    "mnist-f4": ("ae_mnist_f4", "MNIST-5k digits 1 x 32 x 32 -> latents 4 x 8 x 8 (mnist-f4-res: residual, "
                              "scale-equivariant, f = 4)"),
    "colored-f4": ("ae_colored_f4", "captioned coloured digits 3 x 32 x 32 -> latents 4 x 8 x 8 (colored-f4-res: "
                                    "residual, f = 4)"),
    "photo-f8c4": ("ae_photo_f8c4", "RGB photos 3 x H x W -> latents 4 x H/8 x W/8 (photo-f8c4, residual, f = 8; "
                                    "SD's 48x compression)"),
}
# How each is rebuilt (the digit codecs by one script, the photo codec by the recipe script's 30-minute run).
REBUILD_COMMANDS = {"photo-f8c4": "OMP_NUM_THREADS=1 python scripts/ae_recipe.py --minutes 30 --shortcuts residual "
                                  "--lr 3e-5 --out runs/ae_photo (then copy runs/ae_photo/residual/model)"}


def _check_name(name: str) -> str:
    if name not in PRETRAINED_AUTOENCODERS:
        valid = ", ".join(f"{n!r} ({desc})" for n, (_, desc) in PRETRAINED_AUTOENCODERS.items())
        raise ValueError(f"unknown pretrained autoencoder {name!r}; valid: {valid}")
    return name


def autoencoder_folder(name: str) -> Path:
    """The model folder of a pretrained autoencoder (it may not exist yet: see load_autoencoder)."""
    return WEIGHTS_DIR / PRETRAINED_AUTOENCODERS[_check_name(name)][0]


def load_autoencoder(name: str, map_location: str | torch.device = "cpu") -> AutoencoderKL:
    """A frozen pretrained AutoencoderKL: "mnist-f4", "colored-f4" or "photo-f8c4", float32, eval mode.

    Raises ValueError for an unknown name (listing the valid ones) and CheckpointError when the
    folder is missing or broken (saying how to rebuild it).
    """
    folder = autoencoder_folder(name)
    rebuild = REBUILD_COMMANDS.get(name, REBUILD)
    if not (folder / "config.json").is_file() or not (folder / "model.pt").is_file():
        raise CheckpointError(f"{folder}: the pretrained autoencoder {name!r} is missing (config.json + "
                              f"model.pt); rebuild it with `{rebuild}` (25-30 minutes on 2 CPU cores)")
    try:
        model = AutoencoderKL.from_pretrained(folder, map_location=map_location)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\nrebuild it with `{rebuild}`") from None
    # float16 on disk is only storage: compute in float32 like every other model of the package.
    model = model.float()
    # Frozen (STYLE 19): stage 2 trains inside this latent space, so the encoder and decoder must not
    # move, and no gradients are needed through them.
    return model.eval().requires_grad_(False)
