"""Train the default perceptual net (ldm_scratch/perceptual.py, "default") offline and reproducibly,
and write ldm_scratch/weights/perceptual_default.pt.

    python scripts/train_perceptual.py                 # ~4 min on one idle laptop core (1000 x ~0.25 s)
    python scripts/train_perceptual.py --out /tmp/p.pt --threads 2

Recipe (why these two tasks): LPIPS (Zhang et al. 2018, Sec. 4.1) shows that the features of nets
trained on quite different tasks -- supervised classification AND self-supervised ones (puzzles,
colourisation, BiGAN) -- all become good perceptual metrics once unit-normalised. We have no
ImageNet, so we train one SmallFeatures trunk on two tasks at once, with one linear head each:
  1. MNIST-5k digit classification (strokes, their thickness and shape: the autoencoder's stage-1
     data for the digit runs), grey images replicated to 3 channels;
  2. rotation prediction (Gidaris et al. 2018: which of 0/90/180/270 degrees was applied) on random
     32x32 crops of scikit-image's bundled photos (data.TRAIN_PHOTOS; astronaut and coffee are held
     out there, and `cat` is left out as the same picture as `chelsea`) at three scales. Rotation
     needs no labels and forces orientation-selective edge detectors, which is what a perceptual
     metric should react to.
Lin weights are all ones (LPIPS's "baseline" variant, see perceptual.py for the argument).

Determinism: every random draw comes from torch.manual_seed / numpy default_rng(seed), and the
default is ONE thread: with the same torch version the file is then reproduced bit for bit. More
threads split oneDNN's conv reductions differently, which changes float rounding (not the recipe);
one thread also proved faster on a busy 2-core machine, where two threads keep waiting on each other.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_scratch.checkpoint import atomic_torch_save
from ldm_scratch.data import TRAIN_PHOTOS, MNIST5k, photo_versions
from ldm_scratch.perceptual import DEFAULT_WEIGHTS, SmallFeatures

CROP = 32                      # the size the digit images are padded to: one input size for both tasks
SCALES = (1, 2, 4)             # area-downsampling factors: 32 px covers fur at 1x, a whole face at 1/4


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-5k's train and held-out test splits: x (N, 3, 32, 32) in [-1, 1] (grey -> RGB), y (N,)."""
    tr, te = MNIST5k(split="train", pad_to=CROP), MNIST5k(split="test", pad_to=CROP)
    rgb = [d.images.expand(-1, 3, -1, -1).contiguous() for d in (tr, te)]  # (N, 1, 32, 32) -> (N, 3, 32, 32)
    return rgb[0], tr.labels, rgb[1], te.labels


def rotation_batch(photos: list[torch.Tensor], n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random crops, each shown at all 4 rotations: (4n, 3, 32, 32) and labels k in {0,1,2,3}."""
    crops = []
    for _ in range(n):
        p = photos[rng.integers(len(photos))]
        i, j = rng.integers(p.shape[1] - CROP + 1), rng.integers(p.shape[2] - CROP + 1)
        crops.append(p[:, i:i + CROP, j:j + CROP])
    c = torch.stack(crops)  # (n, 3, 32, 32)
    x = torch.cat([torch.rot90(c, k, dims=(2, 3)) for k in range(4)])  # (4n, 3, 32, 32)
    y = torch.arange(4).repeat_interleave(n)
    return x, y


class TwoHeads(nn.Module):
    """The trunk plus one linear head per task on its flattened last stage (heads are not shipped)."""

    def __init__(self, trunk: SmallFeatures):
        super().__init__()
        self.trunk = trunk
        side = CROP // 2 ** (len(trunk.widths) - 1)  # 32 -> 4 after three stride-2 stages
        d = trunk.widths[-1] * side * side
        self.digit, self.rotation = nn.Linear(d, 10), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)[-1].flatten(1)  # (B, 3, 32, 32) -> (B, 128 * 4 * 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64, help="digits per step (plus batch/4 crops x 4 rotations)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 = bit-reproducible (the committed file was made so); more may be faster")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits()
    photos = photo_versions(scales=SCALES)
    print(f"digits: MNIST-5k {len(x_tr)} train / {len(x_te)} held out; photos: {', '.join(TRAIN_PHOTOS)}")

    model = TwoHeads(SmallFeatures((32, 64, 128, 128)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    # cosine decay to 0: large steps early, a settled net at the end (no extra hyperparameter)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.from_numpy(rng.integers(len(x_tr), size=args.batch))
        xd, yd = x_tr[idx], y_tr[idx]
        # a random shift of up to 2 px: cheap augmentation against overfitting 4,500 digits
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        xd = torch.roll(xd, (dy, dx), dims=(2, 3))
        xr, yr = rotation_batch(photos, args.batch // 4, rng)
        h = model(torch.cat([xd, xr]))  # (B + B, 2048)
        loss_digit = F.cross_entropy(model.digit(h[:len(xd)]), yd)
        loss_rot = F.cross_entropy(model.rotation(h[len(xd):]), yr)
        loss = loss_digit + loss_rot  # equal weights: both are log-losses of the same scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  digit CE {loss_digit.item():.3f}  rotation CE {loss_rot.item():.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)

    model.eval()
    with torch.no_grad():
        acc = (model.digit(model(x_te)).argmax(1) == y_te).float().mean().item()
        xr, yr = rotation_batch(photos, 500, np.random.default_rng(args.seed + 1))
        rot_acc = (model.rotation(model(xr)).argmax(1) == yr).float().mean().item()
    print(f"held-out digit accuracy: {acc:.4f} ({len(x_te)} digits); rotation accuracy on fresh crops: {rot_acc:.3f}")

    trunk = model.trunk
    blob = {
        "widths": list(trunk.widths),
        "net": {k: v.detach().half() for k, v in trunk.state_dict().items()},  # fp16 halves the file
        "lin": {f"lin{l}.model.1.weight": torch.ones(1, c, 1, 1) for l, c in enumerate(trunk.widths)},
        "info": {"script": "scripts/train_perceptual.py", "steps": args.steps, "seed": args.seed,
                 "threads": args.threads, "torch": str(torch.__version__), "digits": "MNIST5k train",
                 "heldout_digit_accuracy": round(acc, 4), "rotation_accuracy": round(rot_acc, 4),
                 "photos": ",".join(TRAIN_PHOTOS), "lin": "uniform (LPIPS baseline)"},
    }
    atomic_torch_save(blob, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
