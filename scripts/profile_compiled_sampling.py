"""Where a compiled guided sampling forward spends its time, with and without inductor's pattern passes.

    python scripts/profile_compiled_sampling.py runs/tp_unet/pipeline --threads 2      # an idle machine

The pipeline's denoiser through device.CompiledForSampling (as `pipe.compile()` runs it: weights frozen,
channels_last for a U-Net, bf16 autocast) on one guided batch [cond; null] of 2 x --batch-size, 500 steps in. For
each setting, in a fresh process (dynamo keeps one compiled graph per model): the median forward time over 20 calls,
and torch.profiler's ops by self time over 5 calls. With the passes on, inductor rewrites layers.attention into
PyTorch's fused attention kernel (`aten::_scaled_dot_product_flash_attention_for_cpu` in the table).
"""
import argparse
import os
import subprocess
import sys


def profile_one(pipeline: str, batch_size: int, patterns: bool, rows: int) -> None:
    """Runs in the child process."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ldm_scratch.bench_timing import median_ms
    from ldm_scratch.device import CompiledForSampling
    from ldm_scratch.bench_profile import guided_forward_inputs
    from ldm_scratch.pipeline import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_pretrained(pipeline)
    den = pipe.denoiser.eval()
    compiled = CompiledForSampling(den, pipe.kind == "unet", verbose=False, inductor_patterns=patterns)
    x, t, y = guided_forward_inputs(den.cfg, batch_size)  # the guided batch [cond; null], 2 x batch_size rows
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x, t, y)  # compiles
        ms = median_ms(lambda: compiled(x, t, y), warmup=2, reps=20, device=torch.device("cpu"))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                compiled(x, t, y)
    print(f"\n## inductor pattern passes {'on' if patterns else 'off'}: {ms:.1f} ms per guided forward of {2 * batch_size} "
          f"(compiling took {compiled.compile_seconds[0]:.1f} s)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline", help="a class-conditional pipeline folder (OUT/pipeline)")
    p.add_argument("--batch-size", type=int, default=125, help="images per call: the guided batch is twice this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch
        torch.set_num_threads(a.threads)
        profile_one(a.pipeline, a.batch_size, a.child == "on", a.rows)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    for setting in ("on", "off"):
        subprocess.run([sys.executable, __file__, a.pipeline, "--batch-size", str(a.batch_size), "--threads",
                        str(a.threads), "--rows", str(a.rows), "--child", setting], env=env, check=True)


if __name__ == "__main__":
    main()
