"""losses.py: each loss term reaches exactly the parameters it should; disc_start; closed forms."""
import math

import pytest
import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.config import AUTOENCODER_PRESETS, LossConfig, get_preset
from ldm_scratch.losses import (AutoencoderLoss, PatchDiscriminator, adaptive_weight, generator_adv_loss,
                                hinge_d_loss, vanilla_d_loss)

START = 10  # disc_start in these tests


def make(**loss_kw):
    ae = AutoencoderKL(get_preset(AUTOENCODER_PRESETS, "tiny"))
    cfg = LossConfig(disc_start=START, disc_channels=8, disc_layers=3, **loss_kw)
    return ae, AutoencoderLoss(cfg, in_channels=3)


def groups(ae, loss_fn):
    """The parameter groups a loss term may or may not reach."""
    return {"encoder": list(ae.encoder.parameters()) + list(ae.quant_conv.parameters()),
            "decoder": list(ae.post_quant_conv.parameters()) + list(ae.decoder.parameters()),
            "logvar": [loss_fn.logvar],
            "discriminator": list(loss_fn.discriminator.parameters()),
            "perceptual": list(loss_fn.perceptual.parameters()) if loss_fn.perceptual is not None else []}


def reached(ae, loss_fn, loss):
    """Backward `loss` from clean grads; the set of groups with a nonzero gradient."""
    for ps in groups(ae, loss_fn).values():
        for p in ps:
            p.grad = None
    loss.backward()
    return {name for name, ps in groups(ae, loss_fn).items()
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)}


def grads_of(ps):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ps])


@pytest.fixture
def x():
    return torch.rand(2, 3, 32, 32) * 2 - 1


def test_reconstruction_reaches_autoencoder_and_logvar_only(x):
    ae, loss_fn = make(kl_weight=0.0)
    x_rec, post = ae(x)
    loss, _ = loss_fn.generator_loss(x, x_rec, post, step=0, last_layer=ae.last_layer)
    assert reached(ae, loss_fn, loss) == {"encoder", "decoder", "logvar"}
    assert all(p.grad is None for p in groups(ae, loss_fn)["perceptual"])


def test_perceptual_term_alone_reaches_the_decoder(x):
    # the diffusers trap: LPIPS under no_grad sends nothing back
    ae, loss_fn = make()
    x_rec, _ = ae(x, sample_posterior=False)
    assert {"encoder", "decoder"} <= reached(ae, loss_fn, loss_fn.perceptual(x, x_rec).sum())


def test_kl_reaches_the_encoder_only(x):
    ae, loss_fn = make()
    _, post = ae(x)
    assert reached(ae, loss_fn, post.kl().mean()) == {"encoder"}
    # ...and inside the full loss: kl_weight changes the encoder's gradient, never the decoder's
    g = {}
    for w in (0.0, 1.0):
        loss_fn.cfg.kl_weight = w
        x_rec, post = ae(x, sample_posterior=False)
        reached(ae, loss_fn, loss_fn.generator_loss(x, x_rec, post, 0, ae.last_layer)[0])
        g[w] = {k: grads_of(ps) for k, ps in groups(ae, loss_fn).items() if k in ("encoder", "decoder")}
    assert torch.allclose(g[0.0]["decoder"], g[1.0]["decoder"])
    assert not torch.allclose(g[0.0]["encoder"], g[1.0]["encoder"])


def test_gan_term_reaches_autoencoder_not_discriminator(x):
    ae, loss_fn = make(kl_weight=0.0, perceptual_net="none")
    g = {}
    for step in (0, START):  # without and with the GAN term
        x_rec, post = ae(x, sample_posterior=False)
        loss, logs = loss_fn.generator_loss(x, x_rec, post, step, ae.last_layer)
        hit = reached(ae, loss_fn, loss)
        assert "discriminator" not in hit and all(p.grad is None for p in groups(ae, loss_fn)["discriminator"])
        g[step] = grads_of(groups(ae, loss_fn)["decoder"])
    assert logs["d_weight"] > 0
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())  # restored after the G step
    assert not torch.allclose(g[0], g[START])  # the GAN term does move the decoder


def test_discriminator_loss_reaches_discriminator_only(x):
    ae, loss_fn = make()
    x_rec, _ = ae(x)  # NOT detached by the caller: the loss must detach it itself
    d_loss, logs = loss_fn.discriminator_loss(x, x_rec, step=START)
    assert reached(ae, loss_fn, d_loss) == {"discriminator"}
    assert all(p.grad is None for k in ("encoder", "decoder", "logvar") for p in groups(ae, loss_fn)[k])
    assert {"d_loss", "logits_real", "logits_fake", "logits_gap"} <= set(logs)
    assert logs["logits_gap"] == pytest.approx(logs["logits_real"] - logs["logits_fake"])


def test_discriminator_off_before_disc_start(x):
    ae, loss_fn = make()
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *a: calls.append(1))
    x_rec, post = ae(x)
    assert not loss_fn.disc_active(START - 1) and loss_fn.disc_active(START)
    _, logs = loss_fn.generator_loss(x, x_rec, post, START - 1, ae.last_layer)
    d_loss, _ = loss_fn.discriminator_loss(x, x_rec, START - 1)
    assert calls == [] and logs["g_loss"] == 0 and logs["d_weight"] == 0
    assert d_loss.item() == 0 and not d_loss.requires_grad  # nothing to step: the trainer skips it
    loss_fn.generator_loss(x, x_rec, post, START, ae.last_layer)
    loss_fn.discriminator_loss(x, x_rec, START)
    assert len(calls) == 3  # once in the G loss, real + fake in the D loss


def test_adaptive_weight_matches_manual_and_clamps(x):
    ae, loss_fn = make(perceptual_net="none", disc_weight=0.5)
    x_rec, post = ae(x, sample_posterior=False)
    _, logs = loss_fn.generator_loss(x, x_rec, post, START, ae.last_layer)
    # manual: the same nll and g_loss, gradients at the decoder's last conv weight
    nll = torch.sum((x - x_rec).abs() / torch.exp(loss_fn.logvar) + loss_fn.logvar) / x.shape[0]
    g_loss = -loss_fn.discriminator(x_rec).mean()
    g1 = torch.autograd.grad(nll, ae.last_layer, retain_graph=True)[0]
    g2 = torch.autograd.grad(g_loss, ae.last_layer, retain_graph=True)[0]
    manual = 0.5 * (g1.norm() / (g2.norm() + 1e-4)).item()
    assert logs["d_weight"] == pytest.approx(manual, rel=1e-4)
    assert adaptive_weight(nll, g_loss, ae.last_layer, max_weight=1e-3).item() == pytest.approx(1e-3)
    with torch.no_grad():  # validation: no gradients to compare -> 0, documented
        _, logs = loss_fn.generator_loss(x, x_rec, post, START, ae.last_layer)
    assert logs["d_weight"] == 0


def test_gan_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = (0, 0.5, 2); relu(1 + fake) = (0, 1, 2.5) -> 0.5 * (2.5/3 + 3.5/3) = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    sp = lambda a: math.log1p(math.exp(a))  # softplus
    expected = 0.5 * (sum(sp(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(sp(f) for f in (-2.0, 0.0, 1.5)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)
    assert generator_adv_loss(fake).item() == pytest.approx(0.5 / 3)


def test_nll_is_a_sum_over_pixels_divided_by_batch(x):
    ae, loss_fn = make(kl_weight=0.0, logvar_init=0.5)
    x_rec, post = ae(x)
    _, logs = loss_fn.generator_loss(x, x_rec, post, 0, ae.last_layer)
    p = loss_fn.perceptual(x, x_rec)[:, None, None, None]
    manual = (((x - x_rec).abs() + p) / math.exp(0.5) + 0.5).sum() / x.shape[0]
    assert logs["nll"] == pytest.approx(manual.item(), rel=1e-5)
    assert logs["logvar"] == pytest.approx(0.5)
    assert {"total", "l1", "perceptual", "rec", "nll", "kl", "g_loss", "d_weight", "logvar"} <= set(logs)


def test_l2_pixel_loss_is_the_gaussian_nll(x):
    """pixel_loss="l2": sum(((x - x_rec)^2 + w p) / exp(logvar) + logvar / 2) / B, whose best logvar is
    log(2 * mean squared error), the Gaussian NLL with variance exp(logvar) / 2; an unknown name is refused."""
    ae, loss_fn = make(kl_weight=0.0, logvar_init=0.5, pixel_loss="l2", perceptual_net="none")
    x_rec, post = ae(x)
    _, logs = loss_fn.generator_loss(x, x_rec, post, 0, ae.last_layer)
    manual = ((x - x_rec).square() / math.exp(0.5) + 0.25).sum() / x.shape[0]
    assert logs["nll"] == pytest.approx(manual.item(), rel=1e-5)
    assert logs["rec"] == pytest.approx((x - x_rec).square().mean().item(), rel=1e-5)
    mse = (x - x_rec).square().mean().item()
    grid = torch.linspace(math.log(mse) - 2, math.log(mse) + 3, 501)
    with torch.no_grad():
        nlls = [float(((x - x_rec).square() / math.exp(g) + g / 2).sum()) for g in grid]
    assert grid[int(torch.tensor(nlls).argmin())].item() == pytest.approx(math.log(2 * mse), abs=0.02)
    with pytest.raises(ValueError, match="pixel_loss"):
        make(pixel_loss="l3")


def test_optimizer_must_train_logvar(x):
    ae, loss_fn = make()
    with pytest.raises(ValueError, match="logvar"):
        loss_fn.check_optimizers(torch.optim.Adam(ae.parameters()))  # LDM's bug
    opt = torch.optim.Adam(loss_fn.generator_parameters(ae), lr=1e-2)
    loss_fn.check_optimizers(opt, torch.optim.Adam(loss_fn.discriminator_parameters()))
    x_rec, post = ae(x)
    loss_fn.generator_loss(x, x_rec, post, 0, ae.last_layer)[0].backward()
    opt.step()
    assert loss_fn.logvar.item() != 0.0  # it moves


def test_patch_discriminator_shapes():
    d = PatchDiscriminator(in_channels=1, ch=8, n_layers=3)
    assert d(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 2, 2)
    assert d(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(3, 8, 2, norm="batch")(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="disc_norm"):
        PatchDiscriminator(3, 8, 3, norm="layer")


def test_bf16_autocast_losses_are_fp32(x):
    ae, loss_fn = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_rec, post = ae(x)
        loss, _ = loss_fn.generator_loss(x, x_rec, post, START, ae.last_layer)
        d_loss, _ = loss_fn.discriminator_loss(x, x_rec, START)
    assert loss.dtype == torch.float32 and d_loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(d_loss)
