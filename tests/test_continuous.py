"""Continuous (embedding) diffusion, fastdiff.continuous, against independent float64 computations.

Truths come from the Gaussian algebra written out here (joint covariance and conditioning, the closed-form
Gaussian KL, scipy's normal log-density and logsumexp, scipy's cdist), or from Monte Carlo with a fixed
seed and a 5-sigma tolerance.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.stats import norm

from fastdiff import continuous as C
from fastdiff import schedules as S

# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------

# A hand-written schedule (T = 6) so every coefficient below is computed from known numbers.
AB = [1.0, 0.95, 0.8, 0.6, 0.35, 0.15, 0.04]
T_SMALL = len(AB) - 1
PARAMS = ("x0", "eps", "mean")
B, L, D = 3, 4, 5


def small_schedule() -> S.Schedule:
    return S.Schedule(torch.tensor(AB, dtype=torch.float64))


def gd(param: str = "x0", model_var: str = "fixed_small", schedule: S.Schedule | None = None):
    return C.GaussianDiffusion(schedule or small_schedule(), parameterization=param, model_var=model_var)


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def raises_naming(exc, name: str, fn, *args, **kw) -> None:
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", msg), f"message does not name {name!r}: {msg!r}"


def ab_of(diff: C.GaussianDiffusion, t: int) -> float:
    return float(diff.schedule.alpha_bar[t])


def forward(x0: np.ndarray, eps: np.ndarray, a_t: float) -> np.ndarray:
    return math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps


def gaussian_posterior(x0: np.ndarray, x_t: np.ndarray, a_t: float, a_s: float) -> tuple[np.ndarray, float]:
    """q(x_s | x_t, x_0) by conditioning the joint Gaussian of (x_s, x_t) given x_0.

    x_s = sqrt(a_s) x0 + sqrt(1 - a_s) e1,  x_t = sqrt(r) x_s + sqrt(1 - r) e2,  r = a_t / a_s.
    Noise loadings of (x_s, x_t) on (e1, e2) -> covariance -> Schur complement.
    """
    r = a_t / a_s
    load = np.array([[math.sqrt(1 - a_s), 0.0],
                     [math.sqrt(r) * math.sqrt(1 - a_s), math.sqrt(1 - r)]])
    cov = load @ load.T
    mu_s, mu_t = math.sqrt(a_s) * x0, math.sqrt(r) * math.sqrt(a_s) * x0
    mean = mu_s + cov[0, 1] / cov[1, 1] * (x_t - mu_t)
    var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
    return mean, var


def gauss_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) per dimension."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def true_output(param: str, x0: np.ndarray, eps: np.ndarray, a_t: float, a_prev: float) -> np.ndarray:
    """What a perfect network outputs under each parameterisation (mean: the s = t-1 posterior mean)."""
    if param == "x0":
        return x0
    if param == "eps":
        return eps
    return gaussian_posterior(x0, forward(x0, eps, a_t), a_t, a_prev)[0]


def x0_from_output(param: str, out: np.ndarray, x_t: np.ndarray, a_t: float, a_prev: float) -> np.ndarray:
    """Invert each parameterisation independently (mean: solve the linear posterior-mean map)."""
    if param == "x0":
        return out
    if param == "eps":
        return (x_t - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
    # posterior mean is affine in x0: m(x0) = m(0) + (m(1) - m(0)) x0 elementwise
    m0, _ = gaussian_posterior(np.zeros_like(x_t), x_t, a_t, a_prev)
    m1, _ = gaussian_posterior(np.ones_like(x_t), x_t, a_t, a_prev)
    return (out - m0) / (m1 - m0)


def t_np(x):
    return x.detach().numpy()


def case(seed=0, shape=(B, L, D)):
    return rand(*shape, seed=seed), rand(*shape, seed=seed + 100)


# ------------------------------------------------------------------------------------------------
# forward process
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", range(T_SMALL + 1))
def test_q_sample_exact_with_noise(t):
    x0, eps = case()
    out = gd().q_sample(x0, t, noise=eps)
    np.testing.assert_allclose(t_np(out), forward(t_np(x0), t_np(eps), AB[t]), rtol=1e-13, atol=1e-14)


def test_q_sample_float32_coefficients():
    x0, eps = case()
    out = gd().q_sample(x0.float(), 4, noise=eps.float())
    assert out.dtype == torch.float32
    np.testing.assert_allclose(t_np(out), forward(t_np(x0), t_np(eps), AB[4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 3, 6])
def test_q_sample_monte_carlo(t):
    N = 200_000
    x0 = torch.tensor([1.5, -0.7, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1234 + t)
    xt = gd().q_sample(x0.expand(N, 3), t, generator=g).numpy()
    a = AB[t]
    mean, var = xt.mean(0), xt.var(0, ddof=1)
    # 5 sigma: SE(mean) = sqrt(var/N); SE(sample variance) = var*sqrt(2/(N-1)) for a Gaussian
    assert np.all(np.abs(mean - math.sqrt(a) * x0.numpy()) < 5 * math.sqrt((1 - a) / N))
    assert np.all(np.abs(var - (1 - a)) < 5 * (1 - a) * math.sqrt(2 / (N - 1)))
    # same generator seed -> same draw
    g2 = torch.Generator().manual_seed(1234 + t)
    assert np.array_equal(gd().q_sample(x0.expand(N, 3), t, generator=g2).numpy(), xt)


# ------------------------------------------------------------------------------------------------
# posterior
# ------------------------------------------------------------------------------------------------

PAIRS_SMALL = [(1, 0), (2, 1), (2, 0), (4, 3), (4, 1), (6, 5), (6, 2), (6, 0), (5, None), (1, None)]


@pytest.mark.parametrize("t,s", PAIRS_SMALL)
def test_posterior_equals_gaussian_conditioning(t, s):
    x0, eps = case(seed=t)
    diff = gd()
    x_t = forward(t_np(x0), t_np(eps), AB[t])
    mean, var = diff.q_posterior_mean_variance(x0, torch.from_numpy(x_t), t, s)
    s_eff = t - 1 if s is None else s
    m_ref, v_ref = gaussian_posterior(t_np(x0), x_t, AB[t], AB[s_eff])
    np.testing.assert_allclose(t_np(mean), m_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(t_np(var.expand_as(mean)), np.full(m_ref.shape, v_ref), rtol=1e-12, atol=1e-15)
    if s_eff == 0:  # the distribution of x_0 given x_0: a point mass
        np.testing.assert_allclose(t_np(mean), t_np(x0), atol=1e-13)
        assert float(var.abs().max()) < 1e-15


@pytest.mark.parametrize("t,s", [(1000, 937), (1000, 0), (500, 1), (64, 63), (2, 1), (937, 874)])
def test_posterior_cosine_skips(t, s):
    diff = gd(schedule=S.cosine(1000))
    x0, eps = case(seed=7)
    a_t, a_s = ab_of(diff, t), ab_of(diff, s)
    x_t = forward(t_np(x0), t_np(eps), a_t)
    mean, var = diff.q_posterior_mean_variance(x0, torch.from_numpy(x_t), t, s)
    m_ref, v_ref = gaussian_posterior(t_np(x0), x_t, a_t, a_s)
    np.testing.assert_allclose(t_np(mean), m_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(float(var.reshape(-1)[0]), v_ref, rtol=1e-9, atol=1e-15)


def test_posterior_monte_carlo_skip():
    """Sampling x_s ~ q(x_s|x_0), x_t ~ q(x_t|x_s) and regressing: E[x_s | x_t] and the residual variance."""
    N = 400_000
    a_s, a_t = AB[2], AB[5]
    r = a_t / a_s
    g = np.random.default_rng(42)
    x0 = np.full(N, 0.8)
    xs = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * g.standard_normal(N)
    xt = math.sqrt(r) * xs + math.sqrt(1 - r) * g.standard_normal(N)
    mean, var = gd().q_posterior_mean_variance(torch.from_numpy(x0[:, None]), torch.from_numpy(xt[:, None]), 5, 2)
    resid = xs - t_np(mean)[:, 0]
    v = float(var.reshape(-1)[0])
    # residual is N(0, v) iff the posterior is right; 5 sigma on mean, variance and covariance with x_t
    assert abs(resid.mean()) < 5 * math.sqrt(v / N)
    assert abs(resid.var() - v) < 5 * v * math.sqrt(2 / N)
    assert abs(np.mean(resid * (xt - xt.mean()))) < 5 * math.sqrt(v * xt.var() / N)


# ------------------------------------------------------------------------------------------------
# parameterisations
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("t", range(1, T_SMALL + 1))
def test_to_x0_inverts_truth(param, t):
    x0, eps = case(seed=t)
    x0n, epsn = t_np(x0), t_np(eps)
    x_t = forward(x0n, epsn, AB[t])
    out = true_output(param, x0n, epsn, AB[t], AB[t - 1])
    got = gd(param).to_x0(torch.from_numpy(out), torch.from_numpy(x_t), t)
    np.testing.assert_allclose(t_np(got), x0n, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("param", PARAMS)
def test_to_x0_random_output(param):
    t = 3
    out, x_t = case(seed=11)
    got = gd(param).to_x0(out, x_t, t)
    np.testing.assert_allclose(t_np(got), x0_from_output(param, t_np(out), t_np(x_t), AB[t], AB[t - 1]),
                               rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("t", [1, 4, 6])
def test_to_eps(t):
    x0, eps = case(seed=3)
    x_t = torch.from_numpy(forward(t_np(x0), t_np(eps), AB[t]))
    np.testing.assert_allclose(t_np(gd().to_eps(x0, x_t, t)), t_np(eps), rtol=1e-11, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------

STEP_PAIRS = [(6, 5), (6, 3), (5, 0), (1, 0), (3, 1), (2, None)]


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("t,s", STEP_PAIRS)
def test_ddim_eta1_equals_ddpm(param, t, s):
    out, x_t = case(seed=5)  # any network output: the identity holds for every x0 estimate
    z = rand(B, L, D, seed=99)
    diff = gd(param)
    ddpm = diff.ddpm_step(out, x_t, t, s, noise=z)
    ddim = diff.ddim_step(out, x_t, t, s, eta=1.0, noise=z)
    np.testing.assert_allclose(t_np(ddim), t_np(ddpm), rtol=1e-10, atol=1e-10)
    # and DDPM is the independent posterior mean + sqrt(var)·z with the model's x0
    s_eff = t - 1 if s is None else s
    x0_hat = x0_from_output(param, t_np(out), t_np(x_t), AB[t], AB[t - 1])
    m, v = gaussian_posterior(x0_hat, t_np(x_t), AB[t], AB[s_eff])
    np.testing.assert_allclose(t_np(ddpm), m + math.sqrt(max(v, 0.0)) * t_np(z), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("t,s", STEP_PAIRS)
def test_ddim_eta0_deterministic_and_exact(param, t, s):
    x0, eps = case(seed=t)
    x0n, epsn = t_np(x0), t_np(eps)
    x_t = torch.from_numpy(forward(x0n, epsn, AB[t]))
    out = torch.from_numpy(true_output(param, x0n, epsn, AB[t], AB[t - 1]))
    diff = gd(param)
    a = diff.ddim_step(out, x_t, t, s, eta=0.0, noise=rand(B, L, D, seed=1))
    b = diff.ddim_step(out, x_t, t, s, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    s_eff = t - 1 if s is None else s
    np.testing.assert_allclose(t_np(a), forward(x0n, epsn, AB[s_eff]), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("eta", [0.3, 0.7])
@pytest.mark.parametrize("t,s", [(6, 5), (6, 2), (3, 1)])
def test_ddim_intermediate_eta_song_eq12(param, eta, t, s):
    """Song et al. (2021) eq. 12 with sigma of eq. 16, typed out."""
    out, x_t = case(seed=14)
    z = rand(B, L, D, seed=15)
    x0_hat = x0_from_output(param, t_np(out), t_np(x_t), AB[t], AB[t - 1])
    eps_hat = (t_np(x_t) - math.sqrt(AB[t]) * x0_hat) / math.sqrt(1 - AB[t])
    sigma = eta * math.sqrt((1 - AB[s]) / (1 - AB[t])) * math.sqrt(1 - AB[t] / AB[s])
    ref = math.sqrt(AB[s]) * x0_hat + math.sqrt(1 - AB[s] - sigma**2) * eps_hat + sigma * t_np(z)
    got = gd(param).ddim_step(out, x_t, t, s, eta=eta, noise=z)
    np.testing.assert_allclose(t_np(got), ref, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("model_var", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("t", [1, 3, 6])
def test_ddpm_step_to_zero_adds_no_noise(model_var, param, t):
    out, x_t = case(seed=8)
    diff = gd(param, model_var)
    a = diff.ddpm_step(out, x_t, t, 0, noise=rand(B, L, D, seed=1))
    b = diff.ddpm_step(out, x_t, t, 0, noise=rand(B, L, D, seed=2))
    np.testing.assert_allclose(t_np(a), t_np(b), atol=1e-12)
    # at s = 0 the posterior mean is the model's x0 estimate itself
    np.testing.assert_allclose(t_np(a), x0_from_output(param, t_np(out), t_np(x_t), AB[t], AB[t - 1]),
                               rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("model_var", ["fixed_small", "fixed_large"])
def test_ddpm_step_variance(model_var):
    """Nonzero-s steps: fixed_small uses the posterior variance, fixed_large 1 - a_t/a_s (beta for a unit step)."""
    t, s = 5, 2
    out, x_t = case(seed=9)
    z = rand(B, L, D, seed=10)
    diff = gd("x0", model_var)
    m, v_post = gaussian_posterior(t_np(out), t_np(x_t), AB[t], AB[s])
    v = v_post if model_var == "fixed_small" else 1 - AB[t] / AB[s]
    np.testing.assert_allclose(t_np(diff.ddpm_step(out, x_t, t, s, noise=z)), m + math.sqrt(v) * t_np(z),
                               rtol=1e-10, atol=1e-11)


def test_ddpm_step_mixed_s_zero_per_row():
    """Per-sequence s: rows with s = 0 get no noise, the others do."""
    out, x_t = case(seed=12)
    t = torch.tensor([4, 4, 4])
    s = torch.tensor([0, 2, 3])
    z = rand(B, L, D, seed=13)
    got = gd("x0").ddpm_step(out, x_t, t, s, noise=z)
    for b in range(B):
        m, v = gaussian_posterior(t_np(out[b]), t_np(x_t[b]), AB[4], AB[int(s[b])])
        np.testing.assert_allclose(t_np(got[b]), m + math.sqrt(max(v, 0.0)) * t_np(z[b]), rtol=1e-10, atol=1e-11)


def test_ddpm_monte_carlo_matches_posterior():
    """Drawing with a generator: sample mean / variance of x_s match the posterior (5 sigma)."""
    N = 100_000
    t, s = 4, 1
    x0 = torch.full((N, 2), 0.5, dtype=torch.float64)
    x_t = torch.full((N, 2), -0.3, dtype=torch.float64)
    xs = gd("x0").ddpm_step(x0, x_t, t, s, generator=torch.Generator().manual_seed(0)).numpy()
    m, v = gaussian_posterior(np.array([0.5]), np.array([-0.3]), AB[t], AB[s])
    assert np.all(np.abs(xs.mean(0) - m[0]) < 5 * math.sqrt(v / N))
    assert np.all(np.abs(xs.var(0, ddof=1) - v) < 5 * v * math.sqrt(2 / (N - 1)))


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_clamp_hook_as_denoised_fn(step):
    weight = rand(7, D, seed=21)
    out, x_t = case(seed=22)
    diff = gd("x0")
    hook = C.clamp_hook(weight)
    snapped = weight.numpy()[cdist(t_np(out).reshape(-1, D), weight.numpy()).argmin(1)].reshape(B, L, D)
    if step == "ddpm":
        got = diff.ddpm_step(out, x_t, 4, 0, noise=torch.zeros_like(x_t), denoised_fn=hook)
        np.testing.assert_allclose(t_np(got), snapped, atol=1e-12)
    else:
        got = diff.ddim_step(out, x_t, 4, 2, eta=0.0, denoised_fn=hook)
        eps = (t_np(x_t) - math.sqrt(AB[4]) * snapped) / math.sqrt(1 - AB[4])
        np.testing.assert_allclose(t_np(got), forward(snapped, eps, AB[2]), atol=1e-11)


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------


def _truth_for_target(target, x0n, epsn, t):
    return true_output(target, x0n, epsn, AB[t], AB[t - 1])


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("target", PARAMS + (None,))
@pytest.mark.parametrize("t", [1, 2, 6])
def test_mse_loss_zero_at_truth(param, target, t):
    x0, eps = case(seed=t)
    x0n, epsn = t_np(x0), t_np(eps)
    x_t = torch.from_numpy(forward(x0n, epsn, AB[t]))
    out = torch.from_numpy(true_output(param, x0n, epsn, AB[t], AB[t - 1]))
    loss = gd(param).mse_loss(out, x0, x_t, t, eps, target=target, reduction="none")
    assert loss.shape == (B, L)
    assert float(loss.abs().max()) < 1e-18


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("target", PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_value(param, target, reduction):
    t = 3
    x0, eps = case(seed=31)
    out = rand(B, L, D, seed=32)
    x0n, epsn, outn = t_np(x0), t_np(eps), t_np(out)
    x_t = forward(x0n, epsn, AB[t])
    x0_hat = x0_from_output(param, outn, x_t, AB[t], AB[t - 1])
    pred = {"x0": x0_hat,
            "eps": (x_t - math.sqrt(AB[t]) * x0_hat) / math.sqrt(1 - AB[t]),
            "mean": gaussian_posterior(x0_hat, x_t, AB[t], AB[t - 1])[0]}[target]
    truth = _truth_for_target(target, x0n, epsn, t)
    per_token = ((pred - truth) ** 2).mean(-1)
    ref = {"mean": per_token.mean(), "sum": per_token.sum(), "none": per_token}[reduction]
    got = gd(param).mse_loss(out, x0, torch.from_numpy(x_t), t, eps, target=target, reduction=reduction)
    np.testing.assert_allclose(t_np(got), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("t", [2, 3, 6])
def test_vlb_zero_when_model_is_exact(param, t):
    x0, eps = case(seed=t)
    x0n, epsn = t_np(x0), t_np(eps)
    x_t = torch.from_numpy(forward(x0n, epsn, AB[t]))
    out = torch.from_numpy(true_output(param, x0n, epsn, AB[t], AB[t - 1]))
    kl = gd(param).vlb_terms(out, x0, x_t, t)
    assert kl.shape == (B, L)
    assert float(kl.abs().max()) < 1e-9


def _vlb_reference(param, model_var, out, x0, x_t, t):
    x0_hat = x0_from_output(param, out, x_t, AB[t], AB[t - 1])
    p_mean, _ = gaussian_posterior(x0_hat, x_t, AB[t], AB[t - 1])
    if t == 1:
        # decoder NLL with the posterior variance of step 2 (improved-diffusion's clipped value)
        _, var2 = gaussian_posterior(x0, x_t, AB[2], AB[1])
        return -norm.logpdf(x0, loc=p_mean, scale=math.sqrt(var2)).sum(-1)
    q_mean, q_var = gaussian_posterior(x0, x_t, AB[t], AB[t - 1])
    p_var = q_var if model_var == "fixed_small" else 1 - AB[t] / AB[t - 1]
    return gauss_kl(q_mean, q_var, p_mean, p_var).sum(-1)


@pytest.mark.parametrize("model_var", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("t", [2, 4, 6])
def test_vlb_closed_form_kl(model_var, param, t):
    x0, eps = case(seed=40 + t)
    out = rand(B, L, D, seed=41)
    x_t = forward(t_np(x0), t_np(eps), AB[t])
    got = gd(param, model_var).vlb_terms(out, x0, torch.from_numpy(x_t), t)
    ref = _vlb_reference(param, model_var, t_np(out), t_np(x0), x_t, t)
    np.testing.assert_allclose(t_np(got), ref, rtol=1e-9, atol=1e-12)
    if model_var == "fixed_small":
        assert float(got.min()) >= 0


@pytest.mark.parametrize("model_var", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("param", PARAMS)
def test_vlb_t1_decoder_nll(model_var, param):
    """Docstring: t = 1 is the Gaussian NLL of x_0 with the variance of step 2 (improved-diffusion sets the
    t = 1 variance to posterior_variance[1] for both fixed_small and fixed_large)."""
    x0, eps = case(seed=50)
    out = rand(B, L, D, seed=51)
    x_t = forward(t_np(x0), t_np(eps), AB[1])
    got = gd(param, model_var).vlb_terms(out, x0, torch.from_numpy(x_t), 1)
    ref = _vlb_reference(param, model_var, t_np(out), t_np(x0), x_t, 1)
    np.testing.assert_allclose(t_np(got), ref, rtol=1e-9, atol=1e-12)


def _prior_kl_ref(x0, a):
    mu, var = math.sqrt(a) * x0, 1 - a
    return gauss_kl(mu, var, 0.0, 1.0).sum(-1)


def test_prior_kl_cosine_near_zero():
    diff = gd(schedule=S.cosine(1000))
    x0 = rand(B, L, D, seed=60) * 0.5
    kl = diff.prior_kl(x0)
    assert kl.shape == (B, L)
    assert float(kl.max()) < 1e-6 and float(kl.min()) >= 0
    np.testing.assert_allclose(t_np(kl), _prior_kl_ref(t_np(x0), ab_of(diff, 1000)), rtol=1e-6, atol=1e-15)


def test_prior_kl_closed_form():
    x0 = rand(B, L, D, seed=61)
    np.testing.assert_allclose(t_np(gd().prior_kl(x0)), _prior_kl_ref(t_np(x0), AB[-1]), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# per-sequence t broadcasts like a loop over rows
# ------------------------------------------------------------------------------------------------

T_ROWS = torch.tensor([1, 4, 6])
S_ROWS = torch.tensor([0, 2, 5])


def _per_row(fn, *tensors):
    return torch.stack([fn(b, *(x[b] for x in tensors)) for b in range(B)])


@pytest.mark.parametrize("param", PARAMS)
def test_per_sequence_t_matches_loop(param):
    diff = gd(param)
    x0, eps = case(seed=70)
    out = rand(B, L, D, seed=71)
    z = rand(B, L, D, seed=72)
    tb = lambda b: int(T_ROWS[b])  # noqa: E731
    sb = lambda b: int(S_ROWS[b])  # noqa: E731

    x_t = diff.q_sample(x0, T_ROWS, noise=eps)
    torch.testing.assert_close(x_t, _per_row(lambda b, a, e: diff.q_sample(a, tb(b), noise=e), x0, eps),
                               rtol=0, atol=0)
    m, v = diff.q_posterior_mean_variance(x0, x_t, T_ROWS, S_ROWS)
    mr = _per_row(lambda b, a, x: diff.q_posterior_mean_variance(a, x, tb(b), sb(b))[0], x0, x_t)
    vr = _per_row(lambda b, a, x: diff.q_posterior_mean_variance(a, x, tb(b), sb(b))[1].expand_as(a), x0, x_t)
    torch.testing.assert_close(m, mr, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v.expand_as(m), vr, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(diff.to_x0(out, x_t, T_ROWS),
                               _per_row(lambda b, o, x: diff.to_x0(o, x, tb(b)), out, x_t), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(diff.ddpm_step(out, x_t, T_ROWS, S_ROWS, noise=z),
                               _per_row(lambda b, o, x, n: diff.ddpm_step(o, x, tb(b), sb(b), noise=n), out, x_t, z),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(diff.ddim_step(out, x_t, T_ROWS, S_ROWS, eta=0.5, noise=z),
                               _per_row(lambda b, o, x, n: diff.ddim_step(o, x, tb(b), sb(b), eta=0.5, noise=n),
                                        out, x_t, z), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(diff.mse_loss(out, x0, x_t, T_ROWS, eps, reduction="none"),
                               _per_row(lambda b, o, a, x, e: diff.mse_loss(o, a, x, tb(b), e, reduction="none"),
                                        out, x0, x_t, eps), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(diff.vlb_terms(out, x0, x_t, T_ROWS),
                               _per_row(lambda b, o, a, x: diff.vlb_terms(o, a, x, tb(b)), out, x0, x_t),
                               rtol=1e-12, atol=1e-12)


def test_per_token_t_matches_loop():
    diff = gd("eps")
    x0, eps = case(seed=73)
    t = torch.randint(1, T_SMALL + 1, (B, L), generator=torch.Generator().manual_seed(0))
    x_t = diff.q_sample(x0, t, noise=eps)
    for b in range(B):
        for i in range(L):
            ti = int(t[b, i])
            np.testing.assert_allclose(t_np(x_t[b, i]), forward(t_np(x0[b, i]), t_np(eps[b, i]), AB[ti]), rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# text pieces: clamp, rounding, anchor, losses(), TokenEmbedding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("V", [1, 7, 50])
def test_clamp_hook_nearest_row(dtype, V):
    weight = rand(V, D, seed=80, dtype=dtype)
    x = rand(B, L, D, seed=81, dtype=dtype) * 1.3
    got = C.clamp_hook(weight)(x)
    idx = cdist(x.double().numpy().reshape(-1, D), weight.double().numpy()).argmin(1)
    assert got.shape == x.shape
    np.testing.assert_array_equal(got.reshape(-1, D).numpy(), weight.numpy()[idx])


def test_clamp_hook_cosine():
    weight = rand(9, D, seed=82) * torch.linspace(0.5, 3.0, 9, dtype=torch.float64)[:, None]
    x = rand(B, L, D, seed=83)
    got = C.clamp_hook(weight, metric="cosine")(x)
    idx = cdist(x.numpy().reshape(-1, D), weight.numpy(), metric="cosine").argmin(1)
    np.testing.assert_array_equal(got.reshape(-1, D).numpy(), weight.numpy()[idx])


def _ce_ref(x, W, tokens, bias=None):
    logits = x.reshape(-1, x.shape[-1]) @ W.T
    if bias is not None:
        logits = logits + bias
    tok = tokens.reshape(-1)
    return (logsumexp(logits, axis=1) - logits[np.arange(tok.size), tok]).reshape(tokens.shape)


# "reference" computes in float64 for float64 inputs; "auto" may pick a kernel that accumulates in float32.
@pytest.mark.parametrize("backend,rtol", [("reference", 1e-12), ("auto", 1e-5)])
@pytest.mark.parametrize("fn", [C.rounding_loss, C.anchor_loss])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rounding_and_anchor_loss(fn, reduction, with_bias, backend, rtol):
    V = 11
    W = rand(V, D, seed=90)
    x = rand(B, L, D, seed=91) * 2
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(92))
    bias = rand(V, seed=93) if with_bias else None
    per = _ce_ref(t_np(x), t_np(W), tokens.numpy(), None if bias is None else t_np(bias))
    ref = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    got = fn(x, W, tokens, bias=bias, reduction=reduction, backend=backend)
    np.testing.assert_allclose(t_np(got), ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("lam_round,lam_anchor", [(1.0, 0.0), (0.5, 2.0), (0.0, 1.0)])
def test_losses_dict(param, lam_round, lam_anchor):
    V, t = 13, 3
    W = rand(V, D, seed=100)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(101))
    x0 = W[tokens] + 0.1 * rand(B, L, D, seed=102)
    eps = rand(B, L, D, seed=103)
    out = rand(B, L, D, seed=104)
    x_t = forward(t_np(x0), t_np(eps), AB[t])
    diff = gd(param)
    got = diff.losses(out, x0, torch.from_numpy(x_t), t, eps, tokens=tokens, weight=W,
                      lam_round=lam_round, lam_anchor=lam_anchor, backend="reference")
    expected_keys = {"mse", "round", "loss"} | ({"anchor"} if lam_anchor else set())
    assert set(got) == expected_keys
    truth = true_output(param, t_np(x0), t_np(eps), AB[t], AB[t - 1])
    mse = ((t_np(out) - truth) ** 2).mean()
    rnd = _ce_ref(t_np(x0), t_np(W), tokens.numpy()).mean()
    total = mse + lam_round * rnd
    np.testing.assert_allclose(float(got["mse"]), mse, rtol=1e-10)
    np.testing.assert_allclose(float(got["round"]), rnd, rtol=1e-10)
    if lam_anchor:
        x0_hat = x0_from_output(param, t_np(out), x_t, AB[t], AB[t - 1])
        anc = _ce_ref(x0_hat, t_np(W), tokens.numpy()).mean()
        np.testing.assert_allclose(float(got["anchor"]), anc, rtol=1e-9)
        total += lam_anchor * anc
    np.testing.assert_allclose(float(got["loss"]), total, rtol=1e-9)


@pytest.mark.parametrize("param", PARAMS)
def test_losses_per_sequence_and_importance_weights(param):
    """reduction="sequence" and weights: the objective a training loop minimises is
    mean_b(w_b · (mse_b + lam_anchor·anchor_b)) + lam_round·round, L_round of x0 unweighted (no t in it)."""
    V, t = 13, torch.tensor([1, 3, 6])
    W = rand(V, D, seed=110)
    tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(111))
    x0 = W[tokens] + 0.1 * rand(B, L, D, seed=112)
    eps, out = rand(B, L, D, seed=113), rand(B, L, D, seed=114)
    diff = gd(param)
    x_t = diff.q_sample(x0, t, noise=eps)
    kw = {"tokens": tokens, "weight": W, "lam_round": 0.7, "lam_anchor": 0.4, "backend": "reference"}
    per_tok = diff.losses(out, x0, x_t, t, eps, reduction="none", **kw)
    assert {k: tuple(v.shape) for k, v in per_tok.items() if k != "loss"} == \
        {"mse": (B, L), "round": (B, L), "anchor": (B, L)}
    torch.testing.assert_close(per_tok["mse"], diff.mse_loss(out, x0, x_t, t, eps, reduction="none"))
    seq = diff.losses(out, x0, x_t, t, eps, reduction="sequence", **kw)
    for k in ("mse", "round", "anchor"):
        torch.testing.assert_close(seq[k], per_tok[k].mean(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(seq["loss"], seq["mse"] + 0.7 * seq["round"] + 0.4 * seq["anchor"])
    w = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    got = diff.losses(out, x0, x_t, t, eps, weights=w, **kw)
    per_seq = seq["mse"] + 0.4 * seq["anchor"]
    torch.testing.assert_close(got["per_sequence"], per_seq, rtol=1e-12, atol=0)
    np.testing.assert_allclose(float(got["loss"]), float((w * per_seq).mean() + 0.7 * per_tok["round"].mean()),
                               rtol=1e-12)
    ones = diff.losses(out, x0, x_t, t, eps, weights=torch.ones(B, dtype=torch.float64), **kw)
    np.testing.assert_allclose(float(ones["loss"]), float(diff.losses(out, x0, x_t, t, eps, **kw)["loss"]), rtol=1e-12)
    no_round = diff.losses(out, x0, x_t, t, eps, **{**kw, "lam_round": None})
    assert "round" not in no_round and "anchor" in no_round
    raises_naming(ValueError, "weights", diff.losses, out, x0, x_t, t, eps, weights=w[:2], **kw)


def test_losses_without_tokens():
    x0, eps = case(seed=105)
    out = rand(B, L, D, seed=106)
    x_t = forward(t_np(x0), t_np(eps), AB[2])
    got = gd("eps").losses(out, x0, torch.from_numpy(x_t), 2, eps)
    assert set(got) == {"mse", "loss"}
    mse = ((t_np(out) - t_np(eps)) ** 2).mean()
    np.testing.assert_allclose(float(got["mse"]), mse, rtol=1e-12)
    np.testing.assert_allclose(float(got["loss"]), mse, rtol=1e-12)
    raises_naming(ValueError, "weight", gd().losses, out, x0, torch.from_numpy(x_t), 2, eps,
                  tokens=torch.zeros(B, L, dtype=torch.long))


def test_rounding_loss_gradient():
    """d/dx CE = (softmax(xW^T) - onehot) W, typed out; checks the op is differentiable in x."""
    V = 6
    W = rand(V, D, seed=110)
    x = rand(2, D, seed=111).requires_grad_(True)
    tok = torch.tensor([1, 4])
    C.rounding_loss(x, W, tok, reduction="sum", backend="reference").backward()
    logits = t_np(x) @ t_np(W).T
    p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    p[np.arange(2), tok.numpy()] -= 1
    np.testing.assert_allclose(x.grad.numpy(), p @ t_np(W), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [8, 16])
def test_token_embedding_layernorm(dim):
    torch.manual_seed(0)
    emb = C.TokenEmbedding(37, dim, layernorm=True)
    tab = emb.table().detach().double().numpy()
    assert tab.shape == (37, dim)
    assert np.abs(tab.mean(1)).max() < 1e-6  # float32 rounding
    # LayerNorm divides by sqrt(var + 1e-5); init var ~ 1/dim, so the biased variance is
    # var/(var + 1e-5) >= 1 - 1e-5·dim/0.25 for rows with var >= 0.25/dim; 2e-3 covers dim <= 16 with margin
    assert np.abs(tab.var(1) - 1).max() < 2e-3
    tokens = torch.tensor([[0, 5, 36], [7, 7, 1]])
    torch.testing.assert_close(emb(tokens), emb.table()[tokens], rtol=0, atol=1e-6)


def test_token_embedding_plain():
    torch.manual_seed(0)
    emb = C.TokenEmbedding(20, 64)
    assert emb.table() is emb.embedding.weight
    tokens = torch.tensor([3, 19, 0])
    assert torch.equal(emb(tokens), emb.embedding.weight[tokens])
    # default init std = dim**-0.5: 5 sigma on the sample std of 1280 normals (SE ≈ std/sqrt(2n))
    std = float(emb.embedding.weight.detach().std())
    assert abs(std - 64**-0.5) < 5 * 64**-0.5 / math.sqrt(2 * 1280)


def test_token_embedding_bad_inputs():
    emb = C.TokenEmbedding(10, 4)
    raises_naming(ValueError, "tokens", emb, torch.tensor([10]))
    raises_naming(ValueError, "tokens", emb, torch.tensor([-1]))
    raises_naming(TypeError, "tokens", emb, torch.tensor([1.0]))
    raises_naming(ValueError, "vocab_size", C.TokenEmbedding, 0, 4)
    raises_naming(ValueError, "dim", C.TokenEmbedding, 4, 0)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def test_constructor_bad_inputs():
    raises_naming(ValueError, "parameterization", C.GaussianDiffusion, small_schedule(), parameterization="v")
    raises_naming(ValueError, "model_var", C.GaussianDiffusion, small_schedule(), model_var="learned")
    raises_naming(ValueError, "schedule", C.GaussianDiffusion, S.spindle(10, torch.zeros(3, dtype=torch.float64)))
    raises_naming(ValueError, "schedule", C.GaussianDiffusion, S.mutual_info(10))  # alpha_bar[T] = 0
    raises_naming(TypeError, "schedule", C.GaussianDiffusion, torch.tensor(AB))


def _xs():
    x0, eps = case(seed=120)
    return gd("eps"), x0, eps, rand(B, L, D, seed=121)


BAD_INPUT_CASES = [
    ("q_sample t>T", lambda d, x0, e, o: d.q_sample(x0, T_SMALL + 1), "t", ValueError),
    ("q_sample t<0", lambda d, x0, e, o: d.q_sample(x0, -1), "t", ValueError),
    ("q_sample t float", lambda d, x0, e, o: d.q_sample(x0, torch.tensor(1.0)), "t", TypeError),
    ("q_sample t bool", lambda d, x0, e, o: d.q_sample(x0, True), "t", TypeError),
    ("q_sample t shape", lambda d, x0, e, o: d.q_sample(x0, torch.tensor([1, 2])), "t", ValueError),
    ("q_sample x0 int", lambda d, x0, e, o: d.q_sample(x0.long(), 1), "x0", TypeError),
    ("q_sample noise shape", lambda d, x0, e, o: d.q_sample(x0, 1, noise=e[:, :2]), "noise", ValueError),
    ("to_x0 t=0", lambda d, x0, e, o: d.to_x0(o, x0, 0), "t", ValueError),
    ("to_x0 shape", lambda d, x0, e, o: d.to_x0(o[:, :1], x0, 1), "model_output", ValueError),
    ("posterior s>=t", lambda d, x0, e, o: d.q_posterior_mean_variance(x0, o, 3, 3), "s", ValueError),
    ("posterior s>t", lambda d, x0, e, o: d.q_posterior_mean_variance(x0, o, 3, 5), "s", ValueError),
    ("posterior s<0", lambda d, x0, e, o: d.q_posterior_mean_variance(x0, o, 3, -1), "s", ValueError),
    ("posterior t=0", lambda d, x0, e, o: d.q_posterior_mean_variance(x0, o, 0), "t", ValueError),
    ("posterior shape", lambda d, x0, e, o: d.q_posterior_mean_variance(x0[:, :2], o, 3), "x0", ValueError),
    ("posterior s shape", lambda d, x0, e, o: d.q_posterior_mean_variance(x0, o, 3, torch.tensor([0, 1])),
     "s", ValueError),
    ("ddpm noise shape", lambda d, x0, e, o: d.ddpm_step(o, x0, 3, 1, noise=e[..., :2]), "noise", ValueError),
    ("ddim noise shape", lambda d, x0, e, o: d.ddim_step(o, x0, 3, 1, eta=1.0, noise=e[:1]), "noise", ValueError),
    ("ddim eta<0", lambda d, x0, e, o: d.ddim_step(o, x0, 3, 1, eta=-0.5), "eta", ValueError),
    ("ddim s>=t", lambda d, x0, e, o: d.ddim_step(o, x0, 2, 4), "s", ValueError),
    ("mse target", lambda d, x0, e, o: d.mse_loss(o, x0, x0, 1, e, target="v"), "target", ValueError),
    ("mse reduction", lambda d, x0, e, o: d.mse_loss(o, x0, x0, 1, e, reduction="avg"), "reduction", ValueError),
    ("mse t", lambda d, x0, e, o: d.mse_loss(o, x0, x0, 0, e), "t", ValueError),
    ("vlb t", lambda d, x0, e, o: d.vlb_terms(o, x0, x0, T_SMALL + 1), "t", ValueError),
    ("prior x0 int", lambda d, x0, e, o: d.prior_kl(x0.long()), "x0", TypeError),
    ("clamp weight", lambda d, x0, e, o: C.clamp_hook(torch.zeros(3, D, dtype=torch.long)), "weight", TypeError),
]


@pytest.mark.parametrize("call,arg,exc", [pytest.param(*rest, id=name) for name, *rest in BAD_INPUT_CASES])
def test_bad_inputs_named(call, arg, exc):
    d, x0, e, o = _xs()
    raises_naming(exc, arg, call, d, x0, e, o)


SILENT_BROADCAST_CASES = [
    # Silently broadcast today: a wrong-shaped noise / x0 / output yields a wrong loss instead of an error.
    ("mse noise broadcast", lambda d, x0, e, o: d.mse_loss(o, x0, x0, 2, e[:1]), "noise"),
    ("mse x0 broadcast", lambda d, x0, e, o: d.mse_loss(o, x0[:1], x0, 2, e, target="x0"), "x0"),
    ("mse output broadcast", lambda d, x0, e, o: d.mse_loss(o[:, :1], x0, x0, 2, e), "model_output"),
    ("vlb x0 broadcast", lambda d, x0, e, o: d.vlb_terms(o, x0[:1], x0, 2), "x0"),
]


@pytest.mark.parametrize("call,arg", [pytest.param(*rest, id=name) for name, *rest in SILENT_BROADCAST_CASES])
def test_loss_shape_mismatch_raises(call, arg):
    d, x0, e, o = _xs()
    raises_naming(ValueError, arg, call, d, x0, e, o)


@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_denoised_fn_wrong_shape_raises(step):
    d, x0, e, o = _xs()
    fn = d.ddpm_step if step == "ddpm" else d.ddim_step
    raises_naming(ValueError, "denoised_fn", fn, o, x0, 3, 1, denoised_fn=lambda x: x[:1])
