"""Minor page faults and time per denoiser call, with glibc's malloc as it comes and as `import ldm_scratch` tunes
it (device.tune_malloc: fixed mmap and trim thresholds, so freed activations are reused, not handed back):

    python scripts/page_faults.py runs/tp_unet/pipeline --threads 2             # compiled guided forward, 2 x 250 rows
    python scripts/page_faults.py runs/tp_unet/pipeline --eager --rounds 2      # eager, two alternating rounds

Each cell is a fresh process (LDM_MALLOC_TUNING=0, then 1; malloc's state is per process): the pipeline's
denoiser on one guided batch [cond; null] of 2 x --batch-size rows, 500 steps in, bf16 autocast, through
device.CompiledForSampling as `pipe.compile()` runs it unless --eager; after one warm-up call, --calls calls per
block, three blocks, each block's ms per call and minor page faults per call (getrusage's ru_minflt).
"""
import argparse
import json
import os
import subprocess
import sys


def one_cell(pipeline: str, batch_size: int, eager: bool, calls: int) -> dict:
    """Runs in the child process."""
    import resource
    import time

    import torch

    from ldm_scratch import device
    from ldm_scratch.device import CompiledForSampling
    from ldm_scratch.bench_profile import guided_forward_inputs
    from ldm_scratch.pipeline import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_pretrained(pipeline)
    den = pipe.denoiser.eval()
    model = den if eager else CompiledForSampling(den, pipe.kind == "unet", verbose=False)
    x, t, y = guided_forward_inputs(den.cfg, batch_size)  # the guided batch [cond; null], 2 x batch_size rows
    blocks = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)  # compiles (or warms up)
        for _ in range(3):
            faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(calls):
                model(x, t, y)
            blocks.append({"ms": 1000 * (time.perf_counter() - start) / calls,
                           "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls})
    return {"tuned": device.malloc_tuned, "blocks": blocks}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline", help="a class-conditional pipeline folder (OUT/pipeline)")
    p.add_argument("--batch-size", type=int, default=250, help="images per call: the guided batch is twice this")
    p.add_argument("--eager", action="store_true", help="the plain denoiser instead of pipe.compile()'s")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="alternating pairs of cells (untuned, tuned)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)  # the child's job
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.calls < 1 or a.rounds < 1:
        p.error("--batch-size, --calls and --rounds must be at least 1")
    if a.cell:
        import torch
        torch.set_num_threads(a.threads)
        print(json.dumps(one_cell(a.pipeline, a.batch_size, a.eager, a.calls)))
        return
    what = "eager" if a.eager else "compiled"
    print(f"{a.pipeline}: {what} guided forward of {2 * a.batch_size} rows, {a.threads} thread(s), {a.calls} calls "
          "per block, three blocks per cell")
    print("| round | malloc | ms per call | minor page faults per call |")
    print("| --- | --- | --- | --- |")
    for r in range(a.rounds):
        for flag in ("0", "1"):
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "LDM_MALLOC_TUNING": flag}
            cmd = [sys.executable, __file__, a.pipeline, "--batch-size", str(a.batch_size), "--calls", str(a.calls),
                   "--threads", str(a.threads), "--cell", *(["--eager"] if a.eager else [])]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            cell = json.loads(out.strip().splitlines()[-1])
            label = "tuned (tune_malloc)" if cell["tuned"] else "as it comes"
            ms = " / ".join(f"{b['ms']:.1f}" for b in cell["blocks"])
            faults = " / ".join(f"{b['faults']:.0f}" for b in cell["blocks"])
            print(f"| {r + 1} | {label} | {ms} | {faults} |", flush=True)


if __name__ == "__main__":
    main()
