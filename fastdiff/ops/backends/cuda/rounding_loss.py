"""``rounding_loss`` on the CUDA backend (``csrc/cuda/rounding_loss.cu`` and cuBLAS): the primitives of
:class:`fastdiff.ops.rounding_loss.RoundingLossFn`.

Row chunks of ``LOSS_CHUNK_ELEMENTS`` logits: cuBLAS (``at::mm``) for the chunk's logits, one kernel (a block
per row) for the online logsumexp, the loss and the softmax gradient in place, cuBLAS again for the chunk's
share of the gradients. The gradient is made in the forward pass (``GRADIENT_IN_FORWARD``); the backward of
``reduction="none"`` recomputes the chunks with the per-row output gradient. fp16/bf16 inputs are upcast to
fp32 first, as the reference computes.
"""

from __future__ import annotations

import torch

from ...rounding_loss import rounding_loss_fake
from . import _C, op, use_ops
from .. import register_fake

GRADIENT_IN_FORWARD = True
LOSS_CHUNK_ELEMENTS = 1 << 24  # logits elements per chunk (64 MiB in float32)

register_fake("fastdiff_cuda::rounding_loss", rounding_loss_fake)


def _chunk_rows(V: int) -> int:
    return max(1, LOSS_CHUNK_ELEMENTS // max(1, V))


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
            ignore_index: int, row_scale: torch.Tensor, need_gx: bool, need_gw: bool, need_gb: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = op("rounding_loss") if use_ops() else _C.rounding_loss
    return fn(x, weight, bias, target, ignore_index, row_scale, need_gx, need_gw, need_gb, _chunk_rows(weight.shape[0]))


def rounding_loss_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                      ignore_index: int, grad_scale: torch.Tensor | None, need_gx: bool, need_gw: bool, need_gb: bool
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                 tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per-row losses of ``x (..., D)``; with ``grad_scale`` also the gradients asked for (see
    :class:`~fastdiff.ops.rounding_loss.RoundingLossFn`). State: the inputs in the compute dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, x.shape[-1]).to(cdt).contiguous()
    w2 = weight.to(cdt).contiguous()
    b2 = None if bias is None else bias.to(cdt).contiguous()
    grad = grad_scale is not None
    scale = grad_scale if grad else torch.ones(1, dtype=cdt, device=x2.device)
    loss, gx, gw, gb = _kernel(x2, w2, b2, target, ignore_index, scale, grad and need_gx, grad and need_gw,
                               grad and need_gb)
    return loss, (gx, gw, gb), (x2, w2, b2)


def rounding_loss_bwd(state: tuple, target: torch.Tensor, ignore_index: int, row_grad: torch.Tensor, need_gx: bool,
                      need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``Σ_r row_grad[r]·loss_r``, recomputed chunk by chunk."""
    x2, w2, b2 = state
    _, gx, gw, gb = _kernel(x2, w2, b2, target, ignore_index, row_grad.contiguous(), need_gx, need_gw, need_gb)
    return gx, gw, gb
