"""A real stage-2 training run for tests/test_faults.py to kill and resume: a tiny class-conditional pixel
DDPM (DiffusionTask, 1 x 8 x 8 images, 3 classes) through the Trainer, as `train-diffusion` runs it.

    python tests/fault_run.py OUT STEPS CKPT_EVERY [--resume] [--hold STEP SECONDS]

Each step appends "STEP" to OUT/progress.txt as it starts, so the test sees how far a run got and how much
work each attempt redid. --hold sleeps inside STEP (after logging it), so a signal lands mid-step for sure.
Ctrl-C ends the run as the command line does: the one-line message on stderr, exit status 130.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_scratch.config import DiffusionConfig, UNetConfig  # noqa: E402
from ldm_scratch.stage2 import DiffusionTask, diffusion_train_config  # noqa: E402
from ldm_scratch.train import Trainer, TrainingInterrupted  # noqa: E402

EXIT_INTERRUPTED = 130  # 128 + SIGINT(2): what a shell reports for a Ctrl-C'd program


class LoggedTask(DiffusionTask):
    """DiffusionTask that records each step it starts, and can stall inside one."""

    progress: Path
    hold: tuple[int, float] | None = None

    def loss(self, name, batch, step):
        with open(self.progress, "a") as fh:
            fh.write(f"{step}\n")
        if self.hold is not None and step == self.hold[0]:
            time.sleep(self.hold[1])
        return super().loss(name, batch, step)


def build(out: str | Path, steps: int, ckpt_every: int) -> tuple[LoggedTask, Trainer]:
    """The same task, data and initial weights in every process (CPU, one thread, fp32: bit-reproducible)."""
    torch.set_num_threads(1)
    unet_cfg = UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2,
                          norm_groups=4, num_classes=3, sample_size=8)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(24, 1, 8, 8, generator=g) * 2 - 1,
                                          torch.randint(0, 3, (24,), generator=g))
    torch.manual_seed(0)  # the initial weights
    task = LoggedTask(unet_cfg, DiffusionConfig(), precision="fp32", sample_steps=2)
    task.progress = Path(out) / "progress.txt"
    cfg = diffusion_train_config(steps=steps, batch_size=4, lr=1e-3, precision="fp32", ema_decay=0.9,
                                 sample_every=0, ckpt_every=ckpt_every)
    return task, Trainer(task, cfg, data, out, device="cpu")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if launched ignoring it
    out, steps, ckpt_every = argv[0], int(argv[1]), int(argv[2])
    Path(out).mkdir(parents=True, exist_ok=True)
    task, trainer = build(out, steps, ckpt_every)
    if "--hold" in argv:
        i = argv.index("--hold")
        task.hold = (int(argv[i + 1]), float(argv[i + 2]))
    try:
        trainer.fit(resume="--resume" in argv)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return EXIT_INTERRUPTED
    task.finish(out, trainer.ema, step=trainer.step, grid=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
