"""``sample_categorical`` on the Triton backend: the launcher of ``kernels/sample_categorical.py`` (one program
per row; temperature, tie-inclusive top-k by exact threshold bisection, top-p by an exact 32-way threshold
search that sorts a copy of its bracket once it holds at most ``top_p_cap(V)`` categories, the reference's
counter-based inverse-CDF draw) and its custom op ``fastdiff_triton::sample_categorical``
(the schema of every backend, ``FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL`` in ``csrc/schema.h``)."""

from __future__ import annotations

import torch
import triton.language as tl

from fastdiff.kernels.sample_categorical import _sample_categorical_fwd_kernel

from ...sample_categorical import sample_categorical_fake
from . import _launch as _common
from . import use_ops
from .. import python_op

# top-p search: sub-ranges per pass, and the categories per [tile, sub-range] comparison block
TOPP_SPLIT = 32
TOPP_TILE = 256
# top-p: a search bracket of at most this many categories (a power of 2; at most the row's length rounded up to
# one) is copied to a per-row float64 scratch during its pass and settled by sorting the copy, without another
# pass over the row; the scratch, (N, cap) float64, is allocated only for top-p launches
TOPP_CAP = 4096
# top-p launches cover at most this many bytes of scratch each (64 MiB: 2048 rows at the full capacity); more rows
# are launched in chunks that reuse it, so the scratch does not grow with the batch
TOPP_SCRATCH_BYTES = 64 << 20


def top_p_cap(V: int) -> int:
    """The compaction capacity of a top-p launch on rows of ``V`` categories."""
    return min(TOPP_CAP, _common.next_pow2(V))


def guess_tile(block: int) -> int:
    """Categories per tile of the top-p guess pass ([tile, 2 * TOPP_SPLIT] comparisons): the search's tile on 8
    warps, half of it on 4 (no register spills on sm_90, see tests/ops/test_sample_categorical.py)."""
    return min(block, TOPP_TILE) if block >= 2048 else max(1, min(block, TOPP_TILE) // 2)

SCHEMA = "(Tensor logits, int seed, int offset, float temperature, int top_k, float top_p, int row_offset) -> Tensor"


def _sample_categorical_fwd(logits: torch.Tensor, seed: int, offset: int, temperature: float, top_k: int, top_p: float,
                            row_offset: int, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher (``FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL``): ``logits: (N, V)`` with unit column stride -> tokens
    ``(N,)`` int64. ``top_k = 0`` and ``top_p = 1.0`` mean no filter. The kernel takes the 64-bit counter
    words as 32-bit halves. ``stats`` (int64 ``(N, 3)``, top-p only; tests and pass counts): per row the top-p
    search's passes over the row, the bits of the smallest kept weight and of the kept total."""
    N, V = logits.shape
    tokens = torch.empty(N, dtype=torch.int64, device=logits.device)
    if N == 0:
        return tokens
    seed_lo, seed_hi = _common.split_seed(seed)
    off_lo, off_hi = _common.split_seed(offset)
    f64 = logits.dtype == torch.float64
    has_topk = 0 < top_k < V
    has_topp = top_p < 1.0
    cap = top_p_cap(V)
    rows = N
    scratch = tokens  # (not read without top-p)
    if has_topp and temperature != 0:
        rows = max(1, min(N, TOPP_SCRATCH_BYTES // (cap * 8)))
        scratch = torch.empty(rows, cap, dtype=torch.float64, device=logits.device)
    BLOCK = _common.next_pow2(V, 16, _common.INTERPRET_BLOCK if _common.interpret() else 4096)
    for r0 in range(0, N, rows):  # one launch unless top-p's scratch would exceed TOPP_SCRATCH_BYTES
        r1 = min(N, r0 + rows)
        row_lo, row_hi = _common.split_seed(row_offset + r0)  # the counter rows of the whole call
        out = tokens[r0:r1]
        _sample_categorical_fwd_kernel[(r1 - r0,)](
            logits[r0:r1], logits.stride(0), out, V, _common.f64_bits(temperature), int(top_k),
            _common.f64_bits(top_p), seed_lo, seed_hi, off_lo, off_hi, row_lo, row_hi,
            out if stats is None else stats[r0:r1], scratch,
            GREEDY=temperature == 0, HAS_TOPK=has_topk, HAS_TOPP=has_topp,
            XDT=tl.float64 if f64 else tl.float32, WDT=tl.float64 if (f64 or has_topp) else tl.float32,
            KEY=tl.int64 if f64 else tl.int32, SIGN_OFF=0x7FFFFFFFFFFFFFFF if f64 else 0x7FFFFFFF,
            BLOCK=BLOCK, KSPLIT=TOPP_SPLIT, SBLOCK=min(BLOCK, TOPP_TILE), STATS=stats is not None and has_topp,
            CAP=cap, GBLOCK=guess_tile(BLOCK),
            num_warps=8 if BLOCK >= 2048 else 4,
        )
    return tokens


sample_categorical_op = python_op("fastdiff_triton::sample_categorical", _sample_categorical_fwd, SCHEMA,
                                  sample_categorical_fake)


def sample_categorical(logits: torch.Tensor, seed: int, offset: int, temperature: float, top_k: int, top_p: float,
                       row_offset: int) -> torch.Tensor:
    """``(N,)`` int64 tokens of ``(N, V)`` logits (``FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL``)."""
    fn = sample_categorical_op if use_ops() else _sample_categorical_fwd
    return fn(logits, seed, offset, temperature, top_k, top_p, row_offset)
