"""``sample_categorical`` at N×V fp32 logits: plain, top-k = 50 and top-p = 0.9 (temperature 1).

Floor: one read pass over the logits (``logits.amax(-1)``); ``gbps`` = bytes of logits read / time.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import (
    LOGITS,
    OP_PROVIDERS,
    check_tokens,
    grouped,
    op_callable,
    record_read,
    resolved_backend,
    run,
)
from fastdiff.ops import sample_categorical, sample_categorical_ref
from fastdiff.testing import op_cases

OP = "sample_categorical"
FILTERS: dict[str, dict[str, float | int]] = {c.variant: dict(c.kwargs) for c in op_cases(OP)}  # the shared cases
MODES = [grouped(m, f"{OP} {m} {LOGITS.label}") for m in FILTERS]
SEED = 4321


def check_filter(logits: torch.Tensor, tokens: torch.Tensor, top_k: int | None = None,
                 top_p: float | None = None) -> None:
    """Every drawn token lies in its row's top-k set / top-p nucleus (tie-inclusive, as documented)."""
    picked = logits.gather(-1, tokens.unsqueeze(-1))
    if top_k is not None:
        assert bool(((logits > picked).sum(-1) < top_k).all()), "a token outside the top-k was drawn"
    if top_p is not None:
        p = torch.softmax(logits.double(), -1)
        above = torch.where(logits > picked, p, torch.zeros_like(p)).sum(-1)
        assert bool((above < top_p + 1e-9).all()), "a token outside the top-p nucleus was drawn"


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def test_sample_categorical(benchmark, provider: str, mode: str, logits: torch.Tensor,
                            read_pass_time: float) -> None:
    fn = op_callable(OP, provider, sample_categorical_ref, sample_categorical)
    benchmark.extra_info["backend"] = resolved_backend(OP, provider, sample_categorical_ref)

    tokens = run(benchmark, fn, logits, seed=SEED, **FILTERS[mode])

    record_read(benchmark, logits, read_pass_time)
    check_tokens(tokens, LOGITS.N, LOGITS.V)
    check_filter(logits, tokens, **FILTERS[mode])
