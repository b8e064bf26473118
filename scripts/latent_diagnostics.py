"""Two diagnostics of a codec's latent space (docs/stage1_weights_trials.md, issue #12).

1. Fine detail: the share of the scaled latents' energy above half the latent grid's highest spatial frequency,
   beside the same share for the images area-downsampled to that grid (the frequencies an 8 x 8 picture of the
   digit has). A denoiser builds a sample coarse to fine; Skorokhodov et al. 2025 blame excess fine-scale energy
   in the latent for poor "diffusability" (they measure it with a DCT).
2. The decoder's tolerance: held-out digits' scaled latents plus Gaussian noise of std sigma, decoded and scored
   by the classifier (a denoiser's samples sit a little off the encoder's latents).

    python scripts/latent_diagnostics.py ldm_scratch/weights/ae_mnist_f4 runs/trial_res/mnist-f4/model ...
"""
import sys

import torch
import torch.nn.functional as F

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.data import MNIST5k
from ldm_scratch.latents import encode_images


def high_share(x: torch.Tensor) -> float:
    """Share of the (per-channel, mean-removed) energy at radial frequency above half the Nyquist limit."""
    x = x - x.mean(dim=(0, 2, 3), keepdim=True)   # remove the per-channel mean, not the spatial structure
    power = torch.fft.fft2(x.double()).abs().square().sum(dim=(0, 1))  # (h, w)
    h, w = power.shape
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.fftfreq(w).abs()[None, :]
    radius = torch.sqrt(fy ** 2 + fx ** 2)          # cycles per sample; Nyquist = 0.5
    return (power[radius > 0.25].sum() / power.sum()).item()


images = MNIST5k("train").images                   # (4500, 1, 32, 32)
for folder in sys.argv[1:]:
    ae = AutoencoderKL.from_pretrained(folder).eval()
    z = encode_images(ae, images, precision="fp32", progress=False)   # (N, c, 8, 8), shifted and scaled
    img = F.avg_pool2d(images, ae.cfg.f)                               # the image on the latent's grid
    print(f"{folder}: latent {tuple(z.shape[1:])}, high-frequency share {high_share(z):.3f} "
          f"(the image at {z.shape[-1]} x {z.shape[-1]}: {high_share(img):.3f}); neighbour correlation "
          f"{torch.corrcoef(torch.stack([z[..., :-1].flatten(), z[..., 1:].flatten()]))[0, 1]:.3f}")

# The decoder's side: how gracefully does it render latents a little off the encoder's (a denoiser's samples
# are)? Held-out digits, scaled latents plus Gaussian noise of std sigma, decoded, scored by the classifier.
from ldm_scratch.evaluation import reference_digits, score_digits   # noqa: E402
test = MNIST5k("test", pad_to=32)
x_test, y_test = test.images[:500], test.labels[:500]
g = torch.Generator().manual_seed(0)
for folder in sys.argv[1:]:
    ae = AutoencoderKL.from_pretrained(folder).eval()
    z = encode_images(ae, x_test, precision="fp32", progress=False)
    noise = torch.randn(z.shape, generator=g)
    cells = []
    for sigma in (0.0, 0.2, 0.5):
        with torch.no_grad():
            x = ae.decode(ae.unscale_latents(z + sigma * noise)).clamp(-1, 1)
        s = score_digits(x, y_test)
        cells.append(f"sigma {sigma:g}: acc {s['cond_acc']:.3f} FID {s['fid']:.1f}")
    print(f"{folder}: " + "; ".join(cells))
