"""The benchmark suite: what our models cost, next to diffusers' and under each speed lever, in one run.

`python -m ldm_scratch bench [--quick] [--out DIR] [--threads N] [--device cpu|cuda] [--compile]` prints
five tables and writes them to OUT/bench.md and OUT/bench.json. Every row names its machine (CPU model or
GPU), threads, dtype, batch and input shape: timings only mean something next to rows of the same run.
  1. ours vs diffusers at the same configuration and input (`compare`): forward+backward and forward-only
     ms per batch, peak memory, forward GFLOPs (metrics.count_flops), and the ratio ours/diffusers.
  2. levers (`levers`): one training step (forward, loss, backward, AdamW) in fp32, bf16 autocast,
     channels_last, bf16 with the fused attention kernel forced (layers.attention's plain matmuls are the default),
     torch.compile (--compile); speed relative to fp32.
  3. sampling (`sampling`): images/s for DDIM with classifier-free guidance, [cond; null] in one batched
     forward (diffusion.guided_eps) vs two separate forwards (TwoForwardCFG); latent models add one decode.
  4. latent vs pixel (`latent_vs_pixel`): the same U-Net widths on 1x32x32 pixels and 4x8x8 latents (time
     and FLOPs per step), and the FLOPs of one U-Net step at 512x512x3 vs 64x64x4 (Rombach et al. 2022,
     Sec. 3: the f = 8 autoencoder's saving).
  5. breakdown (`breakdown`): one training step (+ EMA) and one guided DDIM step per model at the default
     precision, profiled with torch.profiler: the share of the step's time in matmul/conv, attention, norms,
     pointwise ops, data movement, optimizer, EMA and Python/other (bench_profile.categorise), and the model
     FLOP utilisation against a square matmul's GFLOP/s timed in the same run.
Timing: `warmup` untimed reps, then the median of `reps` (torch.set_num_threads fixed). The median of a
few reps resists other jobs on a shared machine; ratios within one run are the numbers to quote.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldm_scratch.device import resolve_precision
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.metrics import count_flops
from ldm_scratch.unet import UNet
from ldm_scratch import bench_cases as cases
from ldm_scratch import bench_profile as profiling
from ldm_scratch import layers
from ldm_scratch.bench_cases import Case, TwoForwardCFG  # noqa: F401 (re-exported)
from ldm_scratch.bench_timing import (MiB, case_flops, fwd, fwd_bwd, machine, median_ms, peak_mib,  # noqa: F401
                                      row, saved_activation_mib, sync)

GUIDANCE = 3.0        # the guidance scale of stage 2's grids
CFG_PROBE_STEPS = 30  # DDIM steps in the sampling table (the grids' and evaluation's count)


# -------------------------------------------------------------------------------------------------
# 1. ours vs diffusers
# -------------------------------------------------------------------------------------------------

def compare(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[str]]:
    notes = []
    try:
        import diffusers  # noqa: F401  (optional: the comparison column needs it)
        have_ref = True
    except ImportError as e:
        have_ref = False
        notes.append(f"diffusers not importable ({e}): its columns are skipped")
    rows = []
    for pair, build in cases.PAIRS.items():
        if args.quick and pair == "AE small-f8":
            continue  # in quick mode both autoencoders are the tiny preset
        built = build(args.quick, device, with_reference=have_ref)
        notes.append(f"{pair}: {built['note']}")
        result: dict[str, dict] = {}
        for side in ("ours", "diffusers"):
            case = built.get(side)
            if case is None:
                continue
            peak, how = (None, "not measured (--quick)") if args.quick else peak_mib(pair, side, args.quick, device)
            result[side] = {"fwd_bwd_ms": median_ms(lambda: fwd_bwd(case), args.warmup, args.reps, device),
                            "fwd_ms": median_ms(lambda: fwd(case), args.warmup, args.reps, device),
                            "saved_mib": saved_activation_mib(case), "peak_mib": peak, "peak_method": how,
                            "gflops": case_flops(case) / 1e9, "params_m": case.params() / 1e6}
        ours, ref = result["ours"], result.get("diffusers")
        ratio = {k: (ours[k] / ref[k] if ref and ref[k] else None) for k in ("fwd_bwd_ms", "fwd_ms", "peak_mib")}
        label = f"{pair} [quick: tiny preset]" if args.quick else pair
        rows.append(row(built["ours"], "fp32", model=label, ours=ours, diffusers=ref, ratio=ratio))
    return rows, notes


# -------------------------------------------------------------------------------------------------
# 2. levers: one training step under each
# -------------------------------------------------------------------------------------------------

def levers(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[str]]:
    notes = ["step = forward, loss (AE: L1 + 1e-6 KL; denoisers: L_simple at fixed t, eps), backward, AdamW",
             "bf16: bf16 autocast with layers.attention's default (plain matmuls on the CPU in bf16); "
             "bf16+fused-attn: the same with F.scaled_dot_product_attention forced (the default before "
             "this benchmark found it ~10x slower in its bf16 CPU backward)"]
    rows = []
    for name, build in cases.lever_models(args.quick).items():
        model, batch_fn, loss_fn, conv = build
        choices = ["fp32", "bf16", "bf16+fused-attn"] + (["channels_last", "bf16+channels_last"] if conv else [])
        if args.compile:
            choices += ["compile", "bf16+compile"]
        base = None
        for lever in choices:
            ms, extra = lever_step_ms(model, batch_fn, loss_fn, lever, args, device)
            if ms is None:
                notes.append(f"{name} {lever}: {extra}")
                continue
            base = base or ms
            x = batch_fn(device)[0]
            rows.append({"machine": machine(), "threads": torch.get_num_threads(),
                         "dtype": "bf16 autocast" if "bf16" in lever else "fp32", "batch": x.shape[0],
                         "input": "x".join(map(str, x.shape[1:])), "model": name, "lever": lever,
                         "step_ms": ms, "items_per_s": 1000 * x.shape[0] / ms, "x_fp32": base / ms, **extra})
    return rows, notes


def lever_step_ms(model: nn.Module, batch_fn, loss_fn, lever: str, args, device) -> tuple[float | None, dict]:
    m = cases.fresh_copy(model).to(device)
    batch = batch_fn(device)
    if "channels_last" in lever:
        m = m.to(memory_format=torch.channels_last)
        batch = (batch[0].contiguous(memory_format=torch.channels_last),) + batch[1:]
    extra: dict = {}
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in lever else contextlib.nullcontext
    if "compile" in lever:
        try:
            start = time.perf_counter()
            # static shapes: a training batch never changes shape, and inductor's dynamic-shape guards failed on
            # the latent U-Net ("cannot determine truth value of Relational")
            m = torch.compile(m, dynamic=False)
            with amp():  # trace under the precision it will run in (autocast is part of the graph)
                loss = loss_fn(m, batch)
            loss.backward()  # compiles forward and backward
            extra["compile_s"] = time.perf_counter() - start
        except Exception as e:  # inductor needs a C++ compiler; report, do not fail the suite
            return None, {"skipped": f"torch.compile failed: {type(e).__name__}: {str(e)[:120]}"}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    attn = fused_attention_patch if "fused-attn" in lever else contextlib.nullcontext

    def step() -> None:
        with amp(), attn():
            loss = loss_fn(m, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    m.train()
    return median_ms(step, args.warmup, args.reps, device), extra


@contextlib.contextmanager
def fused_attention_patch():
    """Every layers.attention call uses F.scaled_dot_product_attention, also in bf16 on the CPU."""
    original = layers.CPU_BF16_PLAIN_ATTENTION
    layers.CPU_BF16_PLAIN_ATTENTION = False
    try:
        yield
    finally:
        layers.CPU_BF16_PLAIN_ATTENTION = original


# -------------------------------------------------------------------------------------------------
# 3. sampling with classifier-free guidance
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def sampling(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[str]]:
    steps = 2 if args.quick else CFG_PROBE_STEPS
    n = 4 if args.quick else 16
    notes = [f"{n} class-conditional images, {steps} DDIM steps, guidance {GUIDANCE}; "
             "batched = one forward on [cond; null] (2B), separate = two forwards of B (TwoForwardCFG)"]
    diffusion = GaussianDiffusion()
    ae = cases.sampling_autoencoder(args.quick).to(device).eval()
    rows = []
    for name, (model, latent) in cases.sampling_models(args.quick).items():
        model = model.to(device).eval()
        labels = torch.arange(n, device=device) % model.cfg.num_classes
        shape = (n, model.cfg.in_channels, model.cfg.sample_size, model.cfg.sample_size)
        decode_ms = median_ms(lambda: ae.decode(torch.randn(shape, device=device)), 1, args.reps, device) \
            if latent else 0.0
        for mode in ("batched", "separate"):
            m = model if mode == "batched" else TwoForwardCFG(model)
            g = torch.Generator(device).manual_seed(0)
            ms = median_ms(lambda: diffusion.sample_ddim(m, shape, labels, model.null_class, num_steps=steps,
                                                         guidance_scale=GUIDANCE, generator=g, progress=False),
                           1 if args.quick else 0, 1 if args.quick else 2, device)
            total = ms + decode_ms
            rows.append({"machine": machine(), "threads": torch.get_num_threads(), "dtype": "fp32", "batch": n,
                         "input": "x".join(map(str, shape[1:])), "model": name, "cfg": mode, "steps": steps,
                         "denoise_ms": ms, "decode_ms": decode_ms, "images_per_s": 1000 * n / total})
    return rows, notes


# -------------------------------------------------------------------------------------------------
# 4. latent vs pixel, same denoiser family
# -------------------------------------------------------------------------------------------------

def latent_vs_pixel(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[str]]:
    notes = ["same widths (ch, ch_mult, num_res_blocks, heads); attention at the same level index, "
             "so the latent twin attends over 16x fewer positions",
             "512/64 rows: FLOPs only, counted on the meta device (nothing allocated, nothing run)"]
    rows = []
    B = 2 if args.quick else 32
    for label, cfg in cases.pixel_latent_twins(args.quick).items():
        case = cases.unet_case(cfg, B, device, seed=0)
        rows.append(row(case, "fp32", model=label, step_ms=median_ms(lambda: fwd_bwd(case), args.warmup,
                                                                    args.reps, device),
                        gflops_per_step=case_flops(case) / 1e9))
    for label, cfg in cases.sd_size_twins().items():
        with torch.device("meta"):
            model = UNet(cfg)
            x = torch.empty(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        rows.append({"machine": "meta device (FLOPs only)", "threads": torch.get_num_threads(), "dtype": "fp32",
                     "batch": 1, "input": "x".join(map(str, x.shape[1:])), "model": label, "step_ms": None,
                     "gflops_per_step": count_flops(model, x, torch.zeros(1, dtype=torch.long)) / 1e9})
    for a, b in ((0, 1), (2, 3)):
        ra, rb = rows[a], rows[b]
        flops = ra["gflops_per_step"] / rb["gflops_per_step"]
        notes.append(f"pixel/latent ({ra['input']} vs {rb['input']}): FLOPs x{flops:.1f}"
                     + (f", time x{ra['step_ms'] / rb['step_ms']:.1f}" if ra["step_ms"] else ""))
    return rows, notes


# -------------------------------------------------------------------------------------------------
# 5. step-time breakdown and model FLOP utilisation
# -------------------------------------------------------------------------------------------------

def breakdown(args: argparse.Namespace, device: torch.device,
              models: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Per model (the levers table's four) and step kind (one training step; for the denoisers also one
    guided DDIM step): ms per step, achieved GFLOP/s, MFU against a square matmul timed now, and the share of
    the step's time per op category (bench_profile's docstring defines them). All at the package's
    default precision (device.resolve_precision("auto")). `models`: keep only the models whose name
    contains one of these strings (tests)."""
    all_models = cases.lever_models(args.quick)
    chosen = {k: v for k, v in all_models.items() if models is None or any(m in k for m in models)}
    if not chosen:
        raise ValueError(f"no benchmark model matches {models}; models: {', '.join(all_models)}")
    precision = resolve_precision("auto", device)
    n = (4096 if args.quick else 8192) if device.type == "cuda" else (1024 if args.quick else 2048)
    peaks = {p: profiling.matmul_peak_gflops(n, p, device, args.warmup, args.reps) for p in ("fp32", "bf16")}
    peak = peaks[precision]
    diffusion = GaussianDiffusion()
    timesteps = diffusion.ddim_timesteps(CFG_PROBE_STEPS)
    t, t_prev = timesteps[len(timesteps) // 2], timesteps[len(timesteps) // 2 + 1]  # a mid-trajectory step
    notes = [f"matmul peak ({n}x{n} @ {n}x{n}, {torch.get_num_threads()} threads): "
             f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 autocast {peaks['bf16']:.0f} GFLOP/s; "
             f"mfu = gflops_s / peak_gflops_s, the peak of the precision used ({precision})",
             "train = forward + loss (autocast), backward, clip_grad_norm_ + fused AdamW (train.make_adamw) + "
             "zero_grad in range 'optimizer', EMA.update in range 'ema'; FLOPs = 3x the forward's",
             f"guided sample = one DDIM step t={t}->{t_prev} with classifier-free guidance (w={GUIDANCE}): the "
             "denoiser once on [cond; null] (2x batch) under autocast, no grad; FLOPs = that forward's",
             "pct_*: share of the profiled step's wall time (profiled_ms) that ops of each category spent "
             "in themselves (self-CPU time); pct_other = the rest: Python, autograd bookkeeping and the "
             "profiler's own overhead (~ profiled_ms - step_ms); step_ms and MFU are timed without the "
             "profiler. Categories: ldm_scratch/bench_profile.py"]
    if device.type == "cuda":
        notes.append("gpu_pct_*: the same categories over the kernels' time (attributed to the op that "
                     "launched them); gpu_pct_other = the GPU's idle time")
    rows = []
    for name, (model, batch_fn, loss_fn, _) in chosen.items():
        batch = batch_fn(device)
        x = batch[0]  # (B, C, H, W)
        m_train = cases.fresh_copy(model).to(device)
        steps = {"train": (profiling.train_step(m_train, batch, loss_fn, device, precision),
                           3 * profiling.forward_flops(lambda: loss_fn(m_train, batch)))}
        if getattr(model, "null_class", None) is not None:  # a class-conditional denoiser: guidance applies
            m_eval = cases.fresh_copy(model).to(device)
            sample = profiling.guided_sample_step(m_eval, x, batch[1], device, precision, GUIDANCE, t, t_prev,
                                                  diffusion)
            steps["guided sample"] = (sample, profiling.forward_flops(sample))
        for kind, (step, flops) in steps.items():
            ms = median_ms(step, args.warmup, args.reps, device)
            prof = profiling.profile_step(step, args.reps, device)
            gflops_s = flops / 1e9 / (ms / 1000)
            r = {"machine": machine(), "threads": torch.get_num_threads(),
                 "dtype": "bf16 autocast" if precision == "bf16" else "fp32", "batch": x.shape[0],
                 "input": "x".join(map(str, x.shape[1:])), "model": name, "step": kind, "step_ms": ms,
                 "profiled_ms": prof["profiled_ms"], "gflop_per_step": flops / 1e9, "gflops_s": gflops_s,
                 "peak_gflops_s": peak, "mfu": gflops_s / peak}
            r.update({f"pct_{k}": v for k, v in prof["cpu_pct"].items()})
            r.update({f"gpu_pct_{k}": v for k, v in prof.get("gpu_pct", {}).items()})
            rows.append(r)
    return rows, notes


# -------------------------------------------------------------------------------------------------
# Output and the command line
# -------------------------------------------------------------------------------------------------

SECTIONS: dict[str, tuple[str, Callable]] = {
    "compare": ("1. ours vs diffusers (same config, same input)", compare),
    "levers": ("2. levers: one training step, speed relative to fp32", levers),
    "sampling": ("3. sampling: DDIM with classifier-free guidance", sampling),
    "latent_vs_pixel": ("4. latent vs pixel: one denoiser family, cost per step", latent_vs_pixel),
    "breakdown": ("5. step-time breakdown by op category, and model FLOP utilisation", breakdown),
}
BASE_COLUMNS = ["machine", "threads", "dtype", "batch", "input"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _flat(r: dict) -> dict:
    """compare rows nest ours/diffusers/ratio: flatten to ours_fwd_bwd_ms, ..., for the table."""
    out = {}
    for k, v in r.items():
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": vv for kk, vv in v.items() if kk != "peak_method"})
        elif k not in ("diffusers",) or v is not None:
            out[k] = v
    return out


def markdown_table(rows: list[dict]) -> str:
    flat = [_flat(r) for r in rows]
    cols = BASE_COLUMNS + [c for c in dict.fromkeys(k for r in flat for k in r) if c not in BASE_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in flat]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    parts = [f"# ldm_scratch benchmarks\n\nmachine: {report['machine']}; device {report['device']}; "
             f"threads {report['threads']}; torch {report['torch']}; quick={report['quick']}; "
             f"median of {report['reps']} reps after {report['warmup']} warm-up"]
    for key, (title, _) in SECTIONS.items():
        sec = report["sections"].get(key)
        if sec is None:
            continue
        parts.append(f"## {title}\n\n{markdown_table(sec['rows'])}")
        parts.append("\n".join(f"- {n}" for n in sec["notes"]))
    return "\n\n".join(parts) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny models and shapes, 2 timed reps (under a minute)")
    p.add_argument("--out", default="bench_out", help="folder for bench.md and bench.json")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (fixed for the whole run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compile", action="store_true", help="also time torch.compile in the levers table")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    p.add_argument("--reps", type=int, default=None, help="timed reps (default 2 with --quick, else 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed reps first (default 1 with --quick, else 2)")


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch.cuda.is_available() is False; use --device cpu")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    args.reps = args.reps or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"machine": machine() if device.type == "cpu" else torch.cuda.get_device_name(),
              "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "quick": args.quick, "reps": args.reps, "warmup": args.warmup, "sections": {}}
    for key in args.only:
        title, fn = SECTIONS[key]
        print(f"\n## {title}", flush=True)
        start = time.perf_counter()
        rows, notes = fn(args, device)
        notes.append(f"section took {time.perf_counter() - start:.1f} s")
        report["sections"][key] = {"rows": rows, "notes": notes}
        print(markdown_table(rows))
        print("\n".join(f"- {n}" for n in notes), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(to_markdown(report))
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out / 'bench.md'} and {out / 'bench.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_scratch bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
