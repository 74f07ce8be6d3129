"""The posterior lowering (fastdiff.ops._plan) against the processes' own posterior_probs: the row
formulas in its docstring, evaluated here in plain float64 PyTorch, must give the same posterior."""

import pytest
import torch

from fastdiff import discrete, schedules
from fastdiff.ops._plan import posterior_plan


def _eval_plan(plan):
    """The docstring's formulas, written out independently of the process classes."""
    V = plan.vocab_size
    z = plan.logits.to(torch.float64) / plan.temperature
    if plan.kind == "absorbing":
        z = z.clone()
        z[:, plan.mask_id] = float("-inf")
    p = torch.softmax(z, -1)
    n = torch.arange(plan.rows)
    if plan.kind == "absorbing":
        if plan.per_token:
            A_t, A_s = plan.ab_table[plan.t], plan.ab_table[plan.s]
        else:
            A_t, A_s = plan.a_t[:, None].expand(-1, V), plan.a_s[:, None].expand(-1, V)
        w = (A_s - A_t) * p
        w[:, plan.mask_id] = (p * (1 - A_s)).sum(-1)
        keep = (plan.x_t != plan.mask_id) | (w.sum(-1) == 0)
        w[keep] = 0.0
        w[n[keep], plan.x_t[keep]] = 1.0
    elif plan.kind == "uniform":
        r = torch.where(plan.a_s > 0, plan.a_t / plan.a_s, torch.zeros_like(plan.a_s))[:, None]
        spike = torch.zeros(plan.rows, V, dtype=torch.float64)
        spike[n, plan.x_t] = 1.0
        w = (r * spike + (1 - r) / V) * (plan.a_s[:, None] * p + (1 - plan.a_s[:, None]) / V)
    else:
        w = plan.fact1 * torch.einsum("ni,nij->nj", p, plan.qbar_s[plan.pair])
    return w / w.sum(-1, keepdim=True)


def _processes():
    V, T = 7, 24
    yield discrete.Absorbing(V, V - 1, schedules.cosine(T))
    yield discrete.Absorbing(V, 2, schedules.spindle(T, torch.linspace(0.1, 1.0, V)))
    yield discrete.Uniform(V, schedules.linear(T))
    yield discrete.GaussianBand(V, schedules.linear(T), bandwidth=2)
    yield discrete.Dense(torch.softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(0)), -1), T)


@pytest.mark.parametrize("process", list(_processes()), ids=repr)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plan_formulas_equal_posterior_probs(process, temperature):
    g = torch.Generator().manual_seed(1)
    B, L, V = 3, 5, process.vocab_size
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    x_t = torch.randint(0, V, (B, L), generator=g)
    if process.kind == "absorbing":
        x_t[:, ::2] = process.mask_id
    t = torch.randint(1, process.T + 1, (B, 1), generator=g).expand(B, L)
    s = (t - torch.randint(1, 3, (B, L), generator=g)).clamp_min(0)
    plan = posterior_plan(process, logits, x_t, t, s, temperature)
    got = _eval_plan(plan).reshape(B, L, V)
    want = process.posterior_probs(process.x0_probs(logits, temperature), x_t, t, s)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_plan_rejects_unknown_kind():
    class P:
        kind = "other"
        vocab_size = 3
    with pytest.raises(TypeError, match="process"):
        posterior_plan(P(), torch.zeros(1, 3), torch.zeros(1, dtype=torch.int64),
                       torch.ones(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 1.0)
