"""Prompt adherence: real held-out coloured digits score near 1 on every attribute (the metric's
ceiling), the same images under a caption that names the wrong digit, colour or background score
near 0 on that attribute only, and malformed captions or images are clear errors."""
import pytest
import torch
import torch.nn.functional as F

from ldm_scratch.adherence import fit_adherence, parse_caption, predict_attributes, prompt_adherence
from ldm_scratch.data import BACKGROUNDS, COLORS, DIGIT_NAMES, TEXTURE_GAIN, ColoredDigits, caption

COLOR_NAMES = tuple(COLORS)


@pytest.fixture(scope="module")
def test_set() -> ColoredDigits:
    return ColoredDigits("test")


def recaption(data: ColoredDigits, digit_shift: int = 0, color_shift: int = 0, background_shift: int = 0) -> list[str]:
    """The true captions with one attribute moved to another valid value (so it is surely wrong)."""
    return [caption(DIGIT_NAMES[(y + digit_shift) % 10], COLOR_NAMES[(c + color_shift) % len(COLOR_NAMES)],
                    BACKGROUNDS[(b + background_shift) % len(BACKGROUNDS)])
            for y, c, b in zip(data.labels.tolist(), data.color_idx.tolist(), data.background_idx.tolist())]


def test_parse_caption_round_trips_the_template():
    assert parse_caption("a red 7 on grass") == (7, "red", "grass")
    assert parse_caption("An Orange 3 on plain") == (3, "orange", "plain")
    for d in DIGIT_NAMES:
        for c in COLOR_NAMES:
            for b in BACKGROUNDS:
                assert parse_caption(caption(d, c, b)) == (int(d), c, b)


@pytest.mark.parametrize("bad", ["a purple 7 on grass", "a red 12 on grass", "a red 7 at grass", "red 7 on grass",
                                 "a red 7 on sand", "", 7])
def test_parse_caption_errors_name_the_template(bad):
    with pytest.raises(ValueError, match="cannot parse caption") as e:
        parse_caption(bad)
    assert "gravel" in str(e.value) and "orange" in str(e.value)


def test_fitted_ink_floor_is_a_background_level():
    stats = fit_adherence()
    # The brightest background pixel is a texture at full grey, at most TEXTURE_GAIN by construction.
    assert 0.2 < stats.ink_floor <= TEXTURE_GAIN
    assert stats.centroids.shape == (len(BACKGROUNDS), stats.scale.shape[0])
    assert stats.centroids[0].abs().max() < 1e-3  # "plain" is black: no brightness, no grain


def test_real_held_out_images_score_high(test_set):
    res = prompt_adherence(test_set.images, test_set.captions)
    assert res["n"] == len(test_set) == 500
    # Measured: digit 0.984 (the classifier's own MNIST test accuracy is 0.986), colour 1.0, background 0.994.
    assert res["digit_acc"] >= 0.95 and res["color_acc"] >= 0.95 and res["background_acc"] >= 0.95
    assert res["all_acc"] >= 0.95


@pytest.mark.parametrize("attr, shift", [("digit", {"digit_shift": 3}), ("color", {"color_shift": 1}),
                                         ("background", {"background_shift": 1})])
def test_a_wrong_attribute_scores_low_on_that_attribute_only(test_set, attr, shift):
    res = prompt_adherence(test_set.images, recaption(test_set, **shift))
    assert res[f"{attr}_acc"] <= 0.05 and res["all_acc"] <= 0.05
    for other in {"digit", "color", "background"} - {attr}:
        assert res[f"{other}_acc"] >= 0.95


def test_shuffled_captions_score_near_chance(test_set):
    perm = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))
    res = prompt_adherence(test_set.images, [test_set.captions[i] for i in perm])
    # chance of all three right is 1/10 * 1/8 * 1/4 = 0.3%; allow sampling noise
    assert res["all_acc"] <= 0.03 and res["color_acc"] <= 0.3 and res["digit_acc"] <= 0.3


def test_colour_survives_dimming_and_blur(test_set):
    x01 = (test_set.images[:200] + 1) / 2
    dim = x01 * 0.7 * 2 - 1  # ink at 70% brightness: yellow (0.7, 0.7, 0) must not become orange
    blur = F.avg_pool2d(F.pad(test_set.images[:200], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    for x in (dim, blur):
        got = predict_attributes(x)["color"]
        assert (got == test_set.color_idx[:200]).double().mean() >= 0.95


def test_bad_inputs(test_set):
    with pytest.raises(ValueError, match="one caption per image"):
        prompt_adherence(test_set.images[:3], test_set.captions[:2])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        prompt_adherence(test_set.images[:2, :1], test_set.captions[:2])
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        prompt_adherence(test_set.images[:2] * 255, test_set.captions[:2])
