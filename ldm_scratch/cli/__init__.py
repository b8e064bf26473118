"""The command line's pieces, one concept per file; `python -m ldm_scratch` (__main__.py) assembles them.

  flags.py   config dataclass fields <-> --flags, and the datasets a command can train on
  stage1.py  train-autoencoder and demo (stage 1: the KL autoencoder, Rombach et al. 2022, Sec. 3)
  stage2.py  train-diffusion and sample (stage 2: the denoiser, Ho et al. 2020)

Each stage file ends with its own COMMANDS table, name -> Command; adding a command is one entry
there (plus its two functions), and __main__.py picks it up.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

# (add_arguments(parser), run(args), one-line help)
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any], str]
