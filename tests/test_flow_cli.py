"""Two command-line details of rectified flow (issue #13): `sample --shift` on a flow pipeline, and `--resume`
refusing a checkpoint trained with another objective (cli/stage3.check_resume_objective), before any encoding."""
import pytest
import torch

from ldm_scratch.__main__ import main
from ldm_scratch.config import DiffusionConfig
from ldm_scratch.flow import FlowConfig, RectifiedFlow
from ldm_scratch.objectives import DDPMObjective
from ldm_scratch.pipeline import LatentDiffusionPipeline
from test_pipeline import make

AE = "ldm_scratch/weights/ae_mnist_f4"
LATENT = ["train-diffusion", "--space", "latent", "--autoencoder", AE, "--data", "mnist5k", "--steps", "2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flowcli")
    ddpm = make("class")
    ddpm.save_pretrained(folder / "ddpm")
    LatentDiffusionPipeline(ddpm.autoencoder, ddpm.denoiser, RectifiedFlow()).save_pretrained(folder / "flow")
    return folder


def test_sample_shift_reaches_a_flow_pipelines_sampler(saved, tmp_path, monkeypatch):
    seen = []
    call = LatentDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("shift"))
        return call(self, *args, **kwargs)
    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", spy)
    for extra in ([], ["--shift", "3"]):
        assert main(["sample", "--model", str(saved / "flow"), "--class-labels", "1", "2", "--num-images", "2",
                     "--steps", "3", "--precision", "fp32", *extra, "--out", str(tmp_path / "x.png")]) == 0
    assert seen == [None, 3.0]          # None: the shift saved with the model (RectifiedFlow.sample's default)


def test_the_shift_changes_a_flow_pipelines_samples(saved):
    pipe = LatentDiffusionPipeline.from_pretrained(saved / "flow")
    kw = dict(class_labels=[1, 2], num_inference_steps=3, output_type="tensor", precision="fp32")
    one = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(one, pipe(generator=torch.Generator().manual_seed(0), shift=1.0, **kw).images)
    assert not torch.equal(one, pipe(generator=torch.Generator().manual_seed(0), shift=3.0, **kw).images)


@pytest.mark.parametrize("model, shift, match", [
    ("ddpm", "3", r"--shift is for flow pipelines; this pipeline's objective is 'ddpm'"),
    ("flow", "0", r"--shift must be a finite number > 0"),
    ("flow", "nan", r"--shift must be a finite number > 0"),
])
def test_sample_shift_refusals_are_one_line(saved, tmp_path, capsys, model, shift, match):
    import re
    assert main(["sample", "--model", str(saved / model), "--steps", "2", "--shift", shift,
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(match, err), err


@pytest.mark.parametrize("saved_objective, flags, match", [
    (RectifiedFlow(), [], r"trained with --objective flow, not ddpm"),
    (DDPMObjective(), ["--objective", "flow"], r"trained with --objective ddpm, not flow"),
    (RectifiedFlow(FlowConfig(t_sampling="uniform")), ["--objective", "flow"],
     r"trained with --t-sampling uniform \(not logit_normal\)"),
    (DDPMObjective(DiffusionConfig(prediction="v")), [], r"trained with --prediction v \(not eps\)"),
])
def test_resume_with_another_objective_is_refused_before_encoding(tmp_path, capsys, saved_objective, flags, match):
    import re
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 2, "task_config": {"objective": saved_objective.to_dict()}}, out / "checkpoint.pt")
    assert main([*LATENT, *flags, "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(match, err), err
    assert not (out / "latents.pt").exists()                   # refused before the encoding


def test_an_old_checkpoint_without_an_objective_reads_as_ddpm(tmp_path):
    from ldm_scratch.cli.stage3 import check_resume_objective
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"task_config": {"diffusion": {"num_timesteps": 1000}}}, ckpt)   # saved before objectives
    check_resume_objective(ckpt, DDPMObjective())                               # the same: no error
    with pytest.raises(ValueError, match="--objective ddpm, not flow"):
        check_resume_objective(ckpt, RectifiedFlow())
