"""Shared sizes, inputs, floors and helpers for the :mod:`fastdiff.ops` benchmarks. The cases (ops, variants)
and the inputs are :mod:`fastdiff.testing`'s, the ones ``fastdiff bench`` and ``fastdiff demo`` time too.

Run from the repository root::

    pytest benchmarks --benchmark-only                     # the full suite (a few minutes on 2 CPU cores)
    FASTDIFF_BENCH_SMALL=1 pytest benchmarks --benchmark-disable   # every benchmark once, as a smoke test

Environment variables:

* ``FASTDIFF_BENCH_SMALL=1`` divides the row count N and the vocabulary V by 8 (D is kept) for quick runs.
* ``FASTDIFF_BENCH_DEVICE`` (default ``cuda`` when torch sees a GPU, else ``cpu``) places the inputs.

Each benchmark makes one untimed warm-up call, then times 3 calls (2 when the warm-up took 2 s or more)
with ``benchmark.pedantic``, since the references take seconds per call on a small CPU. ``extra_info``
ratios and rates use the best (min) round; the floors they are compared with are best-of-several timings
taken once per session.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable

import pytest
import torch

from fastdiff import discrete, testing
from fastdiff.ops import _dispatch, explain
from fastdiff.testing import S_STEP, T_STEP, Size  # noqa: F401  (the benchmark files import them from here)

SMALL = os.environ.get("FASTDIFF_BENCH_SMALL", "").strip() not in ("", "0")
DIV = 8 if SMALL else 1
DEVICE = torch.device(os.environ.get("FASTDIFF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ROUNDS, SLOW_ROUNDS, SLOW_S = 3, 2, 2.0  # timed rounds after one warm-up call; see run()
KERNELS = ("cpp", "triton", "cuda")
OP_PROVIDERS = ("reference", "auto", *KERNELS)

EMBED = Size(N=4096 // DIV, V=32768 // DIV, D=128)  # nearest_embedding, rounding_loss
LOGITS = Size(N=2048 // DIV, V=32768 // DIV)  # categorical_posterior, posterior_sample, sample_categorical


def grouped(value: str, group: str) -> pytest.param:
    """A parameter whose benchmark goes to ``group`` (one table per group, providers side by side)."""
    return pytest.param(value, id=value, marks=pytest.mark.benchmark(group=group))


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def op_callable(op: str, provider: str, reference: Callable, public: Callable) -> Callable:
    """``reference`` itself, or ``public`` bound to ``backend=provider``; skips a kernel backend that
    :func:`fastdiff.ops.explain` does not report as "ok" on ``DEVICE``, with its reason."""
    if provider == "reference":
        return reference
    if provider in KERNELS:
        why = explain(op, DEVICE)[provider]
        if why != "ok":
            pytest.skip(f"{op}/{provider}: {why}")
    return functools.partial(public, backend=provider)


def resolved_backend(op: str, provider: str, reference: Callable) -> str:
    """The backend that ``provider`` actually runs ("auto" resolved through the dispatcher)."""
    if provider != "auto":
        return provider
    return _dispatch.choose(op, _dispatch.kernel_of(op), "auto", str(DEVICE))


def run(benchmark, fn: Callable, *args, **kwargs):
    """Time ``fn(*args, **kwargs)`` (synchronised on CUDA) and return its last result.

    One untimed warm-up call, then ``ROUNDS`` timed calls, or ``SLOW_ROUNDS`` if the warm-up took at
    least ``SLOW_S`` seconds (keeps the full suite within a few minutes on a 2-core CPU)."""

    def call():
        out = fn(*args, **kwargs)
        sync()
        return out

    if not benchmark.enabled:  # --benchmark-disable: a single plain call
        return benchmark.pedantic(call)
    t0 = time.perf_counter()
    call()
    rounds = ROUNDS if time.perf_counter() - t0 < SLOW_S else SLOW_ROUNDS
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one untimed call (seconds)."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def record(benchmark, floor: str, floor_s: float, rates: dict[str, float]) -> None:
    """Put ``<floor>_s``, ``ratio_to_<floor>`` (best time / floor) and ``rate = amount / best time`` for
    each ``rates`` item into ``extra_info``. Without timings (``--benchmark-disable``) only the floor."""
    benchmark.extra_info[f"{floor}_s"] = floor_s
    if benchmark.stats is None:
        return
    t = benchmark.stats.stats.min
    benchmark.extra_info["best_s"] = t
    benchmark.extra_info[f"ratio_to_{floor}"] = t / floor_s
    for key, amount in rates.items():
        benchmark.extra_info[key] = amount / t


def record_read(benchmark, logits: torch.Tensor, read_pass_s: float) -> None:
    """Floor of the logits ops: one read pass; ``gbps`` = bytes of logits read / best time."""
    record(benchmark, "read_pass", read_pass_s, {"gbps": logits.numel() * logits.element_size() / 1e9})


# --------------------------------------------------------------------------------------------------
# Session fixtures: inputs and floors, built once.
# --------------------------------------------------------------------------------------------------
THREADS = int(os.environ.get("FASTDIFF_BENCH_THREADS", "0"))  # torch threads; 0: torch's default


@pytest.fixture(scope="session", autouse=True)
def bench_threads():
    """``FASTDIFF_BENCH_THREADS=n``: the whole session on ``n`` torch intra-op threads (the C++ kernels' too).
    Session-wide, so the floors (read pass, ``torch.mm``, the peers' steps) are timed on the same threads as
    the providers; on a shared, loaded machine one thread is steadier (OpenMP threads spin-wait for each other)."""
    n = torch.get_num_threads()
    if THREADS > 0:
        torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``x: (N, D)`` and ``W: (V, D)`` fp32 at the ``EMBED`` size."""
    return testing.embed_inputs(EMBED, seed=0, device=DEVICE)


@pytest.fixture(scope="session")
def mm_time(embed_inputs) -> float:
    """Best time of ``torch.mm(x, W.T)`` at the ``EMBED`` size: the clamp's floor."""
    x, w = embed_inputs
    return best_time(lambda: torch.mm(x, w.T), repeats=3)


@pytest.fixture(scope="session")
def logits() -> torch.Tensor:
    """``(N, V)`` fp32 logits at the ``LOGITS`` size (standard normal times 2)."""
    return testing.logits_input(LOGITS, seed=1, device=DEVICE)


@pytest.fixture(scope="session")
def read_pass_time(logits) -> float:
    """Best time of one read pass ``logits.amax(-1)``: the floor of the logits ops."""
    return best_time(lambda: logits.amax(-1), repeats=7)


@pytest.fixture(scope="session")
def posterior_inputs() -> dict[str, tuple[discrete.DiscreteProcess, torch.Tensor]]:
    """Process and ``x_t`` per kind: absorbing (mask = V - 1, x_t all mask: the worst case) and uniform
    (x_t uniform random tokens)."""
    return testing.posterior_inputs(LOGITS, seed=2, device=DEVICE)


# --------------------------------------------------------------------------------------------------
# Cheap sanity checks on what was timed, so that a benchmark never measures a wrong answer silently.
# --------------------------------------------------------------------------------------------------
def check_tokens(tokens: torch.Tensor, n: int, V: int) -> None:
    assert tokens.shape == (n,) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V


def check_fraction(hits: torch.Tensor, p: float) -> None:
    """The fraction of true entries in ``hits`` is ``p`` within 5 binomial standard deviations."""
    n = hits.numel()
    tol = 5.0 * math.sqrt(p * (1.0 - p) / n) + 1e-9
    frac = hits.double().mean().item()
    assert abs(frac - p) <= tol, f"fraction {frac:.4f}, expected {p:.4f} ± {tol:.4f}"
