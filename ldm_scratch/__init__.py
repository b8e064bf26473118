"""ldm_scratch: latent diffusion built from scratch, small enough to train on a laptop CPU.

The pipeline has three rooms, one file each:
  compress           autoencoder.py  images (B, C, H, W) in [-1, 1] -> latents (B, c, H/f, W/f)
  dream in the small diffusion.py + unet.py (or dit.py): denoise scaled latents under a DDPM
  render once        autoencoder.py  decode the final latent back to an image, once

Glossary (paper symbols, used the same way in every file):
  beta_t       noise variance added at step t (Ho et al. 2020): linear 1e-4 .. 0.02 over T = 1000
  alpha_t      1 - beta_t
  alpha_bar_t  prod_{s<=t} alpha_s: how much of x0 survives at step t
  x0 / z0      a clean image / a clean (scaled) latent
  xt / zt      its noised version at step t: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
  eps          the Gaussian noise drawn for q_sample; eps_pred the denoiser's estimate of it
  t            integer timestep in [0, T)
  f            the autoencoder's spatial downsampling factor; c its latent channels
  scale_factor 1 / std of the training latents (SD's 0.18215), measured and saved with the model
Shape letters: B batch, C channels, H W spatial, N tokens, D width, P patch size, f downsampling.
"""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("LDM_MALLOC_TUNING", "1") != "0":  # glibc keeps freed memory for the next step (device.tune_malloc)
    from ldm_scratch.device import tune_malloc as _tune_malloc
    _tune_malloc()
