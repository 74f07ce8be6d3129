"""select_tokens on every backend: the reference against an independent float64 computation (softmax, then
the token's score, then a sort in plain Python), every kernel against the reference over odd shapes,
dtypes and scores, the tie orders (argmax: lowest index; selection: lower position first), per-row k
including 0 and more than the candidates, threshold edge cases, value checks and bad arguments."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from fastdiff import ops
from fastdiff.errors import InputError, InputTypeError
from tests import _oracles as O
from tests.ops import _cases as C

RULES = ("prob", "llada", "logprob", "margin", "entropy", "random")


def _inputs(B: int, L: int, V: int, seed: int, frac: float = 0.6, dtype: torch.dtype = torch.float32):
    g = C.gen(seed)
    logits = (torch.randn(B, L, V, generator=g) * 2).to(dtype)
    cand = torch.rand(B, L, generator=g) < frac
    counters = torch.randint(0, 10_000, (B, L), generator=g)
    uniform = torch.rand(B, L, generator=g, dtype=torch.float64)
    return logits, cand, counters, uniform


def _call(backend: str, logits, cand, *, confidence="prob", temperature=0.0, counters=None, uniform=None, **kw):
    dev = C.device(backend)
    to = (lambda t: None if t is None else t.to(dev))
    out = ops.select_tokens(logits.to(dev), cand.to(dev), confidence=confidence, temperature=temperature,
                            seed=11, offset=3, counter_rows=to(counters) if temperature > 0 else None,
                            uniform=to(uniform) if confidence == "random" else None,
                            **{k: to(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}, backend=backend)
    return tuple(t.cpu() for t in out)


# --------------------------------------------------------------------------------------------------------
# The reference against an independent computation
# --------------------------------------------------------------------------------------------------------
def _naive_scores(z: np.ndarray, tok: int, rule: str, tq: float) -> float:
    """float64: softmax, then the rule."""
    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()
    if rule in ("llada", "logprob"):
        p = softmax(z)
        return float(p[tok]) if rule == "llada" else float(np.log(p[tok]))
    p = softmax(z / tq)
    if rule == "prob":
        return float(p[tok])
    if rule == "margin":
        s = np.sort(p)[::-1]
        return float(s[0] - (s[1] if len(s) > 1 else 0.0))
    return float((p * np.log(p + 1e-10)).sum())


def _naive_select(keys: dict, B: int, L: int, k=None, threshold=None) -> np.ndarray:
    """keys: {(b, l): key} of the candidates. Sort by (-key, l) per row in Python."""
    sel = np.zeros((B, L), dtype=bool)
    for b in range(B):
        row = sorted(((-v, l) for (bb, l), v in keys.items() if bb == b))
        if not row:
            continue
        if k is None and threshold is None:
            chosen = [l for _, l in row]
        elif k is not None:
            chosen = [l for _, l in row[:int(k[b])]]
        else:
            chosen = [l for v, l in row if -v >= threshold] + [row[0][1]]
        sel[b, chosen] = True
    return sel


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_reference_matches_a_naive_computation(rule, temperature):
    B, L, V = 3, 9, 13
    logits, cand, counters, uniform = _inputs(B, L, V, seed=5)
    z64 = logits.double().numpy()
    tok, conf, sel = _call("reference", logits, cand, confidence=rule, temperature=temperature, counters=counters,
                           uniform=uniform)
    keys = {}
    tq = temperature if temperature > 0 else 1.0
    for b in range(B):
        for l in range(L):
            if not cand[b, l]:
                assert tok[b, l] == 0 and conf[b, l] == -math.inf and not sel[b, l]
                continue
            z = z64[b, l]
            if temperature == 0:
                want = int(np.argmax(z))
            else:
                w = np.exp(z / temperature - (z / temperature).max())
                want = O.inverse_cdf(w, O.row_uniform(11, 3, int(counters[b, l])))
            assert int(tok[b, l]) == want
            key = float(uniform[b, l]) if rule == "random" else _naive_scores(z, want, rule, tq)
            assert float(conf[b, l]) == pytest.approx(key, rel=2e-5, abs=2e-6)
            keys[(b, l)] = key
    assert np.array_equal(sel.numpy(), cand.numpy())  # no selection rule: every candidate
    k = torch.tensor([2, 0, 50])
    _, _, sel_k = _call("reference", logits, cand, confidence=rule, temperature=temperature, counters=counters,
                        uniform=uniform, k=k)
    assert np.array_equal(sel_k.numpy(), _naive_select(keys, B, L, k=k.tolist()))
    srt = sorted(keys.values())
    th = (srt[len(srt) // 2] + srt[len(srt) // 2 + 1]) / 2  # between two scores, away from both
    _, _, sel_t = _call("reference", logits, cand, confidence=rule, temperature=temperature, counters=counters,
                        uniform=uniform, threshold=th)
    assert np.array_equal(sel_t.numpy(), _naive_select(keys, B, L, threshold=th))


# --------------------------------------------------------------------------------------------------------
# Every backend against the reference
# --------------------------------------------------------------------------------------------------------
SHAPES = {"reference": [], "cpp": [(2, 5, 1), (3, 7, 7), (2, 6, 1000), (2, 4, 3001)],
          "triton": [(2, 5, 1), (2, 4, 7), (1, 3, 300)], "cuda": [(2, 5, 1), (3, 7, 7), (4, 64, 5000)]}


@pytest.mark.parametrize("backend,B,L,V", C.cases({b: s for b, s in SHAPES.items() if b != "reference"}))
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
@pytest.mark.parametrize("rule", RULES)
def test_kernels_equal_the_reference(backend, B, L, V, temperature, rule):
    logits, cand, counters, uniform = _inputs(B, L, V, seed=V + B)
    cand[0] = False  # a row without candidates
    cand[-1] = True  # a row of candidates only
    args = dict(confidence=rule, temperature=temperature, counters=counters, uniform=uniform)
    k = torch.tensor([1, 0, L + 3, 2][:B] + [1] * max(0, B - 4))
    modes = ({}, {"k": k}, {"threshold": 0.3 if rule not in ("logprob", "entropy") else -1.0})
    if backend == "triton":  # interpreted: one mode here (its selection is the reference's code; the
        modes = modes[1:2]   # threshold and empty / full rows run in test_k_and_threshold_edges)
    for sel_kw in modes:
        want = _call("reference", logits, cand, **args, **sel_kw)
        got = _call(backend, logits, cand, **args, **sel_kw)
        if temperature > 0 and V > 2048:  # the float32 fast path: a draw may differ at a CDF boundary only
            z = logits.double()[cand] / temperature
            w = torch.exp(z - z.amax(-1, keepdim=True))
            u = torch.tensor([O.row_uniform(11, 3, int(c)) for c in counters[cand]])
            C.check_draws_near(got[0][cand], want[0][cand], w, u)
            if not torch.equal(got[0], want[0]):
                continue
        else:
            assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-6)
        assert torch.equal(got[2], want[2]), (sel_kw, got[1], want[1])


@pytest.mark.parametrize("backend,dtype", C.cases({"cpp": C.DTYPES, "triton": C.DTYPES, "cuda": C.DTYPES}))
def test_dtypes(backend, dtype):
    logits, cand, counters, uniform = _inputs(2, 6, 40, seed=3, dtype=dtype)
    for rule, temperature in (("llada", 0.0), ("prob", 0.8), ("margin", 1.0)):
        want = _call("reference", logits, cand, confidence=rule, temperature=temperature, counters=counters,
                     k=torch.tensor([2, 3]))
        got = _call(backend, logits, cand, confidence=rule, temperature=temperature, counters=counters,
                    k=torch.tensor([2, 3]))
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-6)
        assert torch.equal(got[2], want[2])


# --------------------------------------------------------------------------------------------------------
# Ties, k, threshold, exclude
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_ties(backend):
    """Equal logits: the lowest index; equal scores: the lower position first (k = 1 and threshold's best)."""
    V = 8
    row = torch.tensor([0.5, 2.0, 1.0, 2.0, -1.0, 2.0, 0.0, 1.5])
    logits = torch.stack([torch.stack([row.roll(1), row, row, row.roll(2)])] * 2)  # positions 1 and 2 tie
    cand = torch.tensor([[True, True, True, True], [False, True, True, False]])
    for rule in ("prob", "llada", "logprob", "margin", "entropy"):
        tok, conf, sel = _call(backend, logits, cand, confidence=rule, k=torch.tensor([1, 1]))
        assert tok[0, 1] == 1 and tok[0, 2] == 1  # first maximum
        assert conf[0, 1] == conf[0, 2]
        if rule == "margin":  # three maxima: margin 0 at every position, the first candidate wins
            assert sel[0].tolist() == [True, False, False, False]
        assert sel[1].tolist() == [False, True, False, False]
        _, _, sel_t = _call(backend, logits, cand, confidence=rule, threshold=math.inf)
        assert sel_t[1].tolist() == [False, True, False, False]
    u = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    _, _, sel = _call(backend, logits, torch.ones(2, 4, dtype=torch.bool), confidence="random", uniform=u,
                      k=torch.tensor([2, 3]))
    assert sel.tolist() == [[False, True, True, False], [True, True, True, False]]


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_k_and_threshold_edges(backend):
    logits, cand, _, uniform = _inputs(4, 10, 5, seed=9)
    cand[1] = False
    n = cand.sum(1)
    _, _, sel = _call(backend, logits, cand, confidence="random", uniform=uniform, k=torch.tensor([0, 3, 100, 1]))
    assert sel.sum(1).tolist() == [0, 0, int(n[2]), 1]
    _, _, sel = _call(backend, logits, cand, confidence="random", uniform=uniform, threshold=2.0)
    assert sel.sum(1).tolist() == [1 if c else 0 for c in n.tolist()]  # the best one per row with candidates
    assert all(bool(uniform[b][sel[b]] == uniform[b][cand[b]].max()) for b in range(4) if n[b])
    _, _, sel = _call(backend, logits, cand, confidence="random", uniform=uniform, threshold=0.0)
    assert torch.equal(sel, cand)
    _, _, sel = _call(backend, logits, cand, confidence="random", uniform=uniform,
                      threshold=float(uniform[0, cand[0]].sort().values[-2]))  # >= : the boundary is kept
    assert int(sel[0].sum()) == 2
    empty = _call(backend, logits, torch.zeros(4, 10, dtype=torch.bool), confidence="llada", k=torch.tensor([1] * 4))
    assert not empty[2].any() and bool(torch.isneginf(empty[1]).all())


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_exclude_is_a_minus_inf_column(backend):
    logits, cand, counters, _ = _inputs(2, 5, 9, seed=4)
    logits[..., 3] = 10.0  # would win everywhere
    masked = logits.clone()
    masked[..., 3] = float("-inf")
    for temperature in (0.0, 0.9):
        want = _call("reference", masked, cand, confidence="llada", temperature=temperature, counters=counters)
        nan_col = logits.clone()
        nan_col[..., 3] = float("nan")  # not read
        got = _call(backend, nan_col, cand, confidence="llada", temperature=temperature, counters=counters,
                    exclude=3)
        assert torch.equal(got[0], want[0]) and not bool((got[0][cand] == 3).any())
        torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-6)


def test_strided_logits_are_read_in_place():
    """A window of a larger tensor (the decoders' logits[:, lo:hi]) equals its contiguous copy."""
    big, cand, counters, _ = _inputs(2, 12, 30, seed=6)
    win = big[:, 3:9]
    for be in C.HERE:
        a = _call(be, win, cand[:, 3:9], confidence="prob", temperature=0.5, counters=counters[:, 3:9])
        b = _call(be, win.contiguous(), cand[:, 3:9], confidence="prob", temperature=0.5, counters=counters[:, 3:9])
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------------
# Value checks and bad arguments
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, match", [(math.nan, "logits: contains NaN"), (math.inf, "logits: contains +inf"),
                                          (None, "logits: a row has every logit at -inf")])
def test_bad_values_in_a_candidate_row_raise_the_same_error(value, match):
    logits, cand, _, _ = _inputs(2, 4, 6, seed=1)
    cand[1, 2] = True
    if value is None:
        logits[1, 2] = float("-inf")
    else:
        logits[1, 2, 4] = value
    C.same_error(lambda be: _call(be, logits, cand, confidence="llada", k=torch.tensor([1, 1])), InputError, match)
    cand[1, 2] = False  # not a candidate: not read
    for be in C.HERE:
        _call(be, logits, cand, confidence="llada", k=torch.tensor([1, 1]))


@pytest.mark.parametrize("kw, err, match", [
    ({"logits": torch.zeros(2, 3)}, InputError, "logits: expected shape (B, L, V)"),
    ({"logits": torch.zeros(2, 3, 4, dtype=torch.int64)}, InputTypeError, "logits: expected a floating tensor"),
    ({"candidates": torch.ones(2, 4, dtype=torch.bool)}, InputError, "candidates: shape (2, 4)"),
    ({"candidates": torch.ones(2, 3)}, InputTypeError, "candidates: expected a bool tensor"),
    ({"confidence": "max"}, InputError, "confidence: expected one of"),
    ({"temperature": 0.5}, InputError, "counter_rows: required"),
    ({"temperature": -1.0}, InputError, "temperature"),
    ({"temperature": 0.5, "counter_rows": torch.full((2, 3), -1)}, InputError, "counter_rows: must be >= 0"),
    ({"temperature": 0.5, "counter_rows": torch.zeros(2, 3, dtype=torch.int32)}, InputTypeError, "counter_rows"),
    ({"confidence": "random"}, InputError, "uniform: required"),
    ({"uniform": torch.zeros(2, 3)}, InputError, "uniform: required"),
    ({"k": torch.tensor([1, -1])}, InputError, "k: must be >= 0"),
    ({"k": torch.tensor([1, 1, 1])}, InputError, "k: expected shape (B,)"),
    ({"k": torch.tensor([1.0, 1.0])}, InputTypeError, "k: expected an int64 tensor"),
    ({"k": torch.tensor([1, 1]), "threshold": 0.5}, InputError, "k, threshold"),
    ({"threshold": math.nan}, InputError, "threshold: is NaN"),
    ({"exclude": 4}, InputError, "exclude: must lie in [0, 4)"),
])
def test_bad_arguments_are_named_on_every_backend(kw, err, match):
    args = {"logits": torch.zeros(2, 3, 4), "candidates": torch.ones(2, 3, dtype=torch.bool)}
    args.update(kw)
    logits, cand = args.pop("logits"), args.pop("candidates")
    C.same_error(lambda be: ops.select_tokens(logits, cand, backend=be, **args), err, match)


def test_inputs_are_not_modified():
    logits, cand, counters, uniform = _inputs(2, 5, 7, seed=2)
    copies = [t.clone() for t in (logits, cand, counters, uniform)]
    for be in C.HERE:
        _call(be, logits, cand, confidence="llada", temperature=0.5, counters=counters, exclude=2,
              k=torch.tensor([1, 2]))
        _call(be, logits, cand, confidence="random", uniform=uniform, exclude=2)
    assert all(torch.equal(a, b) for a, b in zip(copies, (logits, cand, counters, uniform)))


# --------------------------------------------------------------------------------------------------------
# As torch.library ops: one schema on every backend, opcheck, torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------------------
def _kernel_op(backend: str):
    importlib.import_module(f"fastdiff.ops.backends.{backend}.select_tokens")
    return C.op(backend, "select_tokens")


def test_one_schema_on_every_backend():
    names = [b for b in ("cpp", "triton") if b in C.HERE]
    if len(names) < 2:
        pytest.skip("needs the C++ and the Triton backends")
    assert len({str(_kernel_op(b)._schema).split("::", 1)[1] for b in names}) == 1


@pytest.mark.parametrize("backend", C.KERNELS)
def test_opcheck_select_tokens(backend):
    dev = C.device(backend)
    logits, cand, counters, uniform = (t.to(dev) for t in _inputs(2, 5, 9, seed=8))
    k = torch.tensor([2, 1], device=dev)
    for args in ((None, k, None, 1, 0.0, 3, 1, 0.0, 1, -1), (counters, None, None, 0, 0.7, -5, 2, 0.2, 2, 4),
                 (counters, None, uniform, 5, 1.0, 3, 1, 0.0, 0, -1)):
        torch.library.opcheck(_kernel_op(backend), (logits, cand, *args))


@pytest.mark.parametrize("backend", C.KERNELS)
def test_torch_compile_traces_without_a_graph_break(backend):
    dev = C.device(backend)
    logits, cand, counters, _ = (t.to(dev) for t in _inputs(2, 5, 9, seed=8))
    k = torch.tensor([2, 1], device=dev)
    fn = lambda lg, c, r, kk: ops.select_tokens(lg, c, confidence="llada", temperature=0.8, seed=3,  # noqa: E731
                                                offset=1, counter_rows=r, k=kk, backend=backend)
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(logits, cand, counters, k)
    for a, b in zip(got, fn(logits, cand, counters, k)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
