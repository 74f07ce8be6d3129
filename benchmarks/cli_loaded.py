"""``fastdiff generate`` end to end (a fresh process per run: import, model load, generation) on a quiet
machine and with a busy process on every core (:func:`fastdiff.testing.busy`); writes a JSON of medians.

    python -m benchmarks.cli_loaded --reps 3 --json benchmarks/results/loaded-cli-cpu-2cores.json

Variants (``--only NAME`` to pick some): the automatic thread policy (the CLI's default), ``--threads 2`` (what
the CLI did before the policy on this 2-core machine: torch's default), ``--threads 1``, and ``--steps 16``
with ``--backend cpp`` / ``--backend reference`` under the automatic policy and under ``--threads 2``. Runs
are interleaved (variant by variant within each repetition) so that every variant sees the same ambient
load; ``wall_s`` is the whole process, ``generate_s`` the time the CLI reports for generation itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastdiff.testing import busy, cores

ROOT = Path(__file__).resolve().parent.parent
FASTDIFF = [sys.executable, "-m", "fastdiff"]
VARIANTS = {
    "auto": ["generate", "--no-progress"],
    "threads2": ["generate", "--no-progress", "--threads", "2"],
    "threads1": ["generate", "--no-progress", "--threads", "1"],
    "steps16-cpp-auto": ["generate", "--no-progress", "--steps", "16", "--backend", "cpp"],
    "steps16-reference-auto": ["generate", "--no-progress", "--steps", "16", "--backend", "reference"],
    "steps16-cpp-threads2": ["generate", "--no-progress", "--steps", "16", "--backend", "cpp", "--threads", "2"],
    "steps16-reference-threads2": ["generate", "--no-progress", "--steps", "16", "--backend", "reference",
                                   "--threads", "2"],
}
TOKENS_IN = re.compile(r"tokens in ([0-9.]+) s")
THREADS_IN = re.compile(r"threads (\d+)")


def run_once(args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t0 = time.perf_counter()
    r = subprocess.run([*FASTDIFF, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    m = TOKENS_IN.search(r.stdout)
    th = THREADS_IN.search(r.stdout.splitlines()[0]) if r.stdout else None
    return {"wall_s": wall, "generate_s": float(m.group(1)) if m else None,
            "threads": int(th.group(1)) if th else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="quiet,loaded")
    p.add_argument("--only", action="append", choices=sorted(VARIANTS))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    names = a.only or list(VARIANTS)
    out = {"machine": {"cores": cores(), "cpu_count": os.cpu_count()}, "reps": a.reps, "modes": {}}
    for mode in a.modes.split(","):
        runs: dict[str, list[dict]] = {n: [] for n in names}
        load = os.getloadavg()[0]
        with busy() if mode == "loaded" else contextlib.nullcontext():
            for _ in range(a.reps):
                for n in names:
                    runs[n].append(run_once(VARIANTS[n]))
                    print(mode, n, runs[n][-1], flush=True)
        res = {}
        for n, rs in runs.items():
            gen = [r["generate_s"] for r in rs if r["generate_s"] is not None]
            res[n] = {"command": "fastdiff " + " ".join(VARIANTS[n]),
                      "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                      "generate_s_median": statistics.median(gen) if gen else None,
                      "wall_s": [round(r["wall_s"], 2) for r in rs],
                      "generate_s": [round(g, 2) for g in gen],
                      "threads": sorted({r["threads"] for r in rs if r["threads"] is not None})}
        out["modes"][mode] = {"busy_processes": cores() if mode == "loaded" else 0,
                              "load_average_1min_before": round(load, 2), "variants": res}
    text = json.dumps(out, indent=2)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
