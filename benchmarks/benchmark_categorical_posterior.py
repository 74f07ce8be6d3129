"""``categorical_posterior`` at N×V fp32 logits, absorbing (x_t all mask: the worst case) and uniform
processes, step t = 500 -> s = 400.

Floor: one read pass over the logits (``logits.amax(-1)``); ``gbps`` = bytes of logits read / time.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import (
    LOGITS,
    OP_PROVIDERS,
    S_STEP,
    T_STEP,
    grouped,
    op_callable,
    record_read,
    resolved_backend,
    run,
)
from fastdiff.ops import categorical_posterior, categorical_posterior_ref
from fastdiff.testing import op_cases

OP = "categorical_posterior"
KINDS = [grouped(c.process, f"{OP} {c.variant} {LOGITS.label}") for c in op_cases(OP)]  # the shared cases
CHECK_ROWS = 8


def expected_rows(process, kind: str, logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """The closed-form posterior of a few rows, written out independently in float64."""
    a_t = float(process.schedule.alpha_bar[T_STEP])
    a_s = float(process.schedule.alpha_bar[S_STEP])
    z = logits.double()
    V = z.shape[-1]
    if kind == "absorbing":
        p = torch.softmax(z.index_fill(-1, torch.tensor([process.mask_id]), float("-inf")), -1)
        out = p * ((a_s - a_t) / (1.0 - a_t))
        out[:, process.mask_id] = (1.0 - a_s) / (1.0 - a_t)
        return out
    r = a_t / a_s
    f1 = (1.0 - r) / V + r * torch.nn.functional.one_hot(x_t, V).double()
    f2 = a_s * torch.softmax(z, -1) + (1.0 - a_s) / V
    w = f1 * f2
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("kind", KINDS)
def test_categorical_posterior(benchmark, provider: str, kind: str, logits: torch.Tensor,
                               posterior_inputs, read_pass_time: float) -> None:
    process, x_t = posterior_inputs[kind]
    fn = op_callable(OP, provider, categorical_posterior_ref, categorical_posterior)
    benchmark.extra_info["backend"] = resolved_backend(OP, provider, categorical_posterior_ref)

    probs = run(benchmark, fn, process, logits, x_t, T_STEP, S_STEP)

    record_read(benchmark, logits, read_pass_time)
    assert probs.shape == logits.shape and probs.dtype == torch.float32
    rows = slice(0, CHECK_ROWS)
    want = expected_rows(process, kind, logits[rows].cpu(), x_t[rows].cpu())
    torch.testing.assert_close(probs[rows].cpu().double(), want, rtol=1e-5, atol=1e-7)
