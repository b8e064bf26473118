"""The command line's pieces, one concept per file; `python -m ldm_scratch` (__main__.py) assembles them.

  flags.py   config dataclass fields <-> --flags, and the datasets a command can train on
  stage1.py  train-autoencoder and demo-autoencoders (stage 1: the KL autoencoder, Rombach et al. 2022, Sec. 3)
  stage2.py  train-diffusion and sample (the denoiser, Ho et al. 2020), pixel space
  stage3.py  their latent halves: --space latent training, sampling a pipeline folder (Rombach et al. 2022)
  demo.py    demo: the end-to-end main job (both stages, text-to-image, report)

Each stage file ends with its own COMMANDS table, name -> Command; adding a command is one entry
there (plus its two functions), and __main__.py picks it up.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

# (add_arguments(parser), run(args), one-line help)
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any], str]
