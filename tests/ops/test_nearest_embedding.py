"""nearest_embedding on every backend: the float64 arg-min with ties to the lowest index (brute force and the
reference, index for index), odd shapes and every dtype, ties across tiles and vocabulary splits, blocking,
non-contiguous and empty inputs, huge and tiny magnitudes, and bad input rejected before any kernel runs.

Every kernel backend only screens; rows within rounding of a tie are resolved in float64 by shared code
(:mod:`fastdiff.ops._nearest`), so the indices equal the reference's exactly for every dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff import ops
from fastdiff.ops import _nearest
from fastdiff.errors import InputError
from tests.conftest import assert_close
from tests.ops import _cases as C

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


def _brute(x: torch.Tensor, w: torch.Tensor, metric: str) -> torch.Tensor:
    """Full float64 distance matrix; argmin takes the first minimum."""
    x64, w64 = x.reshape(-1, x.shape[-1]).double().cpu(), w.double().cpu()
    if metric == "l2":
        d = ((x64[:, None, :] - w64[None, :, :]) ** 2).sum(-1)
    else:
        d = -(x64 @ (w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)
    return d.argmin(1).reshape(x.shape[:-1])


# Each kernel backend at the shapes it is built for: the C++ kernels at GPT-2 vocabularies and long rows, the
# Triton interpreter at several tiles and splits, the CUDA kernels (GPU) at both.
CPP_SHAPES = [(1, 1, 1), (7, 7, 3), (1000, 7, 128), (7, 50257, 3), (1000, 1, 768), (1, 50257, 128), (1000, 999, 1)]
TRITON_SHAPES = [(1, 1, 1), (7, 7, 3), (40, 97, 64), (19, 300, 33)]
CUDA_SHAPES = [(1, 1, 1), (19, 7, 5), (97, 1000, 64), (300, 50257, 16), (2, 3000, 129)]
EQUALS_REFERENCE = C.cases({
    "cpp": [(dt, (N, D), V) for N, V, D in CPP_SHAPES for dt in (F64, F32)]
    + [(dt, (3, 97, 64), 501) for dt in (F16, BF16)],
    "triton": [(dt, (N, D), V) for N, V, D in TRITON_SHAPES for dt in C.DTYPES],
    "cuda": [(dt, (N, D), V) for N, V, D in CUDA_SHAPES for dt in C.DTYPES],
})


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend,dtype,xshape,V", EQUALS_REFERENCE)
def test_equals_the_reference_index_for_index(backend, dtype, xshape, V, metric):
    dev = C.device(backend)
    g = C.gen(sum(xshape) * 31 + V)
    x = torch.randn(*xshape, generator=g, dtype=F64).to(dtype).to(dev)
    w = torch.randn(V, xshape[-1], generator=g, dtype=F64).to(dtype).to(dev)
    idx, snapped = ops.nearest_embedding(x, w, metric, backend=backend)
    ref, ref_snapped = ops.nearest_embedding_ref(x, w, metric)
    assert idx.dtype == torch.int64 and idx.shape == x.shape[:-1] and idx.device == x.device
    assert snapped.dtype == w.dtype and snapped.shape == x.shape
    assert torch.equal(snapped, w[idx])
    assert torch.equal(idx, ref)  # every dtype: near-ties are resolved in float64 by the shared code
    # and the choice is as good as the reference's in float64 (not worse beyond rounding)
    sc = C.scores64(x, w, metric)
    got = sc.gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    want = sc.gather(1, ref.reshape(-1, 1).cpu()).squeeze(1)
    assert bool(((got - want) <= 1e-10 * (sc.abs().amax(1) + 1.0)).all())


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,V,D", [(1, 1, 1), (7, 7, 3), (1000, 7, 3), (7, 5000, 128), (1000, 999, 1), (33, 300, 768)])
@pytest.mark.parametrize("backend", C.backends("reference", "cpp", "cuda"))
def test_matches_brute_force_float64(backend, metric, N, V, D):
    g = C.gen(N * 7 + V)
    x = torch.randn(N, D, generator=g, dtype=F64).to(C.device(backend))
    w = torch.randn(V, D, generator=g, dtype=F64).to(C.device(backend))
    idx, snapped = ops.nearest_embedding(x, w, metric, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert torch.equal(idx.cpu(), _brute(x, w, metric))
    assert torch.equal(snapped, w[idx])


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", C.backends("reference", "cpp", "cuda"))
def test_low_precision_agrees_with_brute_force_except_near_ties(backend, dtype, metric):
    """Low-precision inputs are scored in float32; a disagreement with the float64 brute force on the
    same (rounded) values is allowed only where the two best scores are within float32 rounding."""
    g = C.gen(1)
    x = torch.randn(2, 97, 64, generator=g).to(dtype).to(C.device(backend))
    w = torch.randn(501, 64, generator=g).to(dtype).to(C.device(backend))
    idx, snapped = ops.nearest_embedding(x, w, metric, backend=backend)
    ref = _brute(x, w, metric)
    assert snapped.dtype == dtype and snapped.shape == x.shape
    x64, w64 = x.reshape(-1, 64).double().cpu(), w.double().cpu()
    if metric == "l2":
        score = ((x64[:, None] - w64[None]) ** 2).sum(-1)
    else:
        score = -(x64 @ (w64 / w64.norm(dim=1, keepdim=True)).T)
    got = score.gather(1, idx.reshape(-1, 1).cpu()).squeeze(1)
    best = score.gather(1, ref.reshape(-1, 1)).squeeze(1)
    scale = (x64.norm(dim=1) * w64.norm(dim=1).max() + (w64 * w64).sum(1).max()).clamp_min(1)
    assert bool(((got - best) <= 1e-5 * scale).all())
    assert (idx.reshape(-1).cpu() != ref.reshape(-1)).float().mean() < 0.01


@pytest.mark.parametrize("backend", C.backends("reference", "cpp"))
def test_ties_go_to_the_lowest_index_across_blocks(backend, monkeypatch):
    mod = importlib.import_module("fastdiff.ops._nearest")
    w = torch.randn(50, 4, dtype=F64)
    w[37] = w[3]
    w[44] = w[3]
    x = w[3:4] + 1e-9
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 2 * 256 * 8)  # V blocks of 8 rows, N blocks of 256
    idx, _ = ops.nearest_embedding(x, w, backend=backend)
    assert int(idx) == 3
    idx, _ = ops.nearest_embedding(w[[44]], w, "cosine", backend=backend)
    assert int(idx) == 3


@pytest.mark.parametrize("backend", C.backends("reference", "cpp"))
def test_blocking_does_not_change_results(backend, monkeypatch):
    mod = importlib.import_module("fastdiff.ops._nearest")
    g = C.gen(2)
    x = torch.randn(300, 16, generator=g)
    w = torch.randn(700, 16, generator=g)
    full = ops.nearest_embedding(x, w, backend=backend)[0]
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 2 * 256 * 33)
    assert torch.equal(full, ops.nearest_embedding(x, w, backend=backend)[0])


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_ties_across_tiles_splits_and_duplicated_rows(backend, monkeypatch):
    """Exact ties across score tiles, vocabulary splits and (C++) small blocking tiles go to the lowest
    index; rows of one direction tie for cosine."""
    dev = C.device(backend)
    if backend == "cpp":  # tiles of 5 rows x 8 vocabulary rows, so rows and vocabulary span many
        glue = importlib.import_module("fastdiff.ops.backends.cpp.nearest_embedding")
        monkeypatch.setattr(glue, "BLOCK_ROWS", 5)
        monkeypatch.setattr(glue, "BLOCK_COLS", 8)
    g = C.gen(2)
    w = torch.randn(50, 4, generator=g, dtype=F64)
    w[37] = w[3]
    w[44] = w[3]
    w[20] = w[10] * 3  # same direction: a cosine tie
    x = torch.cat([w[[3, 44, 37]] + 1e-9, w[[10, 20]]])
    idx, _ = ops.nearest_embedding(x.to(dev), w.to(dev), backend=backend)
    assert idx[:3].tolist() == [3, 3, 3]
    idx, _ = ops.nearest_embedding(w[[44, 20]].to(dev), w.to(dev), "cosine", backend=backend)
    assert idx.tolist() == [3, 10]
    for metric in ("l2", "cosine"):  # other row tiles and other vocabulary splits of a wider vocabulary
        g = C.gen(5)
        w = torch.randn(300, 16, generator=g, dtype=F64)
        for j in (37, 130, 299):
            w[j] = w[3]
        x = torch.cat([w[[3, 130]], w[[299]] * 2.0]).to(dev)
        idx, _ = ops.nearest_embedding(x, w.to(dev), metric, backend=backend)
        assert idx.tolist()[:2] == [3, 3]
        if metric == "cosine":  # 2·w[3] has the same direction: still the lowest index
            assert idx.tolist()[2] == 3
    g = C.gen(3)
    base = torch.randn(5, 12, generator=g)
    w = torch.cat([base, base, base]).to(dev)  # rows v, v+5, v+10 are equal: exactly tied scores
    x = (base[[4, 0, 2, 2]] + 0.01 * torch.randn(4, 12, generator=g)).to(dev)
    for metric in ("l2", "cosine"):
        idx, _ = ops.nearest_embedding(x, w, metric, backend=backend)
        assert idx.tolist() == [4, 0, 2, 2], metric


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_non_contiguous_batched_and_empty(backend):
    dev = C.device(backend)
    g = C.gen(3)
    x = torch.randn(16, 5, 19, generator=g).to(dev).transpose(0, 2)  # (19, 5, 16), non-contiguous
    w = torch.randn(40, 32, generator=g).to(dev)[:, ::2]  # (40, 16), non-contiguous
    idx, snapped = ops.nearest_embedding(x, w, backend=backend)
    assert idx.shape == (19, 5) and snapped.shape == (19, 5, 16)
    assert torch.equal(idx.cpu(), _brute(x, w, "l2"))
    assert_close(snapped, w[idx], atol=0)
    xb = torch.randn(12, 3, 7, generator=g).to(dev).permute(1, 2, 0)  # (3, 7, 12), last dimension strided
    wb = torch.randn(15, 12, generator=g).to(dev)
    idx, snapped = ops.nearest_embedding(xb, wb, backend=backend)
    assert idx.shape == (3, 7) and snapped.shape == (3, 7, 12)
    assert torch.equal(idx, ops.nearest_embedding_ref(xb, wb)[0])
    idx, snapped = ops.nearest_embedding(x[:0], w, backend=backend)
    assert idx.shape == (0, 5) and snapped.shape == (0, 5, 16)
    idx, snapped = ops.nearest_embedding(torch.zeros(0, 3, 16, device=dev), w, backend=backend)
    assert idx.shape == (0, 3) and snapped.shape == (0, 3, 16)


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_snapped_is_the_clamping_trick(backend):
    dev = C.device(backend)
    w = torch.randn(10, 8, generator=C.gen(4)).to(dev)
    x = w[[2, 7, 7, 0]] + 0.01 * torch.randn(4, 8, generator=C.gen(5)).to(dev)
    idx, snapped = ops.nearest_embedding(x, w, backend=backend)
    assert idx.tolist() == [2, 7, 7, 0]
    assert torch.equal(snapped, w[[2, 7, 7, 0]])


@settings(max_examples=40, deadline=None)
@given(N=st.integers(0, 40), V=st.integers(1, 60), Dm=st.integers(1, 20), metric=st.sampled_from(["l2", "cosine"]),
       seed=st.integers(0, 2**31), rows=st.integers(1, 9), cols=st.integers(1, 70))
def test_cpp_any_blocking_gives_the_reference(N, V, Dm, metric, seed, rows, cols):
    """The C++ screen's row blocks and vocabulary tiles (BLOCK_ROWS, BLOCK_COLS) never change the answer."""
    if "cpp" not in C.HERE:
        pytest.skip("the C++ backend is not selected")
    glue = importlib.import_module("fastdiff.ops.backends.cpp.nearest_embedding")
    g = C.gen(seed)
    x = torch.randn(N, Dm, generator=g, dtype=F64)
    w = torch.randn(V, Dm, generator=g, dtype=F64)
    w[torch.randint(0, V, (V // 3,), generator=g)] = w[0].clone()  # duplicated rows: exact ties
    old = glue.BLOCK_ROWS, glue.BLOCK_COLS
    glue.BLOCK_ROWS, glue.BLOCK_COLS = rows, cols
    try:
        idx, _ = ops.nearest_embedding(x, w, metric, backend="cpp")
    finally:
        glue.BLOCK_ROWS, glue.BLOCK_COLS = old
    ref = ops.nearest_embedding_ref(x, w, metric)[0]
    # Duplicated rows score equally up to the BLAS kernel's rounding, which may differ between a tile
    # of 70 columns and one of 1: a different index is allowed only at a float64 near-tie.
    sc = C.scores64(x, w, metric)
    got, want = sc.gather(1, idx[:, None]).squeeze(1), sc.gather(1, ref[:, None]).squeeze(1)
    assert bool(((idx == ref) | ((got - want).abs() <= 1e-12 * (1 + want.abs()))).all())


# --------------------------------------------------------------------------------------------------------
# Numerics at the edges (found by an outside fuzzing pass)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e37])
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_huge_and_tiny_magnitudes(backend, metric, scale):
    """|w|² - 2 x·w overflowed (1e20: the true answer 1, every backend returned 0) or underflowed."""
    dev = C.device(backend)
    x = torch.tensor([[scale, 0.0]], device=dev)
    w = torch.tensor([[0.0, 0.0], [scale, 0.0]], device=dev)
    assert ops.nearest_embedding(x, w, metric, backend=backend)[0].tolist() == [1]
    for s64 in (1e300, 1e-300, 1e-310):  # float64: squares overflow / underflow (1e-310 is subnormal)
        x64 = torch.tensor([[s64, 0.0], [0.0, -s64]], dtype=F64, device=dev)
        w64 = torch.tensor([[0.0, 0.0], [s64, 0.0], [s64, -s64]], dtype=F64, device=dev)
        want = [1, 0] if metric == "l2" else [1, 2]
        assert ops.nearest_embedding(x64, w64, metric, backend=backend)[0].tolist() == want, s64


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_cosine_rows_of_x_far_apart_in_magnitude(backend):
    """Cosine ranks each row of x on its own: a row of 1e-300 next to one of 1e300 is still ranked."""
    dev = C.device(backend)
    x = torch.tensor([[1e300, 0.0], [1e-300, 0.0], [0.0, 1e-30]], dtype=F64, device=dev)
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=F64, device=dev)
    assert ops.nearest_embedding(x, w, "cosine", backend=backend)[0].tolist() == [1, 1, 3]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("Dm", [4, 33])
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_identical_rows_tie_to_the_lowest_index(backend, metric, Dm):
    """1025 identical rows: a BLAS scores the column past a 1024 tile with other instructions, so index 1024
    won on C++ (and on the reference for some x)."""
    dev = C.device(backend)
    g = C.gen(Dm)
    row = torch.randn(1, Dm, generator=g)
    x = row + 0.1 * torch.randn(5, Dm, generator=g)
    others = -row - torch.rand(3, Dm, generator=g)  # far away, and pointing the other way
    for w in (row.expand(1025, Dm).contiguous(), torch.cat([others, row.expand(1030, Dm)])):
        first = int((w == row).all(1).nonzero()[0])
        idx = ops.nearest_embedding(x.to(dev), w.to(dev), metric, backend=backend)[0]
        assert idx.tolist() == [first] * 5


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_cosine_rows_of_one_direction_tie(backend):
    dev = C.device(backend)
    w = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, 1.0, 1.5], [-1.0, 0.0, 0.0]], device=dev)
    x = torch.tensor([[0.3, 0.5, 0.7], [1.0, 2.0, 3.0]], device=dev)
    assert ops.nearest_embedding(x, w, "cosine", backend=backend)[0].tolist() == [0, 0]


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_cosine_norm_clamp_is_kept_with_rescaled_rows(backend):
    """Rows below the 1e-12 norm clamp next to rows that need rescaling keep the clamp's meaning:
    score = x·w / max(|w|, 1e-12)."""
    dev = C.device(backend)
    w = torch.tensor([[1e-13, 0.0], [0.5e-12, 0.0], [1e30, 1e31]], dtype=F32, device=dev)
    x = torch.tensor([[1.0, 0.0], [0.0, -1.0]], device=dev)
    want = [1, 0]  # x·ŵ: 0.1, 0.5, ~0.0995 for x0; for x1 rows 0 and 1 tie at 0, row 2 is negative
    assert ops.nearest_embedding(x, w, "cosine", backend=backend)[0].tolist() == want


# --------------------------------------------------------------------------------------------------------
# Bad input: rejected by the public op, before any kernel runs, with the same error on every backend
# --------------------------------------------------------------------------------------------------------
BAD = [
    (lambda: (torch.randn(3, 4), torch.randn(5, 3), {}), ValueError, "x"),
    (lambda: (torch.randn(3, 5), torch.randn(6, 4), {}), ValueError, "x"),
    (lambda: (torch.randn(3, 4), torch.randn(0, 4), {}), ValueError, "weight"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 4, 1), {}), ValueError, "weight"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 4).double(), {}), TypeError, "weight"),
    (lambda: (torch.randint(0, 3, (3, 4)), torch.randn(5, 4), {}), TypeError, "x"),
    (lambda: (torch.full((3, 4), float("nan")), torch.randn(5, 4), {}), ValueError, "x"),
    (lambda: (torch.full((3, 4), float("inf")), torch.randn(5, 4), {}), ValueError, "x"),
    (lambda: (torch.randn(3, 4), torch.full((5, 4), float("inf")), {}), ValueError, "weight"),
    (lambda: (torch.randn(3, 4), torch.randn(5, 4), {"metric": "dot"}), ValueError, "metric"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_bad_input_is_rejected_before_the_kernel(backend, case, monkeypatch):
    make, err, match = BAD[case]
    if backend != "reference":
        glue = importlib.import_module(f"fastdiff.ops.backends.{backend}.nearest_embedding")
        monkeypatch.setattr(glue, "nearest_embedding", lambda *a, **k: pytest.fail("the kernel ran on bad input"))
    x, w, kw = make()
    dev = C.device(backend)
    with pytest.raises(err, match=match):
        ops.nearest_embedding(x.to(dev), w.to(dev), **kw, backend=backend)


def test_unavailable_backend_and_device_mismatch():
    with pytest.raises(RuntimeError, match="cuda"):  # an explicit backend that cannot run here raises
        ops.nearest_embedding(torch.randn(3, 4), torch.randn(5, 4), backend="cuda")  # (CPU tensors: never here)
    with pytest.raises(ValueError, match="device"):
        ops.nearest_embedding(torch.randn(3, 4), torch.zeros(5, 4, device="meta"))


def test_meta_sparse_and_empty_tensors():
    x, w = torch.randn(3, 4, device="meta"), torch.randn(6, 4, device="meta")
    C.same_error(lambda be: ops.nearest_embedding(x, w, backend=be), InputError, "meta device")
    with pytest.raises(InputError, match="x: expected a dense"):
        ops.nearest_embedding(torch.randn(3, 4).to_sparse(), torch.randn(6, 4))
    e = torch.empty_strided((0, 5), (0, 0))
    for be in C.HERE:
        assert ops.nearest_embedding(e, torch.randn(6, 5), backend=be)[0].shape == (0,)


def test_errors_name_the_public_arguments():
    C.same_error(lambda be: ops.nearest_embedding(torch.randn(3, 4), torch.randn(6, 4), metric="dot", backend=be),
                 InputError, "metric:")


# --------------------------------------------------------------------------------------------------------
# As torch.library ops: opcheck (schema, fake kernel, autograd registration, AOT dispatch with dynamic shapes)
# on every backend, and the public op traced by torch.compile(fullgraph=True) with the same results
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", C.KERNELS)
def test_opcheck_nearest_embedding(backend):
    dev = C.device(backend)
    g = C.gen(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 3, 8, generator=g).to(dev, dtype)
        w = torch.randn(11, 8, generator=g).to(dev, dtype)
        for metric in ("l2", "cosine"):
            torch.library.opcheck(C.op(backend, "nearest_embedding"), (x, w, metric))


@pytest.mark.parametrize("backend", C.backends("cpp", "cuda"))
def test_opcheck_nearest_embedding_screen(backend):
    dev = C.device(backend)
    g = C.gen(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(7, 8, generator=g).to(dev, dtype)
        w = torch.randn(11, 8, generator=g).to(dev, dtype)
        for metric in ("l2", "cosine"):
            p = _nearest.prepare(x, w, metric)
            blocks = (3, 4) if backend == "cpp" else ()
            torch.library.opcheck(C.op(backend, "nearest_embedding_screen"),
                                  (p.x, p.w, p.stat, metric == "cosine", *blocks))


@pytest.mark.parametrize("backend", C.KERNELS)
def test_torch_compile_traces_without_a_graph_break(backend):
    dev = C.device(backend)
    g = C.gen(3)
    x, w = torch.randn(5, 8, generator=g).to(dev), torch.randn(11, 8, generator=g).to(dev)
    fn = lambda x, w: ops.nearest_embedding(x, w, "l2", backend=backend)  # noqa: E731
    for got, want in zip(torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w), fn(x, w)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not C.GPU, reason="needs a CUDA device (GPT-2 vocabulary)")
@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("backend", C.backends("triton"))
def test_gpu_gpt2_vocabulary(backend, dtype):
    g = C.gen(0)
    x = torch.randn(1000, 768, generator=g).to("cuda", dtype)
    w = torch.randn(50257, 768, generator=g).to("cuda", dtype)
    for metric in ("l2", "cosine"):
        idx, snapped = ops.nearest_embedding(x, w, metric, backend=backend)
        assert torch.equal(idx, ops.nearest_embedding_ref(x, w, metric)[0]) and torch.equal(snapped, w[idx])
