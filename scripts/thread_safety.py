"""How many torch threads should a training process use when other processes load the cores? (issue #14)

    python scripts/thread_safety.py                      # the latent DiT and U-Net, 1 and 2 threads, idle and loaded
    python scripts/thread_safety.py --steps 40 --models dit

Each cell is a fresh process that times `--steps` training steps (forward and loss under bf16 autocast, backward,
fused AdamW) of a class-conditional latent denoiser on random 4 x 8 x 8 latents, batch 64, after 5 untimed steps.
"loaded" starts a competing process first that keeps one core busy with single-threaded matmuls (as another
training run with OMP_NUM_THREADS=1 would) and stops it after the cell. The table gives steps per second and
the ratio to the same model's idle 1-thread rate, for the thread counts and OMP wait policies asked.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import sys, time, torch, dataclasses
from ldm_scratch.config import DIT_PRESETS, UNET_PRESETS, TrainConfig, get_preset
from ldm_scratch.device import autocast
from ldm_scratch.diffusion import GaussianDiffusion
from ldm_scratch.config import DiffusionConfig
from ldm_scratch.dit import DiT
from ldm_scratch.unet import UNet
from ldm_scratch.train import make_adamw
torch.set_num_threads({threads})
torch.manual_seed(0)
if {model!r} == "dit":
    cfg = dataclasses.replace(get_preset(DIT_PRESETS, "dit-small-latent"), in_channels=4, sample_size=8, num_classes=10,
                              context_dim=0, learn_sigma=False)
    net = DiT(cfg)
else:
    cfg = dataclasses.replace(get_preset(UNET_PRESETS, "text-latent"), in_channels=4, out_channels=4, sample_size=8,
                              num_classes=10, context_dim=0)
    net = UNet(cfg)
opt = make_adamw(net.parameters(), TrainConfig(lr=1e-4))
diff = GaussianDiffusion(DiffusionConfig())
z = torch.randn(64, 4, 8, 8)
y = torch.randint(0, 10, (64,))
def step():
    with autocast(torch.device("cpu"), "bf16"):
        loss = diff.loss(net, z, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(5):
    step()
t = time.perf_counter()
for _ in range({steps}):
    step()
print((time.perf_counter() - t) / {steps})
"""

LOAD = r"""
import torch, time
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a * 1e-3)
"""


def run_cell(model: str, threads: int, steps: int, wait_policy: str | None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    code = WORKER.format(root=str(ROOT), threads=threads, model=model, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit", "unet"], choices=["dit", "unet"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--wait-policies", nargs="+", default=["default", "PASSIVE"])
    a = p.parse_args()
    load1 = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average at start {load1:.2f}; {a.steps} timed steps per cell, batch 64, bf16")
    rows = []
    for loaded in (False, True):
        competitor = None
        if loaded:
            competitor = subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ, "OMP_NUM_THREADS": "1"})
            time.sleep(2)
        try:
            for model in a.models:
                for threads in a.threads:
                    for policy in a.wait_policies:
                        if threads == 1 and policy != "default":
                            continue  # one thread never waits for another
                        s = run_cell(model, threads, a.steps, None if policy == "default" else policy)
                        rows.append((model, "loaded" if loaded else "idle", threads, policy, s))
                        print(f"  {model:5s} {'loaded' if loaded else 'idle':7s} threads {threads} wait {policy:8s} "
                              f"{1000 * s:7.1f} ms/step", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
    print("\n| model | machine | threads | OMP_WAIT_POLICY | ms / step | steps / s | vs idle, 1 thread |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, state, threads, policy, s in rows:
        base = next(r[4] for r in rows if r[0] == model and r[1] == "idle" and r[2] == 1)
        print(f"| {model} | {state} | {threads} | {policy} | {1000 * s:.1f} | {1 / s:.1f} | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
