"""``select_tokens``: one decoding step of LLaDA's low-confidence remasking at B = 8, L = 256, V = 32768 fp32
(``FASTDIFF_BENCH_SMALL=1``: N and V divided by 8), every position a candidate, the 16 most confident
kept per row; greedy (temperature 0) and sampled (temperature 1).

Providers: the op per backend; ``torch-multipass``, the path fastdiff's decoders took before the op (a
gathered (M, V) copy, the value check, ``sample_categorical``, a float32 log-sum-exp, a dense scatter, a
stable sort), kept here as it was; ``llada``, LLaDA's own ``generate`` step (Nie et al. 2025: Gumbel-max
noise and a softmax in float64, a gather, ``torch.topk`` per row).

Floor: one read pass over the logits (``logits.amax(-1)``); ``gbps`` = bytes of logits read / time.
``FASTDIFF_BENCH_THREADS=n`` sets torch's threads for the module (with ``OMP_NUM_THREADS=n`` the session's
read-pass floor is timed with the same count).
"""

from __future__ import annotations


import pytest
import torch

from benchmarks.conftest import (DEVICE, LOGITS, OP_PROVIDERS, grouped, op_callable, record_read, resolved_backend,
                                 run)
from fastdiff.generation import _select as sel
from fastdiff.ops import select_tokens, select_tokens_ref

OP = "select_tokens"
B = 8
K = 16
SEED = 4321
MODES = [grouped(m, f"{OP} {m} {LOGITS.label}") for m in ("greedy", "sampled")]
TEMPERATURE = {"greedy": 0.0, "sampled": 1.0}
PROVIDERS = (*OP_PROVIDERS, "torch-multipass", "llada")



def _counters(cand: torch.Tensor, width: int) -> torch.Tensor:
    return sel.rank_counters(cand, width)


def torch_multipass(logits: torch.Tensor, cand: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """fastdiff.generation's ``_decide`` before the fused op (no processors, no filtering)."""
    Bn, W = cand.shape
    rows, cols = cand.nonzero(as_tuple=True)
    lg = logits[rows, cols]
    sel.check_values(lg)
    spans = sel.row_spans(rows, Bn)
    x0 = sel.draw(lg, rows, spans, seed=SEED, offset=0, temperature=temperature, top_k=None, top_p=None, width=W,
                  backend="auto")
    prob = sel.log_prob_of(lg, x0).double().exp()
    conf_d = sel.dense(prob, rows, cols, Bn, W)
    chosen = sel.select_top(conf_d, cand, k)
    x0_d = torch.zeros(Bn, W, dtype=torch.int64, device=cand.device)
    x0_d[rows, cols] = x0
    return torch.where(chosen, x0_d, -1), chosen


def llada_step(logits: torch.Tensor, cand: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """LLaDA's ``generate`` step (its ``add_gumbel_noise`` and ``low_confidence`` remasking)."""
    if temperature == 0:
        x0 = torch.argmax(logits, dim=-1)
    else:
        z = logits.to(torch.float64)
        noise = torch.rand_like(z)
        x0 = torch.argmax(z.exp() / (-torch.log(noise)) ** temperature, dim=-1)
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(cand, x0_p, torch.full_like(x0_p, -float("inf")))
    transfer = torch.zeros_like(cand)
    for j in range(confidence.shape[0]):
        _, idx = torch.topk(confidence[j], k=int(k[j]))
        transfer[j, idx] = True
    return transfer


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def test_select_tokens(benchmark, provider: str, mode: str, logits: torch.Tensor, read_pass_time: float) -> None:
    lg = logits.reshape(B, LOGITS.N // B, LOGITS.V)
    L = lg.shape[1]
    cand = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    k = torch.full((B,), K, dtype=torch.int64, device=DEVICE)
    T = TEMPERATURE[mode]
    if provider == "torch-multipass":
        benchmark.extra_info["backend"] = "torch (sample_categorical auto)"
        _, chosen = run(benchmark, torch_multipass, lg, cand, k, T)
    elif provider == "llada":
        benchmark.extra_info["backend"] = "torch (LLaDA generate)"
        chosen = run(benchmark, llada_step, lg, cand, k, T)
    else:
        fn = op_callable(OP, provider, select_tokens_ref, select_tokens)
        benchmark.extra_info["backend"] = resolved_backend(OP, provider, select_tokens_ref)
        counters = _counters(cand, L) if T > 0 else None
        _, _, chosen = run(benchmark, fn, lg, cand, confidence="llada", temperature=T, seed=SEED,
                           counter_rows=counters, k=k)
    record_read(benchmark, logits, read_pass_time)
    assert chosen.shape == (B, L) and chosen.sum(1).tolist() == [K] * B
    if T == 0 and provider not in ("reference", "torch-multipass", "llada"):  # the same selection as the reference
        want = select_tokens_ref(lg, cand, confidence="llada", k=k)[2]
        assert torch.equal(chosen, want)
