"""The C++ CPU backend: op-level wrappers around the compiled ``fastdiff._C`` (``csrc/*.cpp``).

Importing this module imports ``fastdiff._C``; an ImportError here means the extension is not built
(``_backends.cpp()`` turns it into the reason). The functions below have the signatures the dispatcher
calls (:mod:`fastdiff.ops._dispatch`) and receive arguments the public ops have already checked.

* ``nearest_embedding``: the screen of :mod:`fastdiff.ops._nearest`: row blocks of ``BLOCK_ROWS`` vectors
  against vocabulary tiles of ``BLOCK_COLS`` rows; each tile's scores come from one BLAS GEMM into a
  per-thread buffer and are reduced by one fused "score, min" pass and a second-minimum pass, so the
  largest score buffer is ``threads × BLOCK_ROWS × BLOCK_COLS``.
* ``rounding_loss``: :class:`RoundingLossFn`, chunks of rows whose ``(rows, V)`` logits buffer is reused;
  the gradient is computed in the forward pass (mean / sum) and only scaled by the backward; for
  ``reduction="none"`` the backward recomputes the chunks with the per-row output gradient.
* ``categorical_posterior`` / ``posterior_sample``: the rows of a :class:`~fastdiff.ops._plan.PosteriorPlan`.
* ``sample_categorical``: temperature, top-k and top-p with the reference's tie-inclusive sets.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from . import _C
from .errors import InputError
from .ops import _nearest
from .ops._plan import posterior_plan

BLOCK_ROWS = 128  # nearest_embedding: vectors per row block
BLOCK_COLS = 1024  # nearest_embedding: vocabulary rows per score tile (128 × 1024 fp32 = 512 KiB)
LOSS_CHUNK_ELEMENTS = 1 << 24  # rounding_loss: logits elements per chunk (64 MiB in float32; 512 rows at
# V = 32768: smaller chunks leave MKL too little work per GEMM, 128 rows took 3x as long)
# The posterior and sample_categorical kernels check the logits for NaN / +inf / all -inf rows during their own pass and raise
# ops._common.check_finite_above's ValueError before returning, so the public ops skip that extra read
# pass for them (the ``checks_values`` attribute below).
CHECKS_VALUES = True

__all__ = ["nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample", "sample_categorical",
           "RoundingLossFn"]


@contextlib.contextmanager
def _value_check():
    """The kernels' in-kernel value check raises ValueError with check_finite_above's message; the public
    ops raise it as the same InputError the other backends raise."""
    try:
        yield
    except ValueError as e:
        raise InputError(str(e)) from None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nearest_screen(p: _nearest.Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _C.nearest_embedding(p.x, p.w, p.stat, p.metric, BLOCK_ROWS, BLOCK_COLS)


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (...) int64, snapped (..., D) weight dtype)``; see :func:`fastdiff.ops.nearest_embedding_ref`.
    The kernel is the screen of :mod:`fastdiff.ops._nearest`, which resolves the near-ties."""
    return _nearest.nearest(x, weight, metric, _nearest_screen)


def _loss_chunk_rows(V: int) -> int:
    return max(1, LOSS_CHUNK_ELEMENTS // max(1, V))


class RoundingLossFn(torch.autograd.Function):
    """Fused linear cross-entropy: loss of ``softmax(x·Wᵀ + b)`` at ``target`` with the gradient computed
    chunk by chunk in the forward pass (no ``N × V`` logits kept)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, ignore_index):
        cdt = _compute_dtype(x.dtype)
        D = x.shape[-1]
        x2 = x.detach().reshape(-1, D).to(cdt).contiguous()
        w2 = weight.detach().to(cdt).contiguous()
        b2 = None if bias is None else bias.detach().to(cdt).contiguous()
        t1 = target.reshape(-1).to(torch.int64).contiguous()
        valid = int((t1 != ignore_index).sum())
        want_grad = any(ctx.needs_input_grad[:3])
        if reduction == "mean":  # a mean over no valid target is 0 (sum / max(count, 1)), as the reference's
            scale = torch.tensor([1.0 / max(valid, 1)], dtype=cdt)
        else:
            scale = torch.ones(1, dtype=cdt)
        in_forward = want_grad and reduction != "none"
        loss_rows, gx, gw, gb = _C.rounding_loss_chunked(x2, w2, b2, t1, ignore_index, scale, in_forward,
                                                         _loss_chunk_rows(w2.shape[0]))
        ctx.reduction = reduction
        ctx.meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            if want_grad:
                ctx.save_for_backward(x2, w2, b2, t1)
            ctx.ignore_index = ignore_index
            return loss_rows.reshape(target.shape)
        if in_forward:
            ctx.save_for_backward(gx, gw, gb)
        total = loss_rows.sum(dtype=torch.float64)
        if reduction == "mean":
            total = total / max(valid, 1)
        return total.to(cdt)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        if ctx.reduction == "none":
            x2, w2, b2, t1 = ctx.saved_tensors
            scale = grad_out.reshape(-1).to(x2.dtype).contiguous()
            _, gx, gw, gb = _C.rounding_loss_chunked(x2, w2, b2, t1, ctx.ignore_index, scale, True,
                                                     _loss_chunk_rows(w2.shape[0]))
        else:
            gx, gw, gb = ctx.saved_tensors
            g = grad_out.to(gx.dtype)
            gx, gw = gx * g, gw * g
            gb = None if gb is None else gb * g
        gx = gx.reshape(x_shape).to(x_dtype) if ctx.needs_input_grad[0] else None
        gw = gw.to(w_dtype) if ctx.needs_input_grad[1] else None
        gb = gb.to(b_dtype) if (b_dtype is not None and ctx.needs_input_grad[2]) else None
        return gx, gw, gb, None, None, None


def rounding_loss(x, weight, target, bias, reduction, ignore_index) -> torch.Tensor:
    """Differentiable in ``x``, ``weight`` and ``bias``; see :func:`fastdiff.ops.rounding_loss_ref`."""
    return RoundingLossFn.apply(x, weight, bias, target, reduction, int(ignore_index))


def _posterior(process, x0_logits, x_t, tt, ss, temperature, sample, seed=0, offset=0, row_offset=0):
    plan = posterior_plan(process, x0_logits, x_t, tt, ss, temperature)
    with _value_check():
        return _C.posterior(plan.kind, plan.logits, plan.x_t, plan.t, plan.s, plan.temperature, plan.mask_id,
                            plan.a_t, plan.a_s, plan.ab_table, plan.fact1, plan.qbar_s, plan.pair, sample, seed,
                            offset, CHECKS_VALUES, row_offset)


def categorical_posterior(process, x0_logits, x_t, tt, ss, temperature) -> torch.Tensor:
    """``(..., V)`` float32 (float64 for float64 logits); see :func:`fastdiff.ops.categorical_posterior_ref`."""
    return _posterior(process, x0_logits, x_t, tt, ss, temperature, False).reshape(x0_logits.shape)


def posterior_sample(process, x0_logits, x_t, tt, ss, *, seed, offset, temperature, row_offset=0) -> torch.Tensor:
    """int64 ``(...)``; see :func:`fastdiff.ops.posterior_sample_ref`."""
    return _posterior(process, x0_logits, x_t, tt, ss, temperature, True, seed, offset,
                      row_offset).reshape(x_t.shape)


categorical_posterior.checks_values = CHECKS_VALUES
posterior_sample.checks_values = CHECKS_VALUES


def sample_categorical(logits, *, seed, offset, temperature, top_k, top_p, row_offset=0) -> torch.Tensor:
    """int64 ``(...)``; see :func:`fastdiff.ops.sample_categorical_ref`."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    k = 0 if top_k is None or top_k >= V else int(top_k)  # top_k >= V keeps everything (and may not fit int64)
    with _value_check():
        out = _C.sample_categorical(flat, seed, offset, float(temperature), k, 1.0 if top_p is None else float(top_p),
                                    row_offset)
    return out.reshape(logits.shape[:-1])


sample_categorical.checks_values = CHECKS_VALUES
