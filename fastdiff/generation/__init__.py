"""``fastdiff.generate``: generation in the terms of the diffusion LMs people run (LLaDA, Fast-dLLM, Dream,
MDLM / DUO, BD3-LM), with their own semantics, as a drop-in for their ``generate()``.

``out = fastdiff.generate(model, input_ids, attention_mask=None, *, max_new_tokens, steps, preset="llada", ...)``

``out.sequences (B, P + max_new_tokens)`` holds the prompts and what was generated, in the input's padding
side; ``out.lengths``, ``out.finished`` (an EOS was generated), ``out.scores`` (``output_scores=True``: the
confidence at which each generated token was decided) and ``out.stats`` (network calls, steps, tokens/s).
:func:`iterate` yields a :class:`GenerationStep` after every step (streaming); ``callback=`` is called with
each. :func:`fastdiff.sampling.sample` stays the lower layer for fastdiff's own processes and strategies.

Prompts and padding
-------------------
``input_ids (B, P)`` with ``attention_mask (B, P)`` (1 = real token), left- or right-padded (each row's
real tokens contiguous). Internally the prompts are right-aligned (left padding) and the ``N =
max_new_tokens`` generated positions follow at columns ``[P, P + N)``; the model gets ``attention_mask``
over the whole sequence (when the batch has padding and it takes the keyword) and ``position_ids =
cumsum(attention_mask) - 1`` (when it takes that keyword), so a padded row sees exactly what it would see
alone. A right-padded batch comes back right-padded (each row: its prompt, its generated tokens, pads).

Blocks (``block_length``, presets llada / fast_dllm)
-----------------------------------------------------
Semi-autoregressive decoding as LLaDA does it: the generated region is cut into ``max_new_tokens //
block_length`` blocks counted from the end of the prompt (``block_length`` must divide
``max_new_tokens``); they are decided left to right; while a block is decided the model sees the whole
sequence (the prompt, the finished blocks, the current block and the later blocks still masked).
``steps`` counts in total: ``steps // num_blocks`` per block (``steps`` must be a multiple of the number of
blocks, LLaDA's rule). ``block_length=None`` is one block. For bd3lm, blocks are the model's own grid
(aligned at position 0, ``block_length`` defaults to the model's ``config.block_size``).

Presets (the published algorithm each reproduces, token for token when greedy)
------------------------------------------------------------------------------
* ``"llada"``: LLaDA ``generate`` (Nie et al. 2025). Each step draws x0 at every candidate (the masked
  positions up to the current block's end; argmax at ``temperature=0``, else a categorical draw at the
  temperature: the law of LLaDA's float64 Gumbel-max), scores it (``remasking="low_confidence"``: its
  softmax probability under the untempered logits over the whole vocabulary, mask column included, as
  LLaDA computes it; ``"random"``: a uniform) and keeps the ``k`` best, ``k`` from LLaDA's even split of
  the block's masked count over its steps. ``cfg_scale`` is LLaDA's: ``un + (cfg_scale + 1)(cond - un)``,
  the unconditional pass with the prompt region masked (fastdiff's ``guidance_scale`` is ``cfg_scale + 1``).
* ``"fast_dllm"``: Fast-dLLM (Wu et al. 2025). ``threshold``: every candidate with confidence ``>=
  threshold`` and always the best one; ``factor``: Fast-dLLM's factor rule (see
  :func:`~fastdiff.generation._select.select_factor`); steps until the block has no mask. Neither: as llada.
  ``cache="prefix"`` / ``"dual"``: Fast-dLLM's approximate caches (below).
* ``"dream"``: Dream ``diffusion_generate`` (Ye et al. 2025): logits shifted by one (position ``i`` is
  predicted at ``i - 1``; ``shift_logits``), ``alg`` = ``origin | maskgit_plus | topk_margin | entropy``,
  ``alg_temp``, ``eps``, ``top_p`` / ``top_k``; no blocks.
* ``"mdlm"``: MDLM (Sahoo et al. 2024) ancestral sampling with its caching update and final noise removal;
  the model is conditioned on the log-linear ``sigma`` (second positional argument, or ``timesteps=`` /
  ``sigma=``; none if it takes no time, which enables the cache).
* ``"duo"``: DUO (Sahoo et al. 2025) uniform-state ancestral sampling (no mask token), same schedule.
* ``"bd3lm"``: BD3-LM (Arriola et al. 2025): blocks on the model's grid, first-hitting sampling (one
  uniformly random masked position per step), ``cache="kv"`` the exact KV cache of a block-causal model.

Caches
------
``cache="prefix"`` / ``"dual"`` (llada / fast_dllm; a model with ``kv_forward`` / ``kv_window``, see
``docs/generation.md``): a block's first step is a full forward that fills the cache; later steps of the
block run only the suffix from the block start (prefix) or the block itself (dual), reading the other
positions' keys and values from the cache, refreshed at the next block. Approximate: the cached keys are
those of the block's first step (Fast-dLLM reports the effect as small; ``benchmarks/`` measures it).
``cache="kv"`` (bd3lm): exact.

CUDA graphs
-----------
``cuda_graph=True`` (CUDA tensors, every preset): every step's network forward and its op replayed as one
CUDA graph per static shape, the step's inputs (sequence, time, counts, the random counters and uniforms,
MDLM's step schedule) copied into static buffers before each replay. LLaDA / Fast-dLLM: the forward on the
step's window (with ``cfg_scale`` both guidance passes and their combination) and the fused selection; with
``cache="prefix"`` / ``"dual"`` a block's first step (``kv_forward``) is its own graph whose cache the block's
window graph reads, so the cache is refreshed at each block start as eagerly. Dream: the forward on the
generated region (one graph for the run) and the fused selection (its four algs, ``alg_temp``). MDLM / DUO: the forward and the posterior
kernel (MDLM's cache reuses the graph's logits; the final argmax call is eager). BD3-LM: one graph per
block, with or without ``cache="kv"``. The tokens are the eager path's. Host-side between replays, as
eagerly: the masked columns, the counts, the end of a block, the write of the decided tokens, the value
check. Out of scope, refused with ``InputError`` naming ``cuda_graph`` before any network call:
``logits_processor``, ``top_k`` / ``top_p`` (Dream: ``top_p < 1``), ``factor``, a non-CUDA device or kernel
backend. Details: :mod:`fastdiff.generation._graph`.

Randomness
----------
``seed``: an int, or a ``torch.Generator`` from which one 63-bit seed is drawn. Every draw uses fastdiff's
counter-based generator keyed by the seed, the draw's index and the batch row, so a row's tokens do not
depend on the other rows. The laws are the published algorithms'; the random streams are not theirs
(LLaDA's and Dream's use torch's global generator), so only greedy runs match token for token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import _checks
from .. import random as _random
from ..errors import InputError, InputTypeError
from ._lm import LM, is_fastdiff_denoiser, unwrap_logits
from . import _graph
from ._loops import LOOPS, GenerationStep, Run

__all__ = ["GenerateOutput", "GenerationStep", "PRESETS", "generate", "iterate", "unwrap_logits"]

PRESETS = ("llada", "fast_dllm", "dream", "mdlm", "duo", "bd3lm")
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
CACHES = {"llada": ("prefix", "dual"), "fast_dllm": ("prefix", "dual"), "dream": (), "mdlm": (), "duo": (),
          "bd3lm": ("kv",)}

#: options each preset reads beyond the common ones (a non-default value of another is an error)
_READS = {
    "llada": ("remasking", "cfg_scale", "block_length", "cache"),
    "fast_dllm": ("remasking", "threshold", "factor", "block_length", "cache"),
    "dream": ("alg", "alg_temp", "eps"),
    "mdlm": ("eps", "noise_removal"),
    "duo": ("eps", "noise_removal", "vocab_size"),
    "bd3lm": ("block_length", "cache"),
}
_DEFAULTS = {"remasking": "low_confidence", "cfg_scale": 0.0, "threshold": None, "factor": None,
             "block_length": None, "cache": None, "alg": "origin", "alg_temp": None, "eps": 1e-3,
             "noise_removal": True, "vocab_size": None}


@dataclass
class GenerateOutput:
    """``sequences (B, P + N)`` int64 (prompt and generated tokens, in the input's padding side);
    ``lengths (B,)`` real tokens per row (prompt + generated, up to and including the first EOS);
    ``finished (B,)`` bool, the row generated ``eos_token_id``; ``scores (B, N)`` float32 (the confidence
    at which each generated position was decided; NaN where none) or None; ``stats``."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    scores: torch.Tensor | None
    stats: dict


@dataclass
class _Options:
    preset: str
    max_new_tokens: int
    steps: int
    block_length: int | None
    mask_id: int | None
    temperature: float
    top_p: float | None
    top_k: int | None
    remasking: str
    cfg_scale: float
    threshold: float | None
    factor: float | None
    alg: str
    alg_temp: float | None
    eps: float
    cache: str | None
    shift_logits: bool | None
    eos_token_id: int | None
    pad_token_id: int | None
    noise_removal: bool
    vocab_size: int | None
    backend: str
    suppress_mask: bool = False
    max_block_steps: int = 0


def _model_attr(model: object, *names: str) -> Any:
    for holder in (model, getattr(model, "config", None), getattr(getattr(model, "model", None), "config", None)):
        if holder is None:
            continue
        for n in names:
            v = holder.get(n) if isinstance(holder, dict) else getattr(holder, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _check_options(model: object, o: _Options, given: dict) -> None:
    _checks.choice("preset", o.preset, PRESETS)
    _checks.positive_int("max_new_tokens", o.max_new_tokens)
    _checks.positive_int("steps", o.steps)
    for name, default in _DEFAULTS.items():
        if name in given and name not in _READS[o.preset] and given[name] != default:
            readers = [p for p, r in _READS.items() if name in r]
            raise InputError(f"{name}: preset {o.preset!r} does not read it (presets that do: {readers})")
    if not isinstance(o.temperature, (int, float)) or isinstance(o.temperature, bool) or not math.isfinite(o.temperature) \
            or o.temperature < 0:
        raise InputError(f"temperature: expected a finite float >= 0, got {o.temperature!r}")
    if o.preset in ("mdlm", "duo") and o.temperature == 0:
        raise InputError(f"temperature: preset {o.preset!r} samples ancestrally (its greedy end is noise_removal); "
                         "use temperature > 0 (1.0 is the published sampler)")
    if o.top_k is not None:
        _checks.positive_int("top_k", o.top_k)
    if o.top_p is not None:
        _checks.real("top_p", o.top_p, 0.0, 1.0, lo_open=True)
    _checks.choice("remasking", o.remasking, ("low_confidence", "random"))
    _checks.real("cfg_scale", o.cfg_scale, 0.0, math.inf)
    if o.threshold is not None:
        _checks.real("threshold", o.threshold, 0.0, 1.0)
    if o.factor is not None:
        _checks.real("factor", o.factor, 0.0, math.inf, lo_open=True)
    if o.threshold is not None and o.factor is not None:
        raise InputError("factor: give threshold or factor, not both (Fast-dLLM's two parallel-decoding rules)")
    _checks.choice("alg", o.alg, ALGS)
    if o.alg_temp is not None:
        _checks.real("alg_temp", o.alg_temp, 0.0, math.inf)
    _checks.real("eps", o.eps, 0.0, 1.0, lo_open=True, hi_open=True)
    if o.cache is not None:
        _checks.choice("cache", o.cache, ("prefix", "dual", "kv"))
        if o.cache not in CACHES[o.preset]:
            raise InputError(f"cache: {o.cache!r} is not a cache of preset {o.preset!r} (it has: "
                             f"{list(CACHES[o.preset]) or 'none'})")
        if o.cache in ("prefix", "dual") and not (callable(getattr(model, "kv_forward", None))
                                                  and callable(getattr(model, "kv_window", None))):
            raise InputError(f"cache: {o.cache!r} needs a model with kv_forward / kv_window (the Fast-dLLM cache "
                             f"protocol, docs/generation.md); {type(model).__name__} has not")
        if o.cache == "kv" and not (callable(getattr(model, "new_cache", None))
                                    and callable(getattr(model, "extend_cache", None))):
            raise InputError(f"cache: 'kv' needs a block-causal model with new_cache / extend_cache; "
                             f"{type(model).__name__} has not")
        if o.cfg_scale > 0:
            raise InputError("cfg_scale: classifier-free guidance does not combine with cache= (Fast-dLLM's caches "
                             "hold one pass)")
    if o.backend not in ("auto", "reference", "cpp", "cuda", "triton"):
        raise InputError(f"backend: expected one of auto, reference, cpp, cuda, triton, got {o.backend!r}")
    for name in ("eos_token_id", "pad_token_id", "mask_id", "vocab_size"):
        v = getattr(o, name)
        if v is not None:
            _checks.positive_int(name, v, 1 if name == "vocab_size" else 0)


def _blocks(model: object, o: _Options) -> None:
    N = o.max_new_tokens
    if o.preset == "bd3lm":
        if o.block_length is None:
            o.block_length = _model_attr(model, "block_size", "block_length")
            if not o.block_length:
                raise InputError("block_length: preset 'bd3lm' needs the model's block size (block_length=, or a "
                                 "model with config.block_size)")
        _checks.positive_int("block_length", o.block_length)
        return
    if o.preset not in ("llada", "fast_dllm"):
        return
    if o.block_length is None:
        o.block_length = N
    _checks.positive_int("block_length", o.block_length)
    if N % o.block_length:
        raise InputError(f"block_length: {o.block_length} does not divide max_new_tokens={N} (LLaDA's blocks tile "
                         "the generated region)")
    nb = N // o.block_length
    if o.steps % nb:
        raise InputError(f"steps: {o.steps} is not a multiple of the {nb} blocks (steps counts in total, "
                         f"steps // num_blocks per block, LLaDA's rule)")
    o.max_block_steps = o.block_length


def _resolve_mask_id(model: object, o: _Options) -> int | None:
    if o.preset == "duo":
        return o.mask_id
    if o.mask_id is not None:
        declared = getattr(model, "mask_id", None)
        if isinstance(declared, int) and declared != o.mask_id:
            raise InputError(f"mask_id: {o.mask_id} differs from the model adapter's mask_id {declared}")
        return o.mask_id
    found = _model_attr(model, "mask_id", "mask_token_id")
    if found is None:
        raise InputError("mask_id: not given and the model declares none (model.mask_id / config.mask_token_id); "
                         "pass the tokenizer's mask token id (LLaDA: 126336)")
    return found


def _seed(seed: int | torch.Generator) -> int:
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**63 - 1, (1,), generator=seed, device=seed.device).item())
    return _random._check_seed(seed)


def _processors(p: object) -> list:
    if p is None:
        return []
    if callable(p) and not isinstance(p, (list, tuple)):
        items = list(p) if isinstance(p, Iterable) else [p]
    elif isinstance(p, Iterable):
        items = list(p)
    else:
        raise InputTypeError(f"logits_processor: expected a callable or a list of callables, got {type(p).__name__}")
    for q in items:
        if not callable(q):
            raise InputTypeError(f"logits_processor: {type(q).__name__} is not callable")
    return items


def _prompts(input_ids: object, attention_mask: object) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, str]:
    """``(ids, mask or None, lengths, side)``: the checked prompts, left-aligned to the right (left padding),
    ``side`` "left" / "right" / "none" as given."""
    ids = _checks.dense("input_ids", _checks.integer("input_ids", input_ids))
    if ids.ndim == 1:
        raise InputError(f"input_ids: expected a (batch, length) tensor, got shape {tuple(ids.shape)} (add a batch "
                         "dimension: input_ids[None])")
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise InputError(f"input_ids: expected a (batch >= 1, length) tensor, got shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    B, P = ids.shape
    if attention_mask is None:
        return ids, None, torch.full((B,), P, dtype=torch.int64, device=ids.device), "none"
    am = _checks.dense("attention_mask", _checks.tensor("attention_mask", attention_mask))
    if am.shape != ids.shape:
        raise InputError(f"attention_mask: expected shape {tuple(ids.shape)} (as input_ids), got {tuple(am.shape)}")
    if am.device != ids.device:
        raise InputError(f"attention_mask: on {am.device}, input_ids on {ids.device}")
    if am.dtype == torch.bool:
        m = am
    else:
        if not bool(((am == 0) | (am == 1)).all()):
            raise InputError("attention_mask: expected 0/1 values (1 = real token)")
        m = am != 0
    lengths = m.sum(1)
    if bool(m.all()):
        return ids, None, lengths, "none"
    ar = torch.arange(P, device=ids.device)[None, :]
    left = m == (ar >= (P - lengths)[:, None])
    right = m == (ar < lengths[:, None])
    if bool(left.all()):
        side = "left"
    elif bool(right.all()):
        side = "right"
        shift = (P - lengths)
        idx = (ar - shift[:, None]) % P
        ids = ids.gather(1, idx)
    else:
        raise InputError("attention_mask: each row's real tokens must be contiguous and padded on one side (all "
                         "rows left-padded or all right-padded)")
    canon = ar >= (P - lengths)[:, None]
    return ids, canon, lengths, side


def iterate(model: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            max_new_tokens: int, steps: int, block_length: int | None = None, preset: str = "llada",
            mask_id: int | None = None, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, remasking: str = "low_confidence", cfg_scale: float = 0.0,
            threshold: float | None = None, factor: float | None = None, alg: str = "origin",
            alg_temp: float | None = None, eps: float = 1e-3, cache: str | None = None,
            shift_logits: bool | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
            noise_removal: bool = True, vocab_size: int | None = None, suppress_mask: bool | None = None,
            seed: int | torch.Generator = 0,
            logits_processor: object = None, output_scores: bool = False, backend: str = "auto",
            cuda_graph: bool = False, _graph_kit: tuple | None = None,
            _result: dict | None = None) -> Iterator[GenerationStep]:
    """The steps of :func:`generate`, one :class:`GenerationStep` after each (arguments as there). The
    final :class:`GenerateOutput` is what :func:`generate` returns for the same arguments."""
    given = dict(remasking=remasking, cfg_scale=cfg_scale, threshold=threshold, factor=factor,
                 block_length=block_length, cache=cache, alg=alg, alg_temp=alg_temp, eps=eps,
                 noise_removal=noise_removal, vocab_size=vocab_size)
    if temperature is None:
        temperature = 1.0 if preset in ("mdlm", "duo", "bd3lm") else 0.0
    o = _Options(preset=preset, max_new_tokens=max_new_tokens, steps=steps, block_length=block_length, mask_id=mask_id,
                 temperature=temperature, top_p=top_p, top_k=top_k, remasking=remasking, cfg_scale=cfg_scale,
                 threshold=threshold, factor=factor, alg=alg, alg_temp=alg_temp, eps=eps, cache=cache,
                 shift_logits=shift_logits, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 noise_removal=noise_removal, vocab_size=vocab_size, backend=backend)
    if not isinstance(preset, str):
        raise InputTypeError(f"preset: expected a str, got {type(preset).__name__}")
    _check_options(model, o, given)
    if (threshold is not None or factor is not None) and preset != "fast_dllm":
        raise InputError(f"{'threshold' if threshold is not None else 'factor'}: parallel decoding is preset "
                         f"'fast_dllm' (got preset {preset!r})")
    _blocks(model, o)
    o.mask_id = _resolve_mask_id(model, o)
    if not isinstance(output_scores, bool):
        raise InputTypeError(f"output_scores: expected True or False, got {output_scores!r}")
    seed_i = _seed(seed)
    procs = _processors(logits_processor)
    if not isinstance(cuda_graph, bool):
        raise InputTypeError(f"cuda_graph: expected True or False, got {cuda_graph!r}")
    if cuda_graph:
        why = _graph.unsupported(o, procs)
        if why is not None:
            raise InputError(f"cuda_graph: {why}; use cuda_graph=False")
    ids, am_p, lengths, side = _prompts(input_ids, attention_mask)
    if cuda_graph and _graph_kit is None:
        _graph.check_device(o, ids.device)
    B, P = ids.shape
    N = max_new_tokens
    vocab = o.vocab_size or _model_attr(model, "vocab_size")
    if o.preset == "duo":
        if vocab is None:
            raise InputError("vocab_size: preset 'duo' draws its uniform prior over the vocabulary; pass vocab_size= "
                             "or use a model with config.vocab_size")
        o.vocab_size = vocab
    if o.mask_id is not None and vocab is not None and o.mask_id >= vocab:
        raise InputError(f"mask_id: {o.mask_id} is outside the model's vocabulary of {vocab}")
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        if am_p is None or bool(((ids[am_p] < 0) | (ids[am_p] >= vocab)).any()):
            raise InputError(f"input_ids: token ids must lie in [0, {vocab}) (the model's vocabulary)")
    if ids.numel() and int(ids.min()) < 0:
        raise InputError("input_ids: negative token ids")
    for name in ("eos_token_id", "pad_token_id"):
        v = getattr(o, name)
        if v is not None and vocab is not None and v >= vocab:
            raise InputError(f"{name}: {v} is outside the model's vocabulary of {vocab}")
    if preset == "bd3lm" and am_p is not None:
        raise InputError("attention_mask: preset 'bd3lm' decodes on the model's block grid from position 0; pass "
                         "prompts of one length (no padding)")
    if suppress_mask is not None and not isinstance(suppress_mask, bool):
        raise InputTypeError(f"suppress_mask: expected True, False or None, got {suppress_mask!r}")
    # LLaDA's and Dream's code let the mask token be predicted (their training never targets it); fastdiff's
    # absorbing models are SUBS-parameterised (Sahoo et al. 2024): their mask logit is untrained, never drawn
    o.suppress_mask = (is_fastdiff_denoiser(model) if suppress_mask is None else suppress_mask) and o.preset != "duo"
    shift = o.shift_logits if o.shift_logits is not None else bool(getattr(model, "shifted_logits", preset == "dream"))
    lm = LM(model, shift=shift, time_input="sigma" if preset in ("mdlm", "duo") else "none")
    dev = ids.device
    L = P + N
    if preset == "duo":
        region = torch.searchsorted(torch.linspace(0, 1, vocab + 1, dtype=torch.float64, device=dev)[1:],
                                    _random.uniform((B, N), seed=seed_i, offset=2**40, device=dev)).clamp_max(vocab - 1)
    else:
        region = torch.full((B, N), o.mask_id, dtype=torch.int64, device=dev)
    x = torch.cat([ids, region], 1)
    am = pos = None
    if am_p is not None:
        am = torch.cat([am_p, torch.ones(B, N, dtype=torch.bool, device=dev)], 1)
        pos = (am.to(torch.int64).cumsum(1) - 1).clamp_min(0)
    run = Run(lm=lm, x=x, P=P, N=N, mask_id=o.mask_id if o.mask_id is not None else -1, am=am, pos=pos, seed=seed_i,
              o=o, processors=procs)
    if output_scores:
        run.scores = torch.full((B, N), float("nan"), dtype=torch.float32, device=dev)
    if cuda_graph:
        capture, op, posterior_op = (tuple(_graph_kit) + (None,))[:3] if _graph_kit is not None else (None,) * 3
        run.graphs = _graph.GenerateGraphs(run, capture=capture, op=op, posterior_op=posterior_op)
    t0 = time.perf_counter()
    from ..sampling import _eval_mode

    with torch.no_grad(), _eval_mode(model):
        for step in LOOPS[preset](run):
            yield step
    if _result is not None:
        _result["out"] = _finish(run, lengths, side, t0)


def _finish(run: Run, lengths: torch.Tensor, side: str, t0: float) -> GenerateOutput:
    o, P, N, B = run.o, run.P, run.N, run.B
    x = run.x.clone()
    gen = x[:, P:]
    finished = torch.zeros(B, dtype=torch.bool, device=x.device)
    n_gen = torch.full((B,), N, dtype=torch.int64, device=x.device)
    if o.eos_token_id is not None:
        is_eos = gen == o.eos_token_id
        finished = is_eos.any(1)
        first = torch.where(finished, is_eos.to(torch.int8).argmax(1), torch.full_like(n_gen, N))
        n_gen = torch.where(finished, first + 1, n_gen)
        after = torch.arange(N, device=x.device)[None, :] > first[:, None]
        pad = o.pad_token_id if o.pad_token_id is not None else o.eos_token_id
        x[:, P:] = torch.where(after, torch.full_like(gen, pad), gen)
    if side == "right":
        shift = P - lengths
        ar = torch.arange(P + N, device=x.device)[None, :]
        x = x.gather(1, (ar + shift[:, None]) % (P + N))
        if o.pad_token_id is not None:
            tail = ar >= (lengths + n_gen)[:, None]
            x = torch.where(tail, torch.full_like(x, o.pad_token_id), x)
    dt = max(time.perf_counter() - t0, 1e-12)
    tokens = int(n_gen.sum())
    stats = {"preset": o.preset, "network_calls": run.lm.calls, "sequences_evaluated": run.lm.rows,
             "steps": run.steps, "time_s": dt, "model_time_s": run.lm.seconds, "tokens_generated": tokens,
             "tokens_per_s": tokens / dt, "overhead_fraction": max(0.0, 1.0 - run.lm.seconds / dt),
             "cache": o.cache, "batch": B, "prompt_length": P, "max_new_tokens": N}
    if run.graphs is not None:
        stats["cuda_graph"] = {"captures": run.graphs.captures, "replays": run.graphs.replays}
    return GenerateOutput(sequences=x, lengths=lengths + n_gen, finished=finished, scores=run.scores, stats=stats)


def generate(model: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, steps: int, callback: Callable[[GenerationStep], None] | None = None,
             **kwargs: Any) -> GenerateOutput:
    """(generated below)"""
    if callback is not None and not callable(callback):
        raise InputTypeError(f"callback: expected a callable, got {type(callback).__name__}")
    res: dict = {}
    for step in iterate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, steps=steps, _result=res,
                        **kwargs):
        if callback is not None:
            callback(step)
    return res["out"]


_GENERATE_DOC = """Generate ``max_new_tokens`` tokens after each prompt, with a model family's own algorithm.

Parameters
----------
model : the network, called as ``model(input_ids, attention_mask=None, position_ids=None) -> logits``
    (a tensor, tuple, ``.logits`` or ``{"logits": ...}``), a fastdiff denoiser ``model(x, t, ...)``, or an
    adapter of :mod:`fastdiff.models.hf` (Hugging Face causal-LM architectures run bidirectionally, Dream).
input_ids : (B, P) int tensor, the prompts.
attention_mask : (B, P) 0/1 or bool, 1 = real token; left- or right-padded. None: no padding.
max_new_tokens : int, N, the generated positions per row.
steps : int, network steps in total (llada / fast_dllm: ``steps // num_blocks`` per block).
block_length : int or None, see "Blocks" in :mod:`fastdiff.generation`.
preset : "llada" | "fast_dllm" | "dream" | "mdlm" | "duo" | "bd3lm" (see the module docstring).
mask_id : int, the mask token (default: the model adapter's ``mask_id`` or ``config.mask_token_id``).
temperature : float >= 0 (default 0 for llada / fast_dllm / dream, 1 for mdlm / duo / bd3lm).
top_p, top_k : nucleus / top-k filtering of the x0 draw.
remasking : "low_confidence" | "random" (llada, fast_dllm).
cfg_scale : float >= 0, LLaDA's classifier-free guidance (llada).
threshold, factor : Fast-dLLM's parallel decoding rules (fast_dllm).
alg, alg_temp, eps : Dream's decoding order, its temperature and final time (eps also mdlm / duo).
cache : None | "prefix" | "dual" (llada, fast_dllm) | "kv" (bd3lm).
shift_logits : bool or None; None: the model's ``shifted_logits`` attribute, else True for "dream".
eos_token_id, pad_token_id : after the first generated EOS a row is padded; it counts as finished.
noise_removal : mdlm / duo: the final argmax step (default True).
suppress_mask : bool or None; True: the mask token is never predicted (its logit set to ``-inf``, SUBS).
    None: True for fastdiff's own denoisers (SUBS-trained), False otherwise (LLaDA's and Dream's code keep
    the column). mdlm and bd3lm always suppress it (their published samplers do).
vocab_size : duo's vocabulary when the model has no ``config.vocab_size``.
seed : int or torch.Generator.
logits_processor : HF-style processors ``proc(input_ids, scores) -> scores``, applied to the x0 logits of
    the positions decided in a step, before the draw: ``scores (M, V)`` holds one row per such position
    and ``input_ids (M, P + N)`` that row's current sequence.
callback : called with a :class:`GenerationStep` after every step.
output_scores : bool, fill ``GenerateOutput.scores``.
backend : the ops' backend ("auto", "reference", "cpp", "cuda", "triton").
cuda_graph : bool (default False). True: each step (the network's forward and the step's op: the fused
    selection of :func:`fastdiff.ops.select_tokens`, for mdlm / duo the posterior kernel) is captured once
    per static shape in a CUDA graph and replayed (fewer kernel launches at small batches); the tokens equal
    those of ``cuda_graph=False``. Every preset: llada / fast_dllm (``cfg_scale``'s two passes in the same
    graph; with ``cache="prefix"`` / ``"dual"`` a block's first step (``kv_forward``) is one graph and its
    later steps another, reading the cache the first one refreshes), dream (all four algs, ``alg_temp``),
    mdlm / duo, bd3lm (one graph per block, ``cache="kv"`` or not). The masked columns, the counts, the end
    of a block and the write of the decided tokens stay on the host between replays. Not with
    ``logits_processor``, ``top_k`` / ``top_p`` (dream: ``top_p < 1``) or ``factor``; only on CUDA tensors,
    with the CUDA kernels (backend "auto" or "cuda"); anything else raises InputError naming ``cuda_graph``
    before any network call, and a model that cannot be captured (it reads tensor values on the host) raises
    it at the first capture. Graphs live for the call (``stats["cuda_graph"]`` counts captures and
    replays). See :mod:`fastdiff.generation._graph`.

Returns
-------
GenerateOutput (``sequences``, ``lengths``, ``finished``, ``scores``, ``stats``).

Raises
------
InputError, InputTypeError
    A bad argument (naming it) before any network call, an option the preset does not read, a model
    output that is not logits of the right shape, NaN / +inf logits.
"""
if generate.__doc__ is not None:
    generate.__doc__ = _GENERATE_DOC

