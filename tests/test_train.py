"""The training loop: exact resume, atomic checkpoints, NaN stop, EMA maths, the discriminator's
start, the time budget, and DDP (2 processes == 1 process on the same global batch)."""
import copy
import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_scratch.checkpoint import CheckpointError, safe_torch_load
from ldm_scratch.config import AutoencoderConfig, LossConfig, TrainConfig
from ldm_scratch.ema import EMA, ema_decay_at
from ldm_scratch.train import NonFiniteLossError, Trainer


class RegressionTask:
    """A stand-in task: noisy linear regression (the noise exercises the RNG restore on resume)."""

    def __init__(self, d: int = 4, noise: float = 0.1):
        torch.manual_seed(1)
        self.model = nn.Linear(d, 1)
        self.net = self.model
        self.noise = noise
        self.poison_at = None  # step at which the loss becomes NaN

    def modules(self):
        return {"model": self.model}

    def optimizers(self, cfg):
        return {"model": torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)}

    def loss(self, name, batch, step):
        x, y = batch
        x = x + self.noise * torch.randn_like(x)
        loss = F.mse_loss(self.net(x).squeeze(-1), y)
        if step == self.poison_at:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}

    def ema_module(self):
        return self.model

    def config_dict(self):
        return {"d": 4}

    def distribute(self, wrap):
        self.net = wrap(self.model)


def regression_data(n: int = 48, d: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.arange(1.0, d + 1) + 0.5
    return torch.utils.data.TensorDataset(x, y)


def cfg(**kw):
    base = dict(steps=10, batch_size=8, lr=0.05, precision="fp32", ema_decay=0.9, log_every=1,
                sample_every=0, ckpt_every=0, grad_clip=1.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("warmup", [0, 7], ids=["no lr warm-up", "lr warm-up across the break"])
def test_exact_resume(tmp_path, warmup):
    # 10 steps with 48 items / batch 8 = 6 batches per epoch: the break at 5 and the resume cross an epoch.
    # The EMA warms up (default) and, with warmup=7, so does the learning rate: both must continue exactly.
    full = Trainer(RegressionTask(), cfg(steps=10, lr_warmup_steps=warmup), regression_data(), tmp_path / "a").fit()
    Trainer(RegressionTask(), cfg(steps=5, lr_warmup_steps=warmup), regression_data(), tmp_path / "b").fit()
    task = RegressionTask()
    t = Trainer(task, cfg(steps=10, lr_warmup_steps=warmup), regression_data(), tmp_path / "b")
    resumed = t.fit(resume=True)
    assert [h["step"] for h in resumed] == list(range(1, 11))
    assert resumed == full  # identical floats, every step
    a = safe_torch_load(tmp_path / "a" / "checkpoint.pt")
    b = safe_torch_load(tmp_path / "b" / "checkpoint.pt")
    for k, v in a["modules"]["model"].items():
        assert torch.equal(v, b["modules"]["model"][k])
    for k, v in a["ema"].items():
        assert torch.equal(v, b["ema"][k])
    assert (tmp_path / "b" / "loss.png").is_file()
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 10


def test_checkpoint_atomic_and_truncation(tmp_path):
    Trainer(RegressionTask(), cfg(steps=3, ckpt_every=1), regression_data(), tmp_path).fit()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        Trainer(RegressionTask(), cfg(steps=3), regression_data(), tmp_path).fit(resume=True)


def test_nan_stops_and_keeps_last_checkpoint(tmp_path):
    Trainer(RegressionTask(), cfg(steps=4, ckpt_every=2), regression_data(), tmp_path).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    task = RegressionTask()
    task.poison_at = 6  # the 7th step of a run resumed at step 4
    with pytest.raises(NonFiniteLossError, match=r"step 6.*mse=nan"):
        Trainer(task, cfg(steps=10, ckpt_every=1), regression_data(), tmp_path).fit(resume=True)
    after = (tmp_path / "checkpoint.pt").read_bytes()
    # the steps 5 and 6 checkpoints were good ones; the NaN step itself saved nothing
    assert safe_torch_load(tmp_path / "checkpoint.pt")["step"] == 6
    assert after != before


def test_nan_at_first_step_leaves_checkpoint_unchanged(tmp_path):
    Trainer(RegressionTask(), cfg(steps=2, ckpt_every=1), regression_data(), tmp_path).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    task = RegressionTask()
    task.poison_at = 2
    with pytest.raises(NonFiniteLossError, match="step 2"):
        Trainer(task, cfg(steps=5, ckpt_every=1), regression_data(), tmp_path).fit(resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert safe_torch_load(tmp_path / "checkpoint.pt")["step"] == 2


def test_ema_maths():
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9, warmup=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # 0.9 * 0 + 0.1 * 1
    ema.update(m)  # 0.9 * 0.1 + 0.1 * 1 = 0.19
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.19))
    ema.swap(m)
    assert torch.allclose(m.weight, torch.full((1, 2), 0.19))
    ema.swap(m)
    assert torch.allclose(m.weight, torch.ones(1, 2))


def test_max_minutes_stops_and_checkpoints(tmp_path, capsys):
    hist = Trainer(RegressionTask(), cfg(steps=1000, max_minutes=1e-9), regression_data(), tmp_path).fit()
    assert len(hist) == 1
    assert safe_torch_load(tmp_path / "checkpoint.pt")["step"] == 1
    assert "time budget" in capsys.readouterr().out


@pytest.mark.parametrize("steps, total", [(1000, 1000), (10**9, None)])
def test_a_clock_ended_run_shows_no_step_total(tmp_path, monkeypatch, steps, total):
    """steps = 10^9 with a time budget (scripts/ae_recipe.py): the bar counts steps, no 0% of 10^9 with its ETA."""
    import ldm_scratch.train as train
    seen = {}
    real = train.tqdm

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)
    monkeypatch.setattr(train, "tqdm", spy)
    Trainer(RegressionTask(), cfg(steps=steps, max_minutes=1e-9), regression_data(), tmp_path).fit()
    assert seen["total"] == total and ("min budget" in seen["desc"]) == (total is None)


def test_batch_must_split_over_ranks_and_fit_data(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(RegressionTask(), cfg(batch_size=64), regression_data(), tmp_path)


# ----------------------------------------------------------------------------- stage 1


def _tiny_stage1(disc_start):
    stage1 = pytest.importorskip("ldm_scratch.stage1")
    torch.manual_seed(0)  # the same initial weights in every run compared
    ae_cfg = AutoencoderConfig(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2,
                               norm_groups=4, mid_attention=False)
    loss_cfg = LossConfig(disc_start=disc_start, disc_channels=8, disc_layers=2, perceptual_net="none")
    return stage1.AutoencoderTask(ae_cfg, loss_cfg)


def _images(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(n, 1, 16, 16, generator=g) * 2 - 1)


def test_stage1_discriminator_waits_for_disc_start(tmp_path):
    task = _tiny_stage1(disc_start=2)
    d0 = {k: v.clone() for k, v in task.loss_fn.discriminator.state_dict().items()}
    t = Trainer(task, cfg(steps=2, batch_size=4, lr=1e-3), _images(), tmp_path)
    t.fit()  # steps 0 and 1: before disc_start
    for k, v in task.loss_fn.discriminator.state_dict().items():
        assert torch.equal(v, d0[k]), f"discriminator {k} moved before disc_start"
    t.cfg.steps = 3
    t.fit(resume=True)  # step 2: the discriminator trains
    moved = [k for k, v in task.loss_fn.discriminator.state_dict().items()
             if v.dtype.is_floating_point and not torch.equal(v, d0[k])]
    assert moved


def test_stage1_exact_resume(tmp_path):
    full = Trainer(_tiny_stage1(1), cfg(steps=4, batch_size=4, lr=1e-3), _images(), tmp_path / "a").fit()
    Trainer(_tiny_stage1(1), cfg(steps=2, batch_size=4, lr=1e-3), _images(), tmp_path / "b").fit()
    resumed = Trainer(_tiny_stage1(1), cfg(steps=4, batch_size=4, lr=1e-3), _images(), tmp_path / "b").fit(resume=True)
    assert resumed == full


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, out, result_queue):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    task = RegressionTask(noise=0.0)  # noise would differ per rank; the data split is the test
    hist = Trainer(task, cfg(steps=6, ema_decay=0.0), regression_data(), out, device="cpu").fit()
    if rank == 0:
        result_queue.put([h["model_loss"] for h in hist])
    torch.distributed.barrier()  # both ranks done before the gloo group goes (a rank leaving early can abort the other)
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp
    single = Trainer(RegressionTask(noise=0.0), cfg(steps=6, ema_decay=0.0), regression_data(), tmp_path / "one").fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "two"), q), nprocs=2, start_method="spawn")
    two = q.get()
    assert torch.allclose(torch.tensor(two), torch.tensor([h["model_loss"] for h in single]), rtol=1e-5)
    assert (tmp_path / "two" / "checkpoint.pt").is_file()


def test_ema_warmup_decay_formula():
    # d_n = min(d, (1 + n) / (10 + n)): 0.1 at the first update, 0.5 at n = 8, then the cap
    assert ema_decay_at(0.9999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.9999, 8) == pytest.approx(0.5)
    assert ema_decay_at(0.9999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.99, 10_000) == 0.99          # long runs: exactly the fixed-decay EMA
    assert ema_decay_at(0.999, 5, warmup=False) == 0.999


def test_ema_warmup_forgets_the_initial_weights():
    """The failure it fixes: weights jump from 0 (init) to 1 and stay. After n updates the average keeps
    prod_k d_k of the initial weights: 0.999^n without warm-up (82% after 200 updates), and
    prod_k (1 + k) / (10 + k) = 9! n! / (n + 9)! with it (~1e-13 after 200)."""
    n = 200
    shares = {}
    for warmup in (False, True):
        m = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            m.weight.fill_(0.0)
        ema = EMA(m, decay=0.999, warmup=warmup)
        with torch.no_grad():
            m.weight.fill_(1.0)
        for _ in range(n):
            ema.update(m)
        shares[warmup] = 1 - ema.shadow["weight"][0, 0].double().item()
    assert shares[False] == pytest.approx(0.999 ** n, rel=1e-4)
    closed = math.exp(math.lgamma(10) + math.lgamma(n + 1) - math.lgamma(n + 10))  # 9! n! / (n + 9)!
    assert closed < 1e-12 and shares[True] < 1e-6
    assert ema.num_updates == n


def test_lr_warmup_is_linear_then_flat(tmp_path):
    t = Trainer(RegressionTask(), cfg(steps=3, lr_warmup_steps=10), regression_data(), tmp_path / "a")
    t.fit()
    assert t.optimizers["model"].param_groups[0]["lr"] == pytest.approx(0.05 * 3 / 10)  # step 3 of 10
    t = Trainer(RegressionTask(), cfg(steps=12, lr_warmup_steps=10), regression_data(), tmp_path / "b")
    t.fit()
    assert t.optimizers["model"].param_groups[0]["lr"] == pytest.approx(0.05)


def test_lr_decay_falls_linearly_over_the_last_steps(tmp_path):
    """Warm-up, stable, decay: with steps=10, warm-up 2 and decay 4, step n uses
    lr * min(1, (n + 1) / 2) * min(1, (10 - n) / 4)."""
    t = Trainer(RegressionTask(), cfg(steps=10, lr_warmup_steps=2, lr_decay_steps=4), regression_data(),
                tmp_path / "a")
    seen = []
    opt_step = t.optimizers["model"].step

    def record(*a, **k):
        seen.append(t.optimizers["model"].param_groups[0]["lr"])
        return opt_step(*a, **k)
    t.optimizers["model"].step = record
    t.fit()
    expected = [0.05 * min(1, (n + 1) / 2) * min(1, (10 - n) / 4) for n in range(10)]
    assert seen == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.025) and expected[5] == pytest.approx(0.05)
    assert expected[-1] == pytest.approx(0.05 / 4)


def test_ema_multi_tensor_update_equals_the_per_tensor_formula():
    """EMA.update runs one torch._foreach_lerp_ over every float tensor: bit for bit the per-tensor
    ema.lerp_(theta, 1 - d_n), and integer buffers are copied, not averaged."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    ema = EMA(m, 0.99)
    ref = {k: v.clone() for k, v in ema.shadow.items()}
    for _ in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        m.train()(torch.randn(8, 5))  # moves the BatchNorm statistics and its integer counter
        d = ema.current_decay
        ema.update(m)
        for k, v in m.state_dict().items():
            (ref[k].lerp_(v, 1 - d) if v.dtype.is_floating_point else ref[k].copy_(v))
    assert all(torch.equal(ref[k], ema.shadow[k]) for k in ref)
    assert ema.shadow["1.num_batches_tracked"].item() == 4


@pytest.mark.parametrize("impl", ["fused", "foreach", "auto"])
def test_adamw_kernels_agree_with_the_per_tensor_loop(impl):
    """make_adamw's kernels compute the same update as torch's per-tensor loop (to float rounding)."""
    from ldm_scratch.train import make_adamw
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 4))
    nets = {k: copy.deepcopy(base) for k in ("loop", impl)}
    cfg = TrainConfig(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    opts = {k: make_adamw(n.parameters(), dataclasses.replace(cfg, adamw=k)) for k, n in nets.items()}
    x, y = torch.randn(32, 6), torch.randn(32, 4)
    for _ in range(5):
        for k, n in nets.items():
            opts[k].zero_grad()
            ((n(x) - y) ** 2).mean().backward()
            opts[k].step()
    for a, b in zip(nets["loop"].parameters(), nets[impl].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = sum((a - b).abs().sum() for a, b in zip(base.parameters(), nets[impl].parameters()))
    assert moved > 0.1  # the optimizer did step
    if impl == "auto":
        assert opts[impl].defaults.get("fused") is True  # torch >= 2.4 has a fused CPU AdamW


def test_adamw_unknown_kernel_is_refused():
    from ldm_scratch.train import make_adamw
    with pytest.raises(ValueError, match="unknown AdamW kernel 'apex'.*fused"):
        make_adamw(nn.Linear(2, 2).parameters(), TrainConfig(adamw="apex"))
