"""Stage 2 (the denoiser) in the latent: latent diffusion as a training task (Rombach et al. 2022, Sec. 3.3
and 4). The file name is historical: stage 1 is the autoencoder, stage 2 the denoiser, in pixels (stage2.py)
or, here, in the autoencoder's latent.

Where it sits: the autoencoder of stage 1 is finished and frozen; its scaled latents z0 = mode(q(z|x)) *
scale_factor are encoded once (latents.py) and a denoiser, the U-Net or the DiT, learns the objective's loss
on them: DDPM's L_simple (Sec. 3.3, Eq. 2 with the encoder's output in place of x: L_LDM =
E ||eps - eps_theta(z_t, t, tau(y))||^2), or rectified flow's E ||(eps - z0) - v_theta(z_t, t, tau(y))||^2
(flow.py, SD3's recipe). objectives.py holds both; the task never branches on which.
train.py's Trainer runs this task; `finish` saves `out_dir/pipeline/` (pipeline.py) with the EMA weights.

Conditioning, one of three:
  "class": batches (z0, labels); the denoiser embeds the label, and the null class is the CFG null.
  "text":  batches (z0, ids, mask), the captions tokenized up front; the text encoder tau(y) is trained
           jointly with the denoiser (as LDM trains its BERT-like tau(y) jointly, Sec. 3.3), in the same
           AdamW and under the same EMA; the empty prompt "" ([bos] alone) is the CFG null.
  "none":  batches z0 alone.
Condition dropout (Ho & Salimans 2022, Algorithm 1): with probability p_uncond a label becomes the null
class, a caption the empty prompt, so one network learns both halves of classifier-free guidance.
The noise of a step (t, eps, the dropout coins) is a function of (seed, step), drawn for the global batch
and sliced per DDP rank, so resume is exact and 2 processes compute what 1 does (`draw_objective_noise`;
for DDPM the very draws of stage2.draw_step_noise). What pixel and latent training share (the optimizer, the
draw, dropout, the loss, DDP, saving the EMA weights) is stage2.DenoiserTask; this file adds the latent part.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.config import DiffusionConfig, TextEncoderConfig, config_to_dict
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.objectives import DDPMObjective, Objective
from ldm_scratch.latents import autoencoder_fingerprint, cached_latents, encode_images
from ldm_scratch.pipeline import (CONDITIONINGS, DENOISERS, LatentDiffusionPipeline,  # noqa: F401 (re-exported)
                                  build_denoiser)
from ldm_scratch.stage2 import (GRID_COLS, GRID_SEED, NOISE_SEED_STRIDE, SAMPLE_STEPS,  # noqa: F401
                                DenoiserTask, draw_objective_noise)
from ldm_scratch.text import TextEncoder, Tokenizer
from ldm_scratch.train import save_image_grid


def latent_dataset(ae: AutoencoderKL, images: Tensor, labels: Tensor | None = None,
                   captions: list[str] | None = None, tokenizer: Tokenizer | None = None,
                   cache_file: str | os.PathLike | None = None, ae_folder: str | os.PathLike | None = None,
                   dataset_id: str | None = None, **encode_kw) -> TensorDataset:
    """The training set of a latent denoiser: (z0, labels), (z0, ids, mask) with the captions tokenized up front, or (z0,).

    z0 (N, c, h, w) are the scaled latents, read from `cache_file` when it matches this autoencoder and
    `dataset_id` (a name for the images, e.g. "mnist5k-train"), else encoded (and cached if a file is given).
    """
    if labels is not None and captions is not None:
        raise ValueError("give labels (class-conditional) or captions (text), not both")
    if captions is not None and tokenizer is None:
        raise ValueError("captions need a tokenizer (Tokenizer.from_captions(captions)) to become token ids")
    if cache_file is not None and not dataset_id:
        raise ValueError("a cache_file needs a dataset_id naming the images, so another dataset's cache is not reused")
    n = len(images)
    for name, cond in (("labels", labels), ("captions", captions)):
        if cond is not None and len(cond) != n:
            raise ValueError(f"{len(cond)} {name} for {n} images")
    z0 = cached_latents(ae, ae_folder, images, cache_file, dataset_id, **encode_kw) if cache_file is not None \
        else encode_images(ae, images, **encode_kw)  # (N, C, H, W) -> (N, c, h, w)
    if captions is not None:
        ids, mask = tokenizer.encode(list(captions))  # N captions -> (N, L), (N, L)
        return TensorDataset(z0, ids, mask)
    if labels is not None:
        return TensorDataset(z0, torch.as_tensor(labels, dtype=torch.long))
    return TensorDataset(z0)


class LatentDiffusionTask(DenoiserTask):
    """The train.py task protocol for latent diffusion: a denoiser (+ text encoder) on cached latents.

    `objective`: DDPMObjective or RectifiedFlow (objectives.py); a DiffusionConfig means DDPM with it."""

    def __init__(self, ae: AutoencoderKL, denoiser: str, denoiser_cfg: Any, objective: Objective | DiffusionConfig,
                 conditioning: str, tokenizer: Tokenizer | None = None, text_cfg: TextEncoderConfig | None = None,
                 p_uncond: float = 0.1, seed: int = 0, guidance_scale: float = 3.0, precision: str = "auto",
                 sample_steps: int = SAMPLE_STEPS, grid_prompts: list[str] | None = None,
                 ae_folder: str | os.PathLike | None = None):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; valid: {', '.join(CONDITIONINGS)}")
        objective = DDPMObjective(objective) if isinstance(objective, DiffusionConfig) else objective
        super().__init__(objective, p_uncond, seed, guidance_scale, precision, sample_steps)
        if conditioning == "text" and (tokenizer is None or text_cfg is None or not grid_prompts):
            raise ValueError("conditioning 'text' needs tokenizer=, text_cfg= and grid_prompts= "
                             "(the prompts of the sample grid's rows)")
        # Stage 1 is finished: the latents were encoded by exactly these weights, so they must not move
        # (eval: no dropout; no grad: no gradient memory for a model nobody trains). It is not in modules():
        # the checkpoint holds what training changes; the pipeline folder holds the autoencoder.
        self.ae = ae.eval().requires_grad_(False)
        self.kind, self.conditioning, self.tokenizer = denoiser, conditioning, tokenizer
        self.grid_prompts = list(grid_prompts or [])
        self.denoiser = build_denoiser(denoiser, denoiser_cfg)
        self.text_encoder = TextEncoder(text_cfg) if conditioning == "text" else None
        # The pipeline holds the same modules (no copies): sample() and finish() go through it, and its
        # constructor checks that they fit (latent channels, context_dim = the text encoder's width).
        self.pipeline = LatentDiffusionPipeline(self.ae, self.denoiser, self.objective, tokenizer, self.text_encoder)
        if self.pipeline.conditioning != conditioning:
            raise ValueError(f"conditioning={conditioning!r}, but the denoiser config makes a "
                             f"{self.pipeline.conditioning!r} model (num_classes={denoiser_cfg.num_classes}, "
                             f"context_dim={denoiser_cfg.context_dim})")
        if conditioning == "text":
            tokenizer.encode(self.grid_prompts)  # an unknown word warns now (it becomes [unk]), not at the first grid
            self.null_ids, self.null_mask = tokenizer.encode("")  # (1, L): [bos] alone, the CFG null
        self.ae_sha256 = autoencoder_fingerprint(ae, ae_folder)  # for the record: which latent space
        # The EMA covers everything trained: the denoiser and, for text, the text encoder.
        trained = {"denoiser": self.denoiser}
        if self.text_encoder is not None:
            trained["text_encoder"] = self.text_encoder
        self.ema_group = nn.ModuleDict(trained)
        self.denoiser_forward: Callable = self.denoiser  # DDP wrappers under torchrun (distribute)
        self.text_forward: Callable | None = self.text_encoder

    # ------------------------------------------------------------------ protocol
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.ema_group.items())

    def ema_module(self) -> nn.Module:
        return self.ema_group

    @property
    def diffusion(self) -> GaussianDiffusion:
        """A DDPM task's GaussianDiffusion (task.diffusion before objectives); the pipeline says why a flow has none."""
        return self.pipeline.diffusion

    def split_batch(self, batch: Any) -> tuple[Tensor, Any]:
        """(z0, labels), (z0, ids, mask) or z0 -> (z0, labels / (ids, mask) / None), checked against the task."""
        z0, *rest = batch if isinstance(batch, (list, tuple)) else (batch,)
        self._check_latents(z0, rest)
        return z0, tuple(rest) if len(rest) > 1 else rest[0] if rest else None

    def drop_condition(self, cond: Tensor | tuple | None, drop: Tensor) -> Any:
        """cond: labels (B,), (ids, mask), or None; drop (B,): a label becomes the null class, a caption "" """
        if self.conditioning == "class":
            return torch.where(drop, torch.full_like(cond, self.denoiser.null_class), cond)
        if self.conditioning == "text":
            ids, mask = cond
            null_ids, null_mask = self.null_ids.to(ids.device), self.null_mask.to(ids.device)  # (1, L)
            return torch.where(drop[:, None], null_ids, ids), torch.where(drop[:, None], null_mask, mask)
        return None

    def model_condition(self, cond: Any) -> Any:
        # tau(y) (Rombach et al. 2022, Sec. 3.3): (B, L) ids -> (B, L, D) context, with its mask
        return (self.text_forward(*cond), cond[1]) if self.conditioning == "text" else cond

    def wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.denoiser_forward = wrap(self.denoiser)
        if self.text_encoder is not None:
            self.text_forward = wrap(self.text_encoder)

    def _check_latents(self, z0: Tensor, rest: list) -> None:
        cfg = self.denoiser.cfg
        want = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if z0.dim() != 4 or tuple(z0.shape[1:]) != want:
            raise ValueError(f"the denoiser is built for latents (B, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{tuple(z0.shape)}: set sample_size / in_channels from the autoencoder's latent")
        expected = {"class": 1, "text": 2, "none": 0}[self.conditioning]
        if len(rest) != expected:
            raise ValueError(f"a {self.conditioning!r} task takes batches of z0 plus {expected} tensor(s) "
                             f"(see latent_dataset), got {len(rest)}")

    def config_dict(self) -> dict:
        """Saved in the training checkpoint, for the record."""
        return {"space": "latent", "denoiser": self.kind, "conditioning": self.conditioning,
                "denoiser_config": config_to_dict(self.denoiser.cfg),
                "objective": self.objective.to_dict(),
                "text_encoder": config_to_dict(self.text_encoder.cfg) if self.text_encoder is not None else None,
                "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
                "autoencoder": config_to_dict(self.ae.cfg), "autoencoder_sha256": self.ae_sha256,
                "p_uncond": self.p_uncond, "guidance_scale": self.guidance_scale}

    @torch.no_grad()
    def sample(self, step: int, out_dir: str | os.PathLike, name: str | None = None) -> Path:
        """A decoded grid, GRID_COLS samples per row (the objective's default sampler): a row per class, per grid
        prompt, or one row."""
        device = self.pipeline.device
        self.ae.to(device)  # not in modules(), so the Trainer did not move it
        kw = dict(num_images=GRID_COLS, num_inference_steps=self.sample_steps, guidance_scale=self.guidance_scale,
                  generator=torch.Generator(device).manual_seed(GRID_SEED), output_type="tensor",
                  precision=self.precision)
        if self.conditioning == "class":
            rows, what = self.denoiser.cfg.num_classes, "one row per class"
            x = self.pipeline(class_labels=list(range(rows)), **kw).images
        elif self.conditioning == "text":
            rows, what = len(self.grid_prompts), "rows: " + " | ".join(self.grid_prompts)
            x = self.pipeline(prompt=self.grid_prompts, **kw).images
        else:
            rows, what = 1, "unconditional"
            x = self.pipeline(**kw).images
        path = Path(out_dir) / "samples" / (name or f"samples_{step:06d}.png")
        w = self.guidance_scale if self.conditioning != "none" else 1.0
        save_image_grid(list(x.view(rows, GRID_COLS, *x.shape[1:])),  # (R*K, C, H, W) -> R x (K, C, H, W)
                        path, title=f"step {step}: {what}; {self.objective.sampler_names[0]} {self.sample_steps} "
                                    f"steps, guidance {w:g}")
        return path

    # ------------------------------------------------------------------ after training
    folder_name = "pipeline"

    def save(self, folder: Path, ema: bool, step: int) -> None:
        self.pipeline.save_pretrained(folder, extra={"ema": ema, "steps": step, "p_uncond": self.p_uncond,
                                                     "guidance_scale": self.guidance_scale,
                                                     "autoencoder_sha256": self.ae_sha256})
