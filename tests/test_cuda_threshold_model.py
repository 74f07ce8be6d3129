"""The top-k / top-p threshold search of the CUDA sampler (csrc/cuda/sample_categorical.cu, ``radix_threshold``),
modelled step for step in NumPy and checked against the reference's tie-inclusive sets
(:func:`fastdiff.ops.filter_weights`) on CPU.

The model must give the reference's kept set exactly; the kept weights are compared to a few ulp (NumPy's
``exp`` and PyTorch's are different implementations). This checks the algorithm (order keys, byte-wise descent, crossing rule, early stop), which no CPU test
can check in the CUDA code itself; tests/ops/test_sample_categorical.py (backend "cuda") runs the kernel on
a GPU against the same reference. The model mirrors the kernel: 8 levels of 256-bin histograms over uint64 keys, the highest
bin where ``above + bin mass >= target`` is taken, and the search stops when that bin holds one
element or the key is complete (threshold = prefix with the remaining bits zero).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.ops.sample_categorical import filter_weights

MASK64 = (1 << 64) - 1


def ordered_key(z: np.ndarray) -> np.ndarray:
    u = (z + 0.0).astype(np.float64).view(np.uint64)
    neg = (u >> np.uint64(63)) == 1
    return np.where(neg, ~u, u | np.uint64(1 << 63))


def weight_key(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float64).view(np.uint64)


def radix_threshold(keys: np.ndarray, weights: np.ndarray, eligible: np.ndarray, target: float, mass: bool) -> int:
    prefix, above = 0, 0.0
    for level in range(8):
        shift = 56 - 8 * level
        hi_mask = 0 if level == 0 else (MASK64 << (shift + 8)) & MASK64
        cand = eligible & ((keys & np.uint64(hi_mask)) == np.uint64(prefix))
        digit = ((keys >> np.uint64(shift)) & np.uint64(255)).astype(np.int64)
        cnt = np.bincount(digit[cand], minlength=256)
        sums = np.bincount(digit[cand], weights=weights[cand], minlength=256) if mass else cnt.astype(np.float64)
        acc, pick = above, -1
        for b in range(255, -1, -1):
            if cnt[b] == 0:
                continue
            if acc + sums[b] >= target:
                pick = b
                break
            acc += sums[b]
        if pick < 0:
            return prefix
        prefix |= pick << shift
        above = acc
        if cnt[pick] == 1 or shift == 0:
            return prefix
    return prefix


def kernel_weights(z: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """The kernel's filtered weights for one row of scaled logits ``z`` (float64)."""
    V = z.shape[0]
    m = z.max()
    w = np.exp(z - m)
    kz = ordered_key(z)
    keep_k = np.ones(V, dtype=bool)
    if top_k is not None and 0 < top_k < V:
        kth = radix_threshold(kz, np.ones(V), np.ones(V, dtype=bool), float(top_k), mass=False)
        keep_k = kz >= np.uint64(kth)
    keep = keep_k
    if top_p is not None and top_p < 1.0:
        W = w[keep_k].sum()
        pth = radix_threshold(weight_key(w), w, keep_k, top_p * W, mass=True)
        keep = keep_k & (weight_key(w) >= np.uint64(pth))
    return np.where(keep, w, 0.0)


def _boundary_distance(z: np.ndarray, top_k, top_p) -> float:
    w = filter_weights(torch.from_numpy(z)[None], top_k, None)[0].numpy()
    p = w / w.sum()
    vals, counts = np.unique(p, return_counts=True)
    group = (vals * counts)[::-1]
    mass = (np.cumsum(group) - group)[::-1]
    return float(np.min(np.abs(mass - top_p)))


def _rows(kind: str, n: int, V: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=(n, V)) * 3
    if kind == "ties":  # few distinct values: large tie groups everywhere
        return rng.integers(-3, 4, size=(n, V)).astype(np.float64)
    if kind == "masked":  # -inf logits, signed zeros, one dominant value
        z = rng.normal(size=(n, V))
        z[:, ::3] = -np.inf
        z[:, 1::7] = -0.0
        z[:, 2::11] = 0.0
        z[:, -1] = 40.0  # never all -inf
        return z
    if kind == "fp16":  # values that fp16 logits produce: many near-equal and equal values
        return (rng.normal(size=(n, V)) * 2).astype(np.float16).astype(np.float64) / 0.7
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "ties", "masked", "fp16"])
@pytest.mark.parametrize("V", [1, 2, 7, 300])
@pytest.mark.parametrize("top_k,top_p", [(1, None), (3, None), (50, None), (None, 0.5), (None, 0.9), (None, 0.999),
                                         (5, 0.7), (50, 0.9), (None, 1e-9)])
def test_threshold_search_gives_the_reference_sets(kind, V, top_k, top_p):
    z = _rows(kind, 40, V, seed=V * 31 + (top_k or 0))
    ref = filter_weights(torch.from_numpy(z), top_k, top_p).numpy()
    near = 0
    for r in range(z.shape[0]):
        got = kernel_weights(z[r], top_k, top_p)
        if not np.array_equal(got > 0, ref[r] > 0):
            assert top_p is not None and _boundary_distance(z[r], top_k, top_p) < 1e-12, (r, got, ref[r])
            near += 1
        else:
            # The kept set exactly; the kept weights to a stated tolerance: NumPy's exp (the model) and
            # PyTorch's (the reference) are different implementations and differ by an ulp where NumPy
            # takes its AVX-512 path. 4 ulp of float64 relative.
            np.testing.assert_allclose(got, ref[r], rtol=4 * np.finfo(np.float64).eps, atol=0)
    assert near <= 1
