"""The hooks of GaussianDiffusion's sampling steps (fastdiff.sampling steps through them): classifier
guidance (Dhariwal & Nichol 2021, Alg. 1 for DDPM, Alg. 2 for DDIM) and a noise callable drawn only when a
step adds noise. The steps' own maths is held by tests/test_continuous.py."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import continuous, schedules
from fastdiff.errors import InputError


def _case(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 4, generator=g, dtype=dtype)
    out = torch.randn(2, 3, 4, generator=g, dtype=dtype)
    grad = torch.randn(2, 3, 4, generator=g, dtype=dtype)
    return x_t, out, grad


@pytest.mark.parametrize("param", ["x0", "eps"])
@pytest.mark.parametrize("model_var", ["fixed_small", "fixed_large"])
def test_ddpm_step_classifier_guidance_shifts_the_mean(param, model_var):
    diff = continuous.GaussianDiffusion(schedules.cosine(40), parameterization=param, model_var=model_var)
    x_t, out, grad = _case()
    seen = []
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = diff.ddpm_step(out, x_t, 20, 10, noise=z, classifier_grad=lambda x, t: seen.append(t) or grad,
                         classifier_scale=1.5)
    p = diff.p_mean_variance(out, x_t, 20, 10)
    torch.testing.assert_close(got, p["mean"] + 1.5 * p["var"] * grad + p["var"].sqrt() * z, rtol=1e-12, atol=1e-12)
    assert seen == [20]  # called with t as given


@pytest.mark.parametrize("param", ["x0", "eps", "mean"])
def test_ddim_step_classifier_guidance_shifts_eps(param):
    """Dhariwal & Nichol Alg. 2: ε' = ε - sqrt(1 - a_t)·s·∇; the x0 of ε' is what denoised_fn sees."""
    diff = continuous.GaussianDiffusion(schedules.cosine(40), parameterization=param)
    x_t, out, grad = _case()
    ab = diff.alpha_bar
    seen = []
    got = diff.ddim_step(out, x_t, 20, 10, classifier_grad=lambda x, t: grad, classifier_scale=0.7,
                         denoised_fn=lambda x0: seen.append(x0) or x0)
    x0 = diff.to_x0(out, x_t, 20)
    eps = diff.to_eps(x0, x_t, 20) - (1 - ab[20]).sqrt() * 0.7 * grad
    x0 = (x_t - (1 - ab[20]).sqrt() * eps) / ab[20].sqrt()
    torch.testing.assert_close(seen[0], x0, rtol=1e-12, atol=1e-12)
    want = ab[10].sqrt() * x0 + (1 - ab[10]).sqrt() * eps
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_bad_classifier_gradient_is_named():
    diff = continuous.GaussianDiffusion(schedules.cosine(40))
    x_t, out, _ = _case()
    for step in (diff.ddpm_step, diff.ddim_step):
        with pytest.raises(InputError, match=r"^classifier_grad: must return a tensor of shape \(2, 3, 4\)"):
            step(out, x_t, 20, 10, classifier_grad=lambda x, t: x[..., :2])


@pytest.mark.parametrize("step, kw, s, calls", [
    ("ddpm", {}, 10, 1), ("ddpm", {}, 0, 0),
    ("ddim", {"eta": 0.5}, 10, 1), ("ddim", {"eta": 0.5}, 0, 0), ("ddim", {"eta": 0.0}, 10, 0),
])
def test_a_noise_callable_is_called_only_when_the_step_adds_noise(step, kw, s, calls):
    diff = continuous.GaussianDiffusion(schedules.cosine(40), model_var="fixed_large")
    x_t, out, _ = _case()
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    n = []
    fn = getattr(diff, f"{step}_step")
    got = fn(out, x_t, 20, s, noise=lambda like: n.append(like.shape) or z, **kw)
    assert len(n) == calls
    torch.testing.assert_close(got, fn(out, x_t, 20, s, noise=z, **kw), rtol=0, atol=0)


def test_per_row_steps_draw_noise_when_any_row_needs_it():
    diff = continuous.GaussianDiffusion(schedules.cosine(40))
    x_t, out, _ = _case()
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    t, s = torch.tensor([20, 5]), torch.tensor([0, 3])
    got = diff.ddpm_step(out, x_t, t, s, noise=lambda like: z)
    torch.testing.assert_close(got, diff.ddpm_step(out, x_t, t, s, noise=z), rtol=0, atol=0)
    with pytest.raises(InputError, match=r"^noise: expected shape \(2, 3, 4\)"):
        diff.ddpm_step(out, x_t, t, s, noise=lambda like: z[:1])
    assert not math.isnan(float(got.sum()))
