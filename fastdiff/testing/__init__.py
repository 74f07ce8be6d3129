"""Fixtures that the tests, the benchmarks and the ``fastdiff bench`` / ``fastdiff demo`` commands share:
public, so that none of them imports another's private module.

* :class:`TinyDenoiser` (:mod:`fastdiff.testing.models`): a 2-layer transformer with a step embedding,
  randomly initialised: a discrete (``TinyDenoiser(V)``) or continuous (``TinyDenoiser(V, dim=D)``)
  denoiser for sampling tests and benchmarks.
* The op cases (:mod:`fastdiff.testing.cases`): :data:`OP_CASES`, every op and variant the pytest-benchmark
  suite times (``benchmarks/benchmark_<op>.py`` parametrise over :func:`op_cases`); :data:`CLI_OP_CASES`,
  the ones ``fastdiff bench`` and ``fastdiff demo`` time at :data:`CLI_SIZES`; the inputs
  (:func:`op_inputs`, :func:`embed_inputs`, :func:`logits_input`, :func:`targets_input`,
  :func:`posterior_inputs`) and :func:`op_call`, one call of a case on a backend.
* :func:`busy` / :func:`cores` (:mod:`fastdiff.testing.load`): competing busy processes, one per core, for
  measurements on a loaded machine.

Example::

    from fastdiff.testing import CLI_SIZES, op_call, op_cases, op_inputs

    inputs = op_inputs(*CLI_SIZES[True])
    for case in op_cases("posterior_sample"):
        op_call(case, inputs, backend="reference")()
"""

from __future__ import annotations

from .cases import (
    CLI_OP_CASES,
    CLI_SIZES,
    OP_CASES,
    S_STEP,
    T_STEP,
    OpCase,
    OpInputs,
    Size,
    embed_inputs,
    logits_input,
    op_call,
    op_cases,
    op_inputs,
    posterior_inputs,
    targets_input,
)
from .load import busy, cores
from .models import TinyDenoiser

__all__ = ["CLI_OP_CASES", "CLI_SIZES", "OP_CASES", "S_STEP", "T_STEP", "OpCase", "OpInputs", "Size", "TinyDenoiser",
           "busy", "cores", "embed_inputs", "logits_input", "op_call", "op_cases", "op_inputs", "posterior_inputs",
           "targets_input"]
