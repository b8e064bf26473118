"""The shipped datasets: MNIST-5k (file, split, range), photos, photo crops, coloured digits."""
import hashlib

import numpy as np
import pytest
import torch

from ldm_scratch import data

MNIST5K_SHA256 = "246e0c30eeea57c8d0037d3f38c8e00651ec204cc61b8022563e9aeeb9d756f4"  # data/README.md


@pytest.fixture(scope="module")
def raw():
    return data.load_mnist5k()


def test_mnist5k_file_matches_readme():
    assert hashlib.sha256(data.MNIST5K_PATH.read_bytes()).hexdigest() == MNIST5K_SHA256


def test_load_mnist5k(raw):
    images, labels = raw
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and np.median(images) == 0  # white strokes on a black background


def test_load_mnist5k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        data.load_mnist5k(tmp_path / "nothere.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="bad.npz"):
        data.load_mnist5k(bad)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 32, 32), np.uint8), labels=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="28, 28"):
        data.load_mnist5k(wrong)


def test_split_sizes_disjoint_deterministic(raw):
    _, labels = raw
    train = data.mnist5k_split_indices(labels, "train")
    test = data.mnist5k_split_indices(labels, "test")
    assert len(train) == 4500 and len(test) == 500
    assert np.bincount(labels[test]).tolist() == [50] * 10
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))
    assert np.array_equal(test, data.mnist5k_split_indices(labels, "test"))
    with pytest.raises(ValueError, match="train, test, all"):
        data.mnist5k_split_indices(labels, "val")


def test_mnist5k_dataset(raw):
    ds = data.MNIST5k("test")
    x, y = ds[0]
    assert len(ds) == 500 and x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert ds.images.shape == (500, 1, 32, 32) and ds.labels.shape == (500,)
    assert ds.images.min() == -1 and ds.images.max() == 1
    # the 2-pixel border is background, the centre is the original digit
    assert (ds.images[:, :, :2] == -1).all() and (ds.images[:, :, :, -2:] == -1).all()
    idx = data.mnist5k_split_indices(raw[1], "test")
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(raw[0][idx]).float() / 127.5 - 1)
    assert len(data.MNIST5k("train")) == 4500 and len(data.MNIST5k("all", pad_to=28)) == 5000
    with pytest.raises(ValueError, match="valid splits"):
        data.MNIST5k("validation")
    with pytest.raises(ValueError, match="pad_to"):
        data.MNIST5k("test", pad_to=16)


def test_photos():
    assert not set(data.HELDOUT_PHOTOS) & set(data.TRAIN_PHOTOS)
    assert "astronaut" in data.HELDOUT_PHOTOS
    x = data.load_photo("astronaut")
    assert x.shape == (3, 512, 512) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    grey = data.load_photo("camera")
    assert grey.shape[0] == 3 and torch.equal(grey[0], grey[2])
    assert data.load_photo("stereo_motorcycle").shape[0] == 3  # the left view of the stereo pair
    with pytest.raises(ValueError, match="astronaut"):
        data.load_photo("lena")


def test_photo_crops_reproducible():
    a = data.PhotoCrops(size=32, length=50, names=("chelsea", "coffee"), seed=3)
    b = data.PhotoCrops(size=32, length=50, names=("chelsea", "coffee"), seed=3)
    x = torch.stack([a[i] for i in range(len(a))])
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(a[17], b[17]) and torch.equal(a[17], a[17])
    assert not torch.equal(a[17], data.PhotoCrops(32, 50, ("chelsea", "coffee"), seed=4)[17])
    assert len({tuple(c.flatten()[:8].tolist()) for c in x}) > 40  # crops differ from each other
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError, match="smaller"):
        data.PhotoCrops(size=1024, names=("chelsea",))


def test_photo_crops_augment_rotates_and_shuffles_channels_only():
    """augment=True: each item is the plain item turned by k * 90 degrees with its colour channels reordered;
    augment=False items are unchanged by the option's existence (the extra draws come last)."""
    import itertools
    plain = data.PhotoCrops(size=32, length=40, names=("chelsea", "coffee"), seed=3)
    aug = data.PhotoCrops(size=32, length=40, names=("chelsea", "coffee"), seed=3, augment=True)
    seen = set()
    for i in range(len(plain)):
        found = [(k, p) for k in range(4) for p in itertools.permutations(range(3))
                 if torch.equal(aug[i], plain[i].rot90(k, dims=(1, 2))[list(p)])]
        assert found, f"item {i} is not a rotation + channel order of the plain crop"
        seen.add(found[0])
    assert len({k for k, _ in seen}) == 4 and len({p for _, p in seen}) >= 4  # the draws vary
    assert torch.equal(aug[5], data.PhotoCrops(32, 40, ("chelsea", "coffee"), seed=3, augment=True)[5])
    from ldm_scratch.cli.flags import build_data  # the command line's name for it
    assert build_data("photos-aug", 32, 0).augment and not build_data("photos", 32, 0).augment


def test_photos_more_adds_the_extra_photos_and_never_a_held_out_one():
    """--data photos-more: crops of the eight training photos plus data.EXTRA_PHOTOS (grey textures and photos,
    matplotlib's RGB portrait), all read from installed packages; astronaut and coffee stay out."""
    from ldm_scratch.cli.flags import build_data
    assert not set(data.EXTRA_PHOTOS) & set(data.HELDOUT_PHOTOS)
    portrait = data.load_photo_uint8("grace_hopper")
    assert portrait.shape == (3, 600, 512) and portrait.dtype == torch.uint8
    assert not torch.equal(portrait[0], portrait[2])  # a colour photo, not grey replicated
    more, plain = build_data("photos-more", 32, 0), build_data("photos", 32, 0)
    assert len(more.versions) == len(data.TRAIN_PHOTOS) + len(data.EXTRA_PHOTOS) == len(plain.versions) + 6
    # the extra photos' full-size versions are there, pixel for pixel
    for name, versions in zip(data.TRAIN_PHOTOS + data.EXTRA_PHOTOS, more.versions):
        assert torch.equal(versions[0], data.load_photo_uint8(name))
    x = torch.stack([more[i] for i in range(64)])
    assert x.shape == (64, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_area_downsample():
    img = torch.tensor([[[0, 2], [4, 6]]], dtype=torch.uint8).expand(3, 2, 2)
    assert data.area_downsample(img, 2).flatten().tolist() == [3, 3, 3]  # mean of 0, 2, 4, 6


def test_colored_digits():
    ds = data.ColoredDigits("test", seed=0)
    x, y, cap = ds[0]
    assert len(ds) == 500 and x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert set(ds.color_idx.tolist()) == set(range(len(data.COLORS)))
    assert set(ds.background_idx.tolist()) == set(range(len(data.BACKGROUNDS)))
    for i in range(20):
        c, b = data.ColoredDigits.COLOR_NAMES[ds.color_idx[i]], data.BACKGROUNDS[ds.background_idx[i]]
        assert ds.captions[i] == data.caption(str(int(ds.labels[i])), c, b)
    assert data.caption("3", "orange", "plain") == "an orange 3 on plain"
    assert data.caption("7", "red", "grass") == "a red 7 on grass"
    # the stroke colour is recoverable: the brightest pixel of a red digit is pure red
    red = [i for i in range(len(ds)) if data.ColoredDigits.COLOR_NAMES[ds.color_idx[i]] == "red"][0]
    peak = ds.images[red].flatten(1).max(dim=1).values
    assert peak[0] == 1 and peak[1] < 0 and peak[2] < 0
    # plain background is black; texture backgrounds are darkened (below TEXTURE_GAIN)
    plain = ds.background_idx == 0
    corner = ds.images[:, :, :2, :2]  # MNIST padding: no ink there
    assert (corner[plain] == -1).all()
    assert corner[~plain].max() <= data.TEXTURE_GAIN * 2 - 1 + 1e-6
    again = data.ColoredDigits("test", seed=0)
    assert torch.equal(again.images, ds.images) and again.captions == ds.captions
    assert not torch.equal(data.ColoredDigits("test", seed=1).color_idx, ds.color_idx)
