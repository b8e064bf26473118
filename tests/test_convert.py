"""Loading Stable Diffusion VAE weights (ldm_scratch/convert.py): parity with diffusers' AutoencoderKL
on a small random model, the CompVis .ckpt layout, file formats, and errors that name the bad keys."""
import re

import pytest
import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.config import AUTOENCODER_PRESETS, AutoencoderConfig, get_preset
from ldm_scratch.convert import convert_compvis_state_dict, convert_diffusers_state_dict, load_sd_vae

diffusers = pytest.importorskip("diffusers")

# ours and diffusers, same small network: two levels (f = 2), one res block, 32 groups
SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=32)


def small_cfg() -> AutoencoderConfig:
    return AutoencoderConfig(**SMALL)


def diffusers_vae(block_out_channels=(32, 64), layers_per_block=1):
    n = len(block_out_channels)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                                   block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                   down_block_types=("DownEncoderBlock2D",) * n,
                                   up_block_types=("UpDecoderBlock2D",) * n)


@pytest.fixture(scope="module")
def reference():
    """A seeded random diffusers VAE with its norms' and biases' defaults (1 and 0) perturbed, so that
    a swapped weight/bias or a skipped norm cannot pass by accident."""
    torch.manual_seed(0)
    ref = diffusers_vae().eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        out = dict(mean=dist.mean, logvar=dist.logvar, decoded=ref.decode(z).sample)
    return ref, x, z, out


def assert_matches(model: AutoencoderKL, reference) -> None:
    _, x, z, out = reference
    with torch.no_grad():
        posterior = model.encode(x)
        assert torch.allclose(posterior.mean, out["mean"], atol=1e-5)
        assert torch.allclose(posterior.logvar, out["logvar"], atol=1e-5)
        assert torch.allclose(model.decode(z), out["decoded"], atol=1e-5)


def to_compvis(key: str, num_levels: int) -> str:
    """Ours -> CompVis names: the inverse of convert.py's rules, written independently for the test."""
    key = key.replace(".blocks.", ".block.").replace(".skip.", ".nin_shortcut.")
    key = key.replace(".mid_block1.", ".mid.block_1.").replace(".mid_block2.", ".mid.block_2.")
    key = key.replace(".mid_attn.", ".mid.attn_1.")
    # CompVis numbers decoder levels by resolution, ours deepest first
    return re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.", key)


def compvis_state_dict(ref) -> dict:
    ours = convert_diffusers_state_dict(ref.state_dict())
    sd = {}
    for k, v in ours.items():
        if re.search(r"mid_attn\.(q|k|v|proj_out)\.weight$", k):
            v = v[:, :, None, None]  # CompVis stores these as 1x1 convs: (C, C) -> (C, C, 1, 1)
        sd[to_compvis(k, len(SMALL["ch_mult"]))] = v.clone()
    return sd


# ---------------------------------------------------------------- parity
def test_diffusers_parity(reference):
    model = AutoencoderKL(small_cfg()).eval()
    model.load_state_dict(convert_diffusers_state_dict(reference[0].state_dict()))
    assert_matches(model, reference)


def test_compvis_ckpt_round_trip(tmp_path, reference):
    sd = {f"first_stage_model.{k}": v for k, v in compvis_state_dict(reference[0]).items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # the rest of SD: ignored
    sd["first_stage_model.loss.logvar"] = torch.zeros(())  # the stage-1 loss's weights: dropped
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": sd, "global_step": 840000, "epoch": 3}, path)  # Lightning's plain extras
    model = load_sd_vae(path, cfg=small_cfg())
    assert not model.training
    assert_matches(model, reference)


def test_compvis_bare_state_dict(reference):
    model = AutoencoderKL(small_cfg()).eval()
    model.load_state_dict(convert_compvis_state_dict(compvis_state_dict(reference[0])))
    assert_matches(model, reference)


def test_safetensors_folder_and_bin(tmp_path, reference):
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in reference[0].state_dict().items()}
    (tmp_path / "vae").mkdir()
    save_file(sd, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert_matches(load_sd_vae(tmp_path / "vae", cfg=small_cfg()), reference)
    assert_matches(load_sd_vae(tmp_path, cfg=small_cfg()), reference)  # a pipeline folder: vae/ inside
    torch.save(sd, tmp_path / "vae.bin")
    assert_matches(load_sd_vae(tmp_path / "vae.bin", cfg=small_cfg()), reference)


def test_scale_factor_from_diffusers_config(tmp_path, reference, monkeypatch):
    from safetensors.torch import save_file
    save_file(reference[0].state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text('{"scaling_factor": 0.13025}')
    # no cfg: the "sd" preset, shrunk here to the small network so that the test stays fast
    monkeypatch.setitem(AUTOENCODER_PRESETS, "sd", lambda: AutoencoderConfig(**SMALL, scale_factor=0.18215))
    assert load_sd_vae(tmp_path).scale_factor == 0.13025


def test_old_diffusers_attention_names(reference):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in reference[0].state_dict().items():
        for new, name in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        sd[k] = v
    model = AutoencoderKL(small_cfg()).eval()
    model.load_state_dict(convert_diffusers_state_dict(sd))
    assert_matches(model, reference)


# ---------------------------------------------------------------- errors
def test_unknown_and_missing_keys_are_named(tmp_path, reference):
    sd = dict(reference[0].state_dict())
    sd["encoder.bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unknown \(1\): encoder\.bogus\.weight"):
        convert_diffusers_state_dict(sd)
    sd = dict(reference[0].state_dict())
    del sd["decoder.conv_norm_out.bias"]
    torch.save(sd, tmp_path / "vae.bin")
    with pytest.raises(CheckpointError, match=r"(?s)vae\.bin.*missing \(1\): decoder\.norm_out\.bias"):
        load_sd_vae(tmp_path / "vae.bin", cfg=small_cfg())
    # the right names at the wrong size: the SD preset against the small weights
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_sd_vae(tmp_path / "vae.bin")


class NotAWeight:
    """Stands in for the Lightning callback objects some .ckpt files pickle."""


def test_ckpt_with_python_objects_is_refused_clearly(tmp_path, reference):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": compvis_state_dict(reference[0]), "callbacks": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match=r"lightning\.ckpt.*weights_only(.|\n)*extract the weights once"):
        load_sd_vae(path, cfg=small_cfg())


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no VAE weights found"):
        load_sd_vae(tmp_path)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown extension"):
        load_sd_vae(tmp_path / "w.txt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*corrupt"):
        load_sd_vae(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- the real size
def test_sd_preset_parameter_count_matches_diffusers():
    with torch.device("meta"):  # shapes only, no memory or init time
        ours = AutoencoderKL(get_preset(AUTOENCODER_PRESETS, "sd"))
        ref = diffusers_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == 83_653_863
    # and every SD weight has a home of the right shape
    converted = convert_diffusers_state_dict(ref.state_dict())
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}
