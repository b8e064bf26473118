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
was never interrupted (tests/test_train.py checks it). Nothing is lost to a crash: a kill at any
moment (even mid-write) leaves the last checkpoint whole, and Ctrl-C finishes the step in flight,
checkpoints it and raises TrainingInterrupted (tests/test_faults.py kills real runs to check both).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm  # text bars: a saved notebook keeps their last state (a widget shows 0%)

from ldm_scratch.checkpoint import (CheckpointError, atomic_torch_save, atomic_write_bytes, check_state_dict,
                                    remove_stale_temp_files, rng_state, safe_torch_load, set_rng_state)
from ldm_scratch.config import TrainConfig, config_to_dict
from ldm_scratch.device import CompiledForTraining, autocast, default_device, resolve_precision
from ldm_scratch.ema import EMA
from ldm_scratch.figures import plot_history, save_image_grid  # noqa: F401 (re-exported: stages import it from here)


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN or inf; the last good checkpoint is left untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during fit: the step in flight was finished and checkpointed, then training stopped.
    A KeyboardInterrupt, so `except Exception` does not swallow it and uncaught it ends the program."""

    def __init__(self, step: int, path: str | os.PathLike):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}; resume with --resume")
        self.step, self.path = step, Path(path)


class _DeferredSigint:
    """While active, the first Ctrl-C (SIGINT) only sets `requested`: the loop then stops at a step
    boundary, where the checkpoint is consistent (mid-step, the weights may be updated and the step
    counter not yet). A second Ctrl-C gets the previous handler back: it stops at once, saving nothing.
    Signal handlers live in the main thread only; elsewhere (and where SIGINT is ignored) it does nothing."""

    def __enter__(self) -> "_DeferredSigint":
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (None, signal.SIG_IGN):  # None: a handler not set from Python; leave it be
                self.previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        # os.write, not print: a handler may run in the middle of another write to the same stream
        os.write(2, b"\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again: stop now, no save)\n")

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


UNBOUNDED_STEPS = 10**7   # a step count no run reaches: the time budget (max_minutes) ends it

ADAMW_IMPLS = ("auto", "fused", "foreach", "loop")


def make_adamw(params: Any, cfg: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with cfg's lr, betas and weight decay, and the kernel cfg.adamw names.

    The three kernels compute the same update (to float rounding). "loop" updates one tensor at a time (torch's
    default on a CPU), "foreach" batches the tensors into a few multi-tensor ops, "fused" does the whole update
    in one pass per tensor group: for the latent DiT and U-Net on a CPU the optimizer step measured 2.5-3x faster
    fused than looped (one thread, 2026-12-01). "auto" takes fused where torch has it for the device (CPU and
    CUDA since torch 2.4), else foreach."""
    impl = cfg.adamw
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"unknown AdamW kernel {impl!r}; valid: {', '.join(ADAMW_IMPLS)}")
    params = list(params)
    kw = dict(lr=cfg.lr if lr is None else lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            if impl == "fused":
                raise
    return torch.optim.AdamW(params, foreach=impl != "loop", **kw)


def _isatty(stream: Any) -> bool:
    """Whether `stream` is a terminal (a notebook's or a pipe's stream is not; some lack isatty)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


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
        if cfg.compile:  # after DDP's wrapper, as torch recommends: compile(DDP(model))
            if not hasattr(task, "denoiser_forward"):
                raise ValueError(f"compile: {type(task).__name__} has no denoiser forward to compile; --compile is for "
                                 "train-diffusion's denoisers")
            task.denoiser_forward = CompiledForTraining(task.denoiser_forward, verbose=self.rank == 0)
        self.optimizers = task.optimizers(cfg)
        ema_module = task.ema_module()
        self.ema = (EMA(ema_module, cfg.ema_decay, warmup=cfg.ema_warmup)
                    if ema_module is not None and cfg.ema_decay > 0 else None)
        # each parameter group's peak learning rate, for the linear warm-up (cfg.lr_warmup_steps)
        self.base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()}
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
            self._backward(name, loss, terms)
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
            raise NonFiniteLossError(f"non-finite loss or gradient at step {self.step} ({', '.join(bad)}); "
                                     f"terms: {terms}. "
                                     f"The last good checkpoint in {self.out_dir} was left unchanged; "
                                     f"try a lower --lr, --precision fp32 or a smaller --grad-clip, and "
                                     f"--detect-anomaly to name the operation that made the first NaN.")
        self._set_lr()
        for _, opt in stepped:
            opt.step()
        if self.ema is not None:
            self.ema.update(self.task.ema_module())
        return logs

    def _set_lr(self) -> None:
        """The learning-rate schedule, a function of the step alone (a resumed run uses exactly the rates an
        uninterrupted one would): warm-up, stable, decay. Step n (0-based) of cfg.steps uses
            lr * min(1, (n + 1) / lr_warmup_steps) * min(1, (steps - n) / lr_decay_steps),
        each factor only when its step count is > 0: a linear rise, the peak for as long as the run lasts, then a
        linear fall to lr / lr_decay_steps at the last step. The decay is the "cool-down" of warm-up-stable-decay
        schedules (Hu et al. 2024, MiniCPM): a run trained at a constant rate and then decayed ends lower than the
        same steps at a constant rate, and the stable part can be resumed and extended before deciding where to end."""
        warm, decay = self.cfg.lr_warmup_steps, self.cfg.lr_decay_steps
        if warm <= 0 and decay <= 0:
            return
        scale = min(1.0, (self.step + 1) / warm) if warm > 0 else 1.0
        if decay > 0:
            scale *= max(0.0, min(1.0, (self.cfg.steps - self.step) / decay))
        for k, opt in self.optimizers.items():
            for g, base in zip(opt.param_groups, self.base_lrs[k]):
                g["lr"] = base * scale

    def _backward(self, name: str, loss: torch.Tensor, terms: dict) -> None:
        """loss.backward(); in anomaly mode (cfg.detect_anomaly) a NaN gradient stops here, naming the
        backward op that made it and the forward line that built that op (autograd records it)."""
        if not self.cfg.detect_anomaly:
            loss.backward()
            return
        with warnings.catch_warnings(record=True) as caught:  # autograd sends the forward trace as a warning
            warnings.simplefilter("always")
            try:
                loss.backward()
            except RuntimeError as e:
                if "nan" not in str(e).lower():
                    raise
                trace = [str(w.message) for w in caught if "Traceback of forward call" in str(w.message)]
                lines = [ln.strip() for ln in (trace[-1].splitlines() if trace else []) if ln.strip()
                         and not ln.strip().startswith("(Triggered")]
                frames = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
                where = lines[frames[-1]:] if frames else []  # the innermost frame: the line that made the op
                values = ", ".join(f"{k}={float(v):.4g}" for k, v in {f"{name}_loss": loss, **terms}.items())
                raise NonFiniteLossError(f"non-finite gradient at step {self.step}: {e} Forward call: "
                                         f"{' | '.join(where) or 'not recorded'}. Loss terms: {values}. The last "
                                         f"good checkpoint in {self.out_dir} was left unchanged.") from None

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
                 "rng": rng_state(), "task_config": self.task.config_dict(),
                 "train_config": config_to_dict(self.cfg)}
        atomic_torch_save(state, self.ckpt_path)
        atomic_write_bytes(self.out_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in self.history).encode())
        # the optimizers' losses and the terms the bar shows: enough to judge a run, quick to draw
        keys = [f"{k}_loss" for k in self.optimizers] + list(getattr(self.task, "postfix_keys", []))
        plot_history(self.history, self.out_dir / "loss.png", keys)

    def load_checkpoint(self) -> None:
        if not self.ckpt_path.is_file():
            raise CheckpointError(f"{self.ckpt_path}: no checkpoint to resume from (drop --resume to start afresh, "
                                  f"or give the run folder that holds it)")
        state = safe_torch_load(self.ckpt_path, map_location="cpu")  # load_state_dict moves to the device
        modules = self.task.modules()
        if not isinstance(state, dict) or not {"step", "modules", "optimizers", "rng"} <= set(state) \
                or not set(modules) <= set(state["modules"]):
            raise CheckpointError(f"{self.ckpt_path}: not a training checkpoint of this task (expected the modules "
                                  f"{sorted(modules)}; a model folder's model.pt holds weights only)")
        for k, m in modules.items():  # names every missing key and shape mismatch, e.g. after a --preset change
            check_state_dict(m, state["modules"][k], f"{self.ckpt_path} [{k}]")
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.step, self.epoch, self.pos, self.history = state["step"], state["epoch"], state["pos"], state["history"]
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.num_updates = self.step  # one update per step: the warm-up continues where it was
        set_rng_state(state["rng"])

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

    def _stop_reason(self, start: float, interrupt: _DeferredSigint) -> str | None:
        """"interrupted" (Ctrl-C), "time" (max_minutes) or None, agreed by all ranks (a max over them),
        so every rank stops after the same step."""
        time_up = self.cfg.max_minutes > 0 and (time.time() - start) / 60 >= self.cfg.max_minutes
        flags = torch.tensor([interrupt.requested, time_up], dtype=torch.int32)
        if self.world > 1:
            flags = flags.to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        interrupted, time_up = flags.tolist()
        return "interrupted" if interrupted else "time" if time_up else None

    def fit(self, resume: bool = False) -> list[dict]:
        """Train to cfg.steps (or the time budget); returns the log history (one dict per step).
        Ctrl-C: the step in flight finishes, a checkpoint is saved, then TrainingInterrupted is raised.
        A NonFiniteLossError passes straight through: no checkpoint overwrites the last good one."""
        if self.is_main:
            for target in (self.ckpt_path, self.out_dir / "log.jsonl"):
                for stale in remove_stale_temp_files(target):  # a killed write's leftovers: never read
                    print(f"removed {stale.name}, left by an interrupted write of {target.name}")
        if resume:
            self.load_checkpoint()
        else:
            torch.manual_seed(self.cfg.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for m in self.task.modules().values():
            m.train()
        keys = getattr(self.task, "postfix_keys", None)
        # A saved notebook (or a log file) keeps every refresh: one a second on a terminal, one per 15 s elsewhere.
        # A run that the clock ends (max_minutes with a step count no budget reaches, as scripts/ae_recipe.py does)
        # counts steps without a total: a total of 10^9 would show 0% and an ETA of a century.
        timed = self.cfg.max_minutes > 0 and self.cfg.steps >= UNBOUNDED_STEPS
        bar = tqdm(total=None if timed else self.cfg.steps, initial=self.step, disable=not self.is_main,
                   desc=f"train ({self.cfg.max_minutes:g} min budget)" if timed else "train", dynamic_ncols=True,
                   mininterval=1.0 if _isatty(sys.stderr) else 15.0)
        start, batches, saved_at = time.time(), self._batches(), None
        anomaly = torch.autograd.set_detect_anomaly(True) if self.cfg.detect_anomaly else contextlib.nullcontext()
        with _DeferredSigint() as interrupt, anomaly:
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
                    saved_at = self.step
                self.stopped = self._stop_reason(start, interrupt)
                if self.stopped:
                    break
            bar.close()
            if saved_at != self.step:
                self.save_checkpoint()  # still deferring Ctrl-C: this write is not cut short by a first one
        if self.stopped == "interrupted":
            raise TrainingInterrupted(self.step, self.ckpt_path)
        if self.stopped == "time" and self.is_main:
            print(f"time budget of {self.cfg.max_minutes:.3g} min reached at step {self.step}; "
                  f"checkpoint saved to {self.ckpt_path}")
        return self.history
