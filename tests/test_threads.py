"""The command line's thread count on a shared machine (device.safe_num_threads and friends): the rule on given
loads, /proc/stat read and differenced, OMP_NUM_THREADS obeyed, and main() changing threads only as a program."""
import pytest
import torch

from ldm_scratch import device

STAT = "cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cores, busy, want", [
    (2, None, 2),      # unknown: torch's default, every core
    (2, 0.0, 2), (2, 0.2, 2),          # idle (a little background noise)
    (2, 0.8, 1), (2, 1.0, 1),          # one core taken by another run: 2 threads would spin against it
    (2, 2.0, 1), (2, 3.5, 1),          # fully loaded: still one thread, never zero
    (8, 3.2, 5), (8, 2.8, 5), (16, 0.0, 16),
])
def test_safe_num_threads_is_the_free_cores(cores, busy, want):
    assert device.safe_num_threads(cores, busy) == want


def test_busy_cores_differences_two_reads_of_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(STAT.format(busy=1000, idle=9000))
    monkeypatch.setattr(device.os, "cpu_count", lambda: 2)

    def sleep(_):  # between the two reads: 300 busy and 300 idle jiffies pass, so half of 2 cores was busy
        stat.write_text(STAT.format(busy=1300, idle=9300))
    monkeypatch.setattr(device.time, "sleep", sleep)
    assert device.busy_cores(path=str(stat)) == pytest.approx(1.0)
    assert device.busy_cores(path=str(tmp_path / "missing")) is None       # not Linux: unknown
    (tmp_path / "bad").write_text("intr 1 2 3\n")
    assert device.busy_cores(path=str(tmp_path / "bad")) is None


def test_set_safe_num_threads_obeys_omp_and_lowers_only(monkeypatch, keep_threads, capsys):
    monkeypatch.setattr(device, "busy_cores", lambda: 1.6)
    monkeypatch.setattr(device.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert device.set_safe_num_threads() is None and torch.get_num_threads() == 2   # the user decided
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert device.set_safe_num_threads() == 1 and torch.get_num_threads() == 1
    assert "using 1 torch thread(s): 1.6 of 2 cores were busy" in capsys.readouterr().out
    monkeypatch.setattr(device, "busy_cores", lambda: 0.0)
    assert device.set_safe_num_threads() == 2 and torch.get_num_threads() == 1        # never raised above torch's


def test_main_sets_threads_only_when_run_as_a_program(monkeypatch, keep_threads):
    from ldm_scratch.__main__ import main
    calls = []
    monkeypatch.setattr(device, "set_safe_num_threads", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        main(["train-autoencoder", "--preset", "huge"])            # an argv: tests and Python callers
    assert calls == []
    with pytest.raises(SystemExit):
        main(["train-autoencoder", "--preset", "huge"], threads=True)
    assert calls == []  # argparse refused the flags first: a bad command line costs no measurement
    monkeypatch.setattr("sys.argv", ["ldm_scratch", "course", "check", "/no/such.ipynb"])
    assert main() == 2 and calls == [1]                              # as a program: measured, then the command


@pytest.mark.parametrize("bf16", [True, False])
def test_describe_machine_names_the_precision_auto_picks_and_why(monkeypatch, bf16):
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: bf16)
    monkeypatch.setattr(device, "cpu_name", lambda: "Test CPU 9000")
    line = device.describe_machine("cpu")
    assert "Test CPU 9000" in line and f"{torch.get_num_threads()} torch threads" in line
    assert f"precision auto -> {'bf16' if bf16 else 'fp32'}" in line
    assert ("native bf16 instructions" if bf16 else "no native bf16") in line


def test_cpu_name_is_a_non_empty_string():
    assert isinstance(device.cpu_name(), str) and device.cpu_name()
