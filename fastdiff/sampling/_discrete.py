"""Discrete strategies: ancestral D3PM/MDLM (with the MDLM cache), LLaDA low-confidence remasking,
Fast-dLLM threshold decoding and ReMDM remasking, block by block.

:func:`run_discrete` is the family's loop; the ``*_block`` functions are the strategies' steps, listed in
:data:`fastdiff.sampling.strategies.TABLE` (signature in its module docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .. import ops
from ..discrete import Absorbing
from ..errors import InputError
from ..ops._common import check_finite_above
from ..ops.select_tokens import kernel_backend
from ..schedules import Schedule
from ._engine import _Run, num_transfer, step_grid

if TYPE_CHECKING:
    from tqdm import tqdm

    from .._protocols import DiscreteProcess


def prior_tokens(run: _Run) -> torch.Tensor:
    """``x_T`` drawn from the process's prior by the inverse CDF with counter-based uniforms."""
    p = run.process.prior_probs((), run.device).to(torch.float64)
    c = torch.cumsum(p, 0)
    u = run.uniform((run.B, run.L))
    idx = torch.searchsorted(c, (u * c[-1]).reshape(-1), right=True).reshape(run.B, run.L)
    last_pos = int((p > 0).nonzero().max())
    return idx.clamp_max(last_pos)


class _Logits:
    """Network outputs for one block: the MDLM per-sequence cache, the EOS-finished rows, the KV path.

    Calls return ``(logits of the block (B, b - a, V), owned)``; ``owned`` is False while the tensor is
    the model's own output, which the strategies must not write to."""

    def __init__(self, run: _Run, a: int, b: int) -> None:
        self.run, self.a, self.b = run, a, b
        self.ctx_end = b if run.o.block_context == "prefix" else run.L
        self.buf: torch.Tensor | None = None
        self.owned = False
        self.last: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, bool]:
        run, a, b = self.run, self.a, self.b
        if run.o.kv_cache:
            return run.evaluate(x[:, a:b], t, extra={"cache": run.kv, "start": a}, ctx_fixed=run.prompt[:, a:b])
        x_ctx = x[:, : self.ctx_end]
        need = ~run.finished
        if run.o.cache and self.last is not None:
            need = need & (x_ctx != self.last).any(dim=1)
            # Copying the new rows into the kept logits costs about one write pass over them; when most
            # rows changed, evaluating the whole batch is cheaper than that copy (and gives the same
            # values for a model that ignores t).
            if 2 * int(need.sum()) > run.B:
                need = ~run.finished
        if bool(need.all()):
            self.buf, self.owned = run.evaluate(x_ctx, t)
        else:
            rows = need.nonzero().squeeze(1)
            if self.buf is None:
                V = run.vocab_size
                self.buf, self.owned = torch.zeros(run.B, x_ctx.shape[1], V, device=x.device), True
            if rows.numel():
                out, _ = run.evaluate(x_ctx.index_select(0, rows), t, rows=rows)
                if out.dtype != self.buf.dtype:
                    self.buf, self.owned = self.buf.to(out.dtype), True
                if self.owned:
                    self.buf.index_copy_(0, rows, out)
                else:  # the kept logits are the model's earlier output: copy, never write into it
                    self.buf, self.owned = self.buf.index_copy(0, rows, out), True
        if run.o.cache:
            self.last = x_ctx.clone()
        return self.buf[:, a:b], self.owned


def _restore(run: _Run, x: torch.Tensor, a: int, b: int, new: torch.Tensor) -> None:
    frozen = run.fixed[:, a:b]
    x[:, a:b] = torch.where(frozen, run.values[:, a:b], new)


def _without_mask(run: _Run, lr: torch.Tensor, owned: bool) -> torch.Tensor:
    """``lr`` with the mask column at ``-inf`` (SUBS: the mask is never predicted). A model that already
    puts ``-inf`` there (MDLM) is used as is; the sampler's own tensor is changed in place; a model's
    output is copied (out of place), never written to. The column's values are checked on the way (one
    strided read): a NaN or +inf there is the model's, not something to overwrite silently."""
    mask_id = run.process.mask_id
    top = lr[..., mask_id].amax() if lr.numel() else lr.new_full((), float("-inf"))
    if bool(torch.isnan(top)):
        raise InputError("logits: contains NaN")
    if bool(torch.isposinf(top)):
        raise InputError("logits: contains +inf")
    if bool(torch.isneginf(top)):
        return lr
    if owned:
        lr[..., mask_id] = float("-inf")
        return lr
    return lr.index_fill(-1, torch.tensor([mask_id], device=lr.device), float("-inf"))


def _top_k(run: _Run) -> int | None:
    """``top_k`` capped at the vocabulary (a larger k keeps everything, as k = V does)."""
    k = run.o.top_k
    return None if k is None else min(k, run.vocab_size)


def _two_stage(run: _Run, lr: torch.Tensor, owned: bool, xr: torch.Tensor, p_unmask: float, t: int) -> torch.Tensor:
    """Absorbing step with a filtered (top-k / top-p) x0 draw: a masked position is unmasked with
    probability ``p_unmask`` to a token drawn by :func:`fastdiff.ops.sample_categorical`. With SUBS and a
    scalar schedule this is exactly the posterior of the filtered x0 distribution."""
    o, mask_id = run.o, run.process.mask_id
    rows = run.row_offset(xr.shape)
    with run.op_values(t):
        lr = _without_mask(run, lr, owned)
        u = run.uniform(xr.shape)
        tok = ops.sample_categorical(lr, seed=run.seed, offset=run.next_offset(), row_offset=rows,
                                     temperature=o.temperature, top_k=_top_k(run), top_p=o.top_p, backend=o.backend)
    return torch.where((xr == mask_id) & (u < p_unmask), tok, xr)


def _logsumexp(z: torch.Tensor, block: int = 1 << 18) -> torch.Tensor:
    """``logsumexp(z, -1)`` in float32 over row blocks of about 1 MiB, so the temporaries stay in cache
    (``torch.logsumexp`` on the whole ``(B, L, V)`` tensor is several read passes slower).

    The row maxima it computes anyway also check the values: NaN, +inf, or a row with every entry at
    ``-inf`` raise :class:`~fastdiff.errors.InputError` (``"logits: ..."``, as the ops do)."""
    V = z.shape[-1]
    flat = z.reshape(-1, V)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=z.device)
    row_max = torch.empty(flat.shape[0], dtype=torch.float32, device=z.device)
    step = max(1, block // V)
    for r in range(0, flat.shape[0], step):
        c = flat[r:r + step].float()
        m = c.amax(-1, keepdim=True)
        row_max[r:r + step] = m.squeeze(-1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out[r:r + step] = (c - m).exp_().sum(-1).log_() + m.squeeze(-1)
    if row_max.numel():
        top = row_max.max()
        if bool(torch.isnan(top)):
            raise InputError("logits: contains NaN")
        if bool(torch.isposinf(top)):
            raise InputError("logits: contains +inf")
        if bool(torch.isneginf(row_max).any()):
            raise InputError("logits: a row has every logit at -inf (no category can be drawn)")
    return out.reshape(z.shape[:-1])


def _ab(process: DiscreteProcess, t: int) -> float:
    return float(process.schedule.alpha_bar[t])


def classifier_rows(run: _Run, x: torch.Tensor, a: int, b: int, t: int) -> torch.Tensor:
    """``classifier_grad(x_t, t)`` for the block: the user's callable gets the whole sequence ``x``
    ``(B, L)`` (a copy) and the step as a ``(B,)`` tensor, with autograd on (also under an outer
    ``torch.inference_mode``); its ``(B, L, V)`` output is checked (shape, finite) and the block's rows
    returned in float64."""
    fn = run.o.classifier_grad
    with torch.inference_mode(False), torch.enable_grad():
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        g = fn(x.clone(), tt)
    want = (x.shape[0], x.shape[1], run.vocab_size)
    if not isinstance(g, torch.Tensor) or tuple(g.shape) != want:
        raise InputError(f"classifier_grad: must return a tensor of shape {want} (the gradient with respect "
                         "to the one-hot x_t)")
    if not g.is_floating_point() or not bool(torch.isfinite(g).all()):
        raise InputError("classifier_grad: returned a non-float tensor, NaN or inf")
    return g[:, a:b].detach().to(torch.float64)


def _guided_posterior(run: _Run, lr: torch.Tensor, x: torch.Tensor, a: int, b: int, t: int, s: int) -> torch.Tensor:
    """One ancestral step under discrete classifier guidance, first order (DiGress, Vignac et al. 2023,
    §5; TAG, Nisonoff et al. 2024): ``log p(y | x_s) - log p(y | x_t) ≈ g·(onehot(x_s) - onehot(x_t))`` with
    ``g = ∇_{onehot(x_t)} log p(y | x_t)``, so each position's posterior is tilted by its gradient row:
    ``p(x_s | x_t, y) ∝ p(x_s | x_t)·exp(scale·g[x_s])`` (the ``x_t`` term is constant per position). The
    posterior is the process's own (:meth:`posterior_probs`, any kind), the draw
    :func:`fastdiff.ops.sample_categorical`'s, at the same counter offset as the unguided step."""
    o, process = run.o, run.process
    xr = x[:, a:b]
    g = classifier_rows(run, x, a, b, t)
    with run.op_values(t):
        check_finite_above("logits", lr)
        post = process.posterior_probs(process.x0_probs(lr, o.temperature), xr, t, s).to(torch.float64)
        guided = post.log() + o.classifier_scale * g  # -inf stays -inf: the tilt never adds support
        return ops.sample_categorical(guided, seed=run.seed, offset=run.next_offset(),
                                      row_offset=run.row_offset(xr.shape), backend=o.backend)


def ancestral_block(run: _Run, x: torch.Tensor, a: int, b: int, logits: _Logits, bar: tqdm | None) -> None:
    o, process = run.o, run.process
    grid = step_grid(process.T, run.steps)
    graphs = run.step_graphs
    for t, s in zip(grid[:-1], grid[1:]):
        if graphs is not None:  # network and posterior op replayed as one CUDA graph (_graph.py)
            new = graphs.step(run, x, a, b, logits.ctx_end, t, s, run.call_kw(logits.ctx_end))
            _restore(run, x, a, b, new)
            run.after_step(x, bar)
            continue
        lr, owned = logits(x, t)
        xr = x[:, a:b]
        if o.classifier_grad is not None:
            new = _guided_posterior(run, lr, x, a, b, t, s)
        elif o.top_k is not None or o.top_p is not None:
            a_t, a_s = _ab(process, t), _ab(process, s)
            new = _two_stage(run, lr, owned, xr, (a_s - a_t) / (1 - a_t) if a_t < 1 else 0.0, t)
        else:
            with run.op_values(t):
                new = ops.posterior_sample(process, lr, xr, t, s, seed=run.seed, offset=run.next_offset(),
                                           row_offset=run.row_offset(xr.shape), temperature=o.temperature,
                                           backend=o.backend)
        _restore(run, x, a, b, new)
        run.after_step(x, bar)


def _remask_sigma(run: _Run, t: int, s: int) -> float:
    """ReMDM's remasking probability ``σ_t`` (Wang et al. 2025, §3): ``σ_max = min(1, (1-α_s)/α_t)``;
    "rescale": ``η·σ_max``; "cap": ``min(η, σ_max)``; zero outside ``remask_window`` (fractions of T)."""
    o, process = run.o, run.process
    a_t, a_s = _ab(process, t), _ab(process, s)
    if a_t <= 0:
        return 0.0
    if o.remask_window is not None:
        lo, hi = o.remask_window
        if not (lo * process.T <= t <= hi * process.T):
            return 0.0
    smax = min(1.0, (1.0 - a_s) / a_t)
    return o.eta * smax if o.remask_schedule == "rescale" else min(o.eta, smax)


def remask_block(run: _Run, x: torch.Tensor, a: int, b: int, logits: _Logits, bar: tqdm | None) -> None:
    o, process = run.o, run.process
    mask_id = process.mask_id
    grid = step_grid(process.T, run.steps)
    for t, s in zip(grid[:-1], grid[1:]):
        lr, owned = logits(x, t)
        xr = x[:, a:b]
        a_t, a_s = _ab(process, t), _ab(process, s)
        sigma = _remask_sigma(run, t, s)
        # Masked rows: q(z_s | z_t = m, x) puts (α_s - (1-σ)α_t)/(1-α_t) on x and the rest on the mask,
        # i.e. the absorbing posterior of a two-point schedule with α_s' = α_s + σ·α_t.
        a_s_eff = min(1.0, max(a_t, a_s + sigma * a_t))
        if o.top_k is not None or o.top_p is not None:
            new = _two_stage(run, lr, owned, xr, (a_s_eff - a_t) / (1 - a_t) if a_t < 1 else 0.0, t)
        else:
            two = Absorbing(process.vocab_size, mask_id,
                            Schedule(torch.tensor([1.0, a_s_eff, a_t], dtype=torch.float64), "remdm-step"))
            with run.op_values(t):
                new = ops.posterior_sample(two, lr, xr, 2, 1, seed=run.seed, offset=run.next_offset(),
                                           row_offset=run.row_offset(xr.shape), temperature=o.temperature,
                                           backend=o.backend)
        # Unmasked rows: remasked with probability σ.
        u = run.uniform(xr.shape)
        remask = (xr != mask_id) & (u < sigma)
        new = torch.where(remask, torch.full_like(new, mask_id), new)
        _restore(run, x, a, b, new)
        run.after_step(x, bar)


def confidence_block(run: _Run, x: torch.Tensor, a: int, b: int, logits: _Logits, bar: tqdm | None) -> None:
    """LLaDA (Nie et al. 2025, Alg. 5): keep the ``k`` most confident predictions of each step (LLaDA's
    even split of the masked count over the steps), or ``k`` random ones (``remasking="random"``)."""
    _decode_block(run, x, a, b, logits, bar, count=_llada_count, random=run.o.remasking == "random")


def threshold_block(run: _Run, x: torch.Tensor, a: int, b: int, logits: _Logits, bar: tqdm | None) -> None:
    """Fast-dLLM (Wu et al. 2025) threshold decoding: keep every prediction above ``threshold``."""
    _decode_block(run, x, a, b, logits, bar, count=_threshold_count, random=False)


def _llada_count(run: _Run, k: int, n_steps: int, masked: torch.Tensor, remaining: torch.Tensor, conf: torch.Tensor,
                 schedule: torch.Tensor) -> torch.Tensor:
    return schedule[:, k] if k < schedule.shape[1] else torch.zeros_like(remaining)


def _threshold_count(run: _Run, k: int, n_steps: int, masked: torch.Tensor, remaining: torch.Tensor,
                     conf: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """Everything above the threshold, at least enough to finish in the steps left, at least one."""
    th = run.o.threshold
    above = (masked & (conf > math.log(th) if th > 0 else masked)).sum(1)
    need = -(-remaining // (n_steps - k))
    return torch.maximum(above, need).clamp_min(1)


def _fusable(run: _Run) -> bool:
    """Whether a confidence / threshold step draws through :func:`fastdiff.ops.select_tokens` (no top-k /
    top-p filter)."""
    return run.o.top_k is None and run.o.top_p is None


def _fused_tokens(run: _Run, lr: torch.Tensor, random: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and its confidence for every position of the block (``lr (B, W, V)``) in one
    :func:`fastdiff.ops.select_tokens` (which also checks every row's values): the draw keyed as
    :func:`fastdiff.ops.sample_categorical` keys it over the block, the confidence ``log p(x0)`` (or the
    step's uniforms when ``random``)."""
    o = run.o
    B, W = lr.shape[:2]
    mask_id = run.process.mask_id
    # SUBS: the op reads the mask column as -inf (no copy of the model's output, as _without_mask makes);
    # its values are checked first, as _without_mask checks them
    top = lr[..., mask_id].amax() if lr.numel() else lr.new_full((), float("-inf"))
    if bool(torch.isnan(top)):
        raise InputError("logits: contains NaN")
    if bool(torch.isposinf(top)):
        raise InputError("logits: contains +inf")
    offset = run.next_offset() if o.temperature > 0 else 0
    counters = None
    if o.temperature > 0:
        counters = run.row_offset((B, W)) + torch.arange(B * W, device=lr.device, dtype=torch.int64).reshape(B, W)
    everywhere = torch.ones(B, W, dtype=torch.bool, device=lr.device)
    x0, conf, _ = ops.select_tokens(lr, everywhere, confidence="logprob", temperature=o.temperature, seed=run.seed,
                                    offset=offset, counter_rows=counters, exclude=mask_id,
                                    backend=kernel_backend(o.backend, lr.device))
    if random:  # the uniforms themselves (float64), drawn after the tokens as before
        conf = run.uniform((B, W))
    return x0, conf


def _decode_block(run: _Run, x: torch.Tensor, a: int, b: int, logits: _Logits, bar: tqdm | None, *,
                  count: Callable[..., torch.Tensor], random: bool) -> None:
    """Predict every masked token, keep the most confident ones (by ``random`` uniforms instead when
    ``random``); ``count(...) -> (B,)`` says how many per row, unless ``tokens_per_step`` does."""
    o, process = run.o, run.process
    mask_id, T = process.mask_id, process.T
    masked0 = (x[:, a:b] == mask_id) & ~run.fixed[:, a:b]
    n0 = masked0.sum(1)
    tps = None if o.tokens_per_step is None else min(o.tokens_per_step, b - a)
    if tps is not None:
        n_steps = max(1, math.ceil(int(n0.max()) / tps)) if n0.numel() else 1
        schedule = None
    else:
        n_steps = run.steps
        # LLaDA's split over n_steps; past the block's length every later column is 0 and the block is
        # finished by then, so only the first min(n_steps, b - a) columns are built (steps may be huge).
        schedule = num_transfer(n0, min(n_steps, b - a))
    for k in range(n_steps):
        xr = x[:, a:b]
        masked = (xr == mask_id) & ~run.fixed[:, a:b]
        remaining = masked.sum(1)
        if not bool(remaining.any()):
            break
        t = max(1, min(T, round(T * (n_steps - k) / n_steps)))
        lr, owned = logits(x, t)
        with run.op_values(t):
            if _fusable(run):  # one pass: draws, log p(x0), and the value check of every row
                x0, conf = _fused_tokens(run, lr, random)
            else:
                lr = _without_mask(run, lr, owned)  # SUBS: never predict the mask
                if o.temperature == 0:
                    x0 = lr.argmax(-1)
                else:
                    x0 = ops.sample_categorical(lr, seed=run.seed, offset=run.next_offset(),
                                                row_offset=run.row_offset(xr.shape), temperature=o.temperature,
                                                top_k=_top_k(run), top_p=o.top_p, backend=o.backend)
                if random:
                    if o.temperature == 0:  # nothing above read the values: one reduction checks them
                        check_finite_above("logits", lr)
                    conf = run.uniform(xr.shape)
                else:  # log p(x0) under softmax(logits); its row maxima check the values
                    conf = lr.gather(-1, x0.unsqueeze(-1)).squeeze(-1).float() - _logsumexp(lr)
        conf = torch.where(masked, conf.to(torch.float64), torch.full_like(conf, float("-inf"), dtype=torch.float64))
        if tps is not None:
            num = remaining.clamp_max(tps)
        else:
            num = count(run, k, n_steps, masked, remaining, conf, schedule)
        num = torch.minimum(num, remaining)
        order = torch.sort(conf, dim=1, descending=True, stable=True).indices  # ties: lower position first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(xr.shape[1], device=x.device).expand_as(order))
        sel = masked & (rank < num[:, None])
        _restore(run, x, a, b, torch.where(sel, x0, xr))
        run.after_step(x, bar)


def run_discrete(run: _Run) -> tuple[torch.Tensor, None]:
    """The discrete loop: ``x_T`` from the prior, the fixed positions held, the blocks left to right
    (each decoded by the strategy's step), EOS stopping between blocks. Returns ``(tokens, None)``."""
    o = run.o
    x = prior_tokens(run)
    x = torch.where(run.fixed, run.values, x)
    if o.kv_cache:
        run.start_kv()
    blocks = run.blocks()
    per_block = run.rounds_per_block()
    bar = run.progress(len(blocks) * per_block if per_block else None)
    try:
        for a, b in blocks:
            if bool(run.finished.all()):
                break
            run.spec.step(run, x, a, b, _Logits(run, a, b), bar)
            if o.kv_cache:
                run.extend_kv(x, a, b)
            if o.eos_id is not None and b < run.L:
                run.stop_at_eos(x, a, b)
    finally:
        if bar is not None:
            bar.close()
    if o.eos_id is not None:
        x = run.cut_at_eos(x)
    return x, None
