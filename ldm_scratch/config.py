"""Every model's hyperparameters, one dataclass per model, plus named presets.

A config is plain data: it is saved as `config.json` beside the weights (`model.pt`) and is all
that is needed to rebuild the model. Presets:
  `tiny`   - seconds on a CPU: the tests and the notebooks' quick mode (LDM_QUICK=1)
  `small`  - the teaching runs (minutes on a 2-core laptop)
  `sd`     - the Stable Diffusion VAE (Rombach et al. 2022), to load real weights into (convert.py)

Each preset table is a dict from name to a function returning a fresh config; `get_preset` is the
one place a name becomes a config, and it lists the valid names when given a wrong one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar


@dataclass
class AutoencoderConfig:
    """Stage 1: the KL autoencoder (Rombach et al. 2022, Sec. 3 and App. G)."""
    in_channels: int = 3                 # image channels (3 for RGB, 1 for MNIST)
    ch: int = 64                         # width of the first level
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)   # width multiplier per level; f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1              # ResNet blocks per level (the decoder uses one more, as in LDM)
    z_channels: int = 4                  # latent channels c
    norm_groups: int = 32                # GroupNorm groups (clipped to divide the width)
    dropout: float = 0.0
    mid_attention: bool = True           # single-head self-attention in the middle block
    # 1 / std of the training latents, measured after training (SD's is 0.18215); 1.0 = not measured yet.
    scale_factor: float = 1.0
    # the mean of the training latents, subtracted before scaling (SD3's and FLUX's shift_factor): stage 2
    # works on (z - shift_factor) * scale_factor. Measured for shortcut "residual" (whose latent is a block
    # mean of the image, far from zero on dark digits); 0.0 for the SD layout, as in SD 1.x/2.x.
    shift_factor: float = 0.0
    # "none": Stable Diffusion's layout (loads SD weights). "residual": DC-AE's parameter-free shortcuts
    # around every resampling and at both ends (Chen et al. 2024), so the network learns a residual over a
    # non-learned codec; see autoencoder.py. Folders saved before this field existed load as "none".
    shortcut: str = "none"
    # Residual only: the latent channels k >= m = C * floor(c / C) (c = 4 with C = 3 colours: channel 3) get no
    # shortcut, instead of a copy of colour k mod C; the decoder's shortcut reads only the first m. False keeps
    # the copy (the shipped photo-f8c4 was trained so: its channel 3 repeats channel 0 at r = 1.00, notebook 02).
    free_latent_channels: bool = False
    # Residual only: how the decoder's upsampling shortcut doubles the size: "nearest" (DC-AE's channel copies +
    # pixel_shuffle, so the untrained decoder is nearest-neighbour upsampling) or "bicubic" (the same width,
    # interpolated: the untrained photo-f8c4 is then the area-down / bicubic-up floor it must beat, 21.78 dB on the
    # astronaut against 20.13 for "nearest"; bilinear at each level measured 20.51).
    up_shortcut: str = "nearest"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on a field no model can be built from (the model calls it again: fields may be
        set after construction, as the CLI sets in_channels from the data)."""
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {self.shortcut!r}; valid values: {', '.join(SHORTCUTS)}")
        if self.up_shortcut not in UP_SHORTCUTS:
            raise ValueError(f"unknown up_shortcut {self.up_shortcut!r}; valid values: {', '.join(UP_SHORTCUTS)}")
        if self.up_shortcut != "nearest" and self.shortcut != "residual":
            raise ValueError("up_shortcut applies to shortcut 'residual' only (the SD layout has no shortcut)")
        if self.free_latent_channels and self.shortcut != "residual":
            raise ValueError("free_latent_channels needs shortcut 'residual' (the SD layout has no shortcut to free)")
        if self.shortcut == "residual" and min(self.z_channels, self.ch * min(self.ch_mult)) < self.in_channels:
            # the non-learned path keeps each image channel in a channel of its own at every width
            raise ValueError(f"shortcut 'residual' needs z_channels and every width >= in_channels "
                             f"({self.in_channels}); got z_channels {self.z_channels}, "
                             f"widths {[self.ch * m for m in self.ch_mult]}")

    @property
    def f(self) -> int:
        """Spatial downsampling factor: each level after the first halves H and W."""
        return 2 ** (len(self.ch_mult) - 1)


SHORTCUTS = ("none", "residual")   # AutoencoderConfig.shortcut
UP_SHORTCUTS = ("nearest", "bicubic")  # AutoencoderConfig.up_shortcut


@dataclass
class LossConfig:
    """Stage 1 loss: L1 + perceptual (LPIPS form) with a learned log-variance, KL, and PatchGAN."""
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6              # LDM's value; fits the SUM-over-pixels scale (see losses.py)
    logvar_init: float = 0.0
    disc_start: int = 2000               # optimizer steps before the discriminator is used or trained
    disc_weight: float = 0.5             # multiplies the adaptive weight (LDM's default)
    disc_factor: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    disc_loss: str = "hinge"             # "hinge" or "vanilla" (non-saturating)
    adaptive_weight_max: float = 1e4     # clamp on ||grad L_rec|| / (||grad L_G|| + 1e-4)
    perceptual_net: str = "default"      # "default" / "contrastive" (shipped offline nets), "vgg16" (local weights), "none"
    vgg_path: str = ""                   # perceptual_net="vgg16": torchvision vgg16 state_dict file
    lin_path: str = ""                   # perceptual_net="vgg16": LPIPS lin weights (weights/v0.1/vgg.pth)
    disc_norm: str = "group"             # "group", "batch" (LDM's) or "none"; see PatchDiscriminator
    disc_warmup: int = 0                 # first steps that train ONLY the discriminator, against the frozen initial
                                         # autoencoder (a fine-tune's fresh discriminator learns what real looks like)
    pixel_loss: str = "l1"               # "l1": Laplace NLL (LDM's); "l2": Gaussian NLL, squared error (what PSNR scores)
    equivariance_weight: float = 0.0     # scale equivariance (Skorokhodov et al. 2025): decoding the 2x2-averaged latent
                                         # must give the 2x2-averaged image; 0 = off (see AutoencoderTask.loss)


@dataclass
class DiffusionConfig:
    """The noise process (Ho et al. 2020): linear betas 1e-4..0.02 over T = 1000 steps."""
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule: str = "linear"             # "linear" (DDPM), "cosine" (Nichol & Dhariwal 2021) as a contrast
    prediction: str = "eps"              # "eps" or "v"


T_SAMPLINGS = ("logit_normal", "uniform")   # FlowConfig.t_sampling


@dataclass
class FlowConfig:
    """The rectified-flow objective (flow.py): how t is drawn in training, and the default sampling shift."""
    t_sampling: str = "logit_normal"   # SD3 Sec. 3.1 "rf/lognorm(0.00, 1.00)", its best; or "uniform"
    logit_mean: float = 0.0            # m: t = sigmoid(n), n ~ N(m, s^2); m < 0 favours data, m > 0 noise
    logit_std: float = 1.0             # s: larger spreads t towards both ends (s -> inf: t in {0, 1})
    shift: float = 1.0                 # sampling shift (SD3 Sec. 5.3.2); 1 = none, SD3 uses 3.0 at 1024^2


@dataclass
class UNetConfig:
    """Stage 2 denoiser: the U-Net of DDPM/LDM with time scale-shift and (cross-)attention."""
    in_channels: int = 1
    out_channels: int = 1
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8,)    # feature-map sizes (H) that get self-attention
    num_heads: int = 4
    dropout: float = 0.0
    norm_groups: int = 32
    num_classes: int = 0                 # >0: class-conditional; class num_classes is the null class (CFG)
    context_dim: int = 0                 # >0: cross-attention to a (B, N, context_dim) context sequence
    sample_size: int = 32                # H = W of the input the model is built for


@dataclass
class TextEncoderConfig:
    """The prompt encoder tau(y) (text.py): a tiny transformer, our stand-in for CLIP's text tower."""
    vocab_size: int = 0                  # set from the Tokenizer (words + [pad] + [bos]); 0 = not set yet
    max_length: int = 8                  # tokens per prompt, [bos] included (the context length N)
    dim: int = 64                        # token width D; the U-Net's context_dim
    depth: int = 2                       # transformer blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0               # MLP hidden width = mlp_ratio * dim (Vaswani et al. 2017 use 4)
    dropout: float = 0.0


@dataclass
class DiTConfig:
    """Stage 2 denoiser, the transformer alternative: DiT (Peebles & Xie 2023), see dit.py.

    Field names shared with UNetConfig (in_channels, sample_size, num_classes, context_dim) mean the same.
    """
    in_channels: int = 4                 # latent channels c
    sample_size: int = 8                 # H = W of the latent the model is built for
    patch_size: int = 2                  # P: each P x P patch of the latent becomes one token
    hidden_size: int = 64                # token width D
    depth: int = 4                       # DiT blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0               # MLP hidden width = mlp_ratio * D (the ViT value)
    num_classes: int = 0                 # >0: class-conditional; class num_classes is the null class (CFG)
    context_dim: int = 0                 # >0: condition on a (B, N, context_dim) context sequence
    learn_sigma: bool = False            # True: also output the variance (2C channels), as the paper's models
    cond_mode: str = "adaln"             # how the condition enters: "adaln", "cross-attn" or "in-context"

    @property
    def out_channels(self) -> int:
        """eps_pred (C channels), plus the learned variance interpolation (C more) when learn_sigma."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


@dataclass
class TrainConfig:
    """The one training loop's knobs (train.py), shared by both stages."""
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    disc_lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    adamw: str = "auto"                  # AdamW's kernel: "auto" (fused where the device has it), "fused", "foreach", "loop"
    ema_decay: float = 0.999
    ema_warmup: bool = True              # decay_n = min(ema_decay, (1 + n) / (10 + n)): see ema.py
    lr_warmup_steps: int = 0             # >0: the learning rate rises linearly to lr over this many steps
    lr_decay_steps: int = 0              # >0: over the last this-many of `steps` it falls linearly to 0 (warm-up, stable, decay)
    precision: str = "auto"              # "auto" (bf16 autocast where supported), "bf16", "fp32"
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    max_minutes: float = 0.0             # >0: stop (and checkpoint) after this wall time
    num_workers: int = 0
    detect_anomaly: bool = False         # autograd anomaly mode: a NaN gradient names the op that made it (slow)
    compile: bool = False                # denoisers: torch.compile the training forward (device.CompiledForTraining)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

AUTOENCODER_PRESETS: dict[str, Callable[[], AutoencoderConfig]] = {
    # f = 4, 2 levels of downsampling; seconds per step on a CPU.
    "tiny": lambda: AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=8),
    # MNIST-5k (1 x 32 x 32) -> 4 x 8 x 8 (f = 4): the latent the later stages dream in.
    "small-f4": lambda: AutoencoderConfig(in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                          z_channels=4, norm_groups=16),
    # Photo crops (3 x H x W) -> 4 x H/8 x W/8: the chapter's 48x compression.
    "small-f8": lambda: AutoencoderConfig(in_channels=3, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                                          z_channels=4, norm_groups=16),
    # Residual autoencoding (shortcut "residual", autoencoder.py): small-f8's widths, each a residual over
    # the area-down / nearest-up codec it starts as. Photo crops, three compressions of 3 x H x W:
    # f 8 c 4 = 4 x H/8 x W/8, SD's 48x;
    "photo-f8c4": lambda: AutoencoderConfig(in_channels=3, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                                            z_channels=4, norm_groups=16, shortcut="residual"),
    # f 16 c 16 = 16 x H/16 x W/16, also 48x but 4x fewer latent positions (SD3/FLUX-style wide latents);
    "photo-f16c16": lambda: AutoencoderConfig(in_channels=3, ch=32, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=1,
                                              z_channels=16, norm_groups=16, shortcut="residual"),
    # f 4 c 4 = 4 x H/4 x W/4, 12x.
    "photo-f4c4": lambda: AutoencoderConfig(in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                            z_channels=4, norm_groups=16, shortcut="residual"),
    # small-f4 with the residual design: MNIST 1 x 32 x 32 and the coloured digits 3 x 32 x 32 -> 4 x 8 x 8.
    "mnist-f4-res": lambda: AutoencoderConfig(in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                              z_channels=4, norm_groups=16, shortcut="residual"),
    "colored-f4-res": lambda: AutoencoderConfig(in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                                z_channels=4, norm_groups=16, shortcut="residual"),
    # Stable Diffusion's VAE: ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4, f 8 (~84M parameters).
    "sd": lambda: AutoencoderConfig(in_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                                    z_channels=4, norm_groups=32, scale_factor=0.18215),
}

UNET_PRESETS: dict[str, Callable[[], UNetConfig]] = {
    "tiny": lambda: UNetConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), num_heads=2,
                               norm_groups=8, sample_size=32),
    # The latent twin of `tiny`: 4 x 8 x 8 inputs (the small-f4 autoencoder's latent shape).
    "tiny-latent": lambda: UNetConfig(in_channels=4, out_channels=4, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                      attn_resolutions=(4,), num_heads=2, norm_groups=8, sample_size=8),
    # MNIST 1 x 32 x 32 pixel DDPM, 1.19M parameters, sized for a 20-minute CPU run: ~0.4 s per bf16
    # training step (batch 64, 2 cores) -> ~2,700 steps; at that step count, class-conditional with
    # guidance scale 3 reached >= 99% conditional accuracy (those steps simulated on a GPU, EMA 0.999).
    # Conditioning is the caller's choice: dataclasses.replace(cfg, num_classes=10) or context_dim=...
    "small": lambda: UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=4,
                                norm_groups=8, sample_size=32),
    # Latent diffusion on 4 x 8 x 8 latents: two levels (8x8, 4x4), attention at both. 16x fewer
    # positions than 1 x 32 x 32 pay for a wider net (ch 64) at a lower step time.
    "small-latent": lambda: UNetConfig(in_channels=4, out_channels=4, ch=64, ch_mult=(1, 2), num_res_blocks=2,
                                       attn_resolutions=(8, 4), num_heads=4, norm_groups=16, sample_size=8),
    # The demo's text-to-image denoiser on 4 x 8 x 8 latents (context_dim set by the caller): small-latent
    # at ch 48 with one res block per level, 1.88M parameters with context_dim 64. Measured side by side
    # (fp32, batch 64, one loaded core): 0.60 s per step against small-latent's 1.77 s, i.e. ~3x lighter
    # (~0.2 s where small-latent takes its 0.62 s), so a 10-minute run gets ~3x the denoiser steps.
    "text-latent": lambda: UNetConfig(in_channels=4, out_channels=4, ch=48, ch_mult=(1, 2), num_res_blocks=1,
                                      attn_resolutions=(8, 4), num_heads=4, norm_groups=16, sample_size=8),
}


def _paper_dit(hidden_size: int, depth: int, num_heads: int, patch_size: int) -> Callable[[], DiTConfig]:
    """Peebles & Xie 2023, Table 1: 256 x 256 ImageNet images -> SD-VAE latents 4 x 32 x 32, 1000 classes."""
    return lambda: DiTConfig(in_channels=4, sample_size=32, patch_size=patch_size, hidden_size=hidden_size,
                             depth=depth, num_heads=num_heads, num_classes=1000, learn_sigma=True)


DIT_PRESETS: dict[str, Callable[[], DiTConfig]] = {
    # Two blocks of width 32 on 4 x 8 x 8 latents: the tests and quick mode (milliseconds per step).
    "dit-tiny": lambda: DiTConfig(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=2,
                                  num_heads=2),
    # The small-f4 autoencoder's 4 x 8 x 8 MNIST latents: 16 tokens of width 128, 1.28M parameters.
    # Measured on the idle 2-core machine (batch 64, bf16 autocast, 1.2x faster than fp32 since layers.attention
    # avoids the fused kernel's slow bf16 backward): 42-48 ms per training step, so 3,000 steps take ~2 minutes.
    "dit-small-latent": lambda: DiTConfig(in_channels=4, sample_size=8, patch_size=2, hidden_size=128, depth=4,
                                          num_heads=4),
    # The paper's model sizes (Table 1: layers N, hidden size d, heads) x patch sizes 2, 4, 8.
    **{f"DiT-{name}/{p}": _paper_dit(d, n, h, p)
       for name, (d, n, h) in {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
                               "XL": (1152, 28, 16)}.items()
       for p in (2, 4, 8)},
}

T = TypeVar("T")


def get_preset(table: dict[str, Callable[[], T]], name: str, kind: str = "model") -> T:
    """Return a fresh config for `name`, or raise ValueError listing the valid names."""
    if name not in table:
        raise ValueError(f"unknown {kind} preset {name!r}; valid presets: {', '.join(sorted(table))}")
    return table[name]()


def config_to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[T], d: dict, source: str = "config") -> T:
    """Rebuild a config dataclass from a dict, naming missing, unknown or wrongly-typed fields."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; valid fields: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items()
                     if n not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing} for {cls.__name__}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name) if not missing else None
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if default is not None and not _same_kind(default, value):
            raise ValueError(f"{source}: field {name!r} of {cls.__name__} should be like {default!r}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, tuple)
    return isinstance(value, type(default))
