"""The CUDA backend's Python glue (fastdiff/ops/backends/cuda/), on CPU.

The compiled module is replaced by a pure-PyTorch implementation of the binding's contract (csrc/schema.h,
csrc/cuda/binding.cpp, launchers.h): the plan's row formulas by kind code, the rounding-loss chunk contract
(per-row losses and the gradients of ``sum_r row_scale[r]·loss_r``), the draw rule with the counter words as
int64 bits. Through it, and through the public ops with ``backend="cuda"`` (the device check relaxed to CPU
tensors), these tests check what the glue and the shared layers add: flattening and strides, the lowering of
each process to the ABI's arrays and kind codes, the autograd wiring (gradient in the forward pass for
mean/sum, recomputed with the output gradient for "none"), reshaping, and the mapping of ``top_k=None`` /
``top_p=None``. The stand-in registers no torch.library ops, so the glue calls it directly. The kernels
themselves are tested on a GPU (tests/ops/, backend "cuda") and compile-checked by tests/test_cuda_compile.py.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import _backends
from fastdiff import discrete as D
from fastdiff import ops
from fastdiff import random as R
from fastdiff import schedules as S
from fastdiff.ops import _dispatch, _plan
from fastdiff.ops._common import draw_from_weights
from fastdiff.ops.sample_categorical import _sample_categorical

U64 = (1 << 64) - 1


class FakeCudaModule(types.SimpleNamespace):
    """The binding's contract in PyTorch, with argument checks like the binding's and a call log."""

    def __init__(self):
        super().__init__(calls=[])

    # ---- nearest_embedding
    def nearest_embedding_screen(self, x, weight, stat, cosine):
        """The screen: (index of a minimum, minimum, second smallest score) per row."""
        self.calls.append(("nearest_embedding_screen", x, weight, cosine))
        assert x.ndim == 2 and (x.shape[1] <= 1 or x.stride(1) == 1)
        assert weight.ndim == 2 and (weight.shape[1] <= 1 or weight.stride(1) == 1)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        assert stat.dtype == cdt and stat.shape == (weight.shape[0],) and stat.is_contiguous()
        g = x.to(cdt) @ weight.to(cdt).T
        score = -(g * stat) if cosine else stat - 2 * g
        srt = score.sort(dim=1).values
        second = srt[:, 1] if score.shape[1] > 1 else torch.full_like(srt[:, 0], float("inf"))
        return score.argmin(dim=1), srt[:, 0], second

    # ---- rounding_loss (FASTDIFF_SCHEMA_ROUNDING_LOSS)
    def rounding_loss(self, x, weight, bias, target, ignore_index, row_scale, need_gx, need_gw, need_gb, chunk_rows):
        self.calls.append(("rounding_loss", x, weight, bias, target, ignore_index, row_scale, need_gx, need_gw,
                           need_gb))
        assert x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype and x.is_contiguous()
        assert target.dtype == torch.int64 and target.shape == (x.shape[0],)
        assert row_scale.dtype == x.dtype and row_scale.numel() in (1, x.shape[0]) and chunk_rows >= 1
        logits = x @ weight.T + (0 if bias is None else bias)
        lse = torch.logsumexp(logits, -1)
        valid = target != ignore_index
        tgt = torch.where(valid, target, 0)
        loss = torch.where(valid, lse - logits.gather(1, tgt[:, None])[:, 0], torch.zeros_like(lse))
        empty = x.new_empty(0)
        need_gb = need_gb and bias is not None
        if not (need_gx or need_gw or need_gb):
            return loss, empty, empty, empty
        sc = torch.where(valid, row_scale.expand(x.shape[0]), torch.zeros_like(lse))
        G = (torch.softmax(logits, -1) - F.one_hot(tgt, weight.shape[0]).to(x.dtype)) * sc[:, None]
        return (loss, G @ weight if need_gx else empty, G.T @ x if need_gw else empty,
                G.sum(0) if need_gb else empty)

    # ---- posterior rows (fastdiff/ops/_plan.py, FASTDIFF_SCHEMA_POSTERIOR)
    @staticmethod
    def _weights(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s, pair):
        V = logits.shape[1]
        z = logits.double() / temperature
        absorbing = kind in (_plan.KIND_ABSORBING, _plan.KIND_ABSORBING_PER_TOKEN)
        if absorbing:
            z[:, mask_id] = float("-inf")
        p = torch.softmax(z, -1)
        if absorbing:
            per_token = kind == _plan.KIND_ABSORBING_PER_TOKEN
            At = ab_table[t] if per_token else a_t[:, None].expand(-1, V)
            As = ab_table[s] if per_token else a_s[:, None].expand(-1, V)
            w = (As - At) * p
            w[:, mask_id] = (p * (1 - As)).sum(-1)
            keep = (x_t != mask_id) | (w.sum(-1) <= 0)
        elif kind == _plan.KIND_UNIFORM:
            r = torch.where(a_s > 0, a_t / a_s.clamp_min(1e-300), torch.zeros_like(a_s))[:, None]
            f = a_s[:, None] * p + (1 - a_s[:, None]) / V
            w = ((1 - r) / V + r * F.one_hot(x_t, V)) * f
            keep = w.sum(-1) <= 0
        else:
            assert kind == _plan.KIND_MATRIX, kind
            w = fact1 * torch.einsum("ni,nij->nj", p, qbar_s[pair])
            keep = w.sum(-1) <= 0
        one_hot = F.one_hot(x_t, V).double()
        return torch.where(keep[:, None], one_hot, w), keep

    def posterior(self, logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s, pair, sample,
                  seed, offset, row_offset):
        self.calls.append(("posterior", logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1,
                           qbar_s, pair, sample, seed, offset, row_offset))
        for v in (seed, offset, row_offset):  # the counter words arrive as int64 bits
            assert isinstance(v, int) and -(2**63) <= v < 2**63
        w, keep = self._weights(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s, pair)
        if not sample:
            out = w / w.sum(-1, keepdim=True)
            return out if logits.dtype == torch.float64 else out.float()
        rows = torch.arange(w.shape[0])
        u = R.row_uniforms(seed & U64, offset & U64, rows, start=row_offset & U64)
        out = draw_from_weights(w, u) if w.shape[0] else x_t.clone()
        return torch.where(keep, x_t, out)

    # ---- sample_categorical (FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL)
    def sample_categorical(self, logits, seed, offset, temperature, top_k, top_p, row_offset):
        self.calls.append(("sample_categorical", logits, seed, offset, temperature, top_k, top_p, row_offset))
        assert isinstance(top_k, int) and isinstance(top_p, float) and logits.ndim == 2
        return _sample_categorical(logits, seed=seed & U64, offset=offset & U64, temperature=temperature,
                                   top_k=top_k or None, top_p=None if top_p >= 1.0 else top_p,
                                   row_offset=row_offset & U64)


_GLUE_MODULES = ["fastdiff.ops.backends.cuda"] + [
    f"fastdiff.ops.backends.cuda.{k}" for k in ("nearest_embedding", "rounding_loss", "posterior", "sample_categorical")]


@pytest.fixture
def glue(monkeypatch):
    """The CUDA glue imported afresh over the stand-in module, and ``backend="cuda"`` routed to it for CPU
    tensors. Yields ``(the glue package, the stand-in)``; monkeypatch puts any real modules back afterwards."""
    fake = FakeCudaModule()
    monkeypatch.setitem(sys.modules, "fastdiff._C_cuda", fake)
    monkeypatch.setattr(fastdiff, "_C_cuda", fake, raising=False)
    for name in _GLUE_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(importlib.import_module("fastdiff.ops.backends"), "cuda", raising=False)
    pkg = importlib.import_module("fastdiff.ops.backends.cuda")
    for name in _GLUE_MODULES[1:]:
        importlib.import_module(name)
    monkeypatch.setattr(_backends, "cuda", lambda: _backends.Backend("cuda", pkg, ""))
    real_device_ok = _dispatch._device_ok
    monkeypatch.setattr(_dispatch, "_device_ok",
                        lambda backend, device: "" if backend == "cuda" else real_device_ok(backend, device))
    yield pkg, fake
    for name in _GLUE_MODULES:
        sys.modules.pop(name, None)
    if getattr(importlib.import_module("fastdiff.ops.backends"), "cuda", None) is pkg:
        delattr(importlib.import_module("fastdiff.ops.backends"), "cuda")


CUDA = {"backend": "cuda"}


def test_glue_exports_what_the_dispatcher_calls(glue):
    pkg, _ = glue
    entries = {"nearest_embedding": ["nearest_embedding"], "rounding_loss": ["rounding_loss_fwd", "rounding_loss_bwd"],
               "posterior": ["posterior"], "sample_categorical": ["sample_categorical"]}
    for kernel, names in entries.items():
        for name in names:
            assert callable(getattr(getattr(pkg, kernel), name)), (kernel, name)
    assert pkg.rounding_loss.GRADIENT_IN_FORWARD
    for op in ("nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample", "sample_categorical"):
        assert ops.explain(op)["cuda"] == "ok", op


def test_nearest_embedding_flattens_views_and_gathers(glue):
    _, fake = glue
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, generator=g).permute(1, 2, 0)  # (3, 5, 6), last dim strided
    w = torch.randn(9, 6, generator=g)
    for metric in ("l2", "cosine"):
        idx, snapped = ops.nearest_embedding(x, w, metric, **CUDA)
        ref_idx, ref_snapped = ops.nearest_embedding_ref(x, w, metric)
        assert torch.equal(idx, ref_idx) and torch.equal(snapped, ref_snapped)
        assert fake.calls[-1][3] == (metric == "cosine")
        assert fake.calls[-1][1].shape == (15, 6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_rounding_loss_autograd_wiring(glue, reduction, dtype, bias):
    _, fake = glue
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, generator=g).to(dtype).requires_grad_()
    w = torch.randn(11, 8, generator=g).to(dtype).requires_grad_()
    b = torch.randn(11, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, 11, (3, 4), generator=g)
    t[0, 1] = -100
    inputs = [x, w] + ([b] if bias else [])
    out = ops.rounding_loss(x, w, t, b, reduction, -100, **CUDA)
    ref = ops.rounding_loss_ref(x, w, t, b, reduction)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    go = torch.randn(out.shape, generator=g).to(out.dtype) if reduction == "none" else torch.tensor(2.5)
    grads = torch.autograd.grad(out, inputs, go)
    grads_ref = torch.autograd.grad(ref, inputs, go)
    for gk, gr in zip(grads, grads_ref):
        assert gk.dtype == gr.dtype and gk.shape == gr.shape
        torch.testing.assert_close(gk, gr, atol=tol * 10 if dtype != torch.bfloat16 else 2e-2, rtol=1e-2)
    forward_call = [c for c in fake.calls if c[0] == "rounding_loss"][0]
    in_forward = any(forward_call[7:10])
    assert in_forward == (reduction != "none"), "mean/sum: gradient in the forward pass; none: in the backward"
    if reduction == "none":
        back = [c for c in fake.calls if c[0] == "rounding_loss"][1]
        assert back[6] is not None and back[6].shape == (12,)  # the per-row output gradient
    else:
        assert forward_call[6].shape == (1,)  # one scale: 1 / max(count, 1) (mean) or 1 (sum)


def test_rounding_loss_without_grad_computes_no_gradient(glue):
    _, fake = glue
    x, w = torch.randn(5, 4), torch.randn(7, 4)
    t = torch.randint(0, 7, (5,))
    out = ops.rounding_loss(x, w, t, None, "mean", -100, **CUDA)
    torch.testing.assert_close(out, ops.rounding_loss_ref(x, w, t))
    assert not any(fake.calls[-1][7:10])
    x.requires_grad_()
    ops.rounding_loss(x, w, t, None, "sum", -100, **CUDA)
    assert fake.calls[-1][7:10] == (True, False, False)


def _processes(V):
    g = torch.Generator().manual_seed(V)
    return {
        "absorbing": D.Absorbing(V, 2, S.mutual_info(20)),
        "absorbing-spindle": D.Absorbing(V, V - 1, S.spindle(20, torch.randn(V, generator=g) * 0.3)),
        "uniform": D.Uniform(V, S.cosine(20)),
        "gaussian-band": D.GaussianBand(V, S.cosine(20), bandwidth=2),
    }


_KIND_OF = {"absorbing": _plan.KIND_ABSORBING, "absorbing-spindle": _plan.KIND_ABSORBING_PER_TOKEN,
            "uniform": _plan.KIND_UNIFORM, "gaussian-band": _plan.KIND_MATRIX}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posterior_ops_lower_every_process(glue, dtype):
    _, fake = glue
    V = 9
    g = torch.Generator().manual_seed(2)
    for name, process in _processes(V).items():
        logits = (torch.randn(4, 6, V, generator=g) * 2).to(dtype)
        xt = torch.randint(0, V, (4, 6), generator=g)
        if process.kind == "absorbing":
            xt[:, ::2] = process.mask_id
        t = torch.tensor([20, 11, 5, 2])
        out = ops.categorical_posterior(process, logits, xt, t, t // 2, 0.8, **CUDA)
        ref = ops.categorical_posterior_ref(process, logits, xt, t, t // 2, temperature=0.8)
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6, msg=name)
        call = fake.calls[-1]
        assert call[5] == _KIND_OF[name], name  # the ABI's kind code
        assert call[1].shape == (24, V) and call[1].dtype == dtype and call[2].dtype == torch.int64
        if name == "absorbing-spindle":
            assert call[10] is not None and call[8] is None
        elif name in ("absorbing", "uniform"):
            assert call[8] is not None and call[9] is not None and call[10] is None
        else:
            assert call[11] is not None and call[12] is not None and call[13] is not None
        tok = ops.posterior_sample(process, logits, xt, t, t // 2, seed=5, offset=9, temperature=0.8, **CUDA)
        want = ops.posterior_sample_ref(process, logits, xt, t, t // 2, seed=5, offset=9, temperature=0.8)
        assert torch.equal(tok, want), name
        assert fake.calls[-1][-3:] == (5, 9, 0)
        tok = ops.posterior_sample(process, logits, xt, t, t // 2, seed=2**64 - 1, offset=9, temperature=0.8,
                                   row_offset=77, **CUDA)
        want = ops.posterior_sample_ref(process, logits, xt, t, t // 2, seed=2**64 - 1, offset=9, temperature=0.8,
                                        row_offset=77)
        assert torch.equal(tok, want), name
        assert fake.calls[-1][-3:] == (-1, 9, 77)  # seeds as the int64 with their bits


def test_sample_categorical_maps_options_and_reshapes(glue):
    _, fake = glue
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 2, 30, generator=g).transpose(0, 1)  # (2, 7, 30) view
    for kw in (dict(top_k=None, top_p=None), dict(top_k=4, top_p=None), dict(top_k=None, top_p=0.7),
               dict(top_k=10, top_p=0.9)):
        out = ops.sample_categorical(logits, seed=2**64 - 1, offset=3, temperature=0.9, **kw, **CUDA)
        ref = ops.sample_categorical_ref(logits, seed=2**64 - 1, offset=3, temperature=0.9, **kw)
        assert out.shape == (2, 7) and torch.equal(out, ref), kw
        call = fake.calls[-1]
        assert call[2] == -1 and call[3] == 3  # seed and offset as int64 bits
        assert call[5] == (0 if kw["top_k"] is None else kw["top_k"])
        assert call[6] == (1.0 if kw["top_p"] is None else kw["top_p"])
        assert call[1].stride(-1) == 1
    out = ops.sample_categorical(logits, seed=4, offset=3, temperature=0.9, row_offset=2**40, **CUDA)
    ref = ops.sample_categorical_ref(logits, seed=4, offset=3, temperature=0.9, row_offset=2**40)
    assert torch.equal(out, ref) and fake.calls[-1][-1] == 2**40
