"""Where a photo autoencoder's error is, beside the non-learned floor (issue #12's coffee aim).

    python scripts/photo_codec_errors.py                                  # the shipped photo-f8c4
    python scripts/photo_codec_errors.py photo-f8c4 runs/cap/ch40/residual/model   # and trials (model folders)

For each model, four views of its reconstructions (posterior mode, float32):
1. gain over the floor (area-down by f, bicubic-up) on every bundled photo, held-out and training: a codec
   that only memorised its eight training photos would gain much more on them than on astronaut and coffee;
2. coffee and astronaut by how busy each f x f block is (its pixel variance, in five bins: the quietest quarter,
   ..., the busiest tenth): each bin's share of the codec's squared error, and the codec's MSE there as a
   fraction of the floor's;
3. the mean signed error per colour channel (a colour bias), on the held-out photos and on 256 training crops,
   and the PSNR the held-out photo would have with its own bias subtracted;
4. the held-out photos run whole vs as tiles of the training crop size.
Training photos larger than 1024 pixels on a side are centre-cropped to 512 x 512 in view 1. Writes OUT/report.md
(and prints it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.data import HELDOUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops, load_photo
from ldm_scratch.metrics import psnr
from ldm_scratch.pretrained import load_autoencoder
from ldm_scratch.stage1 import crop_to_multiple, floor_reconstruction

BINS = (0.25, 0.5, 0.75, 0.9)  # block-variance quantiles: five bins, the last the busiest tenth


@torch.no_grad()
def reconstruct(model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return model.decode(model.encode(x).mode()).clamp(-1, 1)


@torch.no_grad()
def reconstruct_tiles(model: AutoencoderKL, x: torch.Tensor, tile: int) -> torch.Tensor:
    out = torch.empty_like(x)
    for i in range(0, x.shape[2], tile):
        for j in range(0, x.shape[3], tile):
            out[:, :, i:i + tile, j:j + tile] = reconstruct(model, x[:, :, i:i + tile, j:j + tile])
    return out


def photo(name: str, f: int, big_crop: bool = False) -> torch.Tensor:
    x = crop_to_multiple(load_photo(name)[None], f)  # (1, 3, H, W), sides multiples of f
    H, W = x.shape[2:]
    if big_crop and max(H, W) > 1024:
        x = x[:, :, H // 2 - 256:H // 2 + 256, W // 2 - 256:W // 2 + 256]
    return x


def by_activity(x: torch.Tensor, rec: torch.Tensor, floor: torch.Tensor, f: int) -> list[dict]:
    """Blocks of f x f binned by their pixel variance: each bin's share of the codec's squared error and
    the codec's MSE there over the floor's."""
    block_mean = F.avg_pool2d(x, f).repeat_interleave(f, 2).repeat_interleave(f, 3)
    activity = F.avg_pool2d((x - block_mean) ** 2, f).mean(1).flatten()  # (blocks,)
    err = F.avg_pool2d((rec - x) ** 2, f).mean(1).flatten()
    err_floor = F.avg_pool2d((floor - x) ** 2, f).mean(1).flatten()
    bins = torch.bucketize(activity, torch.quantile(activity, torch.tensor(BINS)))
    rows = []
    for b in range(len(BINS) + 1):
        sel = bins == b
        rows.append({"blocks": int(sel.sum()), "share": float(err[sel].sum() / err.sum()),
                     "ratio": float(err[sel].sum() / err_floor[sel].sum())})
    return rows


def analyse(label: str, model: AutoencoderKL, crop: int) -> list[str]:
    f = model.cfg.f
    lines = [f"## {label}", "", f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, f = {f}.", "",
             "| photo | held out | floor dB | codec dB | gain dB |", "| --- | --- | --- | --- | --- |"]
    held_out = {}  # name -> (x, reconstruction), reused by the views below
    for name in HELDOUT_PHOTOS + TRAIN_PHOTOS:
        x = photo(name, f, big_crop=name not in HELDOUT_PHOTOS)
        x_rec = reconstruct(model, x)
        if name in HELDOUT_PHOTOS:
            held_out[name] = (x, x_rec)
        fl, rec = psnr(floor_reconstruction(x, f), x), psnr(x_rec, x)
        lines.append(f"| {name} | {'yes' if name in HELDOUT_PHOTOS else 'no'} | {fl:.2f} | {rec:.2f} | {rec - fl:+.2f} |")
    names = ["quietest 25%", "25-50%", "50-75%", "75-90%", "busiest 10%"]
    lines += ["", "Blocks by their own pixel variance: share of the codec's squared error / codec MSE over the floor's:", "",
              "| photo | codec MSE / floor MSE | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    crops = torch.stack([item for item in PhotoCrops(size=crop, length=256, seed=123)])  # training crops, unseen seed
    rec_crops = torch.cat([reconstruct(model, b) for b in crops.split(64)])
    bias_rows = [f"| 256 training crops of {crop} | "
                 + " / ".join(f"{v:+.4f}" for v in (rec_crops - crops).mean((0, 2, 3)).tolist())
                 + f" | {float((rec_crops - crops).median()):+.4f} | - | - |"]
    tile_rows = []
    for name, (x, rec) in held_out.items():
        floor = floor_reconstruction(x, f)
        rows = by_activity(x, rec, floor, f)
        ratio = float(((rec - x) ** 2).mean() / ((floor - x) ** 2).mean())
        lines.append(f"| {name} | {ratio:.3f} | " + " | ".join(f"{r['share']:.2f} / {r['ratio']:.2f}" for r in rows) + " |")
        bias = (rec - x).mean((0, 2, 3))
        unbiased = psnr((rec - bias[None, :, None, None]).clamp(-1, 1), x)
        bias_rows.append(f"| {name} | " + " / ".join(f"{v:+.4f}" for v in bias.tolist())
                         + f" | {float((rec - x).median()):+.4f} | {psnr(rec, x):.2f} | {unbiased:.2f} |")
        tile_rows.append(f"| {name} | {psnr(rec, x):.2f} | {psnr(reconstruct_tiles(model, x, crop), x):.2f} |")
    lines += ["", "Mean signed error per channel (reconstruction minus input, on [-1, 1]):", "",
              "| images | R / G / B | median error | PSNR dB | PSNR, own bias subtracted |", "| --- | --- | --- | --- | --- |",
              *bias_rows, "", f"Whole photo vs tiles of {crop} x {crop} (the training crop size):", "",
              "| photo | whole dB | tiles dB |", "| --- | --- | --- |", *tile_rows, ""]
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["photo-f8c4"],
                   help="model folders (train-autoencoder's OUT/model) or photo-f8c4 (the shipped one, the default)")
    p.add_argument("--crop", type=int, default=64, help="the training crop size (views 3 and 4)")
    p.add_argument("--out", default="runs/photo_codec_errors")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models = {("shipped photo-f8c4" if m == "photo-f8c4" else m):
              (load_autoencoder(m) if m == "photo-f8c4" else AutoencoderKL.from_pretrained(m).float().eval())
              for m in args.models}
    lines = ["# Where the photo codec's error is (scripts/photo_codec_errors.py)", ""]
    for label, model in models.items():
        lines += analyse(label, model, args.crop)
    text = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
