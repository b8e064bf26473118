"""Loaders for a user's data, on tiny files written into tmp_path: folders, idx, CIFAR batches."""
import gzip
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from ldm_scratch import loaders

skio = pytest.importorskip("skimage.io")


def save(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(path, img, check_contrast=False)


# ----------------------------------------------------------------------------- ImageFolder

@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    save(tmp_path / "a.png", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))  # wide RGB
    save(tmp_path / "sub" / "b.JPG", rng.integers(0, 256, (50, 30, 3), dtype=np.uint8))  # tall, upper-case ext
    save(tmp_path / "sub" / "deeper" / "c.jpeg", rng.integers(0, 256, (16, 16), dtype=np.uint8))  # grey, upscaled
    save(tmp_path / "d.png", rng.integers(0, 256, (20, 20, 4), dtype=np.uint8))  # RGBA
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder(folder):
    ds = loaders.ImageFolder(folder, size=16)
    assert len(ds) == 4 and {p.name for p in ds.paths} == {"a.png", "b.JPG", "c.jpeg", "d.png"}
    assert ds.images.shape == (4, 3, 16, 16) and ds.images.dtype == torch.float32
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    grey = ds[[p.name for p in ds.paths].index("c.jpeg")]
    assert torch.allclose(grey[0], grey[1], atol=1 / 127.5) and torch.allclose(grey[0], grey[2], atol=1 / 127.5)


def test_resize_center_crop_exact():
    # a 4x8 image whose left and right quarters are black and middle white: the centre crop is all white
    img = torch.zeros(3, 4, 8, dtype=torch.uint8)
    img[:, :, 2:6] = 255
    assert torch.equal(loaders.resize_center_crop(img, 4), torch.ones(3, 4, 4))
    # same size, no resizing: exactly the centre square, scaled to [-1, 1]
    x = torch.arange(3 * 5 * 5, dtype=torch.uint8).view(3, 5, 5)
    assert torch.equal(loaders.resize_center_crop(x, 5), x.float() / 127.5 - 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        loaders.ImageFolder(tmp_path / "missing", size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"empty.*\.png"):
        loaders.ImageFolder(tmp_path / "empty", size=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG broken")
    (bad / "y.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 2"):
        loaders.ImageFolder(bad, size=8)


def test_image_folder_skips_corrupt(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable.*broken\.png"):
        ds = loaders.ImageFolder(folder, size=8)
    assert len(ds) == 4 and [p.name for p in ds.skipped] == ["broken.png"]


# ----------------------------------------------------------------------------- idx

def idx_bytes(magic, arr):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


@pytest.fixture
def idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    (tmp_path / "img-idx3-ubyte").write_bytes(idx_bytes(2051, images))
    (tmp_path / "lab-idx1-ubyte").write_bytes(idx_bytes(2049, labels))
    (tmp_path / "img-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(2051, images)))
    (tmp_path / "lab-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(2049, labels)))
    return tmp_path, images, labels


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_idx(idx_files, suffix):
    d, images, labels = idx_files
    x, y = loaders.load_mnist_idx(d / f"img-idx3-ubyte{suffix}", d / f"lab-idx1-ubyte{suffix}")
    assert x.dtype == np.uint8 and np.array_equal(x, images)
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    x2, y2 = loaders.load_mnist_idx(d / f"img-idx3-ubyte{suffix}")
    assert y2 is None and np.array_equal(x2, images)
    ds = loaders.TensorImageDataset(x, y)
    assert ds[0][0].shape == (1, 28, 28) and ds.images.min() >= -1 and ds.images.max() <= 1


def test_load_mnist_idx_errors(idx_files, tmp_path):
    d, images, labels = idx_files
    with pytest.raises(FileNotFoundError, match="nope"):
        loaders.load_mnist_idx(d / "nope")
    with pytest.raises(ValueError, match=r"lab-idx1-ubyte.*magic number 2049 \(expected 2051"):
        loaders.load_mnist_idx(d / "lab-idx1-ubyte")  # labels passed as images
    with pytest.raises(ValueError, match="magic"):
        loaders.load_mnist_idx(d / "img-idx3-ubyte", d / "img-idx3-ubyte")
    raw = (d / "img-idx3-ubyte").read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="trunc.*truncated"):
        loaders.load_mnist_idx(tmp_path / "trunc")
    (tmp_path / "hdr").write_bytes(raw[:9])
    with pytest.raises(ValueError, match="truncated header"):
        loaders.load_mnist_idx(tmp_path / "hdr")
    (tmp_path / "extra").write_bytes(raw + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        loaders.load_mnist_idx(tmp_path / "extra")
    (tmp_path / "few").write_bytes(idx_bytes(2049, labels[:5]))
    with pytest.raises(ValueError, match="5 labels.*7 images"):
        loaders.load_mnist_idx(d / "img-idx3-ubyte", tmp_path / "few")
    (tmp_path / "badgz.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(ValueError, match="badgz.gz: corrupt gzip"):
        loaders.load_mnist_idx(tmp_path / "badgz.gz")


# ----------------------------------------------------------------------------- CIFAR-10

def write_batch(path, n, seed, protocol=2):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"test", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"x.png"] * n}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return batch


def test_load_cifar10(tmp_path):
    b1 = write_batch(tmp_path / "data_batch_1", 4, 0)
    b2 = write_batch(tmp_path / "data_batch_2", 3, 1, protocol=pickle.HIGHEST_PROTOCOL)
    x, y = loaders.load_cifar10(tmp_path)  # the folder: all data_batch_* files
    assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == b1[b"labels"] + b2[b"labels"]
    # channel-major rows: the first 1024 bytes are the red plane, row by row
    assert np.array_equal(x[0, :, :, 0].reshape(-1), b1[b"data"][0, :1024])
    assert np.array_equal(x[0, 0, 1, :], b1[b"data"][0, [1, 1025, 2049]])
    x1, _ = loaders.load_cifar10(tmp_path / "data_batch_1")
    assert np.array_equal(x1, x[:4])
    ds = loaders.TensorImageDataset(x, y)
    assert ds[0][0].shape == (3, 32, 32)


class Exploit:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless stand-in for os.system: must be refused, never called


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_9"):
        loaders.load_cifar10(tmp_path / "data_batch_9")
    with pytest.raises(FileNotFoundError, match="no data_batch"):
        loaders.load_cifar10(tmp_path)
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(ValueError, match=r"evil.*refused to load (posix|nt)\.getcwd"):
        loaders.load_cifar10(evil)
    write_batch(tmp_path / "good", 4, 0)
    (tmp_path / "trunc").write_bytes((tmp_path / "good").read_bytes()[:100])
    with pytest.raises(ValueError, match="trunc: corrupt"):
        loaders.load_cifar10(tmp_path / "trunc")
    with open(tmp_path / "c100", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="c100.*b'labels'"):
        loaders.load_cifar10(tmp_path / "c100")
    with open(tmp_path / "shape", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 784), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="shape.*3072"):
        loaders.load_cifar10(tmp_path / "shape")
    with open(tmp_path / "count", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="count.*2 integer labels"):
        loaders.load_cifar10(tmp_path / "count")


# ----------------------------------------------------------------------------- TensorImageDataset

def test_tensor_image_dataset():
    ds = loaders.TensorImageDataset(torch.zeros(5, 3, 8, 8))
    assert len(ds) == 5 and ds[0].shape == (3, 8, 8)
    u8 = loaders.TensorImageDataset(np.full((2, 4, 4), 255, np.uint8), labels=[1, 2])
    assert u8.images.shape == (2, 1, 4, 4) and (u8.images == 1).all() and u8[1][1].item() == 2
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        loaders.TensorImageDataset(torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(ValueError, match="labels"):
        loaders.TensorImageDataset(torch.zeros(2, 1, 2, 2), labels=[0])
    with pytest.raises(ValueError, match="uint8 or float"):
        loaders.TensorImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.int32))
