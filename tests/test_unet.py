"""Tests for the U-Net denoiser (ldm_scratch/unet.py): shapes, zero init, conditioning, checks, bf16, overfit."""
import dataclasses

import pytest
import torch

from ldm_scratch.config import UNET_PRESETS, UNetConfig, get_preset
from ldm_scratch.unet import UNet

CONTEXT_DIM = 12  # a small text-encoder width for the cross-attention tests


def tiny(**changes) -> UNetConfig:
    return dataclasses.replace(get_preset(UNET_PRESETS, "tiny"), **changes)


def tiny_latent(**changes) -> UNetConfig:
    """The latent shape of the small-f4 autoencoder: 4 x 8 x 8."""
    return dataclasses.replace(get_preset(UNET_PRESETS, "tiny-latent"), **changes)


@torch.no_grad()
def randomise(model: UNet, scale: float = 0.1) -> UNet:
    """Move every weight off its init (zeros included) so that conditioning can show in the output."""
    for p in model.parameters():
        p.add_(scale * torch.randn_like(p))
    return model


def context_batch(B: int, N: int = 5) -> torch.Tensor:
    return torch.randn(B, N, CONTEXT_DIM)


# ------------------------------------------------------------------------------------------------
# Shapes and initialisation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_cfg, shape", [(tiny, (2, 1, 32, 32)), (tiny_latent, (2, 4, 8, 8))],
                         ids=["pixel", "latent"])
@pytest.mark.parametrize("conditioning", ["none", "class", "context"])
def test_output_shape_equals_input_shape(make_cfg, shape, conditioning):
    changes = {"none": {}, "class": {"num_classes": 10}, "context": {"context_dim": CONTEXT_DIM}}[conditioning]
    model = randomise(UNet(make_cfg(**changes)))
    x = torch.randn(shape)
    cond = {"none": None, "class": torch.tensor([3, 10]), "context": context_batch(2)}[conditioning]
    assert model(x, torch.tensor([10, 900]), cond).shape == x.shape


def test_output_is_exactly_zero_at_init():
    model = UNet(tiny(num_classes=10))
    out = model(torch.randn(3, 1, 32, 32), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert torch.equal(out, torch.zeros_like(out))


def test_gradients_reach_every_parameter_after_leaving_zero_init():
    # With zeroed residual branches, gradient spreads in stages: step 1 reaches only the output head
    # (its zero weights block everything upstream), after it the skip paths, after that everything.
    model = UNet(tiny(num_classes=3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, eps = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])  # every class row, the null one included

    def backward() -> dict[str, torch.Tensor]:
        opt.zero_grad()
        ((model(x, torch.tensor([1, 200, 500, 999]), labels) - eps) ** 2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    first = backward()
    assert {n for n, g in first.items() if g is not None and g.abs().sum() > 0} == {"conv_out.weight", "conv_out.bias"}
    opt.step()
    backward()
    opt.step()
    grads = backward()
    dead = [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    assert not dead, f"parameters without gradient after two steps: {dead}"


def test_channels_last_input_gives_the_same_output():
    model = randomise(UNet(tiny(context_dim=CONTEXT_DIM)))
    x, ctx = torch.randn(2, 1, 32, 32), context_batch(2)
    ref = model(x, 7, ctx)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), 7, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_scalar_t_is_broadcast_over_the_batch():
    model = randomise(UNet(tiny()))
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(model(x, 42), model(x, torch.full((3,), 42)))
    torch.testing.assert_close(model(x, torch.tensor(42)), model(x, torch.full((3,), 42)))


def test_presets_build_with_the_intended_sizes():
    sizes = {name: UNet(get_preset(UNET_PRESETS, name)).num_params() for name in UNET_PRESETS}
    assert sizes["tiny"] < 300_000  # seconds on a CPU
    assert 1_000_000 <= sizes["small"] <= 4_000_000  # the 20-minute MNIST teaching run


# ------------------------------------------------------------------------------------------------
# Conditioning
# ------------------------------------------------------------------------------------------------

def test_null_class_is_an_extra_embedding_row_used_when_cond_is_none():
    model = randomise(UNet(tiny(num_classes=10)))
    assert model.null_class == 10 and model.class_embed.num_embeddings == 11
    rows = model.class_embed.weight
    assert all(not torch.equal(rows[10], rows[k]) for k in range(10))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model(x, 300), model(x, 300, torch.tensor([10, 10])))


def test_class_label_changes_the_output():
    model = randomise(UNet(tiny(num_classes=10)))
    x = torch.randn(1, 1, 32, 32)
    outs = [model(x, 300, torch.tensor([k])) for k in (0, 1, 10)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert (outs[0] - outs[2]).abs().max() > 1e-3


def test_context_changes_the_output():
    model = randomise(UNet(tiny(context_dim=CONTEXT_DIM)))
    x = torch.randn(2, 1, 32, 32)
    assert (model(x, 300, context_batch(2)) - model(x, 300, context_batch(2))).abs().max() > 1e-3


def test_masked_context_tokens_have_no_effect():
    model = randomise(UNet(tiny(context_dim=CONTEXT_DIM)))
    x, ctx = torch.randn(2, 1, 32, 32), context_batch(2, N=6)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    changed = ctx.clone()
    changed[0, 4:] = 100 * torch.randn(2, CONTEXT_DIM)  # padding positions only
    changed[1, 2:] = 100 * torch.randn(4, CONTEXT_DIM)
    torch.testing.assert_close(model(x, 300, (changed, mask)), model(x, 300, (ctx, mask)), rtol=0, atol=1e-5)
    # An all-True mask is the same as no mask; a real token changed does move the output.
    torch.testing.assert_close(model(x, 300, (ctx, torch.ones(2, 6, dtype=torch.bool))), model(x, 300, ctx))
    assert (model(x, 300, (changed, torch.ones(2, 6, dtype=torch.bool))) - model(x, 300, ctx)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Input checks: each bad input raises ValueError with a message that names the problem
# ------------------------------------------------------------------------------------------------

def _bad_calls():
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    ctx = context_batch(2)
    return [
        # (conditioning, x, t, cond, message fragment)
        ("none", torch.randn(1, 32, 32), t, None, "4-D tensor"),
        ("none", torch.randn(2, 3, 32, 32), t, None, "expects in_channels=1"),
        ("none", torch.randn(2, 1, 31, 32), t, None, "divisible by 2"),
        ("none", x, torch.tensor([1, 2, 3]), None, "shape (B,) = (2,)"),
        ("none", x, torch.zeros(2, 1), None, "shape (B,) = (2,)"),
        ("none", x, t, torch.tensor([1, 2]), "unconditional"),
        ("class", x, t, torch.tensor([0, 11]), "labels must be in [0, 10]"),
        ("class", x, t, torch.tensor([-1, 0]), "labels must be in [0, 10]"),
        ("class", x, t, torch.tensor([0.0, 1.0]), "integer labels"),
        ("class", x, t, torch.tensor([0, 1, 2]), "labels must have shape (B,)"),
        ("context", x, t, None, "cond=None given"),
        ("context", x, t, torch.randn(2, 5, CONTEXT_DIM + 1), f"(B, N, {CONTEXT_DIM})"),
        ("context", x, t, torch.randn(3, 5, CONTEXT_DIM), "batch size 3 != x batch size 2"),
        ("context", x, t, (ctx, torch.ones(2, 4, dtype=torch.bool)), "mask must be bool of shape"),
        ("context", x, t, (ctx, torch.ones(2, 5)), "mask must be bool"),
        ("context", x, t, (ctx, torch.zeros(2, 5, dtype=torch.bool)), "at least one True"),
    ]


@pytest.mark.parametrize("conditioning, x, t, cond, message", _bad_calls(), ids=lambda v: None)
def test_bad_inputs_raise_value_error(conditioning, x, t, cond, message):
    changes = {"none": {}, "class": {"num_classes": 10}, "context": {"context_dim": CONTEXT_DIM}}[conditioning]
    model = UNet(tiny(**changes))
    with pytest.raises(ValueError, match=None) as info:
        model(x, t, cond)
    assert message in str(info.value)


def test_size_error_names_the_factor_and_a_valid_size():
    model = UNet(tiny(ch_mult=(1, 2, 2), attn_resolutions=(8,)))  # f = 4
    with pytest.raises(ValueError) as info:
        model(torch.randn(1, 1, 30, 28), 0)
    assert "divisible by 4" in str(info.value) and "32x28" in str(info.value)


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="match no level"):
        UNet(tiny(attn_resolutions=(12,)))
    with pytest.raises(ValueError, match="not both"):
        UNet(tiny(num_classes=10, context_dim=CONTEXT_DIM))


# ------------------------------------------------------------------------------------------------
# Precision and learning
# ------------------------------------------------------------------------------------------------

def test_bf16_autocast_forward_is_close_to_fp32():
    model = randomise(UNet(tiny(context_dim=CONTEXT_DIM)), scale=0.05)
    x, ctx = torch.randn(2, 1, 32, 32), context_batch(2)
    ref = model(x, torch.tensor([10, 700]), ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([10, 700]), ctx)
    # bf16 keeps 8 bits of mantissa (~0.4% per op); a dozen layers deep, a few % relative error is expected.
    assert torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref) < 0.05


def test_overfits_a_fixed_batch():
    # 8 blob "digits", noised at one fixed t with fixed eps: the model must learn to pull eps out of x_t.
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centres = 8 + 16 * torch.rand(8, 2, 2, generator=g)  # two blobs per image, away from the border
    blobs = sum(torch.exp(-((yy - centres[:, k, 0, None, None]) ** 2 + (xx - centres[:, k, 1, None, None]) ** 2) / 8)
                for k in range(2))
    x0 = (2 * blobs.clamp(max=1) - 1)[:, None]  # (8, 1, 32, 32) in [-1, 1]
    # Ho et al. 2020: linear betas 1e-4..0.02 over T = 1000; alpha_bar at t = 100 keeps most of x0.
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)[100]
    eps = torch.randn(x0.shape, generator=g)
    xt = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps  # Ho et al. 2020, Eq. 4
    model = UNet(tiny(num_classes=10))
    labels = torch.arange(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):  # a budget; it stops as soon as the loss has fallen 10x (about 20 steps)
        loss = ((model(xt, 100, labels) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[0] == pytest.approx((eps ** 2).mean().item())  # zero init: the first loss is E[eps^2]
    assert losses[-1] < losses[0] / 10, f"loss went {losses[0]:.3f} -> {losses[-1]:.3f} in 150 steps"
