"""The shipped stage-1 autoencoders (ldm_scratch/weights/ae_*): they load frozen in float32 with their
measured scale factor, encode to 4 x 8 x 8, and beat the non-learned floor on held-out images."""
import pytest
import torch

from ldm_scratch import pretrained
from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.data import ColoredDigits, MNIST5k
from ldm_scratch.metrics import psnr
from ldm_scratch.stage1 import floor_reconstruction, stack_images

HELDOUT = 32  # images spread over the test split's classes: enough for a stable PSNR, fast on one core


def heldout(name: str) -> torch.Tensor:
    data = ColoredDigits("test") if name == "colored-f4" else MNIST5k("test", pad_to=32)
    return stack_images(data, HELDOUT)


@pytest.mark.parametrize("name, channels", [("mnist-f4", 1), ("colored-f4", 3)])
def test_load_encode_and_beat_the_floor(name, channels):
    ae = pretrained.load_autoencoder(name)
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    assert all(p.dtype == torch.float32 for p in ae.parameters())  # float16 on disk is storage only
    assert ae.cfg.in_channels == channels
    assert ae.scale_factor != 1.0 and 0 < ae.scale_factor < 100  # measured and saved, not the default
    x = heldout(name)  # (32, C, 32, 32)
    with torch.no_grad():
        z = ae.encode(x).mode()
        x_rec = ae.decode(z).clamp(-1, 1)
    assert z.shape == (HELDOUT, 4, 8, 8)
    assert x_rec.shape == x.shape
    assert psnr(x_rec, x) > psnr(floor_reconstruction(x, ae.cfg.f), x)


def test_folder_and_table_agree():
    for name, (folder, description) in pretrained.PRETRAINED_AUTOENCODERS.items():
        assert pretrained.autoencoder_folder(name) == pretrained.WEIGHTS_DIR / folder
        assert description


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        pretrained.load_autoencoder("sd-vae")
    assert "mnist-f4" in str(e.value) and "colored-f4" in str(e.value)
    with pytest.raises(ValueError):
        pretrained.autoencoder_folder("mnist")


def test_missing_folder_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="train_stage1_weights.py"):
        pretrained.load_autoencoder("mnist-f4")


def test_photo_codec_beats_the_floor_on_the_held_out_astronaut():
    """The shipped photo-f8c4 (residual, 30 minutes of training): 512 x 512 x 3 -> 64 x 64 x 4, at least 24 dB on the
    astronaut it never saw (measured 24.22; the area-down / bicubic-up floor 21.75)."""
    from ldm_scratch.stage1 import evaluate_photo
    ae = pretrained.load_autoencoder("photo-f8c4")
    assert ae.cfg.shortcut == "residual" and ae.cfg.f == 8 and ae.cfg.z_channels == 4
    assert ae.shift_factor != 0.0 and ae.scale_factor != 1.0       # both measured at the end of training
    with torch.no_grad():
        m = evaluate_photo(ae, "astronaut")
    assert m["psnr"] > 24.0 and m["floor_psnr"] < 22.0
