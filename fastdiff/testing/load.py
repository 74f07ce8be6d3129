"""Competing busy processes for measurements under load (``benchmarks/benchmark_loaded.py``,
``benchmarks/cli_loaded.py``, ``tests/test_threads.py``).

``busy(n)`` is a context manager that starts ``n`` child processes, each spinning a pure-Python loop at
100% of a core (a pure-Python loop; no memory traffic, no threads of its own), and always stops them on
exit, also when the body raises or the interpreter is interrupted (``terminate``, then ``kill`` after
a short wait; an ``atexit`` hook catches what the body skipped). A child also ends by itself when its
parent dies without either (a segfault, SIGKILL). ``n=None`` means one per core this
process may run on (``os.sched_getaffinity``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

_LIVE: set[subprocess.Popen] = set()
# The spinning child: pure-Python busy loop; it dies with its parent even when the parent is killed or
# crashes (Linux: PR_SET_PDEATHSIG; everywhere: it checks its parent id every few million iterations).
SPIN = """
import os, sys
parent = int(sys.argv[1])
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
except Exception:
    pass
while os.getppid() == parent:
    for _ in range(2_000_000):
        pass
"""


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stop(procs: Iterable[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        try:
            p.wait(timeout=max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        _LIVE.discard(p)


atexit.register(lambda: _stop(list(_LIVE)))


@contextlib.contextmanager
def busy(n: int | None = None, settle_s: float = 0.3) -> Iterator[list[subprocess.Popen]]:
    """Run the body with ``n`` spinning processes (default: one per core); they are stopped on exit."""
    n = cores() if n is None else n
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            p = subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            _LIVE.add(p)
        time.sleep(settle_s)  # let them start spinning (interpreter start-up is not load)
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"busy process exited early with status {p.returncode}")
        yield procs
    finally:
        _stop(procs)
