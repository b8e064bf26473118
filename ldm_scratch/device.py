"""Where and in what precision to run: cuda when present, else cpu; bf16 autocast where it helps.

CPU bf16 autocast is a real lever on processors with AVX512-BF16 / AMX (measured in benchmarks/):
matmuls and convs run in bfloat16 while reductions (norms, softmax, losses) stay in float32.
Also here: how many threads to use on a shared machine, how glibc's malloc should keep freed memory
(tune_malloc, applied when the package is imported), and the torch.compile wrappers of a denoiser for training
(`train-diffusion --compile`) and for sampling (`pipe.compile()`), both opt-in.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import sys
import time
import warnings

import torch
from torch import nn

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


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), from /proc/cpuinfo on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device | str) -> str:
    """One line for a notebook's or a report's header: the processor, the threads torch uses and the precision
    that 'auto' picks, with the reason. A CPU without native bf16 (AVX2-only laptops, most consumer chips)
    runs bf16 autocast several times *slower* than fp32, so every time budget there buys fewer steps."""
    device = torch.device(device)
    precision = resolve_precision("auto", device)
    if device.type == "cuda":
        why = f"{torch.cuda.get_device_name(device)}, bf16 {'supported' if precision == 'bf16' else 'not supported'}"
        return f"device cuda ({why}); precision auto -> {precision}"
    why = ("native bf16 instructions (AVX512-BF16 / AMX)" if precision == "bf16"
           else "no native bf16 instructions, so bf16 autocast would be slower")
    return (f"device cpu ({cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads); "
            f"precision auto -> {precision}: {why}")


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


# ------------------------------------------------------------------ glibc malloc: keep freed memory for the next step
# malloc.h's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2 ** 20    # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 512 * 2 ** 20
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
malloc_tuned: bool | None = None  # what the last tune_malloc() did (None: never called)


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel after every step.

    Why: every forward allocates its activations afresh and frees them at the end. By default glibc serves
    blocks above its (adaptive) mmap threshold with a fresh mmap and returns them with munmap at free, and gives
    the top of the heap back (trims) once more than twice that threshold is free; either way the next call's
    memory arrives as new pages that the kernel must fault in and zero. Whether a process falls into that depends
    on the order of its allocations: a compiled guided U-Net forward of 500 rows took 13,400-14,100 minor page
    faults per call (about 54 MiB of zeroed pages) and 105-113 ms; with the two thresholds fixed here, 0-390 and
    90-100 ms (scripts/page_faults.py, 2-core AMD EPYC; README "Speed"); 1,000 U-Net images in the pipeline's
    default batches of 256 sampled in 19.6-24.7 s as malloc comes and 18.4-19.9 s tuned. Fixed thresholds
    (mallopt) keep blocks up to 32 MB on the heap and up to 512 MB of freed heap, the peak a step needs anyway.
    A no-op returning False off Linux/glibc, or when a MALLOC_*_ environment variable already tunes malloc
    (yours wins). LDM_MALLOC_TUNING=0 keeps `import ldm_scratch` from calling it."""
    global malloc_tuned
    malloc_tuned = False
    if not sys.platform.startswith("linux") or any(k in os.environ for k in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library found, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    return malloc_tuned


# ------------------------------------------------------------------ torch.compile, sampling and training
class CompiledDenoiser(nn.Module):
    """A denoiser behind `torch.compile` (inductor, static shapes), with what a reader would trip on handled:
      - no C++ compiler (inductor writes C++ for the CPU) or an op inductor cannot handle: the first call
        warns once and runs the plain model from then on (`fallback` says why). An error the plain model
        raises too (a wrong shape) is raised as usual;
      - each new input shape (the guided batch 2B, the last partial batch, w = 1) compiles once more (for
        sampling, CompiledForSampling pads a batch up to a compiled one instead where that costs less), and the
        seconds each took (compiling and the first run) are kept in `compile_seconds`;
      - inductor's pattern-matching passes are off (`torch._inductor.config.pattern_matcher = False`, for this
        model's compiles only). With them on, inductor rewrites our softmax(QK^T / sqrt(d)) V (layers.attention)
        into PyTorch's fused attention kernel, which is slow at our sizes: 37% of a compiled guided U-Net forward
        on the 2-core AMD EPYC went to it (2.9 ms a call at 16-64 positions of head width 12-24, batch 250;
        scripts/profile_compiled_sampling.py). Off, 1,000 guided U-Net images sample 1.1-1.3x faster; a
        compiled training step is as fast either way (README "Speed"). `inductor_patterns=True` restores them.
    The plain model stays `model`: save, average (EMA) and load it as before. Subclasses say when to compile."""

    what = "the denoiser"

    def __init__(self, model: nn.Module, channels_last: bool = False, verbose: bool = True,
                 inductor_patterns: bool = False):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model  # in place
        self.channels_last, self.verbose, self.inductor_patterns = channels_last, verbose, inductor_patterns
        self.fallback: str | None = None
        self.compile_seconds: list[float] = []  # one entry per compiled input shape
        self._build()

    def _build(self) -> None:
        self._compiled = torch.compile(self.model, dynamic=False)
        self._seen: set[tuple] = set()

    @staticmethod
    def _shape_key(x: torch.Tensor) -> tuple:
        """What a compiled graph is specialised on: the input's shape, device, autocast and autograd state."""
        return tuple(x.shape), x.device.type, torch.is_autocast_enabled(x.device.type), torch.is_grad_enabled()

    def _compiled_call(self, x: torch.Tensor, t: torch.Tensor, cond, freeze: bool) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        key = self._shape_key(x)
        start = time.perf_counter()
        try:
            with torch._inductor.config.patch(freezing=freeze, pattern_matcher=self.inductor_patterns):
                out = self._compiled(x, t, cond)
        except Exception as e:  # noqa: BLE001 - decided below: a compile failure, or the model's own error
            out = self.model(x, t, cond)  # raises if the input itself is wrong, as it would uncompiled
            self.fallback = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            warnings.warn(f"torch.compile failed, {self.what} runs uncompiled from now on ({self.fallback})",
                          stacklevel=3)
            return out
        if key not in self._seen:
            self._seen.add(key)
            self.compile_seconds.append(time.perf_counter() - start)
            if self.verbose:
                print(f"compiled {self.what}: input {key[0]} compiled and run in {self.compile_seconds[-1]:.1f} s",
                      flush=True)
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if self.fallback is not None:
            return self.model(x, t, cond)
        return self._compiled_call(x, t, cond, freeze=False)


class CompiledForTraining(CompiledDenoiser):
    """The training forward (and, through autograd, its backward) compiled; the weights are read at every call,
    so the optimizer's updates are seen. `train-diffusion --compile`. Measured by `bench --only levers
    --compile` (README "Speed"): bf16 + compile 1.38x (latent U-Net) to 1.51x (DiT) over fp32 on the Intel box
    against 1.19x / 1.10x for bf16 alone, after 31-100 s of compiling: worth it for runs of thousands of steps."""

    what = "training forward"


# CompiledForSampling pads a batch up to a compiled one when the padding is at most this share of it
PAD_MAX_FRACTION = 1 / 8


class CompiledForSampling(CompiledDenoiser):
    """A denoiser compiled for sampling, with the weights frozen in (`pipe.compile()`).

    Sampling calls the same network 2 x 50 times per batch with the same weights, the case compiling pays
    for. Freezing (`torch._inductor.config.freezing`) treats the weights as constants, so inductor folds them
    into the graph and lets oneDNN pre-pack them once instead of at every call. Measured on 2 idle threads
    (README "Speed": 1,000 guided images, 50 DDIM steps): the latent DiT 20.5 -> 8.0 s, the latent U-Net
    45 -> 27 s, and 21 s with `channels_last` (the convolutions' weights and activations stored NHWC, which
    oneDNN prefers; values unchanged), after 14-24 s of compiling at the first call of each batch shape.
    Plain compile without freezing gave 12.1 and 33.4 s. Besides CompiledDenoiser's cases:
      - frozen weights go stale: if any parameter changed in place since compiling (an optimizer step,
        load_state_dict; torch counts them in `Tensor._version`), the next call compiles again;
      - with gradients on (training) it runs the plain model: freezing is for inference only;
      - a batch a little smaller than one already compiled (the padding at most PAD_MAX_FRACTION = 1/8 of it) is
        padded up to that size (its last row repeated) and the padding cut from the output, instead of
        compiling a new shape: 1,000 images in batches of 256 end with a batch of 232 (24 rows of padding, 9%).
        Rows are independent in our denoisers (no batch norm), so the kept rows are the unpadded ones' up to
        summation order. At most 1/8 more work per call against 10-30 s of compiling once; a batch further below
        (batches of 125 after 250, w = 1 after a guided call) compiles its own shape, because every later call of
        that size would pay the padding again (padding 125 to 250 measured 36.5 against 18-19 s per 1,000
        images). `pad_batches=False` compiles every new shape."""

    what = "sampling denoiser"

    def __init__(self, model: nn.Module, channels_last: bool = False, verbose: bool = True,
                 inductor_patterns: bool = False, pad_batches: bool = True):
        self.pad_batches = pad_batches
        super().__init__(model, channels_last, verbose, inductor_patterns)

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.model.parameters())

    def _build(self) -> None:
        super()._build()
        self._weights_at_compile = self._versions()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if self.fallback is not None or torch.is_grad_enabled():
            return self.model(x, t, cond)
        if self._versions() != self._weights_at_compile:
            if self.verbose:
                print("compiled denoiser: the weights changed since they were frozen in; compiling again", flush=True)
            torch._dynamo.reset()
            self._build()
        rows = x.shape[0]
        target = self._padded_rows(x) if self.pad_batches else None
        if target is None:
            return self._compiled_call(x, t, cond, freeze=True)
        x, t, cond = (_pad_rows(v, rows, target) for v in (x, t, cond))
        return self._compiled_call(x, t, cond, freeze=True)[:rows]

    def _padded_rows(self, x: torch.Tensor) -> int | None:
        """The smallest compiled batch that x's rows fit in with at most PAD_MAX_FRACTION of it padding, when x's
        own shape has not been compiled; else None (run as is)."""
        rows, rest = x.shape[0], tuple(x.shape[1:])
        key = self._shape_key(x)
        if key in self._seen:
            return None
        fits = [k[0][0] for k in self._seen
                if k[0][1:] == rest and k[1:] == key[1:] and rows < k[0][0] and k[0][0] - rows <= PAD_MAX_FRACTION * k[0][0]]
        return min(fits) if fits else None


def _pad_rows(v, rows: int, target: int):
    """v with every tensor whose first dimension is `rows` grown to `target` rows by repeating its last row;
    tuples and lists element-wise; anything else (None, a scalar timestep) as it is."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
        return torch.cat([v, v[-1:].expand(target - rows, *v.shape[1:])])
    if isinstance(v, (tuple, list)):
        return type(v)(_pad_rows(u, rows, target) for u in v)
    return v
