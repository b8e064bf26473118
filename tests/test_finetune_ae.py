"""train-autoencoder --init-from / --decoder-only: fine-tuning a trained autoencoder. Decoder-only keeps the latent
space bit for bit (encoder, quant_conv, scale and shift factors), so a denoiser trained in it stays valid; bad
combinations are one-line errors naming the problem."""
import pytest
import torch

from ldm_scratch.__main__ import main
from ldm_scratch.autoencoder import AutoencoderKL

COMMON = ["--data", "mnist5k", "--batch-size", "4", "--precision", "fp32", "--sample-every", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(["train-autoencoder", "--preset", "tiny", "--steps", "2", "--disc-start", "100", *COMMON,
                 "--out", str(out)]) == 0
    return out / "model"


def test_decoder_only_fine_tune_keeps_the_latent_space(base, tmp_path):
    before = AutoencoderKL.from_pretrained(base)
    out = tmp_path / "ft"
    assert main(["train-autoencoder", "--init-from", str(base), "--decoder-only", "--steps", "3", "--disc-start", "1",
                 "--lr", "1e-3", *COMMON, "--out", str(out)]) == 0
    after = AutoencoderKL.from_pretrained(out / "model")
    a, b = before.state_dict(), after.state_dict()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    learned = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and learned
    assert all(torch.equal(a[k], b[k]) for k in frozen)                 # the latent space did not move
    assert any(not torch.equal(a[k], b[k]) for k in learned)            # the decoder did
    assert after.scale_factor == before.scale_factor and after.shift_factor == before.shift_factor
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(before.encode(x).mode(), after.encode(x).mode())


def test_init_from_without_decoder_only_trains_everything_from_the_weights(base, tmp_path):
    out = tmp_path / "full"
    assert main(["train-autoencoder", "--init-from", str(base), "--steps", "1", "--lr", "1e-3", "--disc-start", "100",
                 *COMMON, "--out", str(out)]) == 0
    a = AutoencoderKL.from_pretrained(base).state_dict()
    b = AutoencoderKL.from_pretrained(out / "model").state_dict()
    # started from the weights (one small step away from them), and the encoder moved too
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    assert max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point()) < 0.05


def test_disc_warmup_trains_only_the_discriminator_first(base):
    """--disc-warmup N: for the first N steps the fresh discriminator learns against the frozen initial decoder
    (a fine-tune's discriminator must know what real looks like before its gradient steers the decoder)."""
    from ldm_scratch.config import LossConfig, TrainConfig
    from ldm_scratch.data import MNIST5k
    from ldm_scratch.stage1 import AutoencoderTask
    from ldm_scratch.train import Trainer
    init = AutoencoderKL.from_pretrained(base)
    data = MNIST5k("train", pad_to=32)
    start = {k: v.clone() for k, v in init.state_dict().items()}

    def run(steps, out):
        torch.manual_seed(0)
        task = AutoencoderTask(init.cfg, LossConfig(disc_start=0, disc_warmup=2), init_from=init, decoder_only=True)
        disc0 = [p.detach().clone() for p in task.loss_fn.discriminator_parameters()]
        Trainer(task, TrainConfig(steps=steps, batch_size=4, lr=1e-3, precision="fp32", sample_every=0,
                                  ckpt_every=0, log_every=1), data, out).fit()
        ae_same = all(torch.equal(start[k], v) for k, v in task.ae.state_dict().items())
        disc_moved = any(not torch.equal(a, b) for a, b in zip(disc0, task.loss_fn.discriminator_parameters()))
        return ae_same, disc_moved

    assert run(2, base.parent / "warm") == (True, True)      # the warm-up: the autoencoder did not move at all
    assert run(3, base.parent / "after") == (False, True)    # the step after it trains the decoder as usual


@pytest.mark.parametrize("extra, expected", [
    (["--init-from", "BASE", "--disc-warmup", "2", "--disc-start", "5"], "nothing would train"),
    (["--decoder-only"], "--init-from"),
    (["--init-from", "BASE", "--preset", "small-f4"], "drop --preset"),
    (["--init-from", "BASE", "--ch", "8"], "--ch"),
    (["--init-from", "no/such/folder"], "neither a model folder"),
    (["--init-from", "colored-f4"], "3-channel images"),
])
def test_bad_fine_tune_flags_are_one_line_errors(base, tmp_path, capsys, extra, expected):
    extra = [str(base) if e == "BASE" else e for e in extra]
    assert main(["train-autoencoder", *extra, "--steps", "1", *COMMON, "--out", str(tmp_path / "x")]) == 2
    assert expected in capsys.readouterr().err
