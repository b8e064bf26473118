"""The course kit (ldm_scratch/course.py, cli/course.py): solutions pass, stubs and wrong formulas fail, the
committed student notebooks are what `course build` writes, and `course check` reports per exercise.

Cheap on purpose: each exercise's solution cell is run on its own (exec of the cell's source with the few
names its definition needs), never the whole notebook (tests/test_notebooks.py runs those in quick mode).
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.cli import course as cli
from ldm_scratch.course import EXERCISES, CheckFailed, check, grade, record

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def solution_cells() -> dict[str, tuple[str, str]]:
    """exercise name -> (notebook stem, the solution cell's source), read from the solution notebooks."""
    cells = {}
    for stem in cli.COURSE_NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
        for c in nb.cells:
            meta = c.metadata.get("nbgrader", {})
            if meta.get("solution"):
                assert cli.BEGIN in c.source and cli.END in c.source, c.source
                cells[meta["grade_id"].removeprefix("ex_")] = (stem, c.source)
    return cells


CELLS = solution_cells()


def define(source: str):
    """Exec one exercise cell in isolation; return the function it defines."""
    namespace = {"torch": torch, "math": math, "F": F, "AutoencoderKL": AutoencoderKL}
    exec(source, namespace)
    (fn,) = [v for k, v in namespace.items() if k.startswith("my_") and callable(v)]
    return fn


def test_every_exercise_is_marked_once_in_its_notebook():
    assert sorted(CELLS) == sorted(EXERCISES)
    for name, (stem, _) in CELLS.items():
        assert EXERCISES[name].notebook == stem
    for stem in cli.COURSE_NOTEBOOKS:  # each solution cell is followed by its check cell
        nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
        for i, c in enumerate(nb.cells):
            if c.metadata.get("nbgrader", {}).get("solution"):
                name = c.metadata["nbgrader"]["grade_id"].removeprefix("ex_")
                nxt = nb.cells[i + 1]
                assert nxt.metadata["nbgrader"]["grade"] and cli.exercises_in(nbformat.v4.new_notebook(
                    cells=[nxt]))[0][1] == name


@pytest.mark.parametrize("name", sorted(CELLS))
def test_solution_passes_its_check(name):
    result = grade(name, define(CELLS[name][1]))
    assert result.status == "passed", result.message


@pytest.mark.parametrize("name", sorted(CELLS))
def test_student_stub_is_not_attempted_and_carries_its_hint(name):
    stub = cli.stub_source(CELLS[name][1])
    assert cli.BEGIN not in stub and cli.END not in stub and "raise NotImplementedError(" in stub
    result = grade(name, define(stub))
    assert result.status == "not attempted" and result.message.startswith("hint: ")


def _wrong_posterior(x0, xt, t, betas, alpha_bar):
    ab_t, ab_prev, beta_t = alpha_bar[t], alpha_bar[t - 1], betas[t]
    mean = (ab_prev.sqrt() * beta_t / (1 - ab_t)) * x0 + ((1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t)) * xt
    return mean.float(), beta_t  # DDPM's other variance, sigma^2 = beta_t: right elsewhere, not the posterior's


def _ddim_no_sigma_in_direction(xt, eps, ab_t, ab_prev, eta=0.0, noise=None):
    x0 = (xt - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
    return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps + (sigma * noise if sigma > 0 else 0)


def _scale_from_modes(ae, images, generator, batch_size=64):
    with torch.no_grad():
        return 1.0 / torch.cat([ae.encode(x).mode() for x in images.split(batch_size)]).double().std().item()


def _lpips_unnormalised(fxs, fys, ws):
    return sum((w * (fx - fy) ** 2).sum(1).mean((1, 2)) for fx, fy, w in zip(fxs, fys, ws))


def _patchify_channel_first(z, P):
    B, C, H, W = z.shape
    return z.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // P) * (W // P), -1)


def _unpatchify_h_w_swapped(tokens, P, h, w):
    B, N, D = tokens.shape
    C = D // (P * P)
    return tokens.reshape(B, w, h, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * P, w * P)


def _sincos_rows_first(D, h, w, quarter=True):
    k = D // 4 if quarter else D // 2
    omega = 10000.0 ** (-torch.arange(D // 4, dtype=torch.float64) / k)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    code = [torch.cat([torch.sin(p.flatten().double()[:, None] * omega), torch.cos(p.flatten().double()[:, None] * omega)],
                      1) for p in (xs, ys)]
    return torch.cat(code[::-1] if quarter else code, 1).float()


def _cross_attention_unmasked(m, x, context, mask):   # the padding mask forgotten
    return _cross_attention_by_hand(m, x, context, None, lambda C, d: d)


def _cross_attention_scaled_by_width(m, x, context, mask):   # sqrt(C) for sqrt(d): right with one head only
    return _cross_attention_by_hand(m, x, context, mask, lambda C, d: C)


def _cross_attention_two_heads(m, x, context, mask):   # the notebook layer's 2 heads hard-coded
    return _cross_attention_by_hand(m, x, context, mask, lambda C, d: d, heads=2)


def _cross_attention_by_hand(m, x, context, mask, scale_dim, heads=None):
    B, C, H, W = x.shape
    heads = heads or m.num_heads
    d = C // heads
    h = m.norm(x).flatten(2).transpose(1, 2)
    split = lambda t: t.view(B, t.shape[1], heads, d).transpose(1, 2)
    q, k, v = split(m.q(h)), split(m.k(context)), split(m.v(context))
    scores = q @ k.transpose(-1, -2) / math.sqrt(scale_dim(C, d))
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(-1)
    out = m.proj_out((weights @ v).transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)
    return x + out, weights


def _adaln_block_ungated(block, x, c):
    D = x.shape[-1]
    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
    x = x + block.attn(F.layer_norm(x, (D,), eps=1e-6) * (1 + scale1[:, None]) + shift1[:, None])
    return x + block.mlp(F.layer_norm(x, (D,), eps=1e-6) * (1 + scale2[:, None]) + shift2[:, None])


def _adaln_block_one_norm(block, x, c):  # the second sub-layer reads the first one's normalised input
    D = x.shape[-1]
    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
    h = F.layer_norm(x, (D,), eps=1e-6)
    x = x + gate1[:, None] * block.attn(h * (1 + scale1[:, None]) + shift1[:, None])
    return x + gate2[:, None] * block.mlp(h * (1 + scale2[:, None]) + shift2[:, None])


# One or two plausible mistakes per exercise; `True` marks one that only a hidden case catches.
WRONG = {
    "reparameterize": [(lambda m, lv, e: m + torch.exp(lv) * e, False)],            # var, not std
    "kl": [(lambda m, lv: (m ** 2 + lv.exp() - 1 - lv).sum((1, 2, 3)), False),      # no 1/2
           (lambda m, lv: 0.5 * (m ** 2 + lv.exp() - 1 - lv).mean((1, 2, 3)), False)],
    "lpips": [(_lpips_unnormalised, False)],
    "hinge_d_loss": [(lambda r, f: 0.5 * (F.relu(1 + r).mean() + F.relu(1 - f).mean()), False),
                     (lambda r, f: 0.5 * (F.relu(1 - r) + F.relu(1 + f)).mean(), True)],  # same-shape only
    "adaptive_weight": [
        (lambda nll, g, w, mx: torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
         / (torch.autograd.grad(g, w, retain_graph=True)[0].norm() + 1e-4), True),        # the clamp forgotten
        (lambda nll, g, w, mx: (torch.autograd.grad(g, w, retain_graph=True)[0].norm()
                                / torch.autograd.grad(nll, w, retain_graph=True)[0].norm()).clamp(0, mx), False)],
    "scale_factor": [(_scale_from_modes, False)],
    "q_sample": [(lambda x0, t, e, ab: ab[t].float().view(-1, 1, 1, 1) * x0
                  + (1 - ab[t].float().view(-1, 1, 1, 1)) * e, False)],                  # no square roots
    "q_posterior": [(_wrong_posterior, False)],
    "p_mean": [(lambda xt, t, e, b, ab: ((xt - b[t] / (1 - ab[t]) * e) / (1 - b[t]).sqrt()).float(), False)],
    "eps_loss": [(lambda model, x0, t, e, ab, y=None: ((e - model(x0, t, y)) ** 2).mean(), False),  # x0, not x_t
                 (lambda model, x0, t, e, ab, y=None: ((x0 - model(
                     ab[t].float().sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t].float()).sqrt().view(-1, 1, 1, 1) * e,
                     t, y)) ** 2).mean(), False)],                                                  # target x0
    "ddim_step": [(_ddim_no_sigma_in_direction, True),
                  (lambda xt, e, ab_t, ab_prev, eta=0.0, noise=None: math.sqrt(ab_prev / ab_t) * xt, False)],
    "guidance": [(lambda c, u, w: c + w * (c - u), False)],                          # Ho & Salimans' w, off by one
    "encode_latents": [(lambda ae, x: ae.encode(x).mode() / ae.scale_factor, False),  # the scaling inverted
                       (lambda ae, x: ae.encode(x).sample(torch.Generator().manual_seed(0)) * ae.scale_factor,
                        False)],                                                      # a sample, not the mode
    "decode_latents": [(lambda ae, z0, scale=None: ae.decode(z0 * ae.scale_factor).clamp(-1, 1), False),
                       (lambda ae, z0, scale=None: ae.decode(z0).clamp(-1, 1), False)],  # the scaling forgotten
    "patchify": [(_patchify_channel_first, False)],                                   # (c, p1, p2) inside a token
    "unpatchify": [(_unpatchify_h_w_swapped, True)],                                  # right for square grids only
    "sincos_2d": [(_sincos_rows_first, False),                                        # the row code first
                  (lambda D, h, w: _sincos_rows_first(D, h, w, quarter=False), False)],  # frequencies over D/2
    "modulate": [(lambda x, shift, scale: x * scale[:, None] + shift[:, None], False)],  # no "1 +"
    "adaln_block": [(_adaln_block_ungated, False), (_adaln_block_one_norm, False)],
    "drop_prompts": [(lambda ids, mask, drop, nid, nmask: (torch.where(drop[:, None], nid, ids), mask), False),
                     (lambda ids, mask, drop, nid, nmask: (torch.where(drop[:, None], ids, nid),
                                                           torch.where(drop[:, None], mask, nmask)), False)],  # inverted
    "cross_attention": [(_cross_attention_unmasked, False), (_cross_attention_scaled_by_width, False),
                        (_cross_attention_two_heads, True)],
    "flow_path": [(lambda x0, e, t: (t.view(-1, 1, 1, 1) * x0 + (1 - t.view(-1, 1, 1, 1)) * e, e - x0), False),
                  (lambda x0, e, t: ((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * e, x0 - e), False)],
    "shift_time": [(lambda u, s: s * u / (1 + (s + 1) * u), False),
                   (lambda u, s: 3.0 * u / (1 + 2.0 * u), True)],                  # SD3's 3 hard-coded
    "heun_step": [(lambda x, t, tn, vel: x + (tn - t) * vel(x, t), False),          # Euler
                  (lambda x, t, tn, vel: x + (tn - t) * (vel(x, t) + vel(x + (tn - t) * vel(x, t), tn)) / 2, True)],
    "ddim_invert_step": [(lambda x, e, ab_t, ab_next: math.sqrt(ab_t) * (x - math.sqrt(1 - ab_next) * e)
                          / math.sqrt(ab_next) + math.sqrt(1 - ab_t) * e, False),          # the sampler's step, not its inverse
                         (lambda x, e, ab_t, ab_next: math.sqrt(ab_next / ab_t) * x, False)],  # eps left out
    "inpaint_merge": [(lambda z, z0, e, m, ab: torch.where(m, math.sqrt(ab) * z0 + math.sqrt(1 - ab) * e, z), False),
                      (lambda z, z0, e, m, ab: torch.where(m, z, z0), False)],          # the kept part not noised
}


@pytest.mark.parametrize("name,k", [(n, k) for n in sorted(WRONG) for k in range(len(WRONG[n]))])
def test_a_wrong_formula_fails(name, k):
    fn, hidden_only = WRONG[name][k]
    result = grade(name, fn)
    assert result.status == "failed", result
    assert result.message.startswith("hidden check" if hidden_only else "visible check"), result.message


def test_every_exercise_has_a_wrong_formula_and_hidden_cases():
    assert sorted(WRONG) == sorted(EXERCISES)
    assert all(len(e.cases) >= 2 for e in EXERCISES.values())


def test_check_prints_records_raises_and_leaves_the_rng_alone(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results.json"
    monkeypatch.setenv("LDM_COURSE_RESULTS", str(results))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check("guidance", define(CELLS["guidance"][1]))
    assert torch.equal(torch.rand(3), expected)  # the checks drew from their own generators only
    with pytest.raises(CheckFailed):
        check("guidance", WRONG["guidance"][0][0])
    with pytest.raises(NotImplementedError):
        check("kl", define(cli.stub_source(CELLS["kl"][1])))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[PASS] guidance: passed") and out[1].startswith("[FAIL] guidance: failed (visible")
    assert out[2].startswith("[TODO] kl: not attempted (hint: ")
    assert [r["status"] for r in json.loads(results.read_text())] == ["passed", "failed", "not attempted"]
    with pytest.raises(ValueError, match="unknown exercise 'nope'; valid: reparameterize"):
        grade("nope", None)


def test_a_student_bug_of_any_kind_is_a_failed_check():
    result = grade("kl", lambda mean, logvar: mean.sum(dim=7))
    assert result.status == "failed" and "raised IndexError" in result.message


def test_stub_source_keeps_indent_and_falls_back_to_a_cell_hint():
    src = "def f(x):\n    # HINT: double it\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\nprint(1)"
    assert cli.stub_source(src) == ("def f(x):\n    # HINT: double it\n    # YOUR CODE HERE\n"
                                    "    raise NotImplementedError('hint: double it')\n\nprint(1)")
    with pytest.raises(ValueError, match="without"):
        cli.stub_source("### BEGIN SOLUTION\nx = 1")


def test_committed_student_notebooks_are_the_build_and_the_build_is_deterministic(tmp_path):
    first, second = cli.build(tmp_path / "a"), cli.build(tmp_path / "b")
    for a, b in zip(first, second):
        committed = NOTEBOOKS / "student" / a.name
        assert a.read_bytes() == b.read_bytes()
        assert committed.exists(), f"{committed} missing: run python -m ldm_scratch course build"
        assert committed.read_bytes() == a.read_bytes(), f"{committed} is stale: run python -m ldm_scratch course build"
        nb = nbformat.read(a, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code)
        assert not any(cli.BEGIN in c.source or "### END SOLUTION" in c.source for c in code)
        assert "widgets" not in nb.metadata


def test_course_check_prints_a_table_per_exercise(tmp_path, capsys):
    """End to end on a small notebook: one solved exercise, one stub, one wrong, one whose check cell breaks,
    and a demo cell that calls the unfinished stub."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in (
        "import torch\nfrom ldm_scratch.course import check",
        "def my_guided_eps(c, u, w):\n    return u + w * (c - u)\ncheck('guidance', my_guided_eps)",
        "def my_kl(mean, logvar):\n    raise NotImplementedError('hint: 1/2 sum(...)')\ncheck('kl', my_kl)",
        "check('reparameterize', lambda m, lv, e: m + lv.exp() * e)",
        "check('hinge_d_loss', undefined_name)",
        "my_kl(torch.zeros(1, 1), torch.zeros(1, 1))")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "mini.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(SystemExit) as e:
        cli.run_course(cli.argparse.Namespace(course_command="check", notebook=str(path), timeout=120))
    assert e.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    rows = {l.split()[0]: l for l in lines[2:-2]}
    assert "passed" in rows["guidance"]
    assert "not attempted" in rows["kl"] and "hint: 1/2 sum(...)" in rows["kl"]
    assert "failed" in rows["reparameterize"] and "visible check" in rows["reparameterize"]
    assert "error" in rows["hinge_d_loss"] and "NameError" in rows["hinge_d_loss"]
    assert lines[-2] == "1/4 passed"
    assert lines[-1] == "1 other cell(s) raised: cell 6: NotImplementedError: hint: 1/2 sum(...)"


def test_course_check_refuses_a_missing_notebook(tmp_path):
    with pytest.raises(ValueError, match="no such notebook"):
        cli.run_course(cli.argparse.Namespace(course_command="check", notebook=str(tmp_path / "x.ipynb"),
                                              timeout=10))


def test_record_without_the_env_var_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_COURSE_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    record(grade("guidance", lambda c, u, w: u + w * (c - u)))
    assert list(tmp_path.iterdir()) == []


def test_readme_table_lists_each_notebooks_exercises():
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    section = readme.split("## Course kit", 1)[1].split("\n## ", 1)[0]
    rows = [l for l in section.splitlines() if l.startswith("| `")]
    listed = {}
    for row in rows:
        stem, exercises = (cell.strip() for cell in row.strip("|").split("|"))
        listed[stem.strip("`")] = [w for w in exercises.split("`")[1::2]]
    expected = {}
    for name, e in EXERCISES.items():
        expected.setdefault(e.notebook, []).append(name)
    assert listed == expected
