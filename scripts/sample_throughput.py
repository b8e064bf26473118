"""1,000 class-conditional images through a saved pipeline, guidance 3, decode included (the README's throughput):
    python scripts/sample_throughput.py runs/latent_unet/pipeline                  # 50 steps of its default sampler
    python scripts/sample_throughput.py runs/flow/pipeline --steps 4 --sampler euler --threads 2
    python scripts/sample_throughput.py runs/latent_unet/pipeline --compile       # pipe.compile(): torch.compile
    python scripts/sample_throughput.py runs/latent_unet/pipeline --fused-attention   # the README's open lead
    python scripts/sample_throughput.py runs/latent_unet/pipeline --compile --compare-batch-sizes 125 250 --repeat 3
One warm-up call first (20 images, 5 steps; with --compile a full batch, so that the compiling happens there and
its time is printed on its own); the timed call draws all 1,000 in batches of --batch-size."""
import argparse
import statistics
import time

import torch

from ldm_scratch import layers
from ldm_scratch.bench_profile import matmul_peak_gflops
from ldm_scratch.pipeline import LatentDiffusionPipeline


def timed_call(pipe: LatentDiffusionPipeline, labels: torch.Tensor, sampler: str, a: argparse.Namespace,
               batch_size: int):
    """(seconds, output) of one call drawing all of `labels` at --steps / --guidance-scale, seed 0: the call every
    timing of this script makes."""
    t = time.perf_counter()
    out = pipe(class_labels=labels.tolist(), num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
               sampler=sampler, output_type="tensor", generator=torch.Generator().manual_seed(0), batch_size=batch_size)
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="a class-conditional pipeline folder (OUT/pipeline)")
    p.add_argument("legacy_threads", nargs="?", type=int, default=None, help=argparse.SUPPRESS)  # old: a 2nd positional
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default=None, help="default: the objective's first (ddim for DDPM, euler for flow)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--compile", action="store_true", help="sample through pipe.compile() (device.CompiledForSampling)")
    p.add_argument("--inductor-patterns", action="store_true",
                   help="with --compile: keep inductor's pattern passes (they swap our attention for the fused kernel), "
                        "as pipe.compile() did before 2026-12-08")
    p.add_argument("--no-pad-batches", action="store_true",
                   help="with --compile: compile the last partial batch's shape too (pipe.compile(pad_batches=False)), "
                        "as before 2026-12-08, instead of padding it up to the compiled batch")
    p.add_argument("--repeat", type=int, default=1, help="timed calls in this process (each one printed, then the median)")
    p.add_argument("--previous-attention", action="store_true",
                   help="without autograd, the fused kernel from 1,024 query x key pairs on, as before 2026-12-07 "
                        "(layers.NO_GRAD_BF16_SOFTMAX_MAX_PAIRS = 0: no plain path with the softmax in bf16)")
    p.add_argument("--compare-attention-rules", type=int, default=0, metavar="K",
                   help="in this one process, K alternating pairs of timed calls: the previous rule, then today's")
    p.add_argument("--compare-batch-sizes", type=int, nargs="+", default=None, metavar="B",
                   help="in this one process, --repeat rounds of one timed call per batch size, alternating, so all "
                        "see the same machine state (each size compiled in its own warm-up with --compile)")
    p.add_argument("--fused-attention", action="store_true",
                   help="PyTorch's fused attention kernel under CPU bf16 too (layers.CPU_BF16_PLAIN_ATTENTION = False)")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error(f"--repeat must be at least 1, got {a.repeat}")
    if a.compare_batch_sizes and min(a.compare_batch_sizes) < 1:
        p.error(f"--compare-batch-sizes must all be at least 1, got {a.compare_batch_sizes}")
    if a.compare_batch_sizes:
        a.batch_size = a.compare_batch_sizes[0]  # the warm-up below then compiles a shape the comparison uses
    torch.set_num_threads(a.legacy_threads or a.threads)
    if a.fused_attention:
        layers.CPU_BF16_PLAIN_ATTENTION = False
    if a.previous_attention:
        layers.NO_GRAD_BF16_SOFTMAX_MAX_PAIRS = 0
    pipe = LatentDiffusionPipeline.from_pretrained(a.pipeline)
    sampler = a.sampler or pipe.objective.sampler_names[0]
    labels = torch.arange(10).repeat_interleave((a.images + 9) // 10)[:a.images]
    warm = labels[:min(a.batch_size, a.images)] if a.compile else labels[:20]  # compile the timed call's shape
    start = time.perf_counter()
    if a.compile:
        pipe.compile(inductor_patterns=a.inductor_patterns, pad_batches=not a.no_pad_batches)
    pipe(class_labels=warm.tolist(), num_inference_steps=5, guidance_scale=a.guidance_scale, sampler=sampler,
         output_type="tensor", batch_size=a.batch_size)  # warm-up
    if a.compile:
        print(f"warm-up with compiling: {time.perf_counter() - start:.1f} s (compiled shapes, s: "
              f"{[round(s, 1) for s in pipe.compiled.compile_seconds]}; fallback: {pipe.compiled.fallback})")
    if a.compare_attention_rules:
        compare_attention_rules(pipe, labels, sampler, a)
        return
    if a.compare_batch_sizes:
        compare_batch_sizes(pipe, labels, sampler, a)
        return
    times = []
    for _ in range(a.repeat):
        dt, out = timed_call(pipe, labels, sampler, a, a.batch_size)
        times.append(dt)
        if a.repeat > 1:
            print(f"timed call {len(times)}: {dt:.1f} s", flush=True)
    dt = statistics.median_high(times)
    if a.compile:
        print(f"compiled shapes after the timed calls: {len(pipe.compiled.compile_seconds)} (s each: "
              f"{[round(s, 1) for s in pipe.compiled.compile_seconds]})")
    print(f"{a.pipeline}: {a.images} images x {a.steps} {sampler} steps ({pipe.objective.name}, guidance "
          f"{a.guidance_scale:g}, decode included{', compiled' if a.compile else ''}"
          f"{', inductor patterns kept' if a.inductor_patterns else ''}"
          f"{', partial batches compiled' if a.compile and a.no_pad_batches else ''}"
          f"{', fused attention' if a.fused_attention else ''}"
          f"{', previous attention rule' if a.previous_attention else ''}, batches of {a.batch_size}): {dt:.1f} s{' (median of ' + str(a.repeat) + ')' if a.repeat > 1 else ''} on "
          f"{torch.get_num_threads()} threads; "
          f"images {tuple(out.images.shape)}")


def machine_gflops() -> float:
    """bf16 GFLOP/s of a 1,024 x 1,024 matmul now (bench_profile.matmul_peak_gflops): printed before and after the
    timed calls, so a run on a host that slowed down (a shared VM drifts by up to ~15%) shows it."""
    return matmul_peak_gflops(1024, "bf16", torch.device("cpu"), warmup=3, reps=20)


def compare_batch_sizes(pipe: LatentDiffusionPipeline, labels: torch.Tensor, sampler: str,
                        a: argparse.Namespace) -> dict[int, list[float]]:
    """All of `labels` at each of --compare-batch-sizes, one timed call per size per round, --repeat rounds, the
    sizes alternating in this one process (a drifting machine then slows every size alike); with --compile each size
    first compiles in a warm-up call of its own shape. Prints one line per call and the medians; returns the times."""
    sizes = a.compare_batch_sizes
    if a.compile:  # the guided batch 2B (and the last partial batch) compile here, not in a timed call
        for b in sizes:
            for n in sorted({min(b, len(labels)), len(labels) % b} - {0}, reverse=True):  # full batch first
                pipe(class_labels=labels[:n].tolist(), num_inference_steps=2, guidance_scale=a.guidance_scale,
                     sampler=sampler, output_type="tensor", batch_size=b)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    before = machine_gflops()
    for r in range(a.repeat):
        for b in sizes:
            times[b].append(timed_call(pipe, labels, sampler, a, b)[0])
            print(f"round {r + 1}, batches of {b}: {times[b][-1]:.1f} s", flush=True)
    medians = {b: statistics.median_high(v) for b, v in times.items()}
    print(f"{a.pipeline}: {len(labels)} images x {a.steps} {sampler} steps, guidance {a.guidance_scale:g}, decode "
          f"included{', compiled' if a.compile else ''}, {torch.get_num_threads()} threads; median of {a.repeat}: "
          + ", ".join(f"batches of {b} {m:.1f} s" for b, m in medians.items())
          + f"; bf16 matmul {before:.0f} GFLOP/s before, {machine_gflops():.0f} after")
    return times


def compare_attention_rules(pipe: LatentDiffusionPipeline, labels: torch.Tensor, sampler: str,
                            a: argparse.Namespace) -> None:
    """Alternate the previous no-grad attention rule (fused kernel from 1,024 pairs) and today's (plain with the
    softmax in bf16 up to 64 x 64 pairs) in one process, so both see the same machine state; one line per call."""
    today, times = layers.NO_GRAD_BF16_SOFTMAX_MAX_PAIRS, {"previous": [], "today": []}
    for _ in range(a.compare_attention_rules):
        for rule, max_pairs in (("previous", 0), ("today", today)):
            layers.NO_GRAD_BF16_SOFTMAX_MAX_PAIRS = max_pairs
            times[rule].append(timed_call(pipe, labels, sampler, a, a.batch_size)[0])
            print(f"{rule} rule: {times[rule][-1]:.1f} s", flush=True)
    layers.NO_GRAD_BF16_SOFTMAX_MAX_PAIRS = today
    prev, now = (statistics.median_high(times[k]) for k in ("previous", "today"))
    print(f"{a.pipeline}: {len(labels)} images x {a.steps} {sampler} steps, batches of {a.batch_size}, "
          f"{torch.get_num_threads()} threads; median previous rule {prev:.1f} s, today's {now:.1f} s "
          f"({prev / now:.2f}x)")


if __name__ == "__main__":
    main()
