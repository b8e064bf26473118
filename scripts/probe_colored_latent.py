"""Is the background texture in colored-f4's latent, or only lost by its decoder? A linear probe says which.

Issue #12: the reconstructions of the shipped `colored-f4` read gravel as grass (docs/stage1_weights_trials.md). If a
linear classifier on the 4 x 8 x 8 posterior means tells the four backgrounds apart on held-out images, the encoder
keeps the information and only the decoder fails to draw it: a decoder-only fine-tune (`train-autoencoder
--init-from colored-f4 --decoder-only`, which leaves the latent space and every denoiser trained in it valid) is then
the lever, not a new latent space.

    python scripts/probe_colored_latent.py            # ~2 minutes on one CPU thread

Multinomial logistic regression (L-BFGS, L2 1e-3) on the standardised, flattened means of the 4,500 train images;
prints held-out accuracy and the confusion matrix (rows: caption, columns: predicted).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm_scratch.data import BACKGROUNDS, ColoredDigits
from ldm_scratch.pretrained import load_autoencoder


@torch.no_grad()
def latents(ae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([ae.encode(x).mode() for x in images.split(500)]).flatten(1)   # (N, 4 * 8 * 8)


def main() -> None:
    torch.manual_seed(0)
    ae = load_autoencoder("colored-f4")
    train, test = ColoredDigits("train"), ColoredDigits("test")
    z_train, z_test = latents(ae, train.images), latents(ae, test.images)
    mean, std = z_train.mean(0), z_train.std(0) + 1e-6
    z_train, z_test = (z_train - mean) / std, (z_test - mean) / std
    W = torch.zeros(z_train.shape[1], len(BACKGROUNDS), requires_grad=True)
    b = torch.zeros(len(BACKGROUNDS), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z_train @ W + b, train.background_idx) + 1e-3 * W.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (z_test @ W + b).argmax(1)
    truth = test.background_idx
    print(f"linear probe on colored-f4 latents, {len(test)} held-out images: background accuracy "
          f"{(pred == truth).float().mean():.3f}")
    print(f"{'caption / predicted':>20}" + "".join(f"{n:>8}" for n in BACKGROUNDS))
    for i, name in enumerate(BACKGROUNDS):
        print(f"{name:>20}" + "".join(f"{int(((pred == j) & (truth == i)).sum()):>8}" for j in range(len(BACKGROUNDS))))


if __name__ == "__main__":
    main()
