"""``select_tokens`` on the Triton backend: the launcher of ``kernels/select_tokens.py`` (one program per
candidate row: the value check, max / sums / top-2 in one pass, ``sample_categorical``'s draw, the score)
and the selection over ``(B, L)`` in torch; custom op ``fastdiff_triton::select_tokens`` (the schema of every
backend, ``FASTDIFF_SCHEMA_SELECT_TOKENS`` in ``csrc/schema.h``)."""

from __future__ import annotations

import torch
import triton.language as tl

from fastdiff.kernels.select_tokens import _select_tokens_kernel

from ...._checks import tracing
from ....errors import InputError
from ..._common import ALL_NEGINF_MSG, NAN_MSG, POSINF_MSG
from ...select_tokens import MODE_ALL, MODE_THRESHOLD, RULE_CODES, _select, select_tokens_fake
from . import _launch as _common
from . import use_ops
from .. import python_op

SCHEMA = ("(Tensor logits, Tensor candidates, Tensor? counter_rows, Tensor? k, Tensor? uniform, int rule, "
          "float temperature, int seed, int offset, float threshold, int mode, int exclude) "
          "-> (Tensor, Tensor, Tensor)")
CHECKS_VALUES = True  # the kernel checks the candidate rows' values (a status per row, raised below)
_MESSAGES = {4: NAN_MSG, 3: POSINF_MSG, 2: ALL_NEGINF_MSG}


def _select_tokens_fwd(logits: torch.Tensor, candidates: torch.Tensor, counter_rows: torch.Tensor | None,
                       k: torch.Tensor | None, uniform: torch.Tensor | None, rule: int, temperature: float, seed: int,
                       offset: int, threshold: float, mode: int, exclude: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher (``FASTDIFF_SCHEMA_SELECT_TOKENS``)."""
    B, L, V = logits.shape
    dev = logits.device
    pos = candidates.reshape(-1).nonzero().squeeze(1)
    M = pos.numel()
    tok_m = torch.empty(M, dtype=torch.int64, device=dev)
    key_m = torch.empty(M, dtype=torch.float64, device=dev)
    status = torch.zeros(M, dtype=torch.int32, device=dev)
    if M:
        row_off = (pos // L) * logits.stride(0) + (pos % L) * logits.stride(1)
        counters = counter_rows.reshape(-1)[pos].contiguous() if temperature > 0 else row_off
        seed_lo, seed_hi = _common.split_seed(seed)
        off_lo, off_hi = _common.split_seed(offset)
        f64 = logits.dtype == torch.float64
        BLOCK = _common.next_pow2(V, 16, _common.INTERPRET_BLOCK if _common.interpret() else 4096)
        _select_tokens_kernel[(M,)](
            logits, row_off, counters, tok_m, key_m, status, V, int(exclude), _common.f64_bits(temperature),
            seed_lo, seed_hi, off_lo, off_hi,
            GREEDY=temperature == 0, RULE=0 if rule == RULE_CODES["random"] else int(rule),
            XDT=tl.float64 if f64 else tl.float32, WDT=tl.float64 if f64 else tl.float32,
            BLOCK=BLOCK, num_warps=8 if BLOCK >= 2048 else 4,
        )
        worst = int(status.max())
        if worst and not tracing():
            raise InputError(f"logits: {_MESSAGES[worst]}")
        if rule == RULE_CODES["random"]:
            key_m = uniform.reshape(-1)[pos]
    tokens = torch.zeros(B * L, dtype=torch.int64, device=dev).index_copy_(0, pos, tok_m).reshape(B, L)
    key = torch.full((B * L,), float("-inf"), dtype=torch.float64, device=dev).index_copy_(0, pos, key_m)
    key = key.reshape(B, L)
    conf = torch.where(candidates, key.float(), torch.full_like(key, float("-inf"), dtype=torch.float32))
    sel = _select(key, candidates, k if mode not in (MODE_ALL, MODE_THRESHOLD) else None,
                  threshold if mode == MODE_THRESHOLD else None)
    return tokens, conf, sel


select_tokens_op = python_op("fastdiff_triton::select_tokens", _select_tokens_fwd, SCHEMA, select_tokens_fake)


def select_tokens(logits: torch.Tensor, candidates: torch.Tensor, counter_rows: torch.Tensor | None,
                  k: torch.Tensor | None, uniform: torch.Tensor | None, rule: int, temperature: float, seed: int,
                  offset: int, threshold: float, mode: int, exclude: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, confidence, selected)`` (``FASTDIFF_SCHEMA_SELECT_TOKENS``)."""
    fn = select_tokens_op if use_ops() else _select_tokens_fwd
    return tuple(fn(logits, candidates, counter_rows, k, uniform, rule, temperature, seed, offset, threshold, mode,
                    exclude))
