"""Stage 1 model: shapes, the Gaussian posterior's closed forms, input checks, model folders, and
a tiny overfit run (ldm_scratch/autoencoder.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ldm_scratch.autoencoder import AutoencoderKL, DiagonalGaussian, measure_scale_factor
from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.config import AUTOENCODER_PRESETS, AutoencoderConfig, get_preset


def tiny() -> AutoencoderConfig:
    return get_preset(AUTOENCODER_PRESETS, "tiny")


def smooth_images(n: int, channels: int = 3, size: int = 32) -> torch.Tensor:
    """Images an f=4 autoencoder can actually represent: 4x4 random colours, bilinearly upsampled."""
    return F.interpolate(torch.rand(n, channels, 4, 4) * 2 - 1, size=size, mode="bilinear", align_corners=False)


def random_gaussian(shape=(3, 4, 5, 5)) -> DiagonalGaussian:
    return DiagonalGaussian.from_mean_logvar(torch.randn(shape), torch.randn(shape))


# ---------------------------------------------------------------- shapes
def test_shapes_tiny():
    model = AutoencoderKL(tiny())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 4, 8, 8)  # f = 4 for the tiny preset's 3 levels
    assert posterior.logvar.shape == (2, 4, 8, 8)
    x_rec, post = model(x)
    assert x_rec.shape == x.shape
    assert model.decode(posterior.mode()).shape == x.shape
    assert model.last_layer is model.decoder.conv_out.weight


@pytest.mark.parametrize("ch_mult,f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_f_from_ch_mult(ch_mult, f):
    cfg = AutoencoderConfig(ch=8, ch_mult=ch_mult, num_res_blocks=1, norm_groups=4, in_channels=1)
    assert cfg.f == f
    z = AutoencoderKL(cfg).encode(torch.zeros(1, 1, 16, 16)).mode()
    assert z.shape == (1, 4, 16 // f, 16 // f)


def test_no_mid_attention_and_decoder_has_extra_block():
    cfg = tiny()
    cfg.mid_attention = False
    model = AutoencoderKL(cfg)
    assert not any("mid_attn" in k for k in model.state_dict())
    assert len(model.encoder.down[0].blocks) == cfg.num_res_blocks
    assert len(model.decoder.up[0].blocks) == cfg.num_res_blocks + 1  # LDM's decoder: one more per level
    assert model(torch.zeros(1, 3, 16, 16))[0].shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- the posterior
def test_kl_matches_torch_distributions():
    q = random_gaussian()
    ref = kl_divergence(Normal(q.mean, q.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert q.kl().shape == (3,)
    assert torch.allclose(q.kl(), ref, atol=1e-5, rtol=1e-5)
    p = random_gaussian()
    ref2 = kl_divergence(Normal(q.mean, q.std), Normal(p.mean, p.std)).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(p), ref2, atol=1e-4, rtol=1e-5)
    assert torch.allclose(q.kl(q), torch.zeros(3), atol=1e-5)


def test_nll_matches_torch_distributions():
    q = random_gaussian()
    x = torch.randn(q.mean.shape)
    ref = -Normal(q.mean, q.std).log_prob(x).sum(dim=(1, 2, 3))
    assert torch.allclose(q.nll(x), ref, atol=1e-4, rtol=1e-5)


def test_logvar_is_clamped():
    logvar = torch.tensor([-100.0, -10, 10, 100]).view(1, 1, 2, 2)
    q = DiagonalGaussian.from_mean_logvar(torch.zeros(1, 1, 2, 2), logvar)
    assert q.logvar.flatten().tolist() == [-30.0, -10.0, 10.0, 20.0]
    assert torch.isfinite(q.kl()).all() and torch.isfinite(q.var).all()


def test_sample_determinism_and_statistics():
    shape = (4, 4, 16, 16)
    mean, logvar = torch.full(shape, 1.5), torch.full(shape, math.log(0.25))  # std 0.5
    q = DiagonalGaussian.from_mean_logvar(mean, logvar)
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    c = q.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # 4096 draws: the mean's standard error is 0.5 / 64 ~ 0.008, so 0.03 is ~4 standard errors
    assert abs(a.mean().item() - 1.5) < 0.03
    assert abs(a.std().item() - 0.5) < 0.03
    assert torch.equal(q.mode(), q.mean)


def test_sample_is_reparameterised():
    mean = torch.zeros(1, 2, 2, 2, requires_grad=True)
    logvar = torch.zeros(1, 2, 2, 2, requires_grad=True)
    DiagonalGaussian.from_mean_logvar(mean, logvar).sample().sum().backward()
    assert mean.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_forward_generator_makes_it_deterministic():
    model = AutoencoderKL(tiny()).eval()
    x = torch.rand(1, 3, 16, 16)
    r1, _ = model(x, generator=torch.Generator().manual_seed(1))
    r2, _ = model(x, generator=torch.Generator().manual_seed(1))
    r3, _ = model(x, sample_posterior=False)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


# ---------------------------------------------------------------- bad input
def test_bad_input_messages():
    model = AutoencoderKL(tiny())
    with pytest.raises(ValueError, match=r"expected 3 image channel\(s\).*got 1"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"30x30 is not divisible by the downsampling factor f=4.*3 levels.*32x32"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*unsqueeze"):
        model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderKL(get_preset(AUTOENCODER_PRESETS, "small-f8")).encode(torch.zeros(1, 3, 30, 30))


def test_value_check_reads_no_values_while_compiling(monkeypatch):
    """Under torch.compile the range check (.item(), a graph break) is skipped; the shape checks stay."""
    model = AutoencoderKL(tiny())
    with pytest.raises(ValueError, match=r"values up to 5"):
        model.encode(torch.full((1, 3, 16, 16), 5.0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        model.encode(torch.full((1, 3, 16, 16), 5.0))   # no .item() call, so no error
    with pytest.raises(ValueError, match=r"expected 3 image channel\(s\)"):
        model.encode(torch.zeros(1, 1, 16, 16))


# ---------------------------------------------------------------- model folders
def test_save_load_round_trip(tmp_path):
    cfg = tiny()
    cfg.scale_factor = 0.3
    model = AutoencoderKL(cfg).eval()
    model.save_pretrained(tmp_path / "ae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    assert loaded.scale_factor == 0.3 and loaded.cfg == cfg
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, sample_posterior=False)[0], loaded(x, sample_posterior=False)[0])


def test_mismatched_weights_name_the_file(tmp_path):
    AutoencoderKL(tiny()).save_pretrained(tmp_path / "ae")
    import json
    cfg_file = tmp_path / "ae" / "config.json"
    d = json.loads(cfg_file.read_text())
    d["config"]["ch"] = 8  # the weights were saved at ch=16
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"model\.pt.*do not match") as err:
        AutoencoderKL.from_pretrained(tmp_path / "ae")
    assert "shape mismatch" in str(err.value)


def test_wrong_model_kind_in_config(tmp_path):
    AutoencoderKL(tiny()).save_pretrained(tmp_path / "ae")
    (tmp_path / "ae" / "config.json").write_text('{"model": "UNet", "config": {}}')
    with pytest.raises(CheckpointError, match=r"config\.json.*AutoencoderKL.*UNet"):
        AutoencoderKL.from_pretrained(tmp_path / "ae")


def test_truncated_weights(tmp_path):
    AutoencoderKL(tiny()).save_pretrained(tmp_path / "ae")
    pt = tmp_path / "ae" / "model.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt.*(corrupt|truncated)"):
        AutoencoderKL.from_pretrained(tmp_path / "ae")


# ---------------------------------------------------------------- scale factor
def test_measure_scale_factor_tensor_and_loader():
    model = AutoencoderKL(tiny())
    x = smooth_images(6)
    s_mode = measure_scale_factor(model, x, batch_size=4, sample_posterior=False)
    with torch.no_grad():
        z = model.encode(x).mode()
    assert math.isclose(s_mode, 1 / z.double().std().item(), rel_tol=1e-6)
    # a loader of (x, label) batches gives the same number
    loader = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(2))]
    assert math.isclose(measure_scale_factor(model, loader, sample_posterior=False), s_mode, rel_tol=1e-6)
    # samples (the default) are noisier than modes, so their std is larger and the factor smaller
    assert measure_scale_factor(model, x, generator=torch.Generator().manual_seed(0)) < s_mode
    assert model.training  # the mode is restored


# ---------------------------------------------------------------- it can learn
def test_tiny_overfit():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny())
    x = smooth_images(4, size=16)  # 16x16 keeps it ~3 s; the loss falls ~15x over seeds 0-2
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        x_rec, _ = model(x, sample_posterior=False)  # L1 only: no KL, so reconstruct from the mean
        loss = (x_rec - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
