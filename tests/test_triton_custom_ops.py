"""The Triton entry points as ``torch.library`` custom ops: ``opcheck`` (schema, fake tensors, autograd
registration, AOT dispatch with dynamic shapes), tracing by ``torch.compile`` with ``fullgraph=True``,
and the ``FASTDIFF_TRITON_CUSTOM_OP=0`` switch that bypasses the dispatcher.

The ops are registered for every device, so on a CPU machine they run (and are checked) in Triton's
interpreter on CPU tensors at tiny shapes; on a GPU the same checks run on CUDA tensors. Checking on
CPU is what lets CI catch a wrong fake (shape/dtype) or schema without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import ops
from tests._triton import triton_backend
from fastdiff import discrete as D
from fastdiff import schedules as S
from fastdiff.ops._plan import posterior_plan

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="optional backend: triton is not installed (pip install 'fastdiff[triton]')")

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    yield from triton_backend()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_opcheck_nearest_embedding(kernels):
    from fastdiff.kernels.nearest_embedding import nearest_embedding_op

    g = _gen(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 3, 8, generator=g).to(DEV, dtype)
        w = torch.randn(11, 8, generator=g).to(DEV, dtype)
        for metric in ("l2", "cosine"):
            torch.library.opcheck(nearest_embedding_op, (x, w, metric))


def test_opcheck_rounding_loss(kernels):
    from fastdiff.kernels.rounding_loss import rounding_loss_bwd_op, rounding_loss_fwd_op

    g = _gen(1)
    x = torch.randn(6, 8, generator=g).to(DEV)
    w = torch.randn(13, 8, generator=g).to(DEV)
    b = torch.randn(13, generator=g).to(DEV)
    target = torch.tensor([0, 3, -100, 12, 5, 5], device=DEV)
    for bias in (None, b):
        torch.library.opcheck(rounding_loss_fwd_op, (x, w, target, bias, -100))
        _, lse = rounding_loss_fwd_op(x, w, target, bias, -100)
        gvec = torch.rand(6, generator=g).to(DEV) * (target != -100)
        torch.library.opcheck(rounding_loss_bwd_op, (x, w, target, bias, lse, gvec, True, True, bias is not None))
        torch.library.opcheck(rounding_loss_bwd_op, (x, w, target, bias, lse, gvec, True, False, False))


def _plan_args(process, V, sample):
    g = _gen(V)
    logits = torch.randn(2, 3, V, generator=g).to(DEV)
    xt = torch.randint(0, V, (2, 3), generator=g).to(DEV)
    if process.kind == "absorbing":
        xt[:, ::2] = process.mask_id
    t = torch.tensor([[9], [5]], device=DEV).expand(2, 3)
    s = torch.tensor([[4], [0]], device=DEV).expand(2, 3)
    p = posterior_plan(process, logits, xt, t, s, 0.9)
    return (p.logits, p.x_t, p.t, p.s, p.a_t, p.a_s, p.ab_table, p.fact1, p.qbar_s, p.pair, p.kind, p.mask_id,
            p.temperature, sample, 7, 1, 3, 0, 11, 1)


@pytest.mark.parametrize("sample", [False, True])
def test_opcheck_posterior(kernels, sample):
    from fastdiff.kernels.posterior import posterior_op

    V, T = 7, 10
    for process in (D.Absorbing(V, V - 1, S.mutual_info(T)),
                    D.Absorbing(V, 0, S.spindle(T, torch.linspace(0, 1, V))),
                    D.Uniform(V, S.cosine(T)),
                    D.GaussianBand(V, S.cosine(T), bandwidth=2)):
        torch.library.opcheck(posterior_op, _plan_args(process, V, sample))


def test_opcheck_sample_categorical(kernels):
    from fastdiff.kernels.sample_categorical import sample_categorical_op

    logits = torch.randn(4, 9, generator=_gen(2)).to(DEV)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 3, 0.8)):
        torch.library.opcheck(sample_categorical_op, (logits, 5, 0, 1, 0, 11, 1, temperature, top_k, top_p))


def test_torch_compile_traces_the_entry_points(kernels):
    """fullgraph=True: the custom ops (and the autograd.Function around the loss ops) trace without a
    graph break; aot_eager runs the traced graph, which calls the real kernels."""
    g = _gen(3)
    x = torch.randn(5, 8, generator=g).to(DEV)
    w = torch.randn(11, 8, generator=g).to(DEV)
    logits = torch.randn(4, 9, generator=g).to(DEV)
    target = torch.tensor([1, 0, 10, 3, 3], device=DEV)

    def step(x, w, logits, target):
        idx, snapped = kernels.nearest_embedding(x, w, "l2")
        tok = kernels.sample_categorical(logits, seed=3, offset=1, temperature=0.8, top_k=4, top_p=0.9)
        loss = kernels.rounding_loss(x, w, target, None, "mean", -100)
        return idx, snapped, tok, loss

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, w, logits, target), step(x, w, logits, target)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    loss = torch.compile(lambda a: kernels.rounding_loss(a, w, target, None, "sum", -100),
                         backend="aot_eager", fullgraph=True)(xg)
    (gx,) = torch.autograd.grad(loss, [xg])
    ref = ops.rounding_loss(xg, w, target, reduction="sum", backend="reference")
    torch.testing.assert_close(gx, torch.autograd.grad(ref, [xg])[0], rtol=1e-5, atol=1e-6)


def test_switch_bypasses_the_custom_ops(kernels, monkeypatch):
    """With FASTDIFF_TRITON_CUSTOM_OP=0 the entry points call the launchers directly, same results."""
    # the package re-exports functions under the submodules' names: import the modules by path
    ne_mod, post_mod, rl_mod, sc_mod = (importlib.import_module(f"fastdiff.kernels.{m}") for m in
                                        ("nearest_embedding", "posterior", "rounding_loss", "sample_categorical"))

    g = _gen(4)
    x, w = torch.randn(5, 8, generator=g).to(DEV), torch.randn(11, 8, generator=g).to(DEV)
    logits = torch.randn(4, 9, generator=g).to(DEV)
    target = torch.tensor([1, 0, 10, 3, 3], device=DEV)
    process = D.Uniform(9, S.cosine(10))
    xt = torch.randint(0, 9, (4,), generator=g).to(DEV)
    tt, ss = torch.full((4,), 6, device=DEV), torch.full((4,), 2, device=DEV)

    def run():
        xr = x.clone().requires_grad_()
        loss = kernels.rounding_loss(xr, w, target, None, "mean", -100)
        return (*kernels.nearest_embedding(x, w, "cosine"), kernels.sample_categorical(logits, seed=1),
                kernels.posterior_sample(process, logits, xt, tt, ss, seed=2),
                kernels.categorical_posterior(process, logits, xt, tt, ss), loss,
                torch.autograd.grad(loss, [xr])[0])

    via_ops = run()

    def boom(*args, **kwargs):
        raise AssertionError("custom op called with FASTDIFF_TRITON_CUSTOM_OP=0")

    monkeypatch.setenv("FASTDIFF_TRITON_CUSTOM_OP", "0")
    for mod, name in ((ne_mod, "nearest_embedding_op"), (sc_mod, "sample_categorical_op"),
                      (post_mod, "posterior_op"), (rl_mod, "rounding_loss_fwd_op"), (rl_mod, "rounding_loss_bwd_op")):
        monkeypatch.setattr(mod, name, boom)
    for a, b in zip(run(), via_ops):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _top_level_kernels_probe(tmp_path: Path, probe: str) -> None:
    """Run ``probe`` in a child process with this checkout's root first on sys.path, after fastdiff's Triton
    backend is loaded, then check that the Triton ops still work (equal to the reference)."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from fastdiff import _backends\n"
        "post = _backends.triton().module.posterior\n"
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


def test_a_top_level_kernels_import_leaves_the_custom_ops_alone(tmp_path):
    """transformers probes ``import kernels`` (Hugging Face's package); from a checkout's root that finds
    this repository's ``kernels/``. With no other ``kernels`` importable, that must not register the custom
    ops a second time: the second registration frees the first, and fastdiff.kernels' ops then crash (seen
    as bad_alloc / segfaults). The package stays empty."""
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
