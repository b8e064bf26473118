"""Every number the README quotes from a notebook is the one the committed notebook prints.

Each claim pairs a pattern over a notebook's committed outputs (its teaching-mode run) with a pattern over
README.md; both capture the same quantities, and each README number must equal the notebook's to the digits the
README shows (a README may round; it may not differ). When a notebook is re-executed and its numbers move, this
test names the README line to update. Reads files only: nothing is executed.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def notebook_text(name: str) -> str:
    """All text a committed notebook printed (streams, results, errors), carriage-return bars resolved."""
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = "".join(out.get("text", ""))
            else:
                text = "".join(out.get("data", {}).get("text/plain", ""))
            parts.extend(line.split("\r")[-1] for line in text.split("\n"))
    return "\n".join(parts)


NUM = r"(-?[\d,]*\.?\d+)"
# (notebook, pattern over its outputs, pattern over README.md): the groups of the two correspond one to one.
CLAIMS = [
    ("02_perceptual_adversarial",
     rf"1-SSIM\s+{NUM}\s+{NUM}\s+{NUM}",
     rf"\| 1 - SSIM \| {NUM} \| {NUM} \| {NUM} \|"),
    ("02_perceptual_adversarial",
     rf"perceptual \(default\)\s+{NUM}\s+{NUM}\s+{NUM}",
     rf"\| ours, default net \(`perceptual_default.pt`\) \| {NUM} \| {NUM} \| {NUM} \|"),
    ("02_perceptual_adversarial",
     rf"perceptual \(random net\)\s+{NUM}\s+{NUM}\s+{NUM}",
     rf"\| same architecture, random weights \| {NUM} \| {NUM} \| {NUM} \|"),
    ("06_dit",
     rf"DiT-S /2\s+\S+\s+{NUM}[\s\S]*?DiT-B /2\s+\S+\s+{NUM}[\s\S]*?DiT-L /2\s+\S+\s+{NUM}[\s\S]*?"
     rf"DiT-XL/2\s+\S+\s+{NUM}",
     rf"Our DiT-S/B/L/XL at /2 measure {NUM} / {NUM} / {NUM}\s+/ {NUM} Gflops"),
    ("06_dit",
     rf"adaLN-Zero\s+[\d,]+\s+\S+\s+\S+\s+\S+\s+{NUM}\s[\s\S]*?cross-attn\s+[\d,]+\s+\S+\s+\S+\s+\S+\s+{NUM}\s"
     rf"[\s\S]*?in-context\s+[\d,]+\s+\S+\s+\S+\s+\S+\s+{NUM}\s",
     rf"adaLN-Zero {NUM}, in-context {NUM}, cross-attention {NUM} classifier-FID"),
    ("06_dit",
     rf"differs by {NUM}",
     rf"seed-to-seed spread of {NUM}"),
    ("06_dit",
     rf"FID DiT {NUM} vs U-Net {NUM}",
     rf"the DiT is ahead: FID {NUM} vs\s+{NUM}"),
    ("05_latent_diffusion",
     rf"64x64x4: 48x the elements, {NUM}x the FLOPs per step",
     rf"small-latent` U-Net: {NUM}x with"),
    ("05_latent_diffusion",
     rf"as a real pixel U-Net would be built\): {NUM}x the FLOPs",
     rf"self-attention at every level, {NUM}x with attention only"),
    ("05_latent_diffusion",
     rf"\+ decode:\s+\S+ TFLOPs \({NUM}x less",
     rf"30 guided pixel steps cost {NUM}x the FLOPs"),
]
# README groups that name the same quantity in another order than the notebook prints it
ORDER = {4: (0, 2, 1)}  # the ablation: the README lists adaLN-Zero, in-context, cross-attention


def as_float(s: str) -> float:
    return float(s.replace(",", ""))


def decimals(s: str) -> int:
    return len(s.split(".")[1]) if "." in s else 0


@pytest.mark.parametrize("i", range(len(CLAIMS)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CLAIMS)])
def test_readme_quotes_the_notebook(i):
    notebook, nb_pattern, readme_pattern = CLAIMS[i]
    nb_match = re.search(nb_pattern, notebook_text(notebook))
    assert nb_match, f"{notebook}: its outputs no longer print /{nb_pattern}/ (re-executed with other text?)"
    rd_match = re.search(readme_pattern, README)
    assert rd_match, f"README.md no longer has /{readme_pattern}/ (quoting {notebook})"
    nb_values = [nb_match.group(k + 1) for k in ORDER.get(i, range(len(nb_match.groups())))]
    for shown, printed in zip(rd_match.groups(), nb_values):
        tolerance = 0.5 * 10 ** -decimals(shown) + 1e-12
        assert abs(as_float(shown) - as_float(printed)) <= tolerance, (
            f"README quotes {shown} where notebook {notebook} prints {printed} ({readme_pattern})")


def test_a_wrong_number_would_be_caught():
    """The comparison is not vacuous: a README number off in its last digit fails it."""
    shown, printed = "541.46", "541.45"
    assert abs(as_float(shown) - as_float(printed)) > 0.5 * 10 ** -decimals(shown)
