"""``sample_categorical`` at N×V fp32 logits: plain, top-k = 50 and top-p = 0.9 (temperature 1).

Floor: one read pass over the logits (``logits.amax(-1)``); ``gbps`` = bytes of logits read / time.

``test_top_p_cost`` (group ``sample_categorical top-p cost``): top-p = 0.9 per provider on three logit
distributions from the same draws ``x`` (standard normal times 2): ``normal`` (``x``), ``flat``
(``x / 20``: the nucleus holds most of the vocabulary) and ``peaked`` (``4 x``: a handful of tokens).
``extra_info["plain_s"]`` is the best time of that provider's plain draw (same logits, no filter), timed
in the same test after the top-p rounds, and ``ratio_to_plain`` = top-p best / plain best: issue 16's goal
is at most 2 on every backend. The ``hf`` provider is the peers' formulation written here in plain torch,
HF transformers' ``TopPLogitsWarper`` followed by ``torch.multinomial``: sort ascending, cumulative softmax,
drop the prefix whose mass is at most ``1 - top_p`` (the most probable token always kept), scatter back,
``-inf`` the dropped logits, softmax, multinomial; in row blocks of 256 (its plain draw: softmax and
multinomial). ``FASTDIFF_BENCH_THREADS=n`` runs the module on ``n`` torch threads.
"""

from __future__ import annotations


import pytest
import torch

from benchmarks.conftest import (
    LOGITS,
    OP_PROVIDERS,
    best_time,
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
TOP_P = 0.9
DISTS = {"normal": 1.0, "flat": 0.05, "peaked": 4.0}  # scale of the shared logits
HF_BLOCK = 256



def hf_top_p(logits: torch.Tensor, *, seed: int, top_p: float | None = None) -> torch.Tensor:
    """The peers' top-p draw (HF transformers' ``TopPLogitsWarper`` + ``torch.multinomial``), in plain torch;
    ``top_p=None``: their plain draw (softmax + multinomial)."""
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for r0 in range(0, logits.shape[0], HF_BLOCK):
        x = logits[r0:r0 + HF_BLOCK]
        if top_p is not None:
            sorted_x, order = torch.sort(x, dim=-1, descending=False)
            mass = sorted_x.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = mass <= 1 - top_p
            drop_sorted[:, -1] = False  # the most probable token is always kept
            drop = drop_sorted.scatter(1, order, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))
        out[r0:r0 + HF_BLOCK] = torch.multinomial(x.softmax(dim=-1), 1, generator=gen)[:, 0]
    return out


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


@pytest.fixture(scope="module")
def dist_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: logits if scale == 1.0 else logits * scale for name, scale in DISTS.items()}


@pytest.mark.parametrize("provider", [*OP_PROVIDERS, "hf"])
@pytest.mark.parametrize("dist", [grouped(d, f"{OP} top-p cost {LOGITS.label}") for d in DISTS])
def test_top_p_cost(benchmark, provider: str, dist: str, dist_logits: dict[str, torch.Tensor],
                    read_pass_time: float) -> None:
    x = dist_logits[dist]
    if provider == "hf":
        fn = hf_top_p
        benchmark.extra_info["backend"] = "hf (torch)"
    else:
        fn = op_callable(OP, provider, sample_categorical_ref, sample_categorical)
        benchmark.extra_info["backend"] = resolved_backend(OP, provider, sample_categorical_ref)

    tokens = run(benchmark, fn, x, seed=SEED, top_p=TOP_P)

    record_read(benchmark, x, read_pass_time)
    check_tokens(tokens, LOGITS.N, LOGITS.V)
    if provider != "hf":  # the peers' float32 set is not tie-inclusive: no exact check
        check_filter(x, tokens, top_p=TOP_P)
    if benchmark.stats is not None:  # the plain draw of the same provider on the same logits
        plain = best_time(lambda: fn(x, seed=SEED), repeats=2)
        benchmark.extra_info["plain_s"] = plain
        benchmark.extra_info["ratio_to_plain"] = benchmark.stats.stats.min / plain
