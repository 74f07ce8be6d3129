"""sample_categorical on every backend: the draw contract (the inverse CDF at the row's Philox uniform),
frequencies, zero-probability tokens never drawn, tie-inclusive top-k / top-p sets, greedy argmax, views and
empty inputs, value checks (in the public op or in the C++ kernel's own pass: the same error), and bad input
rejected before any kernel runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from fastdiff import ops
from fastdiff import random as R
from fastdiff.errors import InputError, InputTypeError
from fastdiff.ops import filter_weights
from tests import _oracles as O
from tests._scripts import load_script
from tests.ops import _cases as C
from tests.ops import _triton_compile as _tc

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


def _softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _filtered_weights(logits, temperature=1.0, top_k=None, top_p=None):
    return filter_weights(logits.double().cpu() / temperature, top_k, top_p)


# --------------------------------------------------------------------------------------------------------
# The draw contract and frequencies
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_draws_follow_the_documented_contract(backend):
    """Each row's token is the inverse CDF at the Philox uniform of (seed; row, offset)."""
    logits = torch.randn(40, 13, generator=C.gen(0)) * 3
    seed, offset = 2**40 + 17, 5
    out = ops.sample_categorical(logits.to(C.device(backend)), seed=seed, offset=offset, temperature=0.7,
                                 backend=backend).cpu()
    z = logits.double().numpy() / 0.7
    for r in range(40):
        assert int(out[r]) == O.inverse_cdf(_softmax64(z[r]), O.row_uniform(seed, offset, r))


@pytest.mark.parametrize("V", [1, 2, 7, 1000])
@pytest.mark.parametrize("backend", C.backends(C.AUTO_CPU, "cuda"))
def test_frequencies_chi_square(backend, V):
    row = torch.randn(V, generator=C.gen(V)) * 2
    row[0] = float("-inf") if V > 1 else row[0]
    n = 100_000
    out = ops.sample_categorical(row.to(C.device(backend)).expand(n, V), seed=1, temperature=1.0, backend=backend)
    p = _softmax64(row.double().numpy())
    counts = np.bincount(out.cpu().numpy(), minlength=V)
    if V > 1:
        assert counts[0] == 0  # -inf logit never drawn
    if V <= 7:
        nz = p > 0
        if nz.sum() > 1:
            assert stats.chisquare(counts[nz], p[nz] * n).pvalue > 1e-5
    else:  # bin by probability deciles so expected counts are large
        order = np.argsort(p)
        bins = np.array_split(order[p[order] > 0], 10)
        assert stats.chisquare([counts[b].sum() for b in bins], [p[b].sum() * n for b in bins]).pvalue > 1e-5


@pytest.mark.parametrize("backend,V,n", C.cases({"cuda": [(1000, 200_000)], "triton": [(1000, 1_000_000)]}))
def test_gpu_frequencies_and_zero_probability(backend, V, n):
    """GPU sizes: a row with every 7th logit at -inf (CUDA), a million draws (Triton on a GPU)."""
    if backend == "triton" and not C.GPU:
        pytest.skip("a million draws: GPU only")
    row = torch.randn(V, generator=C.gen(8 if backend == "cuda" else 4)) * 2
    if backend == "cuda":
        row[::7] = float("-inf")
    else:
        row[0] = float("-inf")
    out = ops.sample_categorical(row.to("cuda").expand(n, V), seed=1, backend=backend).cpu().numpy()
    p = torch.softmax(row.double(), -1).numpy()
    counts = np.bincount(out, minlength=V)
    assert counts[p == 0].sum() == 0
    order = np.argsort(p)
    bins = np.array_split(order[p[order] > 0], 10 if backend == "cuda" else 20)
    assert stats.chisquare([counts[b].sum() for b in bins], [p[b].sum() * n for b in bins]).pvalue > 1e-5


@pytest.mark.parametrize("backend", C.backends(C.AUTO_CPU, "cuda"))
def test_zero_probability_tokens_never_drawn(backend):
    V = 50
    logits = torch.full((200_000, V), float("-inf"), device=C.device(backend))
    logits[:, [3, 17, 49]] = torch.tensor([0.0, -30.0, 5.0], device=logits.device)
    out = ops.sample_categorical(logits, seed=9, backend=backend)
    assert set(out.unique().tolist()) <= {3, 17, 49}


def _topk_set(z: np.ndarray, k: int) -> set[int]:
    kth = np.sort(z)[::-1][k - 1]
    return set(np.nonzero(z >= kth)[0].tolist())


def _topp_set(p: np.ndarray, top_p: float) -> set[int]:
    """Smallest prefix (by decreasing probability) whose mass reaches top_p, plus ties with its last member."""
    order = np.argsort(-p, kind="stable")
    mass, keep = 0.0, []
    for i in order:
        if mass >= top_p and p[i] < p[keep[-1]]:
            break
        keep.append(int(i))
        mass += p[i]
    return set(keep)


@pytest.mark.parametrize("backend", C.backends("reference", "cpp", "triton"))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_top_k_ranks_the_logits_before_the_max_is_subtracted(backend, dtype):
    """top-k keeps v iff fewer than k logits are strictly larger: 1e-30 and 0 are distinct logits although
    1e-30 - 0.25 and 0 - 0.25 round to the same float64 (found by tests/test_fuzz.py under ASan: the
    reference and C++ ranked the shifted values and kept the zeros too). top_k = 2 keeps 0.25 and 1e-30 only."""
    x = torch.tensor([0.0, float("-inf"), 1e-30, 0.25, 0.0, 0.0, -0.0], dtype=F64)
    z = x.numpy()
    kept = np.array([(z > v).sum() < 2 for v in z]) & np.isfinite(z)  # the definition, by counting
    assert kept.tolist() == [False, False, True, True, False, False, False]
    n = 300 if backend == "triton" else 4000  # (the interpreter is slow)
    out = ops.sample_categorical(x.to(dtype).expand(n, 7).contiguous().to(C.device(backend)), seed=1, top_k=2,
                                 backend=backend).cpu().numpy()
    counts = np.bincount(out, minlength=7)
    assert not counts[~kept].any(), counts
    w = np.exp(z[kept] - 0.25)
    assert stats.chisquare(counts[kept], w / w.sum() * len(out)).pvalue > 1e-6
    assert torch.equal(filter_weights(x[None], 2, None)[0] > 0, torch.from_numpy(kept))


@pytest.mark.parametrize("top_k,top_p", [(1, None), (5, None), (None, 0.5), (None, 0.9), (10, 0.8)])
@pytest.mark.parametrize("backend", C.backends(C.AUTO_CPU, "cuda"))
def test_top_k_top_p_sets_and_frequencies(backend, top_k, top_p):
    V, n = 40, 100_000
    row = torch.randn(V, generator=C.gen(3)) * 1.5
    out = ops.sample_categorical(row.to(C.device(backend)).expand(n, V), seed=4, top_k=top_k, top_p=top_p,
                                 temperature=0.9, backend=backend).cpu()
    z = row.double().numpy() / 0.9
    allowed = set(range(V))
    w = _softmax64(z)
    if top_k is not None:
        allowed = _topk_set(z, top_k)
        w = np.where(np.isin(np.arange(V), list(allowed)), w, 0)
        w = w / w.sum()
    if top_p is not None:
        allowed = _topp_set(w, top_p)
        w = np.where(np.isin(np.arange(V), list(allowed)), w, 0)
        w = w / w.sum()
    counts = np.bincount(out.numpy(), minlength=V)
    assert set(np.nonzero(counts)[0].tolist()) <= allowed
    idx = sorted(allowed)
    if len(idx) > 1:
        assert stats.chisquare(counts[idx], w[idx] * n).pvalue > 1e-5


@pytest.mark.parametrize("backend,n", C.cases({"reference": [20_000], "cpp": [20_000], "triton": [40],
                                               "cuda": [100_000]}))
def test_ties_are_kept_whole(backend, n):
    """top_k=2 of (2, 1, 1, 1, 0) keeps the three 1s; top_p=0.5 of (.4, .2, .2, .2, 0) keeps the three .2s; the
    draws equal the reference's; on CUDA also the frequencies."""
    dev = C.device(backend)
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]], device=dev).expand(n, 5)
    out = ops.sample_categorical(logits, seed=0, top_k=2, backend=backend)
    assert set(out.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(out.cpu(), ops.sample_categorical(logits.cpu(), seed=0, top_k=2, backend="reference"))
    p = torch.tensor([0.4, 0.2, 0.2, 0.2, 0.0], device=dev).log().expand(n, 5)
    out = ops.sample_categorical(p, seed=0, top_p=0.5, backend=backend)
    assert set(out.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(out.cpu(), ops.sample_categorical(p.cpu(), seed=0, top_p=0.5, backend="reference"))
    # -0.0 and +0.0 are one tie group for top-k, as in the reference
    z = torch.tensor([[1.0, -0.0, 0.0, -1.0]], device=dev).expand(40, 4)
    assert set(ops.sample_categorical(z, seed=2, top_k=2, backend=backend).unique().tolist()) == {0, 1, 2}
    if backend == "cuda":  # logits 2, 2, 1, 1, 0: top_k=1 and top_p=0.5 keep both 2s; frequencies
        logits = torch.tensor([[2.0, 2.0, 1.0, 1.0, 0.0]]).expand(100_000, 5).to(dev)
        for kw in (dict(top_k=1), dict(top_p=0.5), dict(top_k=3)):
            out = ops.sample_categorical(logits, seed=5, backend=backend, **kw).cpu()
            w = filter_weights(logits[:1].double().cpu(), kw.get("top_k"), kw.get("top_p"))[0].numpy()
            counts = np.bincount(out.numpy(), minlength=5)
            assert counts[w == 0].sum() == 0, kw
            nz = w > 0
            assert stats.chisquare(counts[nz], w[nz] / w.sum() * out.numel()).pvalue > 1e-5, kw


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_greedy_is_the_first_maximum(backend):
    dev = C.device(backend)
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]], device=dev)
    assert ops.sample_categorical(logits, seed=0, temperature=0, backend=backend).tolist() == [1, 0]
    for dtype in C.DTYPES:
        many = torch.randint(-3, 4, (200, 33), generator=C.gen(4)).to(dtype)  # many exact ties
        many[5] = float("-inf")
        many[5, 30] = 0.0
        out = ops.sample_categorical(many.to(dev), seed=0, temperature=0.0, backend=backend)
        assert torch.equal(out.cpu(), torch.argmax(many.float(), dim=-1))


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_same_seed_same_tokens_views_dtypes_and_empty(backend):
    dev = C.device(backend)
    logits = torch.randn(3, 97, 33, generator=C.gen(5)).to(dev)
    a = ops.sample_categorical(logits, seed=7, offset=2, backend=backend)
    assert a.shape == (3, 97) and a.dtype == torch.int64
    assert torch.equal(a, ops.sample_categorical(logits.clone(), seed=7, offset=2, backend=backend))
    assert not torch.equal(a, ops.sample_categorical(logits, seed=7, offset=3, backend=backend))
    # non-contiguous views give the same draws as their contiguous copies (and as the reference)
    t = logits.transpose(0, 1)
    assert torch.equal(ops.sample_categorical(t, seed=1, backend=backend).cpu(),
                       ops.sample_categorical(t.contiguous().cpu(), seed=1, backend="reference"))
    s = logits[..., ::2]  # strided vocabulary
    assert torch.equal(ops.sample_categorical(s, seed=1, backend=backend).cpu(),
                       ops.sample_categorical(s.cpu(), seed=1, backend="reference"))
    x = torch.randn(3, 97, 33, generator=C.gen(5)).transpose(0, 1).to(dev)
    assert torch.equal(ops.sample_categorical(x, seed=1, backend=backend).cpu(),
                       ops.sample_categorical(x.cpu(), seed=1, backend="reference"))
    for dt in (F16, BF16, F64):
        out = ops.sample_categorical(logits.to(dt), seed=7, offset=2, backend=backend)
        ref = ops.sample_categorical(logits.to(dt).double(), seed=7, offset=2, backend=backend)
        assert torch.equal(out, ref)
    assert ops.sample_categorical(logits[:0], seed=1, backend=backend).shape == (0, 97)
    assert ops.sample_categorical(torch.zeros(0, 4, device=dev), seed=1, backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", C.backends("reference", "cpp"))
def test_chunking_does_not_change_draws(backend, monkeypatch):
    mod = importlib.import_module("fastdiff.ops.sample_categorical")
    logits = torch.randn(37, 11)
    full = ops.sample_categorical(logits, seed=3, top_p=0.8, backend=backend)
    monkeypatch.setattr(mod, "rows_per_chunk", lambda width: 5)
    assert torch.equal(full, ops.sample_categorical(logits, seed=3, top_p=0.8, backend=backend))


# --------------------------------------------------------------------------------------------------------
# Against the reference, per backend at the sizes it is built for
# --------------------------------------------------------------------------------------------------------
MODES = [dict(), dict(temperature=0.0), dict(temperature=0.6, top_k=5), dict(top_p=0.9), dict(top_k=50, top_p=0.5),
         dict(temperature=1.7, top_k=1), dict(top_p=0.05)]


@pytest.mark.parametrize("backend,V,dtype", C.cases({"cpp": [(V, dt) for V in (1, 7, 50257) for dt in C.DTYPES]}))
def test_cpp_equals_the_reference(backend, V, dtype):
    """Every filter mode; tokens in the kept set; draws equal except near-ties on the float32 fast path."""
    n = 33 if V < 1000 else 12
    if V > 1000 and dtype in (F16, BF16):
        n = 6
    logits = (torch.randn(n, V, generator=C.gen(V)) * 3).to(dtype)
    if V > 1:
        logits[1, ::2] = float("-inf")
        logits[2, : V // 2 + 1] = logits[2, 0]  # a long tie
    for k, mode in enumerate(MODES):
        seed, offset = 77 + k, k
        got = ops.sample_categorical(logits, seed=seed, offset=offset, **mode, backend=backend)
        want = ops.sample_categorical_ref(logits, seed=seed, offset=offset, **mode)
        assert got.shape == (n,) and got.dtype == torch.int64
        if mode.get("temperature") == 0.0:
            assert torch.equal(got, want)
            continue
        kw = {k2: mode.get(k2) for k2 in ("top_k", "top_p")}
        w = _filtered_weights(logits, mode.get("temperature", 1.0), **kw)
        assert bool((w.gather(1, got[:, None]) > 0).all()), f"{mode}: a token outside the kept set"
        C.check_draws_rare(got, want, lambda r: w[r].numpy(), seed, offset, fast=V > 2048 and dtype != F64)


FILTERS = [dict(), dict(temperature=0.0), dict(top_k=1), dict(top_k=5, temperature=0.7), dict(top_p=0.5),
           dict(top_k=10, top_p=0.9, temperature=1.3)]


def _sample_logits(N, V, dtype, seed, dev):
    logits = torch.randn(N, V, generator=C.gen(seed)) * 2
    if V > 5:
        logits[:, 2] = float("-inf")
        logits[0, :5] = logits[0, 5]  # a tie group at the top-k / top-p boundary candidates
        logits[1, 3:] = 0.0  # a row of equal values
    return logits.to(dev, dtype)


def _check_against_reference(backend, logits, kw, seed=7, offset=3, max_near=1):
    got = ops.sample_categorical(logits, seed=seed, offset=offset, backend=backend, **kw)
    want = ops.sample_categorical(logits, seed=seed, offset=offset, backend="reference", **kw)
    assert got.dtype == torch.int64 and got.shape == logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1]).double().cpu()
    if kw.get("temperature", 1.0) == 0:
        assert torch.equal(got, want)
        return
    w = filter_weights(flat / kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"))
    C.check_draws_near(got, want, w, R.row_uniforms(seed, offset, flat.shape[0]), max_near=max_near)


@pytest.mark.parametrize("backend,dtype,kw", C.cases({"triton": [(dt, kw) for dt in C.DTYPES for kw in FILTERS]}))
def test_triton_equals_the_reference(backend, dtype, kw):
    for V, N in ((1, 3), (7, 6), (300, 4)):
        _check_against_reference(backend, _sample_logits(N, V, dtype, V, C.device(backend)), kw)


@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.6), dict(top_k=5), dict(top_p=0.8),
                                  dict(top_k=50, top_p=0.9, temperature=1.3), dict(top_k=1)], ids=C._id)
@pytest.mark.parametrize("backend,dtype,V",
                         C.cases({"cuda": [(dt, V) for dt in C.DTYPES for V in (1, 7, 1000, 50257)]}))
def test_cuda_follows_the_contract(backend, dtype, V, opts):
    """Same tokens for the same seed; the contract's token except near-ties (of the CDF or of a top-p mass
    boundary), at most 2."""
    n = 64 if V <= 1000 else 8
    logits = (torch.randn(n, V, generator=C.gen(V)) * 3).to(dtype)
    logits[:, : max(1, V // 10)] = logits[:, : max(1, V // 10)].round()  # exact ties among the top logits
    logits = logits.to("cuda")
    seed, offset = 99 + V, 3
    out = ops.sample_categorical(logits, seed=seed, offset=offset, backend=backend, **opts)
    assert out.shape == (n,) and out.dtype == torch.int64
    assert torch.equal(out, ops.sample_categorical(logits, seed=seed, offset=offset, backend=backend, **opts))
    z = logits.double().cpu() / opts.get("temperature", 1.0)
    w = filter_weights(z, opts.get("top_k"), opts.get("top_p")).numpy()
    near = 0
    for r in range(n):
        u = O.row_uniform(seed, offset, r)
        want = O.inverse_cdf(w[r], u)
        if int(out[r]) != want:
            close = O.margin(w[r], u) < 1e-9 or _topp_boundary_distance(z[r].numpy(), opts.get("top_k"),
                                                                        opts.get("top_p")) < 1e-9
            assert close, f"row {r}: drew {int(out[r])}, reference {want}, not a near-tie"
            near += 1
        else:
            assert w[r, int(out[r])] > 0
    assert near <= 2


def _topp_boundary_distance(z: np.ndarray, top_k, top_p) -> float:
    """How close any category's 'mass strictly more probable' is to top_p (top-p near-tie indicator)."""
    if top_p is None:
        return 1.0
    w = filter_weights(torch.from_numpy(z)[None], top_k, None)[0].numpy()
    p = w / w.sum()
    vals, counts = np.unique(p, return_counts=True)  # ascending
    group = (vals * counts)[::-1]
    mass = (np.cumsum(group) - group)[::-1]  # mass of the strictly larger values, per distinct value
    return float(np.min(np.abs(mass - top_p)))


@pytest.mark.gpu
@pytest.mark.skipif(not C.GPU, reason="needs a CUDA device (GPT-2 vocabulary)")
@pytest.mark.parametrize("backend", C.backends("triton"))
def test_gpu_gpt2_vocabulary(backend):
    logits = (torch.randn(256, 50257, generator=C.gen(2)) * 3).to("cuda", BF16)
    for kw in FILTERS:
        _check_against_reference(backend, logits, kw)


@pytest.mark.parametrize("backend", C.KERNELS)
def test_leading_tiles_of_minus_inf(backend):
    """Rows whose first row tiles (128 wide in the Triton interpreter) are all -inf: the online max and sums
    start from -inf without producing NaN."""
    dev = C.device(backend)
    logits = torch.full((3, 300), float("-inf"), device=dev)
    logits[:, 260:] = torch.randn(3, 40, generator=C.gen(8)).to(dev)
    logits[2, 299] = 50.0
    for kw in FILTERS:
        _check_against_reference(backend, logits, kw)


@pytest.mark.parametrize("backend", C.KERNELS)
def test_large_logits_small_temperature(backend):
    """Logits ~27 at temperature 0.3: shifted by the max before scaling, the draws equal the reference's and
    stay in the support."""
    V = 140
    x = torch.zeros(3, V, dtype=F64)
    x[:, 40:90] = float("-inf")
    x[:, 13], x[:, 118] = 27.25, 27.0
    x[1, 7] = -30.0
    x32 = x.float().to(C.device(backend))
    w_truth = torch.softmax(x / 0.3, -1)
    p = ops.sample_categorical(x32, seed=3, temperature=0.3, backend=backend)
    assert torch.equal(p.cpu(), ops.sample_categorical(x32, seed=3, temperature=0.3, backend="reference").cpu())
    assert bool((w_truth.gather(-1, p.cpu()[:, None]) > 0).all())


# --------------------------------------------------------------------------------------------------------
# Fuzzing against the reference
# --------------------------------------------------------------------------------------------------------
def _has_weight_near_tie(e: np.ndarray) -> bool:
    v = np.unique(e[e > 0])
    return bool(len(v) > 1 and (np.diff(v) <= 1e-14 * v[1:]).any())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), V=st.integers(1, 40), data=st.data(), seed=st.integers(0, 2**64 - 1),
       offset=st.integers(0, 2**40), temperature=st.floats(0.05, 5.0),
       top_k=st.one_of(st.none(), st.integers(1, 50)), top_p=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_fuzz_float64_rows_cpp(n, V, data, seed, offset, temperature, top_k, top_p):
    if "cpp" not in C.HERE:
        pytest.skip("the C++ backend is not selected")
    vals = data.draw(st.lists(st.one_of(st.floats(-30, 30), st.just(float("-inf")), st.sampled_from([0.0, 1.0])),
                              min_size=n * V, max_size=n * V))
    x = torch.tensor(vals, dtype=F64).reshape(n, V)
    x[:, data.draw(st.integers(0, V - 1))] = data.draw(st.floats(-5, 5))
    got = ops.sample_categorical(x, seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p,
                                 backend="cpp")
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


@settings(max_examples=12, deadline=None)
@given(x=C.logit_rows(), dtype=st.sampled_from([F64, F32, BF16, F16]), seed=st.integers(0, 2**64 - 1),
       offset=st.integers(0, 2**40), temperature=st.sampled_from([0.0, 0.05, 1.0, 3.0]),
       top_k=st.sampled_from([None, 1, 2, 7, 300]), top_p=st.sampled_from([None, 0.05, 0.5, 0.99]))
def test_fuzz_every_dtype_triton(x, dtype, seed, offset, temperature, top_k, top_p):
    """Exact agreement, except for inputs where the two top-k sets legitimately differ: the Triton kernel
    ranks the logits themselves (integer keys), the reference ranks ``(x - max) / temperature`` in float64,
    and that shift can round two distinct logits together (1.3e-194 and 0.0 both become -1.0 next to a
    maximum of 1.0), which makes a tie the tie-inclusive top-k keeps whole."""
    if "triton" not in C.HERE:
        pytest.skip("the Triton backend is not selected or not installed")
    x = x.to(C.device("triton"), dtype)
    assume(not _shift_merges_the_top_k_edge(x, top_k, temperature))
    kw = dict(seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(ops.sample_categorical(x, backend="triton", **kw),
                       ops.sample_categorical(x, backend="reference", **kw))


def _shift_merges_the_top_k_edge(x: torch.Tensor, top_k: int | None, temperature: float) -> bool:
    """Some row's top-k set (tie-inclusive) differs between the raw logits and ``(x - max) / temperature``."""
    if top_k is None:
        return False
    raw = x.double()
    m = raw.amax(-1, keepdim=True)
    z = (raw - m) / temperature if temperature > 0 else raw - m
    for r, zr in zip(raw, z):
        k = min(top_k, r.numel())
        if int((r >= r.topk(k).values[-1]).sum()) != int((zr >= zr.topk(k).values[-1]).sum()):
            return True
    return False


# --------------------------------------------------------------------------------------------------------
# As torch.library ops: opcheck (schema, fake kernel, autograd registration, AOT dispatch with dynamic shapes)
# on every backend, and the public op traced by torch.compile(fullgraph=True) with the same results
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", C.KERNELS)
def test_opcheck_sample_categorical(backend):
    logits = torch.randn(4, 9, generator=C.gen(2)).to(C.device(backend))
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 3, 0.8)):
        torch.library.opcheck(C.op(backend, "sample_categorical"), (logits, -5, 1, temperature, top_k, top_p, 2**40))


@pytest.mark.parametrize("backend", C.KERNELS)
def test_torch_compile_traces_without_a_graph_break(backend):
    logits = torch.randn(4, 9, generator=C.gen(3)).to(C.device(backend))
    fn = lambda lg: ops.sample_categorical(lg, seed=3, offset=1, temperature=0.8, top_k=4, top_p=0.9,  # noqa: E731
                                           backend=backend)
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager", fullgraph=True)(logits), fn(logits), rtol=0,
                               atol=0)


# --------------------------------------------------------------------------------------------------------
# Values and arguments: the same decision and message on every backend
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.0), dict(top_k=3), dict(top_p=0.5)], ids=C._id)
@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN"), (float("inf"), r"\+inf"), (None, "every logit")])
def test_bad_values_rejected_by_the_op_or_by_the_kernel(kw, bad, match):
    """The public op skips its own read pass for a kernel that checks the values itself (C++), which must
    raise the same error."""
    assert importlib.import_module("fastdiff.ops.backends.cpp.sample_categorical").CHECKS_VALUES
    logits = torch.randn(37, 300)
    if bad is None:
        logits[21] = float("-inf")
    else:
        logits[21, 123] = bad
    for be in C.HERE:
        with pytest.raises(ValueError, match=f"logits: .*{match}"):
            ops.sample_categorical(logits, seed=1, backend=be, **kw)


@pytest.mark.parametrize("temp", [float("inf"), 1e300, 1e31, 1e-31, 1e-300, 5e-324, -1.0, float("nan"), -float("inf")])
def test_temperature_outside_the_documented_range_is_rejected(temp):
    C.same_error(lambda be: ops.sample_categorical(torch.randn(3, 7), seed=1, temperature=temp, backend=be),
                 InputError, "temperature:")


@pytest.mark.parametrize("temp", [1e-30, 1e30])
def test_temperature_range_endpoints_agree(temp):
    g = C.gen(0)
    x = torch.randn(6, 9, generator=g, dtype=F64)
    x[0, 3] = x[0, 5] = x[0].max() + 1  # a tie at the maximum: tiny T draws one of the two
    want = ops.sample_categorical(x, seed=2, temperature=temp, backend="reference")
    if temp < 1:
        assert int(want[0]) in (3, 5)
    for be in C.HERE:
        assert torch.equal(ops.sample_categorical(x, seed=2, temperature=temp, backend=be), want), be


def test_float64_logits_over_temperature_overflow_is_rejected():
    x = torch.tensor([[1e300, 0.0, 1.0], [0.0, 1.0, 2.0]], dtype=F64)
    C.same_error(lambda be: ops.sample_categorical(x, seed=1, temperature=1e-10, backend=be), InputError,
                 "temperature: too small for these logits")
    for be in C.HERE:  # the same logits at temperature 1: fine
        ops.sample_categorical(x, seed=1, backend=be)
    # NaN is reported first, whatever the temperature (the order of the checks is the same everywhere)
    x[1, 0] = float("nan")
    C.same_error(lambda be: ops.sample_categorical(x, seed=1, temperature=1e-10, backend=be), InputError,
                 "logits: contains NaN")


def test_top_k_beyond_int64_is_no_filter():
    x = torch.randn(5, 7, dtype=F64)
    want = ops.sample_categorical(x, seed=3, backend="reference")
    for k in (7, 8, 2**63, 2**80):
        for be in C.HERE:
            assert torch.equal(ops.sample_categorical(x, seed=3, top_k=k, backend=be), want), (k, be)


def test_seed_tensors_must_hold_an_integer():
    """A float or bool one-element tensor was truncated to an int (1.5 drew with seed 1)."""
    x = torch.randn(3, 5)
    for bad in (torch.tensor(1.5), torch.tensor(True), torch.tensor([2.0])):
        C.same_error(lambda be: ops.sample_categorical(x, seed=bad, backend=be), InputTypeError, "seed:")
    want = ops.sample_categorical(x, seed=3, backend="reference")
    for seed in (torch.tensor(3), torch.tensor([3], dtype=torch.uint8)):
        for be in C.HERE:
            assert torch.equal(ops.sample_categorical(x, seed=seed, backend=be), want), be


def test_meta_empty_and_zero_stride_tensors():
    C.same_error(lambda be: ops.sample_categorical(torch.randn(3, 5, device="meta"), seed=0, backend=be), InputError,
                 "meta device")
    e = torch.empty_strided((0, 5), (0, 0))
    one = torch.randn(4, 1).as_strided((4, 1), (1, 0))  # a single category with a zero column stride
    for be in C.HERE:
        assert ops.sample_categorical(e, seed=1, backend=be).shape == (0,)
        assert torch.equal(ops.sample_categorical(one, seed=1, backend=be), torch.zeros(4, dtype=torch.int64))


def test_errors_name_the_public_arguments():
    x = torch.randn(3, 5)
    for kw, match in ((dict(top_p=0.0), "top_p:"), (dict(top_k=-1), "top_k:"), (dict(offset=-1), "offset:")):
        C.same_error(lambda be: ops.sample_categorical(x, seed=0, backend=be, **kw), InputError, match)


BAD = [
    (dict(logits=torch.tensor([[0.0, float("nan")]])), ValueError, "logits"),
    (dict(logits=torch.tensor([[0.0, float("inf")]])), ValueError, "logits"),
    (dict(logits=torch.full((2, 3), float("-inf"))), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 0)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=[0.0, 1.0]), TypeError, "logits"),
    (dict(logits=torch.zeros(2, 3), top_k=0), ValueError, "top_k"),
    (dict(logits=torch.zeros(2, 3), top_k=1.5), TypeError, "top_k"),
    (dict(logits=torch.zeros(2, 3), top_p=0.0), ValueError, "top_p"),
    (dict(logits=torch.zeros(2, 3), top_p=1.5), ValueError, "top_p"),
    (dict(logits=torch.zeros(2, 3), temperature=-1.0), ValueError, "temperature"),
    (dict(logits=torch.zeros(2, 3), seed=-1), ValueError, "seed"),
    (dict(logits=torch.zeros(2, 3), seed=1.5), TypeError, "seed"),
    (dict(logits=torch.zeros(2, 3), backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_bad_input_is_rejected_before_the_kernel(backend, case, monkeypatch):
    kwargs, err, match = dict(BAD[case][0]), BAD[case][1], BAD[case][2]
    dev = C.device(backend)
    if backend != "reference":
        glue = importlib.import_module(f"fastdiff.ops.backends.{backend}.sample_categorical")
        values = isinstance(kwargs["logits"], torch.Tensor) and kwargs["logits"].is_floating_point() and \
            kwargs["logits"].numel() and not bool(torch.isfinite(kwargs["logits"]).all())
        if not (values and getattr(glue, "CHECKS_VALUES", False)):  # (C++ checks values in its own pass)
            monkeypatch.setattr(glue, "sample_categorical", lambda *a, **k: pytest.fail("the kernel ran on bad input"))
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("backend", backend)
    if isinstance(kwargs["logits"], torch.Tensor):
        kwargs["logits"] = kwargs["logits"].to(dev)
    with pytest.raises(err, match=match):
        ops.sample_categorical(**kwargs)


# --------------------------------------------------------------------------------------------------------
# top-p without a sort: the kept set equals a full sort's (the definition), exactly, ties included
# --------------------------------------------------------------------------------------------------------
def _sorted_filter_weights(z: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """The definition by a full sort (the reference's former implementation): the slow oracle."""
    z = z - z.max(dim=-1, keepdim=True).values
    w = torch.exp(z)
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        w = torch.where(z >= kth, w, torch.zeros_like(w))
    if top_p is not None and top_p < 1.0:
        p = w / w.sum(-1, keepdim=True)
        sp, order = torch.sort(p, dim=-1, descending=True)
        excl = torch.cumsum(sp, -1) - sp
        pos = torch.arange(V).expand_as(sp)
        starts = torch.ones_like(sp, dtype=torch.bool)
        starts[:, 1:] = sp[:, 1:] != sp[:, :-1]
        first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=-1).values
        keep = torch.zeros_like(sp, dtype=torch.bool).scatter(-1, order, excl.gather(-1, first) < top_p)
        w = torch.where(keep, w, torch.zeros_like(w))
    return w


_ORACLE_ROWS = [  # (name, rows, V, scale): peaked rows keep a handful, flat rows most of the vocabulary
    ("peaked", 6, 3000, 8.0), ("normal", 8, 2500, 2.0), ("flat", 6, 4000, 0.05), ("small", 40, 9, 1.5),
    ("wide", 3, 9000, 1.0)]


@pytest.mark.parametrize("top_k", [None, 1, 7, 200])
@pytest.mark.parametrize("top_p", [1e-9, 0.05, 0.5, 0.9, 0.999, 1 - 1e-9])
def test_top_p_kept_set_equals_the_full_sort(top_k, top_p):
    """filter_weights (radix histogram + sort of the crossing bucket) keeps exactly the full sort's set, on
    random, rounded (ties everywhere), -inf-masked, long-tie and two-valued rows."""
    g = C.gen(int(top_p * 1e6) + (top_k or 0))
    for name, n, V, scale in _ORACLE_ROWS:
        z = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
        z[0] = z[0].round()  # many ties
        if n > 2:
            z[1, ::3] = float("-inf")
            z[2, : V // 2] = z[2, 0]  # a long tie group
        if n > 3:
            z[3] = (torch.rand(V, generator=g) < 0.3).double()  # two values only
        got = filter_weights(z, top_k, top_p)
        want = _sorted_filter_weights(z, top_k, top_p)
        assert torch.equal(got > 0, want > 0), (name, top_k, top_p)
        assert torch.equal(got, want), (name, top_k, top_p)  # the kept weights themselves are exp(z - max)


@pytest.mark.parametrize("top_p", [1e-9, 0.5, 0.9, 1 - 1e-9])
def test_top_p_kept_set_equals_the_full_sort_rows_of_mixed_ranges(top_p):
    """The reference buckets each row by its own range (octaves and bits per octave): one block of rows from
    nearly equal weights to weights spread over far more octaves than the bucket budget, a row all -inf but
    three, a row of one value, keeps exactly the full sort's set."""
    g = C.gen(int(top_p * 1e6) + 17)
    V = 5000
    scales = torch.tensor([0.001, 0.05, 1.0, 8.0, 100.0, 1000.0, 2.0, 0.0], dtype=torch.float64)
    z = torch.randn(len(scales), V, generator=g, dtype=torch.float64) * scales[:, None]
    z[6, 3:] = float("-inf")
    got = filter_weights(z, None, top_p)
    want = _sorted_filter_weights(z, None, top_p)
    assert torch.equal(got > 0, want > 0), top_p
    assert torch.equal(got, want), top_p


@pytest.mark.parametrize("backend", C.backends("reference", "cpp", "triton", "cuda"))
@pytest.mark.parametrize("scale,top_p", [(8.0, 0.9), (2.0, 0.9), (0.05, 0.9), (2.0, 0.3)])
def test_top_p_draws_stay_in_the_full_sort_set(backend, scale, top_p):
    """Every backend's draws (u all over (0, 1), many rows) lie in the full sort's kept set and are its
    inverse CDF at the row's uniform (a kept set too large or too small moves the draws at u near 1), up to
    one float32 CDF near-tie on a kernel."""
    n, V = (64, 2000) if backend != "triton" else (6, 300)
    row = torch.randn(V, generator=C.gen(11)) * scale
    logits = row.expand(n, V).contiguous()
    out = ops.sample_categorical(logits.to(C.device(backend)), seed=5, top_p=top_p, backend=backend).cpu()
    keep = _sorted_filter_weights(row.double()[None], None, top_p)[0] > 0
    assert bool(keep[out].all())
    # The kept set seen through the reference's draw: its tokens are the full sort's inverse CDF
    w = _sorted_filter_weights(row.double()[None], None, top_p)[0].numpy()
    want = np.array([O.inverse_cdf(w, O.row_uniform(5, 0, r)) for r in range(n)])
    assert int((out.numpy() != want).sum()) <= (0 if backend == "reference" else 1)


# --------------------------------------------------------------------------------------------------------
# The C++ top-p search on wide float32 rows (V > 2048): rows built to reach each of its paths (run on the
# CUDA backend too, on a GPU: its own search meets ties at the edge, flat ties, quantized rows there)
# --------------------------------------------------------------------------------------------------------
def _wide_row(kind: str, V: int) -> tuple[torch.Tensor, float]:
    """A float32 row of ``V`` logits and a top_p for each path of the search (sample_categorical.cpp)."""
    g = C.gen(V + len(kind))
    noise = torch.randn(V, generator=g)
    if kind == "tie-at-edge":  # 3 tokens above a tie group of 10 that holds the nucleus edge: all 10 kept
        x = noise - 4.0
        x[[7, V // 2, V - 1]] = 5.0
        x[torch.arange(11, 11 + 10 * 97, 97)] = 4.0
        return x, 0.5
    if kind == "flat-tie":  # the edge inside a tie group of almost the whole row (the bisection path)
        x = torch.zeros(V)
        x[[0, 5, V - 2]] = 3.0
        return x, 0.3
    if kind == "peaked":  # one token above top_p alone
        x = noise
        x[V // 3] = 30.0
        return x, 0.9
    if kind == "bimodal":  # the normal fit's guess falls between two clusters
        x = noise * 0.1
        x[torch.arange(3, V, V // 12)[:12]] = 8.0 + noise[:12] * 0.1
        return x, 0.6
    if kind == "quantized":  # bf16-like steps: many exact ties everywhere
        return (noise * 3).round(decimals=1).to(torch.bfloat16).float(), 0.8
    if kind == "neg-inf":
        x = noise * 2
        x[::3] = float("-inf")
        return x, 0.7
    if kind == "near-ties":  # distinct logits 1e-9 apart at the edge: float32 weights merge ~2 of them, the
        x = noise - 30.0      # float64 ones do not (the reference's groups are the float64 weights')
        x[0] = 0.0
        x[1:2049] = (-0.5 + 1e-9 * torch.arange(2048, dtype=torch.float64)).float()
        return x, 0.5
    if kind == "near-ties-top":  # the same at the top of the row: the edge inside the max's float32 group
        x = noise - 30.0
        x[V - 2048:] = (1e-9 * torch.arange(2048, dtype=torch.float64)).float()
        return x, 0.3
    if kind == "tiny-p":
        return noise * 2, 1e-6
    if kind == "near-one":
        return noise * 2, 1.0 - 1e-6
    raise AssertionError(kind)


def _kept(x: torch.Tensor, top_p: float, tol: float = 0.0) -> np.ndarray:
    """The tie-inclusive top-p set of the definition in float64 (a category is kept iff the probability
    strictly above it is < top_p), at top_p + tol: a superset (tol > 0) or subset (tol < 0) that float32
    weights' rounding (~1e-7 of the mass) cannot cross."""
    z = x.double().numpy()
    fin = np.isfinite(z)
    w = np.where(fin, np.exp(np.where(fin, z - z[fin].max(), 0.0)), 0.0)
    p = w / w.sum()
    vals, counts = np.unique(p[p > 0], return_counts=True)
    group = (vals * counts)[::-1]  # descending values
    above = np.cumsum(group) - group
    kept_vals = vals[::-1][above < top_p + tol]
    return (p >= kept_vals.min()) & (p > 0)


@pytest.mark.parametrize("kind", ["tie-at-edge", "flat-tie", "peaked", "bimodal", "quantized", "neg-inf", "near-ties",
                                  "near-ties-top", "tiny-p", "near-one"])
@pytest.mark.parametrize("backend,V", C.cases({"cpp": [2049, 5003, 50257], "cuda": [2049, 5003, 50257]}))
def test_cpp_top_p_search_on_wide_rows(backend, V, kind):
    """Drawn tokens lie in the float64 definition's kept set, every kept token of a small set is drawn, and
    the frequencies follow the kept weights (chi-square)."""
    x, top_p = _wide_row(kind, V)
    tol = min(1e-6, top_p / 2)
    kept, inner = _kept(x, top_p, tol), _kept(x, top_p, -tol)
    n = 20_000
    out = ops.sample_categorical(x.expand(n, V).to(C.device(backend)), seed=11, offset=2, top_p=top_p,
                                 backend=backend).cpu()
    counts = np.bincount(out.numpy(), minlength=V)
    drawn = counts > 0
    assert not bool((drawn & ~kept).any()), f"{kind}: drew {np.nonzero(drawn & ~kept)[0][:5]} outside the nucleus"
    idx = np.nonzero(inner)[0]
    if len(idx) <= 200:
        assert bool(drawn[idx].all()), f"{kind}: kept tokens never drawn: {idx[~drawn[idx]][:5]}"
        z = x.double().numpy()
        w = np.exp(z[idx] - z[idx].max())
        if len(idx) > 1:
            assert stats.chisquare(counts[idx], w / w.sum() * n).pvalue > 1e-6
    else:  # a large set: the kept mass drawn matches, per decile of the kept tokens by weight
        z = x.double().numpy()[idx]
        w = np.exp(z - z.max())
        order = np.argsort(-w, kind="stable")
        bins = np.array_split(order, 10)
        exp_n = np.array([w[b].sum() for b in bins]) / w.sum() * n
        got_n = np.array([counts[idx[b]].sum() for b in bins])
        assert stats.chisquare(got_n, exp_n).pvalue > 1e-6


@pytest.mark.parametrize("backend", C.backends("cpp"))
def test_cpp_top_p_search_with_top_k_and_temperature(backend):
    """top-k before top-p and a temperature: the kept set of both filters, on a wide row."""
    V, n = 50257, 20_000
    x = torch.randn(V, generator=C.gen(5)) * 2
    out = ops.sample_categorical(x.expand(n, V), seed=3, top_k=300, top_p=0.8, temperature=0.7, backend=backend)
    z = x.double().numpy() / 0.7
    top = np.argsort(-z, kind="stable")[:300]
    sub = np.full(V, -np.inf)
    sub[top] = z[top]
    kept = _kept(torch.from_numpy(sub), 0.8, 1e-6)
    assert bool((kept == _kept(torch.from_numpy(sub), 0.8, -1e-6)).all()), "the row is meant to be decisive"
    counts = np.bincount(out.numpy(), minlength=V)
    assert not bool(((counts > 0) & ~kept).any())
    idx = np.nonzero(kept)[0]
    w = np.exp(sub[idx] - sub[idx].max())
    assert stats.chisquare(counts[idx], w / w.sum() * n).pvalue > 1e-6

# Triton top-p: the K-ary threshold search (issue 16) at its limits, against the full sort's kept set
# --------------------------------------------------------------------------------------------------------
def _triton_top_p(x: torch.Tensor, top_p: float, top_k=None, temperature=1.0):
    """The Triton kernel's top-p search per row, from its stats output: (passes over the row, the smallest kept
    weight, the kept total)."""
    glue = importlib.import_module("fastdiff.ops.backends.triton.sample_categorical")
    stats = torch.zeros(x.shape[0], 3, dtype=torch.int64, device=x.device)
    glue._sample_categorical_fwd(x, 0, 0, float(temperature), top_k or 0, float(top_p), 0, stats=stats)
    stats = stats.cpu()
    return stats[:, 0], stats[:, 1].contiguous().view(F64), stats[:, 2].contiguous().view(F64)


def _check_top_p_search(x: torch.Tensor, top_p: float, top_k=None, temperature=1.0, max_passes=14) -> list[int]:
    """Per row: the kernel's kept set (weights exp((x - max) / temperature) in float64, as the kernel computes
    them, at or above its threshold, within the top-k set) is the full sort's, except at a top-p near-tie
    (a mass within 1e-12 of top_p); its threshold is the smallest kept weight, its kept total their sum; at
    most ``max_passes`` passes. Returns the passes."""
    passes, thr, total = _triton_top_p(x, top_p, top_k, temperature)
    x64 = x.double().cpu()
    w = torch.exp((x64 - x64.max(-1, keepdim=True).values) / temperature)  # the kernel's arithmetic
    topk = filter_weights(x64 / temperature, top_k, None) > 0
    want = _sorted_filter_weights(x64 / temperature, top_k, top_p) > 0
    for r in range(x.shape[0]):
        got = topk[r] & (w[r] >= thr[r])
        if not torch.equal(got, want[r]):
            assert _topp_boundary_distance((x64[r] / temperature).numpy(), top_k, top_p) < 1e-12, (r, top_p)
            continue
        kept = w[r][got]
        assert float(thr[r]) == pytest.approx(float(kept.min()), rel=4e-16, abs=0), r
        assert float(total[r]) == pytest.approx(float(kept.sum()), rel=1e-12), r
        assert 1 <= int(passes[r]) <= max_passes, (r, int(passes[r]))
    return passes.tolist()


def _triton_dev():
    return C.device("triton")


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("cap", [None, 2], ids=["cap=launch", "cap=2"])
def test_triton_top_p_long_ties_across_the_crossing(backend, cap, monkeypatch):
    """A tie group of 100 (spread over tiles: every third index) holds the crossing: kept whole, nothing below
    it; the same with the group at the top (one value holding more than top_p). With the launch's compaction
    capacity (the sort settles the bracket) and with 2 (the 32-way search settles it)."""
    if cap is not None:
        _set_cap(monkeypatch, cap)
    V = 300
    x = torch.randn(3, V, generator=C.gen(1)) - 4.0
    x[0, 0] = 5.0
    x[0, 1::3][:100] = 2.0  # mass above the group ~0.17, with it ~0.99: top_p 0.5 crosses inside
    x[1, 5::3][:90] = 3.0  # the top group: one value, 90 categories
    x[2, :150] = 1.0  # a long contiguous tie across the 128-category tiles, and one larger value
    x[2, 200] = 1.5
    for p in (0.5, 0.9):
        _check_top_p_search(x.to(_triton_dev()), p)
    _check_against_reference(backend, x.to(_triton_dev()), dict(top_p=0.5))


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("top_p", [5e-324, 1e-12, 1e-3, 1 - 1e-9, 1 - 1e-15])
def test_triton_top_p_near_0_and_near_1(backend, top_p):
    """top_p near 0 keeps the maximum's tie group only; near 1 the crossing lies among the tiniest weights
    (float64 logits down to -745: subnormal weights, far below the first pass's range), -inf never kept."""
    V = 130
    x = torch.randn(4, V, generator=C.gen(2), dtype=F64) * 3
    x[1, 40] = x[1, 90] = x[1].max() + 1.0  # two equal maxima
    x[2] = -torch.linspace(0, 745, V, dtype=F64)  # weights from 1 down through the subnormals
    x[3, ::4] = float("-inf")
    passes = _check_top_p_search(x.to(_triton_dev()), top_p)
    if top_p <= 1e-12:
        assert passes == [1, 1, 1, 1]  # settled by the first pass: the maximum alone holds top_p
    _check_against_reference(backend, x.to(_triton_dev()), dict(top_p=top_p))


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_triton_top_p_dominant_token_minus_inf_and_ragged_rows(backend, dtype):
    """One token holding >= top_p (kept alone); leading tiles of -inf; V not a multiple of the tile (7, 130,
    300); with top-k and a temperature as well."""
    for V in (7, 130, 300):
        x = torch.randn(4, V, generator=C.gen(V)) * 2
        x[0, V // 2] = 12.0  # ~all the mass
        x[1, : min(V - 2, 140)] = float("-inf")  # leading tiles of -inf
        x[2, ::2] = float("-inf")
        x = x.to(_triton_dev(), dtype)
        for kw in (dict(top_p=0.9), dict(top_p=0.3), dict(top_p=0.95, top_k=5), dict(top_p=0.7, temperature=0.6)):
            passes = _check_top_p_search(x, kw["top_p"], kw.get("top_k"), kw.get("temperature", 1.0))
            assert passes[0] == 1  # the dominant token settles it in the first pass
            _check_against_reference(backend, x, kw)


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("cap", [None, 2], ids=["cap=launch", "cap=2"])
def test_triton_top_p_weights_spread_over_every_bit(backend, cap, monkeypatch):
    """Weights 0.6·(1 + 2**-i), i = 1..52, next to the maximum: their bit patterns differ at every scale, so
    the 32-way search (a compaction capacity of 2) narrows five bits a pass; the crossing is placed at several
    depths. Passes stay within the bound stated in the kernel (at most 14); with the launch's capacity (the
    row fits) at most 2."""
    if cap is not None:
        _set_cap(monkeypatch, cap)
    i = torch.arange(1, 53, dtype=F64)
    z = torch.cat([torch.zeros(1, dtype=F64), np.log(0.6) + torch.log1p(2.0 ** -i), torch.full((20,), -30.0,
                                                                                          dtype=F64)])
    x = z.expand(3, -1).contiguous()
    seen = []
    for depth in (5, 30, 45):
        W = float(torch.exp(z).sum())
        p = (1.0 + float(torch.exp(z[1:depth]).sum()) + 0.5 * float(torch.exp(z[depth]))) / W
        seen += _check_top_p_search(x.to(_triton_dev()), p)
    assert max(seen) > 3 if cap == 2 else max(seen) <= 2  # deep crossings take several passes of the 32-way search
    _check_against_reference(backend, x.to(_triton_dev()), dict(top_p=p))


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("temperature", [1e-30, 1e-5, 0.7, 1e30])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_triton_top_p_extreme_temperatures_and_magnitudes(backend, temperature, dtype):
    """Logits / temperature far outside the first bracket's guess grid (clamped at 2**50 buckets) or all within
    one bucket: the guess may be useless, the kept set must still be exact."""
    x = torch.randn(3, 40, generator=C.gen(1)) * 3
    x[1] *= 1e6
    x[2, 7] = x[2, 20] = x[2].max()  # a tie at the top
    x = x.to(_triton_dev(), dtype)
    for p in (0.3, 0.9):
        _check_top_p_search(x, p, temperature=temperature)
        _check_against_reference(backend, x, dict(top_p=p, temperature=temperature))


# Triton top-p: the search's compaction (a bracket of at most TOPP_CAP categories copied during its pass and settled
# by sorting the copy), at and across the capacity, against the full sort's kept set (an independent float64 oracle)
# --------------------------------------------------------------------------------------------------------
def _set_cap(monkeypatch, cap: int) -> None:
    glue = importlib.import_module("fastdiff.ops.backends.triton.sample_categorical")
    monkeypatch.setattr(glue, "TOPP_CAP", cap)


def _bracket_row(V: int, n: int, values: np.ndarray, tie: slice | None, seed: int) -> tuple[torch.Tensor, float]:
    """One float64 row: the maximum 0 (first), ``n`` categories at ``values`` (scattered over the row's tiles
    between the first and the last; ``tie``: a run of them set equal), the rest at -30; and the top_p whose
    crossing lies in the middle of the tie group (or of the ``n``), so the kept set ends inside the bracket."""
    vals = np.array(values[:n], dtype=np.float64)
    if tie is not None:
        vals[tie] = vals[(tie.start + tie.stop) // 2]
    x = torch.full((1, V), -30.0, dtype=F64)
    where = torch.randperm(V - 2, generator=C.gen(seed))[:n] + 1
    x[0, 0] = 0.0
    x[0, where] = torch.from_numpy(vals)
    w = np.exp(x[0].numpy())
    W = w.sum()
    mid = vals[(tie.start + tie.stop) // 2] if tie is not None else np.sort(vals)[n // 2]
    above = w[w > np.exp(mid)].sum()
    group = w[w == np.exp(mid)].sum()
    return x, float((above + 0.5 * group) / W)


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("extra", [-1, 0, 1])
@pytest.mark.parametrize("tie", [False, True], ids=["distinct", "tie-at-crossing"])
def test_triton_top_p_guessed_bracket_at_the_capacity(backend, extra, tie, monkeypatch):
    """The guess pass brackets the crossing with one 1/64-octave bucket holding ``cap + extra`` categories: at
    most ``cap`` are settled in the search's first pass (from the sorted copy), one more needs a further pass;
    the kept set is the definition's either way, a tie group straddling the crossing kept whole."""
    cap = 64
    _set_cap(monkeypatch, cap)
    n = cap + extra
    x, p = _bracket_row(300, n, -0.3 + 1e-5 * np.arange(n), slice(20, 40) if tie else None, seed=n)
    passes = _check_top_p_search(x.to(_triton_dev()), p)
    assert passes == [1] if n <= cap else passes[0] >= 2, (n, passes)
    _check_against_reference(backend, x.to(_triton_dev()), dict(top_p=p))


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_triton_top_p_top_k_bracket_at_the_capacity(backend, extra, monkeypatch):
    """With top-k there is no guess: the first bracket is [2**-16, 1), here holding ``cap + extra`` categories
    (weights 0.55 .. 0.6, in one of its 32 sub-ranges, so the 32-way split alone cannot settle them in one pass;
    the maximum above the bracket, the rest below): settled in one pass up to ``cap``; a tie group across the
    crossing kept whole."""
    cap = 32
    _set_cap(monkeypatch, cap)
    n = cap + extra
    vals = np.log(0.55 + 0.05 * torch.rand(n, generator=C.gen(7 + n), dtype=F64).numpy())
    x, p = _bracket_row(200, n, vals, slice(3, 9), seed=n)
    x[0, 199] = float("-inf")  # (one of the -30s) top-k = V - 1 drops it: the top-k path, without the guess
    for p_ in (p, 0.5):
        passes = _check_top_p_search(x.to(_triton_dev()), p_, top_k=199)
        assert passes == [1] if n <= cap else passes[0] >= 2, (n, passes)
    _check_against_reference(backend, x.to(_triton_dev()), dict(top_p=p, top_k=199))


@pytest.mark.parametrize("backend", C.backends("triton"))
def test_triton_top_p_bracket_at_the_launch_capacity(backend):
    """The launcher's own capacity (4096 at this V): a guessed bracket of exactly that many categories is settled in
    the first search pass, one more is not; both kept sets are the definition's."""
    glue = importlib.import_module("fastdiff.ops.backends.triton.sample_categorical")
    V = 4300
    cap = glue.top_p_cap(V)
    assert cap == 4096
    for n in (cap, cap + 1):
        x, p = _bracket_row(V, n, -0.3 + 1e-7 * np.arange(n), slice(1000, 1100), seed=n)
        passes = _check_top_p_search(x.to(_triton_dev()), p)
        assert passes == [1] if n <= cap else passes[0] >= 2, (n, passes)


@pytest.mark.parametrize("backend", C.backends("triton"))
def test_triton_top_p_launches_in_row_chunks_within_the_scratch_budget(backend, monkeypatch):
    """A top-p call whose scratch would exceed TOPP_SCRATCH_BYTES runs in row chunks that reuse one scratch: the
    same tokens as one launch (row_offset included, so every row keeps its counter), and the reference's."""
    glue = importlib.import_module("fastdiff.ops.backends.triton.sample_categorical")
    V, N = 120, 7
    x = (torch.randn(N, V, generator=C.gen(4)) * 2).to(_triton_dev())
    one = glue._sample_categorical_fwd(x, 9, 3, 1.0, 0, 0.8, 5)
    seen = []
    kernel = glue._sample_categorical_fwd_kernel

    class Counting:  # records each launch's grid
        def __getitem__(self, grid):
            seen.append(grid[0])
            return kernel[grid]

    monkeypatch.setattr(glue, "_sample_categorical_fwd_kernel", Counting())
    monkeypatch.setattr(glue, "TOPP_SCRATCH_BYTES", 3 * glue.top_p_cap(V) * 8)  # 3 rows a launch
    chunked = glue._sample_categorical_fwd(x, 9, 3, 1.0, 0, 0.8, 5)
    assert seen == [3, 3, 1]
    assert torch.equal(chunked, one)
    ref = ops.sample_categorical(x.cpu(), seed=9, offset=3, top_p=0.8, backend="reference", row_offset=5)
    assert int((chunked.cpu() != ref).sum()) <= 1  # (a float32-CDF near-tie at most)


@pytest.mark.parametrize("backend", C.backends("triton"))
@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("cap", [None, 16], ids=["cap=launch", "cap=16"])
def test_triton_top_p_compaction_on_mixed_rows(backend, dtype, cap, monkeypatch):
    """Normal, flat (most of the vocabulary kept) and peaked rows, an all-equal row, rows with -inf entries (and
    leading -inf tiles), top_p from tiny to near 1, with and without top-k, every logit dtype: with the launch's
    capacity (the rows fit: settled by the sort) and with 16 (the 32-way search first, then the sort): the kept
    set is the full sort's, the kept total their sum."""
    if cap is not None:
        _set_cap(monkeypatch, cap)
    V = 200  # (the interpreter's sort of the copy, 256 slots here, is slow)
    x = torch.randn(7, V, generator=C.gen(11)) * 2
    x[1] /= 20  # flat
    x[2] *= 4  # peaked
    x[3] = 0.5  # all equal
    x[4, ::3] = float("-inf")
    x[5, :140] = float("-inf")  # a leading tile of -inf
    x[6, 20:180] = x[6, 20:180].round()  # long tie groups
    x = x.to(_triton_dev(), dtype)
    for top_p in (1e-9, 0.9, 1 - 1e-9):
        for top_k in (None, 50):
            passes = _check_top_p_search(x, top_p, top_k)
            if cap is None:  # every bracket fits the launch's capacity: settled in the first pass that holds the
                assert max(passes) <= 2, (top_p, top_k, passes)  # crossing (the second, after a wrong guess)
    _check_against_reference(backend, x, dict(top_p=0.9))
    _check_against_reference(backend, x, dict(top_p=0.6, top_k=50, temperature=0.8))


@pytest.mark.skipif(not C.HAVE_TRITON or not _tc.ptxas_available(), reason="needs Triton with its NVIDIA backend")
def test_triton_top_p_kernel_compiles_for_a_gpu():
    """The interpreter never compiles the kernel: compile top-p configurations the launcher uses for sm_90
    (Triton's whole pipeline and ptxas, no GPU needed); no register spills at the wide tiles (a 16-category
    tile on 4 warps spills a few bytes: only compiled)."""
    glue = importlib.import_module("fastdiff.ops.backends.triton.sample_categorical")
    types = {"logits_ptr": "*fp32", "stride_l": "i64", "tok_ptr": "*i64", "V": "i32", "temperature_bits": "i64",
             "top_k": "i64", "top_p_bits": "i64", "seed_lo": "i32", "seed_hi": "i32", "off_lo": "i32",
             "off_hi": "i32", "row_lo": "i32", "row_hi": "i32", "stats_ptr": "*i64", "scratch_ptr": "*fp64"}
    configs = []
    for f64, top_k, block in ((False, False, 4096), (False, True, 4096), (True, False, 4096), (False, False, 1024),
                              (False, False, 16)):
        consts = dict(GREEDY=False, HAS_TOPK=top_k, HAS_TOPP=True, XDT="tl.float64" if f64 else "tl.float32",
                      WDT="tl.float64", KEY="tl.int64" if f64 else "tl.int32",
                      SIGN_OFF=0x7FFFFFFFFFFFFFFF if f64 else 0x7FFFFFFF, BLOCK=block, KSPLIT=glue.TOPP_SPLIT,
                      SBLOCK=min(block, glue.TOPP_TILE), STATS=False, CAP=glue.top_p_cap(block),
                      GBLOCK=glue.guess_tile(block))
        configs.append((dict(types, logits_ptr="*fp64" if f64 else "*fp32"), consts, 8 if block >= 2048 else 4))
    for (_, consts, _), res in zip(configs, _tc.compile_sm90("sample_categorical", "_sample_categorical_fwd_kernel",
                                                             configs)):
        assert res["error"] is None, (consts, res["error"])
        assert res["spill"] == 0 or consts["BLOCK"] < 1024, (consts, res)


# --------------------------------------------------------------------------------------------------------
# The CUDA top-p search (top-p alone: topp_search in csrc/cuda/sample_categorical.cu) on rows built for each
# of its paths. Which path a row takes is checked on the NumPy model of the search
# (scripts/cuda_topp_passes.py; tests/test_cuda_threshold_model.py checks the model's sets on CPU); the kernel
# itself is checked through its draws, on a GPU: the reference's tokens draw by draw (up to near-ties), inside
# the float64 definition's kept set, every member of a small set drawn, the same tokens twice.
# --------------------------------------------------------------------------------------------------------
def _topp_model() -> ModuleType:
    return load_script("cuda_topp_passes")


def _cuda_topp_row(kind: str, V: int) -> tuple[torch.Tensor, float, str | None]:
    """A float64 row of ``V`` logits, its top_p, and how the search ends on it (None: not pinned)."""
    g = C.gen(V + 13 * len(kind))
    noise = torch.randn(V, generator=g, dtype=F64)
    if kind == "edge-tie":  # 3 tokens above a tie group of 10 holding the crossing: the group alone in its bin
        x = noise - 8.0
        x[[1, V // 2, V - 1]] = 3.0
        x[torch.arange(5, 5 + 10 * 7, 7)] = 2.0
        return x, 0.5, "sorted"
    if kind == "edge-tie-mixed":  # the same group with near-equal neighbours (other keys): the shared-memory sort
        x = noise - 8.0
        x[[1, V // 2, V - 1]] = 3.0
        x[torch.arange(5, 5 + 10 * 7, 7)] = 2.0
        x[torch.arange(6, 6 + 5 * 7, 7)] = 2.0 + 1e-7 * torch.arange(1, 6, dtype=F64)
        return x, 0.5, "sorted"
    if kind == "equal":  # every weight 1: one key at level 0, every token kept
        return torch.full((V,), -1.25, dtype=F64), 0.5, "key"
    if kind == "big-tie":  # 3000 equal weights hold the crossing, 500 near-equal ones share their bins: levels
        x = noise - 20.0
        x[0] = 0.0
        x[1:3001] = -3.0
        x[3001:3501] = -3.0 + 1e-9 * torch.arange(1, 501, dtype=F64)
        return x, 0.5, "key"
    if kind in ("group-2048", "group-2049"):  # a crossing bin of exactly the shared capacity, and one more
        n = int(kind.split("-")[1])
        x = noise - 30.0
        x[0] = 0.0
        x[1:n + 1] = -0.5 + 1e-9 * torch.arange(n, dtype=F64)  # distinct keys, one level-0 bin
        return x, 0.5, "sorted"
    if kind == "tiny":  # weights from 1 down through the subnormals, most below level 0's window (its bin 0)
        return -torch.linspace(0.0, 745.0, V, dtype=F64), 1.0 - 1e-9, None
    if kind == "tiny-max-p":  # the same with the largest top_p: the crossing near the window's floor
        return -torch.linspace(0.0, 745.0, V, dtype=F64), 1.0 - 2.0 ** -53, None
    if kind == "near-one":
        return noise * 2, 1.0 - 2.0 ** -53, None
    if kind == "near-zero":  # two equal maxima hold any tiny top_p (both kept)
        x = noise * 2
        x[[3, V - 2]] = x.max() + 1.0
        return x, 1e-12, "sorted"
    if kind == "peaked":
        x = noise * 8
        x[V // 3] = x.max() + 30.0
        return x, 0.9, "one"
    if kind == "normal":
        return noise * 2, 0.9, None
    if kind == "flat":
        return noise * 0.1, 0.5, None
    raise AssertionError(kind)


_CUDA_TOPP = [("edge-tie", 5003), ("edge-tie-mixed", 5003), ("equal", 7), ("equal", 2049), ("equal", 50257),
              ("big-tie", 6000), ("group-2048", 5000), ("group-2049", 5000), ("tiny", 300), ("tiny", 4099),
              ("tiny-max-p", 4099), ("near-one", 3000), ("near-zero", 1000), ("peaked", 50257), ("normal", 255),
              ("normal", 256), ("normal", 257), ("normal", 2047), ("normal", 2048), ("normal", 2049),
              ("normal", 50257), ("flat", 50257)]


@pytest.mark.parametrize("backend,kind,V", C.cases({"cuda": _CUDA_TOPP}))
@pytest.mark.parametrize("dtype", [F32, F64])
def test_cuda_top_p_search_paths(backend, kind, V, dtype):
    """Ties at the crossing (the group alone in its bin, or with near-equal neighbours), all-equal rows (one key
    at level 0), a tie group beyond the shared capacity (generic levels down to one key), crossing bins of
    exactly the capacity and one more, weights below level 0's window (bin 0; it never holds the crossing:
    see topp_search), top_p near 0 and near 1, V around the 256 bins and the 2048 capacity."""
    x, top_p, end = _cuda_topp_row(kind, V)
    x = x.to(dtype)
    if end is not None:
        res = _topp_model().topp_search(x.double().numpy(), top_p)
        assert res["end"] == end, (kind, res)
        assert not res["bottom"]
    n = 2000 if V <= 6000 else 400
    logits = x.expand(n, V).contiguous().to("cuda")
    out = ops.sample_categorical(logits, seed=21, offset=4, top_p=top_p, backend=backend)
    assert torch.equal(out, ops.sample_categorical(logits, seed=21, offset=4, top_p=top_p, backend=backend))
    _check_against_reference(backend, logits, dict(top_p=top_p), seed=21, offset=4, max_near=2)
    tol = min(1e-9, top_p / 2)
    kept, inner = _kept(x, top_p, tol), _kept(x, top_p, -tol)
    counts = np.bincount(out.cpu().numpy(), minlength=V)
    assert not bool(((counts > 0) & ~kept).any()), f"{kind}: drew outside the nucleus"
    idx = np.nonzero(inner)[0]
    if 0 < len(idx) <= 20:
        assert bool((counts[idx] > 0).all()), f"{kind}: kept tokens never drawn"


@pytest.mark.parametrize("backend", C.backends("cuda"))
def test_cuda_top_p_alone_and_with_top_k_agree_where_top_k_keeps_all(backend):
    """top_k = V - 1 on a row whose smallest logit is far below the nucleus keeps the same set as top-p
    alone: the byte-wise search (top-k + top-p) and topp_search give the same tokens, up to near-ties."""
    V, n = 5000, 2000
    x = torch.randn(V, generator=C.gen(9)) * 2
    x[17] = -1e4
    logits = x.expand(n, V).contiguous().to("cuda")
    a = ops.sample_categorical(logits, seed=2, top_p=0.8, backend=backend)
    b = ops.sample_categorical(logits, seed=2, top_p=0.8, top_k=V - 1, backend=backend)
    assert int((a != b).sum()) <= 2
