"""Scale equivariance for stage 1 (LossConfig.equivariance_weight, Skorokhodov et al. 2025): decoding the
2 x 2-averaged latent must give the 2 x 2-averaged image. The term is checked against its formula recomputed by
hand, its gradient reaches encoder and decoder, weight 0 changes nothing, and odd latent sides are refused."""
import pytest
import torch
import torch.nn.functional as F

from ldm_scratch.config import AUTOENCODER_PRESETS, LossConfig, get_preset
from ldm_scratch.stage1 import AutoencoderTask


def make_task(weight: float, preset: str = "tiny") -> AutoencoderTask:
    torch.manual_seed(0)
    loss_cfg = LossConfig(perceptual_net="none", disc_start=10_000, equivariance_weight=weight)
    return AutoencoderTask(get_preset(AUTOENCODER_PRESETS, preset), loss_cfg)


def images(n: int = 3, side: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_equivariance_term_is_the_formula():
    x = images()
    plain, with_se = make_task(0.0), make_task(0.7)
    with_se.ae.load_state_dict(plain.ae.state_dict())
    torch.manual_seed(5)
    loss0, logs0 = plain.loss("ae", x, step=0)
    assert "equivariance" not in logs0
    torch.manual_seed(5)
    loss1, logs1 = with_se.loss("ae", x, step=0)
    # by hand, with the same two posterior draws: the reconstruction's, then the equivariance term's
    torch.manual_seed(5)
    with torch.no_grad():
        _, posterior = with_se.ae(x)
        z_small = F.avg_pool2d(posterior.sample(), 2)                        # (B, c, h/2, w/2)
        rec_small = with_se.ae.decode(z_small)                                # (B, 3, 16, 16)
    by_hand = (rec_small - F.avg_pool2d(x, 2)).abs().sum() / x.shape[0] / with_se.loss_fn.logvar.exp()
    torch.testing.assert_close(loss1 - loss0, 0.7 * by_hand, rtol=1e-4, atol=1e-3)
    assert logs1["equivariance"] == pytest.approx(by_hand.item() / (3 * 32 * 32) * 4, rel=1e-4)


def test_equivariance_gradient_reaches_encoder_and_decoder():
    task = make_task(1.0)
    x = images()
    _, posterior = task.ae(x)
    task.equivariance_loss(x, posterior).backward()
    for part in (task.ae.encoder, task.ae.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_equivariance_refuses_odd_latent_sides():
    task = make_task(1.0)
    x = images(2, side=36)   # tiny is f = 4: a 9 x 9 latent cannot be averaged in 2 x 2 blocks
    _, posterior = task.ae(x)
    with pytest.raises(ValueError, match="even latent sides"):
        task.equivariance_loss(x, posterior)


def test_equivariance_flag_reaches_the_loss_config(tmp_path):
    from ldm_scratch.__main__ import main
    out = tmp_path / "se"
    assert main(["train-autoencoder", "--preset", "tiny", "--data", "mnist5k", "--steps", "2", "--batch-size", "4",
                 "--precision", "fp32", "--sample-every", "0", "--log-every", "1", "--disc-start", "100",
                 "--equivariance-weight", "0.5", "--out", str(out)]) == 0
    logged = [line for line in (out / "log.jsonl").read_text().splitlines() if "equivariance" in line]
    assert logged
