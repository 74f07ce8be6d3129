"""Continuous strategies: DDPM and DDIM over any step grid, with the clamping trick, self-conditioning,
classifier(-free) guidance, fixed positions and rounding to tokens at the end (and, with ``eos_id``, the
rounded tokens after a sequence's first EOS become ``pad_id``, as for the discrete strategies)."""

from __future__ import annotations

import torch

from .. import ops
from .. import random as _random
from ._discrete import _cut_at_eos
from ._engine import _Run
from ._options import step_grid
from ..errors import InputError


def _guided_x0(run: _Run, x0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """DDIM classifier guidance (Dhariwal & Nichol 2021, Alg. 2): ``ε' = ε - sqrt(1 - a_t)·s·∇ log p(y|x_t)``,
    returned as the x0 that ``ε'`` implies."""
    o, diff = run.o, run.process
    grad = _grad(run, x_t, t)
    a_t = float(diff.alpha_bar[t])
    eps = diff.to_eps(x0, x_t, t) - (1 - a_t) ** 0.5 * o.classifier_scale * grad
    return (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5


def _grad(run: _Run, x_t: torch.Tensor, t: int) -> torch.Tensor:
    tt = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
    with torch.enable_grad():
        g = run.o.classifier_grad(x_t, tt)
    if not isinstance(g, torch.Tensor) or g.shape != x_t.shape:
        raise InputError(f"classifier_grad: must return a tensor of shape {tuple(x_t.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise InputError("classifier_grad: returned NaN or inf")
    return g.to(x_t.dtype)


def run_continuous(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    o, diff = run.o, run.process
    emb = o.embedding.detach().to(run.device)
    B, L, D = run.B, run.L, emb.shape[1]
    known, vals = run.fixed.clone(), run.values.clone()  # positions whose token is decided, and the tokens
    x = _random.randn((B, L, D), seed=run.seed, offset=run.next_offset(), start=run.row_offset((B, L, D)),
                      dtype=emb.dtype, device=run.device)
    clean = torch.nn.functional.embedding(vals, emb)
    frozen = known.unsqueeze(-1)
    x = torch.where(frozen, clean, x)
    grid = step_grid(diff.T, run.steps)
    blocks = run.blocks()
    bar = run.progress(len(blocks) * (len(grid) - 1))
    try:
        for a, b in blocks:
            ctx_end = b if o.block_context == "prefix" else L
            prev_x0 = torch.zeros(B, ctx_end, D, dtype=emb.dtype, device=run.device) if o.self_condition else None
            final_idx = None
            for t, s in zip(grid[:-1], grid[1:]):
                x_ctx = x[:, :ctx_end]
                extra = {o.self_cond_kwarg: prev_x0} if o.self_condition else None
                out, _ = run.evaluate(x_ctx, t, extra=extra)
                # a model computing in another precision (a bf16 network on fp32 embeddings): its output
                # joins the sampler's state in the embedding's dtype (a new tensor; the model's is kept)
                x0 = diff.to_x0(out.to(x_ctx.dtype), x_ctx, t)
                if o.classifier_grad is not None and run.strategy == "ddim":
                    x0 = _guided_x0(run, x0, x_ctx, t)
                if o.self_condition:
                    prev_x0 = x0.detach()
                if o.clamp == "every" or (o.clamp == "last" and s == 0):
                    idx, x0 = ops.nearest_embedding(x0, emb.to(x0.dtype), o.metric, backend=o.backend)
                    if s == 0:  # the step to 0 returns x0 itself, so these are the block's tokens
                        final_idx = idx[:, a:b]
                x_s = _step(run, x0, x_ctx, t, s)
                x[:, a:b] = torch.where(frozen[:, a:b], clean[:, a:b], x_s[:, a:b])
                run.after_step(_round(run, x, emb, known, vals) if run.trajectory is not None else x, bar)
            tok = final_idx
            if tok is None and b < L:  # the finished block becomes clean context: round it
                tok = ops.nearest_embedding(x[:, a:b], emb, o.metric, backend=o.backend)[0]
            if tok is not None:
                vals[:, a:b] = torch.where(known[:, a:b], vals[:, a:b], tok)
                known[:, a:b] = True
                if b < L:
                    clean = torch.nn.functional.embedding(vals, emb)
                    frozen = known.unsqueeze(-1)
                    x = torch.where(frozen, clean, x)
    finally:
        if bar is not None:
            bar.close()
    tokens = vals if bool(known.all()) else _round(run, x, emb, known, vals)  # all decided: clamped / fixed
    if o.eos_id is not None:
        tokens = _cut_at_eos(run, tokens)
    return tokens, x


def _round(run: _Run, x: torch.Tensor, emb: torch.Tensor, known: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Rounding: the nearest embedding's token wherever the token is not decided yet."""
    tok = ops.nearest_embedding(x, emb.to(x.dtype), run.o.metric, backend=run.o.backend)[0]
    return torch.where(known, vals, tok)


def _step(run: _Run, x0: torch.Tensor, x_t: torch.Tensor, t: int, s: int) -> torch.Tensor:
    o, diff = run.o, run.process
    a_t, a_s = float(diff.alpha_bar[t]), float(diff.alpha_bar[s])
    if run.strategy == "ddim":
        eps = diff.to_eps(x0, x_t, t)
        sigma2 = o.eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        out = a_s**0.5 * x0 + max(0.0, 1 - a_s - sigma2) ** 0.5 * eps
        if o.eta > 0 and sigma2 > 0:
            out = out + sigma2**0.5 * _noise(run, x_t)
        return out
    mean, var = diff.q_posterior_mean_variance(x0, x_t, t, s)
    if diff.model_var == "fixed_large":
        var = torch.full_like(var, 1 - a_t / a_s)
    if o.classifier_grad is not None:  # Dhariwal & Nichol 2021, Alg. 1: mean + s·Σ·∇ log p(y|x_t)
        mean = mean + o.classifier_scale * var * _grad(run, x_t, t)
    if s == 0:
        return mean
    return mean + var.sqrt() * _noise(run, x_t)


def _noise(run: _Run, like: torch.Tensor) -> torch.Tensor:
    return _random.randn(tuple(like.shape), seed=run.seed, offset=run.next_offset(),
                         start=run.row_offset(like.shape), dtype=like.dtype, device=like.device)
