"""``fastdiff bench``: every op on every available backend, and the sampler on the bundled models, as one
table. Best of ``repeat`` wall-clock runs (CUDA synchronised); ``vs ref`` is the reference backend's time
divided by the row's (higher is faster). Each row prints as soon as it is measured. The pytest-benchmark
suite in ``benchmarks/`` has the fuller version with peers and hardware floors; both time the op cases of
:mod:`fastdiff.testing` (here :data:`~fastdiff.testing.CLI_OP_CASES` at :data:`~fastdiff.testing.CLI_SIZES`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from .. import _backends, testing
from ..sampling.strategies import TABLE
from ._common import (
    _add_device,
    _add_threads,
    _check_device,
    _configure_threads,
    _device,
    _write_json,
    check_writable,
    positive_int,
)

HELP = "ops per backend and the sampler, one table (rows print as they are measured)"


def add_arguments(b: argparse.ArgumentParser) -> None:
    """The ``bench`` options on ``b``."""
    _add_device(b)
    b.add_argument("--quick", action="store_true", help="smaller sizes")
    b.add_argument("--repeat", type=positive_int, default=3, help="timed runs per row (the best is kept)")
    b.add_argument("--no-sampler", action="store_true", help="ops only")
    b.add_argument("--json", help="write the rows as JSON (checked before the work, written atomically)")
    _add_threads(b)


def command(args: argparse.Namespace) -> int:
    """Run ``fastdiff bench``; returns the exit status."""
    _configure_threads(args)
    device = _check_device(args.device)
    if args.json:
        check_writable(args.json, "--json")
    rows = run(device=_device(device), quick=args.quick, repeat=args.repeat, sampler=not args.no_sampler)
    if args.json:
        _write_json(args.json, "--json", rows)
        print(f"wrote {args.json}")
    return 0


def _timed(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()
    return min(once() for _ in range(repeat))


def op_cases(device: torch.device, quick: bool, seed: int = 0) -> dict[str, tuple[Callable, str, float]]:
    """name -> (fn(backend), unit, work); work is what one call does in ``unit`` (GFLOP or GB read): the
    :data:`fastdiff.testing.CLI_OP_CASES` at ``CLI_SIZES[quick]``."""
    inputs = testing.op_inputs(*testing.CLI_SIZES[quick], seed=seed, device=device)

    def call(case: testing.OpCase) -> Callable[[str], object]:
        return lambda b: testing.op_call(case, inputs, backend=b, seed=seed)()

    return {case.label(inputs.size(case)): (call(case), case.unit, case.work(inputs.size(case)))
            for case in testing.CLI_OP_CASES}


def backends_for(device: torch.device) -> list[str]:
    avail = _backends.available()
    names = ["reference"]
    if device.type == "cpu":  # Triton on CPU is the interpreter: a correctness tool, not a speed one
        names += [n for n in ("cpp",) if avail[n].available]
    else:
        names += [n for n in ("cuda", "triton") if avail[n].available]
    return names


def _flushing_print(line: str) -> None:
    print(line, flush=True)


def run(device: str | torch.device = "cpu", quick: bool = False, repeat: int = 3, seed: int = 0,
        sampler: bool = True, print_fn: Callable[[str], None] | None = None) -> list[dict]:
    """Time the ops per backend and the sampler strategies; print one table, a row as soon as it is
    measured (after a line saying what will run); return its rows."""
    from ..errors import InputError, InputTypeError

    if isinstance(repeat, bool) or not isinstance(repeat, int):
        raise InputTypeError(f"repeat: expected an int, got {type(repeat).__name__}")
    if repeat < 1:
        raise InputError(f"repeat: must be >= 1, got {repeat}")
    print_fn = print_fn or _flushing_print
    device = torch.device(device)
    cases = op_cases(device, quick, seed)
    backends = backends_for(device)
    B, steps = _sampler_size(quick)
    plan = f"{len(cases)} ops x {len(backends)} backends ({', '.join(backends)})"
    if sampler:
        n_strat = sum(len(s) for s in _SAMPLER_PLANS.values())
        plan += f", then the sampler: {n_strat} strategies x 2 backends (reference, auto) on the bundled models " \
                f"(B={B}, {steps} steps)"
    print_fn(f"fastdiff bench on {device}: {plan}; best of {repeat} run(s) per row, rows print as they are measured")
    w = max([len(n) for n in cases] + [44])
    print_fn(_HEADER.format(w=w, name="benchmark", backend="backend", ms="ms", rate="rate", vs="vs ref"))
    print_fn("-" * (w + 55))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print_fn(_row_line(row, w))

    for name, (fn, unit, work) in cases.items():
        ref_s = None
        for backend in backends:
            sec = _timed(lambda fn=fn, backend=backend: fn(backend), repeat, device)
            ref_s = sec if backend == "reference" else ref_s
            emit({"kind": "op", "name": name, "backend": backend, "ms": sec * 1e3,
                  "rate": f"{work / sec:,.1f} {unit}", "vs_ref": (ref_s / sec) if ref_s else None})
    if sampler:
        _sampler_rows(device, quick, repeat, seed, emit)
    return rows


# every strategy of the sampler's table, by family (the bundled model of that family runs it)
_SAMPLER_PLANS = {fam: tuple(n for n, st in TABLE.items() if st.family == fam) for fam in ("discrete", "continuous")}
_HEADER = "{name:<{w}}  {backend:<9} {ms:>10}  {rate:<22} {vs:>7}"


def _sampler_size(quick: bool) -> tuple[int, int]:
    return (8, 16) if quick else (32, 64)


def _sampler_rows(device: torch.device, quick: bool, repeat: int, seed: int,
                  emit: Callable[[dict], None]) -> None:
    from ..pipeline import TextDiffusion

    B, steps = _sampler_size(quick)
    for name, strategies in _SAMPLER_PLANS.items():
        try:
            td = TextDiffusion.load(name, device=device)
        except (FileNotFoundError, ValueError) as e:
            emit({"kind": "sampler", "name": f"{name} model", "backend": "-", "ms": None,
                  "rate": f"unavailable: {e}", "vs_ref": None})
            continue
        for strategy in strategies:
            ref_s = None
            for backend in ("reference", "auto"):
                td.backend = backend
                gen = None

                def go(td: TextDiffusion = td, strategy: str = strategy) -> None:
                    nonlocal gen
                    gen = td.generate(B, steps=steps, strategy=strategy, seed=seed)

                sec = _timed(go, max(1, repeat - 1), device)
                ref_s = sec if backend == "reference" else ref_s
                toks = gen.tokens.numel()
                emit({"kind": "sampler", "name": f"{name} {strategy} B={B} L={td.seq_len} {steps} steps",
                      "backend": backend, "ms": sec * 1e3, "rate": f"{toks / sec:,.0f} tokens/s",
                      "vs_ref": (ref_s / sec) if backend != "reference" else 1.0})


def _row_line(r: dict, w: int) -> str:
    vs = f"{r['vs_ref']:.2f}x" if r["vs_ref"] else ""
    ms = f"{r['ms']:.2f}" if r["ms"] is not None else "-"
    return _HEADER.format(w=w, name=r["name"], backend=r["backend"], ms=ms, rate=r["rate"], vs=vs)


def _print_table(rows: list[dict], print_fn: Callable[[str], None]) -> None:
    """The whole table at once (for rows kept from an earlier :func:`run`)."""
    w = max([len(r["name"]) for r in rows] + [44])
    print_fn(_HEADER.format(w=w, name="benchmark", backend="backend", ms="ms", rate="rate", vs="vs ref"))
    print_fn("-" * (w + 55))
    for r in rows:
        print_fn(_row_line(r, w))
