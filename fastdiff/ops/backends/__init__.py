"""Backend glue of the ops: one package per kernel backend, one module per kernel family, found by name.

Layout (the dispatcher, :mod:`fastdiff.ops._dispatch`, relies on it and on nothing else)::

    fastdiff/ops/<op>.py                       the public op, its reference <op>_ref, the argument checks and
                                               the backend-independent parts (lowering, reshaping, autograd)
    fastdiff/ops/backends/<backend>/<kernel>.py  <backend>'s glue for kernel family <kernel>
    kernels/<kernel>.py, csrc/<kernel>.cpp, csrc/cuda/<kernel>.cu   the kernels themselves

A public op names its kernel family in a module constant ``KERNEL`` (``categorical_posterior`` and
``posterior_sample`` share ``"posterior"``; every other op's family is its own name). ``backend="cpp"`` then
runs ``fastdiff.ops.backends.cpp.<KERNEL>``, whose entry points have the same names and signatures in every
backend package:

* ``nearest_embedding``: ``nearest_embedding(x, weight, metric) -> indices``;
* ``rounding_loss``: ``rounding_loss_fwd`` / ``rounding_loss_bwd`` and ``GRADIENT_IN_FORWARD``, the
  primitives of the one autograd Function (:class:`fastdiff.ops.rounding_loss.RoundingLossFn`);
* ``posterior``: ``posterior(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s,
  pair, sample, seed, offset, row_offset)`` (:mod:`fastdiff.ops._plan`);
* ``sample_categorical``: ``sample_categorical(logits, seed, offset, temperature, top_k, top_p, row_offset)``.

A module may set ``CHECKS_VALUES = True`` when its kernel checks the logits' values itself (the public op
then skips that read pass). Each backend's kernels are ``torch.library`` custom ops in the namespace
``fastdiff_<backend>`` (C++ and CUDA: schemas in ``csrc/schema.h``, registered in C++; Triton: registered
in Python with the same schemas), with fake kernels that only allocate, so ``torch.compile`` traces them.
:func:`custom_ops_enabled` switches the dispatcher off per call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

NAMES = ("cpp", "triton", "cuda")


def custom_ops_enabled(backend: str) -> bool:
    """Whether ``backend``'s glue calls its kernels through their ``torch.library`` ops (traceable by
    ``torch.compile``; about 3 µs per call for a C++-registered op, 10-20 µs for a Python-registered one)
    or directly. ``FASTDIFF_CUSTOM_OP=0`` calls every backend directly; ``FASTDIFF_TRITON_CUSTOM_OP=0``
    (the older switch) only the Triton backend."""
    if os.environ.get("FASTDIFF_CUSTOM_OP", "1") == "0":
        return False
    return backend != "triton" or os.environ.get("FASTDIFF_TRITON_CUSTOM_OP", "1") != "0"


def has_op(qualname: str) -> bool:
    """Whether the ``torch.library`` op ``namespace::name`` is registered in this process."""
    ns, name = qualname.split("::")
    return hasattr(getattr(torch.ops, ns), name)


def register_fake(qualname: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as the fake (meta) kernel of ``qualname`` once per process (a glue module that is
    imported again, as tests do, leaves the first registration in place); ops this process does not have
    are skipped."""
    if qualname in _FAKES or not has_op(qualname):
        return
    torch.library.register_fake(qualname)(fn)
    _FAKES.add(qualname)


_FAKES: set[str] = set()


def python_op(qualname: str, fn: Callable[..., Any], schema: str, fake: Callable[..., Any]
              ) -> torch._ops.OpOverload:
    """The ``torch.library`` op ``qualname`` implemented in Python by ``fn`` (every device) with the fake
    kernel ``fake``: defined on the first call in this process, then looked up (a glue module imported
    again, as tests do, does not define it twice). Returns its default overload."""
    if not has_op(qualname):
        torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema).register_fake(fake)
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default
