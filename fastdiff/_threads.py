"""Intra-op thread count for the command line (``--threads``) and the library's kernels.

``configure(threads)`` is what the CLI calls before any work: an int sets ``torch.set_num_threads``;
``None`` applies the automatic policy below. The C++ kernels read ``at::get_num_threads()``, so
``torch.set_num_threads`` governs them as it governs PyTorch's own ops. A library user who never calls
``configure`` keeps whatever torch chose; only the kernels' own thread teams follow their policy
(``csrc/parallel.h``: small calls run on the calling thread, large ones fork a team, and a team whose
workers started late marks the machine busy, so that for a while only much larger calls fork one).

The automatic policy (``configure(None)``): **take the cores that are free, at least one, at most
torch's default.** Measured on a 2-core CPU with the bundled discrete model (``fastdiff generate``,
benchmarks/results/loaded-cpu-2cores.json): on an idle machine 2 threads generate 1.8x as fast as one; with a
busy process on every core 2 threads took 10-50x as long as one (157 s against 22 s, CLI end to end),
because torch's OpenMP workers spin-wait and every parallel region then waits a scheduler tick (4-16 ms)
for a core. So:

* ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set: the user chose; torch's count is kept.
* Otherwise ``threads = clamp(round(cores - others), 1, default)``, where ``cores`` is what this process may
  use (``os.sched_getaffinity``, and a cgroup CPU quota where one is set), ``others`` the runnable
  threads of other processes right now (Linux: the median of 5 reads of ``procs_running`` in
  ``/proc/stat``, 2 ms apart, minus this process's own running threads; scaled to this process's share of
  the machine's CPUs; elsewhere the 1-minute load average), and ``default`` torch's count when
  ``configure(None)`` was first called.

The decision is taken once, before any work (a load that starts later is the kernels' business, not
torch's); :func:`last_decision` says what was decided and why.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from .errors import InputError, InputTypeError

__all__ = ["configure", "auto_threads", "usable_cores", "other_runnable", "last_decision"]

_BASE: int | None = None  # torch's count at the first configure(None): the policy's ceiling
_LAST = "not configured: torch's default"
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SAMPLES, SAMPLE_GAP_S = 5, 0.002


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, p = f.read().split()[:2]
        return None if q == "max" else int(q) / int(p)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p = int(f.read())
        return None if q <= 0 or p <= 0 else q / p
    except (OSError, ValueError):
        return None


def _procs_running() -> int | None:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _own_running() -> int:
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) S ...": the state follows the last ')', since comm may hold spaces or parentheses.
        state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
        n += state == b"R"
    return max(1, n)  # the thread reading this is running


def other_runnable() -> float:
    """Runnable threads of other processes right now, in this process's share of the machine's CPUs."""
    counts = []
    for i in range(SAMPLES):
        if i:
            time.sleep(SAMPLE_GAP_S)
        running = _procs_running()
        if running is None:
            break
        counts.append(max(0, running - _own_running()))
    if counts:
        others = float(statistics.median(counts))
    else:
        try:
            others = max(0.0, os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    total = os.cpu_count() or 1
    mine = usable_cores()
    return others * mine / total if mine < total else others


def auto_threads(default: int, *, cores: int, others: float) -> int:
    """The automatic policy: the free cores (``cores - others``, rounded), at least 1, at most ``default``."""
    return max(1, min(int(default), int(math.floor(cores - others + 0.5))))


def last_decision() -> str:
    """What the last :func:`configure` call decided, and why (for the CLI's header line and logs)."""
    return _LAST


def configure(threads: int | None) -> int:
    """Set the intra-op thread count (``None``: the automatic policy) and return the count in effect."""
    global _BASE, _LAST
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise InputTypeError(f"--threads: expected an int, got {type(threads).__name__}")
        if threads < 1:
            raise InputError(f"--threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        _LAST = f"--threads {threads}"
        return torch.get_num_threads()
    if _BASE is None:
        _BASE = torch.get_num_threads()
    chosen = [v for v in ENV_VARS if os.environ.get(v, "").strip()]
    if chosen:
        torch.set_num_threads(_BASE)
        _LAST = f"{chosen[0]}={os.environ[chosen[0]].strip()}: torch's {_BASE} kept"
        return torch.get_num_threads()
    cores, others = usable_cores(), other_runnable()
    n = auto_threads(_BASE, cores=cores, others=others)
    torch.set_num_threads(n)
    _LAST = (f"auto: {n} of {cores} cores ({others:g} runnable threads of other processes, "
             f"torch's default {_BASE})")
    return torch.get_num_threads()
