"""Threads and grain sizes: small kernel calls run on the calling thread (a thread team costs a scheduler
tick, 4-16 ms, when other processes keep every core busy), torch.set_num_threads governs the kernels, and the
CLI's automatic policy (``fastdiff._threads.configure(None)``) takes only the cores that are free.
"""

from __future__ import annotations

import importlib
import time

import pytest
import torch

from fastdiff import _backends, _threads, discrete, ops, schedules
from fastdiff.errors import InputError, InputTypeError

CPP = _backends.get("cpp")
needs_cpp = pytest.mark.skipif(not CPP.available, reason=f"C++ backend: {CPP.reason}")


@pytest.fixture
def threads():
    """Restore torch's thread count (and the automatic policy's remembered default) after the test."""
    n = torch.get_num_threads()
    base = getattr(_threads, "_BASE", None)
    yield
    torch.set_num_threads(n)
    _threads._BASE = base


def _bundled_step():
    """One ancestral step at the bundled model's size: B=4, L=64, V=4096, every token masked."""
    V = 4096
    proc = discrete.Absorbing(V, V - 1, schedules.mutual_info(1000))
    logits = torch.randn(4, 64, V, generator=torch.Generator().manual_seed(0))
    xt = torch.full((4, 64), V - 1, dtype=torch.int64)
    return proc, logits, xt


# --------------------------------------------------------------------------------------------------
# The kernels' thread-team policy (fastdiff._C.team_stats / team_set_contended)
# --------------------------------------------------------------------------------------------------
def _teams() -> int:
    return int(CPP.module._C.team_stats()["teams"])


_NEAREST: dict = {}


def _nearest_problem():
    """The bundled continuous model's rounding at 4 x 64 tokens: 256 vectors against 4096 rows of D=128."""
    if not _NEAREST:
        from fastdiff.ops import _nearest

        g = torch.Generator().manual_seed(4)
        w = torch.randn(4096, 128, generator=g)
        x = w[torch.randint(0, 4096, (256,), generator=g)] + 0.01 * torch.randn(256, 128, generator=g)
        _NEAREST["p"] = _nearest.prepare(x, w, "l2")
    return _NEAREST["p"]


def _call(op, proc, logits, xt):
    if op == "nearest_screen":  # the kernel alone (the op's float64 resolution is torch's, on every backend)
        return importlib.import_module("fastdiff.ops.backends.cpp.nearest_embedding").screen(_nearest_problem())
    if op == "posterior_sample":
        return ops.posterior_sample(proc, logits, xt, 500, 400, seed=1, backend="cpp")
    return ops.sample_categorical(logits, seed=1, backend="cpp")


@needs_cpp
@pytest.mark.parametrize("op", ["posterior_sample", "sample_categorical"])
def test_tiny_call_runs_on_the_calling_thread(threads, op):
    proc, logits, xt = _bundled_step()
    logits, xt = logits[:, :4].contiguous(), xt[:, :4].contiguous()  # 16 rows of 4096: 64K elements
    torch.set_num_threads(2)
    CPP.module._C.team_set_contended(False)
    before = _teams()
    _call(op, proc, logits, xt)
    assert _teams() == before, "a 16 x 4096 call forked a thread team"


@needs_cpp
@pytest.mark.parametrize("op", ["posterior_sample", "sample_categorical", "nearest_screen"])
def test_bundled_size_call_runs_on_the_calling_thread_while_contended(threads, op):
    proc, logits, xt = _bundled_step()
    torch.set_num_threads(2)
    CPP.module._C.team_set_contended(True)
    try:
        before = _teams()
        _call(op, proc, logits, xt)
        assert _teams() == before, "a 4x64x4096 call forked a thread team on a busy machine"
    finally:
        CPP.module._C.team_set_contended(False)


@needs_cpp
def test_a_late_team_marks_the_machine_contended(threads):
    """With every core busy, a team's worker starts a scheduler tick late; the kernels notice."""
    from fastdiff.testing import busy

    proc, logits, xt = _bundled_step()
    torch.set_num_threads(2)
    C = CPP.module._C
    late0 = C.team_stats()["late"]
    with busy():
        for _ in range(40):
            C.team_set_contended(False)
            _call("posterior_sample", proc, logits, xt)
            if C.team_stats()["late"] > late0:
                break
            time.sleep(0.01)  # let the workers go to sleep, as they do between a sampler's steps
        st = C.team_stats()
    C.team_set_contended(False)
    assert st["late"] > late0 and st["contended"] == 1, st


@needs_cpp
def test_large_call_uses_a_team_on_an_idle_machine_and_not_with_one_thread(threads):
    V = 4096
    proc = discrete.Absorbing(V, V - 1, schedules.mutual_info(1000))
    logits = torch.randn(2048, V, generator=torch.Generator().manual_seed(0))
    xt = torch.full((2048,), V - 1, dtype=torch.int64)
    call = lambda: ops.posterior_sample(proc, logits, xt, 500, 400, seed=3, backend="cpp")  # noqa: E731
    torch.set_num_threads(1)
    before = _teams()
    one = call()
    assert _teams() == before, "torch.set_num_threads(1) did not keep the kernel on one thread"
    torch.set_num_threads(2)
    CPP.module._C.team_set_contended(False)
    two = call()
    assert _teams() == before + 1, "8M elements on 2 threads of an idle machine ran without a team"
    # While contended the kernels need far more work per thread: the same call runs inline.
    CPP.module._C.team_set_contended(True)
    try:
        contended = call()
        assert _teams() == before + 1
    finally:
        CPP.module._C.team_set_contended(False)
    # Every row draws from its own counter: the split across threads never changes a token.
    assert torch.equal(one, two) and torch.equal(one, contended)


@needs_cpp
def test_every_kernel_gives_the_same_bits_inline_and_on_a_team(threads):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1024, 2000, generator=g)
    x, w = torch.randn(600, 32, generator=g), torch.randn(3000, 32, generator=g)
    tgt = torch.randint(0, 3000, (600,), generator=g)

    def run():
        return (ops.sample_categorical(logits, seed=7, top_p=0.9, backend="cpp"),
                ops.nearest_embedding(x, w, backend="cpp")[0],
                ops.rounding_loss(x, w, tgt, reduction="none", backend="cpp"))

    torch.set_num_threads(1)
    a = run()
    torch.set_num_threads(2)
    CPP.module._C.team_set_contended(False)
    before = _teams()
    b = run()
    assert _teams() > before
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------------
# The CLI's automatic policy
# --------------------------------------------------------------------------------------------------
def test_configure_int_sets_the_count_and_rejects_bad_input(threads):
    assert _threads.configure(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(InputTypeError, match="--threads"):
        _threads.configure(True)
    with pytest.raises(InputTypeError, match="--threads"):
        _threads.configure(2.0)
    with pytest.raises(InputError, match="--threads"):
        _threads.configure(0)


@pytest.mark.parametrize("others, cores, default, want", [
    (0.0, 2, 2, 2),  # idle: torch's default
    (2.0, 2, 2, 1),  # a busy process on every core: one thread
    (1.0, 2, 2, 1),  # one core left
    (5.0, 2, 2, 1),  # oversubscribed
    (3.0, 16, 16, 13),  # a big machine with 3 busy cores
    (0.0, 16, 8, 8),  # never more than torch's default
    (0.4, 2, 2, 2),  # a blip is not a busy core
])
def test_auto_policy_takes_the_free_cores(others, cores, default, want):
    assert _threads.auto_threads(default, cores=cores, others=others) == want


def test_configure_none_follows_the_load(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    _threads._BASE = None
    monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(_threads, "other_runnable", lambda: 2.0)
    assert _threads.configure(None) == 1 and torch.get_num_threads() == 1
    # The default is remembered: the machine quiet again, a second call goes back to 2.
    monkeypatch.setattr(_threads, "other_runnable", lambda: 0.0)
    assert _threads.configure(None) == 2 and torch.get_num_threads() == 2
    assert "2 of 2" in _threads.last_decision()


def test_configure_none_keeps_an_explicit_omp_num_threads(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    _threads._BASE = None
    monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(_threads, "other_runnable", lambda: 8.0)
    assert _threads.configure(None) == 2
    assert "OMP_NUM_THREADS" in _threads.last_decision()


def test_load_probe_sees_busy_processes():
    from fastdiff.testing import busy

    quiet = _threads.other_runnable()
    assert quiet >= 0.0
    with busy(2):
        loaded = _threads.other_runnable()
    assert loaded >= 1.5, f"2 busy processes, probe says {loaded} other runnable threads"
