"""Tests for ldm_scratch.metrics: closed forms for PSNR and the Frechet distance, the committed
classifier's held-out accuracy, FID sanity (real-vs-real << real-vs-noise), FLOP counting, bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from ldm_scratch import metrics
from ldm_scratch.metrics import (MNISTClassifier, classifier_features, classifier_fid, conditional_accuracy,
                                 count_flops, feature_statistics, frechet_distance, psnr, real_vs_real_fid, ssim)


def images(b=2, c=1, h=32, w=32):
    return torch.rand(b, c, h, w) * 2 - 1


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_is_inf():
    x = images()
    assert psnr(x, x) == math.inf


def test_psnr_closed_form():
    # A constant error e everywhere gives MSE = e^2, so PSNR = 10 log10(R^2 / e^2).
    x = torch.zeros(3, 1, 16, 16)
    e = 0.125  # exactly representable in float32, so the closed form holds to round-off
    assert psnr(x, x + e) == pytest.approx(10 * math.log10(2.0 ** 2 / e ** 2), rel=1e-9)
    # Per image then averaged: errors 0.25 and 0.5 give the mean of the two dB values.
    y = torch.stack([x[0] + 0.25, x[0] + 0.5])
    expected = (10 * math.log10(4 / 0.25 ** 2) + 10 * math.log10(4 / 0.5 ** 2)) / 2
    assert psnr(x[:2], y) == pytest.approx(expected, rel=1e-9)


def test_psnr_accepts_single_image():
    x = images(1)[0]  # (C, H, W)
    assert psnr(x, x.clamp(-0.5, 0.5)) > 0


def test_ssim_identical_is_one_and_noise_is_lower():
    x = images(2, 3)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, images(2, 3)) < 0.2


def test_psnr_ssim_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(images(2), images(3))
    with pytest.raises(ValueError, match="same shape"):
        ssim(images(2), images(2, 3))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(images(1, 1, 8, 8), images(1, 1, 8, 8))


# ----------------------------------------------------------------------------- Frechet distance


def random_psd(d, gen):
    a = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    return a @ a.T / (2 * d)


def test_frechet_identical_stats_is_zero():
    gen = torch.Generator().manual_seed(0)
    mu, s = torch.randn(16, generator=gen, dtype=torch.float64), random_psd(16, gen)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_closed_form():
    # Diagonal covariances commute, so Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2.
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected.item())
    # 1-D: the distance between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([3.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(4.0 + 1.0)


def newton_schulz_sqrt(m, iters=60):
    """Independent matrix square root: the coupled Newton-Schulz iteration (Higham 2008, Eq. 6.35)."""
    norm = torch.linalg.matrix_norm(m)
    y, z = m / norm, torch.eye(len(m), dtype=m.dtype)
    for _ in range(iters):
        t = (3 * torch.eye(len(m), dtype=m.dtype) - z @ y) / 2
        y, z = y @ t, t @ z
    return y * norm.sqrt()


def test_frechet_matches_newton_schulz_and_is_symmetric():
    gen = torch.Generator().manual_seed(1)
    d = 8
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    s1, s2 = random_psd(d, gen), random_psd(d, gen)
    # S1 S2 has positive real eigenvalues, so Newton-Schulz converges to its principal square root.
    brute = ((mu1 - mu2) ** 2).sum() + torch.trace(s1 + s2 - 2 * newton_schulz_sqrt(s1 @ s2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(brute.item(), rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_frechet_handles_singular_covariance():
    # Fewer samples than dimensions give a rank-deficient covariance: still finite, still >= 0.
    gen = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(5, 20, generator=gen), torch.randn(5, 20, generator=gen)
    d = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert math.isfinite(d) and d >= 0


def test_frechet_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# ----------------------------------------------------------------------------- the committed classifier


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_classifier()


@pytest.fixture(scope="module")
def heldout():
    data = pytest.importorskip("ldm_scratch.data")
    ds = data.MNIST5k(split="test", pad_to=32)
    return ds.images, ds.labels  # (500, 1, 32, 32) in [-1, 1], (500,) int64


def test_classifier_shapes():
    model = MNISTClassifier().eval()
    x = images(4)
    assert model(x).shape == (4, 10)
    assert model.features(x).shape == (4, 128)


def test_committed_classifier_is_frozen_and_accurate(classifier, heldout):
    assert not classifier.training
    assert not any(p.requires_grad for p in classifier.parameters())
    x, y = heldout
    acc = conditional_accuracy(x, y, classifier)
    assert acc >= 0.95
    # Asking for the wrong class (each label shifted by one) should almost never be "obeyed".
    assert conditional_accuracy(x, (y + 1) % 10, classifier) < 0.05


def test_real_vs_real_fid_is_small_next_to_noise(classifier, heldout):
    x, _ = heldout
    # Interleave, don't cut in half: the split is ordered by class, so halves hold different digits.
    real, reference = x[0::2], x[1::2]
    noise = torch.rand_like(real) * 2 - 1
    fid_real = classifier_fid(real, reference, classifier)
    fid_noise = classifier_fid(noise, reference, classifier)
    assert fid_real < 0.1 * fid_noise
    # The same floor from the package helper, on caller-given images.
    assert real_vs_real_fid(250, classifier, images=x) < 0.1 * fid_noise


def test_classifier_features_shape(classifier):
    assert classifier_features(images(3), classifier, batch_size=2).shape == (3, 128)


# ----------------------------------------------------------------------------- FLOPs and bad input


def test_count_flops_includes_attention_on_cpu():
    """The CPU fused attention kernel has no FLOP formula; count_flops must still count QK^T and AV."""
    from ldm_scratch import layers
    B, C, H, W = 2, 8, 4, 4
    attn = layers.SelfAttention2d(C, num_heads=2, groups=4)
    N = H * W
    linears = 4 * 2 * B * N * C * C            # q, k, v, proj_out: (B N, C) @ (C, C)
    scores_and_mix = 2 * (2 * B * N * N * C)   # QK^T and AV, summed over heads: 2 N N d per head
    assert count_flops(attn, torch.randn(B, C, H, W)) == linears + scores_and_mix
    assert not layers.PLAIN_ATTENTION_EVERYWHERE  # restored


def test_count_flops_linear():
    # FlopCounterMode counts a multiply-add as 2 FLOPs: (3, 10) @ (10, 20) = 2 * 3 * 10 * 20.
    assert count_flops(nn.Linear(10, 20), torch.randn(3, 10)) == 2 * 3 * 10 * 20


def test_bad_input_raises_clear_errors(classifier):
    x = images(4)
    with pytest.raises(ValueError, match="one label per sample"):
        conditional_accuracy(x, torch.zeros(3, dtype=torch.long), classifier)
    with pytest.raises(ValueError, match=r"labels in 0\.\.9"):
        conditional_accuracy(x, torch.full((4,), 10), classifier)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        classifier_features(images(4, 3), classifier)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        classifier_fid(images(4, 1, 28, 28), x, classifier)
    with pytest.raises(ValueError, match="empty"):
        classifier_fid(torch.empty(0, 1, 32, 32), x, classifier)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        classifier_features(x * 127.5 + 127.5, classifier)
    with pytest.raises(ValueError, match="NaN"):
        classifier_features(torch.full((2, 1, 32, 32), float("nan")), classifier)
    with pytest.raises(ValueError, match="n must be"):
        real_vs_real_fid(300, classifier, images=x)


def test_second_eye_distance_ranks_like_the_classifier():
    """The independent judge (perceptual net features): 0 for a set against itself, small for two real sets,
    large for noise; the real-vs-real floor through `eye=` matches a direct call on the same two sets."""
    from ldm_scratch.data import MNIST5k
    from ldm_scratch.metrics import real_vs_real_fid, second_eye_distance
    real = MNIST5k("all", pad_to=32).images
    a, b = real[:200].float(), real[200:400].float()
    noise = torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert second_eye_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert second_eye_distance(noise, b) > 10 * second_eye_distance(a, b)
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    floor = real_vs_real_fid(100, eye=second_eye_distance)
    assert floor == pytest.approx(second_eye_distance(real[order[:100]].float(), real[order[100:200]].float()))
    with pytest.raises(ValueError):
        second_eye_distance(torch.zeros(4, 3, 32, 32), b)


def test_evaluation_helpers_have_one_home():
    """evaluation.py holds them; stage2 and cli.stage3 re-export the same objects for older imports."""
    import ldm_scratch.cli.stage3 as cli3
    import ldm_scratch.stage2 as stage2
    from ldm_scratch import evaluation
    for name in ("eval_labels", "reference_digits", "score_digits", "evaluate"):
        assert getattr(stage2, name) is getattr(evaluation, name)
    for name in ("reconstruction", "adherence_stats", "heldout_captions", "adherence_at", "evaluate_pipeline"):
        assert getattr(cli3, name) is getattr(evaluation, name)
    assert stage2.SAMPLE_STEPS == evaluation.SAMPLE_STEPS
