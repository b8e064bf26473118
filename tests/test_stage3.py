"""Stage 3: the latent diffusion task (class and text conditioning) on the shared training loop."""
import dataclasses

import pytest
import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import safe_torch_load
from ldm_scratch.config import (AUTOENCODER_PRESETS, DIT_PRESETS, UNET_PRESETS, DiffusionConfig, TextEncoderConfig,
                                get_preset)
from ldm_scratch.data import ColoredDigits, MNIST5k
from ldm_scratch.flow import FlowConfig, RectifiedFlow
from ldm_scratch.objectives import DDPMObjective
from ldm_scratch.pipeline import LatentDiffusionPipeline
from ldm_scratch.stage2 import diffusion_train_config, draw_step_noise
from ldm_scratch.stage3 import DENOISERS, LatentDiffusionTask, build_denoiser, draw_objective_noise, latent_dataset
from ldm_scratch.text import Tokenizer
from ldm_scratch.train import Trainer

N = 24  # images per test dataset: a few batches of 8
PROMPTS = ["a red 7 on grass", "a blue 1 on plain"]


@pytest.fixture(scope="module")
def colored() -> ColoredDigits:
    return ColoredDigits("test")


def make_ae(channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(dataclasses.replace(get_preset(AUTOENCODER_PRESETS, "tiny"), in_channels=channels,
                                             scale_factor=0.8))


def class_task(kind: str = "unet", objective=None, **kw) -> tuple[LatentDiffusionTask, torch.utils.data.TensorDataset]:
    """Grey MNIST digits, labels 0..9; DDPM unless another objective is given."""
    ae, d = make_ae(1), MNIST5k("test")
    data = latent_dataset(ae, d.images[:N], labels=d.labels[:N], precision="fp32", progress=False)
    preset = get_preset(UNET_PRESETS, "tiny-latent") if kind == "unet" else get_preset(DIT_PRESETS, "dit-tiny")
    torch.manual_seed(0)
    return LatentDiffusionTask(ae, kind, dataclasses.replace(preset, num_classes=10), objective or DiffusionConfig(),
                               "class", precision="fp32", sample_steps=2, **kw), data


def text_task(colored: ColoredDigits, **kw) -> tuple[LatentDiffusionTask, torch.utils.data.TensorDataset]:
    """Coloured digits with captions; the tokenizer knows every word of the split."""
    ae, tok = make_ae(3), Tokenizer.from_captions(colored.captions)
    data = latent_dataset(ae, colored.images[:N], captions=colored.captions[:N], tokenizer=tok, precision="fp32",
                          progress=False)
    tcfg = TextEncoderConfig(vocab_size=tok.vocab_size, max_length=tok.max_length, dim=16, depth=1, num_heads=2)
    ucfg = dataclasses.replace(get_preset(UNET_PRESETS, "tiny-latent"), context_dim=16)
    torch.manual_seed(0)
    return LatentDiffusionTask(ae, "unet", ucfg, DiffusionConfig(), "text", tokenizer=tok, text_cfg=tcfg,
                               precision="fp32", sample_steps=2, grid_prompts=PROMPTS, **kw), data


def train_cfg(**kw):
    base = dict(steps=3, batch_size=8, lr=1e-2, precision="fp32", ema_decay=0.9, sample_every=0, ckpt_every=0)
    return diffusion_train_config(**{**base, **kw})


def test_latent_dataset_layouts(colored, tmp_path):
    ae = make_ae(3)
    kw = dict(precision="fp32", progress=False)
    z, ids, mask = latent_dataset(ae, colored.images[:4], captions=colored.captions[:4],
                                  tokenizer=Tokenizer.from_captions(colored.captions), **kw).tensors
    assert z.shape == (4, 4, 8, 8) and ids.shape == mask.shape == (4, 6) and mask.dtype == torch.bool
    z2, y = latent_dataset(ae, colored.images[:4], labels=colored.labels[:4], cache_file=tmp_path / "z.pt",
                           dataset_id="colored-test", **kw).tensors
    assert torch.equal(z, z2) and y.dtype == torch.int64 and (tmp_path / "z.pt").is_file()
    assert len(latent_dataset(ae, colored.images[:4], **kw).tensors) == 1  # unconditional: z0 alone
    with pytest.raises(ValueError, match="not both"):
        latent_dataset(ae, colored.images[:4], labels=colored.labels[:4], captions=colored.captions[:4])
    with pytest.raises(ValueError, match="tokenizer"):
        latent_dataset(ae, colored.images[:4], captions=colored.captions[:4])
    with pytest.raises(ValueError, match="dataset_id"):
        latent_dataset(ae, colored.images[:4], cache_file=tmp_path / "z.pt")
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        latent_dataset(ae, colored.images[:4], labels=colored.labels[:3])


def test_the_autoencoder_is_frozen_and_kept_out_of_the_checkpoint(colored):
    task, _ = text_task(colored)
    assert not task.ae.training and not any(p.requires_grad for p in task.ae.parameters())
    assert set(task.modules()) == {"denoiser", "text_encoder"}
    trained = {id(p) for p in task.optimizers(train_cfg())["model"].param_groups[0]["params"]}
    assert trained == {id(p) for m in task.modules().values() for p in m.parameters()}  # one AdamW for both
    assert not trained & {id(p) for p in task.ae.parameters()}


def test_condition_dropout_hits_the_null(colored):
    task, _ = class_task(p_uncond=0.1)
    labels = torch.randint(0, 10, (20_000,))
    z = torch.zeros(20_000, 1, 1, 1)  # only the batch size matters here
    _, _, cond = task.step_noise(5, z, labels)
    dropped = cond != labels
    assert (cond[dropped] == 10).all()  # the null class, index num_classes
    # binomial std at n = 20k: sqrt(0.1 * 0.9 / 20k) = 0.002; 0.01 is 5 sigma
    assert abs(dropped.float().mean().item() - 0.1) < 0.01

    task, data = text_task(colored, p_uncond=0.5)
    _, ids, mask = data.tensors
    null_ids, null_mask = task.tokenizer.encode("")  # [bos] alone
    _, _, (ids2, mask2) = task.step_noise(3, torch.zeros(N, 1, 1, 1), (ids, mask))
    dropped = (ids2 != ids).any(dim=1)
    assert 0 < dropped.sum() < N  # with p = 0.5 and 24 captions, both kinds occur (this seed)
    assert (ids2[dropped] == null_ids).all() and (mask2[dropped] == null_mask).all()
    assert torch.equal(ids2[~dropped], ids[~dropped]) and torch.equal(mask2[~dropped], mask[~dropped])
    assert torch.equal(task.step_noise(3, torch.zeros(N, 1, 1, 1), (ids, mask))[2][0], ids2)  # seeded by step


@pytest.mark.parametrize("kind", ["class", "text", "class-dit"])
def test_loss_is_finite_and_falls_on_a_fixed_batch(colored, kind):
    """The same step (so the same t, eps and dropout) every time: the model can fit it."""
    task, data = class_task() if kind == "class" else class_task("dit") if kind == "class-dit" else text_task(colored)
    batch = data[:8]
    opt = task.optimizers(train_cfg(lr=3e-3))["model"]
    text_before = [p.detach().clone() for p in task.text_encoder.parameters()] if kind == "text" else []
    losses = []
    for _ in range(60):
        loss, _ = task.loss("model", batch, step=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(1.0, abs=0.2)  # zero-initialised output: eps_pred = 0, loss = E[eps^2]
    assert losses[-1] < 0.5 * losses[0], f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    if kind == "text":  # trained jointly: the loss's gradient reached the text encoder
        assert any(not torch.equal(a, b) for a, b in zip(text_before, task.text_encoder.parameters()))


def test_ema_covers_the_text_encoder_and_finish_saves_it(colored, tmp_path):
    task, data = text_task(colored)
    trainer = Trainer(task, train_cfg(), data, tmp_path)
    trainer.fit()
    shadow = trainer.ema.shadow
    assert any(k.startswith("text_encoder.") for k in shadow) and any(k.startswith("denoiser.") for k in shadow)
    ckpt = safe_torch_load(tmp_path / "checkpoint.pt")
    assert set(ckpt["modules"]) == {"denoiser", "text_encoder"} and ckpt["task_config"]["space"] == "latent"
    folder = task.finish(tmp_path, trainer.ema, step=trainer.step)
    assert folder == tmp_path / "pipeline" and (tmp_path / "samples" / "final.png").is_file()
    saved = safe_torch_load(folder / "text_encoder" / "model.pt")
    raw = task.text_encoder.state_dict()
    assert all(torch.equal(v, shadow[f"text_encoder.{k}"]) for k, v in saved.items())  # the averaged weights ...
    assert any(not torch.equal(v, raw[k]) for k, v in saved.items())  # ... not the raw ones, which stay in place


@pytest.mark.parametrize("kind", ["class", "text"])
def test_finish_then_from_pretrained_gives_identical_images(colored, tmp_path, kind):
    task, data = class_task() if kind == "class" else text_task(colored)
    trainer = Trainer(task, train_cfg(), data, tmp_path)
    trainer.fit()
    folder = task.finish(tmp_path, trainer.ema, step=trainer.step, grid=False)
    cond = {"class_labels": [0, 3, 9]} if kind == "class" else {"prompt": PROMPTS}
    kw = dict(num_inference_steps=3, output_type="tensor", precision="fp32")
    trainer.ema.swap(task.ema_module())  # the in-memory model with the EMA weights
    before = task.pipeline(**cond, generator=torch.Generator().manual_seed(1), **kw).images
    loaded = LatentDiffusionPipeline.from_pretrained(folder)
    after = loaded(**cond, generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(before, after) and len(before) == len(next(iter(cond.values())))


def test_resume_is_exact_with_a_text_encoder(colored, tmp_path):
    full = Trainer(text_task(colored)[0], train_cfg(steps=4), text_task(colored)[1], tmp_path / "a").fit()
    task, data = text_task(colored)
    Trainer(task, train_cfg(steps=2, ckpt_every=2), data, tmp_path / "b").fit()
    task, data = text_task(colored)
    resumed = Trainer(task, train_cfg(steps=4), data, tmp_path / "b").fit(resume=True)
    assert [h["model_loss"] for h in resumed] == [h["model_loss"] for h in full]


def test_bad_configurations_are_clear_errors(colored):
    ae = make_ae(3)
    ucfg = get_preset(UNET_PRESETS, "tiny-latent")
    with pytest.raises(ValueError, match="unknown conditioning 'caption'; valid: class, text, none"):
        LatentDiffusionTask(ae, "unet", ucfg, DiffusionConfig(), "caption")
    with pytest.raises(ValueError, match="unknown denoiser 'vit'; valid denoisers: unet, dit"):
        LatentDiffusionTask(ae, "vit", ucfg, DiffusionConfig(), "none")
    with pytest.raises(ValueError, match="num_classes=0"):
        LatentDiffusionTask(ae, "unet", ucfg, DiffusionConfig(), "class")
    with pytest.raises(ValueError, match="tokenizer"):
        LatentDiffusionTask(ae, "unet", dataclasses.replace(ucfg, context_dim=16), DiffusionConfig(), "text")
    with pytest.raises(ValueError, match="p_uncond"):
        LatentDiffusionTask(ae, "unet", ucfg, DiffusionConfig(), "none", p_uncond=2.0)
    tok = Tokenizer.from_captions(colored.captions)
    tcfg = TextEncoderConfig(vocab_size=tok.vocab_size, max_length=tok.max_length, dim=32, num_heads=2)
    with pytest.raises(ValueError, match="dim=32 must equal the denoiser's context_dim=16"):
        LatentDiffusionTask(ae, "unet", dataclasses.replace(ucfg, context_dim=16), DiffusionConfig(), "text",
                            tokenizer=tok, text_cfg=tcfg, grid_prompts=PROMPTS)
    with pytest.warns(UserWarning, match=r"\['purple'\] encoded as \[unk\]"):  # a grid prompt: warned at once
        LatentDiffusionTask(ae, "unet", dataclasses.replace(ucfg, context_dim=32), DiffusionConfig(), "text",
                            tokenizer=tok, text_cfg=tcfg, grid_prompts=["a purple 7 on grass"])
    task = LatentDiffusionTask(ae, "unet", ucfg, DiffusionConfig(), "none")
    with pytest.raises(ValueError, match=r"latents \(B, 4, 8, 8\), got \(2, 4, 16, 16\)"):
        task.loss("model", [torch.zeros(2, 4, 16, 16)], 0)
    assert set(DENOISERS) <= {"unet", "dit"} and build_denoiser("unet", ucfg).cfg == ucfg


def test_an_unconditional_task_samples_a_grid(tmp_path):
    ae, d = make_ae(1), MNIST5k("test")
    task = LatentDiffusionTask(ae, "unet", get_preset(UNET_PRESETS, "tiny-latent"), DiffusionConfig(), "none",
                               precision="fp32", sample_steps=1)
    data = latent_dataset(ae, d.images[:8], precision="fp32", progress=False)
    loss, _ = task.loss("model", data[:4], 0)
    assert torch.isfinite(loss)
    assert task.sample(0, tmp_path).read_bytes()[:4] == b"\x89PNG"


def _denoising_loss(task: LatentDiffusionTask, data, weights: dict) -> float:
    """The eps-MSE of `weights` on every training latent at 4 fixed (t, eps) draws each: a quick stand-in for
    sample quality that sees the systematic error a stale average carries into every DDIM step."""
    z0, y = data.tensors
    g = torch.Generator().manual_seed(123)
    model = task.ema_group
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        losses = [task.diffusion.loss(task.denoiser, z0, y, t=torch.randint(0, 1000, (len(z0),), generator=g),
                                      eps=torch.randn(z0.shape, generator=g)).item() for _ in range(4)]
    model.load_state_dict(saved)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_default_ema_is_not_stuck_at_the_initial_weights(kind, tmp_path):
    """Regression test for a short run's EMA (issue: 'a short run's EMA still remembers its first steps').
    With the old default (decay 0.999 from step 0) the average of a short run still held most of the random
    initial weights (94% after 60 steps; 9% after 2,400), and its noise prediction was far worse than the
    trained weights' (sampling then got worse with more deterministic DDIM steps). The default (warm-up)
    must score like the trained weights."""
    steps = 60
    results = {}
    for name, kw in {"default": {}, "old default": {"ema_decay": 0.999, "ema_warmup": False}}.items():
        task, data = class_task(kind)
        cfg = diffusion_train_config(kind, steps=steps, batch_size=8, precision="fp32", sample_every=0,
                                     ckpt_every=0, **kw)
        trainer = Trainer(task, cfg, data, tmp_path / kind / name.replace(" ", "_"))
        first = _denoising_loss(task, data, task.ema_group.state_dict())
        trainer.fit()
        raw = _denoising_loss(task, data, task.ema_group.state_dict())
        ema = _denoising_loss(task, data, trainer.ema.state_dict())
        results[name] = (first, raw, ema)
    first, raw, ema = results["default"]
    assert raw < 0.8 * first, f"the tiny model did not learn ({first:.3f} -> {raw:.3f}): the check would be moot"
    assert ema < raw + 0.25 * (first - raw), f"default EMA {ema:.3f} vs raw {raw:.3f} (initial {first:.3f})"
    _, raw_old, ema_old = results["old default"]
    assert ema_old > raw_old + 0.5 * (first - raw_old), "the check no longer catches the old default's failure"


# ---------------------------------------------------------------------------------- the objective (issue #13)
def test_ddpm_training_draws_are_those_of_draw_step_noise():
    """The objective seam changes no DDPM run: every (t, eps, coin) of a step, on every DDP rank, is bit-equal."""
    z0 = torch.zeros(4, 4, 8, 8)
    for seed, step, rank, world in ((0, 0, 0, 1), (3, 17, 0, 1), (1, 5, 1, 2)):
        old = draw_step_noise(seed, step, z0, 1000, rank, world)
        new = draw_objective_noise(DDPMObjective(DiffusionConfig()), seed, step, z0, rank, world)
        assert all(torch.equal(a, b) for a, b in zip(old, new))


def test_flow_training_draws_are_a_function_of_seed_and_step():
    flow, z0 = RectifiedFlow(), torch.zeros(4, 4, 8, 8)
    t, eps, coin = draw_objective_noise(flow, 2, 9, z0)
    assert t.dtype == torch.float32 and ((t > 0) & (t < 1)).all() and eps.shape == z0.shape
    assert all(torch.equal(a, b) for a, b in zip((t, eps, coin), draw_objective_noise(flow, 2, 9, z0)))
    assert not torch.equal(t, draw_objective_noise(flow, 2, 10, z0)[0])
    # two DDP ranks of 2 draw the two halves of one process's batch of 4
    halves = [draw_objective_noise(flow, 2, 9, z0[:2], rank, 2) for rank in (0, 1)]
    assert all(torch.equal(torch.cat([h[i] for h in halves]), full) for i, full in enumerate((t, eps, coin)))


def test_a_flow_task_trains_saves_and_samples(tmp_path):
    flow = RectifiedFlow(FlowConfig(t_sampling="uniform", shift=2.0))
    task, data = class_task(objective=flow)
    assert task.objective is flow and task.pipeline.objective is flow
    assert task.config_dict()["objective"] == flow.to_dict()
    with pytest.raises(AttributeError, match="not DDPM"):
        task.diffusion
    trainer = Trainer(task, train_cfg(), data, tmp_path)
    trainer.fit()
    assert trainer.step == 3
    folder = task.finish(tmp_path, trainer.ema, step=trainer.step)
    assert (tmp_path / "samples" / "final.png").is_file()
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.objective, RectifiedFlow) and pipe.objective.cfg == flow.cfg
    kw = dict(class_labels=[0, 5], num_inference_steps=3, output_type="tensor", precision="fp32")
    trainer.ema.swap(task.ema_group)  # the saved (EMA) weights, in the task's own pipeline
    for sampler in ("euler", "heun"):
        x = pipe(sampler=sampler, generator=torch.Generator().manual_seed(0), **kw).images
        assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()
        assert torch.equal(x, task.pipeline(sampler=sampler, generator=torch.Generator().manual_seed(0), **kw).images)
    trainer.ema.swap(task.ema_group)
