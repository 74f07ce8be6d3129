"""Lowering of a discrete process and a step pair to the flat arrays a posterior kernel reads, and the one
kernel ABI of the posterior.

Every kernel backend (C++, CUDA, Triton) implements the same row formulas on a :class:`PosteriorPlan`, so
none of them needs to know the process classes, and every backend's entry point takes the same arguments in
the same order (:meth:`PosteriorPlan.args`; the schema is ``FASTDIFF_SCHEMA_POSTERIOR`` in
``csrc/schema.h``, the kind codes are :data:`KINDS`, the same table as ``PosteriorKind`` there). With ``p`` the x0
distribution ``softmax(logits / temperature)`` of a row (absorbing: the mask logit is ignored, i.e.
treated as ``-inf``) and unnormalised posterior weights ``w``:

* absorbing, kind 0 (scalar schedule) and kind 1 (per-token, spindle) (row with ``x_t == mask_id``; any
  other row keeps ``x_t`` and its logits are never read)::

      w_j    = (A_s(j) - A_t(j)) · p_j                  j ≠ mask_id
      w_mask = Σ_i p_i · (1 - A_s(i))

  with ``A_t(j) = a_t[n]`` for a scalar schedule and ``A_t(j) = ab_table[t[n], j]`` for a per-token one.
* uniform, kind 2: ``r = a_t / a_s`` (0 when ``a_s == 0``)::

      w_j = (r·[j == x_t] + (1 - r)/V) · (a_s · p_j + (1 - a_s)/V)

* matrix, kind 3 (small V): ``w_j = fact1[n, j] · Σ_i p_i · qbar_s[pair[n], i, j]``.

Every kind: a row with ``Σ w == 0`` (``x_t`` unreachable from the x0 distribution, e.g. when ``-inf`` logits
leave no category that leads to it) keeps ``x_t``: one-hot probabilities, and ``x_t`` drawn.

``categorical_posterior`` returns ``w / Σ w`` (float32; float64 for float64 logits);
``posterior_sample`` draws ``min{j : cumsum(w)_j > u · Σ w}`` with ``u`` the float64 uniform of
Philox counter ``(row_offset + n, offset)`` (:func:`fastdiff.random.row_uniforms`), falling back to the last
positive-weight category when rounding leaves no index; accumulate ``w`` in float64. ``seed``, ``offset``
and ``row_offset`` are uint64 counter words passed as int64 holding the same 64 bits (:func:`int64_bits`),
the same way to every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._protocols import DiscreteProcess
from ..errors import InputTypeError

# The kind codes of the posterior ABI (csrc/schema.h's PosteriorKind holds the same table).
KIND_ABSORBING = 0  # absorbing, scalar schedule: a_t, a_s
KIND_ABSORBING_PER_TOKEN = 1  # absorbing, per-token schedule: ab_table
KIND_UNIFORM = 2  # a_t, a_s
KIND_MATRIX = 3  # fact1, qbar_s, pair
KINDS = {"absorbing": KIND_ABSORBING, "absorbing_per_token": KIND_ABSORBING_PER_TOKEN, "uniform": KIND_UNIFORM,
         "matrix": KIND_MATRIX}


def int64_bits(v: int) -> int:
    """A uint64 counter word (seed, offset, row_offset in ``[0, 2**64)``) as the int64 with the same bits,
    the form every backend's kernel takes (a ``torch.library`` ``int`` is an int64)."""
    return v - (1 << 64) if v >= (1 << 63) else v


@dataclass(frozen=True)
class PosteriorPlan:
    kind: int  # one of KINDS' codes
    logits: torch.Tensor  # (N, V), the caller's dtype; row-contiguous (stride(-1) == 1)
    x_t: torch.Tensor  # (N,) int64
    t: torch.Tensor  # (N,) int64
    s: torch.Tensor  # (N,) int64
    vocab_size: int
    temperature: float
    mask_id: int = -1  # absorbing
    a_t: torch.Tensor | None = None  # (N,) float64: absorbing (scalar schedule), uniform
    a_s: torch.Tensor | None = None  # (N,) float64
    ab_table: torch.Tensor | None = None  # (T+1, V) float64 contiguous: absorbing, per-token schedule
    fact1: torch.Tensor | None = None  # (N, V) float64: matrix, Q_{t|s}[:, x_t]
    qbar_s: torch.Tensor | None = None  # (P, V, V) float64 contiguous: matrix
    pair: torch.Tensor | None = None  # (N,) int64 index into qbar_s: matrix

    @property
    def per_token(self) -> bool:
        return self.ab_table is not None

    @property
    def rows(self) -> int:
        return self.x_t.shape[0]

    def args(self, sample: bool, seed: int = 0, offset: int = 0, row_offset: int = 0) -> tuple:
        """The arguments of every backend's ``posterior`` entry point, in order (``FASTDIFF_SCHEMA_POSTERIOR``);
        ``seed``, ``offset``, ``row_offset`` as uint64 values (passed on as :func:`int64_bits`)."""
        return (self.logits, self.x_t, self.t, self.s, self.kind, self.mask_id, self.temperature, self.a_t,
                self.a_s, self.ab_table, self.fact1, self.qbar_s, self.pair, sample, int64_bits(seed),
                int64_bits(offset), int64_bits(row_offset))


def posterior_fake(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kind: int,
                   mask_id: int, temperature: float, a_t: torch.Tensor | None, a_s: torch.Tensor | None,
                   ab_table: torch.Tensor | None, fact1: torch.Tensor | None, qbar_s: torch.Tensor | None,
                   pair: torch.Tensor | None, sample: bool, seed: int, offset: int, row_offset: int) -> torch.Tensor:
    """The fake (meta) kernel of every backend's ``posterior`` op: only the output's shape and dtype."""
    if sample:
        return x_t.new_empty(x_t.shape, dtype=torch.int64)
    return logits.new_empty(logits.shape, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


#: the process kinds posterior_plan lowers; any other kind runs on the reference (backend "auto" falls back to
#: it, an explicit kernel backend refuses: :func:`check_lowerable`)
LOWERED_KINDS = ("absorbing", "uniform", "matrix")


def check_lowerable(process: DiscreteProcess, backend: str, name: str) -> bool:
    """Whether the kernels can run ``process`` (its ``kind`` is one :func:`posterior_plan` lowers). With
    ``backend="auto"`` a process they cannot run (a user's own closed-form kind) goes to the reference;
    an explicitly requested kernel backend ``name`` raises."""
    kind = getattr(process, "kind", None)
    if kind in LOWERED_KINDS:
        return True
    if backend == "auto":
        return False
    raise InputTypeError(f"process: the {name} backend has no kernel lowering for processes of kind {kind!r} "
                         f"(kernels run kinds {', '.join(LOWERED_KINDS)}); use backend='auto' or 'reference'")


def posterior_plan(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor,
                   ss: torch.Tensor, temperature: float) -> PosteriorPlan:
    """Lower checked arguments (``tt``, ``ss`` int64 expanded to ``x_t.shape``) to a plan.

    Tables are moved to the logits' device; ``logits`` is ``x0_logits.reshape(-1, V)`` made
    row-contiguous (a copy only when the last dimension is strided).
    """
    V = process.vocab_size
    dev = x0_logits.device
    logits = x0_logits.reshape(-1, V)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    xt = x_t.reshape(-1).to(device=dev, dtype=torch.int64).contiguous()
    t1 = tt.reshape(-1).to(device=dev, dtype=torch.int64).contiguous()
    s1 = ss.reshape(-1).to(device=dev, dtype=torch.int64).contiguous()
    common = dict(logits=logits, x_t=xt, t=t1, s=s1, vocab_size=V, temperature=float(temperature))
    kind = getattr(process, "kind", None)
    if kind == "absorbing":
        ab = process.schedule.alpha_bar.to(device=dev, dtype=torch.float64)
        if ab.ndim == 2:
            return PosteriorPlan(KIND_ABSORBING_PER_TOKEN, mask_id=process.mask_id, ab_table=ab.contiguous(),
                                 **common)
        return PosteriorPlan(KIND_ABSORBING, mask_id=process.mask_id, a_t=ab[t1].contiguous(),
                             a_s=ab[s1].contiguous(), **common)
    if kind == "uniform":
        ab = process.schedule.alpha_bar.to(device=dev, dtype=torch.float64)
        return PosteriorPlan(KIND_UNIFORM, a_t=ab[t1].contiguous(), a_s=ab[s1].contiguous(), **common)
    if kind == "matrix":
        pairs = torch.stack([t1, s1], -1)
        uniq, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        uniq_list = uniq.tolist()
        qbar = torch.stack([process.qbar(si) for _, si in uniq_list]).to(dev).contiguous() if uniq_list \
            else torch.zeros((0, V, V), dtype=torch.float64, device=dev)
        fact1 = torch.empty((xt.shape[0], V), dtype=torch.float64, device=dev)
        for k, (ti, si) in enumerate(uniq_list):
            sel = (inverse == k).nonzero().squeeze(-1)
            fact1[sel] = process.transition(si, ti).to(dev).T[xt[sel]]
        return PosteriorPlan(KIND_MATRIX, fact1=fact1, qbar_s=qbar, pair=inverse.to(torch.int64).contiguous(),
                             **common)
    raise InputTypeError(f"process: no kernel lowering for processes of kind {kind!r}")
