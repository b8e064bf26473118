"""perceptual.py: the LPIPS-form distance, its two backbones, and the file checks."""
import pytest
import torch

from ldm_scratch.checkpoint import CheckpointError, safe_torch_load
from ldm_scratch.perceptual import (CONTRASTIVE_WEIGHTS, DEFAULT_WEIGHTS, DISTORTIONS, PerceptualLoss, distortion_pairs,
                                    distortion_ranking, load_default,
                                    unit_normalize)

# torchvision's vgg16().features: the indices of the 13 convs and their (out, in) widths
VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
             14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
             26: (512, 512), 28: (512, 512)}
LIN_CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture(scope="module")
def ploss():
    return PerceptualLoss()


def test_shape_zero_symmetric_nonnegative(ploss):
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = ploss(x, y)
    assert d.shape == (2,)
    assert (d > 0).all()
    assert torch.allclose(d, ploss(y, x))
    assert torch.allclose(ploss(x, x), torch.zeros(2), atol=1e-6)


def test_gradient_reaches_the_input(ploss):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    ploss(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in ploss.parameters())


def test_one_channel_is_replicated(ploss):
    x, y = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(ploss(x, y), ploss(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))


def test_bad_inputs(ploss):
    with pytest.raises(ValueError, match="equal shape"):
        ploss(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="net must be"):
        PerceptualLoss("alexnet")
    with pytest.raises(ValueError, match="vgg_path"):
        PerceptualLoss("vgg16")


def test_unit_normalize():
    f = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    assert torch.allclose(unit_normalize(f).flatten(), torch.tensor([0.6, 0.8]))


def test_shipped_default_loads_and_is_frozen(ploss):
    blob = safe_torch_load(DEFAULT_WEIGHTS)  # weights_only=True
    assert {"widths", "net", "lin", "info"} <= set(blob)
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    assert not any(p.requires_grad for p in ploss.parameters())
    ploss.train()  # a parent's .train() must not unfreeze the ruler
    assert not ploss.training and not ploss.net.training


def _vgg_state():
    state = {}
    for i, (out_c, in_c) in VGG_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(out_c, in_c, 3, 3) * (2 / (9 * in_c)) ** 0.5  # He init
        state[f"features.{i}.bias"] = torch.zeros(out_c)
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    return state


def _lin_state():
    return {f"lin{l}.model.1.weight": torch.rand(1, c, 1, 1) for l, c in enumerate(LIN_CHANNELS)}


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    """A random state dict in torchvision's vgg16 layout and LPIPS lin weights, written once (~60 MB)."""
    folder = tmp_path_factory.mktemp("vgg")
    torch.save(_vgg_state(), folder / "vgg16.pth")
    torch.save(_lin_state(), folder / "vgg_lin.pth")
    return folder / "vgg16.pth", folder / "vgg_lin.pth"


def test_vgg16_from_local_files(vgg_files):
    vgg, lin = vgg_files
    p = PerceptualLoss("vgg16", vgg_path=vgg, lin_path=lin)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    d = p(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    assert torch.allclose(p.lin2, torch.load(lin)["lin2.model.1.weight"])


@pytest.mark.parametrize("key,value,needle", [
    ("lin3.model.1.weight", None, "missing key 'lin3.model.1.weight'"),
    ("lin2.model.1.weight", torch.rand(1, 7, 1, 1), "'lin2.model.1.weight' has shape"),
    ("lin0.model.1.weight", -torch.rand(1, 64, 1, 1), "'lin0.model.1.weight' has negative"),
])
def test_bad_lin_files_name_the_problem(tmp_path, vgg_files, key, value, needle):
    lin = _lin_state()
    if value is None:
        del lin[key]
    else:
        lin[key] = value
    torch.save(lin, tmp_path / "bad_lin.pth")
    with pytest.raises(CheckpointError, match=needle):
        PerceptualLoss("vgg16", vgg_path=vgg_files[0], lin_path=tmp_path / "bad_lin.pth")


def test_bad_vgg_and_missing_files(tmp_path, vgg_files):
    state = _vgg_state()
    del state["features.28.bias"]
    torch.save(state, tmp_path / "bad_vgg.pth")
    with pytest.raises(CheckpointError, match=r"bad_vgg.pth: missing key 'features\.28\.bias'"):
        PerceptualLoss("vgg16", vgg_path=tmp_path / "bad_vgg.pth", lin_path=vgg_files[1])
    with pytest.raises(CheckpointError, match="nope.pth"):
        PerceptualLoss("vgg16", vgg_path=tmp_path / "nope.pth", lin_path=vgg_files[1])
    torch.save({"widths": [8, 8]}, tmp_path / "broken_default.pt")
    with pytest.raises(CheckpointError, match="'net'"):
        load_default(tmp_path / "broken_default.pt")


def test_distortion_pairs_have_equal_mse():
    # a smooth image: blurring white noise could never lose as much as shifting it does
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 6) * 2 - 1, size=24, mode="bilinear")
    pairs = distortion_pairs(x, generator=torch.Generator().manual_seed(0))
    mse = {k: ((v - x) ** 2).mean(dim=(1, 2, 3)) for k, v in pairs.items()}
    assert list(pairs) == list(DISTORTIONS)
    for kind in ("noise", "blocking", "colour"):
        assert torch.allclose(mse[kind], mse["shift"], rtol=1e-4), kind
    assert torch.allclose(mse["blur"], mse["shift"], rtol=2e-2)
    # blocking is a blend towards the 8 x 8 block means; the colour cast is one constant per channel
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 8), scale_factor=8, mode="nearest")
    a = ((pairs["blocking"] - x) / (blocks - x)).flatten(1)
    assert torch.allclose(a, a[:, :1].expand_as(a), rtol=1e-3)
    cast = pairs["colour"] - x
    assert torch.allclose(cast, cast[..., :1, :1].expand_as(cast), atol=1e-6)


def test_distortion_ranking_counts_the_shift_least():
    x = torch.nn.functional.interpolate(torch.rand(3, 3, 6, 6) * 2 - 1, size=24, mode="bilinear")

    def shift_blind(a, b):      # a distance that sees nothing of a one-pixel move right
        return ((a[..., 1:] - b[..., 1:]) ** 2 * (b[..., 1:] != a[..., :-1])).mean(dim=(1, 2, 3))
    r = distortion_ranking(shift_blind, x, generator=torch.Generator().manual_seed(0))
    assert r["n"] == 3 and r["shift_least"] == 3 and r["shift_least_of_three"] == 3 and r["order"][0] == "shift"
    r = distortion_ranking(lambda a, b: -((a - b) ** 2).mean(dim=(1, 2, 3)), x)  # ties: nothing is strictly least
    assert r["shift_least"] == 0


def test_shipped_contrastive_net_ranks_the_shift_least_on_average():
    """The shipped contrastive net, on held-out astronaut crops (never trained on): the one-pixel shift is, on
    average, closer than every other distortion of equal MSE (scripts/train_perceptual_contrastive.py measures
    it per crop); the default net does not (noise comes out milder)."""
    from ldm_scratch.data import load_photo
    x = load_photo("astronaut")
    crops = torch.stack([x[:, i:i + 64, j:j + 64] for i, j in ((40, 180), (200, 200), (300, 60), (380, 300))])
    r = distortion_ranking(PerceptualLoss("contrastive"), crops, generator=torch.Generator().manual_seed(0))
    assert r["order"][0] == "shift", r["mean"]
    assert CONTRASTIVE_WEIGHTS.stat().st_size < 1_000_000
