"""The one training loop, shared by stage 1 (autoencoder) and stage 2 (denoiser).

The loop knows nothing of the models, and the models nothing of the loop (minGPT's split). A
*task* owns the models and the loss; the Trainer owns everything else: AdamW, bf16 autocast,
gradient clipping, EMA, the seeded data order, atomic checkpoints with exact resume, the log and
DDP under `torchrun`. A task is any object with these methods (see stage1.py for a real one):

    modules() -> dict[str, nn.Module]          everything to checkpoint
    optimizers(cfg) -> dict[str, Optimizer]    ordered: {"ae": .., "disc": ..} or {"model": ..}
    loss(name, batch, step) -> (loss, logs)    once per optimizer per step, in that order;
                                               loss None = skip that optimizer this step
    ema_module() -> nn.Module | None           the module whose weight average is kept
    config_dict() -> dict                      saved in the checkpoint, for the record
    sample(step, out_dir)                      optional: a sample/reconstruction grid PNG
    distribute(wrap)                           optional, DDP only: use wrap(m) for the forward
                                               passes of the trained modules (DDP must see them)
    postfix_keys                               optional: which log keys the progress bar shows

Resume is exact: the data order is a function of (seed, epoch), so the checkpoint stores the
epoch and position in it, plus every RNG state; a resumed run logs the same losses as one that
was never interrupted (tests/test_train.py checks it).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ldm_scratch.checkpoint import atomic_torch_save, atomic_write_bytes, safe_torch_load
from ldm_scratch.config import TrainConfig, config_to_dict
from ldm_scratch.device import autocast, default_device, resolve_precision


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the last good checkpoint is left untouched."""


class EMA:
    """Exponential moving average of a module's weights (Polyak averaging, as in DDPM/LDM):

        theta_ema <- decay * theta_ema + (1 - decay) * theta

    Integer buffers (counters) are copied, not averaged. Sampling uses the averaged weights.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)  # ema + (1 - decay) (theta - ema)
            else:
                self.shadow[k].copy_(v)

    @torch.no_grad()
    def swap(self, module: nn.Module) -> None:
        """Exchange the module's weights with the averaged ones (call twice to undo)."""
        for k, v in module.state_dict().items():
            tmp = v.detach().clone()
            v.copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


def _rng_state() -> dict:
    """Every RNG the loop touches, as tensors and plain data (so weights_only loading accepts it)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def save_image_grid(rows: list[torch.Tensor], path: str | os.PathLike, title: str = "") -> None:
    """Save rows of images (each (B, C, H, W) in [-1, 1]) as one PNG grid, one tensor per row."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
    n = max(r.shape[0] for r in rows)
    fig = Figure(figsize=(1.2 * n, 1.2 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, row in enumerate(rows):
        imgs = ((row.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # (B,C,H,W) -> (B,H,W,C)
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < imgs.shape[0]:
                img = imgs[j].numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_history(history: list[dict], path: str | os.PathLike, keys: list[str] | None = None) -> None:
    """One small panel per logged quantity (default: all) against the step: the loss-curve PNG."""
    from matplotlib.figure import Figure
    keys = keys or sorted({k for h in history for k in h if k != "step"})
    cols = min(4, len(keys))
    if not history or not cols:
        return
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    for ax, key in zip(fig.subplots(rows, cols, squeeze=False).flat, keys):
        steps, values = zip(*[(h["step"], h[key]) for h in history if key in h] or [(0, 0.0)])
        ax.plot(steps, values, lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=80)


class Trainer:
    """Run a task's optimizers over `data` for `cfg.steps` steps; see the module docstring."""

    def __init__(self, task: Any, cfg: TrainConfig, data: torch.utils.data.Dataset,
                 out_dir: str | os.PathLike, device: torch.device | str | None = None):
        self.task, self.cfg, self.data, self.out_dir = task, cfg, data, Path(out_dir)
        # Under torchrun every process runs this file; WORLD_SIZE/RANK say which one this is.
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            cuda = torch.cuda.is_available()
            dist.init_process_group("nccl" if cuda else "gloo")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {self.world} processes")
        if len(data) < cfg.batch_size:
            raise ValueError(f"the data has {len(data)} items, fewer than one batch of {cfg.batch_size}")
        self.local_batch = cfg.batch_size // self.world  # the global batch is split across ranks
        for m in task.modules().values():
            m.to(self.device)
        if self.world > 1:
            if not hasattr(task, "distribute"):
                raise ValueError(f"{type(task).__name__} has no distribute(wrap) method, so it cannot run under DDP")
            ids = [self.device.index] if self.device.type == "cuda" else None
            task.distribute(lambda m: nn.parallel.DistributedDataParallel(m, device_ids=ids))
        self.optimizers = task.optimizers(cfg)
        ema_module = task.ema_module()
        self.ema = EMA(ema_module, cfg.ema_decay) if ema_module is not None and cfg.ema_decay > 0 else None
        self.step, self.epoch, self.pos, self.history = 0, 0, 0, []
        self.is_main = self.rank == 0
        self.stopped: str | None = None  # after fit: None (all steps done), "time" or "interrupted"

    # ------------------------------------------------------------------ data: a seeded, resumable order
    def _batches(self) -> Iterator[Any]:
        """Endless batches. Epoch e's order is randperm(seed + e); `pos` counts global batches used."""
        n_batches = len(self.data) // self.cfg.batch_size  # drop the ragged last batch: fixed shapes
        while True:
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch))
            lo = self.rank * self.local_batch
            starts = range(self.pos * self.cfg.batch_size, n_batches * self.cfg.batch_size, self.cfg.batch_size)
            shards = [order[s + lo: s + lo + self.local_batch].tolist() for s in starts]
            # The loader gets its own seeded generator: otherwise each new iterator draws a seed from
            # the global RNG, and a resumed run would drift from an uninterrupted one.
            loader = torch.utils.data.DataLoader(self.data, batch_sampler=shards, num_workers=self.cfg.num_workers,
                                                 generator=torch.Generator().manual_seed(self.cfg.seed))
            for batch in loader:
                self.pos += 1
                yield batch
            self.epoch, self.pos = self.epoch + 1, 0

    # ------------------------------------------------------------------ one optimisation step
    def train_step(self, batch: Any) -> dict[str, float]:
        """Each optimizer in order: forward + loss under autocast, backward, clip, step. Returns the logs."""
        batch = _to(batch, self.device)
        logs: dict[str, float] = {}
        stepped = []
        for name, opt in self.optimizers.items():
            with autocast(self.device, self.precision):
                loss, terms = self.task.loss(name, batch, self.step)
            if loss is None:  # e.g. the discriminator before disc_start: not trained at all
                continue
            # zero here, not once per step: an earlier loss (the generator's) also reaches these params
            opt.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            logs.update({k: float(v) for k, v in terms.items()})
            logs[f"{name}_loss"] = loss.detach().float()
            logs[f"{name}_grad_norm"] = grad_norm.detach().float()
            stepped.append((name, opt))
        logs = self._reduce(logs)
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        if bad:  # before any optimizer.step: the weights still hold the last finite update
            terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
            raise NonFiniteLossError(f"non-finite loss at step {self.step} ({', '.join(bad)}); terms: {terms}. "
                                     f"The last good checkpoint in {self.out_dir} was left unchanged; "
                                     f"try a lower --lr, --precision fp32 or a smaller --grad-clip.")
        for _, opt in stepped:
            opt.step()
        if self.ema is not None:
            self.ema.update(self.task.ema_module())
        return logs

    def _reduce(self, logs: dict[str, Any]) -> dict[str, float]:
        """Average the logged numbers over ranks, so rank 0 logs the global-batch values."""
        if self.world == 1 or not logs:
            return {k: float(v) for k, v in logs.items()}
        keys = sorted(logs)
        vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(vals)
        return dict(zip(keys, (vals / self.world).tolist()))

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, "history": self.history,
                 "modules": {k: m.state_dict() for k, m in self.task.modules().items()},
                 "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "rng": _rng_state(), "task_config": self.task.config_dict(),
                 "train_config": config_to_dict(self.cfg)}
        atomic_torch_save(state, self.ckpt_path)
        atomic_write_bytes(self.out_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in self.history).encode())
        # the optimizers' losses and the terms the bar shows: enough to judge a run, quick to draw
        keys = [f"{k}_loss" for k in self.optimizers] + list(getattr(self.task, "postfix_keys", []))
        plot_history(self.history, self.out_dir / "loss.png", keys)

    def load_checkpoint(self) -> None:
        state = safe_torch_load(self.ckpt_path, map_location="cpu")  # load_state_dict moves to the device
        for k, m in self.task.modules().items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.pos, self.history = state["step"], state["epoch"], state["pos"], state["history"]
        _set_rng_state(state["rng"])

    # ------------------------------------------------------------------ the loop
    def _sample(self) -> None:
        if not (self.is_main and hasattr(self.task, "sample")):
            return
        rng = torch.get_rng_state()  # sampling must not shift the training run's random stream
        ema_module = self.task.ema_module() if self.ema is not None else None
        if ema_module is not None:
            self.ema.swap(ema_module)
        try:
            with torch.no_grad():
                self.task.sample(self.step, self.out_dir)
        finally:
            if ema_module is not None:
                self.ema.swap(ema_module)
            for m in self.task.modules().values():
                m.train()
            torch.set_rng_state(rng)

    def _stop_now(self, start: float) -> bool:
        """The max_minutes budget, decided by rank 0 so every rank stops at the same step."""
        flag = torch.tensor([self.cfg.max_minutes > 0 and (time.time() - start) / 60 >= self.cfg.max_minutes])
        if self.world > 1:
            flag = flag.to(self.device)
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def fit(self, resume: bool = False) -> list[dict]:
        """Train to cfg.steps (or the time budget); returns the log history (one dict per step)."""
        if resume:
            self.load_checkpoint()
        else:
            torch.manual_seed(self.cfg.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for m in self.task.modules().values():
            m.train()
        keys = getattr(self.task, "postfix_keys", None)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        start, batches, stopped = time.time(), self._batches(), None
        try:  # a NonFiniteLossError passes straight through: no checkpoint overwrites the last good one
            while self.step < self.cfg.steps:
                logs = self.train_step(next(batches))
                self.step += 1
                self.history.append({"step": self.step, **logs})
                shown = {k: v for k, v in logs.items() if keys is None or k in keys}
                bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
                bar.update(1)
                if self.cfg.sample_every > 0 and self.step % self.cfg.sample_every == 0:
                    self._sample()
                if self.cfg.ckpt_every > 0 and self.step % self.cfg.ckpt_every == 0:
                    self.save_checkpoint()
                if self._stop_now(start):
                    self.stopped = "time"
                    stopped = f"time budget of {self.cfg.max_minutes} min reached at step {self.step}"
                    break
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            self.stopped = "interrupted"
            if self.is_main:
                print(f"interrupted at step {self.step}; checkpoint saved to {self.ckpt_path}. "
                      f"Resume with the same command plus --resume.")
            return self.history
        bar.close()
        self.save_checkpoint()
        if stopped and self.is_main:
            print(f"{stopped}; checkpoint saved to {self.ckpt_path}")
        return self.history
