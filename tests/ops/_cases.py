"""The one case builder of the op tests (``tests/ops/test_<op>.py``): the backends, their devices and marks,
dtypes with tolerances, the shapes each backend runs at, the processes, seeded inputs, and the oracle checks
that several ops share (draws against the float64 CDF, arg-mins against float64 scores, the same error on
every backend).

Backends: ``reference``, ``cpp``, ``triton`` (compiled on a GPU, else in Triton's CPU interpreter at small
shapes) and ``cuda`` (marked ``gpu``; skipped without a CUDA device). ``FASTDIFF_TEST_BACKENDS`` (a comma list)
restricts them, as ``scripts/asan.sh`` does (reference and cpp under AddressSanitizer).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from fastdiff import _backends
from fastdiff import discrete as D
from fastdiff import schedules as S
from tests import _oracles as O

GPU = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
T = 50  # diffusion steps of the test processes
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NEAR = 1e-6  # relative distance to a CDF boundary under which a draw may differ from the reference's


def _selected() -> list[str]:
    names = os.environ.get("FASTDIFF_TEST_BACKENDS", "reference,cpp,triton,cuda")
    return [n.strip() for n in names.split(",") if n.strip()]


def _marks(name: str) -> list:
    if name == "cpp":
        skip = not _backends.cpp().available and os.environ.get("FASTDIFF_SKIP_EXT", "") not in ("", "0")
        # Not skipped when the extension should exist: the test then fails with the reason.
        return [pytest.mark.skipif(skip, reason="FASTDIFF_SKIP_EXT is set: the C++ extension was not built on purpose")]
    if name == "triton":
        return [pytest.mark.skipif(not HAVE_TRITON, reason="optional backend: triton is not installed "
                                                            "(pip install 'fastdiff[triton]')")]
    if name == "cuda":
        return [pytest.mark.gpu,
                pytest.mark.skipif(not GPU, reason="needs a CUDA device (GPU test of the CUDA kernels)")]
    return []


def backends(*names: str) -> list:
    """``pytest.param(name, marks=...)`` for each of ``names`` (default: all four) that is selected."""
    names = names or ("reference", "cpp", "triton", "cuda")
    return [pytest.param(n, id=n, marks=_marks(n)) for n in names if n in _selected()]


BACKENDS = backends()
KERNELS = backends("cpp", "triton", "cuda")
# What backend="auto" runs on CPU tensors here (the C++ kernels when built): the statistical tests with many
# draws run there and on CUDA only, as they did when they called the ops with backend="auto".
AUTO_CPU = _backends.auto_choice("cpu") if _backends.auto_choice("cpu") in ("cpp", "reference") else "reference"
HERE = [n for n in ("reference", "cpp", "triton") if n in _selected() and (n != "triton" or HAVE_TRITON)]


def cases(table: dict[str, list]) -> list:
    """Flatten ``{backend: [case tuple, ...]}`` into parameters ``(backend, *case)`` with the backend's marks:
    each backend runs the shapes it is built for (the Triton interpreter small ones, the GPU large ones)."""
    out = []
    for name, rows in table.items():
        if name not in _selected():
            continue
        for row in rows:
            row = row if isinstance(row, tuple) else (row,)
            out.append(pytest.param(name, *row, id="-".join([name, *(_id(v) for v in row)]), marks=_marks(name)))
    return out


def _id(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items()) or "plain"
    return str(v)


def device(backend: str) -> torch.device:
    """Where ``backend``'s inputs live: CUDA for ``cuda`` (and ``triton`` on a GPU), else the CPU."""
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and GPU) else "cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# Processes and inputs
# --------------------------------------------------------------------------------------------------------
def processes(V: int, *, steps: int = T, mid: bool = False, spindle_mask: int | None = None, band: int = 3,
              dense: bool = False, dense_scale: float = 1.0, small: int = 64) -> dict:
    """The discrete processes the posterior tests run, by name: ``absorbing`` (mask V - 1, mutual-information
    schedule), ``absorbing-mid`` (mask V // 2, cosine; with ``mid``), ``absorbing-spindle`` (per-token schedule,
    mask ``spindle_mask``, default V - 1), ``uniform`` (cosine), and for ``V <= small`` ``gaussian-band``
    (``band``) and ``dense`` (with ``dense``: softmax of a seeded normal matrix times ``dense_scale``)."""
    g = gen(V)
    procs = {"absorbing": D.Absorbing(V, V - 1, S.mutual_info(steps))}
    if mid:
        procs["absorbing-mid"] = D.Absorbing(V, V // 2, S.cosine(steps))
    procs["absorbing-spindle"] = D.Absorbing(V, V - 1 if spindle_mask is None else spindle_mask,
                                             S.spindle(steps, torch.randn(V, generator=g) * 0.3))
    procs["uniform"] = D.Uniform(V, S.cosine(steps))
    if V <= small:
        procs["gaussian-band"] = D.GaussianBand(V, S.cosine(steps), bandwidth=band)
        if dense:
            procs["dense"] = D.Dense(torch.softmax(torch.randn(V, V, generator=g) * dense_scale, -1), steps)
    return procs


def logits_and_xt(process, shape, seed: int, dtype=torch.float32, *, masked: float = 0.6):
    """``(logits (*shape, V) = 2·N(0, 1), x_t (*shape))``; for absorbing processes a fraction ``masked`` of
    ``x_t`` is the mask."""
    g = gen(seed)
    V = process.vocab_size
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    xt = torch.randint(0, V, shape, generator=g)
    if process.kind == "absorbing":
        xt = torch.where(torch.rand(shape, generator=g) < masked, torch.full_like(xt, process.mask_id), xt)
    return logits, xt


# --------------------------------------------------------------------------------------------------------
# Oracle checks shared by the ops
# --------------------------------------------------------------------------------------------------------
def scores64(x: torch.Tensor, w: torch.Tensor, metric: str) -> torch.Tensor:
    """The float64 arg-min scores of ``nearest_embedding``: l2 ``|w|² - 2x·w``, cosine ``-x·w/max(|w|, 1e-12)``."""
    x64, w64 = x.reshape(-1, x.shape[-1]).double().cpu(), w.double().cpu()
    if metric == "l2":
        return (w64 * w64).sum(1)[None] - 2 * x64 @ w64.T
    return -(x64 @ (w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)


def check_draws_near(got: torch.Tensor, want: torch.Tensor, weights: torch.Tensor, u: torch.Tensor,
                     max_near: int = 1, near: float = NEAR) -> None:
    """Tokens equal the reference's, except rows whose draw ``u·Z`` lies within ``near·Z`` of a cumulative
    boundary of the reference's float64 weights (at most ``max_near`` such rows)."""
    got, want = got.reshape(-1).cpu(), want.reshape(-1).cpu()
    bad = (got != want).nonzero().squeeze(-1)
    if bad.numel() == 0:
        return
    w = weights.reshape(-1, weights.shape[-1]).cpu().double()[bad]
    c = torch.cumsum(w, -1)
    gap = ((c - (u.cpu()[bad] * c[:, -1]).unsqueeze(-1)).abs().min(-1).values / c[:, -1])
    assert bool((gap < near).all()), f"rows {bad.tolist()} differ from the reference away from a boundary"
    assert bad.numel() <= max_near, f"{bad.numel()} near-tie disagreements"


def check_draws_rare(got, ref, weights_fn, seed: int, offset: int, fast: bool) -> None:
    """Same tokens; on a float32 fast path (``fast``) a differing row must be a near-tie (margin < 1e-6) and
    such rows rare (at most one in 200)."""
    diff = (got != ref).reshape(-1).nonzero().squeeze(-1).tolist()
    if not fast:
        assert not diff, f"rows {diff[:5]} differ"
        return
    for r in diff:
        w = weights_fn(r)
        assert O.margin(w, O.row_uniform(seed, offset, r)) < 1e-6, f"row {r} differs and is not a near-tie"
    assert len(diff) <= max(1, got.numel() // 200), f"{len(diff)} of {got.numel()} rows differ"


def check_draws_contract(out, probs64: np.ndarray, seed: int, offset: int, rows, name: str, near: float,
                         max_near: int = 3) -> None:
    """Each row's token is the contract's (``O.inverse_cdf`` at the row's Philox uniform) except near-ties
    (margin < ``near``), which must be few; no zero-probability token."""
    out = out.reshape(-1).cpu().numpy()
    count = 0
    for r in range(len(out)):
        w = probs64[r]
        u = O.row_uniform(seed, offset, int(rows[r]))
        want = O.inverse_cdf(w, u)
        if out[r] != want:
            assert O.margin(w, u) < near, f"{name}: row {r} drew {out[r]}, contract {want}, not a near-tie"
            count += 1
        assert w[out[r]] > 0, f"{name}: row {r} drew a zero-probability token"
    assert count <= max_near, f"{name}: {count} near-tie disagreements"


def outcome(call):
    """``("ok", value)`` or ``(exception type, message)``."""
    try:
        return "ok", call()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)


def same_error(call, err, match: str, names=None) -> None:
    """``call(backend)`` raises ``err`` with the same message on every backend here; that message matches."""
    seen = {be: outcome(lambda: call(be)) for be in (names or HERE)}
    kinds = {be: o[0] for be, o in seen.items()}
    assert all(k is err for k in kinds.values()), seen
    msgs = {o[1] for o in seen.values()}
    assert len(msgs) == 1, seen
    assert match in msgs.pop()


def op(backend: str, name: str):
    """The ``torch.library`` op ``fastdiff_<backend>::<name>`` (its default overload), after the backend's glue
    is imported (which loads the extension and registers the fake kernels and the Python-defined ops)."""
    import importlib

    importlib.import_module(f"fastdiff.ops.backends.{backend}")
    for kernel in ("nearest_embedding", "rounding_loss", "posterior", "sample_categorical"):
        importlib.import_module(f"fastdiff.ops.backends.{backend}.{kernel}")
    return getattr(getattr(torch.ops, f"fastdiff_{backend}"), name).default


@st.composite
def logit_rows(draw: st.DrawFn, max_rows: int = 3, sizes: tuple[int, ...] = (1, 2, 3, 8, 17, 150)) -> torch.Tensor:
    """Hypothesis: ``(n, V)`` float64 logit rows mixing ordinary values, -inf, signed zeros and repeats, with
    at least one finite logit per row (the fuzz tests of the row kernels)."""
    n, V = draw(st.integers(1, max_rows)), draw(st.sampled_from(sizes))
    cell = st.one_of(st.floats(-30, 30), st.just(float("-inf")), st.sampled_from([0.0, -0.0, 1.0, 2.5]))
    x = torch.tensor(draw(st.lists(cell, min_size=n * V, max_size=n * V)), dtype=torch.float64).reshape(n, V)
    x[:, draw(st.integers(0, V - 1))] = draw(st.floats(-5, 5))  # a finite logit in every row
    return x
