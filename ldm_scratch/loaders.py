"""Loaders for a user's own images: a folder of PNG/JPEG files, MNIST idx files, CIFAR-10 batches.

The shipped datasets live in `ldm_scratch.data`; this module reads data you bring.
Every loader ends in the project's convention: float32 images (C, H, W) in [-1, 1]
(the range the stage-1 autoencoder of Rombach et al. 2022, Sec. 3, reconstructs),
labels int64. Files are checked as they are read, and every error names the file
and says what was expected, because a silent bad batch costs hours of training.
"""
from __future__ import annotations

import gzip
import pickle
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm_scratch.data import to_signed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively
MAX_NAMED = 3  # how many unreadable files a warning names before it just counts


# ----------------------------------------------------------------------------- a folder of images

def read_rgb(path: Path) -> np.ndarray:
    """Read one PNG/JPEG as uint8 (H, W, 3): grey is replicated, an alpha channel dropped."""
    import skimage.io  # imported here: only folder users pay for it
    img = np.asarray(skimage.io.imread(path))
    if img.dtype == np.uint16:  # 16-bit PNG: keep the top 8 bits
        img = (img >> 8).astype(np.uint8)
    elif img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        raise ValueError(f"{path}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    elif img.ndim == 3 and img.shape[2] == 2:  # grey + alpha
        img = np.repeat(img[:, :, :1], 3, axis=2)  # (H, W, 2) -> (H, W, 3)
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        img = img[:, :, :3]  # (H, W, 4) -> (H, W, 3): alpha dropped, the colour is kept as stored
    else:
        raise ValueError(f"{path}: expected a grey, RGB or RGBA image, got shape {img.shape}")
    return np.ascontiguousarray(img)


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, size, size) in [-1, 1]: shorter side to `size`, then the centre square."""
    h, w = img.shape[1:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = to_signed(img)[None]  # (3, H, W) -> (1, 3, H, W)
    if (new_h, new_w) != (h, w):
        # antialias=True low-pass filters before shrinking, so downsizing does not alias
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[0, :, top:top + size, left:left + size]  # (1, 3, new_h, new_w) -> (3, size, size)
    return x.clamp(-1, 1)  # bilinear with antialias can overshoot by a hair


class ImageFolder(Dataset):
    """Every PNG/JPEG under `root` (recursively), as float32 (3, size, size) in [-1, 1].

    Extensions are matched case-insensitively (.png, .jpg, .jpeg). Images are made
    RGB (grey replicated, alpha dropped), resized so the shorter side is `size`, then
    centre-cropped. All images are read once, at construction, into `.images`
    (N, 3, size, size): reading is where a corrupt file shows itself, and a folder
    you can train on fits in memory (10,000 images at 64 x 64 are 0.5 GB as float32).
    Unreadable files are skipped with ONE warning that counts them and names the
    first few; if no file can be read, that is an error. `.paths` lists the files used.
    """

    def __init__(self, root: str | Path, size: int = 64, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        exts = tuple(e.lower() for e in extensions)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise ValueError(f"no images found in {root} (looked recursively for {', '.join(exts)}, any case)")
        images, self.paths, bad = [], [], []
        for p in files:
            try:
                img = torch.from_numpy(read_rgb(p)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            except Exception as e:  # each image library raises its own types; all mean "cannot read"
                bad.append((p, e))
                continue
            images.append(resize_center_crop(img, size))
            self.paths.append(p)
        if not images:
            raise ValueError(f"none of the {len(files)} image files in {root} could be read; "
                             f"first error: {bad[0][0]}: {bad[0][1]}")
        if bad:
            named = ", ".join(str(p) for p, _ in bad[:MAX_NAMED]) + (", ..." if len(bad) > MAX_NAMED else "")
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) of {len(files)} in {root}: {named}",
                          stacklevel=2)
        self.skipped = [p for p, _ in bad]
        self.images = torch.stack(images)  # (N, 3, size, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ----------------------------------------------------------------------------- MNIST idx files

# LeCun's idx format: a big-endian int32 magic number 0x0000TTDD (TT = 0x08 for uint8,
# DD = number of dimensions), then DD big-endian int32 sizes, then the raw data.
IDX_IMAGES_MAGIC = 0x0803  # = 2051: uint8, 3 dims (N, rows, cols)
IDX_LABELS_MAGIC = 0x0801  # = 2049: uint8, 1 dim (N,)


def read_maybe_gzip(path: Path) -> bytes:
    """The bytes of a file, gunzipped if it starts with the gzip signature 1f 8b (whatever its name)."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # bad CRC, truncated stream
            raise ValueError(f"{path}: corrupt gzip file: {e}") from e
    return raw


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """One idx file (plain or .gz) as a uint8 array of its stated shape; checks magic and length."""
    path = Path(path)
    raw = read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: wrong magic number {found} (expected {magic}: "
                         f"{'images' if magic == IDX_IMAGES_MAGIC else 'labels'}, uint8)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes, expected at least {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape} "
                         f"({'truncated' if len(raw) < expected else 'trailing data'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # copy: writable, owns its memory


def load_mnist_idx(images_path: str | Path, labels_path: str | Path | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """MNIST-format idx files -> images uint8 (N, rows, cols) (0 = background) and labels int64 (N,) or None.

    Works for MNIST, Fashion-MNIST and KMNIST (train-images-idx3-ubyte[.gz], ...).
    Wrap with `TensorImageDataset` to train on them.
    """
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(labels) != len(images):
        raise ValueError(f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images")
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------- CIFAR-10 batches

CIFAR_SIDE = 32
CIFAR_PIXELS = 3 * CIFAR_SIDE * CIFAR_SIDE  # 3072 bytes per image: 1024 red, then 1024 green, then 1024 blue


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and nothing else.

    Why: unpickling runs code. A pickle names functions to call (`find_class`) and
    a crafted file can name `os.system`. CIFAR-10 batches only need numpy's array
    reconstruction (`_reconstruct`, or `_frombuffer` at pickle protocol 5), `ndarray`,
    `dtype`, and `_codecs.encode` (how Python 3 pickles bytes at protocol 2), so every
    other name is refused before anything is called.
    """

    NUMPY_INTERNALS = {"multiarray": "_reconstruct", "numeric": "_frombuffer"}  # submodule -> function

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}:
            return super().find_class(module, name)
        # numpy < 2 writes "numpy.core.multiarray", numpy >= 2 "numpy._core.multiarray"
        prefix, _, sub = module.rpartition(".")
        if prefix in ("numpy.core", "numpy._core") and self.NUMPY_INTERNALS.get(sub) == name:
            core = getattr(np, "_core", None) or np.core  # whichever this numpy has
            return getattr(getattr(core, sub), name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed")


def load_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (data_batch_1 ... data_batch_5, test_batch) -> uint8 (N, 32, 32, 3), int64 (N,)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official batches were pickled by Python 2, whose str is bytes
            batch = CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a safe CIFAR-10 batch: {e}") from e
    except Exception as e:  # truncated or random bytes surface as EOFError, ValueError, KeyError, ...
        raise ValueError(f"{path}: corrupt or not a CIFAR-10 python batch: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels' (CIFAR-10; "
                         f"CIFAR-100 uses b'fine_labels'), got {keys}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        raise ValueError(f"{path}: expected b'data' uint8 (N, {CIFAR_PIXELS}), got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) or \
            (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: expected {len(data)} integer labels in 0..9, got {labels.dtype} {labels.shape}")
    # each row is channel-major: (3072,) -> (3, 32, 32); then to (32, 32, 3), how images are usually stored
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)  # (N, 3072) -> (N, 32, 32, 3)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_cifar10(paths: str | Path | Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches -> images uint8 (N, 32, 32, 3) (channels LAST) and labels int64 (N,).

    `paths`: one batch file, a list of them, or the extracted `cifar-10-batches-py`
    folder (then the five training batches data_batch_1..5 are read; pass
    `folder / "test_batch"` for the test set). Wrap with `TensorImageDataset`.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("data_batch_*"))
            if not found:
                raise FileNotFoundError(f"no data_batch_* files in {p}")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise ValueError("load_cifar10 needs at least one batch file")
    parts = [load_cifar_batch(f) for f in files]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


# ----------------------------------------------------------------------------- arrays as a dataset

class TensorImageDataset(Dataset):
    """Images already in memory as a dataset: items `x`, or `(x, y)` when labels are given.

    `images` may be uint8 pixels, (N, H, W) grey or (N, H, W, C) channels-last, as the
    loaders above return them (scaled to [-1, 1] here), or a float tensor
    (N, C, H, W) already in [-1, 1]. `.images` and `.labels` allow full-batch work.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None):
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            if x.dim() == 3:
                x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
            elif x.dim() == 4:
                x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
            else:
                raise ValueError(f"uint8 images must be (N, H, W) or (N, H, W, C), got {tuple(x.shape)}")
            x = to_signed(x)
        elif x.is_floating_point():
            if x.dim() != 4:
                raise ValueError(f"float images must be (N, C, H, W), got {tuple(x.shape)}")
            if x.numel() and (x.min() < -1 or x.max() > 1):
                raise ValueError(f"float images must lie in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]")
            x = x.float()
        else:
            raise ValueError(f"images must be uint8 or float, got {x.dtype}")
        self.images = x.contiguous()
        self.labels = None if labels is None else torch.as_tensor(labels).long()
        if self.labels is not None and self.labels.shape != (len(x),):
            raise ValueError(f"expected {len(x)} labels, got shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.labels is None:
            return self.images[i]
        return self.images[i], self.labels[i]
