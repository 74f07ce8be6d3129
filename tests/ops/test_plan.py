"""The posterior lowering (fastdiff.ops._plan): the one kernel ABI every backend's ``posterior`` takes. The
row formulas of its docstring, evaluated here in plain float64 PyTorch, give the processes' own posterior; the
kind codes are the kernels' table (csrc/schema.h)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastdiff import discrete as D
from fastdiff import schedules as S
from fastdiff.ops import _plan
from fastdiff.ops._plan import posterior_plan
from tests.ops import _cases as C

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def _eval_plan(plan):
    """The plan docstring's formulas, written out independently of the process classes."""
    V = plan.vocab_size
    z = plan.logits.to(F64) / plan.temperature
    absorbing = plan.kind in (_plan.KIND_ABSORBING, _plan.KIND_ABSORBING_PER_TOKEN)
    if absorbing:
        z = z.clone()
        z[:, plan.mask_id] = float("-inf")
    p = torch.softmax(z, -1)
    n = torch.arange(plan.rows)
    if absorbing:
        if plan.kind == _plan.KIND_ABSORBING_PER_TOKEN:
            A_t, A_s = plan.ab_table[plan.t], plan.ab_table[plan.s]
        else:
            A_t, A_s = plan.a_t[:, None].expand(-1, V), plan.a_s[:, None].expand(-1, V)
        w = (A_s - A_t) * p
        w[:, plan.mask_id] = (p * (1 - A_s)).sum(-1)
        keep = (plan.x_t != plan.mask_id) | (w.sum(-1) == 0)
        w[keep] = 0.0
        w[n[keep], plan.x_t[keep]] = 1.0
    elif plan.kind == _plan.KIND_UNIFORM:
        r = torch.where(plan.a_s > 0, plan.a_t / plan.a_s, torch.zeros_like(plan.a_s))[:, None]
        spike = torch.zeros(plan.rows, V, dtype=F64)
        spike[n, plan.x_t] = 1.0
        w = (r * spike + (1 - r) / V) * (plan.a_s[:, None] * p + (1 - plan.a_s[:, None]) / V)
    else:
        w = plan.fact1 * torch.einsum("ni,nij->nj", p, plan.qbar_s[plan.pair])
    return w / w.sum(-1, keepdim=True)


def _plan_processes():
    V, steps = 7, 24
    yield D.Absorbing(V, V - 1, S.cosine(steps))
    yield D.Absorbing(V, 2, S.spindle(steps, torch.linspace(0.1, 1.0, V)))
    yield D.Uniform(V, S.linear(steps))
    yield D.GaussianBand(V, S.linear(steps), bandwidth=2)
    yield D.Dense(torch.softmax(torch.randn(V, V, generator=C.gen(0)), -1), steps)


@pytest.mark.parametrize("process", list(_plan_processes()), ids=repr)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plan_formulas_equal_posterior_probs(process, temperature):
    g = C.gen(1)
    B, L, V = 3, 5, process.vocab_size
    logits = torch.randn(B, L, V, generator=g, dtype=F64) * 2
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


def test_plan_kind_codes_are_the_kernels_table():
    """One table of kind codes: fastdiff.ops._plan.KINDS equals csrc/schema.h's PosteriorKindCode, which the
    C++ and CUDA bindings include (the Triton kernel's KIND takes the same codes)."""
    if not (ROOT / "csrc" / "schema.h").is_file():
        pytest.skip("no csrc/ next to tests/ (an installed copy)")
    header = (ROOT / "csrc" / "schema.h").read_text()
    body = re.search(r"enum PosteriorKindCode : int64_t \{(.*?)\};", header, re.S).group(1)
    codes = {m[0]: int(m[1]) for m in re.findall(r"kKind(\w+) = (\d+)", body)}
    assert codes == {"Absorbing": _plan.KIND_ABSORBING, "AbsorbingPerToken": _plan.KIND_ABSORBING_PER_TOKEN,
                     "Uniform": _plan.KIND_UNIFORM, "Matrix": _plan.KIND_MATRIX}
    assert sorted(_plan.KINDS.values()) == [0, 1, 2, 3]
    assert _plan.int64_bits(2**64 - 1) == -1 and _plan.int64_bits(2**63) == -2**63 and _plan.int64_bits(5) == 5
