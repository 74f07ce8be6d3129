"""A NumPy model of the CUDA sampler's top-p search (csrc/cuda/sample_categorical.cu, ``topp_search``), and the
passes over the row it takes on the benchmark's rows (issue 16: top-p within 2x of the plain draw).

    PYTHONPATH=$PWD python scripts/cuda_topp_passes.py [--rows 64] [--vocab 32768 50257] [--top-p 0.9 0.5]

The figures are from this model, not from a GPU: the kernel's search is mirrored decision for decision (the
digit of every key, the crossing rule, when it stops, when it compacts), only its float64 sums are added in
another order (the kernel adds the lanes of a warp in lane order and the warps in warp order). Rows are the
benchmark's (``benchmarks/benchmark_sample_categorical.py``): ``x`` standard normal times 2, ``normal`` = x,
``flat`` = x / 20, ``peaked`` = 4 x, and ``normal-bf16`` (x rounded to bfloat16: ties everywhere).

The search, over the uint64 bit patterns ("keys", monotone for w >= 0) of the weights w = exp(z - max z) in
[0, 1], finds the smallest present key kappa with mass(w > kappa) < top_p * W, ties kept whole:

* level 0 (one pass, which also gives W: its bins' masses add up to it): 255 equal key ranges over
  [lo, key(1.0)], ``lo`` the key of max(exp(min z - max z), (1 - top_p) / (2 V)) (below the second bound lies
  less than (1 - top_p) of the mass, so the crossing is above it), and bin 0 for every positive key below
  ``lo`` (taken only if rounding or the bound's slack puts the crossing there; then the generic levels go on);
* generic levels (one pass each): the candidates' key range [lo, hi] in 256 equal ranges of 2**s keys;
* after each level the crossing bin (the highest where mass above + its mass >= target) is taken; the search
  ends when it holds one element or one key (the range, narrowed to the level's smallest and largest
  candidate key, is one key); else, when it holds at most ``CAP`` elements, one pass copies them into shared
  memory, where a sort and a scan finish the threshold exactly; else another level.
* the kept total is the mass above the final bin plus the kept part of it: no pass of its own.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

NBINS = 256
CAP = 2048  # candidates the kernel can finish in shared memory (the histogram's 8 x 256 doubles, reused)
KEY_ONE = 0x3FF0000000000000  # the bit pattern of 1.0
MAX_LEVELS = 16  # the kernel's kTopPMaxLevels (never reached)


def _key(w: float) -> int:
    return int(np.array([w], dtype=np.float64).view(np.uint64)[0])


def _shift_for(width: int, top: int) -> int:
    """The smallest s with width >> s <= top."""
    s = 0
    while (width >> s) > top:
        s += 1
    return s


def topp_search(z: np.ndarray, top_p: float, lo0: int | None = None) -> dict:
    """One row of float64 scaled logits ``z`` (finite or -inf, at least one finite), ``0 < top_p < 1``: the
    kernel's threshold key, kept total, W, passes over the row (histogram levels + the compaction pass), how it
    ended ("one" element, one "key", "sorted" in shared memory, or "none" crossed) and whether level 0's
    bottom bin was the crossing one. ``lo0`` replaces level 0's window floor (a key), only to reach the
    bottom bin in a test: with the kernel's floor it never holds the crossing (its mass is below
    (1 - top_p) / 2 < ulp(W) / 2 where that matters, so W rounds as the mass above it)."""
    V = z.shape[0]
    m = z.max()
    w = np.exp(z - m)  # the kernel's weights
    keys = w.view(np.uint64)
    ikeys = keys.astype(object)  # Python ints: exact 64-bit key arithmetic
    pos = w > 0
    if lo0 is None:
        lo0 = min(KEY_ONE, max(_key(float(np.exp(z.min() - m))), _key((1.0 - top_p) / (2.0 * V))))
    lo, hi, base, bottom = 1, KEY_ONE, lo0, 1  # level 0: every positive weight is a candidate
    s = _shift_for(KEY_ONE - lo0, NBINS - 2)
    above, target, bottom_taken = 0.0, 0.0, False
    for level in range(MAX_LEVELS):
        # one histogram pass over the candidates (w > 0, lo <= key <= hi)
        cand = pos & (keys >= np.uint64(lo)) & (keys <= np.uint64(hi))
        d = np.zeros(V, dtype=np.int64)
        d[cand] = [0 if k < base else min(NBINS - 1, bottom + ((k - base) >> s)) for k in ikeys[cand]]
        cnt = np.bincount(d[cand], minlength=NBINS)
        sums = np.bincount(d[cand], weights=w[cand], minlength=NBINS)
        kmin, kmax = int(keys[cand].min()), int(keys[cand].max())
        if level == 0:  # W from the bins, top down
            W = 0.0
            for b in range(NBINS - 1, -1, -1):
                if cnt[b]:
                    W += sums[b]
            target = top_p * W
        acc, pick = crossing(cnt, sums, above, target)
        passes = level + 1
        if pick < 0:  # rounding: no bin crosses, every candidate is kept
            return dict(threshold=lo, total=acc, W=W, passes=passes, end="none", bottom=bottom_taken, bin=0)
        if bottom == 1 and pick == 0:  # level 0's bin of the keys below lo0
            bottom_taken = True
            blo, bhi = lo, base - 1
        else:
            blo = base + ((pick - bottom) << s)
            bhi = min(hi, blo + (1 << s) - 1)
        lo, hi = max(blo, kmin), min(bhi, kmax)
        above = acc
        if cnt[pick] == 1 or lo == hi or level == MAX_LEVELS - 1:
            return dict(threshold=lo, total=above + sums[pick], W=W, passes=passes,
                        end="one" if cnt[pick] == 1 else "key" if lo == hi else "cap", bottom=bottom_taken,
                        bin=int(cnt[pick]))
        if cnt[pick] <= CAP:  # one pass copies the bin's members; a sort and a scan finish it
            inbin = pos & (keys >= np.uint64(lo)) & (keys <= np.uint64(hi))
            vals = np.sort(w[inbin])[::-1]  # descending
            assert len(vals) == cnt[pick]
            excl = np.concatenate([[0.0], np.cumsum(vals)[:-1]])
            # kappa: the smallest value whose exclusive prefix passes; a tie group's first member has the
            # group's smallest prefix (the mass strictly above it), so groups are kept whole
            kappa = vals[above + excl < target].min()
            last = np.nonzero(vals >= kappa)[0].max()
            return dict(threshold=_key(float(kappa)), total=above + excl[last] + vals[last], W=W,
                        passes=passes + 1, end="sorted", bottom=bottom_taken, bin=int(cnt[pick]))
        base, bottom = lo, 0  # a generic level over [lo, hi]
        s = _shift_for(hi - lo, NBINS - 1)
    raise AssertionError("unreachable")


def crossing(cnt: np.ndarray, sums: np.ndarray, above: float, target: float) -> tuple[float, int]:
    """The kernels' crossing rule: from the top bin down, the first non-empty bin ``b`` with ``above + (the mass
    of the bins over b) + sums[b] >= target``; returns (that mass above it, b), or (the total, -1) if none."""
    acc = above
    for b in range(len(cnt) - 1, -1, -1):
        if cnt[b] == 0:
            continue
        if acc + sums[b] >= target:
            return acc, b
        acc += sums[b]
    return acc, -1


def byte_search(keys: np.ndarray, weights: np.ndarray, eligible: np.ndarray, target: float,
                mass: bool) -> tuple[int, int]:
    """The kernel's ``radix_threshold`` (top-k, top-k + top-p, and top-p before topp_search): most significant
    byte of the uint64 keys first, 256 bins a level, until the crossing bin holds one element or the key is
    complete. Returns (the threshold key, the levels it took)."""
    mask64 = (1 << 64) - 1
    prefix, above = 0, 0.0
    for level in range(8):
        shift = 56 - 8 * level
        hi_mask = 0 if level == 0 else (mask64 << (shift + 8)) & mask64
        cand = eligible & ((keys & np.uint64(hi_mask)) == np.uint64(prefix))
        digit = ((keys >> np.uint64(shift)) & np.uint64(255)).astype(np.int64)
        cnt = np.bincount(digit[cand], minlength=256)
        sums = np.bincount(digit[cand], weights=weights[cand], minlength=256) if mass else cnt.astype(np.float64)
        acc, pick = crossing(cnt, sums, above, target)
        if pick < 0:
            return prefix, level + 1
        prefix |= pick << shift
        above = acc
        if cnt[pick] == 1 or shift == 0:
            return prefix, level + 1
    return prefix, 8


def old_levels(z: np.ndarray, top_p: float) -> int:
    """Levels of the former byte-wise top-p search, for comparison."""
    w = np.exp(z - z.max())
    return byte_search(w.view(np.uint64), w, np.ones(len(w), dtype=bool), top_p * w.sum(), mass=True)[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 50257])
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.9, 0.5])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print("passes over the row: plain draw = max + total + draw (3); top-p = max + search + draw "
          "(the former search: max + W + levels + kept total + draw)")
    for V in args.vocab:
        x = rng.standard_normal((args.rows, V)) * 2
        for top_p in args.top_p:
            for name, scale in (("normal", 1.0), ("flat", 0.05), ("peaked", 4.0), ("normal-bf16", 1.0)):
                rows = x * scale
                if name.endswith("bf16"):  # bf16 logits: ties everywhere
                    rows = torch.from_numpy(rows).to(torch.bfloat16).double().numpy()
                res = [topp_search(rows[r], top_p) for r in range(args.rows)]
                p = np.array([r["passes"] for r in res])
                ends = {e: sum(r["end"] == e for r in res) for e in ("one", "key", "sorted", "none", "cap")}
                old = np.array([old_levels(rows[r], top_p) for r in range(min(args.rows, 16))])
                big = max(r["bin"] for r in res)
                print(f"V={V:6d} top_p={top_p:<4} {name:7s} search passes: mean {p.mean():.2f} max {p.max()} "
                      f"-> row passes {2 + p.mean():.2f} ({(2 + p.mean()) / 3:.2f}x plain); ends {ends}; "
                      f"former levels mean {old.mean():.2f} -> row passes {4 + old.mean():.2f} "
                      f"({(4 + old.mean()) / 3:.2f}x); largest final crossing bin {big}")


if __name__ == "__main__":
    main()
