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
     rf"1-SSIM\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}[^\n]*?{NUM}/8, {NUM}/8",
     rf"\| 1 - SSIM \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| [^|]+\| {NUM}/8 \| {NUM}/8 \|"),
    ("02_perceptual_adversarial",
     rf"perceptual \(default\)\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}[^\n]*?{NUM}/8, {NUM}/8",
     rf"\| default net \(`perceptual_default.pt`\) \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| [^|]+\| {NUM}/8 \| {NUM}/8 \|"),
    ("02_perceptual_adversarial",
     rf"perceptual \(random net\)\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}[^\n]*?{NUM}/8, {NUM}/8",
     rf"\| same architecture, random weights \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| [^|]+\| {NUM}/8 \| {NUM}/8 \|"),
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
     rf"FID DiT {NUM} vs U-Net\s+{NUM}"),
    ("05_latent_diffusion",
     rf"64x64x4: 48x the elements, {NUM}x the FLOPs per step",
     rf"small-latent` U-Net: {NUM}x with"),
    ("05_latent_diffusion",
     rf"as a real pixel U-Net would be built\): {NUM}x the FLOPs",
     rf"self-attention at every level, {NUM}x with attention only"),
    ("05_latent_diffusion",
     rf"\+ decode:\s+\S+ TFLOPs \({NUM}x less",
     rf"30 guided pixel steps cost {NUM}x the FLOPs"),
    # notebook 09: img2img at 0.4 and 0.6, the inversion round trips, inpainting's kept half
    ("09_editing",
     rf"\n\s+0\.4\s+{NUM} / {NUM} / {NUM}\s+{NUM} / {NUM} / {NUM}\n\s+0\.5[^\n]*\n\s+0\.6\s+{NUM} / {NUM} / {NUM}\s+"
     rf"{NUM} / {NUM} / {NUM}",
     rf"\| DDPM \(DDIM\) \| [^|]+\| [^|]+\| {NUM} / {NUM} \| {NUM} / {NUM} \|[\s\S]*?"
     rf"\| flow \(Euler\) \| [^|]+\| [^|]+\| {NUM} / {NUM} \| {NUM} / {NUM} \|"),
    ("09_editing",
     rf"guidance 1:\n\s+steps\s+ddpm\s+flow\n\s+5\s+{NUM}\s+{NUM}\n\s+10\s+{NUM}\s+{NUM}\n\s+25\s+{NUM}\s+"
     rf"{NUM}\n\s+50\s+{NUM}\s+{NUM}\n\s+100\s+{NUM}\s+{NUM}",
     rf"\| DDPM \(DDIM\) \| {NUM} \| {NUM} \| {NUM} \| \*\*{NUM}\*\* \| {NUM} \|[\s\S]*?"
     rf"\| flow \(Euler\) \| {NUM} \| {NUM} \| {NUM} \| \*\*{NUM}\*\* \| {NUM} \|"),
    ("09_editing",
     rf"\n\s+2\s+{NUM}\s+{NUM}\n\s+3\s+{NUM}\s+{NUM}\n\s+5\s+{NUM}\s+{NUM}",
     rf"\*\* \| [\d.]+ \| {NUM} \| {NUM} \| {NUM} \|\n\| flow[^\n]*\*\* \| [\d.]+ \| {NUM} \| {NUM} \| {NUM} \|"),
    ("09_editing",
     rf"autoencoder reconstruction {NUM}\nddpm: inpainted, decoder's rendering {NUM}[\s\S]*?label: {NUM}\n"
     rf"flow: inpainted, decoder's rendering {NUM}[\s\S]*?label: {NUM}[\s\S]*?right half blank: {NUM}",
     rf"is {NUM} \(DDPM\) / {NUM} \(flow\) in the decoder's rendering, against the\nautoencoder's own {NUM}"
     rf"[\s\S]*?label on {NUM} / {NUM} of them \({NUM} with"),    ("02_perceptual_adversarial",
     rf"perceptual \(contrastive\)\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}[^\n]*?{NUM}/8, {NUM}/8",
     rf"\| contrastive net \(`perceptual_contrastive.pt`\) \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| [^|]+\| {NUM}/8 \| {NUM}/8 \|"),
]
# README groups that name the same quantity in another order than the notebook prints it
ORDER = {4: (0, 2, 1),  # the ablation: the README lists adaLN-Zero, in-context, cross-attention
         # 09's img2img: the notebook prints (DDPM, flow) per strength, the README (0.4, 0.6) per objective; RMS / new
         10: (0, 1, 6, 7, 3, 4, 9, 10),
         # 09's round trips: the notebook prints (DDPM, flow) per step count, the README a row per objective
         11: (0, 2, 4, 6, 8, 1, 3, 5, 7, 9),
         12: (0, 2, 4, 1, 3, 5),
         # 09's inpainting: README: rendered DDPM, flow, autoencoder, then labels DDPM, flow, blank
         13: (1, 3, 0, 2, 4, 5)}


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
