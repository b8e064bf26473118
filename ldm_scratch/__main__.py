"""The command line: `python -m ldm_scratch <command> ...`.

Every flag of a training command is a config field (config.py), generated from the dataclass so
the two cannot drift: `--kl-weight` is LossConfig.kl_weight, `--batch-size` TrainConfig.batch_size.
An unknown flag or value is an error that lists the valid ones (argparse's choices do it).

Commands live in COMMANDS (name -> (add_arguments, run, help)); each one there works end to end.
They are written in ldm_scratch/cli/, one file per stage, each with its own COMMANDS table:
  train-autoencoder  stage 1 on MNIST-5k or photo crops -> OUT/model/ (config.json + model.pt)
  demo               the stage-1 showcase: three autoencoders (MNIST f=4, photos f=8 and f=4), held-out metrics, report.md/json
  train-diffusion    stage 2 in pixel space: a class-conditional DDPM on MNIST-5k -> OUT/model/
  sample             a PNG grid from a saved diffusion model (DDIM or DDPM, classifier-free guidance)
"""
from __future__ import annotations

import argparse
import sys

from ldm_scratch.cli import Command, stage1, stage2
# Re-exported: tests and benchmarks import these from here.
from ldm_scratch.cli.flags import add_config_flags, apply_flags  # noqa: F401
from ldm_scratch.cli.stage1 import machine_info  # noqa: F401

# Every stage's table, in the order `--help` lists them.
COMMANDS: dict[str, Command] = {**stage1.COMMANDS, **stage2.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm_scratch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
