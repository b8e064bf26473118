"""Stage 2 in pixel space: condition dropout, overfitting a batch, exact resume, EMA saved, the model
folder round trip, DDP (2 processes == 1), evaluate, and the train-diffusion / sample commands.

Most tests use 16 x 16 digits (area-downsampled) with the tiny U-Net: 4x fewer pixels than 32 x 32,
the same code paths."""
import dataclasses
import os
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F

from ldm_scratch.checkpoint import CheckpointError, safe_torch_load
from ldm_scratch.config import UNET_PRESETS, DiffusionConfig, TrainConfig, get_preset
from ldm_scratch.data import MNIST5k
from ldm_scratch.stage2 import DiffusionTask, diffusion_train_config, evaluate, generate, load_diffusion_model
from ldm_scratch.train import Trainer


def tiny_cfg(size: int = 16):
    return dataclasses.replace(UNET_PRESETS["tiny"](), num_classes=10, sample_size=size)


def digits(n: int = 16, size: int = 16) -> torch.utils.data.TensorDataset:
    d = MNIST5k("train")
    x = F.interpolate(d.images[:n], size=size, mode="area")  # (n, 1, 32, 32) -> (n, 1, size, size)
    return torch.utils.data.TensorDataset(x, d.labels[:n])


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=4, lr=1e-3, precision="fp32", ema_decay=0.9, sample_every=0, ckpt_every=0)
    return diffusion_train_config(**{**base, **kw})


def task(**kw) -> DiffusionTask:
    torch.manual_seed(0)
    return DiffusionTask(tiny_cfg(), DiffusionConfig(), precision="fp32", sample_steps=2, **kw)


def test_condition_dropout_rate_uses_the_null_class_and_is_seeded():
    t = task(p_uncond=0.1)
    labels = torch.randint(0, 10, (20_000,))
    x = torch.zeros(20_000, 1, 1, 1)  # the noise shape does not matter here
    _, _, cond = t.step_noise(5, x, labels)
    dropped = cond != labels
    assert (cond[dropped] == 10).all()  # dropped labels become the null class, index num_classes
    assert (cond[~dropped] == labels[~dropped]).all()
    # binomial std at n = 20k: sqrt(0.1 * 0.9 / 20k) = 0.002; 0.01 is 5 sigma
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(t.step_noise(5, x, labels)[2], cond)  # a function of (seed, step): deterministic
    assert not torch.equal(t.step_noise(6, x, labels)[2], cond)  # ... and fresh at every step
    assert (task(p_uncond=0.0).step_noise(5, x, labels)[2] == labels).all()
    with pytest.raises(ValueError, match="p_uncond"):
        task(p_uncond=1.5)


def test_a_batch_of_eight_digits_overfits():
    """Same t and eps every step: the U-Net can memorise them, so L_simple must fall tenfold."""
    x, y = digits(8).tensors
    t = task()
    # t spread over the whole chain: small t (where eps must be told apart from a digit) included
    steps = torch.linspace(0, t.diffusion.T - 1, 8).long()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(t.unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = t.diffusion.loss(t.unet, x, y, t=steps, eps=eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[0] == pytest.approx(1.0, abs=0.15)  # zero-initialised output: eps_pred = 0, loss = E[eps^2]
    assert losses[-1] < losses[0] / 10, f"after {len(losses)} steps: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_resume_is_exact(tmp_path):
    full = Trainer(task(), train_cfg(), digits(), tmp_path / "a").fit()
    Trainer(task(), train_cfg(steps=2), digits(), tmp_path / "b").fit()
    resumed = Trainer(task(), train_cfg(), digits(), tmp_path / "b").fit(resume=True)
    assert [h["model_loss"] for h in resumed] == [h["model_loss"] for h in full]


def test_ema_weights_are_saved_and_the_folder_round_trips(tmp_path):
    t = task()
    trainer = Trainer(t, train_cfg(steps=3, lr=1e-2), digits(), tmp_path)
    trainer.fit()
    folder = t.finish(tmp_path, trainer.ema, step=trainer.step)
    assert (tmp_path / "samples" / "final.png").is_file()
    saved = safe_torch_load(folder / "model.pt")
    raw = t.unet.state_dict()
    assert all(torch.equal(saved[k], trainer.ema.shadow[k]) for k in saved)  # the averaged weights ...
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # ... not the raw ones, which stay in place
    unet, diffusion, meta = load_diffusion_model(folder)
    assert meta["space"] == "pixel" and meta["ema"] is True and unet.cfg == t.unet_cfg
    labels = torch.tensor([0, 3, 7, 10])  # 10: the null class, an unconditional sample
    trainer.ema.swap(t.unet)
    before = generate(t.unet, t.diffusion, labels, num_steps=3, generator=torch.Generator().manual_seed(1))
    after = generate(unet, diffusion, labels, num_steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(before, after) and before.shape == (4, 1, 16, 16)
    assert before.abs().max() <= 1.0  # pixel samples are clipped to the data range


def test_loading_a_broken_folder_names_the_file(tmp_path):
    t = task()
    folder = t.finish(tmp_path, grid=False)
    (folder / "config.json").write_text('{"space": "pixel", "unet": {"ch": "wide"}, "diffusion": {}}')
    with pytest.raises(CheckpointError, match="config.json"):
        load_diffusion_model(folder)
    (folder / "config.json").write_text('{"space": "pixel", "unet": {}}')  # no "diffusion"
    with pytest.raises(CheckpointError, match="config.json"):
        load_diffusion_model(folder)
    t.finish(tmp_path, grid=False)
    (folder / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_diffusion_model(folder)


def test_evaluate_returns_accuracy_and_fid_beside_its_floor():
    torch.manual_seed(0)
    t = DiffusionTask(tiny_cfg(32), DiffusionConfig())  # the classifier reads 32 x 32 digits
    res = evaluate(t.unet, t.diffusion, n_per_class=2, num_steps=2, precision="fp32",
                   generator=torch.Generator().manual_seed(0), guidance_scale=1.0)
    assert res["n"] == 20 and 0.0 <= res["cond_acc"] <= 1.0
    assert res["fid"] > res["fid_real_vs_real"] > 0  # an untrained model is far from real digits
    with pytest.raises(ValueError, match="n_per_class"):
        evaluate(t.unet, t.diffusion, n_per_class=0)
    with pytest.raises(ValueError, match="32"):
        evaluate(task().unet, t.diffusion, n_per_class=1)  # 16 x 16 samples: not what the classifier reads


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, out, queue):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    hist = Trainer(task(), train_cfg(steps=3, ema_decay=0.0), digits(), out, device="cpu").fit()
    if rank == 0:
        queue.put([h["model_loss"] for h in hist])
    torch.distributed.barrier()  # both ranks done before the gloo group goes (a rank leaving early can abort the other)
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    """Each rank takes its slice of the global batch's noise, so 2 processes train exactly like 1."""
    import torch.multiprocessing as mp
    single = Trainer(task(), train_cfg(steps=3, ema_decay=0.0), digits(), tmp_path / "one").fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "two"), q), nprocs=2, start_method="spawn")
    assert torch.allclose(torch.tensor(q.get()), torch.tensor([h["model_loss"] for h in single]), rtol=1e-5)


# ----------------------------------------------------------------------------- CLI


def test_train_diffusion_then_sample_writes_a_png(tmp_path):
    """In-process (a subprocess would spend most of its time importing torch); test_cli.py covers
    `python -m ldm_scratch` itself."""
    from ldm_scratch.__main__ import main
    out = tmp_path / "run"
    assert main(["train-diffusion", "--space", "pixel", "--preset", "tiny", "--steps", "3", "--batch-size", "4",
                 "--precision", "fp32", "--sample-steps", "1", "--out", str(out)]) == 0
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.pt").is_file()
    assert (out / "samples" / "final.png").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    ckpt = safe_torch_load(out / "checkpoint.pt")
    assert tuple(ckpt["train_config"]["betas"]) == (0.9, 0.999)  # a DDPM's Adam, not stage 1's GAN betas
    assert ckpt["task_config"]["unet"]["num_classes"] == 10  # the data decided: class-conditional
    assert main(["sample", "--model", str(out / "model"), "--class-labels", "0", "1", "7", "--steps", "2",
                 "--seed", "3", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, expected", [
    (["train-diffusion", "--preset", "huge"], "small"),
    (["train-diffusion", "--space", "voxel"], "pixel"),
    (["train-diffusion", "--schedule", "quadratic"], "cosine"),
    (["sample", "--model", "m", "--sampler", "plms"], "ddim"),
    (["sample"], "--model"),
])
def test_bad_arguments_list_valid_values(args, expected, capsys):
    from ldm_scratch.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code != 0
    assert expected in capsys.readouterr().err


def test_bad_values_found_after_parsing_are_clear_errors(tmp_path, capsys):
    from ldm_scratch.__main__ import main
    assert main(["train-diffusion", "--space", "latent"]) != 0
    assert "--space latent needs --autoencoder DIR" in capsys.readouterr().err
    DiffusionTask(tiny_cfg(32), DiffusionConfig()).finish(tmp_path, grid=False)
    assert main(["sample", "--model", str(tmp_path / "model"), "--class-labels", "3", "12"]) != 0
    assert "0..9" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "nowhere")]) != 0
    assert "nowhere" in capsys.readouterr().err


def test_pixel_and_latent_training_share_one_denoiser_task():
    """One implementation of the optimizer, the draw, dropout, the loss, DDP and saving (stage2.DenoiserTask);
    the pixel task's draws are still draw_step_noise's, so pixel runs train exactly as before."""
    from ldm_scratch.stage2 import DenoiserTask, DiffusionTask, draw_step_noise
    from ldm_scratch.stage3 import LatentDiffusionTask
    for name in ("optimizers", "step_noise", "loss", "distribute", "finish"):
        assert getattr(DiffusionTask, name) is getattr(DenoiserTask, name)
        assert getattr(LatentDiffusionTask, name) is getattr(DenoiserTask, name)
    task = DiffusionTask(get_preset(UNET_PRESETS, "tiny"), DiffusionConfig(), seed=3)
    x = torch.zeros(4, 1, 32, 32)
    t, eps, _ = task.step_noise(11, x, None)
    t_ref, eps_ref, _ = draw_step_noise(3, 11, x, 1000)
    assert torch.equal(t, t_ref) and torch.equal(eps, eps_ref)


def test_compiled_training_routes_the_forward_through_the_compiled_graph(tmp_path, monkeypatch):
    """TrainConfig.compile (train-diffusion --compile): every training forward goes through torch.compile's
    result and the plain module is what gets saved. torch.compile is stood in for by a recording identity (a real
    inductor compile of even the tiny U-Net's forward and backward takes over a minute here; the real compile is
    exercised by test_pipeline's compiled sampling and measured in the README), so the losses equal the plain run's."""
    plain = Trainer(task(), train_cfg(), digits(), tmp_path / "a").fit()
    calls = []

    def recording_compile(model, **kw):
        assert kw.get("dynamic") is False  # static shapes: dynamic ones failed on the latent U-Net (README)
        return lambda *a, **k: (calls.append(1), model(*a, **k))[1]
    monkeypatch.setattr(torch, "compile", recording_compile)
    trainer = Trainer(task(), train_cfg(compile=True), digits(), tmp_path / "b")
    compiled = trainer.fit()
    assert [h["model_loss"] for h in compiled] == [h["model_loss"] for h in plain]
    assert len(calls) == 4 and trainer.task.denoiser_forward.compile_seconds  # one forward per step, 4 steps
    folder = trainer.task.finish(tmp_path / "b", trainer.ema, trainer.step, grid=False)
    saved = torch.load(folder / "model.pt", map_location="cpu")
    keys = saved.get("state_dict", saved) if isinstance(saved, dict) else saved
    assert not any(str(k).startswith(("model.", "_orig_mod.")) for k in keys), "the wrapper leaked into the keys"


def test_compile_is_refused_for_a_task_without_a_denoiser():
    class AutoencoderLike:
        def modules(self):
            return {}
    with pytest.raises(ValueError, match="compile.*train-diffusion"):
        Trainer(AutoencoderLike(), train_cfg(compile=True), digits(), "unused")
