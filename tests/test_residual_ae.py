"""Residual autoencoding (AutoencoderConfig.shortcut = "residual"; autoencoder.py, layers.py): the shortcuts
are parameter-free, a model with its branches zeroed is exactly the non-learned codec (checked against
F.avg_pool2d and nearest interpolation written here), shapes for f = 4, 8, 16 and c = 4, 16, model folders
(old folders without the field load as "none"), config errors, presets, and one CLI run."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_scratch.autoencoder import (RESIDUAL_LOGVAR, AutoencoderKL, residual_branch_ends,
                                     zero_residual_branches)
from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.config import AUTOENCODER_PRESETS, AutoencoderConfig, get_preset
from ldm_scratch.layers import ChannelShortcut, channel_to_space_shortcut, space_to_channel_shortcut


def cfg(shortcut="residual", C=3, ch=16, ch_mult=(1, 2, 2), c=4, **kw) -> AutoencoderConfig:
    return AutoencoderConfig(in_channels=C, ch=ch, ch_mult=ch_mult, num_res_blocks=1, z_channels=c,
                             norm_groups=8, shortcut=shortcut, **kw)


def perturb(model: nn.Module) -> nn.Module:
    """Random weights everywhere, as after training."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def codec(x: torch.Tensor, f: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-learned codec, written independently: latent channel k = the f x f block means of image
    channel k mod C; the decoder paints each block mean back over its block."""
    C = x.shape[1]
    small = F.avg_pool2d(x, f)  # (B, C, H/f, W/f)
    z = small[:, [k % C for k in range(c)]]  # (B, c, H/f, W/f)
    return z, F.interpolate(small, scale_factor=f, mode="nearest")


# ---------------------------------------------------------------- the shortcuts
def test_space_and_channel_shortcuts_are_area_mean_and_nearest():
    h = torch.randn(2, 5, 8, 6)
    assert torch.allclose(space_to_channel_shortcut(h), F.avg_pool2d(h, 2), atol=1e-6)
    assert torch.equal(channel_to_space_shortcut(h), F.interpolate(h, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("a,b,period", [(8, 3, 1), (3, 8, 1), (32, 64, 1), (64, 32, 1), (32, 3, 3), (3, 32, 3),
                                        (32, 64, 3), (64, 32, 3), (4, 32, 3), (32, 4, 3), (16, 16, 3)])
def test_channel_shortcut_closed_form(a, b, period):
    """out = tile_b(fold_m(h)), m = period * floor(min(a, b) / period), checked element by element."""
    h = torch.randn(2, a, 3, 3)
    m = period * (min(a, b) // period)
    folded = torch.stack([h[:, [j for j in range(a) if j % m == k]].mean(1) for k in range(m)], dim=1)
    ref = folded[:, [k % m for k in range(b)]]
    out = ChannelShortcut(a, b, period)(h)
    assert out.shape == (2, b, 3, 3)
    assert torch.allclose(out, ref, atol=1e-6)
    # colour rule: channels holding "their colour" (k mod period) come out holding theirs
    colours = torch.arange(a).remainder(period).float().view(1, a, 1, 1).expand(1, a, 2, 2)
    assert torch.equal(ChannelShortcut(a, b, period)(colours)[0, :, 0, 0], torch.arange(b).remainder(period).float())


def test_channel_shortcut_needs_a_channel_per_colour():
    with pytest.raises(ValueError, match="needs both widths >= 3"):
        ChannelShortcut(2, 8, 3)


def test_shortcuts_are_parameter_free():
    """residual = none minus every 1x1 conv (the width-changing skips, quant_conv, post_quant_conv), and
    the shortcuts leave nothing in the state_dict."""
    for kw in (dict(), dict(C=1), dict(ch_mult=(1, 2, 2, 4), c=16)):
        none, res = AutoencoderKL(cfg("none", **kw)), AutoencoderKL(cfg("residual", **kw))
        one_by_one = sum(p.numel() for m in none.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                         for p in m.parameters())
        assert one_by_one > 0
        count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
        assert count(none) - count(res) == one_by_one
        assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in res.modules())
        assert set(res.state_dict()) <= set(none.state_dict())
        assert all(not any(True for _ in m.parameters()) for m in res.modules() if isinstance(m, ChannelShortcut))


# ---------------------------------------------------------------- the non-learned codec
@pytest.mark.parametrize("C,ch,ch_mult,c", [(3, 16, (1, 2, 2), 4), (3, 16, (1, 2, 2, 2), 4), (1, 16, (1, 2, 2), 4),
                                            (3, 16, (1, 2, 2, 2, 4), 16), (3, 8, (1, 1, 2), 5)])
def test_zeroed_branches_are_exactly_the_codec(C, ch, ch_mult, c):
    """Fresh (init_weights) and after training-like weights then zero_residual_branches: encode gives the
    block means replicated into the latent channels (logvar L0), decode the nearest upsampling."""
    fresh = AutoencoderKL(cfg(C=C, ch=ch, ch_mult=ch_mult, c=c)).eval()
    zeroed = zero_residual_branches(perturb(AutoencoderKL(cfg(C=C, ch=ch, ch_mult=ch_mult, c=c)))).eval()
    f = fresh.cfg.f
    x = torch.rand(2, C, 2 * f, 3 * f) * 2 - 1
    z_ref, x_ref = codec(x, f, c)
    for model in (fresh, zeroed):
        with torch.no_grad():
            posterior = model.encode(x)
            assert torch.allclose(posterior.mean, z_ref, atol=1e-6)
            assert torch.allclose(posterior.logvar, torch.full_like(z_ref, RESIDUAL_LOGVAR))
            assert torch.allclose(model.decode(posterior.mode()), x_ref, atol=1e-6)
            assert torch.allclose(model(x, sample_posterior=False)[0], x_ref, atol=1e-6)


@pytest.mark.parametrize("C,ch_mult,c", [(3, (1, 2, 2, 2), 4), (1, (1, 2, 2), 4)])
def test_bicubic_up_shortcut_decodes_by_repeated_bicubic_doubling(C, ch_mult, c):
    """up_shortcut="bicubic": with the branches zeroed the encoder is unchanged (block means) and the decoder
    doubles the block means by bicubic interpolation once per level (channel copies and means commute with it);
    the SD layout refuses the option, and an unknown mode lists the valid ones."""
    model = zero_residual_branches(perturb(AutoencoderKL(cfg(C=C, ch_mult=ch_mult, c=c, up_shortcut="bicubic")))).eval()
    f = model.cfg.f
    x = torch.rand(2, C, 2 * f, 3 * f) * 2 - 1
    z_ref, _ = codec(x, f, c)
    x_ref = F.avg_pool2d(x, f)
    for _ in range(len(ch_mult) - 1):
        x_ref = F.interpolate(x_ref, scale_factor=2, mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(model.encode(x).mean, z_ref, atol=1e-6)
        assert torch.allclose(model(x, sample_posterior=False)[0], x_ref, atol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        cfg("none", up_shortcut="bicubic")
    with pytest.raises(ValueError, match="valid values: nearest, bicubic"):
        cfg(up_shortcut="bilinear")


@pytest.mark.parametrize("C,ch_mult,c", [(3, (1, 2, 2, 2), 4), (3, (1, 2, 2), 5), (3, (1, 2, 2, 2, 4), 16)])
def test_free_latent_channels_start_empty_and_are_not_read_by_the_shortcut(C, ch_mult, c):
    """free_latent_channels: the channels past m = C floor(c / C) hold 0 (not a copy of colour k mod C), the first
    m are the codec's block means, the zeroed decoder ignores the free ones, and the default keeps the copy."""
    m = C * (c // C)
    model = AutoencoderKL(cfg(C=C, ch=16, ch_mult=ch_mult, c=c, free_latent_channels=True)).eval()
    f = model.cfg.f
    x = torch.rand(2, C, 2 * f, 2 * f) * 2 - 1
    z_ref, x_ref = codec(x, f, c)
    with torch.no_grad():
        mean = model.encode(x).mean
        assert torch.allclose(mean[:, :m], z_ref[:, :m], atol=1e-6) and torch.equal(mean[:, m:], torch.zeros_like(mean[:, m:]))
        assert torch.allclose(model.decode(mean), x_ref, atol=1e-6)
        z = mean.clone()
        z[:, m:] = torch.randn_like(z[:, m:])                      # anything in the free channels ...
        assert torch.allclose(model.decode(z), x_ref, atol=1e-6)  # ... is invisible to the shortcut path
        copy = AutoencoderKL(cfg(C=C, ch=16, ch_mult=ch_mult, c=c)).eval()
        assert torch.allclose(copy.encode(x).mean[:, m:], z_ref[:, m:], atol=1e-6)  # the default: copies
    assert len(residual_branch_ends(model)) == len(residual_branch_ends(copy))  # no parameters added or lost
    with pytest.raises(ValueError, match="free_latent_channels needs shortcut 'residual'"):
        cfg("none", free_latent_channels=True)


def test_zeroed_decoder_of_any_latent_when_widths_divide():
    """One image channel and power-of-two widths: every latent channel has equal weight, so the zeroed
    decoder paints the mean of the latent channels."""
    model = AutoencoderKL(cfg(C=1, ch=16, ch_mult=(1, 2, 2), c=4)).eval()
    z = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        assert torch.allclose(model.decode(z), F.interpolate(z.mean(1, keepdim=True), scale_factor=4), atol=1e-6)


def test_every_branch_end_is_zero_at_init_and_gets_a_gradient():
    model = AutoencoderKL(cfg())
    ends = residual_branch_ends(model)
    assert len(ends) == len({id(m) for m in ends}) > 10
    assert all(m.weight.abs().sum() == 0 and m.bias.abs().sum() == 0 for m in ends)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, _ = model(x, sample_posterior=False)
    (rec - x.flip(-1)).abs().mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in ends)
    with pytest.raises(ValueError, match="only a shortcut='residual' model"):
        zero_residual_branches(AutoencoderKL(cfg("none")))


# ---------------------------------------------------------------- shapes and the SD layout
@pytest.mark.parametrize("ch_mult,c", [((1, 2, 2), 4), ((1, 2, 2, 2), 4), ((1, 2, 2, 2, 2), 4),
                                       ((1, 2, 2), 16), ((1, 2, 2, 2), 16), ((1, 2, 2, 2, 2), 16)])
def test_shapes_f4_f8_f16(ch_mult, c):
    model = perturb(AutoencoderKL(cfg(ch=8, ch_mult=ch_mult, c=c)))
    f = model.cfg.f
    assert f == 2 ** (len(ch_mult) - 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, posterior = model(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, c, 32 // f, 32 // f)
    assert rec.shape == x.shape


def test_none_keeps_the_sd_layout():
    model = AutoencoderKL(cfg("none"))
    assert isinstance(model.quant_conv, nn.Conv2d) and isinstance(model.post_quant_conv, nn.Conv2d)
    assert not any(isinstance(m, ChannelShortcut) for m in model.modules())
    assert not model.encoder.residual and not model.decoder.residual
    with pytest.raises(ValueError, match="only a shortcut='residual' model"):
        residual_branch_ends(model)


# ---------------------------------------------------------------- config and model folders
def test_unknown_shortcut_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown shortcut 'dc-ae'; valid values: none, residual"):
        cfg("dc-ae")
    c = cfg("none")
    c.shortcut = "Residual"  # set after construction: the model checks again
    with pytest.raises(ValueError, match="unknown shortcut 'Residual'"):
        AutoencoderKL(c)
    with pytest.raises(ValueError, match="needs z_channels and every width >= in_channels"):
        cfg(C=3, c=2)


def test_save_load_round_trip(tmp_path):
    c = cfg(scale_factor=0.7)
    model = perturb(AutoencoderKL(c)).eval()
    model.save_pretrained(tmp_path / "ae")
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["config"]["shortcut"] == "residual"
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    assert loaded.cfg == c
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x, sample_posterior=False)[0], loaded(x, sample_posterior=False)[0])


def test_folder_saved_before_the_field_loads_as_none(tmp_path):
    model = AutoencoderKL(cfg("none")).eval()
    model.save_pretrained(tmp_path / "ae")
    cfg_file = tmp_path / "ae" / "config.json"
    d = json.loads(cfg_file.read_text())
    del d["config"]["shortcut"]
    cfg_file.write_text(json.dumps(d))
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae")
    assert loaded.cfg.shortcut == "none"
    d["config"]["shortcut"] = "dc-ae"
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"config\.json.*unknown shortcut 'dc-ae'; valid values: none, residual"):
        AutoencoderKL.from_pretrained(tmp_path / "ae")


def test_residual_weights_do_not_load_into_the_sd_layout(tmp_path):
    AutoencoderKL(cfg()).save_pretrained(tmp_path / "ae")
    cfg_file = tmp_path / "ae" / "config.json"
    d = json.loads(cfg_file.read_text())
    d["config"]["shortcut"] = "none"
    cfg_file.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"model\.pt.*do not match"):
        AutoencoderKL.from_pretrained(tmp_path / "ae")


# ---------------------------------------------------------------- presets and the command line
@pytest.mark.parametrize("name,C,size,latent", [("photo-f8c4", 3, 64, (4, 8, 8)), ("photo-f16c16", 3, 64, (16, 4, 4)),
                                                ("photo-f4c4", 3, 64, (4, 16, 16)), ("mnist-f4-res", 1, 32, (4, 8, 8)),
                                                ("colored-f4-res", 3, 32, (4, 8, 8))])
def test_residual_presets(name, C, size, latent):
    c = get_preset(AUTOENCODER_PRESETS, name)
    assert c.shortcut == "residual" and c.in_channels == C
    with torch.no_grad():
        assert AutoencoderKL(c).encode(torch.zeros(1, C, size, size)).mean.shape == (1, *latent)
    assert get_preset(AUTOENCODER_PRESETS, "small-f8").shortcut == "none"


def test_train_autoencoder_cli_residual(tmp_path):
    from ldm_scratch.cli.stage1 import train_autoencoder, train_autoencoder_parser
    args = train_autoencoder_parser().parse_args(
        ["--preset", "tiny", "--shortcut", "residual", "--steps", "2", "--batch-size", "4", "--perceptual-net", "none",
         "--sample-every", "2", "--ckpt-every", "2", "--out", str(tmp_path / "run")])
    res = train_autoencoder(args)
    assert res["steps"] == 2
    loaded = AutoencoderKL.from_pretrained(tmp_path / "run" / "model")
    assert loaded.cfg.shortcut == "residual" and loaded.cfg.in_channels == 1  # MNIST: the data decides
    # a residual latent is a block mean of the (mostly black) digits: training measured and saved its mean
    assert loaded.shift_factor < -0.3 and loaded.shift_factor == loaded.cfg.shift_factor


# ---------------------------------------------------------------- the shift factor (SD3/FLUX)
def test_latent_stats_closed_form_and_scale_shift_round_trip():
    from ldm_scratch.autoencoder import measure_latent_stats, measure_scale_factor
    model = perturb(AutoencoderKL(cfg())).eval()
    x = torch.rand(6, 3, 16, 16) * 2 - 1.5  # dark images: latents far from zero
    x = x.clamp(-1, 1)
    with torch.no_grad():
        z = model.encode(x).mode().double()
    mean, scale = measure_latent_stats(model, x, batch_size=4, sample_posterior=False)
    assert mean == pytest.approx(z.mean().item(), rel=1e-9, abs=1e-12)
    assert scale == pytest.approx(1 / z.std().item(), rel=1e-9)  # centred, unbiased, over all batches
    assert scale == measure_scale_factor(model, x, batch_size=4, sample_posterior=False)
    model.scale_factor, model.shift_factor = scale, mean
    z0 = model.scale_latents(z.float())
    assert z0.mean().item() == pytest.approx(0.0, abs=1e-5) and z0.std().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(model.unscale_latents(z0), z.float(), atol=1e-6)
    model.shift_factor = 0.0  # the SD layout's convention: z * scale_factor, exactly
    assert torch.equal(model.scale_latents(z.float()), z.float() * scale)
    assert torch.equal(model.unscale_latents(z0), z0 / scale)


def test_shift_is_measured_for_residual_only_and_saved(tmp_path):
    from ldm_scratch.config import LossConfig
    from ldm_scratch.stage1 import AutoencoderTask
    data = torch.utils.data.TensorDataset(torch.full((8, 3, 16, 16), -0.8) + 0.1 * torch.rand(8, 3, 16, 16))
    for shortcut in ("none", "residual"):
        task = AutoencoderTask(cfg(shortcut), LossConfig(perceptual_net="none"))
        task.finish(data, tmp_path / shortcut)
        loaded = AutoencoderKL.from_pretrained(tmp_path / shortcut / "model")
        assert loaded.scale_factor == task.ae.scale_factor and loaded.shift_factor == task.ae.shift_factor
        if shortcut == "none":
            assert loaded.shift_factor == 0.0
        else:  # zero branches: the latent is the block mean of the image, about -0.75
            assert loaded.shift_factor == pytest.approx(-0.75, abs=0.02)
    d = json.loads((tmp_path / "residual" / "model" / "config.json").read_text())
    del d["config"]["shift_factor"]  # folders saved before the field existed load with no shift
    (tmp_path / "residual" / "model" / "config.json").write_text(json.dumps(d))
    assert AutoencoderKL.from_pretrained(tmp_path / "residual" / "model").shift_factor == 0.0


def test_encode_images_and_pipeline_use_the_shift(tmp_path):
    from ldm_scratch.latents import encode_images
    model = AutoencoderKL(cfg()).eval()  # the codec: latent = block means
    model.scale_factor, model.shift_factor = 2.0, -0.5
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z0 = encode_images(model, x, precision="fp32", progress=False)
    want, _ = codec(x, 4, 4)
    assert torch.allclose(z0, (want + 0.5) * 2.0, atol=1e-6)
    assert torch.allclose(model.decode(model.unscale_latents(z0)), F.interpolate(F.avg_pool2d(x, 4), scale_factor=4),
                          atol=1e-6)


def test_evaluate_photo_crops_to_a_multiple_of_f():
    """coffee is 400 x 600: at f = 16 it is centre-cropped to 400 x 592 for both the model and the floor."""
    import math
    from ldm_scratch.stage1 import evaluate_photo
    model = AutoencoderKL(cfg(ch=8, ch_mult=(1, 1, 1, 1, 1), c=4)).eval()   # f = 16, the non-learned codec
    assert model.cfg.f == 16
    with torch.no_grad():
        m = evaluate_photo(model, "coffee")
    assert all(math.isfinite(v) for v in m.values()) and m["floor_psnr"] > m["psnr"] > 10  # nearest < bicubic
