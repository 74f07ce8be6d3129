"""Pieces shared by the Triton kernels (``@triton.jit`` only): the counter-based row uniform of
:func:`fastdiff.random.row_uniforms` and the join of two 32-bit halves. Launch helpers (configs, dtypes, the
interpreter switch) live with the launchers in ``fastdiff/ops/backends/triton/``.
"""

from __future__ import annotations

import triton
import triton.language as tl

if not __name__.startswith("fastdiff.kernels."):  # see kernels/__init__.py
    raise ImportError(f"fastdiff's Triton kernels load as fastdiff.kernels, not as {__name__!r}: a second copy "
                      "would compile every kernel twice")


@triton.jit
def join64(lo, hi):
    """The int64 ``(hi << 32) | lo`` of two 32-bit halves (a row offset from :func:`split_seed`)."""
    return (hi.to(tl.int64) << 32) | lo.to(tl.int64)


@triton.jit
def row_uniform(row, seed_lo, seed_hi, off_lo, off_hi):
    """The float64 uniform of :func:`fastdiff.random.row_uniforms` for one row (int64 scalar):
    Philox4x32-10, key ``(seed_lo, seed_hi)``, counter ``(row_lo, row_hi, off_lo, off_hi)``,
    ``u = ((w0 >> 6)·2**26 + (w1 >> 6) + 0.5)·2**-52``."""
    seed = (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint64)
    c0 = (row & 0xFFFFFFFF).to(tl.uint32)
    c1 = (row >> 32).to(tl.uint32)
    w0, w1, _, _ = tl.philox(seed, c0, c1, off_lo.to(tl.uint32), off_hi.to(tl.uint32))
    k = (w0 >> 6).to(tl.int64) * 67108864 + (w1 >> 6).to(tl.int64)
    return (k.to(tl.float64) + 0.5) * 2.220446049250313e-16
