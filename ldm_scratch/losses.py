"""The stage-1 objective: what the KL autoencoder is trained against (Rombach et al. 2022, Sec. 3 and
App. G; the recipe is VQGAN's, Esser et al. 2021, Sec. 3.2, with a KL term instead of the codebook).

    L = NLL(x, x_rec) + kl_weight * KL(q(z|x) || N(0, I)) + lambda * disc_factor * L_G

  NLL  rec = |x - x_rec| + perceptual_weight * d_LPIPS(x, x_rec)  (perceptual.py), per pixel;
       nll = rec / exp(logvar) + logvar: a Laplace likelihood with a LEARNED scale b = exp(logvar)
       (-log p = |x - x_rec| / b + log 2b, per pixel), SUMMED over pixels and divided by the batch.
  KL   posterior.kl() is already summed over the latent's (c, H/f, W/f); mean over the batch.
  L_G  -mean(D(x_rec)) from a PatchGAN discriminator D (Isola et al. 2017), switched on at step
       `disc_start`, weighted by the adaptive lambda of VQGAN Eq. 7 at the decoder's last layer.

Scale, and why kl_weight = 1e-6 (LDM's value) fits it. Both terms are SUMS: the NLL over the
N_pix = C*H*W pixels, the KL over the N_lat = c*H/f*W/f latent elements. In per-element units,
    L / N_pix = mean_pix(nll) + kl_weight * (N_lat / N_pix) * mean_lat(kl),
and for SD's VAE (3x256x256 -> 4x32x32) N_lat / N_pix = 4096 / 196608 = 1/48, so the KL carries a
per-element weight of ~2e-8: a faint leash that keeps the latents near unit scale (the diffusion
model needs that), nowhere near a beta-VAE's blur. Use a per-pixel MEAN for the NLL with the same
1e-6 on a summed KL and the KL is N_pix (~2e5) times stronger than LDM intended: blurry outputs.
We keep LDM's sum scale so its hyperparameters transfer. The perceptual distance is one number per
image; added per pixel and summed, it too is weighted by N_pix, as in LDM.

The trap LDM fell into: `logvar` is a parameter of this LOSS module, so an optimizer built from
`autoencoder.parameters()` alone never moves it. Build it from `generator_parameters(autoencoder)`,
and `check_optimizers` refuses an optimizer that left logvar (or the discriminator) out.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig
from .layers import Normalize
from .perceptual import PerceptualLoss


PIXEL_LOSSES = ("l1", "l2")  # LossConfig.pixel_loss: the reconstruction term of the NLL


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, Sec. 3.2.2): one real/fake logit per overlapping image patch.

    conv4x4/2 -> LeakyReLU, then (n_layers - 1) x [conv4x4/2 -> norm -> LeakyReLU], one more
    conv4x4/1 -> norm -> LeakyReLU, and a conv4x4/1 to a single channel. n_layers = 3 sees 70x70
    patches. Norm: LDM uses BatchNorm, but on our tiny CPU batches (4-16) batch statistics are noisy,
    and since real and fake batches go through D separately, BatchNorm lets D tell them apart by their
    batch statistics instead of by content. GroupNorm normalises each image on its own (default).
    """

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "batch", "none"):
            raise ValueError(f"disc_norm must be 'group', 'batch' or 'none', got {norm!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)  # width doubles per layer, capped at 8 * ch (pix2pix)
            stride = 2 if n < n_layers else 1  # the last one keeps the resolution: more, smaller patches
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride=stride, padding=1, bias=norm == "none"),
                       _norm(norm, ch * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # pix2pix/DCGAN: N(0, 0.02) keeps the first logits near 0, so D starts undecided
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                # pix2pix: scale N(1, 0.02), shift 0: the norm starts as (almost) the identity
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, C, H, W) -> (B, 1, H', W'), e.g. 32x32 -> 2x2, 256x256 -> 30x30


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return Normalize(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Lim & Ye 2017 / Miyato et al. 2018: 1/2 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Goodfellow et al. 2014 cross-entropy: 1/2 (E[-log sigmoid(D(x))] + E[-log(1 - sigmoid(D(x_rec)))]).
    -log sigmoid(a) = softplus(-a) and -log(1 - sigmoid(a)) = softplus(a), stable for large |a|."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(x_rec)] (LDM/VQGAN, for both D losses): push the reconstructions' logits up."""
    return -logits_fake.mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float, eps: float = 1e-4) -> torch.Tensor:
    """Esser et al. 2021, Eq. 7: lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + eps), taken at
    the decoder's last layer G_L, clamped to [0, max_weight] and detached (a weight, not a loss).
    It balances the two gradients where they meet the image, whatever their raw scales."""
    g_rec = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]  # same shape as last_layer
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + eps)).clamp(0.0, max_weight).detach()


@contextlib.contextmanager
def _no_param_grads(module: nn.Module):
    """Run `module` without recording its parameters in the graph: the generator step then sends
    gradient THROUGH the discriminator to x_rec, but leaves D's .grad untouched (None)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AutoencoderLoss(nn.Module):
    """Both halves of the stage-1 game: `generator_loss` (autoencoder + logvar) and
    `discriminator_loss` (discriminator), with LDM's learned logvar, KL weight and disc_start."""

    def __init__(self, cfg: LossConfig, in_channels: int):
        super().__init__()
        if cfg.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {', '.join(PIXEL_LOSSES)}, got {cfg.pixel_loss!r}")
        if cfg.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {cfg.disc_loss!r}")
        if cfg.perceptual_net not in ("default", "contrastive", "vgg16", "none"):
            raise ValueError(f"perceptual_net must be 'default', 'contrastive', 'vgg16' or 'none', "
                             f"got {cfg.perceptual_net!r}")
        self.cfg = cfg
        # log b of the Laplace likelihood, one scalar for all pixels (LDM's logvar); trained with the AE
        self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)))
        self.perceptual = None
        if cfg.perceptual_net != "none" and cfg.perceptual_weight > 0:
            self.perceptual = PerceptualLoss(cfg.perceptual_net, vgg_path=cfg.vgg_path or None,
                                             lin_path=cfg.lin_path or None)
        self.discriminator = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)
        self.d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    # ------------------------------------------------------------------ what each optimizer trains
    def generator_parameters(self, autoencoder: nn.Module) -> list[nn.Parameter]:
        """The generator optimizer's parameters: the autoencoder's AND this module's logvar."""
        return list(autoencoder.parameters()) + [self.logvar]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def check_optimizers(self, gen_opt: torch.optim.Optimizer, disc_opt: torch.optim.Optimizer | None = None) -> None:
        """ValueError if logvar is missing from the generator optimizer (LDM's bug), a discriminator
        parameter is in it, the perceptual net is in either, or the disc optimizer misses D."""
        def ids(opt):
            return {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else set()
        gen, disc = ids(gen_opt), ids(disc_opt)
        d_ids = {id(p) for p in self.discriminator.parameters()}
        p_ids = {id(p) for p in self.perceptual.parameters()} if self.perceptual is not None else set()
        if id(self.logvar) not in gen:
            raise ValueError("the generator optimizer does not train the loss module's logvar "
                             "(LDM's bug: it never moves); build it from loss.generator_parameters(autoencoder)")
        if gen & d_ids:
            raise ValueError("the generator optimizer holds discriminator parameters; "
                             "they belong to the disc optimizer")
        if (gen | disc) & p_ids:
            raise ValueError("an optimizer holds the frozen perceptual net's parameters")
        if disc_opt is not None and not d_ids <= disc:
            raise ValueError("the discriminator optimizer misses some of loss.discriminator_parameters()")

    def disc_active(self, step: int) -> bool:
        """The discriminator is applied and trained from step `disc_start` on (LDM's adopt_weight)."""
        return step >= self.cfg.disc_start and self.cfg.disc_factor > 0

    # ------------------------------------------------------------------ the two losses
    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, posterior, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """L = nll + kl_weight * KL + d_weight * disc_factor * L_G. All in fp32, even under bf16 autocast.
        last_layer: the decoder's last weight (model.last_layer), for the adaptive weight."""
        if x.shape != x_rec.shape:
            raise ValueError(f"x and x_rec must have the same shape, got {tuple(x.shape)} and {tuple(x_rec.shape)}")
        x, x_rec = x.float(), x_rec.float()
        B = x.shape[0]
        l1 = (x - x_rec).abs()  # (B, C, H, W)
        l2 = self.cfg.pixel_loss == "l2"
        rec = l1.square() if l2 else l1
        p = torch.zeros(B, device=x.device)
        if self.perceptual is not None:
            p = self.perceptual(x, x_rec)  # (B,)
            rec = rec + self.cfg.perceptual_weight * p[:, None, None, None]  # (B, C, H, W), p per pixel
        # Laplace NLL with learned scale: rec / exp(logvar) + logvar, summed over pixels, / B. With pixel_loss
        # "l2" the Gaussian one, rec / exp(logvar) + logvar / 2 (variance exp(logvar) / 2, constants dropped)
        nll = torch.sum(rec / torch.exp(self.logvar) + (0.5 if l2 else 1.0) * self.logvar) / B
        # posterior.kl(): (B,) already summed over (c, H/f, W/f); mean over the batch
        kl = posterior.kl().float().mean()
        loss = nll + self.cfg.kl_weight * kl

        g_loss = torch.zeros((), device=x.device)
        d_weight = torch.zeros((), device=x.device)
        if self.disc_active(step):
            with _no_param_grads(self.discriminator):
                logits_fake = self.discriminator(x_rec).float()  # (B, 1, H', W')
            g_loss = generator_adv_loss(logits_fake)
            if torch.is_grad_enabled() and last_layer is not None and nll.requires_grad and g_loss.requires_grad:
                d_weight = self.cfg.disc_weight * adaptive_weight(nll, g_loss, last_layer, self.cfg.adaptive_weight_max)
            # else (validation under no_grad): no gradients to compare, so d_weight = 0 as in LDM;
            # the logged total is then the reconstruction objective only.
            loss = loss + d_weight * self.cfg.disc_factor * g_loss
        logs = {"total": loss.item(), "l1": l1.mean().item(), "perceptual": p.mean().item(),
                "rec": rec.mean().item(), "nll": nll.item(), "kl": kl.item(), "g_loss": g_loss.item(),
                "d_weight": float(d_weight), "logvar": self.logvar.item(), "disc_active": float(self.disc_active(step))}
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The hinge or vanilla D loss on real x vs DETACHED x_rec (no gradient reaches the autoencoder).

        Before disc_start the discriminator is not even run: the loss is a constant 0 with no graph,
        so the trainer must skip backward() and the optimizer step; check `disc_active(step)` first."""
        if not self.disc_active(step):
            return torch.zeros((), device=x.device), {"d_loss": 0.0, "disc_active": 0.0}
        logits_real = self.discriminator(x.detach().float()).float()  # (B, 1, H', W')
        logits_fake = self.discriminator(x_rec.detach().float()).float()  # (B, 1, H', W')
        d_loss = self.cfg.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        real, fake = logits_real.mean().item(), logits_fake.mean().item()
        # the gap real - fake: a D that wins runs it up; one that collapses sits at 0
        logs = {"d_loss": d_loss.item(), "logits_real": real, "logits_fake": fake,
                "logits_gap": real - fake, "disc_active": 1.0}
        return d_loss, logs
