"""`python -m ldm_scratch course build|check`: the course kit (student notebooks and their grading).

  build   notebooks/NN_*.ipynb (the solutions) -> notebooks/student/NN_*.ipynb: inside every code cell,
          each region between `### BEGIN SOLUTION` and `### END SOLUTION` (nbgrader's markers) becomes
          `raise NotImplementedError("<hint>")`, the hint taken from a `# HINT:` line of the region (else of the
          cell); every output, execution count and widget state is cleared. The same solutions give the
          same bytes (tests/test_course.py compares the committed copies with a fresh build).
  check   runs one notebook in quick mode (LDM_QUICK=1) in a scratch folder, with errors allowed so that
          every exercise gets its turn, and prints one row per exercise: passed, failed (the check's
          message), not attempted (the stub's NotImplementedError), or error (the check cell itself failed).

The checks themselves live in ldm_scratch/course.py; each check cell calls `check(name, my_function)`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ldm_scratch.cli import Command
from ldm_scratch.course import RESULTS_ENV

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
# The notebooks that carry solution markers: every chapter.
COURSE_NOTEBOOKS = ("01_autoencoder", "02_perceptual_adversarial", "03_latent_space", "04_ddpm",
                    "05_latent_diffusion", "06_dit", "07_text_to_image", "08_flow_matching", "09_editing")
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HINT = re.compile(r"#\s*HINT:\s*(.*)")
CHECK_CALL = re.compile(r"""check\(\s*["']([\w-]+)["']""")


def stub_source(source: str) -> str:
    """A cell's source with each solution region replaced by a stub that raises with the region's hint."""
    lines, out, i = source.split("\n"), [], 0
    cell_hints = [m.group(1).strip() for m in map(HINT.search, lines) if m]
    while i < len(lines):
        if lines[i].strip() != BEGIN:
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        j = i + 1
        while j < len(lines) and lines[j].strip() != END:
            j += 1
        if j == len(lines):
            raise ValueError(f"'{BEGIN}' without '{END}' in cell:\n{source}")
        hints = [m.group(1).strip() for m in map(HINT.search, lines[i + 1:j]) if m] or cell_hints
        hint = hints[0] if hints else "see the equation above"
        out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError({('hint: ' + hint)!r})"]
        i = j + 1
    return "\n".join(out)


def student_notebook(solution: Path):
    """The student's copy of a solution notebook (an nbformat NotebookNode)."""
    import nbformat
    nb = nbformat.read(solution, as_version=4)
    nb.metadata.pop("widgets", None)  # progress-bar state belongs to the outputs we clear
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps of the instructor's run
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        if BEGIN in cell.source:
            cell.source = stub_source(cell.source)
    return nb


def build(out_dir: Path = NOTEBOOKS / "student", names: tuple[str, ...] = COURSE_NOTEBOOKS) -> list[Path]:
    import nbformat
    missing = [n for n in names if not (NOTEBOOKS / f"{n}.ipynb").is_file()]
    if missing:  # e.g. a non-editable install: the notebooks live in the repository, not in the package
        raise ValueError(f"solution notebooks not found in {NOTEBOOKS}: {', '.join(missing)} "
                         "(run course build from a checkout of the repository)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = out_dir / f"{name}.ipynb"
        nbformat.write(student_notebook(NOTEBOOKS / f"{name}.ipynb"), path)
        written.append(path)
    return written


def exercises_in(nb) -> list[tuple[int, str]]:
    """(cell index, exercise name) of every check cell, in notebook order."""
    return [(i, m.group(1)) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for m in [CHECK_CALL.search(c.source)] if m]


def run_notebook(path: Path, timeout: int = 1200) -> tuple[list[dict], list[str]]:
    """Execute `path` in quick mode in a scratch folder: one row {exercise, status, message} per check cell,
    and 'cell i: Error: message' for every other cell that raised (in a student's copy, mostly the demo
    cells that call an unfinished exercise)."""
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="ldm_course_") as work:
        shutil.copy(path, Path(work) / path.name)  # its runs/ folders land in the scratch copy, not the repo
        results_file = Path(work) / "results.json"
        env = {"LDM_QUICK": "1", "MPLBACKEND": "Agg", RESULTS_ENV: str(results_file),
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                    resources={"metadata": {"path": work}}).execute()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        recorded = json.loads(results_file.read_text()) if results_file.exists() else []
    by_name = {r["name"]: r for r in recorded}  # a check run twice: its last result counts
    rows = []
    for i, name in exercises_in(nb):
        if name in by_name:
            r = by_name[name]
            rows.append({"exercise": name, "status": r["status"], "message": r["message"]})
            continue
        errors = [o for o in nb.cells[i].get("outputs", []) if o.output_type == "error"]
        message = f"{errors[0].ename}: {errors[0].evalue}" if errors else "the check cell did not run"
        rows.append({"exercise": name, "status": "error", "message": message})
    checks = {i for i, _ in exercises_in(nb)}
    others = [f"cell {i + 1}: {o.ename}: {o.evalue}" for i, c in enumerate(nb.cells)  # counted from 1
              if c.cell_type == "code" and i not in checks for o in c.get("outputs", []) if o.output_type == "error"]
    return rows, others


def format_table(rows: list[dict], others: list[str] = ()) -> str:
    width = max([len("exercise")] + [len(r["exercise"]) for r in rows])
    lines = [f"{'exercise':{width}s}  {'status':13s}  message", f"{'-' * width}  {'-' * 13}  {'-' * 7}"]
    lines += [f"{r['exercise']:{width}s}  {r['status']:13s}  {r['message']}" for r in rows]
    passed = sum(r["status"] == "passed" for r in rows)
    lines.append(f"{passed}/{len(rows)} passed")
    if others:  # one line each, cut short: the notebook itself has the tracebacks
        lines.append(f"{len(others)} other cell(s) raised: " + "; ".join(o.splitlines()[0][:100] for o in others[:3])
                     + ("; ..." if len(others) > 3 else ""))
    return "\n".join(lines)


def add_course(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="course_command", required=True, metavar="{build,check}")
    b = sub.add_parser("build", help="write notebooks/student/ from the solution notebooks")
    b.add_argument("--out", default=str(NOTEBOOKS / "student"), help="folder for the student notebooks")
    c = sub.add_parser("check", help="run a (student) notebook in quick mode and print a table per exercise")
    c.add_argument("notebook", help="path to an .ipynb, e.g. notebooks/student/04_ddpm.ipynb")
    c.add_argument("--timeout", type=int, default=1200, help="seconds per cell")


def run_course(args: argparse.Namespace) -> None:
    if args.course_command == "build":
        for path in build(Path(args.out)):
            print(f"wrote {path}")
        return
    path = Path(args.notebook)
    if not path.is_file() or path.suffix != ".ipynb":
        raise ValueError(f"{path}: no such notebook (expected an .ipynb file, e.g. notebooks/student/04_ddpm.ipynb)")
    rows, others = run_notebook(path, args.timeout)
    if not rows:
        raise ValueError(f"{path}: no check cells (check(\"name\", ...)) in this notebook")
    print(format_table(rows, others))
    if any(r["status"] != "passed" for r in rows):
        raise SystemExit(1)


COMMANDS: dict[str, Command] = {
    "course": (add_course, run_course, "the course kit: build the student notebooks, check a student's notebook"),
}
