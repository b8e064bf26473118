"""Saving and loading, so that long runs lose nothing and broken files say what is wrong.

A model is a folder: `config.json` (everything needed to rebuild it, `scale_factor` included) and
`model.pt` (a state_dict, loaded with `weights_only=True`, so a file that needs arbitrary code is
refused). Every write goes to a temporary file in the same folder, is flushed to disk, then
`os.replace`d over the target: a crash mid-write leaves the previous file intact, plus at worst a
`.NAME.*.tmp` file, which is harmless (never read) and which Trainer.fit removes on the next start.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint or model folder that is missing, corrupt, or does not match its config."""


# Fault injection for tests/test_faults.py: with this variable set to a file path, the first atomic write
# of the process stops after its temporary file is complete and before os.replace, writes the target's
# path into that file and sleeps, so that a test can kill the process at exactly that moment.
PAUSE_BEFORE_REPLACE_ENV = "LDM_TEST_PAUSE_BEFORE_REPLACE"
_PAUSE_SECONDS = 60.0  # far longer than the test needs to notice the flag and kill
_paused = False


def _test_pause_before_replace(target: Path) -> None:
    global _paused
    flag = os.environ.get(PAUSE_BEFORE_REPLACE_ENV)
    if flag and not _paused:
        _paused = True
        Path(flag).write_text(str(target))
        time.sleep(_PAUSE_SECONDS)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file + fsync + os.replace (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a saved model should be readable like any file
        _test_pause_before_replace(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed atomic writes of `path` left behind; returns them.
    Only for a folder no other process is writing to (a run folder at the start of training)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_json_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; every failure becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (an interrupted write?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; the line that matters names the code the file asks for
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names code to run while loading ({found.group(1)})" if found else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: refused to load: {what}; a checkpoint may hold only tensors and plain "
                              f"data (weights_only=True), which is all ldm_scratch ever writes") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, KeyError, ValueError) as e:
        # IndexError/KeyError: torch's weights-only unpickler on some garbage bytes (e.g. b"\x80garbage{")
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def rng_state() -> dict:
    """Every RNG the loop touches, as tensors and plain data (so weights_only loading accepts it)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches (no partial loads)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: expected a state_dict (a dict of tensors)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source}: the weights do not match the config (were they saved from another config?)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:8])}{more}")
        raise CheckpointError("\n".join(lines))


def save_model_folder(folder: str | os.PathLike, model: nn.Module, config: dict) -> None:
    """Write config.json and model.pt into `folder` (weights first, config last; both atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "model.pt")
    atomic_json_save(config, folder / "config.json")


def load_model_folder(folder: str | os.PathLike, build: Callable[[dict], nn.Module],
                      map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from `folder`: build(config_dict) -> module, then load and check model.pt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    config = read_json(folder / "config.json")
    try:
        model = build(config)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot build the model: {e}") from None
    state = safe_torch_load(folder / "model.pt", map_location)
    check_state_dict(model, state, str(folder / "model.pt"))
    model.load_state_dict(state)
    return model, config
