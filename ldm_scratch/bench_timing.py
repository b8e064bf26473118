"""How the benchmark suite (bench.py) measures: the machine's name, median-of-reps timing with device
sync, one forward(+backward) of a benchmark case, the activations saved for backward, peak memory (cuda:
max_memory_allocated; CPU: a subprocess per model reading its resident-set high-water mark), FLOPs.
"""
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldm_scratch import bench_cases as cases
from ldm_scratch.bench_cases import Case
from ldm_scratch.metrics import count_flops

MiB = 2 ** 20


def machine() -> str:
    """The CPU model from /proc/cpuinfo, or the GPU name when timing on cuda."""
    if torch.cuda.is_available() and torch.get_default_device().type == "cuda":
        return torch.cuda.get_device_name()
    from ldm_scratch.device import cpu_name
    return cpu_name()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainer_items_per_second(trainer: Any, batch: tuple, steps: int, warmup: int) -> float:
    """Items per second through `steps` full Trainer steps (forward, loss, backward, clip, AdamW, EMA) on
    one fixed batch, after `warmup` untimed steps."""
    batch = tuple(b.to(trainer.device) for b in batch)
    for i in range(warmup + steps):
        if i == warmup:
            sync(trainer.device)
            start = time.perf_counter()
        trainer.step = i
        trainer.train_step(batch)
    sync(trainer.device)
    return steps * batch[0].shape[0] / (time.perf_counter() - start)


def median_ms(fn: Callable[[], Any], warmup: int, reps: int, device: torch.device) -> float:
    """Median wall time of fn() in ms, after `warmup` untimed calls (allocator, oneDNN kernel choice)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def fwd_bwd(case: Case) -> None:
    """One forward and backward on a fixed scalar (the mean square of the output); grads freed after."""
    case.model.train()
    case.call().float().square().mean().backward()
    case.model.zero_grad(set_to_none=True)


@torch.no_grad()
def fwd(case: Case) -> None:
    case.model.eval()
    case.call()


def saved_activation_mib(case: Case) -> float:
    """MiB of tensors autograd keeps for backward (parameters excluded), counted by storage once each.
    Exact and in-process, so not disturbed by other jobs: the part of training memory that grows with B."""
    params = {p.untyped_storage().data_ptr() for p in case.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    case.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = case.call()
    out.float().square().mean().backward()
    case.model.zero_grad(set_to_none=True)
    return sum(seen.values()) / MiB


def peak_mib(pair: str, side: str, quick: bool, device: torch.device) -> tuple[float | None, str]:
    """Peak memory of one forward+backward, and how it was measured.
    cuda: torch.cuda.max_memory_allocated. CPU: tracemalloc cannot see torch's allocator, so a fresh
    subprocess per model reports the rise of its resident set's peak over the step (_child_peak)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(cases.PAIRS[pair](quick, device, with_reference=side == "diffusers")[side])
        return (torch.cuda.max_memory_allocated() - base) / MiB, "cuda max_memory_allocated"
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from ldm_scratch.bench_timing import _child_peak; _child_peak({pair!r}, {side!r}, {quick})")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).resolve().parents[1])
        return float(out.stdout.strip().splitlines()[-1]), "resident-set peak (VmHWM) rise over the step, subprocess per model"
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None, "memory subprocess failed"


def _child_peak(pair: str, side: str, quick: bool) -> None:
    """Print the MiB the resident set rises above its pre-step size during one forward+backward. The peak
    (VmHWM) is reset first by writing 5 to /proc/self/clear_refs (Linux >= 4.0), so the high-water mark
    of imports and model building does not hide the step's; ru_maxrss is the fallback."""
    case = cases.PAIRS[pair](quick, torch.device("cpu"), with_reference=side == "diffusers")[side]

    def status_kib(field: str) -> int:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

    try:
        before = status_kib("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")
        fwd_bwd(case)
        peak = status_kib("VmHWM:")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        fwd_bwd(case)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - before) / 1024)


def row(case: Case, dtype: str, **fields: Any) -> dict:
    """The columns every row carries: where, how many threads, which dtype, which input."""
    return {"machine": machine(), "threads": torch.get_num_threads(), "dtype": dtype, "batch": case.batch,
            "input": case.shape, **fields}


def case_flops(case: Case) -> int:
    """Forward FLOPs (multiply-add = 2) of case.call, through metrics.count_flops."""
    return count_flops(_Call(case))


class _Call(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.case = case

    def forward(self) -> torch.Tensor:
        return self.case.call()
