"""Counter-based RNG: Philox4x32-10 known-answer vectors, Triton's convention, uniform quality."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from scipy import stats

from fastdiff import random as R
from tests import _oracles as O

# Known-answer tests of Random123 (kat_vectors, philox4x32_10): (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    seed = key[0] | (key[1] << 32)
    out = R.philox4x32(seed, *[torch.tensor([c]) for c in ctr])
    assert tuple(int(o) for o in out) == expected


def test_philox_matches_scalar_implementation_on_random_counters():
    g = torch.Generator().manual_seed(1)
    ctr = torch.randint(0, 2**32, (4, 200), generator=g, dtype=torch.int64)
    for seed in (0, 1, 2**63 + 12345, 2**64 - 1):
        out = torch.stack(R.philox4x32(seed, *ctr))
        for j in range(0, 200, 17):
            assert tuple(out[:, j].tolist()) == O.philox(seed, tuple(ctr[:, j].tolist()))


def test_row_uniforms_use_documented_counter():
    seed, offset = 0xDEADBEEF12345678, (7 << 32) | 99
    rows = torch.tensor([0, 1, 5, 2**33 + 3])
    u = R.row_uniforms(seed, offset, rows)
    for r, val in zip(rows.tolist(), u.tolist()):
        w = O.philox(seed, (r & 0xFFFFFFFF, r >> 32, offset & 0xFFFFFFFF, offset >> 32))
        k = (w[0] >> 6) * 2**26 + (w[1] >> 6)
        assert val == (k + 0.5) / 2**52


def test_uniform_open_interval_extremes():
    zero = torch.tensor([0])
    top = torch.tensor([0xFFFFFFFF])
    lo = R.uniform_from_words(zero, zero).item()
    hi = R.uniform_from_words(top, top).item()
    assert 0.0 < lo < 1e-15 and 1.0 - 1e-15 < hi < 1.0
    assert lo == 2.0**-53 and hi == 1.0 - 2.0**-53
    assert math.isfinite(math.log(lo)) and math.isfinite(math.log1p(-hi))


def test_uniform_distribution_and_independence():
    u = R.uniform((200_000,), seed=3)
    assert u.dtype == torch.float64
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4
    # Neighbouring counters are uncorrelated.
    r = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(u.numel())


def test_randn_moments_and_normality():
    z = R.randn((100_000,), seed=11, offset=4)
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def test_same_seed_same_draws_and_streams_differ():
    a = R.uniform((1000,), seed=5, offset=1)
    b = R.uniform((1000,), seed=5, offset=1)
    c = R.uniform((1000,), seed=5, offset=2)
    d = R.uniform((1000,), seed=6, offset=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "1", True])
def test_bad_seed(bad):
    with pytest.raises((ValueError, TypeError), match="seed"):
        R.uniform((3,), seed=bad)


@pytest.mark.parametrize("bad", [-1, 2**64, 0.5])
def test_bad_offset(bad):
    with pytest.raises((ValueError, TypeError), match="offset"):
        R.uniform((3,), seed=0, offset=bad)


TRITON_CHECK = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
from fastdiff.random import philox4x32

@triton.jit
def _words(out_ptr, seed, N: tl.constexpr):
    offs = tl.arange(0, N)
    a, b, c, d = tl.randint4x(seed, offs)
    tl.store(out_ptr + offs * 4, a.to(tl.int64))
    tl.store(out_ptr + offs * 4 + 1, b.to(tl.int64))
    tl.store(out_ptr + offs * 4 + 2, c.to(tl.int64))
    tl.store(out_ptr + offs * 4 + 3, d.to(tl.int64))

for seed in (0, 12345, 0x1234567890ABCDEF):
    out = torch.zeros(64 * 4, dtype=torch.int64)
    _words[(1,)](out, seed, 64)
    ref = torch.stack(philox4x32(seed, torch.arange(64)), -1).reshape(-1)
    assert torch.equal(out & 0xFFFFFFFF, ref), seed
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="optional cross-check: triton not installed (CI installs it)")
def test_matches_triton_randint4x_convention():
    """Row r, offset 0 is exactly Triton's tl.randint4x(seed, r) (run in the CPU interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_native_philox_words_equal_the_pytorch_rounds():
    """uniform/randn take their words from the C++ extension when it is built: the same integers."""
    native = R._native_words()
    if native is None:
        pytest.skip("the C++ extension is not built (FASTDIFF_SKIP_EXT)")
    for seed, offset, n in [(0, 0, 1), (2**64 - 1, 2**64 - 1, 1000), (12345, 2**40 + 3, 4097)]:
        got = native(seed, offset, n)
        idx = torch.arange(n, dtype=torch.int64)
        want = R.philox4x32(seed, idx & 0xFFFFFFFF, idx >> 32, offset & 0xFFFFFFFF, offset >> 32)
        assert torch.equal(got, torch.stack(want, 1))


def test_cpp_row_uniform_is_the_reference_philox():
    """The C++ kernels' row uniform (csrc/cpu_common.h, bound as fastdiff._C.row_uniform) is fastdiff.random's
    and the independent oracle's, bit for bit, at rows and offsets past 2**32 and seeds up to 2**64 - 1."""
    from fastdiff import _backends

    if not _backends.cpp().available and os.environ.get("FASTDIFF_SKIP_EXT", "") not in ("", "0"):
        pytest.skip("FASTDIFF_SKIP_EXT is set: the C++ extension was not built on purpose")
    from fastdiff import _C

    rows = torch.tensor([0, 1, 2, 97, 2**32 - 1, 2**32, 2**40 + 5], dtype=torch.int64)
    for seed, offset in [(0, 0), (2**64 - 1, 3), (123456789, 2**63 + 11)]:
        want = R.row_uniforms(seed, offset, rows)
        got = torch.tensor([_C.row_uniform(seed, offset, int(r)) for r in rows], dtype=torch.float64)
        assert torch.equal(got, want)
        assert _C.row_uniform(seed, offset, 5) == O.row_uniform(seed, offset, 5)
