"""Score a trained model at several guidance scales (the README's pixel and latent tables).

    python scripts/eval_guidance.py runs/ddpm_mnist/model 1.0 1.5 2.0 3.0     # a pixel model folder
    python scripts/eval_guidance.py runs/latent_unet/pipeline 1.5 2.0 3.0      # a latent pipeline folder

50 samples per digit (500), 30 DDIM steps, conditional accuracy and classifier-FID beside the
real-vs-real FID at the same n; prints one line per w and writes guidance_sweep.json beside the model.
"""
import json
import sys
import time
from pathlib import Path

import torch

from ldm_scratch.evaluation import evaluate_pipeline
from ldm_scratch.pipeline import LatentDiffusionPipeline
from ldm_scratch.stage2 import evaluate, load_diffusion_model

folder, scales = Path(sys.argv[1]), [float(w) for w in sys.argv[2:]] or [3.0]
is_pipeline = (folder / "model_index.json").is_file()
model = LatentDiffusionPipeline.from_pretrained(folder) if is_pipeline else load_diffusion_model(folder)
out = {}
for w in scales:
    start = time.time()
    if is_pipeline:
        r = evaluate_pipeline(model, 50, 30, w)
    else:
        unet, diffusion, _ = model
        r = evaluate(unet, diffusion, n_per_class=50, num_steps=30, guidance_scale=w,
                     generator=torch.Generator().manual_seed(0))
    r["eval_s"] = time.time() - start
    out[w] = r
    print(w, r, flush=True)
(folder.parent / "guidance_sweep.json").write_text(json.dumps(out, indent=1))
