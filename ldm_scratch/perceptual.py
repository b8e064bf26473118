"""Perceptual distance in LPIPS form (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", Eq. 1), the "looks alike" half of the stage-1 reconstruction loss.

    d(x, y) = sum_l  1/(H_l W_l) sum_{h,w}  || w_l * (f^l_hw(x) - f^l_hw(y)) ||_2^2

f^l is the activation of layer l of a frozen conv net, unit-normalised over channels at every
position (so only the DIRECTION of the feature vector counts, not its size); w_l >= 0 is one
weight per channel (LPIPS's 1x1 "lin" layers); the squared distance is averaged over space and
summed over layers. Two backbones:

  "default"  a small 4-stage conv net (32-64-128-128) that this project trains itself, offline and
             reproducibly (scripts/train_perceptual.py), shipped in weights/perceptual_default.pt:
             MNIST digit classification plus rotation prediction on training-photo crops, lin weights
             all 1 (LPIPS's "baseline" variant; Zhang et al. Sec. 4.1, Fig. 4 find unit-normalised
             features of supervised and self-supervised nets already agree with people far better than
             L2/SSIM). Measured limit (held-out crops, equal MSE, distortion_ranking): it rates blur
             worst but Gaussian noise milder than a one-pixel shift: digits + rotation teach little about noise.
  "contrastive"  the same architecture trained by scripts/train_perceptual_contrastive.py, shipped in
             weights/perceptual_contrastive.pt: a self-supervised trunk (two views of a training-photo crop,
             one moved by up to 2 pixels, must find each other) and lin weights calibrated as LPIPS's "lin"
             variant is, on synthetic judgements (at equal MSE a one-pixel shift of a training crop must come
             out closer than its blur and its noise). On held-out crops it ranks the shift least of five
             distortions, two of them never used in training (README "Perceptual loss"). Not the default:
             as a loss at weight 1 it wrecked notebook 02's short GAN run (it weighs colour casts 16x a shift).
  "vgg16"    the LPIPS-VGG network: torchvision-layout VGG16 weights + LPIPS lin weights, both read
             from local files the user already has (nothing is downloaded).

Where it sits: losses.py adds perceptual_weight * d(x, x_rec) to the L1 term of the autoencoder
loss (Rombach et al. 2022, Sec. 3; Esser et al. 2021, Sec. 3.2). The net is frozen, but gradient
flows through it to x_rec, i.e. into the decoder: that is the whole point.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, safe_torch_load

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "perceptual_default.pt"
CONTRASTIVE_WEIGHTS = Path(__file__).resolve().parent / "weights" / "perceptual_contrastive.pt"

# LPIPS's ScalingLayer: ImageNet's per-channel mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
# 0.225), re-expressed for inputs in [-1, 1]: shift = 2 * mean - 1, scale = 2 * std.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# VGG16 (Simonyan & Zisserman 2015, config "D"): numbers are conv widths, "M" a 2x2 max-pool.
# Built in this order, nn.Sequential indices match torchvision's `features.N` keys exactly.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)          # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: LPIPS's layers
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """The convolutional half of VGG16; returns the activations LPIPS compares."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU()]
                c_in = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)  # (B, C_l, H / 2^l, W / 2^l)
        return taps


class SmallFeatures(nn.Module):
    """The default backbone: stage 1 = two 3x3 convs at full resolution (like VGG's conv1_x, so the
    finest tap sees edges, not single pixels), then one stride-2 3x3 conv per further stage."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        self.widths = tuple(widths)
        stages = [nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.ReLU(),
                                nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.ReLU())]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            stages.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for stage in self.stages:
            x = stage(x)  # (B, C_{l-1}, H', W') -> (B, C_l, H'/2, W'/2) (stage 1 keeps H, W)
            taps.append(x)
        return taps


def unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Zhang et al. 2018, Eq. 1: f_hw / ||f_hw||_2, the norm taken over channels at each position."""
    norm = torch.sqrt(torch.sum(f * f, dim=1, keepdim=True))  # (B, C, H, W) -> (B, 1, H, W)
    # eps keeps all-zero positions (dead ReLUs on flat patches) finite and their gradient defined.
    return f / (norm + eps)


def _check_tensor(state: dict, key: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r} (expected shape {shape})")
    t = state[key]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise CheckpointError(f"{source}: key {key!r} has shape {got}, expected {shape}")
    return t.float()


def _load_dict(path: str | os.PathLike, what: str) -> dict:
    state = safe_torch_load(path)  # CheckpointError naming the file if missing/corrupt/unsafe
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors ({what}), got {type(state).__name__}")
    return state


def load_vgg16(path: str | os.PathLike) -> VGG16Features:
    """A torchvision vgg16 state_dict (keys `features.N.weight/bias`; `classifier.*` is ignored)."""
    net = VGG16Features()
    state = _load_dict(path, "torchvision VGG16 weights")
    clean = {k: _check_tensor(state, k, tuple(v.shape), str(path)) for k, v in net.state_dict().items()}
    net.load_state_dict(clean)
    return net


def load_lin(path: str | os.PathLike, channels: tuple[int, ...]) -> list[torch.Tensor]:
    """LPIPS lin weights: keys `lin{l}.model.1.weight`, shape (1, C_l, 1, 1), all >= 0."""
    state = _load_dict(path, "LPIPS lin weights")
    lins = []
    for l, c in enumerate(channels):
        key = f"lin{l}.model.1.weight"
        w = _check_tensor(state, key, (1, c, 1, 1), str(path))
        if (w < 0).any():  # LPIPS clamps these to >= 0 in training; negative means a wrong file
            raise CheckpointError(f"{path}: key {key!r} has negative weights; LPIPS lin weights are >= 0")
        lins.append(w)
    return lins


class PerceptualLoss(nn.Module):
    """d(x, y) of LPIPS Eq. 1 for images (B, 1 or 3, H, W) in [-1, 1]; returns (B,).

    PerceptualLoss()                                        the shipped offline default net
    PerceptualLoss("contrastive")                           the shipped net that ranks distortions like a person
    PerceptualLoss("vgg16", vgg_path=..., lin_path=...)     LPIPS-VGG from local files
    """

    def __init__(self, net: str = "default", vgg_path: str | os.PathLike | None = None,
                 lin_path: str | os.PathLike | None = None,
                 default_path: str | os.PathLike = DEFAULT_WEIGHTS):
        super().__init__()
        if net == "vgg16":
            if vgg_path is None or lin_path is None:
                raise ValueError("net='vgg16' needs vgg_path (torchvision vgg16 state_dict, e.g. "
                                 "vgg16-397923af.pth) and lin_path (LPIPS's weights/v0.1/vgg.pth)")
            self.net = load_vgg16(vgg_path)
            lins = load_lin(lin_path, VGG16_TAP_CHANNELS)
            shift, scale = LPIPS_SHIFT, LPIPS_SCALE
        elif net in ("default", "contrastive"):
            self.net, lins = load_default(default_path if net == "default" else CONTRASTIVE_WEIGHTS)
            # The default net was trained on [-1, 1] inputs directly: identity scaling.
            shift, scale = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            raise ValueError(f"net must be 'default', 'contrastive' or 'vgg16', got {net!r}")
        self._setup(lins, shift, scale)

    @classmethod
    def from_parts(cls, net: nn.Module, lins: list[torch.Tensor]) -> "PerceptualLoss":
        """A metric from a trunk returning a list of taps and one (1, C_l, 1, 1) weight per tap, inputs used
        as they are ([-1, 1]): how scripts/train_perceptual.py checks a net before writing the file."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.net = net
        self._setup(lins, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        return self

    def _setup(self, lins: list[torch.Tensor], shift: tuple, scale: tuple) -> None:
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1))
        for l, w in enumerate(lins):
            self.register_buffer(f"lin{l}", w)  # (1, C_l, 1, 1)
        self.num_layers = len(lins)
        # Frozen: the metric is a fixed ruler. If the autoencoder's loss could move it, the cheapest
        # way to lower the loss would be to make the ruler blind. Gradient still flows to the INPUTS.
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # Stay in eval mode even when a parent module calls .train(): the ruler never changes.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape != y.shape or x.shape[1] not in (1, 3):
            raise ValueError(f"PerceptualLoss expects two (B, 1 or 3, H, W) tensors of equal shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 1:  # grey images (MNIST): the same image in R, G and B
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)  # (B, 1, H, W) -> (B, 3, H, W)
        # One pass over the pair (batched together) halves the number of conv calls.
        both = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W)
        d = x.new_zeros(x.shape[0], dtype=torch.float32)
        for l, f in enumerate(self.net(both)):
            fx, fy = unit_normalize(f.float()).chunk(2)  # (2B, C_l, H_l, W_l) -> 2 x (B, C_l, H_l, W_l)
            # Eq. 1: sum_c w_c (fx - fy)^2, then the mean over positions h, w.
            per_pos = torch.sum(getattr(self, f"lin{l}") * (fx - fy) ** 2, dim=1)  # (B, H_l, W_l)
            d = d + per_pos.mean(dim=(1, 2))  # (B,)
        return d


def load_default(path: str | os.PathLike = DEFAULT_WEIGHTS) -> tuple[SmallFeatures, list[torch.Tensor]]:
    """The shipped net: {'widths': [...], 'net': state_dict (fp16), 'lin': {...}, 'info': {...}}."""
    blob = _load_dict(path, "default perceptual net")
    for key in ("widths", "net", "lin"):
        if key not in blob:
            raise CheckpointError(f"{path}: missing entry {key!r}; rebuild it with scripts/train_perceptual.py")
    net = SmallFeatures(tuple(blob["widths"]))
    # Stored in fp16 to halve the file (the features move by ~1e-3 relative: irrelevant for a loss).
    clean = {k: _check_tensor(blob["net"], k, tuple(v.shape), f"{path} [net]")
             for k, v in net.state_dict().items()}
    net.load_state_dict(clean)
    lins = [_check_tensor(blob["lin"], f"lin{l}.model.1.weight", (1, c, 1, 1), f"{path} [lin]")
            for l, c in enumerate(net.widths)]
    return net, lins


DISTORTIONS = ("shift", "blur", "noise", "blocking", "colour")


def distortion_pairs(image: torch.Tensor, target_mse: float | None = None,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Five distortions of `image` (B, C, H, W) in [-1, 1] at EQUAL per-image MSE (DISTORTIONS):

    "shift"     the image moved right by one pixel (first column repeated)
    "blur"      a Gaussian blur whose sigma is found by bisection
    "noise"     additive Gaussian noise rescaled to the exact MSE
    "blocking"  JPEG's artefact at its coarsest: x + a (B8(x) - x), B8 = the mean of each 8 x 8 block,
                a set for the exact MSE
    "colour"    one constant offset per channel (a colour cast; a random direction, scaled to the MSE)
    The shift's MSE is fixed by the content, so by default it sets the target for the others; a given
    `target_mse` is then used for the others only (on a nearly flat image even the widest blur, sigma 20,
    may stay below the target: check the MSEs). A person calls the shift nearly identical and the others
    clearly worse: a good metric should rank the shift least different.
    """
    shifted = torch.cat([image[..., :1], image[..., :-1]], dim=-1)  # (B, C, H, W), moved right by 1
    mse_shift = ((shifted - image) ** 2).mean(dim=(1, 2, 3))  # (B,)
    target = mse_shift if target_mse is None else torch.full_like(mse_shift, float(target_mse))
    eps = torch.randn(image.shape, generator=generator, dtype=image.dtype)
    rms = eps.pow(2).mean(dim=(1, 2, 3)).sqrt()  # (B,)
    noisy = image + eps * (target.sqrt() / rms)[:, None, None, None]
    blurred = torch.stack([_blur_to_mse(img, float(m)) for img, m in zip(image, target)])
    H, W = image.shape[-2:]
    blocks = F.interpolate(F.avg_pool2d(image, 8, ceil_mode=True), scale_factor=8, mode="nearest")[..., :H, :W]
    mse_blocks = ((blocks - image) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    blocky = image + (target / mse_blocks).sqrt()[:, None, None, None] * (blocks - image)
    cast = torch.randn(image.shape[0], image.shape[1], 1, 1, generator=generator, dtype=image.dtype)
    cast = cast / cast.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()        # unit mean square per image
    coloured = image + cast * target.sqrt()[:, None, None, None]
    return {"shift": shifted, "blur": blurred, "noise": noisy, "blocking": blocky, "colour": coloured}


@torch.no_grad()
def distortion_ranking(distance, crops: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """How a distance ranks the five equal-MSE distortions of each crop (distortion_pairs).

    distance(a, b) -> (B,). Returns the mean distance per kind, the kinds ordered by it, and on how many
    crops the one-pixel shift is the least different of all five ("shift_least") and of shift, blur and
    noise ("shift_least_of_three"), with n the number of crops."""
    distorted = distortion_pairs(crops, generator=generator)
    per = {k: torch.as_tensor(distance(crops, v)).float().flatten() for k, v in distorted.items()}
    others = torch.stack([per[k] for k in per if k != "shift"], 1)
    mean = {k: float(v.mean()) for k, v in per.items()}
    return {"mean": mean, "order": sorted(mean, key=mean.get), "per_crop": per, "n": len(crops),
            "shift_least": int((per["shift"][:, None] < others).all(1).sum()),
            "shift_least_of_three": int((per["shift"] < torch.minimum(per["blur"], per["noise"])).sum())}


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))  # +-3 sigma holds 99.7% of the kernel's mass
    t = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = img.shape[0]
    x = F.pad(img[None], (radius, radius, radius, radius), mode="replicate")  # (1, C, H+2r, W+2r)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # (1, C, H+2r, W)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # (1, C, H, W)
    return x[0]


def _blur_to_mse(img: torch.Tensor, target: float, iters: int = 30) -> torch.Tensor:
    """Bisection on sigma: the MSE of a Gaussian blur grows monotonically with sigma."""
    lo, hi = 1e-3, 20.0
    for _ in range(iters):
        mid = (lo * hi) ** 0.5  # bisect in log-sigma: sigma spans four decades
        mse = float(((_gaussian_blur(img, mid) - img) ** 2).mean())
        lo, hi = (mid, hi) if mse < target else (lo, mid)
    return _gaussian_blur(img, (lo * hi) ** 0.5)
