"""Backend dispatch: auto falls back silently, explicit requests raise with the reason, env override, a
backend's glue module is found by its name (``<backend package>.<KERNEL>``) and actually called, and every
backend here reports "ok" for every op."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import fastdiff
from fastdiff import _backends, ops
from fastdiff.ops import _dispatch


from tests.ops import _cases as C

OPS = ("nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample", "sample_categorical")


@pytest.fixture
def fake_cpp(monkeypatch):
    """Pretend a C++ backend exists whose glue implements the sample_categorical kernel only (and records its
    calls): a backend package with a ``sample_categorical`` module holding the ``sample_categorical`` entry."""
    calls = []

    def sample_categorical(logits, seed, offset, temperature, top_k, top_p, row_offset):
        calls.append(dict(seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p,
                          row_offset=row_offset))
        return torch.zeros(logits.shape[0], dtype=torch.int64)

    mod = types.SimpleNamespace(sample_categorical=types.SimpleNamespace(sample_categorical=sample_categorical))
    monkeypatch.setattr(_backends, "cpp", lambda: _backends.Backend("cpp", mod, ""))
    return calls


def test_explicit_unavailable_backend_raises_with_reason_and_install_command(monkeypatch):
    monkeypatch.setattr(_backends, "cpp", lambda: _backends.Backend("cpp", None, "not built; pip install -e ."))
    with pytest.raises(ops.BackendUnavailableError, match="pip install"):
        ops.sample_categorical(torch.zeros(2, 3), seed=0, backend="cpp")


def test_real_probe_reasons_name_a_fix():
    for name, be in fastdiff.available_backends().items():
        if not be.available:
            assert any(k in be.reason for k in ("pip install", "TRITON_INTERPRET", "CUDA", "GPU")), (name, be.reason)


def test_auto_falls_back_to_reference_and_uses_a_kernel_when_present(fake_cpp, monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    logits = torch.randn(4, 5)
    out = ops.sample_categorical(logits, seed=3)
    assert fake_cpp, "auto on CPU must pick the cpp kernel when it is built"
    assert torch.equal(out, torch.zeros(4, dtype=torch.int64))
    # An op the fake module lacks falls back silently for auto, and raises when asked for explicitly.
    x, w = torch.randn(3, 4), torch.randn(6, 4)
    assert torch.equal(ops.nearest_embedding(x, w)[0], ops.nearest_embedding_ref(x, w)[0])
    with pytest.raises(ops.BackendUnavailableError, match="no kernel for nearest_embedding"):
        ops.nearest_embedding(x, w, backend="cpp")
    assert ops.explain("nearest_embedding")["cpp"].startswith("the cpp backend has no kernel")
    assert ops.explain("sample_categorical")["cpp"] == "ok"


def test_reference_backend_never_calls_kernels(fake_cpp):
    logits = torch.randn(4, 5)
    out = ops.sample_categorical(logits, seed=3, backend="reference")
    assert not fake_cpp
    assert torch.equal(out, ops.sample_categorical_ref(logits, seed=3))


def test_env_override(fake_cpp, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    ops.sample_categorical(torch.randn(2, 3), seed=0)
    assert not fake_cpp
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.sample_categorical(torch.randn(2, 3), seed=0)
    monkeypatch.setenv("FASTDIFF_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        ops.sample_categorical(torch.randn(2, 3), seed=0)


def test_device_mismatch_for_explicit_backend(monkeypatch):
    mod = types.SimpleNamespace(sample_categorical=types.SimpleNamespace(sample_categorical=lambda *a: None))
    monkeypatch.setattr(_backends, "cuda", lambda: _backends.Backend("cuda", mod, ""))
    with pytest.raises(ops.BackendUnavailableError, match="CUDA tensors"):
        ops.sample_categorical(torch.randn(2, 3), seed=0, backend="cuda")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.resolve("sample_categorical", "sample_categorical", "tpu", torch.device("cpu"))


def test_import_needs_no_triton_compiler_or_extension():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['fastdiff._C'] = None;"
            "import fastdiff, torch; from fastdiff import ops;"
            "print(ops.sample_categorical(torch.zeros(1, 3), seed=0).tolist());"
            "print(fastdiff.available_backends()['cpp'].available)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    drawn, cpp_available = res.stdout.split()
    assert drawn in ("[0]", "[1]", "[2]") and cpp_available == "False"


def test_kernel_families_are_found_by_name():
    """A public op names its kernel family (KERNEL); the two posterior ops share one."""
    assert {op: _dispatch.kernel_of(op) for op in OPS} == {
        "nearest_embedding": "nearest_embedding", "rounding_loss": "rounding_loss",
        "categorical_posterior": "posterior", "posterior_sample": "posterior", "sample_categorical": "sample_categorical"}


@pytest.mark.parametrize("backend", C.KERNELS)
def test_every_op_is_ok_on_every_backend_here(backend, monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    dev = C.device(backend)
    for op in OPS:
        assert ops.explain(op, dev)[backend] == "ok", op
    if backend == "cuda":  # auto picks the CUDA kernels on CUDA tensors
        assert _backends.auto_choice(dev) == "cuda"
