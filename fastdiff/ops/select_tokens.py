"""``select_tokens``: one decoding step of the confidence-based decoders, fused.

LLaDA's low-confidence remasking (Nie et al. 2025), Fast-dLLM's threshold decoding (Wu et al. 2025) and
Dream's confidence algorithms (Ye et al. 2025) all do, at every step and for every candidate position
(a masked position the step may decide): draw a token from the position's x0 logits, score it, then keep
the best-scoring candidates of each batch row. Done with separate PyTorch passes that is a softmax, a
gather, a log-sum-exp and a sort over ``(B, L, V)`` and ``(B, L)`` tensors; here it is one read of each
candidate's logits row (kernels: maximum, sums of exponentials, and what the score needs) and a small
selection over ``(B, L)``. Nothing of size ``(B, L, V)`` is written.

Scores (``confidence=``), with ``Tq = temperature`` if it is positive, else 1:

* ``"prob"``: ``softmax(z / Tq)[token]`` (Dream's ``maskgit_plus``);
* ``"llada"``: ``exp(log_softmax(z)[token])``, untempered, over the whole row (LLaDA's ``low_confidence``);
  its float32 log-probability is exponentiated in float64, and that float64 value is what the selection
  compares (as LLaDA / Fast-dLLM do in fastdiff.generation);
* ``"logprob"``: ``log_softmax(z)[token]`` (the confidence of fastdiff.sampling's strategies);
* ``"margin"``: top-1 minus top-2 of ``softmax(z / Tq)`` (Dream's ``topk_margin``; ``V = 1``: top-1);
* ``"entropy"``: ``sum p log(p + 1e-10)`` of ``p = softmax(z / Tq)`` (Dream's negative entropy);
* ``"random"``: the given ``uniform`` (LLaDA's ``remasking="random"``).

Selection: ``k`` (``(B,)`` int64 >= 0): the ``k[b]`` best candidates of row ``b`` (all if fewer), ties
to the lower position (the order of a stable descending sort, which fastdiff's decoders use);
``threshold``: the candidates scoring ``>= threshold``, plus always the best candidate of every row that
has one (lowest position among ties: ``argmax``); neither: every candidate.
"""

from __future__ import annotations

import torch

from .. import _checks
from .. import random as _random
from ..errors import InputError, InputTypeError
from . import _dispatch
from ._common import check_finite_above, check_temperature, draw_from_weights, rows_per_chunk
from ._plan import int64_bits
from .sample_categorical import filter_weights

KERNEL = "select_tokens"  # fastdiff.ops.backends.<backend>.select_tokens

RULES = ("prob", "llada", "logprob", "margin", "entropy", "random")
RULE_CODES = {r: i for i, r in enumerate(RULES)}  # the kernels' rule argument (FASTDIFF_SCHEMA_SELECT_TOKENS)
MODE_ALL, MODE_TOP_K, MODE_THRESHOLD = 0, 1, 2


def _non_negative(name: str, t: torch.Tensor) -> None:
    if not t.numel():
        return
    if _checks.tracing():
        _checks.graph_assert(t.min() >= 0, f"{name}: must be >= 0")
    elif int(t.min()) < 0:
        raise InputError(f"{name}: must be >= 0")


def _check(logits: torch.Tensor, candidates: torch.Tensor, confidence: str, temperature: float, seed: int,
           offset: int, counter_rows: torch.Tensor | None, k: torch.Tensor | None, threshold: float | None,
           exclude: int | None, uniform: torch.Tensor | None) -> tuple[int, float, float | None]:
    """Every argument but the logits' values; returns ``(seed, temperature, threshold)`` as Python numbers."""
    logits = _checks.dense("logits", _checks.floating("logits", logits))
    if logits.ndim != 3:
        raise InputError(f"logits: expected shape (B, L, V), got {tuple(logits.shape)}")
    B, L, V = logits.shape
    if V == 0:
        raise InputError("logits: empty vocabulary (last dimension is 0)")
    candidates = _checks.dense("candidates", _checks.tensor("candidates", candidates))
    if candidates.dtype != torch.bool:
        raise InputTypeError(f"candidates: expected a bool tensor, got {candidates.dtype}")
    if tuple(candidates.shape) != (B, L):
        raise InputError(f"candidates: shape {tuple(candidates.shape)} does not match the logits' (B, L) = {(B, L)}")
    _checks.same_device(logits=logits, candidates=candidates)
    _checks.choice("confidence", confidence, RULES)
    temperature = check_temperature(temperature, allow_zero=True)
    seed = _random._check_seed(seed)
    _random._check_offset(offset)
    if temperature > 0:
        if counter_rows is None:
            raise InputError("counter_rows: required when temperature > 0 (the Philox counter row of each draw)")
    if counter_rows is not None:
        counter_rows = _checks.dense("counter_rows", _checks.tensor("counter_rows", counter_rows))
        if counter_rows.dtype != torch.int64:
            raise InputTypeError(f"counter_rows: expected an int64 tensor, got {counter_rows.dtype}")
        if tuple(counter_rows.shape) != (B, L):
            raise InputError(f"counter_rows: shape {tuple(counter_rows.shape)} does not match (B, L) = {(B, L)}")
        _checks.same_device(logits=logits, counter_rows=counter_rows)
        _non_negative("counter_rows", counter_rows)
    if (confidence == "random") != (uniform is not None):
        raise InputError("uniform: required with confidence='random' and only then")
    if uniform is not None:
        uniform = _checks.dense("uniform", _checks.floating("uniform", uniform))
        if tuple(uniform.shape) != (B, L):
            raise InputError(f"uniform: shape {tuple(uniform.shape)} does not match (B, L) = {(B, L)}")
        _checks.same_device(logits=logits, uniform=uniform)
        _checks.no_nan("uniform", uniform)
    if k is not None and threshold is not None:
        raise InputError("k, threshold: give at most one selection rule")
    if k is not None:
        k = _checks.dense("k", _checks.tensor("k", k))
        if k.dtype != torch.int64:
            raise InputTypeError(f"k: expected an int64 tensor, got {k.dtype}")
        if tuple(k.shape) != (B,):
            raise InputError(f"k: expected shape (B,) = {(B,)}, got {tuple(k.shape)}")
        _checks.same_device(logits=logits, k=k)
        _non_negative("k", k)
    if threshold is not None:
        threshold = _checks.real("threshold", threshold)
    if exclude is not None:
        _checks.int64("exclude", exclude)
        if not 0 <= exclude < V:
            raise InputError(f"exclude: must lie in [0, {V}), got {exclude}")
    return seed, temperature, threshold


# ---- the reference ---------------------------------------------------------------------------------------
def _scores(z: torch.Tensor, tok: torch.Tensor, confidence: str, temperature: float) -> torch.Tensor:
    """float64 selection keys of candidate rows ``z (n, V)`` (a copy, mask column already at -inf), computed
    the way the callers have always computed them (float32 softmax / log-sum-exp)."""
    tq = temperature if temperature > 0 else 1.0
    zf = z.float()
    if confidence in ("llada", "logprob"):
        lp = zf.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(zf, -1)
        return lp.double().exp() if confidence == "llada" else lp.double()
    p = torch.softmax(zf / tq if tq != 1.0 else zf, -1)
    if confidence == "prob":
        return p.gather(-1, tok[:, None]).squeeze(-1).double()
    if confidence == "margin":
        top2 = p.topk(min(2, p.shape[-1]), -1).values
        return (top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)).double()
    return (p * torch.log(p + 1e-10)).sum(-1).double()  # entropy


def _select(key: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor | None, threshold: float | None
            ) -> torch.Tensor:
    """The selection on dense float64 keys ``(B, L)`` (values off candidates ignored)."""
    if k is None and threshold is None:
        return candidates.clone()
    B, L = key.shape
    # best first, ties to the lower position; candidates before every non-candidate (two stable sorts)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(candidates.gather(1, order).to(torch.int8), dim=1, descending=True,
                                       stable=True).indices)
    if k is not None:
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=key.device).expand_as(order))
        return candidates & (rank < k[:, None])
    sel = candidates & (key >= threshold)
    has = candidates.any(1)
    if L:
        best = order[:, 0]
        sel[has, best[has]] = True
    return sel


def _select_tokens_ref(logits: torch.Tensor, candidates: torch.Tensor, *, confidence: str, temperature: float,
                       seed: int, offset: int, counter_rows: torch.Tensor | None, k: torch.Tensor | None,
                       threshold: float | None, exclude: int | None, uniform: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's body, on checked arguments: the candidate rows in blocks of about
    ``rows_per_chunk(V)`` (each block a gathered copy), then the selection."""
    B, L, V = logits.shape
    dev = logits.device
    tokens = torch.zeros(B, L, dtype=torch.int64, device=dev)
    key = torch.full((B, L), float("-inf"), dtype=torch.float64, device=dev)
    rows, cols = candidates.nonzero(as_tuple=True)
    step = rows_per_chunk(V)
    for r0 in range(0, rows.numel(), step):
        rb, cb = rows[r0:r0 + step], cols[r0:r0 + step]
        z = logits[rb, cb]  # a copy
        if exclude is not None:
            z[:, exclude] = float("-inf")
        check_finite_above("logits", z, temperature if temperature > 0 else None)
        if temperature == 0:
            tok = z.argmax(-1)  # the first maximum
        else:  # sample_categorical's draw: float64 weights exp(z / T - max), inverse CDF of the row's uniform
            w = filter_weights(z.to(torch.float64) / temperature, None, None)
            tok = draw_from_weights(w, _random.row_uniforms(seed, offset, counter_rows[rb, cb]))
        tokens[rb, cb] = tok
        if confidence == "random":
            key[rb, cb] = uniform[rb, cb].double()
        else:
            key[rb, cb] = _scores(z, tok, confidence, temperature)
    conf = torch.where(candidates, key.float(), torch.full_like(key, float("-inf"), dtype=torch.float32))
    return tokens, conf, _select(key, candidates, k, threshold)


def select_tokens_ref(logits: torch.Tensor, candidates: torch.Tensor, *, confidence: str = "prob",
                      temperature: float = 0.0, seed: int = 0, offset: int = 0,
                      counter_rows: torch.Tensor | None = None, k: torch.Tensor | None = None,
                      threshold: float | None = None, exclude: int | None = None,
                      uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step over ``logits (B, L, V)`` at the positions ``candidates (B, L)`` (bool).

    Returns ``(tokens, confidence, selected)``, all ``(B, L)``: int64 tokens (0 off candidates), float32
    scores (``-inf`` off candidates; the rules are listed in the module docstring) and the bool selection.

    * ``temperature = 0``: the argmax (lowest index among ties); ``> 0``: a draw from ``softmax(z /
      temperature)`` exactly as :func:`fastdiff.ops.sample_categorical` draws it, with the float64 uniform of
      Philox counter ``(counter_rows[b, l], offset)`` under ``seed`` (:mod:`fastdiff.random`).
    * ``exclude``: a vocabulary column treated as ``-inf`` (SUBS: the mask token is never predicted); its
      values are then not read.
    * ``k`` / ``threshold`` / neither: the selection (module docstring). ``uniform (B, L)``: the scores of
      ``confidence="random"``.

    Only candidate rows are read; a NaN or ``+inf`` logit there, or a candidate row with every logit at
    ``-inf``, raises :class:`~fastdiff.errors.InputError` (``"logits: ..."``), on every backend before
    anything is returned. Scores are float32 computations: backends agree with this reference to float32
    rounding (about 1e-6 relative), so a selection can differ only between candidates whose scores lie that
    close; tokens at ``temperature > 0`` agree as :func:`fastdiff.ops.sample_categorical`'s backends do.
    """
    seed, temperature, threshold = _check(logits, candidates, confidence, temperature, seed, offset, counter_rows,
                                          k, threshold, exclude, uniform)
    return _select_tokens_ref(logits, candidates, confidence=confidence, temperature=temperature, seed=seed,
                              offset=offset, counter_rows=counter_rows, k=k, threshold=threshold, exclude=exclude,
                              uniform=uniform)


def select_tokens_fake(logits: torch.Tensor, candidates: torch.Tensor, counter_rows: torch.Tensor | None,
                       k: torch.Tensor | None, uniform: torch.Tensor | None, rule: int, temperature: float,
                       seed: int, offset: int, threshold: float, mode: int, exclude: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fake (meta) kernel of every backend's ``select_tokens`` op."""
    B, L = candidates.shape
    return (logits.new_empty((B, L), dtype=torch.int64), logits.new_empty((B, L), dtype=torch.float32),
            logits.new_empty((B, L), dtype=torch.bool))


def kernel_backend(backend: str, device: torch.device) -> str:
    """What a decoding loop run with ``backend`` passes to :func:`select_tokens`: ``backend`` itself when
    it has this op's kernel for ``device`` (or is "auto" / "reference"), else "reference" (so a backend that
    lacks this kernel still runs the loop's other ops)."""
    if backend in ("auto", "reference"):
        return backend
    try:
        return _dispatch.choose("select_tokens", KERNEL, backend, str(device))
    except _dispatch.BackendUnavailableError:
        return "reference"


def select_tokens(logits: torch.Tensor, candidates: torch.Tensor, *, confidence: str = "prob",
                  temperature: float = 0.0, seed: int = 0, offset: int = 0, counter_rows: torch.Tensor | None = None,
                  k: torch.Tensor | None = None, threshold: float | None = None, exclude: int | None = None,
                  uniform: torch.Tensor | None = None, backend: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`select_tokens_ref` on the fastest available backend (see :mod:`fastdiff.ops`). The kernels
    check the candidate rows' values in their own pass and raise the reference's errors."""
    seed, temperature, threshold = _check(logits, candidates, confidence, temperature, seed, offset, counter_rows,
                                          k, threshold, exclude, uniform)
    impl, _ = _dispatch.resolve("select_tokens", KERNEL, backend, logits.device)
    if impl is None:
        return _select_tokens_ref(logits, candidates, confidence=confidence, temperature=temperature, seed=seed,
                                  offset=offset, counter_rows=counter_rows, k=k, threshold=threshold,
                                  exclude=exclude, uniform=uniform)
    if logits.dtype == torch.float64 and 0 < temperature < 1:  # float64 z / T may overflow: the reference's check
        if _checks.tracing():
            check_finite_above("logits", torch.where(candidates[..., None], logits, 0.0), temperature)
        elif bool(candidates.any()):
            rows, cols = candidates.nonzero(as_tuple=True)
            check_finite_above("logits", logits[rows, cols], temperature)
    # The kernel ABI (FASTDIFF_SCHEMA_SELECT_TOKENS): logits with a unit column stride (any (B, L) strides),
    # the (B, L) / (B,) side tensors contiguous, "no selection" / "no exclusion" as mode 0 / exclude -1.
    if logits.stride(-1) != 1 and logits.shape[-1] != 1:
        logits = logits.contiguous()
    mode = MODE_TOP_K if k is not None else MODE_THRESHOLD if threshold is not None else MODE_ALL
    return impl.select_tokens(logits, candidates.contiguous(),
                              None if counter_rows is None else counter_rows.contiguous(),
                              None if k is None else k.contiguous(),
                              None if uniform is None else uniform.to(torch.float64).contiguous(),
                              RULE_CODES[confidence], float(temperature), int64_bits(seed), int64_bits(offset),
                              0.0 if threshold is None else float(threshold), mode,
                              -1 if exclude is None else int(exclude))
