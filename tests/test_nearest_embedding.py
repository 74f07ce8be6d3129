"""nearest_embedding: brute force over odd shapes, dtypes, ties, blocking, non-contiguous inputs."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastdiff import ops
from tests.conftest import assert_close


def _brute(x: torch.Tensor, w: torch.Tensor, metric: str) -> torch.Tensor:
    """Full float64 distance matrix; argmin takes the first minimum."""
    x64, w64 = x.reshape(-1, x.shape[-1]).double(), w.double()
    if metric == "l2":
        d = ((x64[:, None, :] - w64[None, :, :]) ** 2).sum(-1)
    else:
        d = -(x64 @ (w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)
    return d.argmin(1).reshape(x.shape[:-1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,V,D", [(1, 1, 1), (7, 7, 3), (1000, 7, 3), (7, 5000, 128), (1000, 999, 1), (33, 300, 768)])
def test_matches_brute_force_float64(metric, N, V, D):
    g = torch.Generator().manual_seed(N * 7 + V)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    idx, snapped = ops.nearest_embedding(x, w, metric)
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert torch.equal(idx, _brute(x, w, metric))
    assert torch.equal(snapped, w[idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_low_precision_agrees_except_near_ties(dtype, metric):
    """Low-precision inputs are scored in float32; a disagreement with the float64 brute force on the
    same (rounded) values is allowed only where the two best scores are within float32 rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 97, 64, generator=g).to(dtype)
    w = torch.randn(501, 64, generator=g).to(dtype)
    idx, snapped = ops.nearest_embedding(x, w, metric)
    ref = _brute(x, w, metric)
    assert snapped.dtype == dtype and snapped.shape == x.shape
    x64, w64 = x.reshape(-1, 64).double(), w.double()
    if metric == "l2":
        score = ((x64[:, None] - w64[None]) ** 2).sum(-1)
    else:
        score = -(x64 @ (w64 / w64.norm(dim=1, keepdim=True)).T)
    got = score.gather(1, idx.reshape(-1, 1)).squeeze(1)
    best = score.gather(1, ref.reshape(-1, 1)).squeeze(1)
    scale = (x64.norm(dim=1) * w64.norm(dim=1).max() + (w64 * w64).sum(1).max()).clamp_min(1)
    assert bool(((got - best) <= 1e-5 * scale).all())
    assert (idx.reshape(-1) != ref.reshape(-1)).float().mean() < 0.01


def test_ties_go_to_the_lowest_index_across_blocks(monkeypatch):
    mod = importlib.import_module("fastdiff.ops._nearest")
    w = torch.randn(50, 4, dtype=torch.float64)
    w[37] = w[3]
    w[44] = w[3]
    x = w[3:4] + 1e-9
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 2 * 256 * 8)  # V blocks of 8 rows, N blocks of 256
    idx, _ = ops.nearest_embedding(x, w)
    assert int(idx) == 3
    idx, _ = ops.nearest_embedding(w[[44]], w, "cosine")
    assert int(idx) == 3


def test_blocking_does_not_change_results(monkeypatch):
    mod = importlib.import_module("fastdiff.ops._nearest")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 16, generator=g)
    w = torch.randn(700, 16, generator=g)
    full = ops.nearest_embedding(x, w)[0]
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 2 * 256 * 33)
    assert torch.equal(full, ops.nearest_embedding(x, w)[0])


def test_non_contiguous_and_batched_shapes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 5, 19, generator=g).transpose(0, 2)  # (19, 5, 16), non-contiguous
    w = torch.randn(40, 32, generator=g)[:, ::2]  # (40, 16), non-contiguous
    idx, snapped = ops.nearest_embedding(x, w)
    assert idx.shape == (19, 5)
    assert torch.equal(idx, _brute(x, w, "l2"))
    assert_close(snapped, w[idx], atol=0)


def test_snapped_is_the_clamping_trick():
    w = torch.randn(10, 8)
    x = w[[2, 7, 7, 0]] + 0.01 * torch.randn(4, 8)
    idx, snapped = ops.nearest_embedding(x, w)
    assert idx.tolist() == [2, 7, 7, 0]
    assert torch.equal(snapped, w[[2, 7, 7, 0]])


@pytest.mark.parametrize("x,w,kw,err,match", [
    (torch.randn(3, 4), torch.randn(5, 3), {}, ValueError, "x"),
    (torch.randn(3, 4), torch.randn(0, 4), {}, ValueError, "weight"),
    (torch.randn(3, 4), torch.randn(5, 4, 1), {}, ValueError, "weight"),
    (torch.randn(3, 4), torch.randn(5, 4).double(), {}, TypeError, "weight"),
    (torch.randint(0, 3, (3, 4)), torch.randn(5, 4), {}, TypeError, "x"),
    (torch.full((3, 4), float("nan")), torch.randn(5, 4), {}, ValueError, "x"),
    (torch.randn(3, 4), torch.full((5, 4), float("inf")), {}, ValueError, "weight"),
    (torch.randn(3, 4), torch.randn(5, 4), {"metric": "dot"}, ValueError, "metric"),
    (torch.randn(3, 4), torch.randn(5, 4), {"backend": "cuda"}, RuntimeError, "cuda"),
])
def test_bad_input(x, w, kw, err, match):
    with pytest.raises(err, match=match):
        ops.nearest_embedding(x, w, **kw)


def test_device_mismatch():
    with pytest.raises(ValueError, match="device"):
        ops.nearest_embedding(torch.randn(3, 4), torch.zeros(5, 4, device="meta"))
