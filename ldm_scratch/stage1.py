"""Stage 1 as a training task: the KL autoencoder against its perceptual + adversarial loss
(Rombach et al. 2022, Sec. 3 and App. G; Esser et al. 2021, Sec. 3.1 for the PatchGAN recipe).

Where it sits: train.py's Trainer runs this task; its output, `out_dir/model/`, is the frozen
autoencoder that stage 2 dreams inside. Two optimizers take turns every step:
  "ae"   - encoder, decoder and the loss module's learned log-variance (LDM declares that logvar
           but leaves it out of its optimizer, so it never moves; here it is trained)
  "disc" - the PatchGAN discriminator, on the step's reconstruction, detached; it is neither
           applied nor trained before `disc_start` (its loss returns None, so the Trainer skips it)

No EMA for the autoencoder: LDM keeps none for stage 1, and the discriminator adapts to the raw
decoder, so the raw weights are what gets saved.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_scratch.autoencoder import AutoencoderKL, measure_latent_stats
from ldm_scratch.config import AutoencoderConfig, LossConfig, TrainConfig, config_to_dict
from ldm_scratch.losses import AutoencoderLoss
from ldm_scratch.train import make_adamw, save_image_grid

# The bar shows the terms that say whether stage 1 is healthy: reconstruction, KL, generator loss,
# the adaptive weight and the real-minus-fake logits gap (a gap that runs away = D is winning).
POSTFIX_WORDS = ("rec", "kl", "g_loss", "d_weight", "gap")
# Images the scale factor is measured on: 1024 images x c x (H/f)^2 latents (65k numbers at
# 4 x 8 x 8) pin a std down to about 1 / sqrt(2 * 65k) = 0.3% relative error.
SCALE_IMAGES = 1024


def images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch that may be `x` or `(x, label, ...)`."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class AutoencoderTask:
    """The train.py task protocol for stage 1: modules, optimizers, the two losses, sample grids."""

    def __init__(self, ae_cfg: AutoencoderConfig, loss_cfg: LossConfig, sample_images: torch.Tensor | None = None,
                 init_from: AutoencoderKL | None = None, decoder_only: bool = False):
        """init_from: start from a trained autoencoder's weights (and its scale/shift factors) instead of a fresh
        initialisation. decoder_only: freeze the encoder (and quant_conv), so the latent space, and every latent a
        denoiser was trained on, stays exactly as it is; only the decoder learns. This is how Stable Diffusion's
        improved VAEs (ft-EMA, ft-MSE) were made: the same latents, a better rendering of them."""
        if decoder_only and init_from is None:
            raise ValueError("decoder_only fine-tunes a trained decoder on a frozen encoder: give init_from too "
                             "(a frozen, freshly initialised encoder would be a random latent space)")
        self.ae_cfg, self.loss_cfg = ae_cfg, loss_cfg
        self.ae = AutoencoderKL(ae_cfg)
        self.decoder_only = decoder_only
        if init_from is not None:
            have, want = config_to_dict(init_from.cfg), config_to_dict(ae_cfg)
            diff = {k: (v, want[k]) for k, v in have.items()
                    if k not in ("scale_factor", "shift_factor") and want[k] != v}   # the latent stats may differ
            if diff:
                raise ValueError(f"init_from has a different architecture from the one asked for; (init_from, asked): "
                                 f"{diff}")
            self.ae.load_state_dict({k: v.float() for k, v in init_from.state_dict().items()})
            self.ae.scale_factor, self.ae.shift_factor = init_from.scale_factor, init_from.shift_factor
        if loss_cfg.disc_warmup > 0 and not (loss_cfg.disc_factor > 0 and loss_cfg.disc_start < loss_cfg.disc_warmup):
            raise ValueError(f"disc_warmup={loss_cfg.disc_warmup} trains only the discriminator for its first steps, "
                             f"but the discriminator is off then (disc_start={loss_cfg.disc_start}, disc_factor="
                             f"{loss_cfg.disc_factor}): nothing would train; set disc_start below disc_warmup")
        if decoder_only:
            self.ae.encoder.requires_grad_(False)
            self.ae.quant_conv.requires_grad_(False)
        self.loss_fn = AutoencoderLoss(loss_cfg, ae_cfg.in_channels)
        self.ae_forward: Callable = self.ae  # replaced by a DDP wrapper under torchrun
        self.sample_images = sample_images  # a fixed batch for the reconstruction grids
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.postfix_keys: list[str] = []

    # ------------------------------------------------------------------ protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.ae, "loss": self.loss_fn}

    def optimizers(self, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        opts = {
            # encoder + decoder + logvar; the frozen perceptual net is in neither optimizer
            "ae": make_adamw([p for p in self.loss_fn.generator_parameters(self.ae) if p.requires_grad], cfg),
            "disc": make_adamw(self.loss_fn.discriminator_parameters(), cfg, lr=cfg.disc_lr),
        }
        self.loss_fn.check_optimizers(opts["ae"], opts["disc"])
        return opts

    def loss(self, name: str, batch: Any, step: int) -> tuple[torch.Tensor | None, dict]:
        x = images_of(batch)
        if self.sample_images is None:
            self.sample_images = x[:8].detach().clone()
        if name == "ae":
            if step < self.loss_cfg.disc_warmup:  # the discriminator's warm-up: reconstruct, but train nothing here
                with torch.no_grad():
                    self._cache = (x, self.ae_forward(x)[0])
                return None, {}
            x_rec, posterior = self.ae_forward(x)  # a sample from q(z|x), decoded: (B, C, H, W)
            loss, logs = self.loss_fn.generator_loss(x, x_rec, posterior, step, self.ae.last_layer)
            if self.loss_cfg.equivariance_weight > 0:
                se = self.equivariance_loss(x, posterior)
                loss = loss + self.loss_cfg.equivariance_weight * se
                logs["equivariance"] = se.item() / x[0].numel() * 4   # per pixel of the half-size image
                logs["total"] = loss.item()
            self._cache = (x, x_rec.detach())  # the discriminator sees this recon, with no path back into the AE
            self._set_postfix(logs)
            return loss, logs
        if name == "disc":
            if not self.loss_fn.disc_active(step):
                return None, {}
            x, x_rec = self._cache
            loss, logs = self.loss_fn.discriminator_loss(x, x_rec, step)
            self._set_postfix(logs)
            return loss, logs
        raise ValueError(f"unknown optimizer name {name!r}; expected 'ae' or 'disc'")

    def equivariance_loss(self, x: torch.Tensor, posterior) -> torch.Tensor:
        """Scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders", Sec. 3):
        || D(avgpool2(z)) - avgpool2(x) ||_1, summed over pixels and averaged over the batch like the NLL,
        z a sample of q(z|x).

        Why: an autoencoder trained on reconstruction alone is free to put fine, noise-like detail into its
        latent (its spectrum then carries more high-frequency energy than the image's), and a denoiser, which
        builds a sample coarse to fine, spends its steps on that detail. Asking the decoder to read a 2x
        coarser latent as a 2x coarser image ties the latent's low frequencies to the image's, so coarse
        latent structure means coarse image structure: the latent becomes easier to generate ("diffusable")
        at a small cost in reconstruction. Needs even latent sides."""
        z = posterior.sample()  # (B, c, h, w)
        if z.shape[-1] % 2 or z.shape[-2] % 2:
            raise ValueError(f"equivariance_weight needs even latent sides to average 2 x 2 blocks, got {tuple(z.shape[-2:])}")
        x_small = F.avg_pool2d(x.float(), 2)  # (B, C, H/2, W/2)
        rec_small = self.ae.decode(F.avg_pool2d(z, 2)).float()  # (B, c, h/2, w/2) -> (B, C, H/2, W/2)
        # divided by exp(logvar) like the NLL's L1, so equivariance_weight stays its weight relative to that term
        return (rec_small - x_small).abs().sum() / x.shape[0] / torch.exp(self.loss_fn.logvar.detach())

    def _set_postfix(self, logs: dict) -> None:
        for k in logs:
            if k not in self.postfix_keys and any(w in k for w in POSTFIX_WORDS):
                self.postfix_keys.append(k)

    def ema_module(self) -> nn.Module | None:
        return None  # see the module docstring: no EMA in stage 1

    def config_dict(self) -> dict:
        return {"autoencoder": config_to_dict(self.ae_cfg), "loss": config_to_dict(self.loss_cfg)}

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """DDP: the autoencoder only. The discriminator's and logvar's gradients are not averaged by
        DDP, and the adaptive weight is taken per rank; so stage 1 under torchrun is refused for now."""
        raise ValueError("stage 1 does not support DDP yet (two optimizers and the adaptive weight's "
                         "autograd.grad); run it in one process. Stage 2 tasks support torchrun.")

    @torch.no_grad()
    def sample(self, step: int, out_dir: str | os.PathLike) -> None:
        """A reconstruction grid: inputs on the top row, posterior-mode reconstructions below."""
        if self.sample_images is None:
            return
        self.ae.eval()
        x = self.sample_images.to(next(self.ae.parameters()).device)
        x_rec = self.ae.decode(self.ae.encode(x).mode())
        save_image_grid([x, x_rec], Path(out_dir) / "samples" / f"recon_{step:06d}.png",
                        title=f"step {step}: input (top) vs reconstruction (bottom)")

    # ------------------------------------------------------------------ after training
    def finish(self, data: torch.utils.data.Dataset, out_dir: str | os.PathLike,
               max_images: int = SCALE_IMAGES) -> float:
        """Measure scale_factor = 1 / std(z) on (up to max_images) training images, and for a residual
        autoencoder shift_factor = mean(z) (its latent is a block mean of the image: on dark digits about
        -0.8, which the scale would turn into a mean of -2 that the noise schedule meets far off zero);
        store them in the config and save the model folder `out_dir/model/` (raw weights). Returns the
        scale factor."""
        if self.decoder_only:  # the encoder did not move: keep its latent statistics exactly, save the new decoder
            self.ae.save_pretrained(Path(out_dir) / "model")
            return self.ae.scale_factor
        loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=False)
        # The generator must live where the latents are sampled (a CPU generator fails on cuda).
        generator = torch.Generator(next(self.ae.parameters()).device).manual_seed(0)
        mean, self.ae.scale_factor = measure_latent_stats(self.ae, loader, max_batches=max(1, max_images // 64),
                                                          generator=generator)
        self.ae.shift_factor = mean if self.ae.cfg.shortcut == "residual" else 0.0
        self.ae.save_pretrained(Path(out_dir) / "model")
        return self.ae.scale_factor


def stack_images(data: torch.utils.data.Dataset, n: int) -> torch.Tensor:
    """n images spread evenly over a dataset, as one (n, C, H, W) tensor. Evenly, not the first n:
    MNIST-5k is sorted by class, so its first images are all zeros."""
    n = min(n, len(data))
    return torch.stack([images_of(data[i * len(data) // n]) for i in range(n)])


def floor_reconstruction(x: torch.Tensor, f: int) -> torch.Tensor:
    """The non-learned baseline an autoencoder must beat: average each f x f pixel block (the latent's
    spatial grid, keeping all C channels), then bicubic upsampling back to full size."""
    small = F.interpolate(x, scale_factor=1 / f, mode="area")  # (B, C, H, W) -> (B, C, H/f, W/f)
    up = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False)  # -> (B, C, H, W)
    return up.clamp(-1, 1)  # bicubic overshoots the range at edges


def crop_to_multiple(x: torch.Tensor, f: int) -> torch.Tensor:
    """x (..., H, W) centre-cropped so that H and W are multiples of f (coffee is 400 x 600: at f = 16, 400 x 592)."""
    H, W = x.shape[-2:]
    top, left = (H % f) // 2, (W % f) // 2
    return x[..., top:top + H - H % f, left:left + W - W % f]


@torch.no_grad()
def evaluate_photo(model: AutoencoderKL, name: str = "astronaut") -> dict[str, float]:
    """PSNR/SSIM of the full-size held-out photo through the autoencoder (posterior mode, no noise),
    beside the same numbers for the area-down / bicubic-up floor at the model's f. A side that is not a
    multiple of f is centre-cropped to one first (both numbers then read the same pixels)."""
    from ldm_scratch.data import load_photo
    from ldm_scratch.metrics import psnr, ssim
    x = load_photo(name)
    if x.dim() == 3:
        x = x.unsqueeze(0)  # (C, H, W) -> (1, C, H, W)
    f = model.cfg.f if hasattr(model, "cfg") else 8
    x = crop_to_multiple(x, f)
    model.eval()
    x = x.to(next(model.parameters()).device)
    x_rec = model.decode(model.encode(x).mode()).clamp(-1, 1)
    floor = floor_reconstruction(x, f)
    return {"psnr": psnr(x_rec, x), "ssim": ssim(x_rec, x),
            "floor_psnr": psnr(floor, x), "floor_ssim": ssim(floor, x)}
