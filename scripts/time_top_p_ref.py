"""Cost of the pure-PyTorch reference top-p relative to its own plain draw (issue 16), for fast iteration.

    PYTHONPATH=$PWD nice -n 5 python scripts/time_top_p_ref.py [--rows 512] [--vocab 32768] [--repeats 5]

On one intra-op thread, ``sample_categorical_ref`` with ``top_p`` (default 0.9) and without a filter on the same
logits, interleaved in one process, best of ``--repeats``, on the three logit distributions of
``benchmarks/benchmark_sample_categorical.py::test_top_p_cost``: ``normal`` (standard normal times 2), ``flat``
(that / 20) and ``peaked`` (that x 4). Prints each best time and the ratio top-p / plain (the benchmark's
``ratio_to_plain``, which times 2048 rows). Few rows pay the first row block's page faults more.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastdiff.ops import sample_categorical_ref

DISTS = {"normal": 1.0, "flat": 0.05, "peaked": 4.0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 2
    logits = {name: x * scale for name, scale in DISTS.items()}
    best = {(name, mode): float("inf") for name in DISTS for mode in ("plain", "top-p")}
    for _ in range(args.repeats):
        for name, z in logits.items():
            for mode, top_p in (("plain", None), ("top-p", args.top_p)):
                t0 = time.perf_counter()
                sample_categorical_ref(z, seed=1, top_p=top_p)
                best[name, mode] = min(best[name, mode], time.perf_counter() - t0)
    for name in DISTS:
        plain, top_p = best[name, "plain"], best[name, "top-p"]
        print(f"{name:7s} plain {plain * 1e3:8.1f} ms  top-p {top_p * 1e3:8.1f} ms  ratio {top_p / plain:.2f}")


if __name__ == "__main__":
    main()
