"""`edit`: change a real image through a saved pipeline's latent (editing.py, LatentDiffusionPipeline's edit verbs).

  --mode img2img   SDEdit (Meng et al. 2022): noise the image's latent to --strength, denoise with the new
                   --prompt / --class-labels, decode -> OUT (the edited image, at the pipeline's size)
  --mode invert    deterministic inversion (DDIM eta 0, or the flow's ODE upwards) to noise and back ->
                   OUT (the regenerated image); prints the round trip's PSNR against the autoencoder's own
                   reconstruction, the best any edit in the latent can do
  --mode inpaint   regenerate where --mask (a PNG the image's size, white = regenerate) is set, keep the rest
Every flag is checked before the pipeline is loaded; a bad value is one line naming the flag.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ldm_scratch.cli import Command
from ldm_scratch.cli.flags import CHOICES
from ldm_scratch.cli.stage2 import MAX_SEED, model_folder_kind
from ldm_scratch.editing import EDIT_SAMPLERS

MODES = ("img2img", "invert", "inpaint")
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0}   # inpaint: the masked region starts from pure noise


def add_edit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a latent pipeline folder (OUT/pipeline, model_index.json)")
    p.add_argument("--image", required=True, help="the image to edit (PNG/JPEG, the pipeline's image size)")
    p.add_argument("--mode", choices=MODES, default="img2img")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img / inpaint: how far to noise, 0 (the reconstruction) .. 1 (a fresh sample); "
                        "default 0.6 for img2img, 1.0 for inpaint")
    p.add_argument("--mask", default=None, help="inpaint: a PNG of the image's size, white = regenerate")
    p.add_argument("--no-paste", action="store_true",
                   help="inpaint: show the decoder's rendering of the kept region too (default: the image's own "
                        "pixels are pasted back where the mask is black)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompt", default=None, help='text pipelines: the new caption, e.g. "a blue 1 on plain"')
    which.add_argument("--class-labels", type=int, default=None, help="class pipelines: the new label, e.g. 7")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (img2img runs about strength x steps)")
    samplers = sorted({s for names in EDIT_SAMPLERS.values() for s in names})
    p.add_argument("--sampler", choices=samplers, default=None,
                   help="default: the pipeline's first (ddim for DDPM, euler for flow)")
    p.add_argument("--guidance-scale", "--guidance", type=float, default=None,
                   help="1 = none (default: 1 for invert, else the model's saved value or 3)")
    p.add_argument("--eta", type=float, default=0.0, help="img2img / inpaint on DDPM: DDIM's noise, 0 .. 1")
    p.add_argument("--shift", type=float, default=None, help="flow pipelines: the timestep shift (default: saved)")
    p.add_argument("--seed", type=int, default=0, help="the noise of img2img / inpaint")
    p.add_argument("--precision", choices=CHOICES["precision"], default="fp32",
                   help="fp32 by default: inversion is a numerical round trip")
    p.add_argument("--out", default="edited.png", help="the PNG to write")


def check_edit_flags(args: argparse.Namespace) -> None:
    """Every flag checked before anything is loaded; each error names the flag."""
    if model_folder_kind(args.model) != "pipeline":            # names a missing folder or a wrong layout
        raise ValueError(f"--model {args.model} is a pixel model; edit works in a latent pipeline's latent "
                         "(OUT/pipeline, model_index.json)")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if args.mode == "invert":
        given = [f for f, v in (("--strength", args.strength), ("--mask", args.mask), ("--eta", args.eta or None),
                                         ("--no-paste", args.no_paste or None))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not used by --mode invert (it runs the whole way to noise and back)")
    else:
        if args.strength is not None and not 0 <= args.strength <= 1:   # NaN fails too
            raise ValueError(f"--strength must be in [0, 1] (0 = the reconstruction, 1 = a fresh sample); "
                             f"got {args.strength}")
        if args.no_paste and args.mode != "inpaint":
            raise ValueError(f"--no-paste is for --mode inpaint (this is --mode {args.mode})")
        if (args.mode == "inpaint") != (args.mask is not None):
            raise ValueError("--mode inpaint needs --mask MASK.png (white = regenerate)" if args.mode == "inpaint"
                             else f"--mask is for --mode inpaint (this is --mode {args.mode})")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    w = args.guidance_scale
    if w is not None and not (math.isfinite(w) and w >= 0):
        raise ValueError(f"--guidance-scale must be a finite number >= 0 (1 = no guidance); got {w}")
    if not 0 <= args.eta <= 1:
        raise ValueError(f"--eta must be in [0, 1] (0 = deterministic DDIM); got {args.eta}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in 0..2^64-1; got {args.seed}")


def open_image(flag: str, path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{flag} {path}: not an image PIL can read ({e})") from None


def edit(args: argparse.Namespace) -> Path:
    """Load the pipeline, run the asked edit on --image, write --out (the pipeline's PIL output)."""
    from ldm_scratch.checkpoint import read_json
    from ldm_scratch.device import default_device
    from ldm_scratch.editing import round_trip
    from ldm_scratch.pipeline import LatentDiffusionPipeline, to_pil
    check_edit_flags(args)
    image = open_image("--image", args.image)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, default_device())
    saved_w = read_json(Path(args.model) / "model_index.json").get("extra", {}).get("guidance_scale", 3.0)
    w = args.guidance_scale if args.guidance_scale is not None else 1.0 if args.mode == "invert" else saved_w
    options = dict(sampler=args.sampler, shift=args.shift, precision=args.precision, prompt=args.prompt,
                   class_labels=args.class_labels)
    if args.mode == "invert":
        back, _, row = round_trip(pipe, image, args.steps, w, **options)
        out = to_pil(back)[0]
        print(f"inversion round trip, {args.steps} steps, guidance {w:g}: PSNR {row['psnr_db']:.2f} dB against "
              f"the autoencoder's reconstruction (latent RMS error {row['latent_rms']:.4f})")
    else:
        strength = DEFAULT_STRENGTH[args.mode] if args.strength is None else args.strength
        kw = dict(strength=strength, eta=args.eta, generator=torch.Generator(pipe.device).manual_seed(args.seed),
                  num_inference_steps=args.steps, guidance_scale=w, progress=True, **options)
        out = (pipe.inpaint(image, open_image("--mask", args.mask), paste=not args.no_paste, **kw)
               if args.mode == "inpaint"
               else pipe.img2img(image, **kw)).images[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(f"wrote {args.out}")
    return Path(args.out)


COMMANDS: dict[str, Command] = {
    "edit": (add_edit, edit, "edit a real image in a pipeline's latent: img2img (SDEdit), inversion, inpainting"),
}
