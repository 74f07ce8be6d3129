"""rounding_loss: independent float64 cross-entropy and gradients, reductions, ignore_index, bad input."""

from __future__ import annotations

import pytest
import torch

from fastdiff import ops
from tests.conftest import assert_close


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


@pytest.mark.parametrize("N,V,D", [(1, 1, 1), (7, 7, 3), (1000, 7, 3), (19, 5000, 128), (97, 301, 768)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_float64(N, V, D, with_bias):
    g = torch.Generator().manual_seed(N + V)
    x = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    target = torch.randint(0, V, (N,), generator=g)
    loss = ops.rounding_loss(x, w, target, b)
    per, _ = _independent(x, w, target, b)
    ref = per.mean()
    assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    inputs = [x, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(ref, inputs)
    for a, c in zip(got, want):
        assert_close(a, c, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_is_computed_in_float32(dtype, atol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 64, generator=g).to(dtype)
    w = (torch.randn(257, 64, generator=g) * 0.2).to(dtype)
    target = torch.randint(0, 257, (3, 17), generator=g)
    loss = ops.rounding_loss(x, w, target, reduction="none")
    assert loss.shape == (3, 17) and loss.dtype == torch.float32
    per, _ = _independent(x, w, target)  # from the same rounded inputs, in float64
    assert_close(loss, per.reshape(3, 17), atol=atol, rtol=1e-5)


def test_reductions_and_ignore_index():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 11, (4, 6), generator=g)
    target[0, :3] = -100
    per, valid = _independent(x, w, target)
    assert_close(ops.rounding_loss(x, w, target, reduction="sum"), per.sum(), atol=1e-12)
    assert_close(ops.rounding_loss(x, w, target, reduction="mean"), per.sum() / valid.sum(), atol=1e-12)
    assert_close(ops.rounding_loss(x, w, target, reduction="none"), per.reshape(4, 6), atol=1e-12)
    t2 = target.clone()
    t2[t2 == -100] = 7
    per7, _ = _independent(x, w, t2, ignore_index=7)
    assert_close(ops.rounding_loss(x, w, t2, ignore_index=7, reduction="sum"), per7.sum(), atol=1e-12)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, 6, generator=g, dtype=torch.float64).transpose(0, 1)
    w = torch.randn(9, 12, generator=g, dtype=torch.float64)[:, ::2]
    target = torch.randint(0, 9, (5, 8), generator=g)
    per, _ = _independent(x, w, target)
    assert_close(ops.rounding_loss(x, w, target, reduction="none"), per.reshape(5, 8), atol=1e-12)


@pytest.mark.parametrize("change,err,match", [
    (dict(x=torch.randn(3, 5)), ValueError, "x"),
    (dict(weight=torch.randn(0, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(6, 4).double()), TypeError, "weight"),
    (dict(target=torch.tensor([0, 1, 6])), ValueError, "target"),
    (dict(target=torch.tensor([0, 1])), ValueError, "target"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(x=torch.full((3, 4), float("nan"))), ValueError, "x"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), RuntimeError, "cuda"),  # an explicit backend that cannot run here raises
])
def test_bad_input(change, err, match):
    args = dict(x=torch.randn(3, 4), weight=torch.randn(6, 4), target=torch.tensor([0, 1, 5]))
    args.update(change)
    with pytest.raises(err, match=match):
        ops.rounding_loss(**args)


def test_device_mismatch():
    with pytest.raises(ValueError, match="device"):
        ops.rounding_loss(torch.randn(3, 4), torch.zeros(5, 4, device="meta"), torch.tensor([0, 1, 2]))
