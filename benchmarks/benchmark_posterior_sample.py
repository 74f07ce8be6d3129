"""``posterior_sample`` (one reverse step) at N×V fp32 logits, absorbing (x_t all mask: the worst case)
and uniform processes, steps t = 500 -> s = 400 (the shared cases' step) and t = 500 -> s = 490 (issue 16's:
a short step, where most masked rows stay masked).

Providers: the op's own (see ``OP_PROVIDERS``) and ``mdlm``, an MDLM-style step in plain PyTorch (absorbing
only): softmax, the full (N, V) posterior, Gumbel-max with float64 noise — the baseline the fused op is
meant to beat. Floor: one read pass over the logits; ``gbps`` = bytes of logits read / time. Every row also
reports ``ratio_to_mdlm``: best time / the MDLM-style step's best time (absorbing, s = 400, timed once per
session), so a provider's table row says how it compares with both. ``FASTDIFF_BENCH_THREADS=n`` sets torch's
thread count (one thread: steadier figures on a shared machine).
"""

from __future__ import annotations


import pytest
import torch

from benchmarks.conftest import (
    DEVICE,
    LOGITS,
    OP_PROVIDERS,
    S_STEP,
    T_STEP,
    best_time,
    check_fraction,
    check_tokens,
    grouped,
    op_callable,
    record,
    record_read,
    resolved_backend,
    run,
)
from fastdiff.ops import posterior_sample, posterior_sample_ref
from fastdiff.testing import op_cases

OP = "posterior_sample"
PROVIDERS = (*OP_PROVIDERS, "mdlm")
KINDS = [grouped(c.process, f"{OP} {c.variant} {LOGITS.label}") for c in op_cases(OP)]  # the shared cases
SEED = 1234
STEPS = [pytest.param(S_STEP, id=f"s{S_STEP}"), pytest.param(490, id="s490")]


def mdlm_step(process, logits: torch.Tensor, x_t: torch.Tensor, t: int, s: int,
              generator: torch.Generator) -> torch.Tensor:
    """MDLM-style absorbing reverse step over the full ``(N, V)`` posterior.

    ``p_θ`` is the softmax with the mask logit excluded (SUBS, applied as a per-row rescale);
    ``p(x_s = j) = (a_s - a_t)/(1 - a_t)·p_θ(j)``, ``p(x_s = mask) = (1 - a_s)/(1 - a_t)``; the draw is
    ``argmax(log p + g)`` with ``g = -log(-log u)``, ``u`` float64 uniforms; unmasked tokens are carried over.
    """
    mask = process.mask_id
    a_t = float(process.schedule.alpha_bar[t])
    a_s = float(process.schedule.alpha_bar[s])
    p = torch.softmax(logits, dim=-1)  # (N, V) fp32
    scale = (a_s - a_t) / (1.0 - a_t) / (1.0 - p[:, mask])  # SUBS: renormalise without the mask
    q = p * scale.unsqueeze(-1)
    q[:, mask] = (1.0 - a_s) / (1.0 - a_t)
    u = torch.rand(q.shape, dtype=torch.float64, device=q.device, generator=generator)
    gumbel = -torch.log(-torch.log(u))
    x_s = (q.log() + gumbel).argmax(dim=-1)
    return torch.where(x_t == mask, x_s, x_t)





@pytest.fixture(scope="session")
def mdlm_time(logits: torch.Tensor, posterior_inputs) -> float:
    """Best time of the MDLM-style step (absorbing, t = 500 -> s = 400): the baseline of ``ratio_to_mdlm``."""
    process, x_t = posterior_inputs["absorbing"]
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    return best_time(lambda: mdlm_step(process, logits, x_t, T_STEP, S_STEP, gen), repeats=2)


@pytest.mark.parametrize("s", STEPS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", KINDS)
def test_posterior_sample(benchmark, provider: str, kind: str, s: int, logits: torch.Tensor, posterior_inputs,
                          read_pass_time: float, mdlm_time: float) -> None:
    process, x_t = posterior_inputs[kind]
    if provider == "mdlm":
        if kind != "absorbing":
            pytest.skip("the MDLM-style step is defined for the absorbing process only")
        gen = torch.Generator(device=DEVICE).manual_seed(SEED)
        tokens = run(benchmark, mdlm_step, process, logits, x_t, T_STEP, s, gen)
    else:
        fn = op_callable(OP, provider, posterior_sample_ref, posterior_sample)
        benchmark.extra_info["backend"] = resolved_backend(OP, provider, posterior_sample_ref)
        tokens = run(benchmark, fn, process, logits, x_t, T_STEP, s, seed=SEED)

    record_read(benchmark, logits, read_pass_time)
    record(benchmark, "mdlm", mdlm_time, {})
    check_tokens(tokens, LOGITS.N, LOGITS.V)
    if kind == "absorbing":  # x_t is all mask: x_s stays mask w.p. (1 - a_s)/(1 - a_t)
        ab = process.schedule.alpha_bar
        stay = float((1.0 - ab[s]) / (1.0 - ab[T_STEP]))
        check_fraction(tokens == process.mask_id, stay)
