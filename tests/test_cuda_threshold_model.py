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
from tests._scripts import load_script

TOPP = load_script("cuda_topp_passes")  # the NumPy models of the kernel's searches


def ordered_key(z: np.ndarray) -> np.ndarray:
    u = (z + 0.0).astype(np.float64).view(np.uint64)
    neg = (u >> np.uint64(63)) == 1
    return np.where(neg, ~u, u | np.uint64(1 << 63))


def weight_key(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float64).view(np.uint64)


def radix_threshold(keys: np.ndarray, weights: np.ndarray, eligible: np.ndarray, target: float, mass: bool) -> int:
    return TOPP.byte_search(keys, weights, eligible, target, mass)[0]


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


# --------------------------------------------------------------------------------------------------------
# top-p alone: the range-radix search of ``topp_search`` (window below the max weight, W from level 0, the
# crossing bin finished in shared memory), modelled in scripts/cuda_topp_passes.py. These tests check the
# MODEL of the kernel's search against a float64 oracle of the kept set: they show that the digit scheme,
# the narrowing and the shared-memory finish are right; they do not run the CUDA code (the cuda backend's
# tests in tests/ops/test_sample_categorical.py do, on a GPU).
# --------------------------------------------------------------------------------------------------------


def _oracle_topp(z: np.ndarray, top_p: float) -> tuple[np.ndarray, float]:
    """The definition by a sort of the distinct weights, in float64: keep ``v`` iff the mass of the weights
    strictly larger than ``w_v`` is below ``top_p`` of the row's; returns (kept mask, its distance from
    the nearest tie of a group's "mass above" with top_p, relative to the row's mass)."""
    w = np.exp(z - z.max())
    W = w.sum()
    vals, counts = np.unique(w[w > 0], return_counts=True)
    vals, counts = vals[::-1], counts[::-1]  # descending
    group = vals * counts
    above = np.cumsum(group) - group
    kept_vals = vals[above < top_p * W]
    return (w >= kept_vals.min()) & (w > 0), float(np.min(np.abs(above / W - top_p)))


def _topp_rows(kind: str, V: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.normal(size=V) * 2
    if kind == "flat":  # the nucleus is most of the row
        return rng.normal(size=V) * 0.1
    if kind == "peaked":
        return rng.normal(size=V) * 8
    if kind == "bf16":  # rounded like bf16 logits: ties everywhere
        return torch.from_numpy(rng.normal(size=V) * 2).to(torch.bfloat16).double().numpy()
    if kind == "ints":  # few distinct values: long tie groups at any crossing
        return rng.integers(-3, 4, size=V).astype(np.float64)
    if kind == "masked":
        z = rng.normal(size=V)
        z[::3] = -np.inf
        z[-1] = 2.0
        return z
    if kind == "tiny":  # weights from 1 down through the subnormals: most far below level 0's window
        return -np.linspace(0.0, 745.0, V)
    if kind == "equal":
        return np.zeros(V)
    if kind == "edge-tie":  # a tie group at the crossing: the top 3, then 10 equal, then the rest far below
        z = rng.normal(size=V) - 8.0
        z[:3] = 3.0
        z[3:13] = 2.0
        return z
    raise ValueError(kind)


TOPP_KINDS = ["normal", "flat", "peaked", "bf16", "ints", "masked", "tiny", "equal", "edge-tie"]
TOPP_PS = [1e-9, 0.05, 0.5, 0.9, 0.999, 1 - 1e-9]


def _check_model_row(z: np.ndarray, top_p: float, res: dict) -> bool:
    """The model's threshold keeps the oracle's set (except at a near-tie of the crossing, returns False
    there), its kept total and W are the sums of the kept / all weights."""
    w = np.exp(z - z.max())
    got = (w.view(np.uint64) >= np.uint64(res["threshold"])) & (w > 0)
    want, dist = _oracle_topp(z, top_p)
    assert res["W"] == pytest.approx(w.sum(), rel=1e-12)
    if not np.array_equal(got, want):
        assert dist < 1e-12, (top_p, np.nonzero(got != want)[0][:5])
        return False
    assert res["total"] == pytest.approx(w[got].sum(), rel=1e-12)
    return True


@pytest.mark.parametrize("kind", TOPP_KINDS)
@pytest.mark.parametrize("V", [1, 2, 7, 300, 2047, 2049, 5000])
def test_topp_model_gives_the_definition_set(kind, V):
    """Every row kind, V around the bin count and the shared-memory capacity, top_p from ~0 to ~1: the model
    keeps the float64 definition's set; level 0's bottom bin (below the window) never holds the crossing;
    with V <= the capacity the search takes at most 2 passes (level 0 + the copy), else within its bound."""
    rng = np.random.default_rng(V * 7 + len(kind))
    near = 0
    for top_p in TOPP_PS:
        z = _topp_rows(kind, V, rng)
        res = TOPP.topp_search(z, top_p)
        near += not _check_model_row(z, top_p, res)
        assert not res["bottom"], (kind, V, top_p)
        assert res["end"] != "cap"
        assert res["passes"] <= (2 if V <= TOPP.CAP else 10), (kind, V, top_p, res)
    assert near <= 1


def test_topp_model_reaches_every_ending():
    """Rows built for each way the search ends: one element in the crossing bin (a dominant token), one key
    (a row of equal weights at level 0; a tie group larger than the capacity with near-equal neighbours in
    its level-0 bin, after generic levels), the shared-memory finish, and level 0's bottom bin (reached only
    with a window floor raised above the crossing: the kernel's floor never lets it hold the crossing)."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=3000)
    z[17] = 40.0
    res = TOPP.topp_search(z, 0.9)
    assert res["end"] == "one" and res["passes"] == 1 and _check_model_row(z, 0.9, res)

    z = np.full(5000, -1.5)
    res = TOPP.topp_search(z, 0.5)
    assert res["end"] == "key" and res["passes"] == 1 and _check_model_row(z, 0.5, res)

    z = rng.normal(size=6000) - 20.0
    z[0] = 0.0
    z[1:3001] = -3.0  # 3000 equal weights hold the crossing
    z[3001:3501] = -3.0 + 1e-9 * np.arange(1, 501)  # 500 more in level 0's crossing bin, other keys
    res = TOPP.topp_search(z, 0.5)
    assert res["end"] == "key" and res["passes"] > 2 and _check_model_row(z, 0.5, res)

    z = _topp_rows("normal", 4000, rng)
    res = TOPP.topp_search(z, 0.9)
    assert res["end"] == "sorted" and res["passes"] == 2 and _check_model_row(z, 0.9, res)

    z = np.concatenate([[0.0], np.log(0.3) + 1e-3 * rng.normal(size=4000)])  # crossing among w ~ 0.3
    res = TOPP.topp_search(z, 0.9, lo0=TOPP._key(0.5))
    assert res["bottom"] and _check_model_row(z, 0.9, res)


@pytest.mark.parametrize("V", [32768, 50257])
def test_topp_model_passes_on_the_benchmark_rows(V):
    """The pass counts stated in the kernel's header: on the benchmark's rows (2 N(0, 1): normal, / 20 flat,
    x 4 peaked), top_p 0.9 and 0.5, the search takes at most 2 passes (+ max + draw: within 2x of the plain
    draw's max + total + draw), and keeps the definition's set."""
    rng = np.random.default_rng(V)
    x = rng.normal(size=(3, V)) * 2
    for top_p in (0.9, 0.5):
        for scale in (1.0, 0.05, 4.0):
            for r in range(x.shape[0]):
                z = x[r] * scale
                res = TOPP.topp_search(z, top_p)
                assert res["passes"] <= 2, (V, top_p, scale, res)
                _check_model_row(z, top_p, res)
