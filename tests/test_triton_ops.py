"""The Triton backend (``backend="triton"``) against the references, op by op.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by the fixture
below before ``fastdiff.kernels`` is imported), so shapes stay small but odd: V 1, 7, 97, 300 (several
row tiles: the interpreter's row tile is 128), N 0, 1, 19, 40, every float dtype, non-contiguous views.
With a GPU the same tests run compiled on CUDA tensors, plus the large-shape tests at the end.

Equality is with the reference (never with the kernel itself): exact for indices and tokens, except
where the reference's own float64 margin says the answer is within rounding of a tie or of a CDF
boundary; such rows are counted and bounded.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import ops
from tests._triton import triton_backend
from fastdiff import discrete as D
from fastdiff import random as R
from fastdiff import schedules as S
from fastdiff.ops import filter_weights
from tests.conftest import assert_close

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="optional backend: triton is not installed (pip install 'fastdiff[triton]')")

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NEAR = 1e-6  # relative distance to a CDF boundary / score gap below which a disagreement is a near-tie
T = 50


@pytest.fixture(scope="module", autouse=True)
def kernels():
    yield from triton_backend()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_draws(got: torch.Tensor, want: torch.Tensor, weights: torch.Tensor, u: torch.Tensor,
                 max_near: int = 1) -> None:
    """Tokens equal the reference's, except rows whose draw ``u·Z`` lies within ``NEAR·Z`` of a
    cumulative boundary of the reference's float64 weights (at most ``max_near`` such rows)."""
    got, want = got.reshape(-1).cpu(), want.reshape(-1).cpu()
    bad = (got != want).nonzero().squeeze(-1)
    if bad.numel() == 0:
        return
    w = weights.reshape(-1, weights.shape[-1]).cpu().double()[bad]
    c = torch.cumsum(w, -1)
    gap = ((c - (u.cpu()[bad] * c[:, -1]).unsqueeze(-1)).abs().min(-1).values / c[:, -1])
    assert bool((gap < NEAR).all()), f"rows {bad.tolist()} differ from the reference away from a boundary"
    assert bad.numel() <= max_near, f"{bad.numel()} near-tie disagreements"


# --------------------------------------------------------------------------------------------------
# nearest_embedding
# --------------------------------------------------------------------------------------------------
def _scores64(x: torch.Tensor, w: torch.Tensor, metric: str) -> torch.Tensor:
    x64, w64 = x.reshape(-1, x.shape[-1]).double().cpu(), w.double().cpu()
    if metric == "l2":
        return (w64 * w64).sum(1) - 2.0 * x64 @ w64.T
    return -(x64 @ (w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)


def _check_nearest(idx, snapped, x, w, metric):
    ref, ref_snapped = ops.nearest_embedding(x, w, metric, backend="reference")
    assert idx.dtype == torch.int64 and idx.shape == x.shape[:-1] and idx.device == x.device
    assert snapped.dtype == w.dtype and snapped.shape == x.shape
    assert torch.equal(snapped, w[idx])
    if x.dtype == torch.float64:
        assert torch.equal(idx, ref)
        return
    # float32 scores in a different summation order: a different index only at a near-tie
    sc = _scores64(x, w, metric)
    got = sc.gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    best = sc.gather(1, ref.reshape(-1, 1).cpu()).squeeze(1)
    scale = (x.reshape(-1, x.shape[-1]).double().norm(dim=1).cpu() * w.double().norm(dim=1).max().cpu()
             + (w.double() ** 2).sum(1).max().cpu()).clamp_min(1)
    assert bool(((got - best).abs() <= 1e-5 * scale).all())
    assert (idx != ref).sum().item() <= max(1, idx.numel() // 50)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,V,D", [(1, 1, 1), (7, 7, 3), (40, 97, 64), (19, 300, 33)])
def test_nearest_embedding_equals_reference(dtype, metric, N, V, D):
    g = _gen(N * 31 + V)
    x = torch.randn(N, D, generator=g).to(DEV, dtype)
    w = torch.randn(V, D, generator=g).to(DEV, dtype)
    idx, snapped = ops.nearest_embedding(x, w, metric, backend="triton")
    _check_nearest(idx, snapped, x, w, metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_embedding_ties_go_to_lowest_index_across_tiles_and_splits(metric):
    g = _gen(5)
    w = torch.randn(300, 16, generator=g, dtype=torch.float64)
    for j in (37, 130, 299):  # other row tiles and other vocabulary splits
        w[j] = w[3]
    x = torch.cat([w[[3, 130]], w[[299]] * 2.0]).to(DEV)
    idx, _ = ops.nearest_embedding(x, w.to(DEV), metric, backend="triton")
    assert idx.tolist()[:2] == [3, 3]
    if metric == "cosine":  # 2·w[3] has the same direction: still the lowest index
        assert idx.tolist()[2] == 3


def test_nearest_embedding_non_contiguous_batched_and_empty():
    g = _gen(6)
    x = torch.randn(16, 5, 19, generator=g).to(DEV).transpose(0, 2)  # (19, 5, 16)
    w = torch.randn(40, 32, generator=g).to(DEV)[:, ::2]  # (40, 16), strided
    idx, snapped = ops.nearest_embedding(x, w, backend="triton")
    assert idx.shape == (19, 5)
    _check_nearest(idx, snapped, x, w, "l2")
    idx, snapped = ops.nearest_embedding(x[:0], w, backend="triton")
    assert idx.shape == (0, 5) and snapped.shape == (0, 5, 16)


# --------------------------------------------------------------------------------------------------
# rounding_loss
# --------------------------------------------------------------------------------------------------
def _loss_inputs(N, V, D, dtype, bias, seed):
    g = _gen(seed)
    x = torch.randn(N, D, generator=g).to(DEV, dtype).requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g)).to(DEV, dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(DEV, dtype).requires_grad_() if bias else None
    target = torch.randint(0, V, (N,), generator=g).to(DEV)
    target[::4] = -100
    return x, w, b, target


def _plain(x, w, b, target, reduction, dtype=None):
    """Cross-entropy written out with autograd, in ``dtype`` (default: the inputs' own)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    z = cast(x) @ cast(w).T
    if b is not None:
        z = z + cast(b)
    return F.cross_entropy(z, target, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_rounding_loss_forward_and_gradients(dtype, reduction, bias):
    N, V, D = (19, 97, 24) if dtype == torch.float64 else (40, 300, 33)
    x, w, b, target = _loss_inputs(N, V, D, dtype, bias, seed=N + V)
    inputs = [x, w] + ([b] if bias else [])
    loss = ops.rounding_loss(x, w, target, b, reduction, backend="triton")
    ref = ops.rounding_loss(x, w, target, b, reduction, backend="reference")
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    up = torch.rand(loss.shape, generator=_gen(1)).to(DEV, loss.dtype)  # a non-uniform upstream gradient
    got = torch.autograd.grad((loss * up).sum(), inputs)
    if dtype in (torch.float32, torch.float64):
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert_close(loss, ref, atol=tol, rtol=tol, name="loss")
        want = torch.autograd.grad((ref * up).sum(), inputs)
        for name, a, c in zip("xwb", got, want):
            assert_close(a, c, atol=tol, rtol=1e-10 if dtype == torch.float64 else 1e-4, name=f"d{name}")
        return
    assert_close(loss, ref, atol=2e-5, rtol=2e-5, name="loss")  # float32 maths on the same inputs
    # gradients: as exact as PyTorch in this dtype (flash-attention's rule), against float64 truth
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    truth = torch.autograd.grad((_plain(*leaves64[:2], leaves64[2] if bias else None, target, reduction)
                                 * up.double()).sum(), leaves64)
    leaves = [t.detach().requires_grad_() for t in inputs]
    base = torch.autograd.grad((_plain(*leaves[:2], leaves[2] if bias else None, target, reduction).float()
                                * up).sum(), leaves)
    for name, a, c, bl in zip("xwb", got, truth, base):
        assert a.dtype == dtype
        assert_close(a, c, atol=1e-3, baseline=bl, name=f"d{name}")


def test_rounding_loss_edge_shapes_and_partial_grads():
    # V = 1: the loss is 0 and so are the gradients
    x, w, _, _ = _loss_inputs(5, 1, 4, torch.float64, False, seed=2)
    target = torch.zeros(5, dtype=torch.int64, device=DEV)
    loss = ops.rounding_loss(x, w, target, backend="triton")
    assert loss.item() == 0.0
    # non-contiguous x and W, only x requiring grad, reduction "none" on a batch shape
    g = _gen(3)
    x = torch.randn(8, 5, 6, generator=g, dtype=torch.float64).to(DEV).transpose(0, 1).requires_grad_()
    w = torch.randn(9, 12, generator=g, dtype=torch.float64).to(DEV)[:, ::2]
    target = torch.randint(0, 9, (5, 8), generator=g).to(DEV)
    loss = ops.rounding_loss(x, w, target, reduction="none", backend="triton")
    ref = ops.rounding_loss(x, w, target, reduction="none", backend="reference")
    assert_close(loss, ref, atol=1e-12)
    (gx,) = torch.autograd.grad(loss.sum(), [x])
    (rx,) = torch.autograd.grad(ref.sum(), [x])
    assert_close(gx, rx, atol=1e-12)
    # the backward is not itself differentiable: asking for a second derivative raises
    loss = ops.rounding_loss(x, w, target, backend="triton")
    (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), [x])
    # N = 0
    x0 = torch.zeros(0, 6, dtype=torch.float64, device=DEV)
    t0 = torch.zeros(0, dtype=torch.int64, device=DEV)
    assert ops.rounding_loss(x0, w, t0, reduction="sum", backend="triton").item() == 0.0
    assert ops.rounding_loss(x0, w, t0, reduction="none", backend="triton").shape == (0,)
    assert ops.rounding_loss(x0, w, t0, backend="triton").item() == 0.0  # mean over no targets: sum / max(count, 1)


# --------------------------------------------------------------------------------------------------
# categorical_posterior / posterior_sample
# --------------------------------------------------------------------------------------------------
def _processes(V: int) -> dict:
    g = _gen(V)
    procs = {
        "absorbing": D.Absorbing(V, V - 1, S.mutual_info(T)),
        "absorbing-spindle": D.Absorbing(V, 1, S.spindle(T, torch.randn(V, generator=g) * 0.3)),
        "uniform": D.Uniform(V, S.cosine(T)),
    }
    if V <= 64:
        procs["gaussian-band"] = D.GaussianBand(V, S.cosine(T), bandwidth=3)
        procs["dense"] = D.Dense(torch.softmax(torch.randn(V, V, generator=g) * 2, -1), T)
    return procs


def _posterior_inputs(process, shape, seed, dtype):
    g = _gen(seed)
    V = process.vocab_size
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    if V > 3:
        logits[..., 2] = float("-inf")  # a masked category: never drawn
    xt = torch.randint(0, V, shape, generator=g)
    if process.kind == "absorbing":
        xt = torch.where(torch.rand(shape, generator=g) < 0.7, torch.full_like(xt, process.mask_id), xt)
    t = torch.randint(2, T + 1, shape[:1], generator=g)
    s = torch.where(torch.arange(shape[0]) % 3 == 0, torch.zeros_like(t), t // 2)  # some steps to s = 0
    return logits.to(DEV), xt.to(DEV), t.to(DEV), s.to(DEV)


@pytest.mark.parametrize("V,dtype", [(2, torch.float32), (7, torch.float64), (7, torch.bfloat16), (300, torch.float16),
                                     (300, torch.bfloat16), (300, torch.float32), (300, torch.float64)], ids=str)
def test_posterior_ops_equal_reference(V, dtype):
    seed, offset, temp = 2**64 - 1, 2**40 + 3, 0.8
    for name, process in _processes(V).items():
        shape = (4, 5) if V > 64 else (3, 7)
        logits, xt, t, s = _posterior_inputs(process, shape, seed=V, dtype=dtype)
        probs = ops.categorical_posterior(process, logits, xt, t, s, temp, backend="triton")
        ref = ops.categorical_posterior(process, logits, xt, t, s, temp, backend="reference")
        assert probs.dtype == ref.dtype and probs.shape == ref.shape, name
        assert_close(probs, ref, atol=1e-12 if dtype == torch.float64 else 1e-6, name=name)
        tok = ops.posterior_sample(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp,
                                   backend="triton")
        want = ops.posterior_sample(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp,
                                    backend="reference")
        assert tok.dtype == torch.int64 and tok.shape == xt.shape
        rows = torch.arange(xt.numel())
        _check_draws(tok, want, ref.double(), R.row_uniforms(seed, offset, rows))
        if process.kind == "absorbing":
            keep = xt != process.mask_id
            assert torch.equal(tok[keep], xt[keep]), name


def test_posterior_sample_same_seed_same_tokens_and_views():
    process = _processes(97)["uniform"]
    logits, xt, t, s = _posterior_inputs(process, (6, 4), seed=1, dtype=torch.float32)
    a = ops.posterior_sample(process, logits, xt, t, s, seed=1, backend="triton")
    assert torch.equal(a, ops.posterior_sample(process, logits.clone(), xt, t, s, seed=1, backend="triton"))
    assert not torch.equal(a, ops.posterior_sample(process, logits, xt, t, s, seed=1, offset=1, backend="triton"))
    # a (B, L) transposed view and a view with a strided vocabulary axis give the reference's draws
    lt = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(a, ops.posterior_sample(process, lt, xt, t, s, seed=1, backend="triton"))
    wide = torch.zeros(6, 4, 2 * 97, device=DEV)
    wide[..., ::2] = logits
    assert torch.equal(a, ops.posterior_sample(process, wide[..., ::2], xt, t, s, seed=1, backend="triton"))
    # no rows
    empty = ops.posterior_sample(process, logits[:0], xt[:0], t[:0], s[:0], seed=1, backend="triton")
    assert empty.shape == (0, 4)
    assert ops.categorical_posterior(process, logits[:0], xt[:0], t[:0], s[:0], backend="triton").shape == (0, 4, 97)


def test_posterior_zero_probability_tokens_never_drawn():
    V = 7
    logits = torch.full((30, V), float("-inf"), device=DEV)
    logits[:, 4] = 0.0
    uniform = D.Uniform(V, S.cosine(T))
    xt = torch.randint(0, V, (30,), generator=_gen(0)).to(DEV)
    out = ops.posterior_sample(uniform, logits, xt, 10, 0, seed=2, backend="triton")
    assert torch.equal(out, torch.full_like(out, 4))
    absorbing = D.Absorbing(V, V - 1, S.mutual_info(T))
    out = ops.posterior_sample(absorbing, logits, torch.full((30,), V - 1, device=DEV), 10, 0, seed=2,
                               backend="triton")
    assert torch.equal(out, torch.full_like(out, 4))


def test_posterior_sample_impossible_x_t_keeps_x_t():
    """x_t unreachable from the x0 distribution (all weights 0; found by hypothesis): the row keeps x_t on
    every backend, never an out-of-range token (see fastdiff.ops._plan)."""
    process = D.GaussianBand(3, S.cosine(3), bandwidth=1)
    logits = torch.tensor([[0.0, float("-inf"), float("-inf")]] * 2, dtype=torch.float64, device=DEV)
    xt = torch.tensor([0, 2], device=DEV)
    got = ops.posterior_sample(process, logits, xt, 1, 0, seed=0, backend="triton")
    assert torch.equal(got, ops.posterior_sample(process, logits, xt, 1, 0, seed=0, backend="reference"))
    assert int(got[1]) == 2


# --------------------------------------------------------------------------------------------------
# sample_categorical
# --------------------------------------------------------------------------------------------------
FILTERS = [
    dict(),
    dict(temperature=0.0),
    dict(top_k=1),
    dict(top_k=5, temperature=0.7),
    dict(top_p=0.5),
    dict(top_k=10, top_p=0.9, temperature=1.3),
]


def _sample_logits(N, V, dtype, seed):
    logits = torch.randn(N, V, generator=_gen(seed)) * 2
    if V > 5:
        logits[:, 2] = float("-inf")
        logits[0, :5] = logits[0, 5]  # a tie group at the top-k / top-p boundary candidates
        logits[1, 3:] = 0.0  # a row of equal values
    return logits.to(DEV, dtype)


def _check_sample(logits, kw, seed=7, offset=3):
    got = ops.sample_categorical(logits, seed=seed, offset=offset, backend="triton", **kw)
    want = ops.sample_categorical(logits, seed=seed, offset=offset, backend="reference", **kw)
    assert got.dtype == torch.int64 and got.shape == logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1]).double().cpu()
    if kw.get("temperature", 1.0) == 0:
        assert torch.equal(got, want)
        return
    w = filter_weights(flat / kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"))
    _check_draws(got, want, w, R.row_uniforms(seed, offset, flat.shape[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_sample_categorical_equals_reference(dtype, kw):
    for V, N in ((1, 3), (7, 6), (300, 4)):
        _check_sample(_sample_logits(N, V, dtype, seed=V), kw)


def test_leading_tiles_of_minus_inf():
    """Rows whose first row tiles (128 wide in the interpreter) are all -inf: the online max and sums
    start from -inf without producing NaN."""
    logits = torch.full((3, 300), float("-inf"), device=DEV)
    logits[:, 260:] = torch.randn(3, 40, generator=_gen(8)).to(DEV)
    logits[2, 299] = 50.0
    for kw in FILTERS:
        _check_sample(logits, kw)
    process = D.Uniform(300, S.cosine(T))
    xt = torch.tensor([0, 270, 299], device=DEV)
    ref = ops.categorical_posterior(process, logits, xt, 20, 10, backend="reference")
    assert_close(ops.categorical_posterior(process, logits, xt, 20, 10, backend="triton"), ref, atol=1e-6)
    _check_draws(ops.posterior_sample(process, logits, xt, 20, 10, seed=3, backend="triton"),
                 ops.posterior_sample(process, logits, xt, 20, 10, seed=3, backend="reference"),
                 ref.double(), R.row_uniforms(3, 0, 3))


def test_sample_categorical_ties_views_and_empty():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]], device=DEV).expand(40, 5)
    out = ops.sample_categorical(logits, seed=0, top_k=2, backend="triton")
    assert set(out.unique().tolist()) == {0, 1, 2, 3}  # the tie at the k-th value is kept whole
    assert torch.equal(out, ops.sample_categorical(logits, seed=0, top_k=2, backend="reference"))
    p = torch.tensor([0.4, 0.2, 0.2, 0.2, 0.0], device=DEV).log().expand(40, 5)
    out = ops.sample_categorical(p, seed=1, top_p=0.5, backend="triton")
    assert set(out.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(out, ops.sample_categorical(p, seed=1, top_p=0.5, backend="reference"))
    # -0.0 and +0.0 are one tie group for top-k, as in the reference
    z = torch.tensor([[1.0, -0.0, 0.0, -1.0]], device=DEV).expand(40, 4)
    got = ops.sample_categorical(z, seed=2, top_k=2, backend="triton")
    assert set(got.unique().tolist()) == {0, 1, 2}
    logits = torch.randn(5, 3, 97, generator=_gen(9)).to(DEV)
    t = logits.transpose(0, 1)
    assert torch.equal(ops.sample_categorical(t, seed=1, backend="triton"),
                       ops.sample_categorical(t.contiguous(), seed=1, backend="reference"))
    s = logits[..., ::2]  # strided vocabulary
    assert torch.equal(ops.sample_categorical(s, seed=1, backend="triton"),
                       ops.sample_categorical(s, seed=1, backend="reference"))
    assert ops.sample_categorical(logits[:0], seed=1, backend="triton").shape == (0, 3)


# --------------------------------------------------------------------------------------------------
# Arguments are checked before any kernel runs
# --------------------------------------------------------------------------------------------------
def test_bad_inputs_are_rejected_before_the_kernel(kernels, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel ran on bad input")

    for name in ("nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample",
                 "sample_categorical"):
        monkeypatch.setattr(kernels, name, boom)
    x, w = torch.randn(3, 4, device=DEV), torch.randn(6, 4, device=DEV)
    process = D.Uniform(5, S.cosine(T))
    logits, xt = torch.randn(3, 5, device=DEV), torch.zeros(3, dtype=torch.int64, device=DEV)
    cases = [
        (lambda: ops.nearest_embedding(x, w[:, :3], backend="triton"), ValueError, "x"),
        (lambda: ops.nearest_embedding(x, w.double(), backend="triton"), TypeError, "weight"),
        (lambda: ops.nearest_embedding(x, w, "dot", backend="triton"), ValueError, "metric"),
        (lambda: ops.nearest_embedding(x * float("nan"), w, backend="triton"), ValueError, "x"),
        (lambda: ops.rounding_loss(x, w, torch.tensor([0, 1, 6], device=DEV), backend="triton"), ValueError, "target"),
        (lambda: ops.rounding_loss(x, w, torch.tensor([0, 1, 2], device=DEV), reduction="avg", backend="triton"),
         ValueError, "reduction"),
        (lambda: ops.categorical_posterior(process, logits[:, :4], xt, 10, backend="triton"), ValueError, "x0_logits"),
        (lambda: ops.categorical_posterior(process, logits, xt, 10, 10, backend="triton"), ValueError, "s"),
        (lambda: ops.posterior_sample(process, logits, xt + 7, 10, seed=0, backend="triton"), ValueError, "x_t"),
        (lambda: ops.posterior_sample(process, logits, xt, 10, seed=-1, backend="triton"), ValueError, "seed"),
        (lambda: ops.posterior_sample(process, logits.long(), xt, 10, seed=0, backend="triton"), TypeError,
         "x0_logits"),
        (lambda: ops.sample_categorical(logits * float("nan"), seed=0, backend="triton"), ValueError, "logits"),
        (lambda: ops.sample_categorical(logits, seed=0, top_k=0, backend="triton"), ValueError, "top_k"),
        (lambda: ops.sample_categorical(logits, seed=0, top_p=1.5, backend="triton"), ValueError, "top_p"),
        (lambda: ops.sample_categorical(logits, seed=0, temperature=-1.0, backend="triton"), ValueError,
         "temperature"),
        (lambda: ops.sample_categorical(logits, seed=1.5, backend="triton"), TypeError, "seed"),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()


def test_dispatch_reports_triton_ok_here():
    for op in ("nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample",
               "sample_categorical"):
        assert ops.explain(op, DEV)["triton"] == "ok", op


# --------------------------------------------------------------------------------------------------
# GPU only: the sizes the kernels are for, autotuning, frequencies over a million draws
# --------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device (large shapes and autotuning)")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_nearest_embedding_gpt2_vocabulary(dtype):
    g = _gen(0)
    x = torch.randn(1000, 768, generator=g).to(DEV, dtype)
    w = torch.randn(50257, 768, generator=g).to(DEV, dtype)
    for metric in ("l2", "cosine"):
        idx, snapped = ops.nearest_embedding(x, w, metric, backend="triton")
        _check_nearest(idx, snapped, x, w, metric)


@gpu
@pytest.mark.gpu
def test_gpu_rounding_loss_gpt2_vocabulary():
    x, w, b, target = _loss_inputs(512, 50257, 256, torch.bfloat16, True, seed=1)
    loss = ops.rounding_loss(x, w, target, b, backend="triton")
    ref = ops.rounding_loss(x, w, target, b, backend="reference")
    assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    got = torch.autograd.grad(loss, [x, w, b])
    base = torch.autograd.grad(_plain(x, w, b, target, "mean").float(), [x, w, b])
    truth = torch.autograd.grad(ref, [x, w, b])
    for a, c, bl in zip(got, truth, base):
        assert_close(a, c, atol=1e-4, baseline=bl)


@gpu
@pytest.mark.gpu
def test_gpu_posterior_and_sampling_gpt2_vocabulary():
    V = 50257
    logits = (torch.randn(256, V, generator=_gen(2)) * 3).to(DEV, torch.bfloat16)
    for process in (D.Absorbing(V, V - 1, S.mutual_info(1000)), D.Uniform(V, S.cosine(1000))):
        xt = torch.full((256,), V - 1, device=DEV) if process.kind == "absorbing" else \
            torch.randint(0, V, (256,), generator=_gen(3)).to(DEV)
        ref = ops.categorical_posterior(process, logits, xt, 500, 400, backend="reference")
        assert_close(ops.categorical_posterior(process, logits, xt, 500, 400, backend="triton"), ref, atol=1e-6)
        tok = ops.posterior_sample(process, logits, xt, 500, 400, seed=5, backend="triton")
        want = ops.posterior_sample(process, logits, xt, 500, 400, seed=5, backend="reference")
        _check_draws(tok, want, ref.double(), R.row_uniforms(5, 0, 256), max_near=2)
    for kw in FILTERS:
        _check_sample(logits, kw)


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_sampling_frequencies_over_a_million_draws():
    from scipy import stats

    V, n = 1000, 1_000_000
    row = torch.randn(V, generator=_gen(4)) * 2
    row[0] = float("-inf")
    out = ops.sample_categorical(row.to(DEV).expand(n, V), seed=1, backend="triton").cpu()
    p = torch.softmax(row.double(), -1).numpy()
    counts = torch.bincount(out, minlength=V).numpy()
    assert counts[0] == 0
    order = p.argsort()
    bins = [b for b in torch.tensor(order[p[order] > 0]).chunk(20)]
    obs = [counts[b.numpy()].sum() for b in bins]
    exp = [p[b.numpy()].sum() * n for b in bins]
    assert stats.chisquare(obs, exp).pvalue > 1e-5


# --------------------------------------------------------------------------------------------------
# Fuzzing against the reference: -inf, ±0 and tied logits, any seed / offset, filters, every dtype
# --------------------------------------------------------------------------------------------------
FUZZ = settings(max_examples=12, deadline=None)
FUZZ_DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])


@st.composite
def _logit_rows(draw, max_rows=3, sizes=(1, 2, 3, 8, 17, 150)):
    n, V = draw(st.integers(1, max_rows)), draw(st.sampled_from(sizes))
    cell = st.one_of(st.floats(-30, 30), st.just(float("-inf")), st.sampled_from([0.0, -0.0, 1.0, 2.5]))
    x = torch.tensor(draw(st.lists(cell, min_size=n * V, max_size=n * V)), dtype=torch.float64).reshape(n, V)
    x[:, draw(st.integers(0, V - 1))] = draw(st.floats(-5, 5))  # a finite logit in every row
    return x


@FUZZ
@given(x=_logit_rows(), dtype=FUZZ_DTYPES, seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**40),
       temperature=st.sampled_from([0.0, 0.05, 1.0, 3.0]), top_k=st.sampled_from([None, 1, 2, 7, 300]),
       top_p=st.sampled_from([None, 0.05, 0.5, 0.99]))
def test_fuzz_sample_categorical(x, dtype, seed, offset, temperature, top_k, top_p):
    x = x.to(DEV, dtype)
    kw = dict(seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(ops.sample_categorical(x, backend="triton", **kw),
                       ops.sample_categorical(x, backend="reference", **kw))


@FUZZ
@given(data=st.data(), dtype=FUZZ_DTYPES, seed=st.integers(0, 2**64 - 1),
       temperature=st.sampled_from([0.3, 1.0, 2.0]))
def test_fuzz_posterior(data, dtype, seed, temperature):
    V = data.draw(st.sampled_from([2, 3, 9, 140]))
    Tn = data.draw(st.sampled_from([3, 20]))
    mask = data.draw(st.integers(0, V - 1))
    kinds = ["absorbing", "spindle", "uniform"] + (["band"] if V <= 9 else [])
    kind = data.draw(st.sampled_from(kinds))
    process = {"absorbing": lambda: D.Absorbing(V, mask, S.mutual_info(Tn)),
               "spindle": lambda: D.Absorbing(V, mask, S.spindle(Tn, torch.linspace(0, 1, V))),
               "uniform": lambda: D.Uniform(V, S.cosine(Tn)),
               "band": lambda: D.GaussianBand(V, S.cosine(Tn), bandwidth=1)}[kind]()
    x = data.draw(_logit_rows(max_rows=4, sizes=(V,)))
    if process.kind == "absorbing":
        x[:, (mask + 1) % V] = 0.5  # some x0 mass off the (ignored) mask column
    n = x.shape[0]
    xt = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)))
    if process.kind == "absorbing":
        xt[::2] = mask
    t = data.draw(st.integers(1, Tn))
    s = data.draw(st.integers(0, t - 1))
    x, xt = x.to(DEV, dtype), xt.to(DEV)
    probs = ops.categorical_posterior(process, x, xt, t, s, temperature, backend="triton")
    ref = ops.categorical_posterior(process, x, xt, t, s, temperature, backend="reference")
    assert_close(probs, ref, atol=1e-12 if dtype == torch.float64 else 1e-6)
    kw = dict(seed=seed, offset=7, temperature=temperature)
    _check_draws(ops.posterior_sample(process, x, xt, t, s, backend="triton", **kw),
                 ops.posterior_sample(process, x, xt, t, s, backend="reference", **kw),
                 ref.double(), R.row_uniforms(seed, 7, n))


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_large_logits_small_temperature_keep_fp32_precision(kind):
    """Logits ~27 at temperature 0.3 (|x/T| ~ 90): the kernel shifts by the max before scaling, so float32
    loses no more than PyTorch's float32 computation does (a hypothesis example once found 1.1e-6 error
    from scaling first). Checked against float64 with the baseline rule, and draws equal the reference's."""
    V = 140
    x = torch.zeros(3, V, dtype=torch.float64)
    x[:, 40:90] = float("-inf")
    x[:, 13], x[:, 118] = 27.25, 27.0
    x[1, 7] = -30.0
    process = D.Absorbing(V, 0, S.mutual_info(3)) if kind == "absorbing" else D.Uniform(V, S.cosine(3))
    xt = torch.tensor([0, 5, 0])
    x32 = x.float().to(DEV)
    truth = ops.categorical_posterior(process, x, xt, 1, 0, 0.3, backend="reference")
    base = ops.categorical_posterior(process, x32, xt.to(DEV), 1, 0, 0.3, backend="reference")
    got = ops.categorical_posterior(process, x32, xt.to(DEV), 1, 0, 0.3, backend="triton")
    assert_close(got, truth, atol=1e-7, baseline=base)
    w_truth = torch.softmax(x / 0.3, -1)
    p = ops.sample_categorical(x32, seed=3, temperature=0.3, backend="triton")
    assert torch.equal(p.cpu(), ops.sample_categorical(x32, seed=3, temperature=0.3, backend="reference").cpu())
    assert bool((w_truth.gather(-1, p.cpu()[:, None]) > 0).all())
