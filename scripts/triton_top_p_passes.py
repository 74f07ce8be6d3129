"""Passes over the row of the Triton top-p search (issue 16), counted with the kernel's ``STATS`` output.

    TRITON_INTERPRET=1 PYTHONPATH=$PWD nice -n 5 python scripts/triton_top_p_passes.py [--rows 4] [--seed 0]

Runs ``kernels/sample_categorical.py`` in Triton's interpreter (no GPU needed) on the three logit rows of
``benchmarks/benchmark_sample_categorical.py::test_top_p_cost`` (``normal``: standard normal times 2, ``flat``:
that / 20, ``peaked``: that x 4) at V = 32768 and 50257, top-p 0.9 and 0.5, fp32 logits, and prints per case
the search passes of each row (after the guess pass; a top-p draw reads the row 1 + that many times plus the
scan to the drawn token, a plain draw once plus the scan). Checks each row's kept set against a float64 sort.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

DISTS = {"normal": 1.0, "flat": 0.05, "peaked": 4.0}


def kept_by_sort(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """The kept mask of one row by the definition, in float64: the smallest present weight ``x*`` with
    ``Σ_{w > x*} w < top_p · Σ w``, ties kept whole."""
    w = torch.exp(x.double() - x.double().max())
    s, _ = torch.sort(w, descending=True)
    c = torch.cumsum(s, 0)
    i = int(torch.searchsorted(c, top_p * float(c[-1]), right=False))  # first index with c >= p·W
    return w >= s[min(i, len(s) - 1)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, nargs="*", default=[32768, 50257])
    ap.add_argument("--top-p", type=float, nargs="*", default=[0.9, 0.5])
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("note: TRITON_INTERPRET is not 1: runs on the GPU")
    from fastdiff.ops.backends.triton import sample_categorical as glue
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    for V in args.vocab:
        x = torch.randn(args.rows, V, generator=torch.Generator().manual_seed(args.seed)) * 2
        for name, scale in DISTS.items():
            z = (x * scale).to(dev)
            for p in args.top_p:
                stats = torch.zeros(args.rows, 3, dtype=torch.int64, device=dev)
                glue._sample_categorical_fwd(z, 0, 0, 1.0, 0, p, 0, stats=stats)
                stats = stats.cpu()
                thr = stats[:, 1].contiguous().view(torch.float64)
                w = torch.exp(z.double().cpu() - z.double().cpu().max(-1, keepdim=True).values)
                exact = all(torch.equal(w[r] >= thr[r], kept_by_sort(z[r].cpu(), p)) for r in range(args.rows))
                sizes = [int(kept_by_sort(z[r].cpu(), p).sum()) for r in range(args.rows)]
                print(f"V={V:6d} {name:7s} top_p={p}: search passes {stats[:, 0].tolist()}  "
                      f"kept {sizes}  kept sets exact: {exact}", flush=True)


if __name__ == "__main__":
    main()
