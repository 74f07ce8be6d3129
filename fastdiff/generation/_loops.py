"""The generation loops of :func:`fastdiff.generate`, one per model family, as generators of steps.

Every loop works on ``x (B, P + N)``: the prompts right-aligned in columns ``[0, P)`` (left padding), the
``N`` generated positions in ``[P, P + N)``. It yields a :class:`GenerationStep` after every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ops
from .. import random as _random
from ..discrete import Absorbing, Uniform
from ..errors import InputError
from ..schedules import Schedule
from . import _select as sel
from ._lm import LM


@dataclass
class GenerationStep:
    """One step of a generation: ``tokens (B, P + N)`` after the step (prompt right-aligned, the
    generated region ``[P, P + N)``), ``revealed (B, P + N)`` bool, the positions decided in this step,
    ``step`` (1-based, over the whole run), ``block`` (0-based), ``network_calls`` so far."""

    tokens: torch.Tensor
    revealed: torch.Tensor
    step: int
    block: int
    network_calls: int


@dataclass
class Run:
    """The state of one generation (set up by :func:`fastdiff.generation.iterate`)."""

    lm: LM
    x: torch.Tensor
    P: int
    N: int
    mask_id: int
    am: torch.Tensor | None
    pos: torch.Tensor | None
    seed: int
    o: Any  # the checked options (GenerateOptions)
    processors: list = field(default_factory=list)
    scores: torch.Tensor | None = None
    draws: int = 0
    steps: int = 0
    graphs: Any = None  # a _graph.GenerateGraphs when cuda_graph=True

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def L(self) -> int:
        return self.x.shape[1]

    def next_offset(self) -> int:
        k = self.draws
        self.draws += 1
        return k

    def processed(self, lg: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The candidates' logits rows ``lg (M, V)`` (a gathered copy) with the mask column at ``-inf`` when
        ``suppress_mask`` (SUBS), then the HF-style logits processors: ``proc(input_ids, scores)`` with
        ``input_ids`` the current sequence of each candidate's batch row, ``scores (M, V)``."""
        if self.o.suppress_mask and lg.numel():
            lg[:, self.mask_id] = float("-inf")
        if not self.processors or not lg.numel():
            return lg
        ids = self.x.index_select(0, rows)
        out = lg.float() if not lg.is_floating_point() else lg
        for proc in self.processors:
            res = proc(ids, out)
            if not isinstance(res, torch.Tensor) or res.shape != out.shape:
                raise InputError(f"logits_processor: {type(proc).__name__} returned "
                                 f"{tuple(res.shape) if isinstance(res, torch.Tensor) else type(res).__name__}, "
                                 f"expected a tensor of shape {tuple(out.shape)}")
            out = res
        return out

    def step_done(self, new: torch.Tensor, block: int) -> GenerationStep:
        self.steps += 1
        return GenerationStep(tokens=self.x, revealed=new, step=self.steps, block=block, network_calls=self.lm.calls)

    def record(self, sel_mask: torch.Tensor, c0: int, conf: torch.Tensor | None) -> None:
        """Scores of the positions decided now (columns ``c0 + j`` of ``x``)."""
        if self.scores is None or conf is None:
            return
        b, j = sel_mask.nonzero(as_tuple=True)
        col = j + c0 - self.P
        ok = col >= 0
        self.scores[b[ok], col[ok]] = conf[b[ok], j[ok]].to(self.scores.dtype)


# ----------------------------------------------------------------------------------------------------
# LLaDA / Fast-dLLM
# ----------------------------------------------------------------------------------------------------
def _masked_span(run: Run, lo: int, hi: int) -> tuple[int, int]:
    """``[first, last + 1)`` of the columns in ``[lo, hi)`` holding a mask in some row (``(hi, hi)`` when none):
    the only positions whose logits a step reads."""
    cols = (run.x[:, lo:hi] == run.mask_id).any(0).nonzero()
    if not cols.numel():
        return hi, hi
    return lo + int(cols[0]), lo + int(cols[-1]) + 1


def _guided(run: Run, t: float | int | torch.Tensor, keep: tuple[int, int] | None = None,
            x: torch.Tensor | None = None, am2: torch.Tensor | None = None, pos2: torch.Tensor | None = None
            ) -> torch.Tensor:
    """LLaDA's unsupervised classifier-free guidance: the unconditional pass has the prompt region masked,
    ``logits = un + (cfg_scale + 1)(cond - un)``, both passes in one batch.

    ``x`` (default ``run.x``), ``am2`` / ``pos2`` (default the run's mask and positions, doubled) and a
    ``t`` tensor of ``2B`` rows are a CUDA graph's static inputs (generation/_graph.py, which captures this
    function): only device ops that read no value on the host."""
    x = run.x if x is None else x
    P = run.P
    prompt = (torch.arange(x.shape[1], device=x.device) < P)[None, :] & (x != run.mask_id)
    x_u = torch.where(prompt, torch.full((), run.mask_id, dtype=x.dtype, device=x.device), x)
    if am2 is None and run.am is not None:
        am2 = torch.cat([run.am, run.am])
    if pos2 is None and run.pos is not None:
        pos2 = torch.cat([run.pos, run.pos])
    out = run.lm(torch.cat([x, x_u]), t, am2, pos2, run.mask_id + 1, keep=keep)
    cond, un = out.float().chunk(2)
    return un + (run.o.cfg_scale + 1.0) * (cond - un)


def _decide(run: Run, logits: torch.Tensor, c0: int, cand: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
    """LLaDA / Fast-dLLM's transfer step on the window ``x[:, c0:c0 + W]`` whose logits are ``logits (B, W, V)``
    and candidates ``cand (B, W)``: draw x0 (Gumbel-max law: argmax at temperature 0, else a categorical
    draw at the temperature), confidence = the softmax probability of x0 under the untempered logits
    (LLaDA's ``low_confidence``, the mask column included) or a uniform (``random``), then keep the ``k``
    most confident (per row), or Fast-dLLM's threshold / factor rule. Returns the decided positions.

    The top-k and threshold rules run as one :func:`fastdiff.ops.select_tokens` over the window (no gathered
    copy of the candidates' logits); logits processors, top-k / top-p filtering and the factor rule take
    the gathered path (:func:`_decide_gathered`), which draws and scores the same way."""
    o = run.o
    if not _llada_fusable(run):
        return _decide_gathered(run, logits, c0, cand, k)
    B, W = cand.shape
    offset = run.next_offset()
    uniform = None
    if o.remasking == "random":
        uniform = _random.uniform((B, run.L), seed=run.seed, offset=run.next_offset(), device=cand.device)
        uniform = uniform[:, c0:c0 + W]
    tokens, conf, chosen = sel.fused_step(
        logits, cand, backend=o.backend, confidence="random" if uniform is not None else "llada",
        temperature=o.temperature, seed=run.seed, offset=offset,
        counter_rows=sel.rank_counters(cand, run.L) if o.temperature > 0 else None,
        k=None if o.threshold is not None else k, threshold=o.threshold,
        exclude=run.mask_id if o.suppress_mask else None, uniform=uniform)
    win = run.x[:, c0:c0 + W]
    run.x[:, c0:c0 + W] = torch.where(chosen, tokens, win)
    run.record(chosen, c0, conf)
    return chosen


def _llada_fusable(run: Run) -> bool:
    """Whether a LLaDA / Fast-dLLM step runs as one :func:`fastdiff.ops.select_tokens`."""
    o = run.o
    return not run.processors and o.top_k is None and o.top_p is None and o.factor is None


def _dream_fusable(run: Run) -> bool:
    """Whether a Dream step runs as one :func:`fastdiff.ops.select_tokens` (confidence algs, no filtering)."""
    o = run.o
    return o.alg != "origin" and not run.processors and o.top_k is None and (o.top_p is None or o.top_p >= 1)


def _decide_gathered(run: Run, logits: torch.Tensor, c0: int, cand: torch.Tensor, k: torch.Tensor | None
                     ) -> torch.Tensor:
    """:func:`_decide` on the gathered ``(M, V)`` candidate rows, for what the fused op does not do."""
    o = run.o
    B, W = cand.shape
    rows, cols = cand.nonzero(as_tuple=True)
    lg = run.processed(logits[rows, cols], rows)
    sel.check_values(lg)
    spans = sel.row_spans(rows, B)
    x0 = sel.draw(lg, rows, spans, seed=run.seed, offset=run.next_offset(), temperature=o.temperature,
                  top_k=o.top_k, top_p=o.top_p, width=run.L, backend=o.backend)
    if o.remasking == "random":
        conf = sel.uniforms(rows, cols + c0, run.L, run.seed, run.next_offset())
        prob = conf
    else:
        prob = sel.log_prob_of(lg, x0).double().exp()
        conf = prob
    conf_d = sel.dense(conf, rows, cols, B, W)
    if o.factor is not None:
        chosen = sel.select_factor(conf_d, cand, o.factor)
    elif o.threshold is not None:
        chosen = sel.select_threshold(conf_d, cand, o.threshold)
    else:
        chosen = sel.select_top(conf_d, cand, k)
    x0_d = torch.zeros(B, W, dtype=torch.int64, device=cand.device)
    x0_d[rows, cols] = x0
    win = run.x[:, c0:c0 + W]
    run.x[:, c0:c0 + W] = torch.where(chosen, x0_d, win)
    run.record(chosen, c0, sel.dense(prob, rows, cols, B, W))
    return chosen


def _full(run: Run, chosen: torch.Tensor, c0: int) -> torch.Tensor:
    out = torch.zeros_like(run.x, dtype=torch.bool)
    out[:, c0:c0 + chosen.shape[1]] = chosen
    return out


def llada_loop(run: Run) -> Iterator[GenerationStep]:
    """LLaDA ``generate`` (Nie et al. 2025) and Fast-dLLM (Wu et al. 2025), block by block from the end of
    the prompt.

    * LLaDA (``threshold`` and ``factor`` None): ``steps // num_blocks`` steps per block, the block's masked
      count split evenly over them (remainder first); the candidates are the masked positions up to the
      block's end.
    * Fast-dLLM ``threshold`` / ``factor``: steps until the block has no mask left.
    * ``cache="prefix"``: the block's first step is a full forward that also fills the cache; the later
      steps run the suffix from the block start through the cached prefix. ``cache="dual"``: the later
      steps run the block only, prefix and suffix from the cache. Candidates then lie in the block.
    """
    o, P, N = run.o, run.P, run.N
    bl = o.block_length
    num_blocks = N // bl
    spb = o.steps // num_blocks
    mask = run.mask_id
    V = mask + 1
    for blk in range(num_blocks):
        s, e = P + blk * bl, P + (blk + 1) * bl
        schedule = None
        if o.threshold is None and o.factor is None:
            schedule = sel.num_transfer((run.x[:, s:e] == mask).sum(1), spb)
        kvc = None
        i = 0
        while True:
            if schedule is not None:
                if i >= spb:
                    break
                k = schedule[:, i]
                if not bool(k.any()):  # nothing to decide at this step: the network call would change nothing
                    i += 1
                    continue
            else:
                k = None
                if not bool((run.x[:, s:e] == mask).any()):
                    break
                if i >= o.max_block_steps:
                    break
            t = _llada_time(i, spb)
            if o.cache is None or i == 0:
                # the candidates are the masked positions before the block's end; logits are needed only
                # from the first of them (the model computes only those when it takes logits_to_keep)
                lo, _ = _masked_span(run, 0, e)
                lo = min(lo, s)
                if run.graphs is not None:  # the same step replayed as a CUDA graph (generation/_graph.py)
                    chosen = run.graphs.full(lo, e, t, k, fill=o.cache is not None)
                else:
                    if o.cache is None and o.cfg_scale > 0:
                        logits = _guided(run, t, (lo, e))
                    elif o.cache is None:
                        logits = run.lm(run.x, t, run.am, run.pos, V, keep=(lo, e))
                    else:
                        logits, kvc = run.lm.kv_forward(run.x, t, run.am, run.pos, V, keep=(lo, e))
                    cand = run.x[:, lo:e] == mask
                    chosen = _decide(run, logits, lo, cand, k)
                new = _full(run, chosen, lo)
            else:
                end = run.L if o.cache == "prefix" else e
                if run.graphs is not None:  # reads the cache of the block's first-step graph
                    chosen = run.graphs.window(s, end, e, t, k)
                else:
                    logits = run.lm.kv_window(run.x, s, end, t, kvc, run.am, run.pos, V, keep_to=e)
                    cand = run.x[:, s:e] == mask
                    chosen = _decide(run, logits[:, :e - s], s, cand, k)
                new = _full(run, chosen, s)
            i += 1
            yield run.step_done(new, blk)


def _llada_time(i: int, steps: int) -> int:
    """The integer step a fastdiff denoiser is given at decoding round ``i`` of ``steps`` (T = 1000)."""
    return max(1, min(1000, round(1000 * (steps - i) / max(steps, 1))))


# ----------------------------------------------------------------------------------------------------
# Dream
# ----------------------------------------------------------------------------------------------------
def dream_loop(run: Run) -> Iterator[GenerationStep]:
    """Dream ``diffusion_generate`` (Ye et al. 2025): ``steps`` steps over ``timesteps = linspace(1, eps,
    steps + 1)`` (float32), the logits shifted by one (position ``i`` predicted at ``i - 1``).

    * ``alg="origin"``: every masked position is decided with probability ``1 - s/t`` (1 at the last step),
      its token drawn from the (tempered, filtered) x0 distribution;
    * ``maskgit_plus`` / ``topk_margin`` / ``entropy``: confidence = probability of the drawn token / top-1
      minus top-2 probability / negative entropy, and ``int(mean masked · (1 - s/t))`` positions per row
      (all at the last step) are decided: the most confident (``alg_temp`` None or 0) or drawn without
      replacement from ``softmax(confidence / alg_temp)``.
    """
    o, mask = run.o, run.mask_id
    V = mask + 1
    ts = torch.linspace(1, o.eps, o.steps + 1, dtype=torch.float32)
    B, L = run.B, run.L
    for i in range(o.steps):
        cand = run.x == mask
        if not bool(cand.any()):
            break
        t, s = ts[i], ts[i + 1]
        last = i == o.steps - 1
        # logits on [P, L) every step (from the first masked column if one lies in the prompt): a fixed window,
        # so that cuda_graph=True captures one graph for the run (a window following the masked span moved
        # whenever its first or last column was decided: a capture nearly every step on a left-to-right
        # decode); the decided positions in it are no candidates, and the lm head's extra rows cost little
        lo, hi = min(_masked_span(run, 0, L)[0], run.P), L
        if run.graphs is not None:  # the same step replayed as a CUDA graph (generation/_graph.py)
            if o.alg == "origin":
                chosen, conf_d, x0_d = run.graphs.dream(lo, hi, _dream_time(float(t)), None,
                                                        1.0 if last else float(1 - s / t))
            else:
                chosen, conf_d, x0_d = run.graphs.dream(lo, hi, _dream_time(float(t)),
                                                        _dream_k(run, cand, t, s, last))
            run.x = torch.where(chosen, x0_d, run.x)
            run.record(chosen, 0, conf_d)
            yield run.step_done(chosen, 0)
            continue
        logits = run.lm(run.x, _dream_time(float(t)), run.am, run.pos, V, keep=(lo, hi))
        if _dream_fusable(run):
            chosen, conf_d, x0_d = _dream_fused(run, logits, lo, hi, cand, t, s, last)
            run.x = torch.where(chosen, x0_d, run.x)
            run.record(chosen, 0, conf_d)
            yield run.step_done(chosen, 0)
            continue
        rows, cols = cand.nonzero(as_tuple=True)
        lg = run.processed(logits[rows, cols - lo], rows)
        sel.check_values(lg)
        spans = sel.row_spans(rows, B)
        if o.alg == "origin":
            p = 1.0 if last else float(1 - s / t)
            u = sel.uniforms(rows, cols, L, run.seed, run.next_offset())
            go = u < p
            x0 = sel.draw(lg, rows, spans, seed=run.seed, offset=run.next_offset(), temperature=o.temperature,
                          top_k=o.top_k, top_p=o.top_p, width=L, backend=o.backend)
            chosen = sel.dense(go, rows, cols, B, L, fill=False)
            x0_d = sel.dense(x0, rows, cols, B, L, fill=0)
            conf_d = None
        else:
            probs = sel.dream_probs(lg, o.temperature, o.top_k, o.top_p)
            if o.temperature > 0:
                x0 = sel.draw(torch.log(probs), rows, spans, seed=run.seed, offset=run.next_offset(), temperature=1.0,
                              top_k=None, top_p=None, width=L, backend=o.backend)
            else:
                x0 = probs.argmax(-1)
            conf = sel.dream_confidence(probs, x0, o.temperature, o.alg)
            mean = cand.sum().to(torch.float32) / B
            n = sel.dream_count(mean, s, t, last)
            k = torch.minimum(torch.full((B,), n, dtype=torch.int64), cand.sum(1))
            conf_d = sel.dense(conf, rows, cols, B, L)
            if o.alg_temp:
                u = _random.uniform((B, L), seed=run.seed, offset=run.next_offset(), device=run.x.device)
                chosen = sel.gumbel_top(conf_d, cand, k, o.alg_temp, u)
            else:
                chosen = sel.select_top(conf_d, cand, k)
            x0_d = sel.dense(x0, rows, cols, B, L, fill=0)
        run.x = torch.where(chosen, x0_d, run.x)
        run.record(chosen, 0, conf_d)
        yield run.step_done(chosen, 0)


_DREAM_RULES = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "entropy"}


def _dream_fused(run: Run, logits: torch.Tensor, lo: int, hi: int, cand: torch.Tensor, t: torch.Tensor,
                 s: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dream confidence step (no filtering, no processors) as one :func:`fastdiff.ops.select_tokens`
    over the logits of columns ``[lo, hi)``: ``(chosen, confidences, tokens)``, all ``(B, L)``.

    The same law as the gathered path: Dream draws from ``log(float32 softmax(z / T))`` and this from
    ``z / T`` (one rounding less), so a draw can differ only where the uniform lies within float32 rounding
    of a CDF boundary; at temperature 0 the token is the argmax of the logits rather than of their float32
    softmax, which differ only between logits that round to the same probability."""
    o, mask = run.o, run.mask_id
    L = run.L
    win = cand[:, lo:hi]
    offset = run.next_offset() if o.temperature > 0 else 0
    k = _dream_k(run, cand, t, s, last)
    tokens, conf, chosen = sel.fused_step(
        logits, win, backend=o.backend, confidence=_DREAM_RULES[o.alg], temperature=o.temperature, seed=run.seed,
        offset=offset, counter_rows=sel.rank_counters(win, L) if o.temperature > 0 else None,
        k=None if o.alg_temp else k, exclude=mask if o.suppress_mask else None)
    u = None
    if o.alg_temp:
        u = _random.uniform((run.B, L), seed=run.seed, offset=run.next_offset(), device=run.x.device)
    return _dream_dense(run, cand, lo, hi, tokens, conf, chosen, k, u)


def _dream_k(run: Run, cand: torch.Tensor, t: torch.Tensor, s: torch.Tensor, last: bool) -> torch.Tensor:
    """Dream's count per row this step: ``min(int(mean masked · (1 - s/t)), row's masked count)``, ``(B,)``."""
    mean = cand.sum().to(torch.float32) / run.B
    n = sel.dream_count(mean, s, t, last)
    return torch.minimum(torch.full((run.B,), n, dtype=torch.int64, device=cand.device), cand.sum(1))


def _dream_dense(run: Run, cand: torch.Tensor, lo: int, hi: int, tokens: torch.Tensor, conf: torch.Tensor,
                 chosen: torch.Tensor, k: torch.Tensor, u: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Dream step's ``(chosen, confidences, tokens)`` on the whole ``(B, L)`` from select_tokens' window
    results (``alg_temp``: Gumbel-top-``k`` with the uniforms ``u (B, L)``). Only device ops that read no
    value on the host: the CUDA graph of a Dream step (generation/_graph.py) captures it."""
    B, L = run.B, run.L
    win = cand[:, lo:hi]
    conf_d = torch.full((B, L), float("-inf"), dtype=torch.float64, device=cand.device)
    conf_d[:, lo:hi] = torch.where(win, conf.double(), conf_d[:, lo:hi])
    if u is not None:
        full = sel.gumbel_top(conf_d, cand, k, run.o.alg_temp, u)
    else:
        full = torch.zeros(B, L, dtype=torch.bool, device=cand.device)
        full[:, lo:hi] = chosen
    x0_d = torch.zeros(B, L, dtype=torch.int64, device=cand.device)
    x0_d[:, lo:hi] = tokens
    return full, conf_d, x0_d


def _dream_time(t: float) -> int:
    return max(1, min(1000, round(1000 * t)))


# ----------------------------------------------------------------------------------------------------
# MDLM / DUO
# ----------------------------------------------------------------------------------------------------
def _sigma(move: float) -> float:
    """MDLM's log-linear noise: the model is conditioned on ``sigma = -log(1 - move chance)``."""
    return -math.log1p(-move) if move < 1 else float("inf")


def _mdlm_time(run: Run, t: float, move: float) -> float | int:
    """What the model is given at time ``t``: a fastdiff denoiser its integer step ``round(1000·t)``, any
    other model the log-linear ``sigma``."""
    return max(1, round(1000 * t)) if run.lm.fastdiff else _sigma(move)


def mdlm_loop(run: Run) -> Iterator[GenerationStep]:
    """MDLM (Sahoo et al. 2024) ancestral sampling with its caching update, and DUO's (Sahoo et al. 2025)
    uniform-state ancestral sampling (``preset="duo"``).

    Log-linear schedule: at time ``t`` a token is noised with probability ``(1 - eps)·t``, and the model is
    conditioned on ``sigma(t) = -log(1 - (1 - eps)·t)``. ``steps`` steps over ``linspace(1, eps, steps + 1)``,
    each the exact posterior ``p(x_s | x_t)`` of the x0 prediction (the mask column excluded: SUBS), then
    (``noise_removal``, MDLM's default) the positions still noisy take the argmax of one last call at
    ``eps``. MDLM's cache: when nothing changed and the model ignores the time (no time input), the
    previous x0 prediction is reused (no network call).
    """
    o, mask, N, P = run.o, run.mask_id, run.N, run.P
    uniform = o.preset == "duo"
    ts = torch.linspace(1, o.eps, o.steps + 1, dtype=torch.float64)
    dt = (1 - o.eps) / o.steps
    cached: torch.Tensor | None = None
    last_x: torch.Tensor | None = None
    reuse = not run.lm.takes_time and not uniform
    for i in range(o.steps):
        t = float(ts[i])
        s = t - dt
        move_t, move_s = (1 - o.eps) * t, max(0.0, (1 - o.eps) * s)
        region = run.x[:, P:]
        step = Schedule(torch.tensor([1.0, 1 - move_s, 1 - move_t], dtype=torch.float64), "mdlm-step")
        new = None
        if cached is not None and reuse and last_x is not None and torch.equal(last_x, run.x):
            lg = cached
        elif run.graphs is not None:  # forward + posterior kernel replayed as a CUDA graph (generation/_graph.py)
            new, lg = run.graphs.mdlm(_mdlm_time(run, t, move_t), step.alpha_bar)
            cached = lg  # the graph's static logits: replaced only by its next replay, a step that recomputes them
        else:
            logits = run.lm(run.x, _mdlm_time(run, t, move_t), run.am, run.pos, run.mask_id + 1)
            lg = logits[:, P:].float()
            if not uniform:
                lg = lg.clone()
                lg[..., mask] = float("-inf")
            cached = lg
        last_x = run.x.clone()
        if new is None:
            V = lg.shape[-1]
            proc = Uniform(V, step) if uniform else Absorbing(V, mask, step)
            flat_rows = lg.reshape(-1, lg.shape[-1])
            rows_b = torch.arange(run.B, device=run.x.device).repeat_interleave(N)
            lgp = run.processed(flat_rows, rows_b).reshape(lg.shape) if run.processors else lg
            new = ops.posterior_sample(proc, lgp, region, 2, 1, seed=run.seed, offset=run.next_offset(),
                                       temperature=o.temperature if o.temperature > 0 else 1.0, backend=o.backend)
        changed = new != region
        run.x = torch.cat([run.x[:, :P], new], 1)
        full = torch.zeros_like(run.x, dtype=torch.bool)
        full[:, P:] = changed
        yield run.step_done(full, 0)
    if o.noise_removal:
        logits = run.lm(run.x, _mdlm_time(run, o.eps, (1 - o.eps) * o.eps), run.am, run.pos, run.mask_id + 1)
        lg = logits[:, P:].float()
        if not uniform:
            lg = lg.clone()
            lg[..., mask] = float("-inf")
        region = run.x[:, P:]
        best = lg.argmax(-1)
        if uniform:
            final = best
        else:
            final = torch.where(region == mask, best, region)
        changed = final != region
        run.x = torch.cat([run.x[:, :P], final], 1)
        full = torch.zeros_like(run.x, dtype=torch.bool)
        full[:, P:] = changed
        yield run.step_done(full, 0)


# ----------------------------------------------------------------------------------------------------
# BD3-LM
# ----------------------------------------------------------------------------------------------------
def bd3lm_loop(run: Run) -> Iterator[GenerationStep]:
    """BD3-LM (Arriola et al. 2025) block by block on the model's block grid (blocks of ``block_length``
    aligned at position 0, as the model was trained), each block decoded by first-hitting sampling (Zheng
    et al. 2024, as BD3-LM samples): one step per masked position, each step decides one uniformly random
    masked position of the block, its token drawn from the x0 distribution (mask column excluded). With
    ``cache="kv"`` the finished blocks' keys and values are cached exactly (the model's ``new_cache`` /
    ``extend_cache``); without it the model runs on ``x[:, :block end]``."""
    o, mask, P = run.o, run.mask_id, run.P
    bl = o.block_length
    V = run.mask_id + 1
    L = run.L
    kv = run.lm.model.new_cache(run.B) if o.cache == "kv" else None
    first = (P // bl) * bl
    if kv is not None:
        for a in range(0, first, bl):
            kv = run.lm.model.extend_cache(kv, run.x[:, a:a + bl], a)
    for blk, a in enumerate(range(first, L, bl)):
        b = min(a + bl, L)
        while True:
            cand = run.x[:, a:b] == mask
            if not bool(cand.any()):
                break
            n_left = int(cand.sum(1).max())
            t = max(1, round(1000 * n_left / (b - a)))
            if run.graphs is not None:  # the same step replayed as a CUDA graph (generation/_graph.py)
                chosen = run.graphs.bd3lm(a, b, t, kv)
                full = torch.zeros_like(run.x, dtype=torch.bool)
                full[:, a:b] = chosen
                yield run.step_done(full, blk)
                continue
            if kv is not None:
                lg = run.lm.block(run.x[:, a:b], a, t, kv, V)
            else:
                lg = run.lm(run.x[:, :b], t, None, None, V)[:, a:b]
            lg = lg.float().clone()
            lg[..., mask] = float("-inf")
            rows, cols = cand.nonzero(as_tuple=True)
            lgc = run.processed(lg[rows, cols], rows)
            sel.check_values(lgc)
            spans = sel.row_spans(rows, run.B)
            x0 = sel.draw(lgc, rows, spans, seed=run.seed, offset=run.next_offset(),
                          temperature=o.temperature if o.temperature > 0 else 1.0, top_k=o.top_k, top_p=o.top_p,
                          width=L, backend=o.backend) if o.temperature > 0 else lgc.argmax(-1)
            u = _random.uniform((run.B, b - a), seed=run.seed, offset=run.next_offset(), device=run.x.device)
            keys = torch.where(cand, u, torch.full_like(u, -1.0))
            pick = keys.argmax(1)
            chosen = torch.zeros_like(cand)
            has = cand.any(1)
            chosen[has, pick[has]] = True
            x0_d = sel.dense(x0, rows, cols, run.B, b - a, fill=0)
            run.x[:, a:b] = torch.where(chosen, x0_d, run.x[:, a:b])
            full = torch.zeros_like(run.x, dtype=torch.bool)
            full[:, a:b] = chosen
            yield run.step_done(full, blk)
        if kv is not None and b < L:
            kv = run.lm.model.extend_cache(kv, run.x[:, a:b], a)


LOOPS = {"llada": llada_loop, "fast_dllm": llada_loop, "dream": dream_loop, "mdlm": mdlm_loop, "duo": mdlm_loop,
         "bd3lm": bd3lm_loop}
