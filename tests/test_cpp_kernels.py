"""The C++ CPU kernels (fastdiff._C through fastdiff._cpp) against the references and independent oracles.

Every case calls the public op with ``backend="cpp"`` (so the public checks run first) and compares with
``<op>_ref`` or a float64 formula, never with the kernel itself. Draws must equal the reference's token
for token, except where ``u·W`` lies within rounding of a CDF boundary (wide float32 rows use a float32
exp for the chunk sums): such rows are counted, each must be a near-tie, and their number is bounded.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import _backends, ops
from fastdiff.errors import InputError
from fastdiff import discrete as D
from fastdiff import random as R
from fastdiff import schedules as S
from tests import _oracles as O
from tests.conftest import assert_close

if not _backends.cpp().available and os.environ.get("FASTDIFF_SKIP_EXT", "") not in ("", "0"):
    pytest.skip("FASTDIFF_SKIP_EXT is set: the C++ extension was not built on purpose", allow_module_level=True)

from fastdiff import _cpp  # noqa: E402  (fails loudly when the extension should exist but does not)

CPP = {"backend": "cpp"}
FUZZ = settings(max_examples=40, deadline=None)
T = 50


# --------------------------------------------------------------------------------------------------
# Philox uniforms
# --------------------------------------------------------------------------------------------------
def test_row_uniform_is_the_reference_philox():
    rows = torch.tensor([0, 1, 2, 97, 2**32 - 1, 2**32, 2**40 + 5], dtype=torch.int64)
    for seed, offset in [(0, 0), (2**64 - 1, 3), (123456789, 2**63 + 11)]:
        want = R.row_uniforms(seed, offset, rows)
        got = torch.tensor([_cpp._C.row_uniform(seed, offset, int(r)) for r in rows], dtype=torch.float64)
        assert torch.equal(got, want)
        assert _cpp._C.row_uniform(seed, offset, 5) == O.row_uniform(seed, offset, 5)


# --------------------------------------------------------------------------------------------------
# nearest_embedding
# --------------------------------------------------------------------------------------------------
def _scores64(x, w, metric):
    x64, w64 = x.reshape(-1, x.shape[-1]).double(), w.double()
    if metric == "l2":
        return (w64 * w64).sum(1)[None] - 2 * x64 @ w64.T
    return -(x64 @ (w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)


def _assert_nearest(idx, x, w, metric, exact):
    """Equal to the reference's indices; for float32 scoring a differing row must be a near-tie."""
    ref, _ = ops.nearest_embedding_ref(x, w, metric)
    assert idx.shape == ref.shape and idx.dtype == torch.int64
    if exact:
        assert torch.equal(idx, ref)
        return
    diff = (idx != ref).reshape(-1)
    if bool(diff.any()):
        sc = _scores64(x, w, metric)[diff]
        got = sc.gather(1, idx.reshape(-1, 1)[diff]).squeeze(1)
        want = sc.gather(1, ref.reshape(-1, 1)[diff]).squeeze(1)
        scale = 1 + sc.abs().max(1).values
        assert bool(((got - want).abs() <= 1e-5 * scale).all()), "a differing index is not a near-tie"
    assert int(diff.sum()) <= max(1, diff.numel() // 100)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,V,Dm", [(1, 1, 1), (7, 7, 3), (1000, 7, 128), (7, 50257, 3), (1000, 1, 768),
                                    (1, 50257, 128), (1000, 999, 1)])
def test_nearest_embedding_matches_reference(metric, N, V, Dm):
    g = torch.Generator().manual_seed(N + V + Dm)
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(N, Dm, generator=g, dtype=torch.float64).to(dtype)
        w = torch.randn(V, Dm, generator=g, dtype=torch.float64).to(dtype)
        idx, snapped = ops.nearest_embedding(x, w, metric, **CPP)
        _assert_nearest(idx, x, w, metric, exact=dtype == torch.float64)
        assert torch.equal(snapped, w[idx])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nearest_embedding_low_precision(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 97, 64, generator=g).to(dtype)
    w = torch.randn(501, 64, generator=g).to(dtype)
    for metric in ("l2", "cosine"):
        idx, snapped = ops.nearest_embedding(x, w, metric, **CPP)
        assert snapped.dtype == dtype and snapped.shape == x.shape
        _assert_nearest(idx, x, w, metric, exact=False)


def test_nearest_embedding_tiles_ties_and_layouts(monkeypatch):
    """Small tiles (so rows and vocabulary span many), exact ties across tiles go to the lowest index,
    non-contiguous inputs, leading batch dimensions, empty inputs."""
    monkeypatch.setattr(_cpp, "BLOCK_ROWS", 5)
    monkeypatch.setattr(_cpp, "BLOCK_COLS", 8)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 4, generator=g, dtype=torch.float64)
    w[37] = w[3]
    w[44] = w[3]
    w[20] = w[10] * 3  # same direction: a cosine tie
    x = torch.cat([w[[3, 44, 37]] + 1e-9, w[[10, 20]]])
    idx, _ = ops.nearest_embedding(x, w, **CPP)
    assert idx[:3].tolist() == [3, 3, 3]
    idx, _ = ops.nearest_embedding(w[[44, 20]], w, "cosine", **CPP)
    assert idx.tolist() == [3, 10]
    xs = torch.randn(16, 5, 19, generator=g).transpose(0, 2)  # (19, 5, 16) non-contiguous
    ws = torch.randn(40, 32, generator=g)[:, ::2]
    idx, snapped = ops.nearest_embedding(xs, ws, **CPP)
    assert idx.shape == (19, 5) and snapped.shape == (19, 5, 16)
    _assert_nearest(idx, xs, ws, "l2", exact=False)
    idx, snapped = ops.nearest_embedding(torch.zeros(0, 3, 16), ws, **CPP)
    assert idx.shape == (0, 3) and snapped.shape == (0, 3, 16)


@FUZZ
@given(N=st.integers(0, 40), V=st.integers(1, 60), Dm=st.integers(1, 20), metric=st.sampled_from(["l2", "cosine"]),
       seed=st.integers(0, 2**31), rows=st.integers(1, 9), cols=st.integers(1, 70))
def test_nearest_embedding_fuzz(N, V, Dm, metric, seed, rows, cols):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Dm, generator=g, dtype=torch.float64)
    w = torch.randn(V, Dm, generator=g, dtype=torch.float64)
    w[torch.randint(0, V, (V // 3,), generator=g)] = w[0].clone()  # duplicated rows: exact ties
    old = _cpp.BLOCK_ROWS, _cpp.BLOCK_COLS
    _cpp.BLOCK_ROWS, _cpp.BLOCK_COLS = rows, cols
    try:
        idx, _ = ops.nearest_embedding(x, w, metric, **CPP)
    finally:
        _cpp.BLOCK_ROWS, _cpp.BLOCK_COLS = old
    ref = ops.nearest_embedding_ref(x, w, metric)[0]
    # Duplicated rows score equally up to the BLAS kernel's rounding, which may differ between a tile
    # of 70 columns and one of 1: a different index is allowed only at a float64 near-tie.
    sc = _scores64(x, w, metric)
    got, want = sc.gather(1, idx[:, None]).squeeze(1), sc.gather(1, ref[:, None]).squeeze(1)
    assert bool(((idx == ref) | ((got - want).abs() <= 1e-12 * (1 + want.abs()))).all())


# --------------------------------------------------------------------------------------------------
# rounding_loss
# --------------------------------------------------------------------------------------------------
def _grads(fn, x, w, target, b, reduction, ignore_index=-100, grad_out=None):
    loss = fn(x, w, target, b, reduction=reduction, ignore_index=ignore_index)
    inputs = [x, w] + ([b] if b is not None else [])
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    return loss, torch.autograd.grad(loss, inputs, grad_out)


@pytest.mark.parametrize("N,V,Dm", [(1, 1, 1), (7, 7, 3), (1000, 7, 128), (7, 50257, 3), (97, 301, 768)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rounding_loss_float64_matches_reference(N, V, Dm, reduction):
    g = torch.Generator().manual_seed(N * V + Dm)
    x = torch.randn(N, Dm, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, Dm, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=g)
    target[::3] = -100
    go = torch.rand(N, generator=g, dtype=torch.float64) if reduction == "none" else None
    loss, got = _grads(lambda *a, **k: ops.rounding_loss(*a, **k, **CPP), x, w, target, b, reduction, grad_out=go)
    ref, want = _grads(ops.rounding_loss_ref, x, w, target, b, reduction, grad_out=go)
    assert_close(loss, ref, atol=1e-11, rtol=1e-11, name="loss")
    for name, a, c in zip(("x", "weight", "bias"), got, want):
        assert_close(a, c, atol=1e-11, rtol=1e-9, name=name)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_rounding_loss_low_precision(dtype, atol, monkeypatch):
    monkeypatch.setattr(_cpp, "LOSS_CHUNK_ELEMENTS", 257 * 10)  # several chunks
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 64, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(257, 64, generator=g) * 0.2).to(dtype).requires_grad_()
    b = torch.randn(257, generator=g).requires_grad_()  # float32 bias beside low-precision x, w
    target = torch.randint(0, 257, (3, 17), generator=g)
    loss, got = _grads(lambda *a, **k: ops.rounding_loss(*a, **k, **CPP), x, w, target, b, "mean")
    ref, want = _grads(ops.rounding_loss_ref, x, w, target, b, "mean")
    assert loss.dtype == torch.float32 and ref.dtype == torch.float32
    assert_close(loss, ref, atol=atol, rtol=1e-5, name="loss")
    for name, a, c in zip(("x", "weight", "bias"), got, want):
        assert a.dtype == c.dtype
        assert_close(a, c, atol=atol, rtol=1e-2, name=name)


def test_rounding_loss_layouts_ignore_index_and_edge_cases(monkeypatch):
    monkeypatch.setattr(_cpp, "LOSS_CHUNK_ELEMENTS", 9 * 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, 6, generator=g, dtype=torch.float64).transpose(0, 1).requires_grad_()
    w = torch.randn(9, 12, generator=g, dtype=torch.float64)[:, ::2].requires_grad_()
    target = torch.randint(0, 9, (5, 8), generator=g)
    target[target == 4] = 7
    for red in ("mean", "sum", "none"):
        loss, got = _grads(lambda *a, **k: ops.rounding_loss(*a, **k, **CPP), x, w, target, None, red, 7)
        ref, want = _grads(ops.rounding_loss_ref, x, w, target, None, red, 7)
        assert_close(loss, ref, atol=1e-12, rtol=1e-12)
        for a, c in zip(got, want):
            assert_close(a, c, atol=1e-12, rtol=1e-10)
    # every target ignored: mean (sum / max(count, 1)) and sum are 0, and the gradients are zero
    allign = torch.full((5, 8), -100)
    for red in ("mean", "sum"):
        loss, (gx, gw) = _grads(lambda *a, **k: ops.rounding_loss(*a, **k, **CPP), x, w, allign, None, red)
        assert float(loss) == 0 and not bool(gx.any()) and not bool(gw.any())
    # no rows at all; no gradient requested
    empty = ops.rounding_loss(torch.zeros(0, 6), torch.randn(9, 6), torch.zeros(0, dtype=torch.int64),
                              reduction="none", **CPP)
    assert empty.shape == (0,)
    with torch.no_grad():
        assert_close(ops.rounding_loss(x, w, target, **CPP), ops.rounding_loss_ref(x, w, target), atol=1e-12)


@FUZZ
@given(N=st.integers(0, 12), V=st.integers(1, 40), Dm=st.integers(1, 9), seed=st.integers(0, 2**31),
       reduction=st.sampled_from(["mean", "sum", "none"]), bias=st.booleans(), chunk=st.integers(1, 100))
def test_rounding_loss_fuzz(N, V, Dm, seed, reduction, bias, chunk):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, Dm, generator=g, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(V, Dm, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    target = torch.randint(-1, V, (N,), generator=g)
    old = _cpp.LOSS_CHUNK_ELEMENTS
    _cpp.LOSS_CHUNK_ELEMENTS = chunk
    try:
        loss, got = _grads(lambda *a, **k: ops.rounding_loss(*a, **k, **CPP), x, w, target, b, reduction, -1)
    finally:
        _cpp.LOSS_CHUNK_ELEMENTS = old
    ref, want = _grads(ops.rounding_loss_ref, x, w, target, b, reduction, -1)
    assert_close(loss, ref, atol=1e-11, rtol=1e-11)
    for a, c in zip(got, want):
        assert_close(a, c, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("op,change,err,match", [
    ("nearest", dict(x=torch.randn(3, 5)), ValueError, "x"),
    ("nearest", dict(weight=torch.randn(0, 4)), ValueError, "weight"),
    ("nearest", dict(weight=torch.randn(6, 4).double()), TypeError, "weight"),
    ("nearest", dict(x=torch.full((3, 4), float("inf"))), ValueError, "x"),
    ("nearest", dict(metric="dot"), ValueError, "metric"),
    ("loss", dict(target=torch.tensor([0, 1, 6])), ValueError, "target"),
    ("loss", dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target"),
    ("loss", dict(bias=torch.randn(5)), ValueError, "bias"),
    ("loss", dict(weight=torch.full((6, 4), float("nan"))), ValueError, "weight"),
    ("loss", dict(reduction="avg"), ValueError, "reduction"),
])
def test_embedding_ops_reject_bad_input_before_the_kernel(op, change, err, match):
    args = dict(x=torch.randn(3, 4), weight=torch.randn(6, 4))
    args.update({"metric": "l2"} if op == "nearest" else {"target": torch.tensor([0, 1, 5])})
    args.update(change)
    fn = ops.nearest_embedding if op == "nearest" else ops.rounding_loss
    with pytest.raises(err, match=match):
        fn(**args, backend="cpp")


def test_rounding_loss_has_no_second_derivative():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.rounding_loss(x, w, torch.tensor([0, 1, 5]), **CPP), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):  # never silently 0
        gx.sum().backward()


# --------------------------------------------------------------------------------------------------
# categorical_posterior / posterior_sample
# --------------------------------------------------------------------------------------------------
def _processes(V: int) -> dict:
    g = torch.Generator().manual_seed(V)
    procs = {
        "absorbing": D.Absorbing(V, V - 1, S.mutual_info(T)),
        "absorbing-mid": D.Absorbing(V, V // 2, S.cosine(T)),
        "absorbing-spindle": D.Absorbing(V, V - 1, S.spindle(T, torch.randn(V, generator=g) * 0.3)),
        "uniform": D.Uniform(V, S.cosine(T)),
    }
    if V <= 64:
        procs["gaussian-band"] = D.GaussianBand(V, S.cosine(T), bandwidth=2)
        procs["dense"] = D.Dense(torch.softmax(torch.randn(V, V, generator=g), -1), T)
    return procs


def _post_inputs(process, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    V = process.vocab_size
    logits = (torch.randn(n, V, generator=g) * 2).to(dtype)
    logits[0, : V // 3] = float("-inf")  # masked categories
    xt = torch.randint(0, V, (n,), generator=g)
    if process.kind == "absorbing":
        xt = torch.where(torch.rand(n, generator=g) < 0.6, torch.full_like(xt, process.mask_id), xt)
    t = torch.randint(2, T + 1, (n,), generator=g)
    s = t - torch.randint(1, 3, (n,), generator=g)
    return logits, xt, t, s


def _assert_draws(got, ref, weights_fn, seed, offset, fast):
    """Same tokens; on the float32 fast path a differing row must be a near-tie, and they must be rare."""
    diff = (got != ref).reshape(-1).nonzero().squeeze(-1).tolist()
    if not fast:
        assert not diff, f"rows {diff[:5]} differ"
        return
    for r in diff:
        w = weights_fn(r)
        assert O.margin(w, O.row_uniform(seed, offset, r)) < 1e-6, f"row {r} differs and is not a near-tie"
    assert len(diff) <= max(1, got.numel() // 200), f"{len(diff)} of {got.numel()} rows differ"


@pytest.mark.parametrize("V", [2, 7, 61, 50257])
def test_posterior_matches_reference(V):
    n = 40 if V < 1000 else 24
    for k, (name, process) in enumerate(_processes(V).items()):
        dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16) if V < 1000 else (torch.float32,)
        for dtype in dtypes:
            logits, xt, t, s = _post_inputs(process, n, seed=V + k, dtype=dtype)
            temp = 0.8 if k % 2 else 1.0
            probs = ops.categorical_posterior(process, logits, xt, t, s, temp, **CPP)
            ref = ops.categorical_posterior_ref(process, logits, xt, t, s, temp)
            assert probs.dtype == ref.dtype and probs.shape == ref.shape
            assert_close(probs, ref, atol=2e-7 if dtype == torch.float64 else 1e-6, rtol=1e-5, name=name)
            seed, offset = 1000 + k, 7
            got = ops.posterior_sample(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp, **CPP)
            want = ops.posterior_sample_ref(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp)
            w64 = lambda r: ops.categorical_posterior_ref(process, logits[r:r + 1].double(), xt[r:r + 1],  # noqa
                                                          t[r:r + 1], s[r:r + 1], temp)[0].numpy()
            _assert_draws(got, want, w64, seed, offset, fast=V > 2048 and dtype != torch.float64)


def test_posterior_wide_rows_bounded_near_ties():
    """Many wide float32 rows (the fast path): count the rows that differ from the reference."""
    V, n = 50257, 300
    for name in ("absorbing", "uniform"):
        process = _processes(V)[name]
        logits, xt, t, s = _post_inputs(process, n, seed=3)
        xt = torch.full_like(xt, process.mask_id) if name == "absorbing" else xt
        got = ops.posterior_sample(process, logits, xt, t, s, seed=5, **CPP)
        want = ops.posterior_sample_ref(process, logits, xt, t, s, seed=5)
        w64 = lambda r: ops.categorical_posterior_ref(process, logits[r:r + 1].double(), xt[r:r + 1],  # noqa
                                                      t[r:r + 1], s[r:r + 1])[0].numpy()
        _assert_draws(got, want, w64, 5, 0, fast=True)


def test_posterior_layouts_batches_and_empty():
    process = _processes(17)["uniform"]
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 6, 17, generator=g).transpose(0, 1)  # (6, 9, 17) non-contiguous rows
    xt = torch.randint(0, 17, (6, 9), generator=g)
    got = ops.posterior_sample(process, logits, xt, 20, 5, seed=1, **CPP)
    assert torch.equal(got, ops.posterior_sample_ref(process, logits, xt, 20, 5, seed=1))
    strided = torch.randn(6, 9, 34, generator=g)[..., ::2]  # last dimension strided
    assert_close(ops.categorical_posterior(process, strided, xt, 20, 5, **CPP),
                 ops.categorical_posterior_ref(process, strided, xt, 20, 5), atol=1e-6)
    empty = torch.zeros(0, 17)
    assert ops.posterior_sample(process, empty, torch.zeros(0, dtype=torch.int64), 3, seed=0, **CPP).shape == (0,)
    assert ops.categorical_posterior(process, empty, torch.zeros(0, dtype=torch.int64), 3, **CPP).shape == (0, 17)


def test_posterior_rows_with_only_the_mask_logit_are_rejected():
    """A masked row whose only finite logit is the (ignored) mask logit has no x0 distribution: the kernel's
    own value check raises the reference's InputError (it used to keep x_t, so sampling could return
    all-[MASK] output silently). Unmasked rows are carried over and may look like that."""
    process = D.Absorbing(6, 5, S.cosine(T))
    logits = torch.full((2, 6), float("-inf"))
    logits[:, 5] = 0.0
    for xt in (torch.tensor([5, 5]), torch.tensor([0, 5])):
        for backend in ("cpp", "reference"):
            with pytest.raises(InputError, match="x0_logits: a masked row"):
                ops.posterior_sample(process, logits, xt, 10, 3, seed=0, backend=backend)
            with pytest.raises(InputError, match="x0_logits: a masked row"):
                ops.categorical_posterior(process, logits, xt, 10, 3, backend=backend)
    with pytest.raises(ValueError, match="x0_logits: a masked row"):  # the kernel's check, bypassing the op's
        _cpp.posterior_sample(process, logits, torch.tensor([5, 5]), torch.tensor([10, 10]), torch.tensor([3, 3]),
                              seed=0, offset=0, temperature=1.0)
    carried = torch.tensor([0, 1])
    assert torch.equal(ops.posterior_sample(process, logits, carried, 10, 3, seed=0, **CPP), carried)
    spindle = D.Absorbing(6, 5, S.spindle(T, torch.linspace(0, 1, 6)))
    with pytest.raises(InputError, match="x0_logits: a masked row"):
        ops.posterior_sample(spindle, logits, torch.tensor([5, 0]), 10, 3, seed=0, **CPP)


def test_nan_in_the_mask_column_of_a_masked_row_is_rejected():
    """The absorbing row pass skips the mask column; a NaN there was dropped by std::max (found by fuzzing)."""
    for process in (D.Absorbing(6, 5, S.cosine(T)), D.Absorbing(6, 2, S.spindle(T, torch.linspace(0, 1, 6)))):
        for dtype in (torch.float32, torch.float64):
            logits = torch.randn(3, 6, dtype=dtype)
            logits[1, process.mask_id] = float("nan")
            xt = torch.full((3,), process.mask_id)
            for op in (ops.categorical_posterior, lambda *a, **k: ops.posterior_sample(*a, seed=0, **k)):
                with pytest.raises(InputError, match="x0_logits: contains NaN"):
                    op(process, logits, xt, 10, 3, **CPP)


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN"), (float("inf"), r"\+inf"), (None, "-inf")])
def test_posterior_bad_values_rejected_by_op_and_by_kernel(bad, match):
    process = _processes(7)["absorbing"]
    logits, xt, t, s = _post_inputs(process, 5, seed=1)
    xt[:] = 0  # no masked row: the kernel must still check every row
    if bad is None:
        logits[3] = float("-inf")
    else:
        logits[3, 2] = bad
    for op in (ops.categorical_posterior, lambda *a, **k: ops.posterior_sample(*a, seed=0, **k)):
        for backend in ("cpp", "reference"):  # the kernel checks in its pass; the reference path before
            with pytest.raises(ValueError, match="x0_logits.*" + match):
                op(process, logits, xt, t, s, backend=backend)
    # the kernel's own check, bypassing the public one
    with pytest.raises(ValueError, match="x0_logits.*" + match):
        _cpp.posterior_sample(process, logits, xt, t, s, seed=0, offset=0, temperature=1.0)
    with pytest.raises(ValueError, match="x0_logits.*" + match):
        _cpp.categorical_posterior(process, logits, xt, t, s, 1.0)


@FUZZ
@given(V=st.integers(2, 30), n=st.integers(1, 8), data=st.data(),
       kind=st.sampled_from(["absorbing", "absorbing-mid", "absorbing-spindle", "uniform", "gaussian-band"]),
       seed=st.integers(0, 2**64 - 1), temp=st.floats(0.1, 4.0))
def test_posterior_fuzz(V, n, data, kind, seed, temp):
    process = _processes(V)[kind]
    t = data.draw(st.integers(1, T))
    s = data.draw(st.integers(0, t - 1))
    vals = data.draw(st.lists(st.one_of(st.floats(-20, 20), st.just(float("-inf"))), min_size=n * V, max_size=n * V))
    logits = torch.tensor(vals, dtype=torch.float64).reshape(n, V)
    logits[:, data.draw(st.integers(0, V - 1))] = 0.0
    logits[:, (process.mask_id + 1) % V if kind.startswith("absorbing") else 0] = 1.0
    xt = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)))
    probs = ops.categorical_posterior(process, logits, xt, t, s, temp, **CPP)
    assert_close(probs, ops.categorical_posterior_ref(process, logits, xt, t, s, temp), atol=1e-12)
    got = ops.posterior_sample(process, logits, xt, t, s, seed=seed, temperature=temp, **CPP)
    want = ops.posterior_sample_ref(process, logits, xt, t, s, seed=seed, temperature=temp)
    for r in range(n):
        if got[r] != want[r]:  # only a float64 near-tie may differ
            assert O.margin(probs[r].numpy(), O.row_uniform(seed, 0, r)) < 1e-12


# --------------------------------------------------------------------------------------------------
# sample_categorical
# --------------------------------------------------------------------------------------------------
MODES = [dict(), dict(temperature=0.0), dict(temperature=0.6, top_k=5), dict(top_p=0.9), dict(top_k=50, top_p=0.5),
         dict(temperature=1.7, top_k=1), dict(top_p=0.05)]


def _filtered_weights(logits, temperature=1.0, top_k=None, top_p=None):
    z = logits.double() / temperature
    return ops.filter_weights(z, top_k, top_p)


@pytest.mark.parametrize("V", [1, 7, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sample_categorical_matches_reference(V, dtype):
    n = 33 if V < 1000 else 12
    if V > 1000 and dtype in (torch.float16, torch.bfloat16):
        n = 6
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(n, V, generator=g) * 3).to(dtype)
    if V > 1:
        logits[1, ::2] = float("-inf")
        logits[2, : V // 2 + 1] = logits[2, 0]  # a long tie
    for k, mode in enumerate(MODES):
        seed, offset = 77 + k, k
        got = ops.sample_categorical(logits, seed=seed, offset=offset, **mode, **CPP)
        want = ops.sample_categorical_ref(logits, seed=seed, offset=offset, **mode)
        assert got.shape == (n,) and got.dtype == torch.int64
        if mode.get("temperature") == 0.0:
            assert torch.equal(got, want)
            continue
        kw = {k2: mode.get(k2) for k2 in ("top_k", "top_p")}
        w = _filtered_weights(logits, mode.get("temperature", 1.0), **kw)
        assert bool((w.gather(1, got[:, None]) > 0).all()), f"{mode}: a token outside the kept set"
        _assert_draws(got, want, lambda r: w[r].numpy(), seed, offset, fast=V > 2048 and dtype != torch.float64)


def test_sample_categorical_ties_and_layouts():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]]).expand(4000, 5)
    got = ops.sample_categorical(logits, seed=0, top_k=2, **CPP)
    assert torch.equal(got, ops.sample_categorical_ref(logits, seed=0, top_k=2))
    assert set(got.unique().tolist()) == {0, 1, 2, 3}
    p = torch.tensor([0.4, 0.2, 0.2, 0.2, 0.0]).log().expand(4000, 5)
    got = ops.sample_categorical(p, seed=0, top_p=0.5, **CPP)
    assert torch.equal(got, ops.sample_categorical_ref(p, seed=0, top_p=0.5))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 97, 33, generator=g).transpose(0, 1)
    assert torch.equal(ops.sample_categorical(x, seed=1, **CPP), ops.sample_categorical_ref(x, seed=1))
    assert ops.sample_categorical(torch.zeros(0, 4), seed=1, **CPP).shape == (0,)
    with pytest.raises(ValueError, match="logits"):
        ops.sample_categorical(torch.tensor([[0.0, float("nan")]]), seed=0, **CPP)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample_categorical(torch.zeros(2, 3), seed=0, top_p=0.0, **CPP)


@FUZZ
@given(n=st.integers(1, 6), V=st.integers(1, 40), data=st.data(), seed=st.integers(0, 2**64 - 1),
       offset=st.integers(0, 2**40), temperature=st.floats(0.05, 5.0),
       top_k=st.one_of(st.none(), st.integers(1, 50)), top_p=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_sample_categorical_fuzz(n, V, data, seed, offset, temperature, top_k, top_p):
    vals = data.draw(st.lists(st.one_of(st.floats(-30, 30), st.just(float("-inf")), st.sampled_from([0.0, 1.0])),
                              min_size=n * V, max_size=n * V))
    x = torch.tensor(vals, dtype=torch.float64).reshape(n, V)
    x[:, data.draw(st.integers(0, V - 1))] = data.draw(st.floats(-5, 5))
    got = ops.sample_categorical(x, seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p,
                                 **CPP)
    want = ops.sample_categorical_ref(x, seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p)
    w = _filtered_weights(x, temperature, top_k, top_p).numpy()
    e = _filtered_weights(x, temperature, None, None).numpy()
    for r in range(n):
        if top_p is not None and _has_weight_near_tie(e[r]):
            # Two weights a few ulps apart: whether they tie in the reference depends on the rounding of
            # torch's sum (p = w / sum w); the kernel ties equal weights. Only the support is checked.
            assert e[r, int(got[r])] > 0
            continue
        assert w[r, int(got[r])] > 0
        if got[r] != want[r]:
            assert O.margin(w[r], O.row_uniform(seed, offset, r)) < 1e-12


def _has_weight_near_tie(e: np.ndarray) -> bool:
    v = np.unique(e[e > 0])
    return bool(len(v) > 1 and (np.diff(v) <= 1e-14 * v[1:]).any())


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.0), dict(top_k=3), dict(top_p=0.5)])
@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN"), (float("inf"), r"\+inf"), (None, "every logit")])
def test_sample_categorical_kernel_checks_values_itself(kw, bad, match):
    """The public op skips its own read pass for the cpp kernel, which must raise the same error."""
    from fastdiff import _cpp
    assert _cpp.sample_categorical.checks_values
    logits = torch.randn(37, 300)
    if bad is None:
        logits[21] = float("-inf")
    else:
        logits[21, 123] = bad
    with pytest.raises(ValueError, match=f"logits: .*{match}"):
        ops.sample_categorical(logits, seed=1, backend="cpp", **kw)
    with pytest.raises(ValueError, match=f"logits: .*{match}"):
        ops.sample_categorical_ref(logits, seed=1, **kw)
