"""The command line: `python -m ldm_scratch <command> ...`.

Every flag of a training command is a config field (config.py), generated from the dataclass so
the two cannot drift: `--kl-weight` is LossConfig.kl_weight, `--batch-size` TrainConfig.batch_size.
An unknown flag or value is an error that lists the valid ones (argparse's choices do it).

Commands live in COMMANDS (name -> (add_arguments, run, help)); each one there works end to end.
They are written in ldm_scratch/cli/, one file per stage, each with its own COMMANDS table:
  train-autoencoder  stage 1 on MNIST-5k, coloured digits or photo crops -> OUT/model/ (config.json + model.pt)
  demo-autoencoders  the stage-1 showcase: three autoencoders (MNIST f=4, photos f=8 and f=4), held-out metrics
  train-diffusion    a denoiser: pixel DDPM -> OUT/model/, or --space latent (U-Net or DiT on an autoencoder's
                     latents; class, text or no conditioning) -> OUT/pipeline/
  sample             a PNG grid from a pipeline (prompts, class labels) or a pixel model (DDIM or DDPM, CFG)
  edit               a real image through a pipeline's latent: img2img (SDEdit), inversion, inpainting (cli/edit.py)
  demo               the main job: both stages on captioned coloured digits, text-to-image, report.md/json
  bench              speed: ours vs diffusers, fp32/bf16/channels_last levers, CFG sampling, latent vs pixel
  course             the course kit: `course build` writes notebooks/student/, `course check NB` grades one
"""
from __future__ import annotations

import argparse
import sys

from ldm_scratch import bench
from ldm_scratch.cli import Command, course, demo, edit, stage1, stage2
# Re-exported: tests and benchmarks import these from here.
from ldm_scratch.cli.flags import add_config_flags, apply_flags  # noqa: F401
from ldm_scratch.cli.stage1 import machine_info  # noqa: F401
from ldm_scratch.train import NonFiniteLossError, TrainingInterrupted

# Every stage's table, in the order `--help` lists them.
COMMANDS: dict[str, Command] = {**stage1.COMMANDS, **stage2.COMMANDS, **edit.COMMANDS, **demo.COMMANDS,
                                "bench": (bench.add_arguments, bench.run, "benchmark tables (bench.md/json): "
                                          "ours vs diffusers, speed levers, sampling, latent vs pixel"),
                                **course.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm_scratch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None, threads: bool | None = None) -> int:
    """Run one command. threads: pick the torch thread count for a shared machine first
    (device.set_safe_num_threads); default on when run as a program (`python -m ldm_scratch`, `ldm-scratch`),
    off when called with an argv (tests, other Python code keep their own setting)."""
    args = build_parser().parse_args(argv)
    if threads if threads is not None else argv is None:
        from ldm_scratch.device import set_safe_num_threads
        set_safe_num_threads()
    try:
        COMMANDS[args.command][1](args)
    except TrainingInterrupted as e:  # Ctrl-C: the step finished and was checkpointed; the message says how to resume
        print(e, file=sys.stderr)
        return 130
    except NonFiniteLossError as e:  # NaN/inf: the message has the step, the loss terms and what to try
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
