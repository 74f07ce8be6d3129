"""Throughput of 1 vs N processes under torchrun: generation (tokens/s of ``fastdiff generate``) and
training (tokens/s of ``fastdiff train``'s log), on this machine's CPU with gloo or on GPUs with NCCL.

    python scripts/scaleout_bench.py [--nproc 2] [--device cpu] [--json benchmarks/results/scaleout.json]

Every configuration runs ``--repeat`` times and reports the best run. On CPU each process gets one
intra-op thread (``OMP_NUM_THREADS=1``), so "1 process" and "N processes" use 1 and N cores; "1 process,
N threads" is the single-process alternative that uses the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res.stdout


def _launch(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "fastdiff", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "fastdiff", *args]


def generation(nproc: int, threads: int, device: str, samples: int, steps: int, repeat: int) -> dict:
    args = ["generate", "-n", str(samples), "--steps", str(steps), "--no-progress", "--quiet", "--device", device,
            "--batch-size", str(max(1, samples // nproc))]
    best = 0.0
    for _ in range(repeat):
        out = _run(_launch(nproc, args), threads)
        m = re.search(r"([\d,]+) tokens/s", out)
        best = max(best, float(m.group(1).replace(",", "")))
    return {"processes": nproc, "threads_per_process": threads, "samples": samples, "steps": steps,
            "tokens_per_s": best}


def training(nproc: int, threads: int, device: str, global_batch: int, steps: int, repeat: int) -> dict:
    best = 0.0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            args = ["train", "--family", "discrete", "--task", "attribute", "--seq-len", "64", "--steps", str(steps),
                    "--batch-size", str(global_batch // nproc), "--width", "128", "--layers", "4", "--heads", "4",
                    "--log-every", "10", "--ckpt-every", "0", "--out", d, "--no-progress", "--device", device]
            _run(_launch(nproc, args), threads)
            log = [json.loads(line) for line in Path(d, "train_log.jsonl").read_text().splitlines()]
            rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]  # drop the warm-up window
            best = max(best, sum(rates) / len(rates))
    return {"processes": nproc, "threads_per_process": threads, "global_batch": global_batch, "steps": steps,
            "tokens_per_s": best}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    n = a.nproc
    configs = [(1, 1), (n, 1), (1, n)] if a.device == "cpu" else [(1, 1), (n, 1)]
    rows = []
    for nproc, threads in configs:
        g = generation(nproc, threads, a.device, a.samples, a.steps, a.repeat)
        t = training(nproc, threads, a.device, a.global_batch, a.train_steps, a.repeat)
        rows.append({"generate": g, "train": t})
        print(f"{nproc} process(es) x {threads} thread(s): generate {g['tokens_per_s']:,.0f} tokens/s, "
              f"train {t['tokens_per_s']:,.0f} tokens/s", flush=True)
    base = rows[0]
    for r in rows:
        for k in ("generate", "train"):
            r[k]["speedup_vs_1x1"] = r[k]["tokens_per_s"] / base[k]["tokens_per_s"]
    if a.json:
        Path(a.json).write_text(json.dumps({"device": a.device, "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
