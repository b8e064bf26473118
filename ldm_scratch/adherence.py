"""Prompt adherence for the captioned coloured digits: did "a red 7 on grass" give a red 7 on grass?

Where it sits: after the text-to-image pipeline has rendered images (07_text_to_image), beside
metrics.py. FID says whether images look real; this says whether they obey the prompt, one word at
a time, the way text-to-image papers score compositional prompts with detectors (e.g. GenEval,
Ghosh et al. 2023) but with tools small enough to read:
  digit       the MNIST classifier of metrics.py, run on the recovered ink map
  colour      the mean colour of the inky pixels -> the nearest entry of data.COLORS
  background  texture statistics of the non-ink pixels -> the nearest background centroid

It inverts the compositing of data.ColoredDigits, pixel = a * colour + (1 - a) * g, with a the ink
alpha and g the grey background (0 for "plain", at most TEXTURE_GAIN for a texture). Every COLORS
entry has a channel at full brightness 1, so a pixel's brightest channel is
    m = max_ch(pixel) = a * 1 + (1 - a) * g = g + a (1 - g),
whatever the colour: m is the ink map seen through the background. The two numbers this needs
(how bright a background pixel can be; where each background's statistics lie) are fitted on the
train split by `fit_adherence`, never typed in. On real held-out images the scores are the metric's
ceiling: a perfect generator could not score higher (see `prompt_adherence`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ldm_scratch.data import BACKGROUNDS, COLORS, DIGIT_NAMES, ColoredDigits, MNIST5k
from ldm_scratch.metrics import MAX_ABS_VALUE, MNISTClassifier, load_classifier, predict

COLOR_NAMES = tuple(COLORS)
COLOR_RGB = torch.tensor([COLORS[c] for c in COLOR_NAMES])  # (K, 3) in [0, 1]
IMAGE_SHAPE = (3, ColoredDigits.SIZE, ColoredDigits.SIZE)
# Texture grain is measured as the mean |g(p) - g(p + lag)| at octave-spaced lags: 1 px sees the
# finest grain, 4 px the brick rows; 8 would leave too few background pairs inside a 32 px crop.
LAGS = (1, 2, 4)
FEATURE_NAMES = ("mean", "std") + tuple(f"diff_{axis}{lag}" for lag in LAGS for axis in "xy")


# ----------------------------------------------------------------------------- captions


def parse_caption(caption: str) -> tuple[int, str, str]:
    """ "a red 7 on grass" -> (7, "red", "grass"); anything else is a ValueError naming the template."""
    words = caption.lower().split() if isinstance(caption, str) else None
    ok = (words is not None and len(words) == 5 and words[0] in ("a", "an") and words[1] in COLORS
          and words[2] in DIGIT_NAMES and words[3] == "on" and words[4] in BACKGROUNDS)
    if not ok:
        raise ValueError(f"cannot parse caption {caption!r}: expected 'a|an <colour> <digit> on <background>' "
                         f"with colour in {{{', '.join(COLOR_NAMES)}}}, digit 0-9, "
                         f"background in {{{', '.join(BACKGROUNDS)}}}")
    return int(words[2]), words[1], words[4]


# ----------------------------------------------------------------------------- the fitted statistics


@dataclass
class AdherenceStats:
    """What `fit_adherence` learns from the train split."""
    ink_floor: float               # the brightest max-channel value of any background pixel: above it is ink
    centroids: torch.Tensor        # (len(BACKGROUNDS), F) mean background features per background
    scale: torch.Tensor            # (F,) pooled within-class std of each feature: the distance's units


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images shaped (N, 3, 32, 32) in [-1, 1], got {shape}")
    if images.shape[0] == 0 or not torch.isfinite(images).all():
        raise ValueError("expected a non-empty batch of finite images")
    if images.abs().max() > MAX_ABS_VALUE:
        raise ValueError(f"expected values in [-1, 1], got range [{images.min():.3g}, {images.max():.3g}]")
    # Generated images overshoot [-1, 1] a little; the compositing model lives in [0, 1].
    return ((images.detach().cpu().float() + 1) / 2).clamp(0, 1)  # (N, 3, H, W) in [0, 1]


def brightness(x01: torch.Tensor) -> torch.Tensor:
    """m = max over channels = g + a (1 - g) (module docstring): (N, 3, H, W) -> (N, 1, H, W)."""
    return x01.amax(dim=1, keepdim=True)


def ink_map(x01: torch.Tensor, ink_floor: float) -> torch.Tensor:
    """Ink alpha a in [0, 1], (N, 3, H, W) -> (N, 1, H, W), with the background taken at its brightest.

    From m = g + a (1 - g): a = (m - g) / (1 - g). The texture g varies per pixel and is unknown under
    the ink, so we use g = ink_floor, the brightest a background ever gets: no background pixel
    survives as ink, and full ink (m = 1) stays 1; only faint stroke edges over dark texture are lost.
    """
    # A floor of 1 (a transform that brightens every background pixel to white, e.g. an untrained
    # autoencoder) leaves no room for ink: keep the denominator one 8-bit grey level wide, not 0 (NaN).
    return ((brightness(x01) - ink_floor) / max(1 - ink_floor, 1 / 255)).clamp(0, 1)


def background_features(x01: torch.Tensor, ink_floor: float) -> torch.Tensor:
    """Texture statistics of the non-ink pixels: (N, 3, H, W) -> (N, F), F = len(FEATURE_NAMES).

    g is the channel mean (a background pixel is grey, g = R = G = B). A pixel counts as background
    when no pixel of its 3x3 neighbourhood shows ink: MNIST strokes are anti-aliased over about one
    pixel, and those faint fringes (below ink_floor, yet tinted) would leak the stroke colour into g.
    """
    g = x01.mean(dim=1, keepdim=True)  # (N, 3, H, W) -> (N, 1, H, W)
    inky = (brightness(x01) > ink_floor).float()  # (N, 1, H, W)
    back = 1 - F.max_pool2d(inky, kernel_size=3, stride=1, padding=1)  # 1 = background, dilated ink removed

    def masked_mean(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (v * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp(min=1)  # (N, 1, h, w) -> (N,)

    mean = masked_mean(g, back)
    std = masked_mean((g - mean[:, None, None, None]).square(), back).sqrt()
    feats = [mean, std]
    for lag in LAGS:
        # mean |g(y, x) - g(y, x + lag)| over pairs of background pixels, then the same down the columns
        dx = (g[..., lag:] - g[..., :-lag]).abs()  # (N, 1, H, W - lag)
        dy = (g[..., lag:, :] - g[..., :-lag, :]).abs()  # (N, 1, H - lag, W)
        feats += [masked_mean(dx, back[..., lag:] * back[..., :-lag]),
                  masked_mean(dy, back[..., lag:, :] * back[..., :-lag, :])]
    return torch.stack(feats, dim=1)  # F x (N,) -> (N, F)


def fit_adherence(seed: int = 0, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> AdherenceStats:
    """Fit the ink floor and the background centroids on ColoredDigits("train", seed) (seconds; the
    default fit is cached).

    The true ink alpha of every train image is known (its MNIST digit), so the background pixels are
    known exactly. `transform` (images (N, 3, 32, 32) in [-1, 1] -> the same) is applied to the train
    images first: pass an autoencoder's reconstruction to fit the statistics a latent model can
    reproduce at all (a decoder that smooths texture grain moves every texture's centroid).
    """
    if transform is None:
        return _fit_default(seed)
    return _fit(seed, transform)


@functools.lru_cache(maxsize=4)
def _fit_default(seed: int) -> AdherenceStats:
    return _fit(seed, None)


def _fit(seed: int, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> AdherenceStats:
    data = ColoredDigits("train", seed=seed)
    images = data.images if transform is None else transform(data.images)
    x01 = _check_images(images)  # (N, 3, 32, 32) in [0, 1]
    alpha = (MNIST5k("train", pad_to=ColoredDigits.SIZE).images + 1) / 2  # (N, 1, 32, 32): the same digits
    # Background = no ink within the 3x3 neighbourhood, the same rule background_features applies.
    far_from_ink = F.max_pool2d(alpha, kernel_size=3, stride=1, padding=1) == 0  # (N, 1, 32, 32) bool
    ink_floor = brightness(x01)[far_from_ink].max().item()
    feats = background_features(x01, ink_floor)  # (N, F)
    labels = data.background_idx
    centroids = torch.stack([feats[labels == k].mean(dim=0) for k in range(len(BACKGROUNDS))])  # (K, F)
    # Pooled within-class spread: each feature's distance is counted in units of its own noise, so
    # a mean brightness difference (~0.01) and a grain difference (~0.01 too, but noisier) weigh fairly.
    scale = (feats - centroids[labels]).std(dim=0)  # (N, F) -> (F,)
    return AdherenceStats(ink_floor=ink_floor, centroids=centroids, scale=scale)


# ----------------------------------------------------------------------------- scoring


def predict_attributes(images: torch.Tensor, classifier: MNISTClassifier | None = None,
                       stats: AdherenceStats | None = None) -> dict[str, torch.Tensor]:
    """What each image shows: {"digit", "color", "background"}, each (N,) int64 (indices into
    DIGIT_NAMES, COLOR_NAMES and BACKGROUNDS)."""
    x01 = _check_images(images)
    classifier = load_classifier() if classifier is None else classifier
    stats = fit_adherence() if stats is None else stats
    a = ink_map(x01, stats.ink_floor)  # (N, 1, 32, 32) in [0, 1]
    # The classifier's convention (metrics.py): (N, 1, 32, 32) in [-1, 1], background -1, ink +1.
    digit = predict(a * 2 - 1, classifier)
    # Colour: the ink-weighted mean colour, sum_p a_p x_p / sum_p a_p (faint edges, mostly background,
    # count little), divided by its brightest channel, then the nearest COLORS entry in RGB. Every
    # COLORS entry has brightest channel 1, so the division compares hues, not brightness: a dim or
    # blurred yellow (0.6, 0.6, 0) is yellow, not the orange (1, 0.5, 0) that plain RGB distance picks.
    w = a + 1e-8  # (N, 1, H, W); the tiny floor only keeps an inkless image at 0 / 0 -> its mean colour
    rgb = (x01 * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3))  # (N, 3, H, W) -> (N, 3)
    rgb = rgb / rgb.amax(dim=1, keepdim=True).clamp(min=1e-8)  # (N, 3), brightest channel 1 (black stays 0)
    color = torch.cdist(rgb, COLOR_RGB).argmin(dim=1)  # (N, 3) x (K, 3) -> (N, K) -> (N,)
    feats = background_features(x01, stats.ink_floor)  # (N, F)
    scale = stats.scale.clamp(min=1e-6)  # a feature with no spread on train cannot divide by 0
    background = torch.cdist(feats / scale, stats.centroids / scale).argmin(dim=1)  # (N, K) -> (N,)
    return {"digit": digit, "color": color, "background": background}


def prompt_adherence(images: torch.Tensor, captions: list[str], classifier: MNISTClassifier | None = None,
                     stats: AdherenceStats | None = None) -> dict[str, float | int]:
    """Share of images (N, 3, 32, 32) in [-1, 1] whose digit, colour and background match their caption.

    Returns digit_acc, color_acc, background_acc, all_acc (all three right) and n. On real held-out
    ColoredDigits("test") images this is the ceiling a generator can reach: digit_acc is then the
    classifier's own accuracy (~0.98), colour and background ~0.99-1.0 (measured in tests/test_adherence.py).
    """
    if isinstance(captions, str) or len(captions) != len(images):
        raise ValueError(f"expected one caption per image ({len(images)}), got "
                         f"{'a single string' if isinstance(captions, str) else len(captions)}")
    wanted = [parse_caption(c) for c in captions]
    want_digit = torch.tensor([d for d, _, _ in wanted])
    want_color = torch.tensor([COLOR_NAMES.index(c) for _, c, _ in wanted])
    want_back = torch.tensor([BACKGROUNDS.index(b) for _, _, b in wanted])
    got = predict_attributes(images, classifier, stats)
    digit_ok, color_ok, back_ok = got["digit"] == want_digit, got["color"] == want_color, got["background"] == want_back
    mean = lambda ok: ok.double().mean().item()  # noqa: E731 - share of True
    return {"digit_acc": mean(digit_ok), "color_acc": mean(color_ok), "background_acc": mean(back_ok),
            "all_acc": mean(digit_ok & color_ok & back_ok), "n": len(wanted)}
