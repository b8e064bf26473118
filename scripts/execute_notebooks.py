"""Execute notebooks in place, in teaching mode (the committed outputs) or quick mode (a check).

    python scripts/execute_notebooks.py notebooks/07_text_to_image.ipynb          # teaching mode, in place
    python scripts/execute_notebooks.py --quick notebooks/07_text_to_image.ipynb  # LDM_QUICK=1, not saved

Runs each notebook top to bottom in its folder with nbclient (as tests/test_notebooks.py does), gives any cell
without an id one (nbformat 4.5), and prints the wall time. A failing cell stops that notebook and is named.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--quick", action="store_true", help="LDM_QUICK=1 and do not save the outputs")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    os.environ["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    if args.quick:  # as the tests run them: no display, figures drawn and dropped
        os.environ["LDM_QUICK"], os.environ["MPLBACKEND"] = "1", "Agg"
    else:  # the kernel's inline backend, so the saved notebook keeps its figures (MPLBACKEND=Agg would drop them)
        os.environ.pop("LDM_QUICK", None)
        os.environ.pop("MPLBACKEND", None)
    for path in args.notebooks:
        if not path.is_file():
            print(f"no such notebook: {path}", file=sys.stderr)
            return 2
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if "id" not in cell:
                cell["id"] = os.urandom(4).hex()
        start = time.time()
        client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            print(f"{path}: a cell failed after {time.time() - start:.0f} s:\n{str(e)[-3000:]}", file=sys.stderr)
            return 1
        print(f"{path}: {time.time() - start:.0f} s ({'quick mode, not saved' if args.quick else 'teaching mode'})")
        if not args.quick:
            nbformat.write(nb, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
