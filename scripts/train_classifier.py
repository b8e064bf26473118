"""Train the MNIST digit classifier that ldm_scratch.metrics uses for FID and conditional accuracy.

    python scripts/train_classifier.py            # ~1-3 minutes on 2 CPU cores

Trains `MNISTClassifier` on the 4,500-image "train" split of MNIST-5k with light random affine
augmentation (shifts up to 2 px, rotations up to 10 degrees, scale 0.9-1.1): generated digits are
never perfectly centred like MNIST's, and a classifier that has only seen centred digits would
mark a model down for position instead of shape. Reports accuracy on the 500 held-out "test"
digits (50 per class, never trained on) and writes, atomically:
  ldm_scratch/weights/mnist_classifier.pt    the state_dict (loaded with weights_only=True)
  ldm_scratch/weights/mnist_classifier.json  held-out accuracy, seed, epochs, date (cited by the README)
"""
from __future__ import annotations

import argparse
import datetime
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm_scratch.checkpoint import atomic_json_save, atomic_torch_save
from ldm_scratch.data import MNIST5k
from ldm_scratch.metrics import CLASSIFIER_PATH, MNISTClassifier, predict

MAX_SHIFT_PX = 2.0
MAX_ROTATION_DEG = 10.0
MAX_SCALE_CHANGE = 0.1  # zoom in [0.9, 1.1]


def random_affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift, rotate and scale each digit in a batch (B, 1, H, W) by its own random amount."""
    b, _, h, w = x.shape
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * MAX_SCALE_CHANGE
    # affine_grid works in normalised coordinates where the image spans [-1, 1], i.e. 2 / W per pixel.
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * MAX_SHIFT_PX * 2 / torch.tensor([w, h])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output coordinates to input coordinates: [[cos, -sin, tx], [sin, cos, ty]]
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    # Sample (x + 1) so zero padding is the background value -1 (black), then shift back.
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # (B, 1, H, W)


def split_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits of a split as (N, 1, 32, 32) float in [-1, 1] and (N,) int64 labels."""
    ds = MNIST5k(split=split, pad_to=32)
    return ds.images, ds.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = split_tensors("train")  # (4500, 1, 32, 32), (4500,)
    x_test, y_test = split_tensors("test")  # (500, 1, 32, 32), (500,)
    print(f"train {tuple(x_train.shape)}  held-out {tuple(x_test.shape)}")

    model = MNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total_loss = 0.0
        for i in range(0, len(x_train), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = random_affine(x_train[idx], gen)  # (b, 1, 32, 32)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        model.eval()
        acc = (predict(x_test, model) == y_test).double().mean().item()
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {total_loss / len(x_train):.4f}  "
              f"held-out acc {acc:.4f}  ({time.time() - start:.0f}s)")

    model.eval()
    acc = (predict(x_test, model) == y_test).double().mean().item()
    x_moved = random_affine(x_test, torch.Generator().manual_seed(1))  # (500, 1, 32, 32)
    shifted_acc = (predict(x_moved, model) == y_test).double().mean().item()
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out)
    atomic_json_save({
        "heldout_accuracy": round(acc, 4),
        "heldout_accuracy_augmented": round(shifted_acc, 4),
        "heldout_images": len(x_test),
        "train_images": len(x_train),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "augmentation": f"shift <= {MAX_SHIFT_PX} px, rotation <= {MAX_ROTATION_DEG} deg, "
                        f"scale 1 +- {MAX_SCALE_CHANGE}",
        "train_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }, args.out.with_suffix(".json"))
    print(f"held-out accuracy {acc:.4f} (500 digits; {shifted_acc:.4f} on randomly shifted/rotated copies)")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
