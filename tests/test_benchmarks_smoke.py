"""Every benchmark runs once, in the suite's small mode, so a benchmark can never rot unseen: this is what
``FASTDIFF_BENCH_SMALL=1 pytest benchmarks --benchmark-disable`` does (benchmarks/README.md).

The Triton providers of the op benchmarks need a GPU (on CPU they are skipped with the reason; the
interpreter is too slow for benchmark sizes, and tests/ops hold those kernels to the reference);
``benchmark_dispatch.py``'s dispatcher-overhead cases run for the C++ backend, and for Triton wherever it is
installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="no benchmarks/ next to tests/ (an installed copy)")
def test_every_benchmark_runs_once_in_small_mode():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDIFF_BACKEND")}
    env["FASTDIFF_BENCH_SMALL"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                        "--benchmark-disable", "-x"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-40:])
    assert r.returncode == 0, tail
    assert " passed" in tail and "error" not in tail.split("\n")[-1].lower(), tail
