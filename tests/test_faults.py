"""Nothing lost, nothing confusing: real training runs killed (SIGKILL, even mid-write) and Ctrl-C'd, then
resumed to the same weights; corrupt, mismatched or unsafe files; bad inputs at the stage-1/2 entry points;
NaN losses and gradients (with autograd's anomaly mode naming the op). Each fault must end in either an
exact resume or one clear error that names the file or value and says what was expected.

The kill test runs tests/fault_run.py (a tiny pixel DDPM through the Trainer) as a subprocess; the rest
runs in-process. Whole file: ~25 s on one core."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm_scratch.autoencoder import AutoencoderKL
from ldm_scratch.checkpoint import PAUSE_BEFORE_REPLACE_ENV, CheckpointError, atomic_torch_save, safe_torch_load
from ldm_scratch.config import AUTOENCODER_PRESETS, get_preset
from ldm_scratch.stage2 import generate, load_diffusion_model
from ldm_scratch.train import NonFiniteLossError, Trainer, TrainingInterrupted
from test_train import RegressionTask, cfg, regression_data

HELPER = Path(__file__).with_name("fault_run.py")
STEPS, EVERY = 12, 3  # 12 steps, a checkpoint every 3


def _load_helper():
    spec = importlib.util.spec_from_file_location("fault_run", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- killed and resumed runs
class Run:
    """One folder, several attempts at the same training run; `started` holds each attempt's steps."""

    def __init__(self, out: Path):
        self.out, self.started, self.proc = out, [], None

    def progress(self) -> list[int]:
        p = self.out / "progress.txt"
        return [int(s) for s in p.read_text().split()] if p.is_file() else []

    def start(self, *args: str, env: dict | None = None) -> None:
        self.before = len(self.progress())
        self.err = self.out.parent / f"attempt{len(self.started)}.err"
        full_env = {k: v for k, v in os.environ.items() if k != PAUSE_BEFORE_REPLACE_ENV}
        full_env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", **(env or {}))
        with open(self.err, "w") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, str(HELPER), str(self.out), str(STEPS), str(EVERY), *args],
                                         env=full_env, stdout=subprocess.DEVNULL, stderr=err)

    def wait_until(self, ready, what: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (status {self.proc.returncode}) before {what}:\n"
                            f"{self.err.read_text()[-2000:]}")
            if time.time() > end:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.01)

    def finish(self, sig: int | None = None) -> int:
        if sig is not None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.started.append(self.progress()[self.before:])
        return code

    def kill_leftover(self) -> None:
        """After a failed assertion: no stalled run may outlive the test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def checkpoint_step(self) -> int:
        """(a) what is on disk must load, whatever moment the kill hit."""
        state = safe_torch_load(self.out / "checkpoint.pt")
        assert len(state["history"]) == state["step"]
        return state["step"]


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path / "run")
    yield r
    r.kill_leftover()


def test_killed_and_interrupted_runs_resume_to_the_same_weights(tmp_path, run):
    # 1. SIGKILL in the middle of step 4: the step-3 checkpoint is what survives
    run.start("--hold", "4", "60")
    run.wait_until(lambda: 4 in run.progress(), "step 4")
    assert run.finish(signal.SIGKILL) == -signal.SIGKILL
    assert run.checkpoint_step() == 3
    # 2. SIGKILL inside the checkpoint write at step 6, after the temporary file is complete and before
    #    os.replace: the old checkpoint is untouched and the leftover temporary file is harmless
    flag = tmp_path / "paused"
    run.start("--resume", env={PAUSE_BEFORE_REPLACE_ENV: str(flag)})
    run.wait_until(flag.is_file, "the paused checkpoint write")
    assert flag.read_text().endswith("checkpoint.pt")
    assert run.finish(signal.SIGKILL) == -signal.SIGKILL
    leftovers = list(run.out.glob(".checkpoint.pt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert run.checkpoint_step() == 3
    # 3. Ctrl-C during step 7: the step finishes, is checkpointed, and the run says how to resume
    run.start("--resume", "--hold", "7", "3.0")  # 3 s: ample time for the signal to land inside step 7
    run.wait_until(lambda: 7 in run.progress()[run.before:], "step 7")
    assert run.finish(signal.SIGINT) == 130
    ckpt = run.out / "checkpoint.pt"
    assert f"interrupted at step 8; checkpoint saved to {ckpt}; resume with --resume" in run.err.read_text()
    assert run.checkpoint_step() == 8
    assert not list(run.out.glob("*.tmp")) and not list(run.out.glob(".*.tmp"))  # the leftover was cleared
    # 4. resume to the end
    run.start("--resume")
    assert run.finish() == 0, run.err.read_text()[-2000:]
    assert run.checkpoint_step() == STEPS

    # (c) each attempt restarted from the last checkpoint: at most one interval of work redone
    done, report = -1, []
    for i, steps in enumerate(run.started):
        redone = done + 1 - steps[0]
        report.append(f"attempt {i + 1}: steps {steps[0]}..{steps[-1]} ({len(steps)} started, {redone} redone)")
        assert 0 <= redone <= EVERY and steps == list(range(steps[0], steps[-1] + 1))
        done = max(done, steps[-1])
    print("\n".join(report))
    assert [s[0] for s in run.started] == [0, 3, 3, 8]

    # (b) the same weights, EMA, log and samples as a run that was never interrupted
    threads = torch.get_num_threads()
    try:
        task, trainer = _load_helper().build(tmp_path / "ref", STEPS, EVERY)
        ref_hist = trainer.fit()
        ref_model = task.finish(tmp_path / "ref", trainer.ema, step=STEPS, grid=False)
    finally:
        torch.set_num_threads(threads)
    got, ref = safe_torch_load(ckpt), safe_torch_load(tmp_path / "ref" / "checkpoint.pt")
    assert got["history"] == ref_hist == ref["history"]
    for part in ("unet",):
        for k, v in ref["modules"][part].items():
            assert torch.equal(v, got["modules"][part][k]), k
    for k, v in ref["ema"].items():
        assert torch.equal(v, got["ema"][k]), k
    samples = []
    for folder in (run.out / "model", ref_model):
        unet, diffusion, _ = load_diffusion_model(folder)
        samples.append(generate(unet, diffusion, torch.arange(3), num_steps=2,
                                generator=torch.Generator().manual_seed(5), precision="fp32"))
    assert torch.equal(*samples)


# ----------------------------------------------------------------------------- Ctrl-C, in-process
class InterruptingTask(RegressionTask):
    """Sends itself SIGINT during step `at` (`times` of them), as a Ctrl-C in the terminal would."""

    def __init__(self, at: int, times: int = 1):
        super().__init__()
        self.at, self.times = at, times

    def loss(self, name, batch, step):
        if step == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
        return super().loss(name, batch, step)


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler for the test, as in a terminal: pytest-xdist's workers ignore SIGINT, and the
    trainer (rightly) leaves an ignored SIGINT alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, ctrl_c_raises):
    full = Trainer(RegressionTask(), cfg(steps=8), regression_data(), tmp_path / "full").fit()
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as err:
        Trainer(InterruptingTask(at=4), cfg(steps=8, ckpt_every=3), regression_data(), tmp_path / "b").fit()
    path = tmp_path / "b" / "checkpoint.pt"
    assert str(err.value) == f"interrupted at step 5; checkpoint saved to {path}; resume with --resume"
    assert err.value.step == 5 and safe_torch_load(path)["step"] == 5  # step 4 (0-based) was completed
    assert signal.getsignal(signal.SIGINT) is handler  # the usual Ctrl-C is back after fit
    assert Trainer(RegressionTask(), cfg(steps=8), regression_data(), tmp_path / "b").fit(resume=True) == full


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, ctrl_c_raises):
    with pytest.raises(KeyboardInterrupt) as err:
        Trainer(InterruptingTask(at=4, times=2), cfg(steps=8, ckpt_every=3), regression_data(), tmp_path).fit()
    assert type(err.value) is KeyboardInterrupt  # not TrainingInterrupted: nothing was saved
    assert safe_torch_load(tmp_path / "checkpoint.pt")["step"] == 3


# ----------------------------------------------------------------------------- files
class Evil:
    """Unpickling this would call os.system: what weights_only=True exists to refuse."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def tiny_ae_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(get_preset(AUTOENCODER_PRESETS, "tiny")).save_pretrained(tmp_path / "ae")
    return tmp_path / "ae"


def edit_config(folder: Path, change) -> None:
    d = json.loads((folder / "config.json").read_text())
    change(d["config"])
    (folder / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("fault, message", [
    ("pickle_code", r"model\.pt: refused to load: it names code to run while loading \((posix|os)\.system\)"),
    ("missing_weights", r"model\.pt: file not found"),
    ("bad_json", r"config\.json: not valid JSON"),
    ("unknown_field", r"config\.json.*unknown field\(s\) \['chanels'\].*valid fields"),
    ("wrong_type", r"config\.json.*field 'z_channels'.*should be like 4, got '4'"),
    ("no_scale_factor", r"config\.json.*no 'scale_factor'"),
    ("missing_field", r"(?s)model\.pt: the weights do not match the config.*shape mismatch"),  # ch falls back to 64
])
def test_broken_model_folders_name_the_file_and_the_mismatch(tmp_path, fault, message):
    folder = tiny_ae_folder(tmp_path)
    if fault == "pickle_code":
        atomic_torch_save({"conv.weight": torch.zeros(1), "x": Evil()}, folder / "model.pt")
    elif fault == "missing_weights":
        (folder / "model.pt").unlink()
    elif fault == "bad_json":
        (folder / "config.json").write_text((folder / "config.json").read_text()[:40])  # a cut-off write
    elif fault == "unknown_field":
        edit_config(folder, lambda c: c.update(chanels=3))
    elif fault == "wrong_type":
        edit_config(folder, lambda c: c.update(z_channels="4"))
    elif fault == "no_scale_factor":
        edit_config(folder, lambda c: c.pop("scale_factor"))
    elif fault == "missing_field":
        edit_config(folder, lambda c: c.pop("ch"))
    with pytest.raises(CheckpointError, match=message):
        AutoencoderKL.from_pretrained(folder)


def test_broken_or_foreign_checkpoints_refuse_to_resume(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: no checkpoint to resume from.*drop --resume"):
        Trainer(RegressionTask(), cfg(), regression_data(), tmp_path).fit(resume=True)
    Trainer(RegressionTask(), cfg(steps=2), regression_data(), tmp_path).fit()
    ckpt = tmp_path / "checkpoint.pt"
    state = safe_torch_load(ckpt)
    # another config: a wider model cannot take these weights; the error names the module and the shapes
    wide = RegressionTask(d=6)
    wide_data = torch.utils.data.TensorDataset(torch.zeros(16, 6), torch.zeros(16))
    mismatch = r"(?s)checkpoint\.pt \[model\]: the weights do not match.*weight: file \(1, 4\) vs model \(1, 6\)"
    with pytest.raises(CheckpointError, match=mismatch):
        Trainer(wide, cfg(steps=4), wide_data, tmp_path).fit(resume=True)
    # a model folder's model.pt (weights only) is not a training checkpoint
    atomic_torch_save(state["modules"]["model"], ckpt)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: not a training checkpoint.*model\.pt holds weights"):
        Trainer(RegressionTask(), cfg(steps=4), regression_data(), tmp_path).fit(resume=True)
    # a checkpoint that would run code on loading is refused before anything runs
    atomic_torch_save({**state, "task_config": Evil()}, ckpt)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: refused to load.*system"):
        Trainer(RegressionTask(), cfg(steps=4), regression_data(), tmp_path).fit(resume=True)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("x, message", [
    (torch.full((1, 3, 16, 16), 255.0), r"expected \[-1, 1\], got values up to 255: divide by 127\.5 and subtract 1"),
    (torch.full((1, 3, 16, 16), 255, dtype=torch.uint8), r"got dtype torch\.uint8: divide by 127\.5 and subtract 1"),
    (torch.full((1, 3, 16, 16), 1.5), r"expected \[-1, 1\], got values up to 1\.5$"),
    (torch.full((1, 3, 16, 16), -3.0), r"expected \[-1, 1\], got values down to -3$"),
    (torch.full((1, 3, 16, 16), float("nan")), r"768 NaN/inf value\(s\)"),
    (torch.zeros(1, 3, 16, 16).index_fill_(3, torch.tensor([0]), float("-inf")),  # one column of -inf
     r"48 NaN/inf value\(s\) in shape \(1, 3, 16, 16\)"),
])
def test_encode_refuses_pixels_in_the_wrong_range_or_not_finite(x, message):
    model = AutoencoderKL(get_preset(AUTOENCODER_PRESETS, "tiny"))
    with pytest.raises(ValueError, match=message):
        model.encode(x)


def test_encode_accepts_resampling_overshoot():
    model = AutoencoderKL(get_preset(AUTOENCODER_PRESETS, "tiny"))
    assert model.encode(torch.full((1, 3, 16, 16), 1.05)).mean.shape == (1, 4, 4, 4)


def test_empty_data_is_refused_before_training(tmp_path):
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0))
    with pytest.raises(ValueError, match="the data has 0 items, fewer than one batch of 8"):
        Trainer(RegressionTask(), cfg(), empty, tmp_path)


# ----------------------------------------------------------------------------- NaN
class NanGradientTask(RegressionTask):
    """A finite loss whose gradient is NaN at step `at`: the length of a zero vector, sqrt(sum(d^2)),
    has d/dd = d / |d| = 0/0. Only the backward pass shows it; anomaly mode says which op."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def loss(self, name, batch, step):
        loss, logs = super().loss(name, batch, step)
        if step == self.at:
            d = self.model.weight - self.model.weight.detach()  # zeros, but connected to the weights
            loss = loss + d.pow(2).sum().sqrt()
        return loss, logs


def test_nan_gradient_stops_with_the_step_terms_and_a_hint(tmp_path):
    Trainer(RegressionTask(), cfg(steps=2, ckpt_every=1), regression_data(), tmp_path).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(model_grad_norm\).*mse=.*--detect-anomaly"):
        Trainer(NanGradientTask(at=3), cfg(steps=6, ckpt_every=2), regression_data(), tmp_path).fit(resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # step 2's: no checkpoint after a NaN


def test_anomaly_mode_names_the_op_and_the_line_that_made_the_nan(tmp_path):
    Trainer(RegressionTask(), cfg(steps=2, ckpt_every=1), regression_data(), tmp_path).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(NonFiniteLossError) as err:
        Trainer(NanGradientTask(at=2), cfg(steps=6, ckpt_every=1, detect_anomaly=True), regression_data(),
                tmp_path).fit(resume=True)
    msg = str(err.value)
    assert "step 2" in msg and "PowBackward0" in msg and "mse=" in msg
    assert "test_faults.py" in msg and "d.pow(2).sum().sqrt()" in msg  # the forward line of the bad op
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not torch.is_anomaly_enabled()  # anomaly mode (slow) is on only inside fit


def test_garbage_bytes_give_checkpoint_error(tmp_path):
    """torch's weights-only unpickler raises IndexError on some garbage; the user sees a CheckpointError."""
    from ldm_scratch.checkpoint import CheckpointError, safe_torch_load
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80garbage{")
    with pytest.raises(CheckpointError, match="model.pt: corrupt or truncated"):
        safe_torch_load(bad)
