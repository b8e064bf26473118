"""Editing in the latent (editing.py, the pipeline's img2img / invert / inpaint, the `edit` command): the strength's
two ends, the levels each strength visits, DDIM inversion against a closed form (and two wrong formulas the same
tolerance rejects), inversion round trips of an untrained U-Net for DDPM and flow, inpainting's kept region,
distance rising with strength, and every bad input's message.

The closed form: for data x0 ~ N(mu, sigma^2 I), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is Gaussian with mean
sqrt(ab) mu and variance S = ab sigma^2 + 1 - ab, and the optimal eps_pred is E[eps | x_t] = sqrt(1 - ab) (x_t -
sqrt(ab) mu) / S. Its probability-flow ODE (what DDIM with eta 0 discretises) keeps each point at a fixed
standard score, so x0 = mu + sigma xi sits on the path x_t = sqrt(ab) mu + sqrt(S) xi: inverting x0 to the
level tau must give exactly that.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scratch import editing
from ldm_scratch.autoencoder import measure_scale_factor
from ldm_scratch.config import DiffusionConfig
from ldm_scratch.flow import FlowConfig, RectifiedFlow
from ldm_scratch.objectives import DDPMObjective
from ldm_scratch.pipeline import LatentDiffusionPipeline
from test_pipeline import gen, make

FAST = dict(num_inference_steps=6, output_type="tensor", precision="fp32")
MU, SIGMA = 0.7, 0.5


def with_objective(pipe, objective):
    return LatentDiffusionPipeline(pipe.autoencoder, pipe.denoiser, objective, pipe.tokenizer, pipe.text_encoder)


def pipes():
    """The same scrambled class-conditional U-Net under DDPM (eps), DDPM (v) and rectified flow, over an untrained
    autoencoder whose scale factor is measured as training measures it (latents of unit spread, not make's 0.7)."""
    ddpm = make("class")
    ddpm.autoencoder.scale_factor = measure_scale_factor(ddpm.autoencoder, images(B=16, seed=9), sample_posterior=False)
    return {"ddpm": ddpm, "v": with_objective(ddpm, DDPMObjective(DiffusionConfig(prediction="v"))),
            "flow": with_objective(ddpm, RectifiedFlow(FlowConfig()))}


def images(B=2, C=1, seed=5):
    return torch.rand(B, C, 32, 32, generator=gen(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------
# img2img: the two ends of the strength, and what lies between
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddpm", "flow"])
def test_strength_zero_is_the_autoencoders_reconstruction(name):
    pipe, x = pipes()[name], images()
    out = pipe.img2img(x, strength=0.0, class_labels=[3, 7], generator=gen(1), **FAST).images
    ae = pipe.autoencoder
    rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    assert (out - rec).abs().max() < 1e-5      # z0 * scale_factor / scale_factor: rounding only
    assert torch.equal(pipe.img2img(x, strength=0.0, output_type="latent", precision="fp32").images,
                       pipe.encode(x, "fp32"))


@pytest.mark.parametrize("name, conditioning", [("ddpm", "class"), ("flow", "class"), ("ddpm", "text")])
def test_strength_one_is_plain_sampling_from_the_same_noise(name, conditioning):
    base = make(conditioning)
    pipe = base if name == "ddpm" else with_objective(base, RectifiedFlow(FlowConfig(shift=2.0)))
    C = 3 if conditioning == "text" else 1
    cond = {"class_labels": [3, 7]} if conditioning == "class" else {"prompt": ["a red 7 on grass", "a blue 1 on plain"]}
    edited = pipe.img2img(images(C=C), strength=1.0, generator=gen(1), **cond, **FAST).images
    sampled = pipe(generator=gen(1), **cond, **FAST).images
    assert torch.equal(edited, sampled)


def test_levels_each_strength_visits():
    ddpm = DDPMObjective()      # leading spacing, 10 steps of T = 1000: 900, 800, ..., 0
    assert editing.levels(ddpm, 1.0, 10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0, -1]
    assert editing.levels(ddpm, 0.5, 10) == [400, 300, 200, 100, 0, -1]        # the last round(0.5 x 10)
    assert editing.levels(ddpm, 0.01, 10) == [0, -1]                           # s > 0 runs at least one step
    assert editing.levels(ddpm, 0.0, 10) == [-1]                               # none: z0 itself
    flow = RectifiedFlow()
    assert editing.levels(flow, 0.5, 10) == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])  # t_start = s
    assert editing.levels(flow, 1.0, 10) == flow.timesteps(10)
    # with a shift, the step count follows the unshifted time, so the steps keep plain sampling's size
    shifted = editing.levels(flow, 0.75, 10, shift=3.0)                        # unshift(0.75, 3) = 0.5: 5 steps
    assert shifted == pytest.approx(flow.timesteps(10, shift=3.0)[5:]) and shifted[0] == 0.75


def test_the_noised_start_is_q_sample_with_the_given_noise():
    z0, eps = torch.randn(2, 4, 8, 8, generator=gen(0)), torch.randn(2, 4, 8, 8, generator=gen(1))
    ddpm = DDPMObjective()
    ab = float(ddpm.diffusion.alpha_bars[400])
    assert torch.allclose(editing.noise_to(ddpm, z0, 400, eps), math.sqrt(ab) * z0 + math.sqrt(1 - ab) * eps, atol=1e-6)
    assert torch.equal(editing.noise_to(ddpm, z0, editing.CLEAN, eps), z0)
    assert torch.allclose(editing.noise_to(RectifiedFlow(), z0, 0.3, eps), 0.7 * z0 + 0.3 * eps, atol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "v", "flow"])
def test_latent_distance_to_the_input_rises_with_strength(name):
    # Deterministic for a fixed noise: the further the start from z0, the further the result. (In pixels the
    # untrained autoencoder's own error, 0.63 RMS here, hides it; the trained-model measurement is the README's.)
    pipe, x = pipes()[name], images(B=4)
    z0 = pipe.encode(x, "fp32")
    dist = [(pipe.img2img(x, strength=s, class_labels=3, generator=gen(1), guidance_scale=1.0,
                          **{**FAST, "num_inference_steps": 20, "output_type": "latent"}).images - z0).pow(2).mean().sqrt().item()
            for s in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)]
    assert dist[0] == 0 and all(a < b for a, b in zip(dist, dist[1:])), dist


# ------------------------------------------------------------------------------------------------
# DDIM inversion: a closed form, and the tolerance that rejects wrong formulas
# ------------------------------------------------------------------------------------------------

def gaussian_eps(diffusion):
    def model(x, t, cond=None):
        ab = diffusion.alpha_bars[t].view(-1, 1, 1, 1).double()
        return ((1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / (ab * SIGMA ** 2 + 1 - ab)).float()
    return model


def inversion_error(num_steps, invert_step=None, monkeypatch=None):
    """max |DDIM inversion of x0 - the exact point of its ODE path at the last level|, for Gaussian data."""
    ddpm = DDPMObjective()
    if invert_step is not None:
        monkeypatch.setattr(editing, "ddim_invert_step", invert_step)
    xi = torch.randn(4, 4, 8, 8, generator=gen(0))
    z_T = editing.invert_latent(ddpm, gaussian_eps(ddpm.diffusion), MU + SIGMA * xi, num_steps)
    ab = float(ddpm.diffusion.alpha_bars[ddpm.diffusion.ddim_timesteps(num_steps)[0]])
    exact = math.sqrt(ab) * MU + math.sqrt(ab * SIGMA ** 2 + 1 - ab) * xi
    return (z_T - exact).abs().max().item()


def test_ddim_inversion_reaches_the_exact_noise_and_converges_at_first_order():
    e50, e200 = inversion_error(50), inversion_error(200)
    assert e200 < 0.03                          # measured 0.017
    assert 0.2 < e200 / e50 < 0.35              # first order: 4x the steps, a quarter of the error


def wrong_ratio(diffusion, eps, t, t_next, x):
    """A plausible slip: sqrt(ab_next / ab_t) x + (sqrt(1 - ab_next) - sqrt(1 - ab_t)) eps (the ratio dropped
    from the second term)."""
    ab_t = 1.0 if t == editing.CLEAN else float(diffusion.alpha_bars[t])
    ab_next = float(diffusion.alpha_bars[t_next])
    return math.sqrt(ab_next / ab_t) * x + (math.sqrt(1 - ab_next) - math.sqrt(1 - ab_t)) * eps


def wrong_no_sqrt(diffusion, eps, t, t_next, x):
    """Another: alpha_bar where sqrt(alpha_bar) belongs."""
    ab_t = 1.0 if t == editing.CLEAN else float(diffusion.alpha_bars[t])
    ab_next = float(diffusion.alpha_bars[t_next])
    return ab_next * (x - (1 - ab_t) * eps) / ab_t + (1 - ab_next) * eps


@pytest.mark.parametrize("wrong", [wrong_ratio, wrong_no_sqrt])
def test_the_same_tolerance_rejects_wrong_inversion_formulas(wrong, monkeypatch):
    assert inversion_error(200, wrong, monkeypatch) > 0.3       # 10x past the bound the right formula meets


def test_untrained_v_unet_round_trips_at_first_order(monkeypatch):
    # An untrained (scrambled) U-Net read as v: eps = sqrt(1 - ab) x + sqrt(ab) v is about x near t = T and
    # x0 = sqrt(ab) x - sqrt(1 - ab) v about x near 0, so the field is tame at both ends and the round trip
    # converges as the steps shrink. (Read as eps instead, the same network's error is multiplied by up to
    # sqrt((1 - ab) / ab) = 158 near T: RMS 16 at 40 steps, 8.6 at 80, on this unit-spread latent.)
    pipe, x = pipes()["v"], images()
    z0 = pipe.encode(x, "fp32")

    def error(n):   # RMS of z0' - z0, the latent having unit spread
        z_T = pipe.invert(x, class_labels=[3, 7], num_inference_steps=n, precision="fp32")
        back = pipe.img2img(x, strength=1.0, noise=z_T, class_labels=[3, 7], guidance_scale=1.0,
                            **{**FAST, "num_inference_steps": n, "output_type": "latent"}).images
        return (back - z0).pow(2).mean().sqrt().item()
    e20, e40 = error(20), error(40)
    assert e40 < 0.1 and 0.4 < e40 / e20 < 0.6, (e20, e40)      # measured 0.13, 0.066
    monkeypatch.setattr(editing, "ddim_invert_step", wrong_ratio)
    assert error(40) > 0.3                                       # the slip fails the same bound


def test_flow_inversion_then_generation_round_trips():
    pipe, x = pipes()["flow"], images()
    z0 = pipe.encode(x, "fp32")

    def error(n, sampler):   # RMS of z0' - z0, the latent having unit spread
        z_T = pipe.invert(x, class_labels=[3, 7], num_inference_steps=n, sampler=sampler, precision="fp32")
        assert torch.equal(z_T, pipe.objective.invert(pipe.denoiser, z0, torch.tensor([3, 7]), num_steps=n,
                                                      sampler=sampler, progress=False))   # the flow's own inverse
        back = pipe.img2img(x, strength=1.0, noise=z_T, class_labels=[3, 7], sampler=sampler, guidance_scale=1.0,
                            **{**FAST, "num_inference_steps": n, "output_type": "latent"}).images
        return (back - z0).pow(2).mean().sqrt().item()
    euler10, euler20 = error(10, "euler"), error(20, "euler")
    assert euler20 < 0.03 and 0.4 < euler20 / euler10 < 0.6, (euler10, euler20)     # measured 0.054, 0.027
    # Heun is second order, but sampling's last step into t = 0 stays Euler (flow.py), so the round trip
    # is still first order overall, with a far smaller constant
    heun10, heun20 = error(10, "heun"), error(20, "heun")
    assert heun20 < euler20 / 3 and heun20 / heun10 < 0.6, (heun10, heun20)          # measured 0.0091, 0.0049


def test_round_trip_reports_psnr_against_the_reconstruction_and_guidance_costs():
    pipe, x = pipes()["v"], images()
    rows = editing.inversion_psnr(pipe, x, steps=(10, 40), guidance_scales=(1.0, 4.0), class_labels=[3, 7],
                                  precision="fp32")
    table = {(r["steps"], r["guidance_scale"]): r for r in rows}
    assert table[(40, 1.0)]["latent_rms"] < table[(10, 1.0)]["latent_rms"]       # more steps, a closer return
    assert table[(40, 1.0)]["psnr_db"] > table[(10, 1.0)]["psnr_db"]
    assert table[(40, 4.0)]["latent_rms"] > table[(40, 1.0)]["latent_rms"]       # guidance breaks inversion


# ------------------------------------------------------------------------------------------------
# Inpainting
# ------------------------------------------------------------------------------------------------

def test_the_pixel_mask_is_max_pooled_to_the_latent():
    mask = torch.zeros(32, 32)
    mask[5, 9] = 1                                          # one pixel -> its latent cell (f = 4): (1, 2)
    m = editing.mask_to_latent(mask, (2, 1, 32, 32), 4)
    assert m.shape == (1, 1, 8, 8) and m.dtype == torch.bool and m.sum() == 1 and m[0, 0, 1, 2]
    png = Image.fromarray((mask.numpy() * 255).astype(np.uint8))     # white = regenerate
    assert torch.equal(editing.mask_to_latent(png, (2, 1, 32, 32), 4), m)


@pytest.mark.parametrize("name, strength", [("ddpm", 1.0), ("ddpm", 0.6), ("flow", 1.0), ("flow", 0.6)])
def test_inpainting_keeps_the_unmasked_latent_exactly(name, strength):
    pipe, x = pipes()[name], images()
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1                              # regenerate a 16 x 16 square
    z0 = pipe.encode(x, "fp32")
    z = pipe.inpaint(x, mask, class_labels=[3, 7], strength=strength, generator=gen(2),
                     **{**FAST, "output_type": "latent"}).images
    keep = ~editing.mask_to_latent(mask, x.shape, 4).expand_as(z)
    assert torch.equal(z[keep], z0[keep])                   # the known latent comes back bit for bit
    assert (z[~keep] - z0[~keep]).abs().max() > 0.05        # and the masked region was repainted
    everywhere = pipe.inpaint(x, torch.ones(32, 32), class_labels=[3, 7], strength=strength, generator=gen(2),
                              **{**FAST, "output_type": "latent"}).images
    plain = pipe.img2img(x, class_labels=[3, 7], strength=strength, generator=gen(2),
                         **{**FAST, "output_type": "latent"}).images
    assert torch.equal(everywhere, plain)                   # a full mask is img2img


@pytest.mark.parametrize("name", ["ddpm", "flow"])
def test_inpainting_pastes_the_kept_pixels_back(name):
    pipe, x = pipes()[name], images()
    mask = torch.zeros(32, 32)
    mask[8:24, 4:20] = 1                                    # one mask for both images
    kw = dict(class_labels=[3, 7], strength=1.0, **{**FAST, "output_type": "tensor"})
    pasted = pipe.inpaint(x, mask, generator=gen(2), **kw).images
    rendered = pipe.inpaint(x, mask, generator=gen(2), paste=False, **kw).images
    keep = (mask == 0).expand_as(x)
    assert torch.equal(pasted[keep], x[keep])               # the kept pixels are the image's own
    assert torch.equal(pasted[~keep], rendered[~keep])      # the masked ones are the decoder's
    assert (rendered[keep] - x[keep]).abs().max() > 0.05    # which differs from the image where it keeps it
    pil = pipe.inpaint(x, mask, generator=gen(2), **{**kw, "output_type": "np"}).images   # the other output types
    assert np.allclose(pil, ((pasted + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_inputs_in_every_accepted_form_give_the_same_edit():
    pipe = pipes()["ddpm"]
    arr = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    x = torch.from_numpy(arr).float()[None, None] / 127.5 - 1
    ref = pipe.img2img(x, strength=0.5, class_labels=3, generator=gen(1), **FAST).images
    for form in (arr, arr[:, :, None], Image.fromarray(arr), [Image.fromarray(arr)], x[0],
                 Image.fromarray(arr).convert("RGBA").convert("LA")):
        assert torch.equal(pipe.img2img(form, strength=0.5, class_labels=3, generator=gen(1), **FAST).images, ref)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear message each
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"strength": -0.1}, r"strength must be a number in \[0, 1\]"),
    ({"strength": 1.5}, r"strength must be a number in \[0, 1\]"),
    ({"strength": float("nan")}, r"strength must be a number in \[0, 1\]"),
    ({"strength": True}, r"strength must be a number in \[0, 1\]"),
    ({"image": torch.rand(1, 1, 30, 30) * 2 - 1}, r"30x30 is not divisible by the autoencoder's downsampling factor f=4"),
    ({"image": torch.rand(1, 1, 16, 16) * 2 - 1}, r"16x16: this pipeline makes 32x32 images"),
    ({"image": torch.rand(1, 1, 32, 32) * 255}, r"expected an image in \[-1, 1\].*divide by 127.5"),
    ({"image": torch.full((1, 1, 32, 32), float("nan"))}, r"NaN or inf"),
    ({"image": torch.zeros(1, 1, 32, 32, dtype=torch.uint8)}, r"float in \[-1, 1\], got dtype torch.uint8"),
    ({"image": torch.zeros(1, 3, 32, 32)}, r"takes 1 channel\(s\), got 3 \(an RGB image\)"),
    ({"image": Image.new("RGB", (32, 32))}, r"takes 1 channel\(s\), got 3 \(an RGB image\).*convert"),
    ({"image": np.zeros((32, 32), np.float32)}, r"numpy images must be uint8"),
    ({"image": torch.zeros(32, 32)}, r"\(C, H, W\) or \(B, C, H, W\)"),
    ({"image": "in.png"}, r"must be a PIL image, a uint8 numpy array or a float tensor"),
    ({"sampler": "ddpm"}, r"sampler 'ddpm' cannot edit.*ddim"),
    ({"noise": torch.zeros(1, 4, 4, 4)}, r"noise has shape \(1, 4, 4, 4\); these images' latents are \(2, 4, 8, 8\)"),
    ({"class_labels": [1, 2, 3]}, r"got 3 class labels for 2 image\(s\)"),
    ({"class_labels": [10]}, r"out of range"),
    ({"prompt": "a red 7"}, r"class-conditional"),
])
def test_bad_img2img_input_says_what_is_wrong(kwargs, match):
    pipe = pipes()["ddpm"]
    kw = {"image": images(), "strength": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.img2img(kw.pop("image"), **kw, **FAST)


@pytest.mark.parametrize("mask, match", [
    (torch.zeros(16, 16), r"matching the image's 32x32 pixels"),
    (torch.zeros(3, 1, 32, 32), r"batch 2 \(or 1\); got shape \(3, 1, 32, 32\)"),
    (torch.zeros(2, 3, 32, 32), r"\(H, W\) or \(B, 1, H, W\)"),
    (torch.full((32, 32), 255.0), r"mask values must be in \[0, 1\].*divide by 255"),
    (torch.full((32, 32), -1.0), r"mask values must be in \[0, 1\]"),
    ("mask.png", r"mask must be a tensor, a numpy array or a PIL image"),
])
def test_bad_masks_say_what_is_wrong(mask, match):
    with pytest.raises(ValueError, match=match):
        pipes()["ddpm"].inpaint(images(), mask, **FAST)


@pytest.mark.parametrize("name, kwargs, match", [
    ("flow", {"sampler": "ddim"}, r"unknown sampler 'ddim' for rectified flow"),
    ("flow", {"eta": 0.5}, r"eta is DDIM's noise"),
    ("ddpm", {"shift": 3.0}, r"shift is a rectified-flow sampling option"),
    ("ddpm", {"num_inference_steps": 0}, r"num_inference_steps must be an integer in 1..1000"),
    ("ddpm", {"guidance_scale": -1.0}, r"guidance_scale must be a finite number >= 0"),
])
def test_bad_sampling_options_are_the_pipelines_own_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipes()[name].img2img(images(), **{**FAST, **kwargs})
    if "eta" not in kwargs:
        with pytest.raises(ValueError, match=match):
            pipes()[name].invert(images(), **{k: v for k, v in {**FAST, **kwargs}.items() if k != "output_type"})


# ------------------------------------------------------------------------------------------------
# The `edit` command
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit")
    make("class").save_pretrained(folder / "ddpm")
    with_objective(make("class"), RectifiedFlow()).save_pretrained(folder / "flow")
    arr = ((np.indices((32, 32)).sum(0) * 4) % 256).astype(np.uint8)
    Image.fromarray(arr).save(folder / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:16, :16]).save(folder / "small_mask.png")
    (folder / "not_an_image.png").write_text("hello")
    return folder


@pytest.mark.parametrize("name", ["ddpm", "flow"])
@pytest.mark.parametrize("mode, extra", [("img2img", ["--strength", "0.5", "--class-labels", "7"]),
                                         ("invert", []), ("inpaint", ["--class-labels", "2"])])
def test_edit_command_writes_the_image(saved, tmp_path, capsys, name, mode, extra):
    from ldm_scratch.__main__ import main
    out = tmp_path / "out.png"
    mask = ["--mask", str(saved / "mask.png")] if mode == "inpaint" else []
    assert main(["edit", "--model", str(saved / name), "--image", str(saved / "in.png"), "--mode", mode,
                 "--steps", "4", *extra, *mask, "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32) and Image.open(out).mode == "L"
    printed = capsys.readouterr().out
    assert ("PSNR" in printed) == (mode == "invert") and f"wrote {out}" in printed


@pytest.mark.parametrize("args, match", [
    (["--strength", "2"], r"--strength must be in \[0, 1\]"),
    (["--strength", "nan"], r"--strength must be in \[0, 1\]"),
    (["--mode", "inpaint"], r"--mode inpaint needs --mask"),
    (["--mask", "MASK"], r"--mask is for --mode inpaint"),
    (["--no-paste"], r"--no-paste is for --mode inpaint"),
    (["--mode", "invert", "--no-paste"], r"--no-paste: not used by --mode invert"),
    (["--mode", "invert", "--strength", "0.5"], r"--strength: not used by --mode invert"),
    (["--mode", "inpaint", "--mask", "nowhere.png"], r"--mask nowhere.png: no such file"),
    (["--image", "nowhere.png"], r"--image nowhere.png: no such file"),
    (["--image", "NOT_AN_IMAGE"], r"not an image PIL can read"),
    (["--mode", "inpaint", "--mask", "SMALL_MASK"], r"matching the image's 32x32 pixels"),
    (["--steps", "0"], r"--steps must be >= 1"),
    (["--guidance-scale", "inf"], r"--guidance-scale must be a finite number"),
    (["--eta", "2"], r"--eta must be in \[0, 1\]"),
    (["--model", "nowhere"], r"--model nowhere: no such folder"),
    (["--prompt", "a red 7"], r"class-conditional"),
])
def test_edit_command_refuses_bad_flags_in_one_line(saved, tmp_path, capsys, args, match):
    import re
    from ldm_scratch.__main__ import main
    paths = {"MASK": str(saved / "mask.png"), "SMALL_MASK": str(saved / "small_mask.png"),
             "NOT_AN_IMAGE": str(saved / "not_an_image.png")}
    args = [paths.get(a, a) for a in args]
    base = {"--model": str(saved / "ddpm"), "--image": str(saved / "in.png"), "--out": str(tmp_path / "o.png")}
    for flag in list(base):
        if flag in args:
            base.pop(flag)
    argv = ["edit", *[v for kv in base.items() for v in kv], "--steps", "2", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(match, err), err
    assert not (tmp_path / "o.png").exists()
