"""The CUDA backend's Python glue (fastdiff._cuda), on CPU.

The compiled module is replaced by a pure-PyTorch implementation of its documented contract
(csrc/cuda/launchers.h, binding.cpp): the plan's row formulas, the rounding-loss chunk contract (per-row
losses and the gradients of ``sum_r scale·row_scale[r]·loss_r``), the draw rule. Through it these tests
check what the glue adds: flattening and strides, the lowering of each process to plan arrays, the
autograd wiring (gradient in the forward pass for mean/sum, recomputed with the output gradient for
"none"), reshaping, and the mapping of ``top_k=None`` / ``top_p=None``. The kernels themselves are
tested on a GPU (tests/test_cuda.py) and compile-checked by tests/test_cuda_compile.py.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import discrete as D
from fastdiff import ops
from fastdiff import random as R
from fastdiff import schedules as S
from fastdiff.ops._common import draw_from_weights
from fastdiff.ops.sample_categorical import _sample_categorical

KINDS = {0: "absorbing", 1: "uniform", 2: "matrix"}


class FakeCudaModule(types.SimpleNamespace):
    """The binding's contract in PyTorch, with argument checks like the binding's and a call log."""

    def __init__(self):
        super().__init__(calls=[])

    # ---- nearest_embedding
    def nearest_embedding(self, x, weight, stat, cosine):
        """The screen: (index of a minimum, minimum, second smallest score) per row."""
        self.calls.append(("nearest_embedding", x, weight, cosine))
        assert x.ndim == 2 and (x.shape[1] <= 1 or x.stride(1) == 1)
        assert weight.ndim == 2 and (weight.shape[1] <= 1 or weight.stride(1) == 1)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        assert stat.dtype == cdt and stat.shape == (weight.shape[0],) and stat.is_contiguous()
        g = x.to(cdt) @ weight.to(cdt).T
        score = -(g * stat) if cosine else stat - 2 * g
        srt = score.sort(dim=1).values
        second = srt[:, 1] if score.shape[1] > 1 else torch.full_like(srt[:, 0], float("inf"))
        return score.argmin(dim=1), srt[:, 0], second

    # ---- rounding_loss
    def rounding_loss(self, x, weight, bias, target, ignore_index, scale, row_scale, need_gx, need_gw, need_gb,
                      chunk_elements):
        self.calls.append(("rounding_loss", x, weight, bias, target, ignore_index, scale, row_scale,
                           need_gx, need_gw, need_gb))
        assert x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype and x.is_contiguous()
        assert target.dtype == torch.int64 and target.shape == (x.shape[0],)
        logits = x @ weight.T + (0 if bias is None else bias)
        lse = torch.logsumexp(logits, -1)
        valid = target != ignore_index
        tgt = torch.where(valid, target, 0)
        loss = torch.where(valid, lse - logits.gather(1, tgt[:, None])[:, 0], torch.zeros_like(lse))
        if not (need_gx or need_gw or need_gb):
            return loss, None, None, None
        rs = torch.ones_like(lse) if row_scale is None else row_scale
        sc = torch.where(valid, scale * rs, torch.zeros_like(rs))
        G = (torch.softmax(logits, -1) - F.one_hot(tgt, weight.shape[0]).to(x.dtype)) * sc[:, None]
        return (loss, G @ weight if need_gx else None, G.T @ x if need_gw else None,
                G.sum(0) if need_gb else None)

    # ---- posterior rows (fastdiff/ops/_plan.py)
    @staticmethod
    def _weights(kind, logits, x_t, t, s, temperature, mask_id, a_t, a_s, ab_table, fact1, qbar_s, pair):
        kind = KINDS[kind]
        V = logits.shape[1]
        z = logits.double() / temperature
        if kind == "absorbing":
            z[:, mask_id] = float("-inf")
        p = torch.softmax(z, -1)
        if kind == "absorbing":
            At = ab_table[t] if ab_table is not None else a_t[:, None].expand(-1, V)
            As = ab_table[s] if ab_table is not None else a_s[:, None].expand(-1, V)
            w = (As - At) * p
            w[:, mask_id] = (p * (1 - As)).sum(-1)
            keep = (x_t != mask_id) | (w.sum(-1) <= 0)
        elif kind == "uniform":
            r = torch.where(a_s > 0, a_t / a_s.clamp_min(1e-300), torch.zeros_like(a_s))[:, None]
            f = a_s[:, None] * p + (1 - a_s[:, None]) / V
            w = ((1 - r) / V + r * F.one_hot(x_t, V)) * f
            keep = w.sum(-1) <= 0
        else:
            w = fact1 * torch.einsum("ni,nij->nj", p, qbar_s[pair])
            keep = w.sum(-1) <= 0
        one_hot = F.one_hot(x_t, V).double()
        return torch.where(keep[:, None], one_hot, w), keep

    def categorical_posterior(self, *args):
        self.calls.append(("categorical_posterior", *args))
        w, _ = self._weights(*args)
        out = w / w.sum(-1, keepdim=True)
        return out if args[1].dtype == torch.float64 else out.float()

    def posterior_sample(self, *args):
        self.calls.append(("posterior_sample", *args))
        *plan, seed, offset, row_offset = args
        w, keep = self._weights(*plan)
        rows = torch.arange(w.shape[0])
        out = draw_from_weights(w, R.row_uniforms(seed, offset, rows, start=row_offset)) if w.shape[0] else plan[2].clone()
        return torch.where(keep, plan[2], out)

    # ---- sample_categorical
    def sample_categorical(self, logits, temperature, top_k, top_p, seed, offset, row_offset):
        self.calls.append(("sample_categorical", logits, temperature, top_k, top_p, seed, offset, row_offset))
        assert isinstance(top_k, int) and isinstance(top_p, float) and logits.ndim == 2
        return _sample_categorical(logits, seed=seed, offset=offset, temperature=temperature,
                                   top_k=top_k or None, top_p=None if top_p >= 1.0 else top_p,
                                   row_offset=row_offset)


@pytest.fixture
def glue(monkeypatch):
    fake = FakeCudaModule()
    monkeypatch.setitem(sys.modules, "fastdiff._C_cuda", fake)
    monkeypatch.setattr(fastdiff, "_C_cuda", fake, raising=False)
    # Import a fresh glue module over the fake; monkeypatch puts back any real one afterwards.
    monkeypatch.delitem(sys.modules, "fastdiff._cuda", raising=False)
    monkeypatch.delattr(fastdiff, "_cuda", raising=False)
    mod = importlib.import_module("fastdiff._cuda")
    yield mod, fake
    sys.modules.pop("fastdiff._cuda", None)
    if getattr(fastdiff, "_cuda", None) is mod:
        delattr(fastdiff, "_cuda")


def test_glue_exports_what_the_dispatcher_calls(glue):
    mod, _ = glue
    for op in ("nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample",
               "sample_categorical"):
        assert callable(getattr(mod, op)), op


def test_nearest_embedding_flattens_views_and_gathers(glue):
    mod, fake = glue
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, generator=g).permute(1, 2, 0)  # (3, 5, 6), last dim strided
    w = torch.randn(9, 6, generator=g)
    for metric in ("l2", "cosine"):
        idx, snapped = mod.nearest_embedding(x, w, metric)
        ref_idx, ref_snapped = ops.nearest_embedding_ref(x, w, metric)
        assert torch.equal(idx, ref_idx) and torch.equal(snapped, ref_snapped)
        assert fake.calls[-1][3] == (metric == "cosine")
        assert fake.calls[-1][1].shape == (15, 6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_rounding_loss_autograd_wiring(glue, reduction, dtype, bias):
    mod, fake = glue
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, generator=g).to(dtype).requires_grad_()
    w = torch.randn(11, 8, generator=g).to(dtype).requires_grad_()
    b = torch.randn(11, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, 11, (3, 4), generator=g)
    t[0, 1] = -100
    inputs = [x, w] + ([b] if bias else [])
    out = mod.rounding_loss(x, w, t, b, reduction, -100)
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
    in_forward = any(forward_call[8:11])
    assert in_forward == (reduction != "none"), "mean/sum: gradient in the forward pass; none: in the backward"
    if reduction == "none":
        back = [c for c in fake.calls if c[0] == "rounding_loss"][1]
        assert back[7] is not None and back[7].shape == (12,)  # the per-row output gradient


def test_rounding_loss_without_grad_computes_no_gradient(glue):
    mod, fake = glue
    x, w = torch.randn(5, 4), torch.randn(7, 4)
    t = torch.randint(0, 7, (5,))
    out = mod.rounding_loss(x, w, t, None, "mean", -100)
    torch.testing.assert_close(out, ops.rounding_loss_ref(x, w, t))
    assert not any(fake.calls[-1][8:11])
    x.requires_grad_()
    mod.rounding_loss(x, w, t, None, "sum", -100)
    assert fake.calls[-1][8:11] == (True, False, False)


def _processes(V):
    g = torch.Generator().manual_seed(V)
    return {
        "absorbing": D.Absorbing(V, 2, S.mutual_info(20)),
        "absorbing-spindle": D.Absorbing(V, V - 1, S.spindle(20, torch.randn(V, generator=g) * 0.3)),
        "uniform": D.Uniform(V, S.cosine(20)),
        "gaussian-band": D.GaussianBand(V, S.cosine(20), bandwidth=2),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posterior_ops_lower_every_process(glue, dtype):
    mod, fake = glue
    V = 9
    g = torch.Generator().manual_seed(2)
    for name, process in _processes(V).items():
        logits = (torch.randn(4, 6, V, generator=g) * 2).to(dtype)
        xt = torch.randint(0, V, (4, 6), generator=g)
        if process.kind == "absorbing":
            xt[:, ::2] = process.mask_id
        t = torch.tensor([20, 11, 5, 2])
        tt = t[:, None].expand(4, 6)
        ss = (t // 2)[:, None].expand(4, 6)
        out = mod.categorical_posterior(process, logits, xt, tt, ss, 0.8)
        ref = ops.categorical_posterior_ref(process, logits, xt, t, t // 2, temperature=0.8)
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6, msg=name)
        call = fake.calls[-1]
        kind = KINDS[call[1]]
        assert kind == process.kind, name
        assert call[2].shape == (24, V) and call[3].dtype == torch.int64
        if name == "absorbing-spindle":
            assert call[10] is not None and call[8] is None
        elif kind in ("absorbing", "uniform"):
            assert call[8] is not None and call[9] is not None and call[10] is None
        else:
            assert call[11] is not None and call[12] is not None and call[13] is not None
        tok = mod.posterior_sample(process, logits, xt, tt, ss, seed=5, offset=9, temperature=0.8)
        want = ops.posterior_sample_ref(process, logits, xt, t, t // 2, seed=5, offset=9, temperature=0.8)
        assert torch.equal(tok, want), name
        assert fake.calls[-1][-3:] == (5, 9, 0)
        tok = mod.posterior_sample(process, logits, xt, tt, ss, seed=5, offset=9, temperature=0.8, row_offset=77)
        want = ops.posterior_sample_ref(process, logits, xt, t, t // 2, seed=5, offset=9, temperature=0.8,
                                        row_offset=77)
        assert torch.equal(tok, want), name
        assert fake.calls[-1][-3:] == (5, 9, 77)


def test_sample_categorical_maps_options_and_reshapes(glue):
    mod, fake = glue
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 2, 30, generator=g).transpose(0, 1)  # (2, 7, 30) view
    for kw in (dict(top_k=None, top_p=None), dict(top_k=4, top_p=None), dict(top_k=None, top_p=0.7),
               dict(top_k=10, top_p=0.9)):
        out = mod.sample_categorical(logits, seed=2**64 - 1, offset=3, temperature=0.9, **kw)
        ref = ops.sample_categorical_ref(logits, seed=2**64 - 1, offset=3, temperature=0.9, **kw)
        assert out.shape == (2, 7) and torch.equal(out, ref), kw
        call = fake.calls[-1]
        assert call[3] == (0 if kw["top_k"] is None else kw["top_k"])
        assert call[4] == (1.0 if kw["top_p"] is None else kw["top_p"])
        assert call[1].stride(-1) == 1
    out = mod.sample_categorical(logits, seed=4, offset=3, temperature=0.9, top_k=None, top_p=None, row_offset=2**40)
    ref = ops.sample_categorical_ref(logits, seed=4, offset=3, temperature=0.9, row_offset=2**40)
    assert torch.equal(out, ref) and fake.calls[-1][-1] == 2**40
