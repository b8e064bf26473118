"""Where a step's time goes: the benchmark suite's `breakdown` table (bench.py) profiles one training step
and one guided sampling step with torch.profiler, sorts the ops' self time into a few categories, and sets
the FLOPs the step does against a matmul peak measured in the same run (model FLOP utilisation, MFU).

Categories. Every profiler event is an op (`aten::mm`), a range (`optimizer`, `Optimizer.step#AdamW.step`)
or autograd bookkeeping (`autograd::engine::evaluate_function: MmBackward0`, `AccumulateGrad`). An event's
*self* time is its duration minus its children's, so summing self times counts every microsecond once.
`categorise(name, enclosing)` decides, first rule that matches wins:

  1. inside a `record_function("optimizer")` or `record_function("ema")` range (or that range itself):
     "optimizer" / "ema", whatever the op (the step wraps zero_grad, clip_grad_norm_ and AdamW's step in
     the first, EMA.update in the second, so their Python and bookkeeping count there too);
  2. not an op (no `aten::` / `mkldnn::` / `prims::` prefix): None, left to "other" below;
  3. the op name (prefix stripped) is in MATMUL_OPS or contains "conv": "matmul_conv" (mm, addmm, bmm,
     baddbmm, matmul, linear, convolution, _convolution, mkldnn_convolution, convolution_backward, ...);
  4. it contains one of ATTENTION_PATTERNS: "attention" (scaled_dot_product_*, the fused kernels'
     *_attention* forward and backward, softmax, _softmax, _softmax_backward_data). layers.attention's plain
     path (bf16 on the CPU) computes Q K^T and A V as two bmm ops, which rule 3 has already sent to
     "matmul_conv": only its softmax is counted here;
  5. it contains one of NORM_PATTERNS: "norm" (group_norm, native_group_norm(_backward), layer_norm, ...);
  6. it is in DATA_MOVEMENT_OPS: "data_movement" (copy_, to, _to_copy, contiguous, clone, cat, empty, views
     and reshapes, fills, pads, nearest upsampling, item: copies, allocations and layout);
  7. any other op: "pointwise" (activations and elementwise arithmetic: silu, gelu, add, mul, ..., and the
     few reductions and random draws of a step: sum, mean, mse_loss, randn).

"other" (python / other) is the rest of the step's wall time: wall time minus the categorised self time.
It holds the Python between ops, autograd's engine bookkeeping, and the profiler's own overhead (about
profiled_ms - step_ms in the table: small models run many tiny ops, so theirs is large).

MFU: the step's FLOPs (metrics.count_flops of the forward; a training step counts 3x the forward, the
usual convention: the backward does about twice the forward's matmul work) divided by the unprofiled step
time, as a fraction of a square matmul's GFLOP/s timed on the same machine, threads and precision.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from ldm_scratch.bench_timing import median_ms, sync
from ldm_scratch.config import TrainConfig
from ldm_scratch.device import autocast
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.ema import EMA
from ldm_scratch.metrics import count_flops
from ldm_scratch.train import make_adamw

# The categories that ops are sorted into, in table order; "other" (the residual) comes last.
CATEGORIES = ("matmul_conv", "attention", "norm", "pointwise", "data_movement", "optimizer", "ema")
RANGES = ("optimizer", "ema")                    # record_function names: everything inside goes to the range
OP_PREFIXES = ("aten::", "mkldnn::", "prims::")  # what makes an event an op

MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "addmv", "dot",
                        "einsum", "_addmm_activation", "mkldnn_linear", "_mkldnn_linear_pointwise"})
MATMUL_PATTERNS = ("conv",)  # conv2d, convolution, _convolution, mkldnn_convolution, convolution_backward, ...
ATTENTION_PATTERNS = ("scaled_dot_product", "_attention", "softmax")
NORM_PATTERNS = ("group_norm", "layer_norm", "batch_norm", "instance_norm", "rms_norm")
DATA_MOVEMENT_OPS = frozenset({
    # copies and casts
    "copy_", "_copy_from", "_copy_from_and_resize", "to", "_to_copy", "contiguous", "clone", "cat", "stack",
    "item", "_local_scalar_dense", "index_select", "gather", "repeat", "constant_pad_nd", "pad",
    "upsample_nearest2d", "upsample_nearest2d_backward", "_unsafe_index",
    # allocations and fills
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "zeros", "zeros_like",
    "new_zeros", "ones", "ones_like", "full", "full_like", "fill_", "zero_", "scalar_tensor",
    # views and layout
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand", "expand_as",
    "as_strided", "as_strided_", "slice", "select", "unsqueeze", "squeeze", "flatten", "unflatten", "narrow",
    "chunk", "split", "split_with_sizes", "unbind", "movedim", "detach", "detach_", "alias", "lift_fresh",
})


def categorise(name: str, enclosing: str | None = None) -> str | None:
    """The category of one profiler event's self time (see the module docstring for the rules), or None
    for an event that is not an op (its self time stays in "other").

    name: the event's name, e.g. "aten::addmm"; enclosing: the record_function range in RANGES that the
    event runs inside, if any ("optimizer", "ema")."""
    if enclosing in RANGES:
        return enclosing
    if name in RANGES:
        return name
    prefix = next((p for p in OP_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return None
    op = name[len(prefix):]
    if op in MATMUL_OPS or any(p in op for p in MATMUL_PATTERNS):
        return "matmul_conv"
    if any(p in op for p in ATTENTION_PATTERNS):
        return "attention"
    if any(p in op for p in NORM_PATTERNS):
        return "norm"
    if op in DATA_MOVEMENT_OPS:
        return "data_movement"
    return "pointwise"


def category_times(events: Iterable[Any], time_of: Callable[[Any], float]) -> dict[str, float]:
    """Sum time_of(event) per category over a profiler's event forest (prof.events(): each event has .name,
    .cpu_parent and .cpu_children). Walks from the roots down so that every event knows the RANGES range it
    runs inside. Returns {category: total} for every name in CATEGORIES (0.0 where none)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    stack = [(e, None) for e in events if e.cpu_parent is None]
    while stack:
        event, enclosing = stack.pop()
        cat = categorise(event.name, enclosing)
        if cat is not None:
            totals[cat] += time_of(event)
        inner = enclosing or (event.name if event.name in RANGES else None)
        stack.extend((child, inner) for child in event.cpu_children)
    return totals


def shares_pct(totals: dict[str, float], wall: float) -> dict[str, float]:
    """Percent of `wall` per category, plus "other" = wall minus the categorised sum. Sums to 100 exactly.
    If the categorised time exceeds the wall time (ops overlapping on several threads), the shares are of
    the categorised sum instead and "other" is 0."""
    if wall <= 0:
        raise ValueError(f"wall time must be positive, got {wall}")
    denom = max(wall, sum(totals.values()))
    pct = {k: 100.0 * v / denom for k, v in totals.items()}
    pct["other"] = max(0.0, 100.0 - sum(pct.values()))
    return pct


def _self_cpu(event: Any) -> float:
    return event.self_cpu_time_total


def _self_device(event: Any) -> float:
    """Kernel time attributed to the op that launched it (CPU events only: the kernels' own events would
    count it twice)."""
    return event.self_device_time_total if event.device_type == DeviceType.CPU else 0.0


def profile_step(step: Callable[[], Any], reps: int, device: torch.device) -> dict[str, Any]:
    """Run step() `reps` times under torch.profiler (CPU activities; CUDA too on a cuda device).
    Returns profiled_ms (wall time per step under the profiler), cpu_pct (shares_pct of the ops' self-CPU
    time) and, on cuda, gpu_pct (the same for the kernels' time; its "other" is the GPU's idle time)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            step()
        sync(device)
        wall_us = 1e6 * (time.perf_counter() - start)
    events = prof.events()
    out = {"profiled_ms": wall_us / 1000 / reps, "cpu_pct": shares_pct(category_times(events, _self_cpu), wall_us)}
    if device.type == "cuda":
        out["gpu_pct"] = shares_pct(category_times(events, _self_device), wall_us)
    return out


# -------------------------------------------------------------------------------------------------
# The steps
# -------------------------------------------------------------------------------------------------

def train_step(model: nn.Module, batch: tuple, loss_fn: Callable, device: torch.device,
               precision: str) -> Callable[[], None]:
    """One training step as train.Trainer.train_step takes it, logging aside: forward and loss under
    device.autocast(precision), backward; then, in the range "optimizer", clip_grad_norm_ at TrainConfig's
    grad_clip, the step of train.make_adamw's AdamW at TrainConfig's defaults (fused where torch has it)
    and zero_grad; then, in the range "ema", EMA.update at TrainConfig's decay. Mutates model (it trains)."""
    cfg = TrainConfig()
    model.train()
    opt = make_adamw(model.parameters(), cfg)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast(device, precision):
            loss = loss_fn(model, batch)
        loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with record_function("ema"):
            ema.update(model)

    return step


def guided_sample_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, device: torch.device,
                       precision: str, guidance: float, t: int, t_prev: int,
                       diffusion: GaussianDiffusion | None = None) -> Callable[[], torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} with classifier-free guidance, as sample_ddim takes it: guided_eps
    runs the denoiser ONCE on [x; x] with [labels; null] (2B), under device.autocast(precision), no grad.
    x: (B, C, H, W), labels: (B,)."""
    diffusion = diffusion or GaussianDiffusion()
    model.eval()
    t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)

    @torch.no_grad()
    def step() -> torch.Tensor:
        with autocast(device, precision):
            eps = diffusion.guided_eps(model, x, t_batch, labels, model.null_class, guidance)  # (B, C, H, W)
        return diffusion.ddim_step(eps, t, t_prev, x)

    return step


def guided_forward_inputs(cfg: Any, batch_size: int, t: int = 500, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, t, labels) for one guided sampling forward of a class-conditional denoiser with config cfg: 2 x
    batch_size rows (the [cond; null] batch), Gaussian x, every row at timestep t, labels drawn from the classes
    and the null class (index num_classes). What scripts/page_faults.py and profile_compiled_sampling.py time."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * batch_size
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    labels = torch.randint(0, cfg.num_classes + 1, (n,), generator=gen)  # the last index is the null class
    return x, torch.full((n,), t), labels


class _Closure(nn.Module):
    """fn as a module, for metrics.count_flops (which calls model(*inputs))."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__()
        self.fn = fn

    def forward(self) -> Any:
        return self.fn()


def forward_flops(fn: Callable[[], Any]) -> int:
    """Matmul/conv/attention FLOPs (multiply-add = 2) of one call of fn, through metrics.count_flops."""
    return count_flops(_Closure(fn))


# -------------------------------------------------------------------------------------------------
# The machine's matmul peak
# -------------------------------------------------------------------------------------------------

def matmul_peak_gflops(n: int, precision: str, device: torch.device, warmup: int, reps: int) -> float:
    """GFLOP/s of one square (n, n) @ (n, n) matmul (2 n^3 FLOPs), median of `reps` after `warmup`, at the
    current torch thread count. precision "bf16": bf16 operands under bf16 autocast (what autocast gives a
    model's matmuls); "fp32": float32. The denominator of MFU: the best this machine does on the op that
    dominates our models, measured in the same run (a vendor's datasheet peak is not reachable on one
    thread of a shared CPU)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if n < 1:
        raise ValueError(f"matmul size must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))  # 2 x (n, n)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with amp:
        ms = median_ms(lambda: a @ b, warmup, reps, device)
    return 2 * n ** 3 / (ms / 1000) / 1e9
