"""Continuous strategies: DDPM and DDIM over any step grid, with the clamping trick, self-conditioning,
classifier(-free) guidance, fixed positions and rounding to tokens at the end (and, with ``eos_id``, the
rounded tokens after a sequence's first EOS become ``pad_id``, as for the discrete strategies).

:func:`run_continuous` is the family's loop; :func:`ddpm_step` and :func:`ddim_step` are the strategies'
steps (listed in :data:`fastdiff.sampling.strategies.TABLE`). The maths is the process's own
(:meth:`GaussianDiffusion.ddpm_step` / :meth:`~GaussianDiffusion.ddim_step`): the sampler supplies the
hooks (the clamp and the self-conditioning estimate as ``denoised_fn``, classifier guidance, and its
counter-based noise, drawn only when a step adds noise)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from ..continuous import ar_ddim_step, ar_step_pairs
from ..errors import InputError
from ._engine import _Run, step_grid


def ddpm_step(run: _Run, out: torch.Tensor, x_t: torch.Tensor, t: int, s: int,
              denoised_fn: Callable | None) -> torch.Tensor:
    o = run.o
    return run.process.ddpm_step(out, x_t, t, s, noise=run.noise, denoised_fn=denoised_fn,
                                 classifier_grad=_classifier_grad(run, t), classifier_scale=o.classifier_scale)


def ddim_step(run: _Run, out: torch.Tensor, x_t: torch.Tensor, t: int, s: int,
              denoised_fn: Callable | None) -> torch.Tensor:
    o = run.o
    return run.process.ddim_step(out, x_t, t, s, eta=o.eta, noise=run.noise, denoised_fn=denoised_fn,
                                 classifier_grad=_classifier_grad(run, t), classifier_scale=o.classifier_scale)


def _classifier_grad(run: _Run, t: int) -> Callable | None:
    """``classifier_grad`` as the process's hook: called with the step as a ``(B,)`` tensor and autograd
    on, its output checked (shape, finite) and cast to the vectors' dtype."""
    fn = run.o.classifier_grad
    if fn is None:
        return None

    def grad(x_t: torch.Tensor, _t: object) -> torch.Tensor:
        # autograd on, also under an outer torch.inference_mode (the pipeline's): the callable gets
        # ordinary tensors it may differentiate through
        with torch.inference_mode(False), torch.enable_grad():
            tt = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
            g = fn(x_t.clone(), tt)
        if not isinstance(g, torch.Tensor) or g.shape != x_t.shape:
            raise InputError(f"classifier_grad: must return a tensor of shape {tuple(x_t.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise InputError("classifier_grad: returned NaN or inf")
        return g.to(x_t.dtype)

    return grad


class _X0Hook:
    """The ``denoised_fn`` of one step: keeps the x0 estimate it receives (the next step's
    self-conditioning input) and, when ``clamp``, snaps it to the nearest embeddings, keeping their ids."""

    def __init__(self, run: _Run, emb: torch.Tensor, clamp: bool) -> None:
        self.run, self.emb, self.clamp = run, emb, clamp
        self.x0: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        self.x0 = x0
        if self.clamp:
            o = self.run.o
            self.idx, x0 = ops.nearest_embedding(x0, self.emb.to(x0.dtype), o.metric, backend=o.backend)
        return x0


def run_continuous(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The continuous loop: ``x_T ~ N(0, I)``, fixed positions as their clean embeddings, the blocks left
    to right (a finished block rounded and used as clean context), the rounding at the end. Returns
    ``(tokens, x)``."""
    o, diff, step = run.o, run.process, run.spec.step
    emb = o.embedding.detach().to(run.device)
    B, L, D = run.B, run.L, emb.shape[1]
    known, vals = run.fixed.clone(), run.values.clone()  # positions whose token is decided, and the tokens
    x = run.randn((B, L, D), emb.dtype)
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
                clamp = o.clamp == "every" or (o.clamp == "last" and s == 0)
                hook = _X0Hook(run, emb, clamp) if clamp or o.self_condition else None
                # a model computing in another precision (a bf16 network on fp32 embeddings): its output
                # joins the sampler's state in the embedding's dtype (a new tensor; the model's is kept)
                x_s = step(run, out.to(x_ctx.dtype), x_ctx, t, s, hook)
                if o.self_condition:
                    prev_x0 = hook.x0.detach()
                if clamp and s == 0:  # the step to 0 returns x0 itself, so these are the block's tokens
                    final_idx = hook.idx[:, a:b]
                x[:, a:b] = torch.where(frozen[:, a:b], clean[:, a:b], x_s[:, a:b])
                run.after_step(_round(run, x, emb, known, vals) if (run.trajectory is not None or run.o.callback is not None)
                               else x, bar)
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
        tokens = run.cut_at_eos(tokens)
    return tokens, x


def _round(run: _Run, x: torch.Tensor, emb: torch.Tensor, known: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Rounding: the nearest embedding's token wherever the token is not decided yet."""
    tok = ops.nearest_embedding(x, emb.to(x.dtype), run.o.metric, backend=run.o.backend)[0]
    return torch.where(known, vals, tok)


def ar_step(run: _Run, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
            denoised_fn: Callable | None) -> torch.Tensor:
    """AR-Diffusion's transition: every position from its own step ``t[n]`` to ``s[n]`` by DDIM (``eta``)."""
    return ar_ddim_step(run.process, out, x_t, t, s, eta=run.o.eta, noise=run.noise, denoised_fn=denoised_fn)


def run_ar(run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
    """AR-Diffusion's loop (Wu et al. 2023): ``x_T ~ N(0, I)``, fixed positions as clean embeddings, then
    ``steps`` sentence-level transitions from ``N + T`` to 0 (:func:`fastdiff.continuous.ar_step_pairs`,
    the anchor-point schedule with step skipping), the model called with the ``(B, L)`` per-position
    steps; a position is clamped (``clamp="last"``) at the transition that brings it to 0. Returns
    ``(tokens, x)``."""
    o, diff = run.o, run.process
    emb = o.embedding.detach().to(run.device)
    B, L, D = run.B, run.L, emb.shape[1]
    known, vals = run.fixed, run.values
    clean = torch.nn.functional.embedding(vals, emb)
    frozen = known.unsqueeze(-1)
    x = torch.where(frozen, clean, run.randn((B, L, D), emb.dtype))
    pairs = ar_step_pairs(L, diff.T, run.steps)
    prev_x0 = torch.zeros(B, L, D, dtype=emb.dtype, device=run.device) if o.self_condition else None
    bar = run.progress(len(pairs))
    try:
        for t_tok, s_tok in pairs:
            t_tok, s_tok = t_tok.to(run.device), s_tok.to(run.device)
            extra = {o.self_cond_kwarg: prev_x0} if o.self_condition else None
            out, _ = run.evaluate(x, t_tok, extra=extra)
            snap = (s_tok < t_tok) & (s_tok == 0) if o.clamp == "last" else None
            hook = _X0Hook(run, emb, o.clamp != "never") if o.clamp != "never" or o.self_condition else None
            if hook is not None and snap is not None:
                hook = _Masked(hook, snap)
            x_s = run.spec.step(run, out.to(x.dtype), x, t_tok, s_tok, hook)
            if o.self_condition:
                prev_x0 = hook.x0.detach()
            x = torch.where(frozen, clean, x_s)
            run.after_step(_round(run, x, emb, known, vals) if run.trajectory is not None else x, bar)
    finally:
        if bar is not None:
            bar.close()
    tokens = _round(run, x, emb, known, vals)
    if o.eos_id is not None:
        tokens = run.cut_at_eos(tokens)
    return tokens, x


class _Masked:
    """A clamping hook applied at the positions ``where`` only (the positions reaching 0 this step)."""

    def __init__(self, hook: _X0Hook, where: torch.Tensor) -> None:
        self.hook, self.where = hook, where

    @property
    def x0(self) -> torch.Tensor | None:
        return self.hook.x0

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        snapped = self.hook(x0)
        return torch.where(self.where.unsqueeze(-1), snapped, x0)
