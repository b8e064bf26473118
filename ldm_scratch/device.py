"""Where and in what precision to run: cuda when present, else cpu; bf16 autocast where it helps.

CPU bf16 autocast is a real lever on processors with AVX512-BF16 / AMX (measured in benchmarks/):
matmuls and convs run in bfloat16 while reductions (norms, softmax, losses) stay in float32.
"""
from __future__ import annotations

import contextlib
import functools

import torch


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
