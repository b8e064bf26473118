"""1,000 class-conditional images, 50 DDIM steps, guidance 3, decode included, through a saved pipeline:
`python scripts/sample_throughput.py runs/latent_unet/pipeline [threads]` (the README's stage-3 throughput)."""
import sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_scratch.pipeline import LatentDiffusionPipeline
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
pipe = LatentDiffusionPipeline.from_pretrained(sys.argv[1])
labels = torch.arange(10).repeat_interleave(100)
pipe(class_labels=labels[:20].tolist(), num_inference_steps=5, guidance_scale=3.0, output_type="tensor")  # warm-up
t = time.perf_counter()
out = pipe(class_labels=labels.tolist(), num_inference_steps=50, guidance_scale=3.0, output_type="tensor",
           generator=torch.Generator().manual_seed(0), batch_size=500)
dt = time.perf_counter() - t
print(f"{sys.argv[1]}: 1000 images x 50 DDIM steps (CFG, decode included): {dt:.1f} s on {torch.get_num_threads()} threads; images {tuple(out.images.shape)}")
