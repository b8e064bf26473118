"""device.tune_malloc: glibc keeps freed memory for the next step (fixed mmap and trim thresholds), applied when
the package is imported unless LDM_MALLOC_TUNING=0; a no-op where it cannot or should not act."""
import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_scratch import device


class FakeLibc:
    def __init__(self, ok: int = 1):
        self.calls, self.ok = [], ok

        class Fn:
            argtypes = restype = None

            def __call__(fn, param, value):
                self.calls.append((param, value))
                return self.ok
        self.mallopt = Fn()


def test_tune_malloc_sets_both_thresholds_through_mallopt(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(device.sys, "platform", "linux")
    for k in device.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    assert device.tune_malloc() is True and device.malloc_tuned is True
    assert libc.calls == [(device.M_MMAP_THRESHOLD, 32 * 2 ** 20), (device.M_TRIM_THRESHOLD, 512 * 2 ** 20)]
    assert (-3, -1) == (device.M_MMAP_THRESHOLD, device.M_TRIM_THRESHOLD)  # malloc.h's numbers


@pytest.mark.parametrize("case", ["not linux", "user env", "no libc", "mallopt refuses"])
def test_tune_malloc_is_a_no_op_where_it_cannot_or_should_not_act(monkeypatch, case):
    libc = FakeLibc(ok=0 if case == "mallopt refuses" else 1)
    monkeypatch.setattr(device.sys, "platform", "darwin" if case == "not linux" else "linux")
    for k in device.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    if case == "user env":
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000000")  # the user's own tuning wins

    def cdll(name):
        if case == "no libc":
            raise OSError("libc.so.6: cannot open shared object file")
        return libc
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert device.tune_malloc() is False and device.malloc_tuned is False
    if case in ("not linux", "user env"):
        assert libc.calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("flag, expected", [("1", "True"), ("0", "None")])
def test_importing_the_package_tunes_malloc_unless_told_not_to(flag, expected):
    code = "import ldm_scratch, ldm_scratch.device as d; print(d.malloc_tuned)"
    env = {"PATH": "/usr/bin:/bin", "LDM_MALLOC_TUNING": flag}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == expected

