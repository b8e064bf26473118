"""LatentDiffusionPipeline: generation, classifier-free guidance, input errors, and the saved folder."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.config import (AUTOENCODER_PRESETS, DIT_PRESETS, UNET_PRESETS, DiffusionConfig, TextEncoderConfig,
                                UNetConfig, get_preset)
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.flow import FlowConfig, RectifiedFlow
from ldm_scratch.objectives import DDPMObjective
from ldm_scratch.pipeline import LatentDiffusionPipeline, build_denoiser
from ldm_scratch.text import TextEncoder, Tokenizer
from ldm_scratch.unet import UNet

CAPTIONS = ["a red 7 on grass", "a blue 1 on plain", "an orange 3 on brick"]


def scramble(*modules: torch.nn.Module) -> None:
    """Small random offsets on every weight: the U-Net's zero-initialised output layers would otherwise make
    eps_pred = 0 for every condition, and every guidance test would pass trivially."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def make(conditioning: str, kind: str = "unet") -> LatentDiffusionPipeline:
    torch.manual_seed(0)
    channels = 3 if conditioning == "text" else 1  # grey digits for the class model, RGB for the text one
    ae = AutoencoderKL(dataclasses.replace(get_preset(AUTOENCODER_PRESETS, "tiny"), in_channels=channels,
                                           scale_factor=0.7))
    ucfg = get_preset(UNET_PRESETS, "tiny-latent")
    tok = te = None
    if conditioning == "text":
        tok = Tokenizer.from_captions(CAPTIONS)
        te = TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, max_length=tok.max_length, dim=16, depth=1,
                                           num_heads=2))
        ucfg = dataclasses.replace(ucfg, context_dim=16)
    elif conditioning == "class":
        ucfg = dataclasses.replace(ucfg, num_classes=10)
    if kind == "dit":  # the same latent, conditioning and interface; only the backbone differs
        ucfg = dataclasses.replace(get_preset(DIT_PRESETS, "dit-tiny"), num_classes=ucfg.num_classes,
                                   context_dim=ucfg.context_dim)
    unet = build_denoiser(kind, ucfg)
    scramble(unet, *([te] if te is not None else []))
    return LatentDiffusionPipeline(ae, unet, GaussianDiffusion(DiffusionConfig()), tok, te)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


FAST = dict(num_inference_steps=3, output_type="tensor", precision="fp32")


@pytest.mark.parametrize("conditioning, cond, kind", [
    ("class", {"class_labels": [3, 7]}, "unet"),
    ("text", {"prompt": ["a red 7 on grass", "a blue 1 on plain"]}, "unet"),
    ("none", {"num_images": 2}, "unet"),
    ("class", {"class_labels": [3, 7]}, "dit"),
    ("text", {"prompt": ["a red 7 on grass", "a blue 1 on plain"]}, "dit"),
])
def test_save_load_round_trip_gives_identical_images(tmp_path, conditioning, cond, kind):
    pipe = make(conditioning, kind)
    before = pipe(**cond, generator=gen(), **FAST).images
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["conditioning"] == conditioning and index["denoiser"] == kind
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "p")
    assert loaded.conditioning == conditioning and loaded.autoencoder.scale_factor == 0.7
    after = loaded(**cond, generator=gen(), **FAST).images
    C = 3 if conditioning == "text" else 1
    assert before.shape == (2, C, 32, 32) and torch.equal(before, after)
    assert before.abs().max() <= 1


def test_pil_output_and_images_per_condition():
    pipe = make("class")
    out = pipe(class_labels=torch.tensor([1, 2]), num_images=2, num_inference_steps=2, precision="fp32",
               generator=gen())
    assert len(out.images) == 4 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.images[0].mode == "L" and out.images[0].size == (32, 32)
    assert make("text")(prompt="a red 7 on grass", num_inference_steps=1, precision="fp32").images[0].mode == "RGB"
    # batching does not change the samples: one generator, used batch after batch in order
    whole = pipe(class_labels=[1, 2, 3], generator=gen(), **FAST).images
    split = pipe(class_labels=[1, 2, 3], generator=gen(), batch_size=2, **FAST).images
    assert torch.allclose(whole[:2], split[:2], atol=1e-5)


def manual_sample(pipe, cond, n: int, w: float, null=None) -> torch.Tensor:
    """The latent loop written out: DDIM in z, then z / scale_factor decoded once."""
    z = pipe.diffusion.sample_ddim(pipe.denoiser, (n, 4, 8, 8), cond, null, num_steps=3, guidance_scale=w,
                                   generator=gen(), progress=False)
    return pipe.autoencoder.decode(z / pipe.autoencoder.scale_factor).clamp(-1, 1)


def test_guidance_one_is_the_conditional_path_and_zero_the_unconditional_one():
    pipe = make("class")
    labels = torch.tensor([3, 7])
    w1 = pipe(class_labels=labels, guidance_scale=1.0, generator=gen(), **FAST).images
    assert torch.equal(w1, manual_sample(pipe, labels, 2, 1.0))
    w3 = pipe(class_labels=labels, guidance_scale=3.0, generator=gen(), **FAST).images
    assert torch.allclose(w3, manual_sample(pipe, labels, 2, 3.0, null=10), atol=1e-5)
    assert (w3 - w1).abs().max() > 1e-3  # guidance changes the samples
    # w = 0: eps_null + 0 (eps_cond - eps_null) = eps_null, the samples of no label at all
    w0 = pipe(class_labels=labels, guidance_scale=0.0, generator=gen(), **FAST).images
    uncond = pipe(num_images=2, generator=gen(), **FAST).images
    assert torch.allclose(w0, uncond, atol=1e-4)

    text = make("text")
    w0 = text(prompt=["a red 7 on grass", "a blue 1 on plain"], guidance_scale=0.0, generator=gen(), **FAST).images
    empty = text(num_images=2, generator=gen(), **FAST).images  # no prompt = the empty prompt ""
    assert torch.allclose(w0, empty, atol=1e-4)
    w1 = text(prompt=["a red 7 on grass", "a blue 1 on plain"], guidance_scale=1.0, generator=gen(), **FAST).images
    assert (w1 - empty).abs().max() > 1e-3  # the prompt matters


@pytest.mark.parametrize("conditioning, kwargs, match", [
    ("class", {"prompt": "a red 7 on grass"}, "class-conditional.*class_labels="),
    ("text", {"class_labels": [1]}, "text-to-image.*prompt="),
    ("none", {"class_labels": [1]}, "unconditional"),
    ("text", {"prompt": ["a red 7", 3]}, "prompt"),
    ("class", {"class_labels": [3, 10]}, r"\[10\] out of range; valid labels: 0..9"),
    ("class", {"class_labels": -1}, "out of range"),
    ("class", {"class_labels": torch.tensor([1.0])}, "integers"),
    ("class", {"class_labels": [], }, "empty"),
    ("class", {"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ("class", {"guidance_scale": math.nan}, "guidance_scale"),
    ("class", {"guidance_scale": math.inf}, "guidance_scale"),
    ("class", {"num_inference_steps": 0}, r"1\.\.1000"),
    ("class", {"num_inference_steps": 1001}, r"1\.\.1000"),
    ("class", {"num_inference_steps": 2.5}, "integer"),
    ("class", {"sampler": "euler"}, "unknown sampler 'euler' for DDPM; valid samplers: ddim, ddpm"),
    ("class", {"shift": 3.0}, "shift is a rectified-flow sampling option"),
    ("class", {"output_type": "numpy"}, "unknown output_type 'numpy'; valid: pil, np, pt, latent, tensor"),
    ("class", {"eta": 1.5}, "eta"),
    ("class", {"num_images": 0}, "num_images must be an integer >= 1"),
    ("class", {"precision": "fp8"}, "precision"),
])
def test_bad_inputs_are_value_errors_that_say_what_is_valid(conditioning, kwargs, match):
    pipe = make(conditioning)
    with pytest.raises(ValueError, match=match):
        pipe(**{"num_inference_steps": 1, **kwargs})


def test_constructor_checks_the_parts_fit():
    pipe = make("text")
    ae, unet, diffusion, tok, te = pipe.autoencoder, pipe.denoiser, pipe.diffusion, pipe.tokenizer, pipe.text_encoder
    with pytest.raises(ValueError, match="together"):
        LatentDiffusionPipeline(ae, unet, diffusion, tok, None)
    with pytest.raises(ValueError, match="context_dim=16"):
        LatentDiffusionPipeline(ae, unet, diffusion)
    wide = TextEncoder(dataclasses.replace(te.cfg, dim=32, num_heads=2))
    with pytest.raises(ValueError, match="dim=32 must equal the denoiser's context_dim=16"):
        LatentDiffusionPipeline(ae, unet, diffusion, tok, wide)
    with pytest.raises(ValueError, match="no cross-attention"):
        LatentDiffusionPipeline(ae, make("class").denoiser, diffusion, tok, te)
    ae8 = AutoencoderKL(dataclasses.replace(ae.cfg, z_channels=8))
    with pytest.raises(ValueError, match="z_channels=8"):
        LatentDiffusionPipeline(ae8, unet, diffusion, tok, te)
    with pytest.raises(ValueError, match="unet, dit"):
        LatentDiffusionPipeline(ae, torch.nn.Linear(2, 2), diffusion)
    sigma = build_denoiser("dit", dataclasses.replace(get_preset(DIT_PRESETS, "dit-tiny"), learn_sigma=True))
    with pytest.raises(ValueError, match="learn_sigma=False"):
        LatentDiffusionPipeline(ae, sigma, diffusion)


def test_build_denoiser_names_the_valid_kinds():
    assert isinstance(build_denoiser("unet", get_preset(UNET_PRESETS, "tiny-latent")), UNet)
    with pytest.raises(ValueError, match="unknown denoiser 'vit'; valid denoisers: unet, dit"):
        build_denoiser("vit", UNetConfig())
    with pytest.raises(ValueError, match="UNetConfig"):
        build_denoiser("unet", TextEncoderConfig())


TEXT_FILES = ["model_index.json", "autoencoder/config.json", "autoencoder/model.pt", "denoiser/config.json",
              "denoiser/model.pt", "scheduler/config.json", "text_encoder/config.json", "text_encoder/model.pt"]


@pytest.mark.parametrize("name", TEXT_FILES)
def test_a_missing_or_corrupt_file_is_a_checkpoint_error_naming_it(tmp_path, name):
    make("text").save_pretrained(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        LatentDiffusionPipeline.from_pretrained(tmp_path)
    make("text").save_pretrained(tmp_path)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) // 2])  # an interrupted write
    with pytest.raises(CheckpointError, match=name):
        LatentDiffusionPipeline.from_pretrained(tmp_path)


def edit_json(path, **changes) -> None:
    d = json.loads(path.read_text())
    for key, value in changes.items():
        *outer, last = key.split(".")
        node = d
        for k in outer:
            node = node[k]
        node[last] = value
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("name, changes, match", [
    ("model_index.json", {"denoiser": "vit"}, "model_index.json"),
    ("model_index.json", {"conditioning": "class"}, "model_index.json"),
    ("denoiser/config.json", {"config.ch": 32}, "denoiser/model.pt"),      # weights no longer fit the config
    ("denoiser/config.json", {"config.ch": "wide"}, "denoiser/config.json"),
    ("denoiser/config.json", {"model": "dit"}, "denoiser/config.json"),
    ("scheduler/config.json", {"schedule": "quadratic"}, "scheduler/config.json"),
    ("text_encoder/config.json", {"tokenizer.vocab": ["a", "red"]}, "text_encoder/config.json"),
    ("text_encoder/config.json", {"tokenizer.unk": False}, "text_encoder/config.json"),  # one id short
    ("autoencoder/config.json", {"config.z_channels": 8}, "autoencoder/model.pt"),
])
def test_a_mismatched_file_is_a_checkpoint_error_naming_it(tmp_path, name, changes, match):
    make("text").save_pretrained(tmp_path)
    edit_json(tmp_path / name, **changes)
    with pytest.raises(CheckpointError, match=match):
        LatentDiffusionPipeline.from_pretrained(tmp_path)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- diffusers' output types
def test_output_types_follow_diffusers_conventions():
    """"pt" and "np" are images in [0, 1] (diffusers' VaeImageProcessor.postprocess), our "tensor" the same
    images in [-1, 1]; "latent" is the scaled z0 before decoding; "pil" the same pixels as 8-bit images."""
    pipe = make("text")
    out = {t: pipe(prompt=["a red 7 on grass", "a blue 1 on plain"], num_inference_steps=2, precision="fp32",
                   generator=gen(), output_type=t).images for t in ("tensor", "pt", "np", "pil", "latent")}
    x = out["tensor"]  # (2, 3, 32, 32) in [-1, 1]
    assert x.shape == (2, 3, 32, 32) and x.min() < 0
    torch.testing.assert_close(out["pt"], (x + 1) / 2)
    assert isinstance(out["np"], np.ndarray) and out["np"].dtype == np.float32 and out["np"].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out["np"], out["pt"].permute(0, 2, 3, 1).numpy())  # (B, H, W, C)
    assert 0 <= out["np"].min() and out["np"].max() <= 1
    assert len(out["pil"]) == 2 and np.array_equal(np.asarray(out["pil"][0]), np.round(out["np"][0] * 255))
    z0 = out["latent"]  # scaled, as the denoiser made it: decode(z0 / scale_factor) renders the images
    assert z0.shape == (2, 4, 8, 8)
    with torch.no_grad():
        decoded = pipe.autoencoder.decode(z0 / pipe.autoencoder.scale_factor).clamp(-1, 1)
    torch.testing.assert_close(decoded, x)


# ----------------------------------------------------------------------------- prompts outside the vocabulary
def test_unknown_words_warn_and_still_sample():
    pipe = make("text")
    with pytest.warns(UserWarning, match=r"\['purple'\] encoded as \[unk\]"):
        x = pipe(prompt="a purple 7 on grass", generator=gen(), **FAST).images
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()
    with pytest.warns(UserWarning, match="longer than 5 words"):  # cut to the tokenizer's length, like diffusers
        pipe(prompt="a red 7 on grass today", generator=gen(), **FAST)


def test_a_pipeline_saved_before_unk_loads_and_samples_the_same(tmp_path):
    """A text pipeline saved before [unk] existed: its tokenizer dict has no "unk" key and its encoder one
    embedding row fewer. It loads, gives the images the same weights give today, and refuses unknown words."""
    from ldm_scratch.text import Tokenizer as Tok
    new = make("text")
    old_tok = Tok(new.tokenizer.words, new.tokenizer.max_length, unk=False)
    old_te = TextEncoder(dataclasses.replace(new.text_encoder.cfg, vocab_size=old_tok.vocab_size))
    state = dict(new.text_encoder.state_dict())
    state["token_emb.weight"] = state["token_emb.weight"][:-1]  # every row but [unk]'s, the last
    old_te.load_state_dict(state)
    LatentDiffusionPipeline(new.autoencoder, new.denoiser, new.diffusion, old_tok, old_te).save_pretrained(tmp_path)
    index = tmp_path / "text_encoder" / "config.json"
    d = json.loads(index.read_text())
    del d["tokenizer"]["unk"]  # exactly the old file: {"vocab": [...], "max_length": L}
    index.write_text(json.dumps(d))
    old = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert old.tokenizer.unk_id is None and old.text_encoder.cfg.vocab_size == new.tokenizer.vocab_size - 1
    prompts = ["a red 7 on grass", "a blue 1 on plain"]
    torch.testing.assert_close(old(prompt=prompts, generator=gen(), **FAST).images,
                               new(prompt=prompts, generator=gen(), **FAST).images)
    with pytest.raises(ValueError, match="unknown word 'purple'.*without \\[unk\\]"):
        old(prompt="a purple 7 on grass", **FAST)


# ---------------------------------------------------------------------------------- the objective (issue #13)
def flow_pipeline(shift: float = 1.0) -> LatentDiffusionPipeline:
    """make("class")'s parts with a rectified flow in place of DDPM."""
    ddpm = make("class")
    return LatentDiffusionPipeline(ddpm.autoencoder, ddpm.denoiser, RectifiedFlow(FlowConfig(shift=shift)))


def test_a_gaussian_diffusion_is_wrapped_as_ddpm_around_the_same_object():
    diffusion = GaussianDiffusion(DiffusionConfig())
    pipe = LatentDiffusionPipeline(make("class").autoencoder, make("class").denoiser, diffusion)
    assert isinstance(pipe.objective, DDPMObjective) and pipe.diffusion is diffusion
    assert pipe.objective.sampler_names[0] == "ddim"   # the default sampler, as before objectives
    with pytest.raises(ValueError, match="Objective .* or a GaussianDiffusion; got DiffusionConfig"):
        LatentDiffusionPipeline(pipe.autoencoder, pipe.denoiser, DiffusionConfig())


def test_a_ddpm_pipeline_samples_through_its_objective_as_it_did_directly():
    """Bit-equal to the GaussianDiffusion call the pipeline made before objectives (DDIM, guidance, eta)."""
    pipe = make("class")
    for kw in (dict(eta=0.0), dict(eta=1.0)):
        z = pipe(class_labels=[1, 2], generator=gen(5), guidance_scale=2.0, **{**FAST, "output_type": "latent"},
                 **kw).images
        direct = pipe.diffusion.sample_ddim(pipe.denoiser, (2, 4, 8, 8), torch.tensor([1, 2]),
                                            pipe.denoiser.null_class, num_steps=3, eta=kw["eta"], guidance_scale=2.0,
                                            generator=gen(5), progress=False, clip_x0=False)
        assert torch.equal(z, direct)


def test_a_flow_pipeline_samples_saves_and_loads(tmp_path):
    pipe = flow_pipeline(shift=2.0)
    assert pipe.objective.name == "flow"
    with pytest.raises(AttributeError, match="not DDPM"):
        pipe.diffusion
    images = {s: pipe(class_labels=[3, 7], sampler=s, generator=gen(1), **FAST).images for s in ("euler", "heun")}
    assert images["euler"].shape == (2, 1, 32, 32) and not torch.equal(images["euler"], images["heun"])
    # the default sampler is the objective's first: Euler
    assert torch.equal(pipe(class_labels=[3, 7], generator=gen(1), **FAST).images, images["euler"])
    # a shift given at the call overrides the saved one
    assert not torch.equal(pipe(class_labels=[3, 7], generator=gen(1), shift=1.0, **FAST).images, images["euler"])
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler" / "config.json").read_text())
    assert saved["objective"] == "flow" and saved["shift"] == 2.0
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.objective, RectifiedFlow) and loaded.objective.cfg == pipe.objective.cfg
    for s, x in images.items():
        assert torch.equal(loaded(class_labels=[3, 7], sampler=s, generator=gen(1), **FAST).images, x)


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "ddim"}, "unknown sampler 'ddim' for rectified flow; valid samplers: euler, heun"),
    ({"sampler": "ddpm"}, "valid samplers: euler, heun"),
    ({"eta": 0.5}, "eta is DDIM's noise.*'flow'"),
    ({"shift": 0.0}, "shift must be a finite number > 0"),
    ({"num_inference_steps": 0}, "num_steps must be an integer >= 1"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
])
def test_a_flow_pipeline_refuses_what_its_objective_lacks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_pipeline()(**{"class_labels": [1], "num_inference_steps": 1, **kwargs})


def test_a_scheduler_saved_before_objectives_loads_as_ddpm(tmp_path):
    """scheduler/config.json used to be a plain DiffusionConfig dict (no "objective" key)."""
    pipe = make("class")
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler" / "config.json").read_text())["objective"] == "ddpm"
    (tmp_path / "scheduler" / "config.json").write_text(json.dumps(
        {"num_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "schedule": "linear", "prediction": "eps"}))
    old = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(old.objective, DDPMObjective) and old.diffusion.cfg == pipe.diffusion.cfg
    assert torch.equal(old(class_labels=[4], generator=gen(2), **FAST).images,
                       pipe(class_labels=[4], generator=gen(2), **FAST).images)


# ----------------------------------------------------------------------------- compile() (device.CompiledForSampling)

@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor needs a C++ compiler on the CPU (the fallback is tested below)")
@pytest.mark.parametrize("kind", ["dit", "unet"])  # the U-Net compiles in channels_last, its default
def test_compiled_sampling_matches_uncompiled_and_follows_a_weight_change(capsys, kind):
    """A real inductor compile of a tiny denoiser (fp32, frozen weights): the same images as the plain model up
    to summation order. DiT only (the rule is the wrapper's, not the model's; each compile costs ~15 s): after an
    in-place weight change the frozen graph must not be reused."""
    pipe = make("class", kind)
    ref = pipe(class_labels=[3, 7], generator=gen(), **FAST).images
    pipe.compile()
    out = pipe(class_labels=[3, 7], generator=gen(), **FAST).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert pipe.compiled.fallback is None, pipe.compiled.fallback   # it really compiled (a C++ compiler is there)
    assert len(pipe.compiled.compile_seconds) == 1                  # one shape: the guided batch [cond; null]
    if kind != "dit":
        return
    scramble(pipe.denoiser)                                         # in place, as a further optimizer step would
    out2 = pipe(class_labels=[3, 7], generator=gen(), **FAST).images
    assert "weights changed" in capsys.readouterr().out
    ref2 = pipe.compile(False)(class_labels=[3, 7], generator=gen(), **FAST).images
    assert (ref2 - ref).abs().max() > 1e-3                          # the change shows in the images...
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-4)    # ...and the compiled pipeline follows it


def test_compile_falls_back_to_the_plain_model_with_a_warning(monkeypatch):
    """No C++ compiler (or an op inductor cannot take): the first call warns and sampling runs uncompiled,
    with identical images; an input error the plain model raises is still raised."""
    def broken_compile(model, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InductorError: no C++ compiler found")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    pipe = make("class")
    ref = pipe(class_labels=[3, 7], generator=gen(), **FAST).images
    pipe.compile()
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        out = pipe(class_labels=[3, 7], generator=gen(), **FAST).images
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the plain model (in channels_last: summation order)
    assert "no C++ compiler" in pipe.compiled.fallback
    with pytest.raises(Exception):  # the model's own error for a wrong channel count, not swallowed
        pipe.compiled(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]))


def test_compiled_wrapper_runs_the_plain_model_when_gradients_are_on(monkeypatch):
    """Freezing is for inference: with autograd on (training), the wrapper never calls the compiled graph."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: lambda *a, **k: calls.append(1))
    pipe = make("class").compile()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 9])
    out = pipe.compiled(x, t, torch.tensor([1, 2]))
    assert calls == [] and out.requires_grad
    torch.testing.assert_close(out, pipe.denoiser(x, t, torch.tensor([1, 2])))


def test_compiled_calls_run_without_inductor_pattern_passes(monkeypatch):
    """device.CompiledDenoiser turns inductor's pattern passes off while it compiles and runs (they would swap
    layers.attention for the fused kernel, slower at our sizes) and freezes the weights for sampling only;
    inductor_patterns=True keeps the passes. The global config is left as it was."""
    import torch._inductor.config as inductor_config
    seen = []

    def fake_compile(model, **kwargs):
        def call(*args, **kw):
            seen.append((inductor_config.pattern_matcher, inductor_config.freezing))
            return model(*args, **kw)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    before = inductor_config.pattern_matcher
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 9]), torch.tensor([1, 2])
    with torch.no_grad():
        make("class").compile().compiled(x, t, y)
        make("class").compile(inductor_patterns=True).compiled(x, t, y)
    from ldm_scratch.device import CompiledForTraining
    den = make("class").denoiser
    CompiledForTraining(den, verbose=False)(x, t, y)
    assert seen == [(False, True), (True, True), (False, False)]
    assert inductor_config.pattern_matcher == before


@pytest.mark.parametrize("kind", ["class", "text"])
def test_compiled_sampling_pads_a_smaller_batch_up_to_a_compiled_one(monkeypatch, kind):
    """The last partial batch runs padded to a batch size already compiled (the padding at most 1/8 of it), its
    rows cut back out, instead of compiling again; further below (or with pad_batches=False) the new shape is
    compiled, since every later call of that size would pay the padding again. A fake torch.compile records the
    rows each call gets and runs the plain model."""
    from ldm_scratch.device import PAD_MAX_FRACTION
    assert PAD_MAX_FRACTION == 1 / 8
    rows = []

    def fake_compile(model, **kwargs):
        def call(x, t, cond):
            rows.append(x.shape[0])
            return model(x, t, cond)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = make(kind)
    torch.manual_seed(0)
    den = pipe.denoiser.eval()

    def inputs(n):
        x, t = torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,))
        if kind == "class":
            return x, t, torch.randint(0, 11, (n,))
        context = torch.randn(n, 5, den.cfg.context_dim)
        return x, t, (context, torch.arange(5).expand(n, 5) < torch.randint(1, 6, (n, 1)))  # (context, mask)

    compiled = pipe.compile(verbose=False).compiled
    with torch.no_grad():
        compiled(*inputs(16))                                   # compiles 16 rows
        args = inputs(15)
        out = compiled(*args)                                   # 1 row of padding: padded to 16
        assert rows == [16, 16] and out.shape[0] == 15
        torch.testing.assert_close(out, den(*args), rtol=1e-5, atol=1e-5)  # the padding changes no kept row
        compiled(*inputs(14))                                   # 2 of 16 = 1/8: padded
        compiled(*inputs(12))                                   # 4 of 16: its own shape
        compiled(*inputs(8))                                    # half (w = 1 after a guided call): its own shape
        compiled(*inputs(16))                                   # a compiled shape: as it is
        assert rows == [16, 16, 16, 12, 8, 16]
        pipe.compile(verbose=False, pad_batches=False).compiled(*inputs(16))
        pipe.compiled(*inputs(15))
        assert rows[-2:] == [16, 15]


def test_moving_a_compiled_pipeline_keeps_its_compile_options():
    """pipe.to() compiles afresh (frozen weights live on the old device) with the options it was compiled with."""
    pipe = make("class").compile(verbose=False, inductor_patterns=True, pad_batches=False)
    old = pipe.compiled
    pipe.to("cpu")
    assert pipe.compiled is not old
    assert (pipe.compiled.inductor_patterns, pipe.compiled.pad_batches, pipe.compiled.verbose) == (True, False, False)
