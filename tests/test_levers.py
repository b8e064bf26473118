"""Every speed lever the benchmark suite (ldm_scratch/bench.py) times must compute the same function as fp32:
bf16 autocast within a measured bound, channels_last and batched classifier-free guidance to float rounding,
and layers.attention's plain-matmul path (the CPU bf16 default) equal to F.scaled_dot_product_attention."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ldm_scratch import layers
from ldm_scratch.bench import fused_attention_patch
from ldm_scratch.bench_cases import NUM_CLASSES, TwoForwardCFG, lever_models
from ldm_scratch.config import UNET_PRESETS, get_preset
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.unet import UNet

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ~ 0.0039 per rounding. Autocast rounds the inputs of
# every conv/matmul, and the errors of a chain of such layers add up: measured relative errors (norm of the
# difference / norm of the fp32 output, random weights, tiny and small presets) were 0.005 (DiT) to 0.027
# (autoencoder, the longest chain of convs), i.e. 1-7 u. The bound, 0.05 ~ 13 u, is ~2x the worst measured.
BF16_REL_TOL = 0.05
# fp32 keeps 24 significant bits (u = 2^-24 ~ 6e-8), but a conv or matmul sums hundreds of products, and another
# batch size or memory layout picks another kernel blocking, hence another summation order: an output moves by the
# rounding of its *largest* terms, not of itself, so an element near zero can differ by 100% relative while the
# function is the same (rtol=1e-5 failed on an AMD EPYC: 2.6e-5 absolute, 5e-3 relative at one small element).
# So we compare with an atol scaled to the output's magnitude: |out - ref| <= FP32_REORDER_TOL * max|ref|.
# Measured max|out - ref| / max|ref| (tiny presets, random weights, AMD EPYC, 1 and 2 threads, 4 inputs): 1e-6 to
# 3e-6; the failure above was 9e-6 (batched CFG at w = 3, which amplifies differences by 2w - 1 = 5). The bound is
# ~10x that, and ~300x below the smallest wrong guidance formula measured (w - 1 for w: 0.03 on the DiT at init,
# whose class signal is the weakest); test_batched_cfg_equals_two_separate_forwards checks that margin.
FP32_REORDER_TOL = 1e-4
MODELS = lever_models(quick=True)  # the tiny presets the quick benchmark times


def randomise(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every weight: zero-initialised output layers would make every output 0 and every test pass."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def forward_fn(name: str, model, batch):
    if name.startswith("AE"):
        return lambda x: model(x, sample_posterior=False)[0]
    return lambda x: model(x, batch[2], batch[1])


def assert_same_up_to_summation_order(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=0, atol=FP32_REORDER_TOL * ref.abs().max().item())


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref)).item()


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_bf16_autocast_forward_is_within_the_measured_bound(name):
    model, batch_fn, _, _ = MODELS[name]
    model, batch = randomise(model), batch_fn("cpu")
    f = forward_fn(name, model, batch)
    ref = f(batch[0])
    assert ref.abs().max() > 0.1  # a real output, not the zero-init one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = f(batch[0])
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_attention_patch():
        fused = f(batch[0])
    assert plain.dtype == torch.bfloat16 or name.startswith("AE")  # autocast really was on
    assert rel_error(plain, ref) < BF16_REL_TOL
    assert rel_error(fused, ref) < BF16_REL_TOL


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if m[3]])  # the convolutional models
@torch.no_grad()
def test_channels_last_matches_fp32(name):
    model, batch_fn, _, _ = MODELS[name]
    model, batch = randomise(model), batch_fn("cpu")
    ref = forward_fn(name, model, batch)(batch[0])
    model = model.to(memory_format=torch.channels_last)
    out = forward_fn(name, model, batch)(batch[0].contiguous(memory_format=torch.channels_last))
    assert_same_up_to_summation_order(out, ref)


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("AE")])
@torch.no_grad()
def test_batched_cfg_equals_two_separate_forwards(name):
    model, w = randomise(MODELS[name][0]), 3.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, model.cfg.in_channels, model.cfg.sample_size, model.cfg.sample_size, generator=g)
    t, labels, diffusion = torch.tensor([5, 500, 999]), torch.tensor([0, 3, 9]), GaussianDiffusion()
    batched = diffusion.guided_eps(model, x, t, labels, NUM_CLASSES, guidance_scale=w)
    separate = diffusion.guided_eps(TwoForwardCFG(model), x, t, labels, NUM_CLASSES, guidance_scale=w)
    assert_same_up_to_summation_order(batched, separate)
    # the tolerance is not vacuous: each plausible slip in Ho & Salimans' Eq. 6 is rejected by the same check
    null = torch.full_like(labels, NUM_CLASSES)
    eps_cond, eps_uncond = TwoForwardCFG(model)(torch.cat([x, x]), torch.cat([t, t]),
                                                torch.cat([labels, null])).chunk(2)  # (2B, C, H, W) -> 2 x (B, ...)
    assert_same_up_to_summation_order(eps_uncond + w * (eps_cond - eps_uncond), separate)  # the right formula
    wrong = {"w and 1 - w swapped": (1 - w) * eps_cond + w * eps_uncond,
             "null branch dropped": eps_cond,
             "the paper's w used as ours (off by one)": eps_uncond + (w - 1) * (eps_cond - eps_uncond)}
    for slip, eps in wrong.items():
        try:
            assert_same_up_to_summation_order(eps, separate)
        except AssertionError:
            continue
        pytest.fail(f"the tolerance lets a wrong guidance formula pass: {slip}")


@torch.no_grad()
def test_batched_cfg_equals_two_forwards_with_a_masked_context():
    cfg = dataclasses.replace(get_preset(UNET_PRESETS, "tiny-latent"), context_dim=8)
    model = randomise(UNet(cfg))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    context, mask = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True, True, False, False, False]])
    null = (torch.zeros(1, 5, 8), torch.ones(1, 5, dtype=torch.bool))
    diffusion = GaussianDiffusion()
    batched = diffusion.guided_eps(model, x, t, (context, mask), null, guidance_scale=2.0)
    separate = diffusion.guided_eps(TwoForwardCFG(model), x, t, (context, mask), null, guidance_scale=2.0)
    assert_same_up_to_summation_order(batched, separate)


@pytest.mark.parametrize("masked", [False, True])
def test_plain_attention_equals_sdpa_values_and_gradients(masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = (torch.rand(2, 1, 1, 16, generator=g) > 0.3) | (torch.arange(16) == 0) if masked else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = layers.attention(q, k, v, mask, plain=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert_same_up_to_summation_order(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_same_up_to_summation_order(a, b)


def test_plain_attention_is_the_cpu_bf16_default_and_the_patch_restores_it():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).bfloat16() for _ in range(3))
    plain = layers.attention(q, k, v, plain=True)
    assert torch.equal(layers.attention(q, k, v), plain)  # auto picks the plain path for CPU bf16
    with fused_attention_patch():
        assert not layers.CPU_BF16_PLAIN_ATTENTION
        fused = layers.attention(q, k, v)
    assert layers.CPU_BF16_PLAIN_ATTENTION
    # both in bf16: agree to bf16 rounding (2^-8 relative, a few roundings deep)
    torch.testing.assert_close(fused.float(), plain.float(), atol=0.03, rtol=0.03)


def test_attention_without_autograd_by_map_size(monkeypatch):
    """Under no_grad on the CPU in bf16: maps of NO_GRAD_BF16_SOFTMAX_MIN_PAIRS..MAX_PAIRS query x key pairs (the
    latent U-Net's 8 x 8 = 64 positions) take the plain matmuls with the softmax left in bf16, larger maps the fused
    kernel, smaller ones the plain path with the fp32 softmax (each the fastest, measured); with autograd on, the
    plain fp32-softmax path for all three."""
    calls = []
    real_sdpa = layers.F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", counting_sdpa)
    g = torch.Generator().manual_seed(0)
    qkv = {n: [torch.randn(2, 2, n, 8, generator=g).bfloat16() for _ in range(3)] for n in (16, 64, 128)}
    assert 16 * 16 < layers.NO_GRAD_BF16_SOFTMAX_MIN_PAIRS <= 64 * 64 <= layers.NO_GRAD_BF16_SOFTMAX_MAX_PAIRS < 128 * 128
    for n in qkv:
        layers.attention(*qkv[n])
    assert calls == []  # with autograd on: the plain path for all
    with torch.no_grad():
        out = {n: layers.attention(*qkv[n]) for n in qkv}
        assert calls == [128]  # only the 128-token map was fused
        plain = {n: layers.attention(*qkv[n], plain=True) for n in qkv}
    torch.testing.assert_close(out[128].float(), plain[128].float(), atol=0.03, rtol=0.03)
    assert torch.equal(out[16], plain[16])


def test_softmax_in_bf16_equals_softmax_in_fp32_then_rounded():
    """Why the no-grad path may skip the fp32 copy of the scores: torch's CPU softmax of a bf16 tensor accumulates
    in fp32 and rounds once, so it matches softmax(scores.float()).bfloat16() (to one bf16 rounding: exp and the
    division may be vectorised differently on another CPU), and so does the attention built on it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(4, 4, 64, 12, generator=g) * 3).bfloat16() for _ in range(3))
    scores = (q @ k.transpose(-2, -1)) * 12 ** -0.5
    torch.testing.assert_close(scores.softmax(-1).float(), scores.float().softmax(-1).bfloat16().float(),
                               atol=0, rtol=2 ** -8)
    with torch.no_grad():
        fast = layers.attention(q, k, v)  # 4096 pairs: the bf16-softmax path
    ref = layers._plain(q, k, v, None, bf16_softmax=False)
    torch.testing.assert_close(fast.float(), ref.float(), atol=2 ** -6, rtol=2 ** -7)
