"""The ops and the sampler on a quiet machine and on one where a competing busy process spins on every
core (:func:`fastdiff.testing.busy`): the C++ backend must stay at or ahead of the reference in both.

Why: torch's OpenMP workers spin-wait, so with every core busy a thread team waits a scheduler tick (4-16
ms) for a core at every parallel region. Before the kernels' thread policy (``csrc/parallel.h``) one
bundled-size ``posterior_sample`` took 16-24 ms on 2 threads against 0.8 ms on one; ``fastdiff generate``
took 38-157 s against 3-22 s with ``OMP_NUM_THREADS=1``.

Cases (``mode`` = ``quiet`` | ``loaded``; ``provider`` = ``reference`` | ``cpp``; groups pair the two):

* ``posterior_sample`` (absorbing, x_t all mask, t=500 -> s=400), ``sample_categorical`` (plain),
  ``nearest_embedding`` (l2, D=128), each at the bundled model's size (N=256 rows = 4 x 64 tokens,
  V=4096; not divided in small mode) and a large one (N=512, V=32768 logits; N=1024, V=32768 for
  nearest_embedding; ``FASTDIFF_BENCH_SMALL=1`` divides N and V by 8).
* ``sampler``: ``TextDiffusion.load("discrete", backend=...).generate(4, steps=STEPS)`` (ancestral; 16 steps,
  1 in small mode), with torch's default thread count (``threads=default``) and with the CLI's automatic
  policy (``threads=auto``: :func:`fastdiff._threads.configure` ``(None)`` decided under that load).

Each benchmark starts with the kernels' contention mark cleared (``_C.team_set_contended(False)``), makes one
untimed warm-up call under its load, then times rounds (as many as fit in about 1 s, 3 to 30; 2 when a call
takes 2 s or more); with ``--benchmark-disable`` it makes one plain call, without the warm-up (7-35 s in
small mode on a shared 2-core machine). ``FASTDIFF_BENCH_THREADS=n`` sets torch's thread count for the op cases.

``extra_info``: ``mode``, ``busy_processes``, ``threads``, ``load_average_1min`` (before the busy processes
start), ``scheduler`` (``fifo`` under ``chrt -f``), ``best_s``, ``median_s``; for ``cpp`` (when its reference
ran earlier in the session): ``reference_median_s``, ``cpp_over_reference`` (median / median; <= 1 means at or
ahead) and ``cpp_over_reference_best`` (best / best); ``team_teams`` / ``team_late`` (thread teams the kernels forked
and how many started late, over the timed rounds); sampler: ``tokens_per_s``, ``threads_decision``,
``network_s`` (median time in the network's forward calls, the same torch ops whatever the backend: under
load with torch's default thread count they dominate, and their noise decides the totals' ratio),
``outside_network_s`` (median of round time minus its network time: the sampler's own work, where the
backend acts) and ``cpp_over_reference_outside_network``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import pytest
import torch

from benchmarks.conftest import DEVICE, DIV, SMALL, THREADS, check_tokens
from fastdiff import _backends, _threads, discrete, ops, schedules
from fastdiff.testing import busy, cores

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the loaded-machine benchmark is about CPU threads")

MODES = ("quiet", "loaded")
PROVIDERS = ("reference", "cpp")
BUNDLED = (256, 4096)  # (N, V): 4 samples x 64 tokens of the bundled discrete model's 4096 tokens
LARGE = (512 // DIV, 32768 // DIV)
NEAREST = {"bundled": (256, 4096, 128), "large": (1024 // DIV, 32768 // DIV, 128)}
STEPS = 1 if SMALL else 16
BUDGET_S, MIN_ROUNDS, MAX_ROUNDS, SLOW_S = 1.0, 3, 30, 2.0
_MEDIAN: dict[tuple, tuple[float, float]] = {}  # (case, mode, threads) -> the reference's (median, best)
_OUTSIDE: dict[tuple, float] = {}  # sampler case -> the reference's median time outside the network


def _cpp():
    be = _backends.get("cpp")
    if not be.available:
        pytest.skip(f"cpp: {be.reason}")
    return be.module._C


@pytest.fixture(autouse=True)
def _threads_restored():
    n = torch.get_num_threads()
    if THREADS > 0:
        torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


def _load(mode: str):
    return busy() if mode == "loaded" else contextlib.nullcontext()


def _timed(benchmark, fn):
    """One warm-up call, then rounds as many as fit in ``BUDGET_S`` (``MIN_ROUNDS``..``MAX_ROUNDS``; 2 when a
    call takes ``SLOW_S`` or more). With ``--benchmark-disable`` a single plain call."""
    if not benchmark.enabled:
        return benchmark.pedantic(fn)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    rounds = 2 if t >= SLOW_S else max(MIN_ROUNDS, min(MAX_ROUNDS, int(BUDGET_S / max(t, 1e-6))))
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


def _scheduler() -> str:
    """This process's scheduling policy: "other" (normal); "fifo" / "rr" when run under ``chrt`` (a
    real-time run: the other users of a shared machine wait, which is how its "quiet" figures were taken)."""
    try:
        pol = os.sched_getscheduler(0)
    except (AttributeError, OSError):
        return "unknown"
    names = {getattr(os, k): k[6:].lower() for k in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                                      "SCHED_IDLE") if hasattr(os, k)}
    return names.get(pol, str(pol))


def _record(benchmark, key: tuple, mode: str, provider: str, load_before: float) -> None:
    info = benchmark.extra_info
    info.update(mode=mode, provider=provider, threads=torch.get_num_threads(),
                busy_processes=cores() if mode == "loaded" else 0, load_average_1min=round(load_before, 2),
                scheduler=_scheduler())
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    st = benchmark.stats.stats
    info.update(best_s=st.min, median_s=st.median)
    if provider == "reference":
        _MEDIAN[key] = (st.median, st.min)
    elif key in _MEDIAN:
        ref_median, ref_best = _MEDIAN[key]
        info.update(reference_median_s=ref_median, cpp_over_reference=st.median / ref_median,
                    cpp_over_reference_best=st.min / ref_best)


def _op_cases(op: str) -> list:
    out = []
    for size, (N, V) in (("bundled", BUNDLED), ("large", LARGE)):
        for mode, provider in ((m, p) for m in MODES for p in PROVIDERS):
            out.append(pytest.param(size, mode, provider, id=f"{size}-{mode}-{provider}",
                                    marks=pytest.mark.benchmark(group=f"{op} N={N} V={V} {mode}")))
    return out


@pytest.fixture(scope="module")
def logits() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {size: 2.0 * torch.randn(N, V, generator=g) for size, (N, V) in (("bundled", BUNDLED), ("large", LARGE))}


def _run_op(benchmark, key, mode, provider, fn):
    C = _cpp()
    C.team_set_contended(False)
    load_before = os.getloadavg()[0]
    with _load(mode):
        if benchmark.enabled:
            fn()  # warm-up under the load (the first team after the load starts is the one that notices it)
        s0 = C.team_stats()
        out = _timed(benchmark, fn)
        s1 = C.team_stats()
    C.team_set_contended(False)
    _record(benchmark, key, mode, provider, load_before)
    if provider == "cpp":
        benchmark.extra_info.update(team_teams=s1["teams"] - s0["teams"], team_late=s1["late"] - s0["late"])
    return out


@pytest.mark.parametrize(("size", "mode", "provider"), _op_cases("posterior_sample"))
def test_posterior_sample_loaded(benchmark, size, mode, provider, logits):
    lg = logits[size]
    N, V = lg.shape
    proc = discrete.Absorbing(V, V - 1, schedules.mutual_info(1000))
    xt = torch.full((N,), V - 1, dtype=torch.int64)
    fn = lambda: ops.posterior_sample(proc, lg, xt, 500, 400, seed=3, backend=provider)  # noqa: E731
    tokens = _run_op(benchmark, ("posterior_sample", size, mode, torch.get_num_threads()), mode, provider, fn)
    check_tokens(tokens, N, V)
    assert not bool((tokens == V - 1).all())  # a = 0.5 -> 0.6: about 20% of the masked tokens are decoded


@pytest.mark.parametrize(("size", "mode", "provider"), _op_cases("sample_categorical"))
def test_sample_categorical_loaded(benchmark, size, mode, provider, logits):
    lg = logits[size]
    fn = lambda: ops.sample_categorical(lg, seed=3, backend=provider)  # noqa: E731
    tokens = _run_op(benchmark, ("sample_categorical", size, mode, torch.get_num_threads()), mode, provider, fn)
    check_tokens(tokens, *lg.shape)


def _nearest_cases() -> list:
    out = []
    for size, (N, V, D) in NEAREST.items():
        for mode, provider in ((m, p) for m in MODES for p in PROVIDERS):
            out.append(pytest.param(size, mode, provider, id=f"{size}-{mode}-{provider}",
                                    marks=pytest.mark.benchmark(group=f"nearest_embedding N={N} V={V} D={D} {mode}")))
    return out


@pytest.mark.parametrize(("size", "mode", "provider"), _nearest_cases())
def test_nearest_embedding_loaded(benchmark, size, mode, provider):
    N, V, D = NEAREST[size]
    g = torch.Generator().manual_seed(12)
    w = torch.randn(V, D, generator=g)
    pick = torch.randint(0, V, (N,), generator=g)
    x = w[pick] + 0.01 * torch.randn(N, D, generator=g)  # each row next to a known vocabulary row
    fn = lambda: ops.nearest_embedding(x, w, backend=provider)  # noqa: E731
    idx, _ = _run_op(benchmark, ("nearest_embedding", size, mode, torch.get_num_threads()), mode, provider, fn)
    assert torch.equal(idx, pick)


# --------------------------------------------------------------------------------------------------
# The sampler end to end on the bundled model
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    from fastdiff.pipeline import TextDiffusion

    out = {}
    for p in PROVIDERS:
        td = TextDiffusion.load("discrete", backend=p)
        clock = _NetworkClock()
        td.model.register_forward_pre_hook(clock.start)
        td.model.register_forward_hook(clock.stop)
        out[p] = (td, clock)
    return out


class _NetworkClock:
    """Wall time spent in the network's forward calls (the part every backend shares)."""

    def __init__(self):
        self.seconds, self._t0 = 0.0, 0.0

    def start(self, module, args):
        self._t0 = time.perf_counter()

    def stop(self, module, args, output):
        self.seconds += time.perf_counter() - self._t0


def _sampler_cases() -> list:
    return [pytest.param(policy, m, p, id=f"{policy}-{m}-{p}",
                         marks=pytest.mark.benchmark(group=f"sampler bundled 4x64 {STEPS} steps threads={policy} {m}"))
            for policy in ("default", "auto") for m in MODES for p in PROVIDERS]


@pytest.mark.parametrize(("policy", "mode", "provider"), _sampler_cases())
def test_sampler_loaded(benchmark, policy, mode, provider, bundled):
    C = _cpp()
    td, clock = bundled[provider]
    base = _threads._BASE
    network: list[float] = []

    def generate():
        clock.seconds = 0.0
        out = td.generate(4, steps=STEPS, seed=0)
        network.append(clock.seconds)
        return out

    C.team_set_contended(False)
    load_before = os.getloadavg()[0]
    decision = "torch's default"
    try:
        with _load(mode):
            if policy == "auto":
                _threads._BASE = None
                _threads.configure(None)
                decision = _threads.last_decision()
            if benchmark.enabled:
                td.generate(4, steps=2, seed=0)  # warm-up
            gen = _timed(benchmark, generate)
    finally:
        _threads._BASE = base
        C.team_set_contended(False)
    key = ("sampler", policy, mode)
    _record(benchmark, key, mode, provider, load_before)
    info = benchmark.extra_info
    info["threads_decision"] = decision
    if benchmark.stats is not None:
        info["tokens_per_s"] = gen.tokens.numel() / benchmark.stats.stats.median
        # The timed rounds are the last len(data) calls (the warm-up call of _timed came first).
        times = list(benchmark.stats.stats.data)
        net = network[-len(times):]
        outside = statistics.median(t - n for t, n in zip(times, net))
        info.update(network_s=statistics.median(net), outside_network_s=outside)
        if provider == "reference":
            _OUTSIDE[key] = outside
        elif key in _OUTSIDE:
            info["cpp_over_reference_outside_network"] = outside / _OUTSIDE[key]
    assert gen.tokens.shape == (4, 64)
    assert not bool((gen.tokens == td.mask_id).any())
