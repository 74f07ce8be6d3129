"""The ``torch.library`` dispatcher's cost per call, on every kernel backend here, and the switch around it.

Every kernel backend's entry points call their kernels through ``torch.library`` ops (``fastdiff_<backend>::*``)
so that ``torch.compile`` traces them; ``FASTDIFF_CUSTOM_OP=0`` calls the same kernels directly
(:func:`fastdiff.ops.backends.custom_ops_enabled`). ``test_dispatcher_overhead`` times one call of each
backend's glue entry both ways on tiny inputs (C++: one row, so the kernel's own work is a few microseconds;
Triton: no rows, so the launcher returns before launching and only the host path is timed), and
``test_public_op_overhead`` the whole public op (checks, dispatch, lowering) both ways on one row. The C++ and
CUDA ops are registered in C++ (``TORCH_LIBRARY``), the Triton ones and the ``nearest_embedding`` wrapper (whose
rescaling and float64 resolution are Python) in Python (``torch.library.custom_op``).

``extra_info``: ``direct_us`` (the other path's best time, measured in the same test) and ``overhead_us``
(custom op minus direct, best times). Run on the CPU (``FASTDIFF_BENCH_DEVICE=cpu``) for the host cost alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from benchmarks.conftest import DEVICE, best_time
from fastdiff import _backends, discrete, ops, schedules
from fastdiff.ops._plan import posterior_plan

KERNELS = ("posterior", "sample_categorical", "rounding_loss", "nearest_embedding")


def _glue(backend: str, kernel: str):
    """The glue module and the device of its inputs. Triton's glue is imported wherever ``triton`` is
    installed (no GPU needed: with no rows the launchers return before launching)."""
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
    else:
        be = _backends.get(backend)
        if not be.available:
            pytest.skip(f"{backend}: {be.reason}")
    device = torch.device("cuda") if backend == "cuda" else DEVICE
    if backend == "cpp" and device.type != "cpu":
        pytest.skip("the cpp backend runs on CPU tensors")
    return importlib.import_module(f"fastdiff.ops.backends.{backend}.{kernel}"), device


def _call(backend: str, kernel: str):
    """A zero-argument call of ``kernel``'s glue entry on tiny inputs (no rows for Triton)."""
    glue, dev = _glue(backend, kernel)
    n = 0 if backend == "triton" else 1
    g = torch.Generator().manual_seed(0)
    if kernel == "posterior":
        process = discrete.Uniform(9, schedules.cosine(10))
        logits = torch.randn(n, 9, generator=g).to(dev)
        xt = torch.zeros(n, dtype=torch.int64, device=dev)
        tt = torch.full((n,), 5, device=dev)
        args = posterior_plan(process, logits, xt, tt, tt - 1, 1.0).args(sample=True, seed=1)
        return lambda: glue.posterior(*args)
    if kernel == "sample_categorical":
        logits = torch.randn(n, 9, generator=g).to(dev)
        return lambda: glue.sample_categorical(logits, 1, 0, 1.0, 0, 1.0, 0)
    x, w = torch.randn(n, 8, generator=g).to(dev), torch.randn(5, 8, generator=g).to(dev)
    if kernel == "rounding_loss":
        t = torch.zeros(n, dtype=torch.int64, device=dev)
        return lambda: glue.rounding_loss_fwd(x, w, None, t, -100, None, False, False, False)
    return lambda: glue.nearest_embedding(x, w, "l2")


def _both_ways(benchmark, fn, path: str, monkeypatch) -> None:
    """Time ``fn`` through the custom op (``path="custom_op"``) or directly, and the other way for extra_info."""
    def direct():
        os.environ["FASTDIFF_CUSTOM_OP"] = "0"
        try:
            return best_time(fn, repeats=2000)
        finally:
            os.environ.pop("FASTDIFF_CUSTOM_OP", None)

    monkeypatch.delenv("FASTDIFF_CUSTOM_OP", raising=False)
    monkeypatch.delenv("FASTDIFF_TRITON_CUSTOM_OP", raising=False)
    if path == "direct":
        monkeypatch.setenv("FASTDIFF_CUSTOM_OP", "0")
    fn()
    benchmark(fn)
    if path == "custom_op" and benchmark.stats is not None:
        via_op = best_time(fn, repeats=2000)
        d = direct()
        benchmark.extra_info.update(direct_us=d * 1e6, custom_op_us=via_op * 1e6, overhead_us=(via_op - d) * 1e6)


@pytest.mark.parametrize("path", ["direct", "custom_op"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_dispatcher_overhead(benchmark, backend: str, kernel: str, path: str, monkeypatch) -> None:
    benchmark.group = f"dispatcher: {backend} {kernel} (tiny input)"
    _both_ways(benchmark, _call(backend, kernel), path, monkeypatch)


@pytest.mark.parametrize("path", ["direct", "custom_op"])
@pytest.mark.parametrize("op", ["posterior_sample", "sample_categorical", "rounding_loss", "nearest_embedding"])
@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_public_op_overhead(benchmark, backend: str, op: str, path: str, monkeypatch) -> None:
    """The whole public op on one row, both ways: the dispatcher's share of a call."""
    benchmark.group = f"public op: {backend} {op} (one row)"
    _, dev = _glue(backend, "posterior")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 9, generator=g).to(dev)
    x, w = torch.randn(1, 8, generator=g).to(dev), torch.randn(5, 8, generator=g).to(dev)
    process = discrete.Uniform(9, schedules.cosine(10))
    xt = torch.zeros(1, dtype=torch.int64, device=dev)
    calls = {
        "posterior_sample": lambda: ops.posterior_sample(process, logits, xt, 5, seed=1, backend=backend),
        "sample_categorical": lambda: ops.sample_categorical(logits, seed=1, backend=backend),
        "rounding_loss": lambda: ops.rounding_loss(x, w, xt, backend=backend),
        "nearest_embedding": lambda: ops.nearest_embedding(x, w, backend=backend),
    }
    _both_ways(benchmark, calls[op], path, monkeypatch)
