"""Lowering of a discrete process and a step pair to the flat arrays a posterior kernel reads.

Every kernel backend (C++, CUDA, Triton) implements the same three row formulas on a
:class:`PosteriorPlan`, so none of them needs to know the process classes. With ``p`` the x0
distribution ``softmax(logits / temperature)`` of a row (absorbing: the mask logit is ignored, i.e.
treated as ``-inf``) and unnormalised posterior weights ``w``:

* ``"absorbing"`` (row with ``x_t == mask_id``; any other row keeps ``x_t`` and its logits are never
  read)::

      w_j    = (A_s(j) - A_t(j)) · p_j                  j ≠ mask_id
      w_mask = Σ_i p_i · (1 - A_s(i))

  with ``A_t(j) = a_t[n]`` for a scalar schedule and ``A_t(j) = ab_table[t[n], j]`` for a per-token
  (spindle) schedule.
* ``"uniform"``: ``r = a_t / a_s`` (0 when ``a_s == 0``)::

      w_j = (r·[j == x_t] + (1 - r)/V) · (a_s · p_j + (1 - a_s)/V)

* ``"matrix"`` (small V): ``w_j = fact1[n, j] · Σ_i p_i · qbar_s[pair[n], i, j]``.

Every kind: a row with ``Σ w == 0`` (``x_t`` unreachable from the x0 distribution, e.g. when ``-inf`` logits
leave no category that leads to it) keeps ``x_t``: one-hot probabilities, and ``x_t`` drawn.

``categorical_posterior`` returns ``w / Σ w`` (float32; float64 for float64 logits);
``posterior_sample`` draws ``min{j : cumsum(w)_j > u · Σ w}`` with ``u`` the float64 uniform of
Philox counter ``(row_offset + n, offset)`` (:func:`fastdiff.random.row_uniforms`), falling back to the last
positive-weight category when rounding leaves no index; accumulate ``w`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ..errors import InputTypeError

KINDS = ("absorbing", "uniform", "matrix")


@dataclass(frozen=True)
class PosteriorPlan:
    kind: str  # one of KINDS
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


def posterior_plan(process, x0_logits: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor,
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
            return PosteriorPlan("absorbing", mask_id=process.mask_id, ab_table=ab.contiguous(), **common)
        return PosteriorPlan("absorbing", mask_id=process.mask_id, a_t=ab[t1].contiguous(),
                             a_s=ab[s1].contiguous(), **common)
    if kind == "uniform":
        ab = process.schedule.alpha_bar.to(device=dev, dtype=torch.float64)
        return PosteriorPlan("uniform", a_t=ab[t1].contiguous(), a_s=ab[s1].contiguous(), **common)
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
        return PosteriorPlan("matrix", fact1=fact1, qbar_s=qbar, pair=inverse.to(torch.int64).contiguous(),
                             **common)
    raise InputTypeError(f"process: no kernel lowering for processes of kind {kind!r}")
