"""``fastdiff demo``, the main job before models shipped: every op once, and short runs of
:mod:`fastdiff.sampling` on a tiny randomly initialised denoiser (:class:`fastdiff.testing.TinyDenoiser`),
with timings. The ops are :data:`fastdiff.testing.CLI_OP_CASES`, the cases ``fastdiff bench`` and the
benchmark suite time."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from .. import _backends, continuous, discrete, sampling, schedules, testing
from ..testing import TinyDenoiser
from ._common import _add_threads, _configure_threads, _write_json, check_writable, seed_int

HELP = "every op timed and sampling loops on random weights"


def add_arguments(d: argparse.ArgumentParser) -> None:
    """The ``demo`` options on ``d``."""
    d.add_argument("--seed", type=seed_int, default=0, help="random seed, in [0, 2**64)")
    d.add_argument("--quick", action="store_true", help="smaller sizes")
    d.add_argument("--json", metavar="PATH", help="write the figures as JSON (checked before the work)")
    _add_threads(d)


def command(args: argparse.Namespace) -> int:
    """Run ``fastdiff demo``; returns the exit status."""
    _configure_threads(args)
    if args.json:
        check_writable(args.json, "--json")
    results = run(seed=args.seed, quick=args.quick)
    if args.json:
        _write_json(args.json, "--json", results)
    return 0


def _time(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(seed: int = 0, quick: bool = False, print_fn: Callable[[str], None] = print) -> dict:
    """Report backends, time every op, run both sampling loops. Returns the figures."""
    from .. import __version__

    torch.manual_seed(seed)
    results: dict = {"ops": {}, "sampling": {}}
    print_fn(f"fastdiff {__version__} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print_fn("backends:")
    for name, be in _backends.available().items():
        print_fn(f"  {name:<10} {'available' if be.available else 'unavailable: ' + be.reason}")

    inputs = testing.op_inputs(*testing.CLI_SIZES[quick], seed=seed)
    cases = {case.label(inputs.size(case)): testing.op_call(case, inputs, seed=seed) for case in testing.CLI_OP_CASES}
    print_fn("ops (best of 3, backend=auto):")
    for name, fn in cases.items():
        sec = _time(fn)
        results["ops"][name] = sec
        print_fn(f"  {name:<48} {sec * 1e3:9.2f} ms")

    B, L, Vs, steps = (4, 32, 512, 16) if quick else (8, 64, 1000, 32)
    model = TinyDenoiser(Vs).eval()
    proc = discrete.Absorbing(Vs, Vs - 1, schedules.mutual_info(1000))
    out = sampling.sample(model, proc, shape=(B, L), steps=steps, seed=seed)
    toks, calls, dt = out.tokens, out.stats["network_calls"], out.stats["time_s"]
    left = int((toks == proc.mask_id).sum())
    results["sampling"]["discrete"] = {"seconds": dt, "tokens_per_s": B * L / dt, "network_calls": calls,
                                       "overhead_fraction": out.stats["overhead_fraction"]}
    print_fn(f"discrete absorbing sampling: B={B} L={L} V={Vs} {steps} steps of a T=1000 model: "
             f"{dt * 1e3:.0f} ms, {B * L / dt:,.0f} tokens/s, {calls} network calls, {left} masks left")
    print_fn(f"  sample 0 token ids: {toks[0, :16].tolist()} ...")

    Dc = 16
    emb = torch.randn(Vs, Dc)
    cmodel = TinyDenoiser(Vs, dim=Dc).eval()
    diff = continuous.GaussianDiffusion(schedules.sqrt(1000), parameterization="x0")
    cout = sampling.sample(cmodel, diff, shape=(B, L), steps=steps, strategy="ddim", embedding=emb,
                           clamp="last", seed=seed)
    ctoks, dt = cout.tokens, cout.stats["time_s"]
    results["sampling"]["continuous"] = {"seconds": dt, "tokens_per_s": B * L / dt}
    print_fn(f"continuous DDIM sampling + clamp + rounding: B={B} L={L} D={Dc} V={Vs} {steps} steps: "
             f"{dt * 1e3:.0f} ms, {B * L / dt:,.0f} tokens/s")
    print_fn(f"  sample 0 token ids: {ctoks[0, :16].tolist()} ...")
    print_fn("(random weights: the tokens are noise until a model is trained; see README)")
    return results

