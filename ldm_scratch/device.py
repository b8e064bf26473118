"""Where and in what precision to run: cuda when present, else cpu; bf16 autocast where it helps.

CPU bf16 autocast is a real lever on processors with AVX512-BF16 / AMX (measured in benchmarks/):
matmuls and convs run in bfloat16 while reductions (norms, softmax, losses) stay in float32.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time

import torch

# A thread of ours shares a core with a busy process when fewer than this many cores' worth are free.
THREAD_MARGIN = 0.3
PROC_STAT = "/proc/stat"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul instructions (oneDNN reports them)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where the device supports it, else 'fp32'. Unknown names are an error."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be one of 'auto', 'bf16', 'fp32'; got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast in bf16 for precision 'bf16' (after resolve_precision), else a no-op context."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------ how many threads on a shared machine
def _cpu_times(path: str = PROC_STAT) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from the first line of /proc/stat (Linux)."""
    with open(path) as f:
        fields = f.readline().split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"{path}: no aggregate 'cpu' line")
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)   # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])              # user..steal; guest time is inside user


def busy_cores(interval: float = 0.25, path: str = PROC_STAT) -> float | None:
    """How many cores' worth of CPU other processes used over `interval` seconds, or None where there is no
    /proc/stat (not Linux). Measured now, not the load average's lagging 1-minute mean."""
    try:
        b0, t0 = _cpu_times(path)
        time.sleep(interval)
        b1, t1 = _cpu_times(path)
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (os.cpu_count() or 1) * (b1 - b0) / (t1 - t0)


def safe_num_threads(cores: int | None = None, busy: float | None = None) -> int:
    """Torch threads for a process that should not fight others for cores: the free cores (cores - busy,
    rounded down unless THREAD_MARGIN short of the next whole core), at least 1, at most `cores`.

    Why: torch's OpenMP threads spin while they wait for each other, so when another process holds one of
    2 cores, 2 threads run a training step 2.2-2.5x SLOWER than 1 thread does (scripts/thread_safety.py, README
    "Speed"); OMP_WAIT_POLICY=PASSIVE does not rescue it and halves the idle speed. busy None (unknown):
    all cores, torch's own default."""
    cores = cores or os.cpu_count() or 1
    if busy is None:
        return cores
    return max(1, min(cores, math.floor(cores - busy + THREAD_MARGIN)))


def set_safe_num_threads(verbose: bool = True) -> int | None:
    """The command line's default (ldm_scratch.__main__): unless OMP_NUM_THREADS says otherwise, use
    safe_num_threads() of what is busy at start. Returns the count set, or None when OMP_NUM_THREADS decided."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    busy = busy_cores()
    n = safe_num_threads(busy=busy)
    if n < torch.get_num_threads():
        torch.set_num_threads(n)
        if verbose:
            print(f"using {n} torch thread(s): {busy:.1f} of {os.cpu_count()} cores were busy at start "
                  f"(set OMP_NUM_THREADS to choose)", flush=True)
    return n
