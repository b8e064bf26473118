"""Scoring what the denoisers make: one module for the evaluation every stage, command and notebook uses.

Digits (class-conditional models, pixel or latent): conditional accuracy and classifier-FID from the package's
MNIST classifier (metrics.py), beside the real-vs-real FID at the same n (`score_digits`; `eval_labels` gives n per
class; `evaluate` samples a pixel U-Net first, `evaluate_pipeline` a latent pipeline). Captioned coloured digits
(text models): prompt adherence (adherence.py) of samples, beside the same held-out captions' real images through
the autoencoder (`reconstruction`, `adherence_stats`, `heldout_captions`, `adherence_at`, `score_adherence`).

Before this module the digit helpers lived in stage2.py and the pipeline ones in cli/stage3.py; both still
re-export them, so `from ldm_scratch.stage2 import eval_labels` keeps working.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ldm_scratch.diffusion import GaussianDiffusion
    from ldm_scratch.unet import UNet

SAMPLE_STEPS = 30   # DDIM steps of an evaluation and of the training grids: 30 of 1000 is enough for digits


def evaluate(unet: UNet, diffusion: GaussianDiffusion, n_per_class: int = 50, num_steps: int = SAMPLE_STEPS,
             guidance_scale: float = 3.0, generator: torch.Generator | None = None, batch_size: int = 256,
             precision: str = "auto", classifier: nn.Module | None = None) -> dict[str, float]:
    """Class-conditional samples scored by the MNIST classifier (metrics.py): conditional accuracy, and
    classifier-FID against n real digits beside the real-vs-real FID at the same n (its floor); see
    score_digits. Latent models sample through their pipeline and call score_digits themselves.
    """
    from ldm_scratch.metrics import DIGIT_SHAPE, NUM_CLASSES
    from ldm_scratch.stage2 import generate  # the pixel sampler (stage2 imports this module: import here)
    made = (unet.cfg.in_channels, unet.cfg.sample_size, unet.cfg.sample_size)
    if unet.cfg.num_classes != NUM_CLASSES or made != DIGIT_SHAPE:
        raise ValueError(f"evaluate needs a U-Net making {DIGIT_SHAPE} digits of {NUM_CLASSES} classes (the "
                         f"classifier's input); this one makes {made} with num_classes={unet.cfg.num_classes}")
    labels = eval_labels(n_per_class)  # (n,): n_per_class of each digit
    samples = generate(unet, diffusion, labels, num_steps=num_steps, guidance_scale=guidance_scale,
                       generator=generator, precision=precision, batch_size=batch_size).cpu()
    return score_digits(samples, labels, classifier)


def eval_labels(n_per_class: int) -> torch.Tensor:
    """(10 n_per_class,) labels, n_per_class of each digit; n_per_class is checked against the real pool
    score_digits draws two disjoint sets of 10 n_per_class digits from (n <= 2,500)."""
    from ldm_scratch.metrics import NUM_CLASSES
    limit = 5000 // (2 * NUM_CLASSES)  # MNIST-5k holds 5,000 digits: two disjoint sets of n
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or not 1 <= n_per_class <= limit:
        raise ValueError(f"n_per_class must be in 1..{limit} (two disjoint sets of 10 n_per_class real digits "
                         f"for the baseline); got {n_per_class!r}")
    return torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)


def reference_digits(n: int) -> torch.Tensor:
    """The n real digits (n, 1, 32, 32) that score_digits compares samples with: drawn with seed 0 from all
    5,000 of MNIST-5k, the pool real_vs_real_fid draws its two sets from."""
    from ldm_scratch.data import MNIST5k  # imported here: sampling must not need the data to load
    from ldm_scratch.metrics import DIGIT_SHAPE
    real = MNIST5k("all", pad_to=DIGIT_SHAPE[1]).images
    return real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]]


def score_digits(samples: torch.Tensor, labels: torch.Tensor, classifier: nn.Module | None = None) -> dict[str, float]:
    """Digit samples (n, 1, 32, 32) in [-1, 1] asked for `labels` (n,): conditional accuracy, classifier-FID
    against n real digits and the real-vs-real FID at the same n (the floor FID can reach).

    The real digits are n drawn (seed 0) from all 5,000 of MNIST-5k, the pool real_vs_real_fid draws
    its two sets from, so the two FIDs are measured alike. Most of that pool is training data: a model
    that copied its training digits would also score near the floor, so read the FID beside the
    accuracy and the grids, not alone.
    """
    from ldm_scratch.metrics import classifier_fid, conditional_accuracy, load_classifier, real_vs_real_fid
    n = len(samples)
    classifier = classifier if classifier is not None else load_classifier()
    reference = reference_digits(n)
    return {"cond_acc": conditional_accuracy(samples, labels, classifier),
            "fid": classifier_fid(samples, reference, classifier),
            "fid_real_vs_real": real_vs_real_fid(n, classifier), "n": n}


def reconstruction(ae: Any, precision: str = "auto", batch_size: int = 256) -> Callable[[Tensor], Tensor]:
    """x -> decode(mode(encode(x))) in [-1, 1], batched: what the autoencoder can render of real images."""
    from ldm_scratch.device import autocast
    device = next(ae.parameters()).device

    @torch.no_grad()
    def rec(x: Tensor) -> Tensor:
        out = []
        for xb in x.split(batch_size):
            with autocast(device, precision):
                out.append(ae.decode(ae.encode(xb.to(device)).mode()).float().clamp(-1, 1).cpu())
        return torch.cat(out)  # (N, C, H, W) -> (N, C, H, W)
    return rec


def adherence_stats(rec: Callable[[Tensor], Tensor]) -> Any:
    """adherence.fit_adherence on the autoencoder's reconstructions: its decoder renders every sample scored,
    so its blur belongs in the statistics. A decoder that saturates a background pixel to full brightness
    (an untrained one does) leaves no ink scale (ink_floor = 1); the real images' statistics stand in then."""
    from ldm_scratch.adherence import fit_adherence
    stats = fit_adherence(transform=rec)
    if stats.ink_floor >= 1.0:
        print("adherence: the autoencoder's reconstructions reach full brightness on background pixels "
              "(untrained?); scoring with the statistics of the real images instead")
        return fit_adherence()
    return stats


def heldout_captions(k: int) -> tuple[list[str], Tensor]:
    """k held-out captions per digit (10 k) and their real images (10 k, 3, 32, 32): the prompts scored."""
    from ldm_scratch.data import N_CLASSES, ColoredDigits
    d = ColoredDigits("test")
    idx = torch.cat([torch.nonzero(d.labels == c).flatten()[:k] for c in range(N_CLASSES)])
    return [d.captions[i] for i in idx.tolist()], d.images[idx]


def adherence_at(pipe: Any, captions: list[str], w: float, stats: Any, steps: int, seed: int,
                 precision: str, sampler: str | None = None, eta: float = 0.0, second_stats: Any = None) -> dict:
    """Prompt adherence (adherence.py) of one sample per caption at guidance w (sampler None: the pipeline's
    default, its objective's first). With `second_stats` the same samples are also scored with those
    statistics (a second eye, e.g. the real images' when `stats` were refitted on reconstructions): its
    rates go under "second"."""
    x = pipe(prompt=captions, num_inference_steps=steps, guidance_scale=w, output_type="tensor", sampler=sampler,
             eta=eta, generator=torch.Generator(pipe.device).manual_seed(seed), precision=precision).images.cpu()
    return score_adherence(x, captions, stats, second_stats)


def score_adherence(x: Tensor, captions: list[str], stats: Any, second_stats: Any = None) -> dict:
    """adherence.prompt_adherence of images x (N, 3, 32, 32) against their captions; with `second_stats`, the
    same images scored again with those statistics, their four rates under "second"."""
    from ldm_scratch.adherence import prompt_adherence
    scores = prompt_adherence(x, captions, stats=stats)
    if second_stats is not None:
        second = prompt_adherence(x, captions, stats=second_stats)
        scores["second"] = {k: second[k] for k in ("digit_acc", "color_acc", "background_acc", "all_acc")}
    return scores


def evaluate_pipeline(pipe: Any, k: int, steps: int, w: float, seed: int = 0, precision: str = "auto") -> dict:
    """Score a trained pipeline at guidance w: class -> conditional accuracy and classifier-FID beside its
    real-vs-real floor (score_digits); text -> prompt adherence on 10 k held-out captions beside the
    same captions' real images through this autoencoder ("reconstructions"). Both read the decoded samples.

    The reconstructions' score is a reference, not a ceiling: a guided sample can score above it. Guidance
    pulls a sample towards the typical image of its caption (a clean stroke, a prototypical texture), while
    a reconstruction keeps every quirk of its real image (a faint stroke, a dark patch of grass) and adds the
    decoder's blur. The metric's true ceiling is its score on the real images (adherence.py: 0.98 / 1.00 /
    0.99 for digit / colour / background)."""
    from ldm_scratch.adherence import ink_map, prompt_adherence
    rec = reconstruction(pipe.autoencoder)  # "auto" (bf16 on CPU): the conv autoencoder's fast path
    stats = adherence_stats(rec) if pipe.autoencoder.cfg.in_channels == 3 else None
    if pipe.conditioning == "class":
        labels = eval_labels(k)
        x = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=w, output_type="tensor",
                 generator=torch.Generator(pipe.device).manual_seed(seed), precision=precision).images.cpu()
        if x.shape[1] == 3:  # coloured digits: the classifier reads the ink map (adherence.py), FID included
            x = ink_map((x + 1) / 2, stats.ink_floor) * 2 - 1  # (N, 3, 32, 32) -> (N, 1, 32, 32)
        return {"guidance_scale": w, "steps": steps, **score_digits(x, labels)}
    if pipe.conditioning == "text":
        captions, real = heldout_captions(k)
        return {"guidance_scale": w, "steps": steps,
                "adherence": adherence_at(pipe, captions, w, stats, steps, seed, precision),
                "reconstructions": prompt_adherence(rec(real), captions, stats=stats)}
    return {"note": "unconditional: nothing to score against (see samples/final.png)"}
