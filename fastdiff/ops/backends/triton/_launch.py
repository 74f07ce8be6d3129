"""Launch helpers of the Triton backend: configs, dtypes, the interpreter switch.

Configs: under ``TRITON_INTERPRET=1`` (CPU CI) and whenever ``FASTDIFF_TRITON_AUTOTUNE=0`` every
kernel runs one fixed config, so results never depend on a timing. On a GPU the GEMM-shaped kernels
autotune over a handful of configs keyed on the problem's shape class (see each launcher); the choice of
config changes only the order of float32 sums inside a tile, never the tie rule or the RNG stream.
"""

from __future__ import annotations

import os
import struct

import torch
import triton

# Programs per SM that a split-over-V launch aims for (GEMM kernels split the vocabulary across
# programs when there are too few row tiles to fill the GPU).
TARGET_WAVES = 2
# Row tile of the per-row kernels under the interpreter: small, so that CPU tests with V of a few
# hundred already cross tile boundaries (online max, CDF carried across tiles, early exit).
INTERPRET_BLOCK = 128


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """Autotuning runs only on a GPU, and not when ``FASTDIFF_TRITON_AUTOTUNE=0``."""
    return (not interpret()) and os.environ.get("FASTDIFF_TRITON_AUTOTUNE", "1") != "0"


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the split-merge code is exercised on CPU too


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (the references' rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 operands use TF32 only where torch's own matmuls would
    (``torch.backends.cuda.matmul.allow_tf32``), so a kernel is as exact as the reference it mirrors."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpret():
        return "tf32"
    return "ieee"


def upcast_for_dot(dtype: torch.dtype) -> bool:
    """Triton 3.8's interpreter computes bf16 ``tl.dot`` wrongly (numpy has no bf16); there the tiles
    are upcast to float32 first, which gives the same products (bf16 x bf16 is exact in float32)."""
    return interpret() and dtype == torch.bfloat16


def f64_bits(value: float) -> int:
    """A float passed to a kernel as its float64 bit pattern (Triton passes Python floats as float32);
    the kernel recovers it with ``.to(tl.float64, bitcast=True)``."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def split_seed(seed: int) -> tuple[int, int]:
    """The low and high 32-bit halves of a 64-bit counter word (a uint64, or the int64 with its bits)."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def next_pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(1, n)))
    return min(p, hi) if hi is not None else p
