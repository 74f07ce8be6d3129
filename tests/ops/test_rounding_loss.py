"""rounding_loss on every backend: the loss and its gradients against an independent float64 cross-entropy and
against the reference (every reduction, ignore_index, bias, chunking, every dtype, non-contiguous and empty
inputs), the all-ignored mean (0 with zero gradients), the log-normaliser at logits of 1e20, targets read in
int64, no second derivative, and bad input rejected before any kernel runs, with the same error everywhere.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import ops
from fastdiff.errors import InputError, InputTypeError
from tests.conftest import assert_close
from tests.ops import _cases as C

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
ROOT = Path(__file__).resolve().parents[2]


def _independent(x, w, target, bias=None, ignore_index=-100):
    """Per-row loss logsumexp(z) - z[target] written out in float64; ignored rows give 0."""
    z = x.reshape(-1, x.shape[-1]).double() @ w.double().T
    if bias is not None:
        z = z + bias.double()
    m = z.max(1, keepdim=True).values
    lse = (m + torch.log(torch.exp(z - m).sum(1, keepdim=True))).squeeze(1)
    t = target.reshape(-1)
    valid = t != ignore_index
    picked = z.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - picked, torch.zeros_like(lse)), valid


def _grads(fn, x, w, target, b, reduction, ignore_index=-100, grad_out=None):
    loss = fn(x, w, target, b, reduction=reduction, ignore_index=ignore_index)
    inputs = [x, w] + ([b] if b is not None else [])
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    return loss, torch.autograd.grad(loss, inputs, grad_out)


def _chunks(monkeypatch, backend: str, elements: int) -> None:
    """A small logits chunk for the chunked backends (C++, CUDA), so that rows span several chunks."""
    if backend in ("cpp", "cuda"):
        monkeypatch.setattr(importlib.import_module(f"fastdiff.ops.backends.{backend}.rounding_loss"),
                            "LOSS_CHUNK_ELEMENTS", elements)


# --------------------------------------------------------------------------------------------------------
# Against an independent float64 formula
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,V,D", [(1, 1, 1), (7, 7, 3), (1000, 7, 3), (19, 5000, 128), (97, 301, 768)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", C.backends("reference", "cpp", "cuda"))
def test_loss_and_gradients_float64(backend, N, V, D, with_bias):
    dev = C.device(backend)
    g = C.gen(N + V)
    x = torch.randn(N, D, generator=g, dtype=F64).to(dev).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=F64).to(dev).requires_grad_()
    b = torch.randn(V, generator=g, dtype=F64).to(dev).requires_grad_() if with_bias else None
    target = torch.randint(0, V, (N,), generator=g).to(dev)
    loss = ops.rounding_loss(x, w, target, b, backend=backend)
    per, _ = _independent(x, w, target, b)
    ref = per.mean()
    assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    inputs = [x, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(ref, inputs)
    for a, c in zip(got, want):
        assert_close(a, c, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(F32, 1e-5), (F16, 2e-3), (BF16, 2e-2)])
@pytest.mark.parametrize("backend", C.backends("reference", "cpp", "cuda"))
def test_low_precision_is_computed_in_float32(backend, dtype, atol):
    dev = C.device(backend)
    g = C.gen(0)
    x = torch.randn(3, 17, 64, generator=g).to(dtype).to(dev)
    w = (torch.randn(257, 64, generator=g) * 0.2).to(dtype).to(dev)
    target = torch.randint(0, 257, (3, 17), generator=g).to(dev)
    loss = ops.rounding_loss(x, w, target, reduction="none", backend=backend)
    assert loss.shape == (3, 17) and loss.dtype == F32
    per, _ = _independent(x, w, target)  # from the same rounded inputs, in float64
    assert_close(loss, per.reshape(3, 17), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_reductions_and_ignore_index(backend):
    dev = C.device(backend)
    g = C.gen(1)
    x = torch.randn(4, 6, 8, generator=g, dtype=F64).to(dev)
    w = torch.randn(11, 8, generator=g, dtype=F64).to(dev)
    target = torch.randint(0, 11, (4, 6), generator=g).to(dev)
    target[0, :3] = -100
    per, valid = _independent(x, w, target)
    kw = dict(backend=backend)
    assert_close(ops.rounding_loss(x, w, target, reduction="sum", **kw), per.sum(), atol=1e-12)
    assert_close(ops.rounding_loss(x, w, target, reduction="mean", **kw), per.sum() / valid.sum(), atol=1e-12)
    assert_close(ops.rounding_loss(x, w, target, reduction="none", **kw), per.reshape(4, 6), atol=1e-12)
    t2 = target.clone()
    t2[t2 == -100] = 7
    per7, _ = _independent(x, w, t2, ignore_index=7)
    assert_close(ops.rounding_loss(x, w, t2, ignore_index=7, reduction="sum", **kw), per7.sum(), atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Against the reference, with gradients
# --------------------------------------------------------------------------------------------------------
# (dtype, N, V, D, bias, reduction, chunk elements (C++ / CUDA; None: the default), loss atol, loss rtol,
#  gradient atol, gradient rtol, scaled): tolerances relative to 1 + max|ref| when `scaled`.
_RED = ("mean", "sum", "none")
MATCHES_REFERENCE = C.cases({
    "cpp": [(F64, N, V, D, True, r, None, 1e-11, 1e-11, 1e-11, 1e-9, False)
            for N, V, D in [(1, 1, 1), (7, 7, 3), (1000, 7, 128), (7, 50257, 3), (97, 301, 768)] for r in _RED]
    + [(dt, (3, 17), 257, 64, "f32", "mean", 257 * 10, atol, 1e-5, atol, 1e-2, False)
       for dt, atol in [(F32, 2e-5), (F16, 2e-3), (BF16, 2e-2)]],
    "triton": [(dt, N, V, D, b, r, None, tol, tol, tol, gr, False)
               for dt, N, V, D, tol, gr in [(F64, 19, 97, 24, 1e-12, 1e-10), (F32, 40, 300, 33, 2e-6, 1e-4)]
               for r in _RED for b in (False, True)],
    "cuda": [(dt, N, V, D, b, r, 3 * V + 1, atol, 1e-11 if dt == F64 else 1e-5, (1e-2 if dt == BF16 else atol * 10),
              1e-4, True)
             for N, V, D, b in [(1, 1, 3, False), (19, 7, 5, True), (97, 5003, 33, True), (64, 50257, 8, False)]
             for dt, atol in [(F32, 2e-5), (F64, 1e-11), (BF16, 2e-5)] for r in _RED],
})


@pytest.mark.parametrize("backend,dtype,N,V,D,bias,reduction,chunk,latol,lrtol,gatol,grtol,scaled", MATCHES_REFERENCE)
def test_matches_the_reference_with_gradients(backend, dtype, N, V, D, bias, reduction, chunk, latol, lrtol, gatol,
                                              grtol, scaled, monkeypatch):
    """Loss and gradients (under a non-uniform upstream gradient) against rounding_loss_ref; some ignored
    targets; C++ and CUDA over several row chunks. ``bias="f32"``: a float32 bias beside 16-bit x and W."""
    dev = C.device(backend)
    if chunk is not None:
        _chunks(monkeypatch, backend, chunk)
    shape = N if isinstance(N, tuple) else (N,)
    g = C.gen(sum(shape) * 7 + V + D)
    x = torch.randn(*shape, D, generator=g).to(dtype).to(dev).requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g)).to(dtype).to(dev).requires_grad_()
    b = None
    if bias:
        b = torch.randn(V, generator=g).to(F32 if bias == "f32" else dtype).to(dev).requires_grad_()
    target = torch.randint(0, V, shape, generator=g).to(dev)
    target.view(-1)[::4] = -100
    up = torch.rand(shape, generator=C.gen(1)).to(dev) if reduction == "none" else torch.tensor(1.7, device=dev)
    inputs = [x, w] + ([b] if b is not None else [])
    loss = ops.rounding_loss(x, w, target, b, reduction, backend=backend)
    ref = ops.rounding_loss_ref(x, w, target, b, reduction)
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    s = 1 + ref.detach().abs().max().item() if scaled and ref.numel() else 1.0
    assert_close(loss, ref, atol=latol * s, rtol=lrtol, name="loss")
    got = torch.autograd.grad(loss, inputs, up.to(loss.dtype))
    want = torch.autograd.grad(ref, inputs, up.to(ref.dtype))
    for name, a, c in zip(("x", "weight", "bias"), got, want):
        assert a.dtype == c.dtype and a.shape == c.shape, name
        gs = 1 + c.float().abs().max().item() if scaled and c.numel() else 1.0
        assert_close(a, c, atol=gatol * gs, rtol=grtol, name=name)


LOW_PRECISION = C.cases({"triton": [(dt, r, b) for dt in (F16, BF16) for r in _RED for b in (False, True)]})


def _plain(x, w, b, target, reduction):
    """Cross-entropy written out with autograd, in the inputs' own dtype."""
    z = x @ w.T
    if b is not None:
        z = z + b
    return F.cross_entropy(z, target, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("backend,dtype,reduction,bias", LOW_PRECISION)
def test_low_precision_gradients_are_as_exact_as_pytorch(backend, dtype, reduction, bias):
    """16-bit inputs (G enters the gradient GEMMs in the input dtype, as fused cross-entropy kernels do): the
    loss is float32 maths on the same inputs; each gradient is as exact as PyTorch's in this dtype
    (flash-attention's rule), against float64 truth."""
    dev = C.device(backend)
    N, V, D = 40, 300, 33
    g = C.gen(N + V)
    x = torch.randn(N, D, generator=g).to(dev, dtype).requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g)).to(dev, dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dev, dtype).requires_grad_() if bias else None
    target = torch.randint(0, V, (N,), generator=g).to(dev)
    target[::4] = -100
    inputs = [x, w] + ([b] if bias else [])
    loss = ops.rounding_loss(x, w, target, b, reduction, backend=backend)
    ref = ops.rounding_loss(x, w, target, b, reduction, backend="reference")
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    up = torch.rand(loss.shape, generator=C.gen(1)).to(dev, loss.dtype)  # a non-uniform upstream gradient
    got = torch.autograd.grad((loss * up).sum(), inputs)
    assert_close(loss, ref, atol=2e-5, rtol=2e-5, name="loss")
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    truth = torch.autograd.grad((_plain(*leaves64[:2], leaves64[2] if bias else None, target, reduction)
                                 * up.double()).sum(), leaves64)
    leaves = [t.detach().requires_grad_() for t in inputs]
    base = torch.autograd.grad((_plain(*leaves[:2], leaves[2] if bias else None, target, reduction).float()
                                * up).sum(), leaves)
    for name, a, c, bl in zip("xwb", got, truth, base):
        assert a.dtype == dtype
        assert_close(a, c, atol=1e-3, baseline=bl, name=f"d{name}")


# --------------------------------------------------------------------------------------------------------
# Layouts, partial gradients, edge shapes
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_layouts_ignore_index_and_edge_cases(backend, monkeypatch):
    dev = C.device(backend)
    _chunks(monkeypatch, backend, 9 * 4)
    g = C.gen(2)
    x = torch.randn(8, 5, 6, generator=g, dtype=F64).to(dev).transpose(0, 1).requires_grad_()
    w = torch.randn(9, 12, generator=g, dtype=F64).to(dev)[:, ::2].requires_grad_()
    target = torch.randint(0, 9, (5, 8), generator=g).to(dev)
    per, _ = _independent(x, w, target)
    assert_close(ops.rounding_loss(x, w, target, reduction="none", backend=backend), per.reshape(5, 8), atol=1e-12)
    target[target == 4] = 7
    fn = lambda *a, **k: ops.rounding_loss(*a, **k, backend=backend)  # noqa: E731
    for red in ("mean", "sum", "none"):
        loss, got = _grads(fn, x, w, target, None, red, 7)
        ref, want = _grads(ops.rounding_loss_ref, x, w, target, None, red, 7)
        assert_close(loss, ref, atol=1e-12, rtol=1e-12)
        for a, c in zip(got, want):
            assert_close(a, c, atol=1e-12, rtol=1e-10)
    # every target ignored: mean (sum / max(count, 1)) and sum are 0, and the gradients are zero
    allign = torch.full((5, 8), -100, device=dev)
    for red in ("mean", "sum"):
        loss, (gx, gw) = _grads(fn, x, w, allign, None, red)
        assert float(loss.detach()) == 0 and not bool(gx.any()) and not bool(gw.any())
    # no rows at all; no gradient requested
    empty = ops.rounding_loss(torch.zeros(0, 6, device=dev), torch.randn(9, 6).to(dev),
                              torch.zeros(0, dtype=torch.int64, device=dev), reduction="none", backend=backend)
    assert empty.shape == (0,)
    with torch.no_grad():
        assert_close(ops.rounding_loss(x, w, target, backend=backend), ops.rounding_loss_ref(x, w, target), atol=1e-12)


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_edge_shapes_and_partial_gradients(backend):
    dev = C.device(backend)
    # V = 1: the loss is 0 and so are the gradients
    x = torch.randn(5, 4, generator=C.gen(2), dtype=F64).to(dev).requires_grad_()
    w = torch.randn(1, 4, generator=C.gen(3), dtype=F64).to(dev).requires_grad_()
    assert ops.rounding_loss(x, w, torch.zeros(5, dtype=torch.int64, device=dev), backend=backend).item() == 0.0
    # only x requiring grad, reduction "none" on a batch shape
    g = C.gen(3)
    x = torch.randn(8, 5, 6, generator=g, dtype=F64).to(dev).transpose(0, 1).requires_grad_()
    w = torch.randn(9, 12, generator=g, dtype=F64).to(dev)[:, ::2]
    target = torch.randint(0, 9, (5, 8), generator=g).to(dev)
    loss = ops.rounding_loss(x, w, target, reduction="none", backend=backend)
    ref = ops.rounding_loss(x, w, target, reduction="none", backend="reference")
    assert_close(loss, ref, atol=1e-12)
    (gx,) = torch.autograd.grad(loss.sum(), [x])
    (rx,) = torch.autograd.grad(ref.sum(), [x])
    assert_close(gx, rx, atol=1e-12)
    # only the weight requiring grad
    x2 = torch.randn(4, 6, 8, generator=C.gen(0)).to(dev)
    w2 = torch.randn(11, 8, generator=C.gen(1)).to(dev).requires_grad_()
    t2 = torch.randint(0, 11, (4, 6), generator=C.gen(2)).to(dev)
    (gw,) = torch.autograd.grad(ops.rounding_loss(x2, w2, t2, backend=backend), [w2])
    (gw_ref,) = torch.autograd.grad(ops.rounding_loss_ref(x2, w2, t2), [w2])
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ops.rounding_loss(x2, w2, t2, reduction="none", backend=backend),
                                   ops.rounding_loss_ref(x2, w2, t2, reduction="none"), atol=1e-5, rtol=1e-5)
    # N = 0
    x0 = torch.zeros(0, 6, dtype=F64, device=dev)
    t0 = torch.zeros(0, dtype=torch.int64, device=dev)
    assert ops.rounding_loss(x0, w, t0, reduction="sum", backend=backend).item() == 0.0
    assert ops.rounding_loss(x0, w, t0, reduction="none", backend=backend).shape == (0,)
    assert ops.rounding_loss(x0, w, t0, backend=backend).item() == 0.0  # mean over no targets: sum / max(count, 1)


@pytest.mark.parametrize("backend", C.KERNELS)
def test_no_second_derivative(backend):
    """The kernels' gradient has no graph: asking for a second derivative raises, never silently 0."""
    dev = C.device(backend)
    x = torch.randn(3, 4, dtype=F64, device=dev, requires_grad=True)
    w = torch.randn(6, 4, dtype=F64, device=dev, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.rounding_loss(x, w, torch.tensor([0, 1, 5], device=dev), backend=backend), (x,),
                                create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


@settings(max_examples=40, deadline=None)
@given(N=st.integers(0, 12), V=st.integers(1, 40), Dm=st.integers(1, 9), seed=st.integers(0, 2**31),
       reduction=st.sampled_from(["mean", "sum", "none"]), bias=st.booleans(), chunk=st.integers(1, 100))
def test_cpp_any_chunking_gives_the_reference(N, V, Dm, seed, reduction, bias, chunk):
    """The C++ loss in row chunks of any size (LOSS_CHUNK_ELEMENTS) against the reference, ignored rows
    (target -1) included."""
    if "cpp" not in C.HERE:
        pytest.skip("the C++ backend is not selected")
    glue = importlib.import_module("fastdiff.ops.backends.cpp.rounding_loss")
    g = C.gen(seed)
    x = (torch.randn(N, Dm, generator=g, dtype=F64) * 3).requires_grad_()
    w = torch.randn(V, Dm, generator=g, dtype=F64).requires_grad_()
    b = torch.randn(V, generator=g, dtype=F64).requires_grad_() if bias else None
    target = torch.randint(-1, V, (N,), generator=g)
    old = glue.LOSS_CHUNK_ELEMENTS
    glue.LOSS_CHUNK_ELEMENTS = chunk
    try:
        loss, got = _grads(lambda *a, **k: ops.rounding_loss(*a, **k, backend="cpp"), x, w, target, b, reduction, -1)
    finally:
        glue.LOSS_CHUNK_ELEMENTS = old
    ref, want = _grads(ops.rounding_loss_ref, x, w, target, b, reduction, -1)
    assert_close(loss, ref, atol=1e-11, rtol=1e-11)
    for a, c in zip(got, want):
        assert_close(a, c, atol=1e-11, rtol=1e-9)


# --------------------------------------------------------------------------------------------------------
# Values at the edges, the same decision everywhere (found by an outside fuzzing pass)
# --------------------------------------------------------------------------------------------------------
def test_mean_over_no_valid_target_is_zero_with_zero_gradient_everywhere():
    """The documented definition (sum / max(count, 1)): every backend, forward and backward. (NaN before on
    every backend, and the C++ / Triton gradients scaled by inf / NaN; C++ and CUDA disagreed.)"""
    for target, n in ((torch.full((4,), -100), 4), (torch.empty(0, dtype=torch.int64), 0)):
        for be in C.HERE:
            x = torch.randn(n, 8, dtype=F64, requires_grad=True)
            w = torch.randn(10, 8, dtype=F64, requires_grad=True)
            b = torch.randn(10, dtype=F64, requires_grad=True)
            loss = ops.rounding_loss(x, w, target, bias=b, backend=be)
            loss.backward()
            assert float(loss.detach()) == 0.0, be
            for grad in (x.grad, w.grad, b.grad):
                assert grad is not None and not bool(grad.any()), be


@pytest.mark.parametrize("dtype", [F32, F64])
def test_large_logits_keep_the_log_normaliser(dtype):
    """Logits of ±1e20 (found by the fuzz harness): m + log s rounds log 2 away, so C++ returned a loss of 0
    and Triton's backward p = exp(z - lse) was 1 in both columns (gradient off by 0.31)."""
    x = torch.tensor([[1.541], [-0.2934]], dtype=dtype)
    w = torch.tensor([[1e20], [1e20]], dtype=dtype)
    t = torch.tensor([0, 0])
    # softmax = (1/2, 1/2) in both rows: dW_0 = mean_r (1/2 - 1) x_r, dW_1 = mean_r (1/2) x_r
    q = float(x.double().sum()) / 4
    want_gw = torch.tensor([[-q], [q]], dtype=F64)
    for be in C.HERE:
        ww = w.clone().requires_grad_()
        loss = ops.rounding_loss(x, ww, t, backend=be)
        loss.backward()
        assert abs(float(loss.detach()) - math.log(2)) < 1e-6, (be, float(loss.detach()))
        torch.testing.assert_close(ww.grad.double(), want_gw, atol=1e-6, rtol=1e-5)


def test_logits_that_would_overflow_are_rejected():
    """Finite x and weight of 1e20 overflowed the float32 logits into a NaN loss on every backend."""
    x, w, t = torch.tensor([[1e20, 0.0]]), torch.tensor([[1e20, 0.0], [0.0, 1.0]]), torch.tensor([1])
    C.same_error(lambda be: ops.rounding_loss(x, w, t, backend=be), InputError, "x: too large for weight")
    C.same_error(lambda be: ops.rounding_loss(torch.randn(1, 2), torch.randn(2, 2), t,
                                              bias=torch.tensor([1e300, 0.0], dtype=F64), backend=be),
                 InputError, "bias: values up to 1e+300 overflow the float32 logits")
    # large but orthogonal rows pass the Cauchy-Schwarz bound only if |x||w| is small: 1e18 · 1e18 is fine
    xs, ws = torch.tensor([[1e18, 0.0]]), torch.tensor([[0.0, 1e18], [1e-3, 0.0]])
    want = ops.rounding_loss(xs.double(), ws.double(), t, backend="reference")
    for be in C.HERE:
        got = ops.rounding_loss(xs, ws, t, backend=be)
        assert bool(torch.isfinite(got)), be
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_bias_values_are_checked(bad):
    b = torch.zeros(10)
    b[4] = bad
    C.same_error(lambda be: ops.rounding_loss(torch.randn(2, 8), torch.randn(10, 8), torch.tensor([1, 3]), bias=b,
                                              backend=be), InputError, "bias: contains NaN or infinity")


def test_wrapping_ignore_index_is_rejected_not_a_segfault():
    """int32 target -2**31 with ignore_index=2**31: the check compared in int32 (where 2**31 wraps to
    -2**31, "ignored"), the C++ kernel in int64 and wrote out of bounds (exit 139)."""
    res = subprocess.run([sys.executable, "-c", (
        "import torch\n"
        "from fastdiff import ops\n"
        "from fastdiff.errors import InputError\n"
        "for be in ('reference', 'cpp'):\n"
        "    try:\n"
        "        t = torch.tensor([-2**31, 3], dtype=torch.int32)\n"
        "        ops.rounding_loss(torch.randn(2, 8), torch.randn(100, 8), t, ignore_index=2**31, backend=be)\n"
        "    except InputError as e:\n"
        "        print(be, 'InputError', str(e).split(':')[0])\n")], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert res.returncode == 0, f"crashed (rc {res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.split("\n")[:2] == ["reference InputError target", "cpp InputError target"], res.stdout


def test_narrow_targets_are_checked_in_int64():
    x, w = torch.randn(2, 8), torch.randn(100, 8)
    # uint8 156 with V = 100: -100 wraps to 156 in uint8, so the check let it through as "ignored"
    C.same_error(lambda be: ops.rounding_loss(x, w, torch.tensor([156, 3], dtype=torch.uint8), backend=be),
                 InputError, "target: token ids must lie in [0, 100)")
    # valid narrow targets are accepted: uint8 255 with V = 256 (256 wrapped to 0 in the old check)
    w256 = torch.randn(256, 8, dtype=F64)
    x64 = x.double()
    t8 = torch.tensor([255, 3], dtype=torch.uint8)
    want = ops.rounding_loss(x64, w256, t8.long(), backend="reference")
    for be in C.HERE:
        got = ops.rounding_loss(x64, w256, t8, backend=be)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for dt in (torch.int8, torch.int16, torch.int32):  # -100 fits: ignored in every dtype
        t = torch.tensor([-100, 3], dtype=dt)
        got = {be: float(ops.rounding_loss(x64, w256, t, reduction="sum", backend=be)) for be in C.HERE}
        assert max(got.values()) - min(got.values()) < 1e-10, got


@pytest.mark.parametrize("backend", C.backends("cpp"))
def test_the_kernel_checks_targets_itself(backend):
    """A direct call of the C++ kernel (no public check) raises instead of indexing outside the row."""
    glue = importlib.import_module("fastdiff.ops.backends.cpp.rounding_loss")
    for tgt in ([-2**31, 3], [100, 0], [-1, 0]):
        with pytest.raises(ValueError, match="rounding_loss: target"):
            glue.rounding_loss_fwd(torch.randn(2, 8), torch.randn(100, 8), None, torch.tensor(tgt), 2**31, None,
                                   False, False, False)


@pytest.mark.parametrize("bad,err,match", [
    (2**70, InputError, "ignore_index: must fit in int64"),
    (None, InputTypeError, "ignore_index: expected an int, got NoneType"),
    ("0", InputTypeError, "ignore_index: expected an int, got str"),
    (2.5, InputTypeError, "ignore_index: expected an int, got float"),
    (True, InputTypeError, "ignore_index: expected an int, got bool"),
])
def test_ignore_index_type_and_range(bad, err, match):
    x, w, t = torch.randn(2, 8), torch.randn(10, 8), torch.tensor([1, 3])
    C.same_error(lambda be: ops.rounding_loss(x, w, t, ignore_index=bad, backend=be), err, match)


BAD = [
    (dict(x=torch.randn(3, 5)), ValueError, "x"),
    (dict(weight=torch.randn(0, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(6, 4).double()), TypeError, "weight"),
    (dict(target=torch.tensor([0, 1, 6])), ValueError, "target"),
    (dict(target=torch.tensor([0, 1])), ValueError, "target"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(x=torch.full((3, 4), float("nan"))), ValueError, "x"),
    (dict(weight=torch.full((6, 4), float("nan"))), ValueError, "weight"),
    (dict(reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_bad_input_is_rejected_before_the_kernel(backend, case, monkeypatch):
    change, err, match = BAD[case]
    if backend != "reference":
        glue = importlib.import_module(f"fastdiff.ops.backends.{backend}.rounding_loss")
        monkeypatch.setattr(glue, "rounding_loss_fwd", lambda *a, **k: pytest.fail("the kernel ran on bad input"))
    dev = C.device(backend)
    args = dict(x=torch.randn(3, 4), weight=torch.randn(6, 4), target=torch.tensor([0, 1, 5]))
    args.update(change)
    args = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(err, match=match):
        ops.rounding_loss(**args, backend=backend)


def test_unavailable_backend_device_mismatch_meta_and_empty():
    with pytest.raises(RuntimeError, match="cuda"):  # an explicit backend that cannot run here raises
        ops.rounding_loss(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 5]), backend="cuda")
    with pytest.raises(ValueError, match="device"):
        ops.rounding_loss(torch.randn(3, 4), torch.zeros(5, 4, device="meta"), torch.tensor([0, 1, 2]))
    x, w = torch.randn(3, 4, device="meta"), torch.randn(6, 4, device="meta")
    C.same_error(lambda be: ops.rounding_loss(x, w, torch.zeros(3, dtype=torch.int64, device="meta"), backend=be),
                 InputError, "meta device")
    e = torch.empty_strided((0, 5), (0, 0))
    for be in C.HERE:
        assert float(ops.rounding_loss(e, torch.randn(6, 5), torch.empty(0, dtype=torch.int64), backend=be)) == 0.0


def test_errors_name_the_public_arguments():
    C.same_error(lambda be: ops.rounding_loss(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1]), backend=be),
                 InputError, "target:")


# --------------------------------------------------------------------------------------------------------
# As torch.library ops: opcheck (schema, fake kernel, autograd registration, AOT dispatch with dynamic shapes)
# on every backend, and the public op traced by torch.compile(fullgraph=True) with the same results
# --------------------------------------------------------------------------------------------------------
def _opcheck_inputs(dev: torch.device) -> tuple:
    """(generator, x (6, 8), w (13, 8), bias (13,), targets with one ignored) for the opcheck tests."""
    g = C.gen(1)
    x = torch.randn(6, 8, generator=g).to(dev)
    w = torch.randn(13, 8, generator=g).to(dev)
    b = torch.randn(13, generator=g).to(dev)
    return g, x, w, b, torch.tensor([0, 3, -100, 12, 5, 5], device=dev)


@pytest.mark.parametrize("backend", C.backends("cpp", "cuda"))
def test_opcheck_rounding_loss(backend):
    """The fused chunked loss of C++ and CUDA: one or per-row scales, each gradient on or off, with and
    without a bias, several chunks."""
    dev = C.device(backend)
    g, x, w, b, target = _opcheck_inputs(dev)
    op = C.op(backend, "rounding_loss")
    for bias in (None, b):
        for scale in (torch.full((1,), 0.25, device=dev), torch.rand(6, generator=g).to(dev)):
            for need in ((True, True, True), (True, False, False), (False, False, False), (False, True, True)):
                torch.library.opcheck(op, (x, w, bias, target, -100, scale, *need, 4))


@pytest.mark.parametrize("backend", C.backends("triton"))
def test_opcheck_rounding_loss_passes(backend):
    """Triton's two tiled passes (forward: losses and the rows' log-normaliser; backward: the gradients)."""
    dev = C.device(backend)
    g, x, w, b, target = _opcheck_inputs(dev)
    fwd, bwd = C.op(backend, "rounding_loss_fwd"), C.op(backend, "rounding_loss_bwd")
    for bias in (None, b):
        torch.library.opcheck(fwd, (x, w, target, bias, -100))
        _, lse = fwd(x, w, target, bias, -100)
        gvec = torch.rand(6, generator=g).to(dev) * (target != -100)
        torch.library.opcheck(bwd, (x, w, target, bias, lse, gvec, True, True, bias is not None))
        torch.library.opcheck(bwd, (x, w, target, bias, lse, gvec, True, False, False))


@pytest.mark.parametrize("backend", C.KERNELS)
def test_torch_compile_traces_without_a_graph_break(backend):
    """The loss and, through the shared autograd Function, its gradient (every reduction)."""
    dev = C.device(backend)
    g = C.gen(3)
    x, w = torch.randn(5, 8, generator=g).to(dev), torch.randn(11, 8, generator=g).to(dev)
    target = torch.tensor([1, 0, 10, 3, -100], device=dev)
    for reduction in ("mean", "sum", "none"):
        fn = lambda a: ops.rounding_loss(a, w, target, reduction=reduction, backend=backend).sum()  # noqa: E731
        xg = x.clone().requires_grad_()
        loss = torch.compile(fn, backend="aot_eager", fullgraph=True)(xg)
        (gx,) = torch.autograd.grad(loss, [xg])
        xe = x.clone().requires_grad_()
        want = fn(xe)
        torch.testing.assert_close(loss, want, rtol=0, atol=0)
        torch.testing.assert_close(gx, torch.autograd.grad(want, [xe])[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not C.GPU, reason="needs a CUDA device (GPT-2 vocabulary)")
@pytest.mark.parametrize("backend", C.backends("triton"))
def test_gpu_gpt2_vocabulary(backend):
    g = C.gen(1)
    x = torch.randn(512, 256, generator=g).to("cuda", BF16).requires_grad_()
    w = (0.3 * torch.randn(50257, 256, generator=g)).to("cuda", BF16).requires_grad_()
    b = torch.randn(50257, generator=g).to("cuda", BF16).requires_grad_()
    target = torch.randint(0, 50257, (512,), generator=g).to("cuda")
    target[::4] = -100
    loss = ops.rounding_loss(x, w, target, b, backend=backend)
    ref = ops.rounding_loss(x, w, target, b, backend="reference")
    assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    got = torch.autograd.grad(loss, [x, w, b])
    base = torch.autograd.grad(_plain(x, w, b, target, "mean").float(), [x, w, b])
    truth = torch.autograd.grad(ref, [x, w, b])
    for a, c, bl in zip(got, truth, base):
        assert_close(a, c, atol=1e-4, baseline=bl)
