"""Property-based fuzzing of the ops (hypothesis).

* :func:`test_fuzz_backends_agree` runs the cross-backend harness of ``tests/_fuzz.py`` (every op, every
  backend: the same accept / reject decision and message, no crash, no NaN or out-of-range output without
  an error, equal results where accepted) in a child process, so that a crash in a kernel fails this test
  with the call that was running instead of killing pytest. Hypothesis shrinks a failing example inside
  the child and its report ends the failure message. ``FASTDIFF_FUZZ_EXAMPLES`` scales the run (CI default
  in ``tests/_fuzz.py``: about half a minute on 2 cores); ``FASTDIFF_FUZZ_BACKENDS`` picks the backends.
* The tests below it check the sampling contract and the posterior rows against independent oracles on
  the default backend, in this process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import discrete as D
from fastdiff import ops
from fastdiff import schedules as S
from tests import _oracles as O

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None)
CHILD_TIMEOUT = int(os.environ.get("FASTDIFF_FUZZ_TIMEOUT", "900"))


def _run_harness(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m tests._fuzz`` in a child process; returns its result and the call it was running last."""
    log = tmp_path / "fuzz_current_case.txt"
    child_env = dict(os.environ, FASTDIFF_FUZZ_LOG=str(log), **env)
    if not torch.cuda.is_available():
        child_env.setdefault("TRITON_INTERPRET", "1")
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "tests._fuzz"], cwd=ROOT, env=child_env, capture_output=True,
                         text=True, timeout=CHILD_TIMEOUT)
    return res, (log.read_text() if log.exists() else "")


def _crash_report(res: subprocess.CompletedProcess, last: str) -> str | None:
    """The failure message for a child that died of a signal (or a sanitizer abort), else None."""
    rc = res.returncode
    if rc >= 0 and rc not in (128 + signal.SIGSEGV, 128 + signal.SIGABRT, 128 + signal.SIGBUS):
        return None
    sig = -rc if rc < 0 else rc - 128
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    return (f"the fuzz harness crashed ({name}) while running\n  {last.strip()}\n"
            f"--- stderr (tail)\n{res.stderr[-4000:]}")


def test_fuzz_backends_agree(tmp_path):
    res, last = _run_harness(tmp_path)
    crash = _crash_report(res, last)
    if crash:
        pytest.fail(crash, pytrace=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"the fuzz harness failed (rc {res.returncode}):\n{out[-12000:]}"
    summary = re.search(r"fuzz ok: (.*)", res.stdout)
    assert summary, out[-4000:]
    counts = {(m[0], m[1]): int(m[2]) for m in re.findall(r"(\w+) (accepted|rejected) (\d+)", summary.group(1))}
    for op in ("nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample",
               "sample_categorical"):  # the generator must keep reaching both sides of every op
        for kind in ("accepted", "rejected"):
            n = counts.get((op, kind), 0)
            assert n >= 5, f"{op}: only {n} {kind} examples: {summary.group(1)}"


def test_fuzz_guard_names_the_case_that_crashed(tmp_path):
    """The guard works: a child that segfaults in its first cpp call is reported with that call."""
    env = dict(FASTDIFF_FUZZ_SELFTEST_CRASH="cpp", FASTDIFF_FUZZ_EXAMPLES="3", FASTDIFF_FUZZ_BACKENDS="reference,cpp")
    if "ASAN_OPTIONS" in os.environ:  # under scripts/asan.sh: this deliberate crash's report goes elsewhere
        env["ASAN_OPTIONS"] = re.sub(r"log_path=[^:]*", f"log_path={tmp_path / 'selftest'}", os.environ["ASAN_OPTIONS"])
    res, last = _run_harness(tmp_path, **env)
    report = _crash_report(res, last)
    assert report is not None, f"rc {res.returncode}: {res.stdout[-2000:]} {res.stderr[-2000:]}"
    assert ("SIGSEGV" in report or "SIGABRT" in report) and "backend=cpp: " in report and "(" in last


@st.composite
def logits_rows(draw, max_rows=6, max_v=40):
    n = draw(st.integers(1, max_rows))
    V = draw(st.integers(1, max_v))
    vals = draw(st.lists(st.one_of(st.floats(-30, 30), st.just(float("-inf"))), min_size=n * V, max_size=n * V))
    x = torch.tensor(vals, dtype=torch.float64).reshape(n, V)
    x[:, draw(st.integers(0, V - 1))] = draw(st.floats(-5, 5))  # at least one finite logit per row
    return x


@FUZZ
@given(x=logits_rows(), seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**40),
       temperature=st.floats(0.05, 5.0), top_k=st.one_of(st.none(), st.integers(1, 50)),
       top_p=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_sample_categorical_matches_contract(x, seed, offset, temperature, top_k, top_p):
    out = ops.sample_categorical(x, seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p)
    for r in range(x.shape[0]):
        z = x[r].numpy() / temperature
        w = np.exp(z - z.max())
        if top_k is not None and top_k < len(z):
            w = np.where(z >= np.sort(z)[::-1][top_k - 1], w, 0.0)
        if top_p is not None and top_p < 1.0:
            p = w / w.sum()
            greater = np.array([p[p > pv].sum() for pv in p])
            w = np.where(greater < top_p, w, 0.0)
        tok = int(out[r])
        assert w[tok] > 0
        if O.margin(w, O.row_uniform(seed, offset, r)) > 1e-12:
            assert tok == O.inverse_cdf(w, O.row_uniform(seed, offset, r))


@FUZZ
@given(V=st.integers(2, 30), n=st.integers(1, 8), data=st.data(), kind=st.sampled_from(["absorbing", "uniform"]),
       seed=st.integers(0, 2**32))
def test_posterior_rows_are_distributions_and_samples_in_support(V, n, data, kind, seed):
    T = 20
    process = D.Absorbing(V, V - 1, S.cosine(T)) if kind == "absorbing" else D.Uniform(V, S.cosine(T))
    t = data.draw(st.integers(1, T))
    s = data.draw(st.integers(0, t - 1))
    logits = torch.tensor(data.draw(st.lists(st.floats(-20, 20), min_size=n * V, max_size=n * V))).reshape(n, V)
    xt = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)))
    probs = ops.categorical_posterior(process, logits, xt, t, s).double()
    assert torch.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, atol=1e-6)
    out = ops.posterior_sample(process, logits, xt, t, s, seed=seed)
    assert bool((probs.gather(-1, out[:, None]) > 0).all())
    if kind == "absorbing":
        keep = xt != V - 1
        assert torch.equal(out[keep], xt[keep])
        if s == 0:
            assert not bool((out == V - 1).any())


@FUZZ
@given(N=st.integers(1, 40), V=st.integers(1, 60), Dm=st.integers(1, 20), metric=st.sampled_from(["l2", "cosine"]),
       seed=st.integers(0, 2**31))
def test_nearest_embedding_brute_force(N, V, Dm, metric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Dm, generator=g, dtype=torch.float64)
    w = torch.randn(V, Dm, generator=g, dtype=torch.float64)
    idx, _ = ops.nearest_embedding(x, w, metric)
    if metric == "l2":
        score = ((x[:, None] - w[None]) ** 2).sum(-1)
    else:
        score = -(x @ (w / w.norm(dim=1, keepdim=True)).T)
    best = score.min(1).values
    assert torch.all(score.gather(1, idx[:, None]).squeeze(1) <= best + 1e-9 * (1 + best.abs()))
