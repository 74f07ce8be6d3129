"""The CUDA backend: op-level wrappers around the compiled ``fastdiff._C_cuda`` (``csrc/cuda/``).

Importing this module imports ``fastdiff._C_cuda``; an ImportError here means the extension is not built
(``_backends.cuda()`` turns it into the reason and the build command). The functions below have the
signatures the dispatcher calls (:mod:`fastdiff.ops._dispatch`) and receive arguments the public ops
have already checked; they only flatten, lower and call the kernels.

* ``nearest_embedding``: the screen of :mod:`fastdiff.ops._nearest`: one tiled score GEMM per block of 64
  rows against 64-row vocabulary tiles, with the l2 / cosine score and the (min, second min, arg-min) fused
  into its epilogue; the vocabulary is split across blocks when there are few rows. No ``N × V`` buffer.
* ``rounding_loss``: :class:`RoundingLossFn`. Row chunks of ``LOSS_CHUNK_ELEMENTS`` logits: cuBLAS
  (``at::mm``) for the chunk's logits, a kernel for the online logsumexp, loss and softmax gradient in
  place, cuBLAS again for the chunk's share of the gradients. Mean / sum: the gradient is computed in the
  forward pass and only scaled by the backward; ``reduction="none"``: the backward recomputes the chunks
  with the per-row output gradient. The only logits buffer is one chunk.
* ``categorical_posterior`` / ``posterior_sample``: one block per row of a
  :class:`~fastdiff.ops._plan.PosteriorPlan`, float64 throughout, the draw by a block-wide CDF scan.
* ``sample_categorical``: temperature, then top-k and top-p by radix threshold searches on the order
  keys of the scaled logits / weights (no sort), with the reference's tie-inclusive sets.
"""

from __future__ import annotations

import torch

from . import _C_cuda as _C
from .ops import _nearest
from .ops._plan import posterior_plan

LOSS_CHUNK_ELEMENTS = 1 << 24  # rounding_loss: logits elements per chunk (64 MiB in float32)
_KIND_CODES = {"absorbing": 0, "uniform": 1, "matrix": 2}

__all__ = ["nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample", "sample_categorical",
           "RoundingLossFn"]


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t.reshape(-1, width)`` with a contiguous last dimension (a copy only when it is strided)."""
    flat = t.reshape(-1, width)
    return flat if flat.stride(-1) == 1 or width == 1 else flat.contiguous()


def _nearest_screen(p: _nearest.Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = p.x.shape[1]
    flat = _rows(p.x, D)
    w = p.w if p.w.stride(-1) == 1 or D == 1 else p.w.contiguous()
    return _C.nearest_embedding(flat, w, p.stat, p.metric == "cosine")


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (...) int64, snapped (..., D) weight dtype)``; see :func:`fastdiff.ops.nearest_embedding_ref`.
    The kernel is the screen of :mod:`fastdiff.ops._nearest`, which resolves the near-ties."""
    return _nearest.nearest(x, weight, metric, _nearest_screen)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class RoundingLossFn(torch.autograd.Function):
    """Fused linear cross-entropy on CUDA: ``-log softmax(x·Wᵀ + b)[target]`` with the gradient computed
    chunk by chunk in the forward pass (mean / sum), never keeping ``N × V`` logits."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, ignore_index):
        cdt = _compute_dtype(x.dtype)
        D = x.shape[-1]
        x2 = x.detach().reshape(-1, D).to(cdt).contiguous()
        w2 = weight.detach().to(cdt).contiguous()
        b2 = None if bias is None else bias.detach().to(cdt).contiguous()
        t1 = target.reshape(-1).to(torch.int64).contiguous()
        need = tuple(ctx.needs_input_grad[:3])
        need = (need[0], need[1], need[2] and bias is not None)
        in_forward = any(need) and reduction != "none"
        valid = int((t1 != ignore_index).sum()) if reduction == "mean" else 0
        # mean over zero valid targets is 0 with zero gradients (sum / max(count, 1)), as the reference's.
        scale = 1.0 / max(valid, 1) if reduction == "mean" else 1.0
        loss_rows, gx, gw, gb = _C.rounding_loss(
            x2, w2, b2, t1, ignore_index, scale, None,
            in_forward and need[0], in_forward and need[1], in_forward and need[2], LOSS_CHUNK_ELEMENTS)
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.need = need
        ctx.meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            if any(need):
                ctx.save_for_backward(x2, w2, b2, t1)
            return loss_rows.reshape(target.shape)
        if in_forward:
            ctx.save_for_backward(gx, gw, gb)
        total = loss_rows.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        if ctx.reduction == "none":
            x2, w2, b2, t1 = ctx.saved_tensors
            g = grad_out.reshape(-1).to(x2.dtype).contiguous()
            _, gx, gw, gb = _C.rounding_loss(x2, w2, b2, t1, ctx.ignore_index, 1.0, g, *ctx.need,
                                             LOSS_CHUNK_ELEMENTS)
        else:
            gx, gw, gb = ctx.saved_tensors
            g = grad_out.to(gx.dtype if gx is not None else gw.dtype if gw is not None else gb.dtype)
            gx = None if gx is None else gx * g
            gw = None if gw is None else gw * g
            gb = None if gb is None else gb * g
        gx = None if gx is None else gx.reshape(x_shape).to(x_dtype)
        gw = None if gw is None else gw.to(w_dtype)
        gb = None if gb is None else gb.to(b_dtype)
        return gx, gw, gb, None, None, None


def rounding_loss(x, weight, target, bias, reduction, ignore_index) -> torch.Tensor:
    """See :func:`fastdiff.ops.rounding_loss_ref`; ``reduction="none"`` returns ``target``'s shape."""
    return RoundingLossFn.apply(x, weight, bias, target, reduction, ignore_index)


def _plan_args(plan) -> tuple:
    return (_KIND_CODES[plan.kind], plan.logits, plan.x_t, plan.t, plan.s, plan.temperature, plan.mask_id,
            plan.a_t, plan.a_s, plan.ab_table, plan.fact1, plan.qbar_s, plan.pair)


def categorical_posterior(process, x0_logits, x_t, tt, ss, temperature) -> torch.Tensor:
    """``(..., V)`` posterior probabilities, float32 (float64 for float64 logits)."""
    plan = posterior_plan(process, x0_logits, x_t, tt, ss, temperature)
    return _C.categorical_posterior(*_plan_args(plan)).reshape(x0_logits.shape)


def posterior_sample(process, x0_logits, x_t, tt, ss, *, seed, offset, temperature, row_offset=0) -> torch.Tensor:
    """int64 ``x_t.shape``: row ``r`` drawn with the uniform of Philox counter ``(row_offset + r, offset)``."""
    plan = posterior_plan(process, x0_logits, x_t, tt, ss, temperature)
    return _C.posterior_sample(*_plan_args(plan), int(seed), int(offset), int(row_offset)).reshape(x_t.shape)


def sample_categorical(logits, *, seed, offset, temperature, top_k, top_p, row_offset=0) -> torch.Tensor:
    """int64 ``logits.shape[:-1]``; ``top_k=None`` / ``top_p=None`` switch the filters off."""
    V = logits.shape[-1]
    flat = _rows(logits, V)
    out = _C.sample_categorical(flat, float(temperature), 0 if top_k is None else int(top_k),
                                1.0 if top_p is None else float(top_p), int(seed), int(offset), int(row_offset))
    return out.reshape(logits.shape[:-1])
