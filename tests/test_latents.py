"""Encoding a dataset once with the frozen autoencoder, and the cache that must follow its weights."""
import dataclasses

import pytest
import torch

from ldm_scratch import latents
from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import CheckpointError, safe_torch_load
from ldm_scratch.config import AUTOENCODER_PRESETS, get_preset
from ldm_scratch.data import ColoredDigits
from ldm_scratch.latents import cached_latents, check_latent_cache, encode_images


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return ColoredDigits("test").images[:24]  # (24, 3, 32, 32) in [-1, 1]


def make_ae(scale_factor: float = 0.5) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(dataclasses.replace(get_preset(AUTOENCODER_PRESETS, "tiny"), scale_factor=scale_factor))


def test_encode_images_is_the_scaled_posterior_mode(images):
    ae = make_ae().train()
    z = encode_images(ae, images, batch_size=10, precision="fp32", progress=False)  # 3 batches: 10, 10, 4
    with torch.no_grad():
        expected = ae.eval().encode(images).mode() * 0.5
    assert z.shape == (24, 4, 8, 8) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert torch.allclose(z, expected, atol=1e-6)
    assert not z.requires_grad
    ae.train()
    encode_images(ae, images[:2], precision="fp32", progress=False)
    assert ae.training  # the caller's mode is given back
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        encode_images(ae, images[0], progress=False)


def test_cache_round_trip_reads_back_without_encoding(tmp_path, images, monkeypatch, capsys):
    ae, cache = make_ae(), tmp_path / "z.pt"
    z = cached_latents(ae, None, images, cache, "colored-test", precision="fp32", progress=False)
    assert cache.is_file() and torch.equal(z, encode_images(ae, images, precision="fp32", progress=False))

    def no_encoding(*args, **kwargs):
        raise AssertionError("a valid cache must not be re-encoded")
    monkeypatch.setattr(latents, "encode_images", no_encoding)
    again = cached_latents(ae, None, images, cache, "colored-test")
    assert torch.equal(again, z) and "stale" not in capsys.readouterr().out
    check_latent_cache(cache, ae)  # the same autoencoder: no error


def test_the_cache_follows_the_autoencoder_weights_and_scale_factor(tmp_path, images, capsys):
    ae, cache = make_ae(), tmp_path / "z.pt"
    kw = dict(precision="fp32", progress=False)
    old = cached_latents(ae, None, images, cache, "colored-test", **kw)
    with torch.no_grad():
        ae.encoder.conv_in.bias.add_(0.5)  # "another training run": a different latent space
    with pytest.raises(CheckpointError, match=r"z\.pt.*another autoencoder"):
        check_latent_cache(cache, ae)
    new = cached_latents(ae, None, images, cache, "colored-test", **kw)
    out = capsys.readouterr().out
    assert "z.pt is stale" in out and "autoencoder" in out and out.count("\n") == 1  # one line
    assert not torch.allclose(new, old)
    assert torch.equal(safe_torch_load(cache)["latents"], new)  # the file was replaced
    check_latent_cache(cache, ae)

    ae.scale_factor = 0.25  # same weights, new scaling: stage 2 would see latents of the wrong spread
    halved = cached_latents(ae, None, images, cache, "colored-test", **kw)
    assert torch.allclose(halved, new / 2) and "stale" in capsys.readouterr().out

    cached_latents(ae, None, images, cache, "mnist-test", **kw)  # another dataset of the same shape
    assert "dataset_id (colored-test in the cache vs mnist-test now)" in capsys.readouterr().out
    assert len(cached_latents(ae, None, images[:5], cache, "mnist-test", **kw)) == 5
    assert "n (24 in the cache vs 5 now)" in capsys.readouterr().out


def test_with_the_autoencoder_folder_the_fingerprint_is_of_its_files(tmp_path, images, capsys):
    ae, cache, folder = make_ae(), tmp_path / "z.pt", tmp_path / "ae"
    ae.save_pretrained(folder)
    cached_latents(ae, folder, images, cache, "colored-test", precision="fp32", progress=False)
    check_latent_cache(cache, ae, folder)
    with pytest.raises(CheckpointError, match="another autoencoder"):  # written with the folder, checked without
        check_latent_cache(cache, ae)
    ae.scale_factor = 0.3
    ae.save_pretrained(folder)  # config.json changed
    with pytest.raises(CheckpointError, match=r"z\.pt"):
        check_latent_cache(cache, ae, folder)
    with pytest.raises(CheckpointError, match="model.pt"):
        check_latent_cache(cache, ae, tmp_path / "elsewhere")


def test_a_corrupt_cache_is_rebuilt_and_an_explicit_check_names_it(tmp_path, images, capsys):
    ae, cache = make_ae(), tmp_path / "z.pt"
    with pytest.raises(CheckpointError, match=r"z\.pt: file not found"):
        check_latent_cache(cache, ae)
    cached_latents(ae, None, images[:4], cache, "colored-test", precision="fp32", progress=False)
    cache.write_bytes(cache.read_bytes()[:100])  # an interrupted write (by something else than us)
    with pytest.raises(CheckpointError, match=r"z\.pt"):
        check_latent_cache(cache, ae)
    z = cached_latents(ae, None, images[:4], cache, "colored-test", precision="fp32", progress=False)
    assert "stale" in capsys.readouterr().out and z.shape == (4, 4, 8, 8)
    torch.save({"something": "else"}, cache)
    with pytest.raises(CheckpointError, match="not a latent cache"):
        check_latent_cache(cache, ae)
