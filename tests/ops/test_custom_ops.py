"""What every op shares as ``torch.library`` ops (each op's ``opcheck`` on every backend and its tracing by
``torch.compile(fullgraph=True)`` are in ``tests/ops/test_<op>.py``): one schema per kernel across the backends,
the value checks kept as graph asserts under ``torch.compile``, the switch that bypasses the dispatcher
(``FASTDIFF_CUSTOM_OP=0``; ``FASTDIFF_TRITON_CUSTOM_OP=0`` for Triton alone), and the rule of the top-level
``kernels/`` package (importable under that name without shadowing Hugging Face's ``kernels``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import _backends, ops
from fastdiff import discrete as D
from fastdiff import schedules as S
from tests.ops import _cases as C

ROOT = Path(__file__).resolve().parents[2]


_op = C.op


def test_the_cpp_backend_is_built_here():
    if os.environ.get("FASTDIFF_SKIP_EXT", "") not in ("", "0"):
        pytest.skip("FASTDIFF_SKIP_EXT is set")
    assert _backends.cpp().available, _backends.cpp().reason


# --------------------------------------------------------------------------------------------------------
# One schema per kernel; the opcheck and torch.compile tests of each op are in its file (tests/ops/test_<op>.py)
# --------------------------------------------------------------------------------------------------------
def test_one_schema_per_kernel_across_backends():
    """The kernel ABI is the same text in every backend that has the kernel: the C++ module's schemas
    (csrc/schema.h) are the Triton glue's (and the CUDA module includes the same header)."""
    names = ["posterior", "sample_categorical", "nearest_embedding"]
    backends = [b for b in ("cpp", "triton") if b in C.HERE]
    if len(backends) < 2:
        pytest.skip("needs the C++ and the Triton backends")
    for name in names:
        schemas = {str(_op(b, name)._schema).split("::", 1)[1] for b in backends}
        assert len(schemas) == 1, schemas
    if not (ROOT / "csrc" / "schema.h").is_file():
        pytest.skip("no csrc/ next to tests/ (an installed copy)")
    header = (ROOT / "csrc" / "schema.h").read_text()
    cpp_posterior = str(_op("cpp", "posterior")._schema).split("::", 1)[1]
    assert "int kind, int mask_id, float temperature" in cpp_posterior
    assert "int seed, int offset, int row_offset" in cpp_posterior
    assert "int seed, int offset, int row_offset) -> Tensor" in header


# --------------------------------------------------------------------------------------------------------
# torch.compile keeps the public ops' value checks
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", C.backends("cpp"))
def test_torch_compile_keeps_the_value_checks(backend):
    """Under torch.compile the public op's value checks run in the graph: bad values still raise, with the
    eager error's message (a RuntimeError from the graph's assert)."""
    process = D.Uniform(9, S.cosine(10))
    fn = torch.compile(lambda lg, xt: ops.posterior_sample(process, lg, xt, 6, 2, seed=1, backend=backend),
                       backend="aot_eager", fullgraph=True)
    logits = torch.randn(4, 9)
    fn(logits, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match=r"x_t: token ids must lie in \[0, 9\)"):
        fn(logits, torch.tensor([0, 1, 2, 30]))
    loss = torch.compile(lambda a, t: ops.rounding_loss(a, torch.randn(6, 4), t, backend=backend), backend="aot_eager",
                         fullgraph=True)
    with pytest.raises(RuntimeError, match=r"target: token ids must lie in \[0, 6\)"):
        loss(torch.randn(3, 4), torch.tensor([0, 1, 9]))
    with pytest.raises(RuntimeError, match="x: contains NaN or infinity"):
        loss(torch.full((3, 4), float("nan")), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------------------
# The switch: FASTDIFF_CUSTOM_OP=0 calls the kernels directly, with the same results
# --------------------------------------------------------------------------------------------------------
_OPS = {"cpp": ["posterior", "sample_categorical", "rounding_loss", "nearest_embedding_screen", "nearest_embedding"],
        "cuda": ["posterior", "sample_categorical", "rounding_loss", "nearest_embedding_screen", "nearest_embedding"],
        "triton": ["posterior", "sample_categorical", "rounding_loss_fwd", "rounding_loss_bwd", "nearest_embedding"]}


def test_the_older_switch_is_the_triton_backends_only(monkeypatch):
    from fastdiff.ops.backends import custom_ops_enabled

    monkeypatch.setenv("FASTDIFF_TRITON_CUSTOM_OP", "0")
    assert [custom_ops_enabled(b) for b in ("cpp", "cuda", "triton")] == [True, True, False]
    monkeypatch.setenv("FASTDIFF_CUSTOM_OP", "0")
    assert [custom_ops_enabled(b) for b in ("cpp", "cuda", "triton")] == [False, False, False]


@pytest.mark.parametrize("backend,env", [
    pytest.param(b.values[0], env, marks=b.marks, id=f"{b.values[0]}-{env}")
    for env, params in (("FASTDIFF_CUSTOM_OP", C.KERNELS), ("FASTDIFF_TRITON_CUSTOM_OP", C.backends("triton")))
    for b in params])
def test_switch_bypasses_the_custom_ops(backend, env, monkeypatch):
    dev = C.device(backend)
    g = C.gen(4)
    x, w = torch.randn(5, 8, generator=g).to(dev), torch.randn(11, 8, generator=g).to(dev)
    logits = torch.randn(4, 9, generator=g).to(dev)
    target = torch.tensor([1, 0, 10, 3, 3], device=dev)
    process = D.Uniform(9, S.cosine(10))
    xt = torch.randint(0, 9, (4,), generator=g).to(dev)
    tt, ss = torch.full((4,), 6, device=dev), torch.full((4,), 2, device=dev)

    def run():
        out = []
        for red in ("mean", "none"):
            xr = x.clone().requires_grad_()
            loss = ops.rounding_loss(xr, w, target, reduction=red, backend=backend)
            out += [loss, torch.autograd.grad(loss.sum(), [xr])[0]]
        return (*ops.nearest_embedding(x, w, "cosine", backend=backend),
                ops.sample_categorical(logits, seed=1, backend=backend),
                ops.posterior_sample(process, logits, xt, tt, ss, seed=2, backend=backend),
                ops.categorical_posterior(process, logits, xt, tt, ss, backend=backend), *out)

    for name in _OPS[backend]:
        _op(backend, name)
    via_ops = run()

    def boom(*args, **kwargs):
        raise AssertionError(f"a custom op was called with {env}=0")

    monkeypatch.setenv(env, "0")
    for name in _OPS[backend]:  # every op of the namespace: a call through the dispatcher would fail
        packet = getattr(getattr(torch.ops, f"fastdiff_{backend}"), name)
        monkeypatch.setattr(packet, "default", boom)
    for mod, attr in [(f"fastdiff.ops.backends.{backend}.nearest_embedding", "nearest_embedding_op"),
                      (f"fastdiff.ops.backends.triton.posterior", "posterior_op"),
                      (f"fastdiff.ops.backends.triton.sample_categorical", "sample_categorical_op"),
                      (f"fastdiff.ops.backends.triton.rounding_loss", "rounding_loss_fwd_op"),
                      (f"fastdiff.ops.backends.triton.rounding_loss", "rounding_loss_bwd_op")]:
        if backend in mod:
            monkeypatch.setattr(importlib.import_module(mod), attr, boom)
    for a, b in zip(run(), via_ops):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# kernels/ as a top-level package: empty, or the real Hugging Face ``kernels``
# --------------------------------------------------------------------------------------------------------
def _top_level_kernels_probe(tmp_path: Path, probe: str) -> None:
    """Run ``probe`` in a child process with this checkout's root first on sys.path, after fastdiff's Triton
    backend is loaded, then check that the Triton ops still work (equal to the reference)."""
    code = (
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from fastdiff import _backends\n"
        "glue = _backends.triton().module\n"
        "assert glue is not None, _backends.triton().reason\n"
        + probe +
        "import gc; gc.collect()\n"
        "from fastdiff import discrete, schedules, ops\n"
        "p = discrete.Uniform(11, schedules.cosine(20))\n"
        "x = torch.randn(3, 11); xt = torch.randint(0, 11, (3,))\n"
        "a = ops.posterior_sample(p, x, xt, 9, 4, seed=1, backend='triton')\n"
        "b = ops.posterior_sample(p, x, xt, 9, 4, seed=1, backend='reference')\n"
        "assert torch.equal(a, b)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300, check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.stdout + res.stderr)[-3000:]


@pytest.mark.skipif("triton" not in C.HERE, reason="the Triton backend is not selected or not installed")
def test_a_top_level_kernels_import_leaves_fastdiff_kernels_alone(tmp_path):
    """transformers probes ``import kernels`` (Hugging Face's package); from a checkout's root that finds
    this repository's ``kernels/``. With no other ``kernels`` importable, the package stays empty and its
    kernel files refuse to load a second time under that name (every kernel would compile twice)."""
    _top_level_kernels_probe(tmp_path, (
        "saved = list(sys.path)\n"
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"  # no other 'kernels' to find
        "import kernels\n"  # the probe
        "sys.path[:] = saved\n"
        "assert kernels.__file__.startswith(sys.path[0]), kernels.__file__\n"
        "assert kernels.__all__ == [] and not hasattr(kernels, 'posterior_sample'), kernels.__dict__.keys()\n"
        "assert not hasattr(kernels, '__version__')\n"
        "try:\n"
        "    import kernels.posterior\n"
        "    raise SystemExit('kernels.posterior imported under a second name')\n"
        "except ImportError as e:\n"
        "    assert 'fastdiff.kernels' in str(e)\n"
    ))


@pytest.mark.skipif("triton" not in C.HERE, reason="the Triton backend is not selected or not installed")
def test_a_top_level_kernels_import_finds_the_real_kernels_package(tmp_path):
    """transformers >= 5 depends on Hugging Face's ``kernels`` and imports it on ``import transformers``;
    a checkout's ``kernels/`` first on sys.path must not shadow it (every ``python -m pytest`` from the
    root failed at ``from kernels import CUDAProperties``). A stand-in package later on sys.path is what
    ``import kernels`` and its submodules must give."""
    other = tmp_path / "elsewhere" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("__version__ = '9.9'\nCUDAProperties = object\n")
    (other / "layer.py").write_text("NAME = 'layer'\n")
    _top_level_kernels_probe(tmp_path, (
        f"sys.path.insert(1, {str(other.parent)!r})\n"
        "import kernels\n"
        f"assert kernels.__file__ == {str(other / '__init__.py')!r}, kernels.__file__\n"
        "from kernels import CUDAProperties, __version__\n"
        "import kernels.layer\n"
        "assert kernels.layer.NAME == 'layer' and sys.modules['kernels'] is kernels\n"
    ))
