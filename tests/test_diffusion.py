"""Tests for diffusion.py: the schedule, the forward process against closed forms and brute force, the loss,
both samplers (with oracle denoisers whose answers are known), classifier-free guidance, and parity with
diffusers' DDPMScheduler / DDIMScheduler. Stand-in denoisers are a few lines each, never the U-Net."""
import math

import pytest
import torch
from torch import nn

from ldm_scratch.config import DiffusionConfig
from ldm_scratch.diffusion import GaussianDiffusion, make_betas

T = 1000


@pytest.fixture(scope="module")
def gd():
    return GaussianDiffusion(DiffusionConfig())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class TinyDenoiser(nn.Module):
    """eps_pred = a * x + b * t/T + class shift (or context mean): a few parameters, every input matters."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.b = nn.Parameter(torch.tensor(-0.2))
        self.shift = nn.Parameter(torch.linspace(-1, 1, num_classes + 1))   # the last entry is the null class
        self.calls = []                                                     # batch size of every forward

    def forward(self, x, t, cond=None):
        self.calls.append(x.shape[0])
        out = self.a * x + self.b * (t.float() / T).view(-1, 1, 1, 1)
        if isinstance(cond, tuple):                                         # (context, mask (B, N) bool)
            ctx, mask = cond
            out = out + (ctx * mask[..., None]).mean(dim=(1, 2)).view(-1, 1, 1, 1)
        elif cond is not None and cond.dtype == torch.long:
            out = out + self.shift[cond].view(-1, 1, 1, 1)
        elif cond is not None:                                              # a context (B, N, D)
            out = out + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return out


def oracle_for(gd, x0):
    """A 'perfect' denoiser for a single known x0: the eps that explains x_t given x0 (or its v)."""
    def model(xt, t, cond=None):
        eps = gd.predict_eps_from_x0(xt, t, x0)
        return eps if gd.prediction == "eps" else gd.get_v(x0, eps, t)
    return model


# ------------------------------------------------------------------------------------------- schedule
def test_linear_betas(gd):
    assert gd.betas.shape == (T,) and gd.betas.dtype == torch.float32
    assert gd.betas[0].item() == pytest.approx(1e-4) and gd.betas[-1].item() == pytest.approx(0.02)
    assert (gd.betas[1:] > gd.betas[:-1]).all()
    betas64 = make_betas(DiffusionConfig())
    assert betas64.dtype == torch.float64
    # alpha_bar = cumprod(1 - beta), taken in float64 and rounded to float32 once.
    ab64 = torch.cumprod(1 - betas64, 0)
    torch.testing.assert_close(gd.alpha_bars, ab64.float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(gd.alpha_bars, torch.cumprod(gd.alphas, 0), rtol=1e-4, atol=1e-7)
    assert gd.alpha_bars_prev[0] == 1 and torch.equal(gd.alpha_bars_prev[1:], gd.alpha_bars[:-1])
    torch.testing.assert_close(gd.sqrt_alpha_bars ** 2 + gd.sqrt_one_minus_alpha_bars ** 2, torch.ones(T))


def test_cosine_schedule():
    cos = GaussianDiffusion(DiffusionConfig(schedule="cosine"))
    tt = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2   # noqa: E731  Nichol & Dhariwal Eq. 17
    expected = (f(tt) / f(torch.zeros(1, dtype=torch.float64))).float()
    ok = cos.betas < 0.999                           # where unclipped, alpha_bar follows Eq. 17 exactly
    torch.testing.assert_close(cos.alpha_bars[ok], expected[ok], rtol=1e-5, atol=1e-7)
    assert cos.betas.max() == pytest.approx(0.999)   # the final betas hit the clip
    assert (cos.betas[1:] >= cos.betas[:-1]).all()


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match="linear.*cosine"):
        GaussianDiffusion(DiffusionConfig(schedule="quadratic"))
    with pytest.raises(ValueError, match="eps"):
        GaussianDiffusion(DiffusionConfig(prediction="x0"))


# ------------------------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments_monte_carlo(gd, t):
    N = 200_000
    x0 = torch.full((N, 1, 1, 1), 0.7)
    xt = gd.q_sample(x0, torch.full((N,), t), generator=gen(1))
    ab = gd.alpha_bars[t].item()
    # Ho Eq. 4; tolerances are ~6 standard errors of the Monte-Carlo estimates.
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=6 * math.sqrt((1 - ab) / N))
    assert xt.var().item() == pytest.approx(1 - ab, rel=6 * math.sqrt(2 / N))


def test_q_sample_equals_composed_one_step_noising(gd):
    """Running q(x_s | x_{s-1}) = N(sqrt(alpha_s) x_{s-1}, beta_s) t+1 times lands on q(x_t | x0) in distribution."""
    N, t = 100_000, 300
    g = gen(2)
    x = torch.full((N,), -0.5)
    for s in range(t + 1):
        x = gd.alphas[s].sqrt() * x + gd.betas[s].sqrt() * torch.randn(N, generator=g)
    direct = gd.q_sample(torch.full((N, 1, 1, 1), -0.5), torch.full((N,), t), generator=g)
    assert x.mean().item() == pytest.approx(direct.mean().item(), abs=0.02)
    assert x.var().item() == pytest.approx(direct.var().item(), rel=0.02)
    assert x.var().item() == pytest.approx(1 - gd.alpha_bars[t].item(), rel=0.02)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_bayes_rule(gd, t):
    """q(x_{t-1} | x_t, x0) by multiplying two Gaussians in float64, independently of the package's formulas."""
    x0, xt = torch.tensor([0.3, -1.0]).view(2, 1, 1, 1), torch.tensor([1.2, 0.4]).view(2, 1, 1, 1)
    beta = make_betas(DiffusionConfig()).double()
    ab = torch.cumprod(1 - beta, 0)
    prior_mean, prior_var = ab[t - 1].sqrt() * x0.double(), 1 - ab[t - 1]          # q(x_{t-1} | x0)
    lik_scale, lik_var = (1 - beta[t]).sqrt(), beta[t]                             # q(x_t | x_{t-1})
    post_var = 1 / (1 / prior_var + lik_scale ** 2 / lik_var)
    post_mean = post_var * (prior_mean / prior_var + lik_scale * xt.double() / lik_var)
    mean, var, log_var = gd.q_posterior(x0, xt, t)
    torch.testing.assert_close(mean.double(), post_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double().flatten(), post_var.expand(1), rtol=1e-5, atol=0)
    # Ho Eq. 7: beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    assert var.item() == pytest.approx(((1 - ab[t - 1]) / (1 - ab[t]) * beta[t]).item(), rel=1e-5)
    assert log_var.item() == pytest.approx(math.log(var.item()), rel=1e-5)


def test_posterior_at_t0_is_x0_and_log_variance_is_clipped(gd):
    x0, xt = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    mean, var, log_var = gd.q_posterior(x0, xt, 0)
    torch.testing.assert_close(mean, x0)
    assert var.item() == 0 and math.isfinite(log_var.item())
    assert log_var.item() == pytest.approx(math.log(gd.posterior_variance[1].item()))


def test_x0_eps_and_v_round_trips(gd):
    x0, eps = torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5)
    t = torch.tensor([0, 7, 500, 999])
    xt = gd.q_sample(x0, t, eps)
    # exact up to float32 rounding of x_t, which 1 / sqrt(alpha_bar_999) ~ 158 amplifies to ~5e-5
    torch.testing.assert_close(gd.predict_x0_from_eps(xt, t, eps), x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(gd.predict_eps_from_x0(xt, t, x0), eps, rtol=0, atol=5e-5)
    v = gd.get_v(x0, eps, t)
    torch.testing.assert_close(gd.predict_x0_from_v(xt, t, v), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(gd.predict_eps_from_v(xt, t, v), eps, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_zero_model_and_oracle(prediction):
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    x0 = torch.rand(64, 1, 16, 16) * 2 - 1
    zero = d.loss(lambda xt, t, c: torch.zeros_like(xt), x0, generator=gen(3))
    assert zero.dim() == 0
    if prediction == "eps":                           # E||eps||^2 = 1 per element
        assert zero.item() == pytest.approx(1.0, abs=0.05)
    assert d.loss(oracle_for(d, x0), x0, generator=gen(3)).item() < 1e-6


def test_loss_reaches_the_model_and_is_deterministic(gd):
    model, x0 = TinyDenoiser(), torch.randn(8, 1, 4, 4)
    labels = torch.randint(0, 3, (8,))
    loss = gd.loss(model, x0, labels, generator=gen(4))
    loss.backward()
    assert model.a.grad is not None and model.shift.grad[:3].abs().sum() > 0
    assert gd.loss(model, x0, labels, generator=gen(4)).item() == loss.item()


# ------------------------------------------------------------------------------------------- reverse steps
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_p_sample_is_ho_eq11_plus_sigma_noise(gd, variance):
    model, xt, t = TinyDenoiser(), torch.randn(3, 1, 4, 4), 400
    eps = model(xt, torch.full((3,), t))
    alpha, beta, ab = gd.alphas[t], gd.betas[t], gd.alpha_bars[t]
    # Ho Eq. 11: mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps)
    eq11 = (xt - beta / (1 - ab).sqrt() * eps) / alpha.sqrt()
    mean = gd.p_sample(model, xt, t, variance=variance, noise=torch.zeros_like(xt))
    torch.testing.assert_close(mean, eq11, rtol=1e-5, atol=1e-5)
    z = torch.randn_like(xt)
    sigma2 = gd.betas[t] if variance == "beta" else gd.posterior_variance[t]
    torch.testing.assert_close(gd.p_sample(model, xt, t, variance=variance, noise=z), mean + sigma2.sqrt() * z)
    # no noise at t = 0: two different generators give the same answer
    assert torch.equal(gd.p_sample(model, xt, 0, generator=gen(1)), gd.p_sample(model, xt, 0, generator=gen(2)))


def test_ddim_eta1_all_steps_is_ddpm_step(gd):
    """With every timestep visited and eta = 1, DDIM's sigma^2 is beta_tilde and its step is DDPM's."""
    model, xt, z = TinyDenoiser(), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in [999, 500, 1, 0]:
        eps = model(xt, torch.full((2,), t))
        ddim = gd.ddim_step(eps, t, t - 1, xt, eta=1.0, noise=z)
        torch.testing.assert_close(ddim, gd.p_sample(model, xt, t, noise=z), rtol=1e-4, atol=1e-4)


def test_ddim_eta1_all_steps_is_ddpm_step_with_clipping(gd):
    """Regression: with clip_x0, DDIM (eta = 1, every step) must still be DDPM's clipped step. It was not while
    ddim_step kept the raw eps: the unclipped x0 leaked back through the direction term, so a pixel model
    whose x0 guesses at large t overshoot [-1, 1] sampled WORSE with more DDIM steps."""
    xt, z = 3 * torch.randn(2, 1, 4, 4, generator=gen(0)), torch.randn(2, 1, 4, 4, generator=gen(1))
    eps = 0.5 * xt                                  # x0 = x_t (1 - sqrt(1 - ab) / 2) / sqrt(ab): > 1 at t >= 300
    for t in [999, 700, 300, 1, 0]:
        x0 = gd.predict_x0_from_eps(xt, t, eps)
        assert t < 100 or x0.abs().max() > 1        # the clip really acts at the large t
        ddim = gd.ddim_step(eps, t, t - 1, xt, eta=1.0, noise=z, clip_x0=True)
        ddpm = gd.p_sample(lambda x, tt, c: eps, xt, t, noise=z, clip_x0=True)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-3, atol=1e-3)   # x_t ~ 3: float32 rounding


def test_ddim_timesteps(gd):
    assert gd.ddim_timesteps(50)[:2] == [980, 960] and gd.ddim_timesteps(50)[-1] == 0
    assert gd.ddim_timesteps(T) == list(range(T - 1, -1, -1))
    assert gd.ddim_timesteps(1) == [0] and gd.ddim_timesteps(1, "trailing") == [999]
    assert gd.ddim_timesteps(50, "trailing")[:2] == [999, 979]


# ------------------------------------------------------------------------------------------- samplers
def test_samplers_shape_and_determinism():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=50))
    model, shape = TinyDenoiser(), (2, 1, 4, 4)
    for sample in (lambda g: d.sample_ddpm(model, shape, generator=g, progress=False),
                   lambda g: d.sample_ddim(model, shape, num_steps=10, eta=0.5, generator=g, progress=False)):
        a, b, c = sample(gen(5)), sample(gen(5)), sample(gen(6))
        assert a.shape == shape and a.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("num_steps,eta,spacing", [(1, 0.0, "trailing"), (7, 0.0, "leading"), (50, 0.0, "leading"),
                                                   (50, 0.8, "trailing"), (T, 1.0, "leading")])
def test_ddim_with_oracle_recovers_x0(gd, num_steps, eta, spacing):
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    out = gd.sample_ddim(oracle_for(gd, x0), x0.shape, num_steps=num_steps, eta=eta, spacing=spacing,
                         generator=gen(7), progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_ddpm_with_oracle_recovers_x0():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=100, prediction="v"))
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    out = d.sample_ddpm(oracle_for(d, x0), x0.shape, generator=gen(8), progress=False, clip_x0=True)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------- guidance
def test_cfg_w1_is_one_conditional_forward(gd):
    model, xt, t = TinyDenoiser(), torch.randn(4, 1, 4, 4), torch.full((4,), 300)
    labels = torch.tensor([0, 1, 2, 0])
    eps = gd.guided_eps(model, xt, t, labels, None, 1.0)
    assert model.calls == [4] and torch.equal(eps, model(xt, t, labels))
    model.calls.clear()
    gd.sample_ddim(model, (4, 1, 4, 4), labels, num_steps=5, generator=gen(), progress=False)
    assert model.calls == [4] * 5


def test_cfg_batched_equals_two_forwards(gd):
    model, xt, t = TinyDenoiser(), torch.randn(4, 1, 4, 4), torch.full((4,), 300)
    labels, w = torch.tensor([0, 1, 2, 0]), 3.0
    guided = gd.guided_eps(model, xt, t, labels, 3, w)               # null class index = num_classes = 3
    assert model.calls == [8]                                        # ONE forward on [cond; null]
    e_c, e_u = model(xt, t, labels), model(xt, t, torch.full((4,), 3))
    torch.testing.assert_close(guided, e_u + w * (e_c - e_u))
    # a context condition with a (1, N, D) null context (the empty prompt's), broadcast over the batch
    ctx, null_ctx = torch.randn(4, 5, 8), torch.zeros(1, 5, 8)
    guided = gd.guided_eps(model, xt, t, ctx, null_ctx, w)
    e_c, e_u = model(xt, t, ctx), model(xt, t, null_ctx.expand(4, 5, 8))
    torch.testing.assert_close(guided, e_u + w * (e_c - e_u))
    # a (context, mask) pair, as the U-Net also takes, with the empty prompt's (context, mask) as null
    mask, null_mask = torch.rand(4, 5) > 0.3, torch.tensor([[True, False, False, False, False]])
    guided = gd.guided_eps(model, xt, t, (ctx, mask), (null_ctx, null_mask), w)
    e_c, e_u = model(xt, t, (ctx, mask)), model(xt, t, (null_ctx.expand(4, 5, 8), null_mask.expand(4, 5)))
    torch.testing.assert_close(guided, e_u + w * (e_c - e_u))
    model.calls.clear()
    gd.sample_ddim(model, (4, 1, 4, 4), labels, null_cond=3, guidance_scale=w, num_steps=5, progress=False)
    assert model.calls == [8] * 5


# ------------------------------------------------------------------------------------------- bad arguments
def test_bad_arguments_are_explained(gd):
    model = TinyDenoiser()
    for steps in (0, T + 1, 2.5):
        with pytest.raises(ValueError, match=r"1\.\.1000"):
            gd.sample_ddim(model, (1, 1, 2, 2), num_steps=steps, progress=False)
    labels = torch.zeros(1, dtype=torch.long)
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale"):
            gd.sample_ddim(model, (1, 1, 2, 2), labels, null_cond=3, guidance_scale=w, progress=False)
    with pytest.raises(ValueError, match="null_cond"):
        gd.sample_ddpm(model, (1, 1, 2, 2), labels, guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="leading"):
        gd.ddim_timesteps(10, spacing="middle")
    with pytest.raises(ValueError, match="beta_tilde"):
        gd.p_sample(model, torch.zeros(1, 1, 2, 2), 5, variance="large")
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            gd.ddim_step(torch.zeros(1), 10, 5, torch.zeros(1), eta=eta)


# ------------------------------------------------------------------------------------------- diffusers parity
def test_matches_diffusers_ddpm_scheduler(gd):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(gd.betas, ref.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gd.alpha_bars, ref.alphas_cumprod, rtol=1e-4, atol=1e-7)
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(gd.q_sample(x0, t, eps), ref.add_noise(x0, eps, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule,ref_name,start,end", [("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
                                                         ("scaled_linear", "scaled_linear", 0.00085, 0.012)])
def test_other_schedules_match_diffusers(schedule, ref_name, start, end):
    diffusers = pytest.importorskip("diffusers")
    ours = GaussianDiffusion(DiffusionConfig(schedule=schedule, beta_start=start, beta_end=end))
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=ref_name, beta_start=start, beta_end=end)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ours.alpha_bars, ref.alphas_cumprod, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("eta,clip,spacing", [(0.0, False, "leading"), (0.7, False, "leading"),
                                              (0.0, True, "leading"), (0.3, False, "trailing")])
def test_ddim_step_matches_diffusers(gd, eta, clip, spacing):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  clip_sample=clip, timestep_spacing=spacing)   # set_alpha_to_one=True: default
    ref.set_timesteps(20)
    ours = gd.ddim_timesteps(20, spacing)
    assert ref.timesteps.tolist() == ours
    x = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(ours):
        eps, z = torch.randn_like(x), torch.randn_like(x)
        t_prev = ours[i + 1] if i + 1 < len(ours) else -1
        # clip_x0 recomputes eps from the clipped x0: diffusers' use_clipped_model_output=True
        expected = ref.step(eps, t, x, eta=eta, use_clipped_model_output=clip, variance_noise=z).prev_sample
        got = gd.ddim_step(eps, t, t_prev, x, eta=eta, noise=z, clip_x0=clip)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        x = expected
