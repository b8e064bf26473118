"""Tests for the Diffusion Transformer (ldm_scratch/dit.py): patchify, positions, adaLN-Zero init, the paper's
sizes, conditioning modes, input checks, overfitting, and parity with diffusers' DiTTransformer2DModel."""
import dataclasses
import math

import pytest
import torch

from ldm_scratch.config import DIT_PRESETS, DiTConfig, get_preset
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.dit import COND_MODES, DiT, patchify, sincos_pos_embed_2d, unpatchify

CONTEXT_DIM = 12  # a small text-encoder width for the context tests
NUM_CLASSES = 10


def tiny(**changes) -> DiTConfig:
    return dataclasses.replace(get_preset(DIT_PRESETS, "dit-tiny"), **changes)


@torch.no_grad()
def randomise(model: DiT, scale: float = 0.1) -> DiT:
    """Move every weight off its init (zeros included) so that conditioning can show in the output."""
    for p in model.parameters():
        p.add_(scale * torch.randn_like(p))
    return model


def make_cond(kind: str, B: int, M: int = 5):
    """Labels (B,), a context (B, M, D_ctx), or (context, mask) with the last two tokens of row 0 padding."""
    if kind == "labels":
        return torch.arange(B) % NUM_CLASSES
    context = torch.randn(B, M, CONTEXT_DIM)
    if kind == "context":
        return context
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, -2:] = False
    return context, mask


def cond_cfg(kind: str, mode: str) -> DiTConfig:
    changes = {"num_classes": NUM_CLASSES} if kind == "labels" else {"context_dim": CONTEXT_DIM}
    return tiny(cond_mode=mode, **changes)


# ------------------------------------------------------------------------------------------------
# Patches and positions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("P, H, W", [(2, 8, 8), (4, 8, 12), (1, 3, 5)])
def test_patchify_unpatchify_round_trip(P, H, W):
    x = torch.randn(2, 3, H, W)
    tokens = patchify(x, P)
    assert tokens.shape == (2, (H // P) * (W // P), P * P * 3)
    assert torch.equal(unpatchify(tokens, P, H // P, W // P), x)
    # token 1 is the second patch of the first row: pixels [0:P, P:2P]
    assert torch.equal(tokens[:, 1].view(2, P, P, 3), x[:, :, :P, P:2 * P].permute(0, 2, 3, 1))


def test_patch_embedding_conv_is_a_linear_on_flattened_patches():
    model = DiT(tiny())
    x = torch.randn(2, 4, 8, 8)
    conv = model.patch_embed(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
    w = model.patch_embed.weight.permute(0, 2, 3, 1).reshape(model.cfg.hidden_size, -1)  # (D, P*P*C), (p1 p2 c)
    linear = patchify(x, 2) @ w.T + model.patch_embed.bias
    assert torch.allclose(conv, linear, atol=1e-5)


def test_position_embedding_matches_the_closed_form():
    D, h, w = 16, 3, 5
    table = sincos_pos_embed_2d(D, h, w)  # (h w, D)
    assert table.shape == (h * w, D)
    q = D // 4  # frequencies per (axis, sin/cos) quarter
    for y, x in [(0, 0), (1, 3), (2, 4)]:
        row = table[y * w + x]
        for k in range(q):
            omega = 10000.0 ** (-k / q)  # Vaswani et al. 2017: w_k = 10000^(-2k / d) with d = D/2 per axis
            expected = [math.sin(x * omega), math.cos(x * omega), math.sin(y * omega), math.cos(y * omega)]
            got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]
            assert [float(g) for g in got] == pytest.approx(expected, abs=1e-6)


def test_position_embedding_is_a_fixed_buffer_not_a_parameter():
    model = DiT(tiny())
    assert "pos_embed" in dict(model.named_buffers())
    assert all("pos_embed" not in name for name, _ in model.named_parameters())
    assert torch.equal(model.pos_embed, sincos_pos_embed_2d(32, 4, 4))


# ------------------------------------------------------------------------------------------------
# adaLN-Zero initialisation and the paper's sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", COND_MODES)
@pytest.mark.parametrize("kind", ["labels", "masked"])
def test_every_block_is_the_identity_and_the_output_zero_at_init(mode, kind):
    model = DiT(cond_cfg(kind, mode))
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    context = torch.randn(2, 1, 32) if kind == "labels" else torch.randn(2, 5, CONTEXT_DIM)
    for block in model.blocks:
        ctx = context if block.cross_attn is not None else None
        assert torch.equal(block(tokens, c, ctx), tokens)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), make_cond(kind, 2))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name, paper_millions", [("S", 33), ("B", 130), ("L", 458), ("XL", 675)])
def test_paper_configs_match_the_papers_parameter_counts(name, paper_millions):
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = DiT(get_preset(DIT_PRESETS, f"DiT-{name}/2"))
    # Peebles & Xie 2023, Table 1 / Fig. 2 (paper numbers are rounded to 1M)
    assert model.num_params() / 1e6 == pytest.approx(paper_millions, rel=0.01)


def test_presets_exist_and_the_small_ones_build():
    for size in ("S", "B", "L", "XL"):
        for P in (2, 4, 8):
            assert get_preset(DIT_PRESETS, f"DiT-{size}/{P}").patch_size == P
    assert DiT(tiny()).num_params() < 100_000
    assert 0.8e6 < DiT(get_preset(DIT_PRESETS, "dit-small-latent")).num_params() < 1.5e6
    with pytest.raises(ValueError, match="valid presets"):
        get_preset(DIT_PRESETS, "DiT-M/2")


def test_learn_sigma_doubles_the_output_channels():
    model = DiT(tiny(learn_sigma=True))
    assert model(torch.randn(2, 4, 8, 8), 10).shape == (2, 8, 8, 8)


# ------------------------------------------------------------------------------------------------
# Conditioning
# ------------------------------------------------------------------------------------------------

def test_null_label_is_row_num_classes_and_used_when_cond_is_none():
    model = randomise(DiT(tiny(num_classes=NUM_CLASSES)))
    assert model.null_class == NUM_CLASSES and model.y_embedder.table.num_embeddings == NUM_CLASSES + 1
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999])
    assert torch.equal(model(x, t, None), model(x, t, torch.full((3,), NUM_CLASSES)))
    assert not torch.allclose(model(x, t, None), model(x, t, torch.tensor([0, 1, 2])))
    assert DiT(tiny()).null_class is None


@pytest.mark.parametrize("mode", COND_MODES)
@pytest.mark.parametrize("kind", ["labels", "context", "masked"])
def test_every_cond_mode_runs_and_the_condition_changes_the_output(mode, kind):
    model = randomise(DiT(cond_cfg(kind, mode)))
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999])
    cond = make_cond(kind, 4)
    out = model(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    other = (cond + 1) % NUM_CLASSES if kind == "labels" else make_cond(kind, 4)
    assert not torch.allclose(out, model(x, t, other))


@pytest.mark.parametrize("mode", COND_MODES)
def test_masked_context_tokens_have_no_effect(mode):
    model = randomise(DiT(cond_cfg("masked", mode)))
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([5, 50, 500, 900])
    context, mask = make_cond("masked", 4)
    changed = context.clone()
    changed[0, -2:] = 100 * torch.randn(2, CONTEXT_DIM)  # only the padding of row 0
    assert torch.allclose(model(x, t, (context, mask)), model(x, t, (changed, mask)), atol=1e-6)


def test_scalar_t_is_broadcast_and_other_sizes_work():
    model = randomise(DiT(tiny(num_classes=NUM_CLASSES)))
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    assert torch.equal(model(x, 123, y), model(x, torch.tensor([123, 123]), y))
    assert model(torch.randn(2, 4, 12, 16), 5, y).shape == (2, 4, 12, 16)  # 6 x 8 tokens, positions rebuilt


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------

B2 = torch.randn(2, 4, 8, 8)


@pytest.mark.parametrize("conditioning, x, t, cond, message", [
    ("none", torch.randn(4, 8, 8), 1, None, "4-D tensor"),
    ("none", torch.randn(2, 3, 8, 8), 1, None, "in_channels=4"),
    ("none", B2, torch.tensor([1, 2, 3]), None, r"shape \(B,\)"),
    ("none", B2, 1, torch.tensor([1, 2]), "unconditional"),
    ("class", B2, 1, torch.randn(2), "integer labels"),
    ("class", B2, 1, torch.tensor([1, 2, 3]), r"labels must have shape \(B,\)"),
    ("class", B2, 1, torch.tensor([1, 11]), r"\[0, 10\]"),
    ("context", B2, 1, None, "empty prompt"),
    ("context", B2, 1, torch.randn(2, 5, 7), f"context must have shape .B, M, {CONTEXT_DIM}"),
    ("context", B2, 1, torch.randn(3, 5, CONTEXT_DIM), "batch size"),
    ("context", B2, 1, (torch.randn(2, 5, CONTEXT_DIM), torch.ones(2, 5)), "mask must be bool"),
    ("context", B2, 1, (torch.randn(2, 5, CONTEXT_DIM), torch.zeros(2, 5, dtype=torch.bool)), "at least one True"),
])
def test_bad_inputs_raise_value_error(conditioning, x, t, cond, message):
    changes = {"none": {}, "class": {"num_classes": NUM_CLASSES}, "context": {"context_dim": CONTEXT_DIM}}
    with pytest.raises(ValueError, match=message):
        DiT(tiny(**changes[conditioning]))(x, t, cond)


def test_size_not_divisible_by_the_patch_size_is_named_with_valid_sizes():
    with pytest.raises(ValueError, match=r"9x10 is not divisible by patch_size P=2.*8x10 or 10x10"):
        DiT(tiny())(torch.randn(1, 4, 9, 10), 1)
    with pytest.raises(ValueError, match="sample_size.*not divisible by patch_size P=4"):
        DiT(tiny(sample_size=10, patch_size=4))


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="cond_mode"):
        DiT(tiny(cond_mode="film"))
    with pytest.raises(ValueError, match="not both"):
        DiT(tiny(num_classes=10, context_dim=8))
    with pytest.raises(ValueError, match="num_heads"):
        DiT(tiny(hidden_size=30, num_heads=4))


# ------------------------------------------------------------------------------------------------
# Numerics and training
# ------------------------------------------------------------------------------------------------

def test_bf16_autocast_forward_is_close_to_fp32():
    model = randomise(DiT(tiny(num_classes=NUM_CLASSES)), 0.05)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 10, 100, 999]), torch.arange(4)
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert torch.linalg.vector_norm(out.float() - ref) / torch.linalg.vector_norm(ref) < 0.05


@pytest.mark.parametrize("mode", COND_MODES)
def test_overfits_a_fixed_batch_with_the_diffusion_loss(mode):
    # A fixed (x0, t, eps): the regression target is fixed, so a working model drives the loss down fast.
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 4, 8, 8, generator=g) * 2 - 1
    t = torch.full((8,), 100)  # alpha_bar_100 ~ 0.89: x_t still holds most of x0
    eps = torch.randn(x0.shape, generator=g)
    labels = torch.arange(8)
    diffusion = GaussianDiffusion()
    model = DiT(tiny(num_classes=NUM_CLASSES, cond_mode=mode))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):  # a budget; it stops as soon as the loss has fallen 5x
        loss = diffusion.loss(model, x0, labels, t=t, eps=eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 5:
            break
    assert losses[0] == pytest.approx((eps ** 2).mean().item())  # zero init: the first loss is E[eps^2]
    assert losses[-1] < losses[0] / 5, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"


# ------------------------------------------------------------------------------------------------
# Parity with diffusers (Apache-2.0), behind importorskip
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_matches_diffusers_dit_transformer():
    diffusers = pytest.importorskip("diffusers")
    cfg = tiny(num_classes=NUM_CLASSES, learn_sigma=True)
    ours = randomise(DiT(cfg)).eval()
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6,  # its MLP-side LayerNorm defaults to 1e-5; DiT uses 1e-6 everywhere
    ).eval()  # eval: its LabelEmbedding drops labels to the null row (index num_classes) in training mode
    sd = {"pos_embed.proj.weight": ours.patch_embed.weight, "pos_embed.proj.bias": ours.patch_embed.bias,
          "proj_out_1.weight": ours.final_layer.adaLN_modulation[1].weight,
          "proj_out_1.bias": ours.final_layer.adaLN_modulation[1].bias,
          "proj_out_2.weight": ours.final_layer.linear.weight, "proj_out_2.bias": ours.final_layer.linear.bias}
    for i, block in enumerate(ours.blocks):
        pairs = {  # diffusers gives every block its own copy of the t and label embedders: copy ours into each
            "norm1.emb.timestep_embedder.linear_1": ours.t_embedder.mlp[0],
            "norm1.emb.timestep_embedder.linear_2": ours.t_embedder.mlp[2],
            "norm1.linear": block.adaLN_modulation[1], "attn1.to_q": block.attn.q, "attn1.to_k": block.attn.k,
            "attn1.to_v": block.attn.v, "attn1.to_out.0": block.attn.proj,
            "ff.net.0.proj": block.mlp[0], "ff.net.2": block.mlp[2]}
        for name, layer in pairs.items():
            sd[f"transformer_blocks.{i}.{name}.weight"] = layer.weight
            sd[f"transformer_blocks.{i}.{name}.bias"] = layer.bias
        sd[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = ours.y_embedder.table.weight
        # diffusers' DiT spaces the t frequencies as 10000^(-k / (half - 1)) (downscale_freq_shift=1);
        # DiT's code and layers.timestep_embedding use 10000^(-k / half). Align it to compare the rest.
        ref.transformer_blocks[i].norm1.emb.time_proj.downscale_freq_shift = 0
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999])
    labels = torch.tensor([1, 7, NUM_CLASSES])  # the last one is the null label in both conventions
    expected = ref(x, timestep=t, class_labels=labels).sample
    assert expected.shape == (3, 8, 8, 8)
    assert torch.allclose(ours(x, t, labels), expected, atol=1e-5, rtol=1e-4)
