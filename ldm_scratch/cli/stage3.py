"""Stage-2 commands in the latent (stage 1 the autoencoder, stage 2 the denoiser): latent diffusion (Rombach et al. 2022, Sec. 3-4) from the command line.

  train-diffusion --space latent   a U-Net or DiT denoiser on a frozen autoencoder's cached latents,
                                   conditioned on a class, a caption or nothing -> OUT/pipeline/, OUT/eval.json;
                                   --objective ddpm (default) or flow (rectified flow, flow.py)
  sample --model PIPELINE          a PNG grid from a saved pipeline: a row per prompt or class label
The `train-diffusion` and `sample` parsers live in stage2.py (one command, two spaces); this file holds
their latent halves, and demo.py chains stage 1 and them into the end-to-end demo.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ldm_scratch.cli.flags import NOT_FLAGS, add_config_flags, apply_flags, checked
# The evaluation helpers live in evaluation.py (re-exported here for older callers).
from ldm_scratch.evaluation import (adherence_at, adherence_stats, evaluate_pipeline, heldout_captions,  # noqa: F401
                                    reconstruction)
from ldm_scratch.config import (DIT_PRESETS, UNET_PRESETS, DiffusionConfig, DiTConfig, TextEncoderConfig,
                                UNetConfig, get_preset)
from ldm_scratch.flow import T_SAMPLINGS, FlowConfig, RectifiedFlow
from ldm_scratch.objectives import OBJECTIVES, DDPMObjective, Objective

LATENT_DATA = ("mnist5k", "colored")
CONDITIONINGS = ("class", "text", "none")
DENOISER_KINDS = ("unet", "dit")
DEFAULT_PRESETS = {"unet": "tiny-latent", "dit": "dit-tiny"}   # what --preset means when not given
# The rows of a text model's training grids: each attribute (digit, colour, background) varies across them.
GRID_PROMPTS = ("a red 7 on grass", "a blue 1 on plain", "a green 3 on brick", "a yellow 0 on gravel")
# Fields only one denoiser has; the shared ones (num_heads, num_classes, context_dim) mean the same in both
# (DiTConfig's docstring), so one flag serves whichever --denoiser is built.
UNET_ONLY = {f.name for f in dataclasses.fields(UNetConfig)} - {f.name for f in dataclasses.fields(DiTConfig)} - NOT_FLAGS
DIT_ONLY = {f.name for f in dataclasses.fields(DiTConfig)} - {f.name for f in dataclasses.fields(UNetConfig)} - NOT_FLAGS


# ----------------------------------------------------------------------------- flags
def add_latent_arguments(p: argparse.ArgumentParser) -> None:
    """train-diffusion's latent-space flags (the parser itself is stage2.add_train_diffusion)."""
    p.add_argument("--autoencoder", default=None, help="--space latent: a trained AutoencoderKL folder (OUT/model)")
    p.add_argument("--conditioning", choices=CONDITIONINGS, default=None,
                   help="--space latent: class labels, captions (--data colored) or none (default class)")
    p.add_argument("--denoiser", choices=DENOISER_KINDS, default="unet", help="--space latent: U-Net or DiT")
    # DiTConfig's own fields, generated like every config's: a dataclass of just those fields, so argparse
    # never sees --num-heads twice (add_config_flags makes one flag per field of the class it is given).
    only = dataclasses.make_dataclass("DiTConfig", [(f.name, f.type, dataclasses.field(default=f.default))
                                                    for f in dataclasses.fields(DiTConfig) if f.name in DIT_ONLY])
    add_config_flags(p, only)
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="--space latent: ddpm (eps or v on a noise schedule; default) or flow (rectified flow, "
                        "v = eps - z0; sample it with --sampler euler or heun)")
    # FlowConfig's fields, one flag each (flags.add_config_flags knows no t_sampling choices, hence by hand)
    flow = p.add_argument_group("FlowConfig fields (--objective flow)")
    flow.add_argument("--t-sampling", dest="t_sampling", choices=T_SAMPLINGS, default=None,
                      help=f"how t is drawn in training (default {FlowConfig.t_sampling})")
    flow.add_argument("--logit-mean", dest="logit_mean", type=checked(float, "logit_mean"), default=None,
                      help=f"logit-normal t: the mean m (default {FlowConfig.logit_mean})")
    flow.add_argument("--logit-std", dest="logit_std", type=checked(float, "logit_std"), default=None,
                      help=f"logit-normal t: the spread s (default {FlowConfig.logit_std})")
    flow.add_argument("--shift", dest="shift", type=checked(float, "shift"), default=None,
                      help=f"the sampling timestep shift saved with the model, 1 = none (default {FlowConfig.shift})")


def given_flags(args: argparse.Namespace, cls: type) -> list[str]:
    """The flags of cls's fields that were given on the command line, as --flag-names."""
    return sorted("--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)
                  if getattr(args, f.name, None) is not None)


def latent_objective(args: argparse.Namespace) -> Objective:
    """--objective and its config's flags -> DDPMObjective or RectifiedFlow; a flag of the other objective is an
    error (--schedule means nothing to a flow, --t-sampling nothing to DDPM)."""
    name = args.objective or "ddpm"
    foreign = given_flags(args, DiffusionConfig if name == "flow" else FlowConfig)
    if foreign:
        other = "ddpm" if name == "flow" else "flow"
        raise ValueError(f"{', '.join(foreign)}: for --objective {other} (this run's objective is {name})")
    if name == "flow":
        return RectifiedFlow(apply_flags(FlowConfig(), args))
    return DDPMObjective(apply_flags(DiffusionConfig(), args))


def check_resume_objective(ckpt: Path, objective: Objective) -> None:
    """--resume must train the objective the checkpoint was trained with: the weights learnt its target (eps, v
    or eps - z0 on its own t), and a resumed run is meant to equal one never stopped. A difference is one line
    naming both; a missing or unreadable checkpoint is left to the Trainer's own error."""
    from ldm_scratch.checkpoint import safe_torch_load
    from ldm_scratch.objectives import objective_from_dict
    if not ckpt.is_file():
        return
    config = safe_torch_load(ckpt).get("task_config", {})
    saved = config.get("objective", config.get("diffusion")) if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        return
    saved, asked = objective_from_dict(saved, str(ckpt)).to_dict(), objective.to_dict()  # old dicts read as DDPM
    if saved != asked:
        if saved["objective"] != asked["objective"]:
            what = f"--objective {saved['objective']}, not {asked['objective']}"
        else:
            what = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (not {asked[k]})" for k in saved if saved[k] != asked.get(k))
        raise ValueError(f"{ckpt}: this run was trained with {what}; resume it with the flags it was started with, "
                         "or train afresh in another --out")


def check_denoiser_flags(args: argparse.Namespace, kind: str) -> None:
    """A flag of the other denoiser is an error, not silently ignored: --hidden-size means nothing to a U-Net.
    Pixel space (the one caller with args.space "pixel") trains DDPM alone so far: the objective flags too."""
    if getattr(args, "space", None) == "pixel":
        flow = (["--objective flow"] if getattr(args, "objective", None) == "flow" else []) + \
            given_flags(args, FlowConfig)
        if flow:
            raise ValueError(f"{', '.join(flow)}: for --space latent (pixel space trains DDPM only, for now)")
    foreign = UNET_ONLY if kind == "dit" else DIT_ONLY
    given = sorted("--" + name.replace("_", "-") for name in foreign if getattr(args, name, None) is not None)
    if given:
        other = "unet" if kind == "dit" else "dit"
        raise ValueError(f"{', '.join(given)} {'is a flag' if len(given) == 1 else 'are flags'} of the "
                         f"{other!r} denoiser; add --denoiser {other} or drop {'it' if len(given) == 1 else 'them'}")


# ----------------------------------------------------------------------------- data and evaluation helpers
def latent_training_set(name: str) -> tuple[Tensor, Tensor, list[str] | None]:
    """The train split of --data as (images (N, C, 32, 32), labels (N,), captions or None)."""
    from ldm_scratch import data
    if name == "mnist5k":
        d = data.MNIST5k("train", pad_to=data.ColoredDigits.SIZE)
        return d.images, d.labels, None
    if name == "colored":
        d = data.ColoredDigits("train")
        return d.images, d.labels, d.captions
    raise ValueError(f"unknown latent data {name!r}; valid: {', '.join(LATENT_DATA)}")


# ----------------------------------------------------------------------------- train-diffusion --space latent
def denoiser_config(args: argparse.Namespace, kind: str, conditioning: str, latent: tuple[int, int],
                    num_classes: int) -> UNetConfig | DiTConfig:
    """The preset with the flags applied; the latent decides channels and size, --conditioning the rest."""
    name = args.preset or DEFAULT_PRESETS[kind]
    table = UNET_PRESETS if kind == "unet" else DIT_PRESETS
    if name not in table:
        raise ValueError(f"--preset {name} is not a {kind!r} preset; valid: {', '.join(sorted(table))}")
    if args.num_classes is not None:
        raise ValueError("--num-classes is set by --conditioning in latent space (class: the data's classes)")
    cfg = apply_flags(get_preset(table, name, kind), args)
    c, s = latent
    text_dim = cfg.context_dim or TextEncoderConfig().dim  # the text encoder's width D is the context width
    cond = dict(num_classes=num_classes if conditioning == "class" else 0,
                context_dim=text_dim if conditioning == "text" else 0)
    if kind == "unet":
        return dataclasses.replace(cfg, in_channels=c, out_channels=c, sample_size=s, **cond)
    # the objective trains one target (eps or v) alone: the paper presets' learned variance would be an unused half
    return dataclasses.replace(cfg, in_channels=c, sample_size=s, learn_sigma=False, **cond)


def prepare_latent(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Everything train_latent trains, built from the flags: (task, train_cfg, data). The latents of --data
    are encoded once and cached in OUT/latents.pt. scripts/sweep_defaults.py builds its runs here too."""
    from ldm_scratch.autoencoder import AutoencoderKL
    from ldm_scratch.stage2 import diffusion_train_config
    from ldm_scratch.stage3 import LatentDiffusionTask, latent_dataset
    from ldm_scratch.text import Tokenizer
    if not args.autoencoder:
        raise ValueError("--space latent needs --autoencoder DIR (a folder written by train-autoencoder: "
                         "OUT/model)")
    if args.data not in LATENT_DATA:
        raise ValueError(f"--space latent trains on {', '.join(LATENT_DATA)}; got --data {args.data}")
    kind, conditioning = args.denoiser, args.conditioning or "class"
    check_denoiser_flags(args, kind)
    objective = latent_objective(args)  # before the encoding: a wrong flag fails in a second, not a minute
    if getattr(args, "resume", False):
        check_resume_objective(Path(args.out) / "checkpoint.pt", objective)
    train_cfg = apply_flags(diffusion_train_config(kind), args)  # the denoiser's measured defaults
    ae = AutoencoderKL.from_pretrained(args.autoencoder)
    images, labels, captions = latent_training_set(args.data)
    if images.shape[1] != ae.cfg.in_channels:
        raise ValueError(f"--data {args.data} has {images.shape[1]}-channel images but the autoencoder "
                         f"{args.autoencoder} takes {ae.cfg.in_channels}")
    if conditioning == "text" and captions is None:
        raise ValueError(f"--conditioning text needs captions: --data colored (got --data {args.data})")
    latent = (ae.cfg.z_channels, images.shape[-1] // ae.cfg.f)
    cfg = denoiser_config(args, kind, conditioning, latent, int(labels.max()) + 1)
    tokenizer = Tokenizer.from_captions(captions) if conditioning == "text" else None
    text_cfg = TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length,
                                 dim=cfg.context_dim) if tokenizer else None
    out = Path(args.out)
    # Encoded once, cached under OUT: the id names what was encoded, the file records by which autoencoder.
    # Encoding runs at precision "auto" whatever --precision says: bf16 convolutions encode 3.5x faster than
    # fp32 on this CPU (4,500 small-f4 images: 10 s vs 35 s on one busy core).
    data = latent_dataset(ae, images, labels=labels if conditioning == "class" else None,
                          captions=captions if conditioning == "text" else None, tokenizer=tokenizer,
                          cache_file=out / "latents.pt", ae_folder=args.autoencoder,
                          dataset_id=f"{args.data}-train-{len(images)}")
    torch.manual_seed(train_cfg.seed)  # the initial weights, too, follow from --seed
    task = LatentDiffusionTask(ae, kind, cfg, objective, conditioning,
                               tokenizer=tokenizer, text_cfg=text_cfg, p_uncond=args.p_uncond, seed=train_cfg.seed,
                               guidance_scale=args.guidance_scale, precision=train_cfg.precision,
                               sample_steps=args.sample_steps, grid_prompts=list(GRID_PROMPTS),
                               ae_folder=args.autoencoder)
    return task, train_cfg, data


def train_latent(args: argparse.Namespace) -> dict:
    """Encode --data once (OUT/latents.pt), train the denoiser on the latents, save OUT/pipeline/ and, with
    --eval-per-class K > 0, score it (OUT/eval.json). Returns a summary."""
    from ldm_scratch.train import Trainer
    task, train_cfg, data = prepare_latent(args)
    out, kind, conditioning = Path(args.out), args.denoiser, task.conditioning
    trainer = Trainer(task, train_cfg, data, out)
    start = time.time()
    trainer.fit(resume=args.resume)
    summary: dict[str, Any] = {"steps": trainer.step, "minutes": (time.time() - start) / 60,
                               "precision": trainer.precision, "params": task.denoiser.num_params(),
                               "denoiser": kind, "preset": args.preset or DEFAULT_PRESETS[kind],
                               "conditioning": conditioning, "objective": task.objective.name, "data": args.data,
                               "stopped": trainer.stopped}
    if trainer.stopped == "interrupted" or not trainer.is_main:
        return summary
    folder = task.finish(out, trainer.ema, step=trainer.step)
    summary["pipeline"] = str(folder)
    print(f"saved {folder} ({'EMA' if trainer.ema else 'raw'} weights) after {trainer.step} steps "
          f"({summary['minutes']:.1f} min); grid: {out / 'samples' / 'final.png'}")
    if args.eval_per_class > 0:
        from ldm_scratch.pipeline import LatentDiffusionPipeline
        pipe = LatentDiffusionPipeline.from_pretrained(folder, trainer.device)  # exactly what was saved
        res = evaluate_pipeline(pipe, args.eval_per_class, args.sample_steps, args.guidance_scale,
                                seed=train_cfg.seed, precision=trainer.precision)
        print("evaluation:", json.dumps(res))
        summary["eval"] = res
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- sample (a pipeline folder)
def is_pipeline(folder: str | Path) -> bool:
    return (Path(folder) / "model_index.json").is_file()


def check_steps(args: argparse.Namespace, T: int) -> None:
    """The flags that need a loaded DDPM model: no --sampler means "ddim" (set here), and --steps against its
    training T (DDIM picks --steps of those T; DDPM runs all T). The other flags were checked before loading
    (stage2.check_sample_flags); a flow pipeline's are checked by the pipeline itself (check_sample_args)."""
    args.sampler = args.sampler or DDPMObjective.sampler_names[0]
    if args.sampler == "ddim" and args.steps > T:
        raise ValueError(f"--steps must be <= {T}, the T this model was trained with; got {args.steps}")


def sample_pipeline(args: argparse.Namespace) -> Path:
    """A grid from a pipeline folder: a row of --num-images per prompt or class label (or per class, or one
    unconditional row). Every mismatch (a prompt to a class model, an unknown word) is the pipeline's ValueError."""
    from ldm_scratch.checkpoint import read_json
    from ldm_scratch.device import default_device
    from ldm_scratch.pipeline import LatentDiffusionPipeline
    from ldm_scratch.train import save_image_grid
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, default_device())
    if args.sampler is not None and args.sampler not in pipe.objective.sampler_names:
        raise ValueError(f"--sampler {args.sampler}: this pipeline's objective is {pipe.objective.name!r}; its "
                         f"samplers: {', '.join(pipe.objective.sampler_names)}")
    if isinstance(pipe.objective, DDPMObjective):
        check_steps(args, pipe.objective.T)
    shift = getattr(args, "shift", None)
    if shift is not None and pipe.objective.name != "flow":
        raise ValueError(f"--shift is for flow pipelines; this pipeline's objective is {pipe.objective.name!r}")
    sampler = args.sampler or pipe.objective.sampler_names[0]
    extra = read_json(Path(args.model) / "model_index.json").get("extra", {})
    k = 8 if args.num_images is None else args.num_images  # `or 8` would turn --num-images 0 into 8
    kw: dict[str, Any] = {}
    if args.prompt is not None:
        kw, what = {"prompt": list(args.prompt)}, "rows: " + " | ".join(args.prompt)
    elif args.class_labels is not None:
        kw, what = {"class_labels": list(args.class_labels)}, f"rows: classes {args.class_labels}"
    elif pipe.conditioning == "class":
        kw, what = {"class_labels": list(range(pipe.denoiser.cfg.num_classes))}, "one row per class"
    else:
        what = "unconditional"
    rows = len(next(iter(kw.values()))) if kw else 1
    w = extra.get("guidance_scale", 3.0) if args.guidance_scale is None else args.guidance_scale
    x = pipe(**kw, num_images=k, num_inference_steps=args.steps, guidance_scale=w, sampler=sampler,
             eta=args.eta, generator=torch.Generator(pipe.device).manual_seed(args.seed), output_type="tensor",
             precision=args.precision, progress=True, shift=shift).images
    steps = pipe.objective.T if sampler == "ddpm" else args.steps
    shown = f", shift {shift:g}" if shift is not None else ""
    save_image_grid(list(x.view(rows, k, *x.shape[1:])), args.out,  # (R k, C, H, W) -> R x (k, C, H, W)
                    title=f"{what}; {sampler} {steps} steps{shown}, guidance {w:g}, seed {args.seed}")
    print(f"wrote {args.out}")
    return Path(args.out)
