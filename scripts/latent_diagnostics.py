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
from ldm_scratch.evaluation import score_digits
from ldm_scratch.latents import encode_images

SIGMAS = (0.0, 0.2, 0.5)


def high_share(x: torch.Tensor) -> float:
    """Share of the (per-channel, mean-removed) energy at radial frequency above half the Nyquist limit."""
    x = x - x.mean(dim=(0, 2, 3), keepdim=True)   # remove the per-channel mean, not the spatial structure
    power = torch.fft.fft2(x.double()).abs().square().sum(dim=(0, 1))  # (h, w)
    h, w = power.shape
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.fftfreq(w).abs()[None, :]
    radius = torch.sqrt(fy ** 2 + fx ** 2)          # cycles per sample; Nyquist = 0.5
    return (power[radius > 0.25].sum() / power.sum()).item()


def fine_detail(ae: AutoencoderKL, images: torch.Tensor) -> str:
    """Diagnostic 1 on the training images."""
    z = encode_images(ae, images, precision="fp32", progress=False)   # (N, c, 8, 8), shifted and scaled
    img = F.avg_pool2d(images, ae.cfg.f)                               # the image on the latent's grid
    neighbours = torch.corrcoef(torch.stack([z[..., :-1].flatten(), z[..., 1:].flatten()]))[0, 1]
    return (f"latent {tuple(z.shape[1:])}, high-frequency share {high_share(z):.3f} (the image at "
            f"{z.shape[-1]} x {z.shape[-1]}: {high_share(img):.3f}); neighbour correlation {neighbours:.3f}")


@torch.no_grad()
def tolerance(ae: AutoencoderKL, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> str:
    """Diagnostic 2 on held-out digits: decode (scaled latents + sigma * noise), score with the classifier."""
    z = encode_images(ae, x, precision="fp32", progress=False)
    noise = torch.randn(z.shape, generator=generator)
    cells = []
    for sigma in SIGMAS:
        s = score_digits(ae.decode(ae.unscale_latents(z + sigma * noise)).clamp(-1, 1), y)
        cells.append(f"sigma {sigma:g}: acc {s['cond_acc']:.3f} FID {s['fid']:.1f}")
    return "; ".join(cells)


def main() -> None:
    train = MNIST5k("train").images                # (4500, 1, 32, 32)
    test = MNIST5k("test", pad_to=32)
    x_test, y_test = test.images[:500], test.labels[:500]
    g = torch.Generator().manual_seed(0)           # one noise stream, drawn folder by folder
    for folder in sys.argv[1:]:
        ae = AutoencoderKL.from_pretrained(folder).eval()
        print(f"{folder}: {fine_detail(ae, train)}")
        print(f"{folder}: {tolerance(ae, x_test, y_test, g)}", flush=True)


if __name__ == "__main__":
    main()
