"""Adapters that let :func:`fastdiff.generate` drive Hugging Face models as masked-diffusion denoisers.

* :class:`HFBidirectional` wraps a model of a causal-LM architecture (``LlamaForCausalLM``,
  ``Qwen2ForCausalLM``, ...) and runs it with full (bidirectional) attention, the way LLaDA (Nie et al.,
  2025, a Llama-like network) and Dream (Ye et al., 2025, a Qwen2 network) are run. It follows the LM calling
  convention ``adapter(input_ids, attention_mask=None, position_ids=None) -> logits (B, L, V)`` and the
  prefix / dual cache protocol of Fast-dLLM (Wu et al., 2025): :meth:`HFBidirectional.kv_forward` and
  :meth:`HFBidirectional.kv_window`.
* :class:`DreamAdapter` is :class:`HFBidirectional` with ``shifted=True``: Dream's logits at position
  ``i - 1`` predict token ``i``; the adapter realigns them (``out[:, 0] = raw[:, 0]``,
  ``out[:, i] = raw[:, i - 1]``, as Dream's own sampler does), so position ``i`` holds the prediction of
  token ``i``.
* :class:`HFMaskedLMAdapter` wraps a model that is bidirectional already and takes a 2-D padding mask
  (``BertForMaskedLM``, ``ModernBertForMaskedLM``, LLaDA's remote code ``LLaDAModelLM``).

How full attention is obtained (transformers 5.x). The decoder models build their attention mask with
``transformers.masking_utils.create_causal_mask``, which returns a 4-D mask it is given unchanged
(``_preprocess_mask_arguments``: "If the mask is already 4D, simply return as-is"). The adapter therefore
passes its own additive float mask ``(B, 1, q, kv)``: 0 where a key is visible, ``finfo(dtype).min`` on
padding keys, as a stride-0 expansion of one ``(B, 1, 1, kv)`` row (no ``L x L`` tensor is stored). The
eager attention adds it to the scores and SDPA takes it as ``attn_mask`` (with a mask given, SDPA's
``is_causal`` is off). The other switch, ``config.is_causal = False`` (``create_causal_mask`` then falls
back to ``create_bidirectional_mask``), gives the same logits in 5.25, but it changes the user's model
config for every later call; the mask is local to one call and also carries the cache layout of
:meth:`HFBidirectional.kv_window`. The flash-attention implementations take no 4-D mask (their causality
is a flag of the attention modules), so a model set to one of them is refused: use
``model.set_attn_implementation("sdpa")``. A config with sliding-window layers (Qwen2's
``use_sliding_window``) gets full attention in every layer too, as Dream runs.

The ``shifted_logits`` rule: the attribute tells :func:`fastdiff.generate` whether it must still shift the
logits it receives. Every adapter here returns realigned logits, so ``shifted_logits`` is ``False`` for all
of them, :class:`DreamAdapter` included.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..generation._lm import unwrap_logits as _unwrap
from ..errors import InputError, InputTypeError

__all__ = ["DreamAdapter", "HFBidirectional", "HFKVCache", "HFMaskedLMAdapter", "unwrap_logits"]

_FLASH = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "paged_attention")


def unwrap_logits(out: Any) -> torch.Tensor:
    """The logits tensor inside a model's output: the tensor itself, the first item of a tuple / list, the
    ``logits`` key of a dict (``ModelOutput`` included), or the ``.logits`` attribute (``MaskedLMOutput``,
    ``CausalLMOutputWithPast``, ...); the errors name ``model``. (One implementation with
    :func:`fastdiff.generation.unwrap_logits`.)"""
    return _unwrap(out, "model")


def _check_adapter_args(model: object, shifted: object) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(shifted, bool):
        raise InputTypeError(f"shifted: expected a bool, got {type(shifted).__name__}")


class _KeptOutput:
    """A model output whose logits were sliced to the kept positions (its cache kept for kv_forward)."""

    def __init__(self, logits: torch.Tensor, out: Any) -> None:
        self.logits = logits
        self.past_key_values = None
        for name in ("cache", "past_key_values"):
            c = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
            if c is not None:
                self.past_key_values = c
                break


def _capturing() -> bool:
    """True while a CUDA graph is being captured (``fastdiff.generate(..., cuda_graph=True)``): the value
    checks of ``logits_to_keep``, which read it on the host, are skipped then (the positions are the ones
    fastdiff.generate builds, checked by the eager calls); shapes and dtypes are still checked."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_keep(keep: object, L: int) -> torch.Tensor:
    """``logits_to_keep``: a 1-D integer tensor of positions in ``[0, L)``."""
    if not isinstance(keep, torch.Tensor) or keep.ndim != 1 or keep.is_floating_point() or keep.dtype == torch.bool:
        raise InputTypeError("logits_to_keep: expected a 1-D integer tensor of positions")
    if keep.numel() and not _capturing() and (int(keep.min()) < 0 or int(keep.max()) >= L):
        raise InputError(f"logits_to_keep: positions must lie in [0, {L})")
    return keep.to(torch.int64)


def _output_vocab(model: nn.Module) -> int:
    """The number of logits per position the model returns: its output embedding's rows, else its config's
    ``vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    raise InputError("model: cannot tell its vocabulary size (no output embedding and no config.vocab_size)")


def _tokenizer_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)  # counts added tokens, unlike .vocab_size
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        return size if isinstance(size, int) else None


def _resolve_mask_id(model: nn.Module, mask_id: int | None, tokenizer: Any, vocab_size: int) -> int:
    """``mask_id``, else the tokenizer's ``mask_token_id``, else ``model.config.mask_token_id``; checked
    against the output vocabulary and the tokenizer."""
    tok_mask = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if tokenizer is not None:
        size = _tokenizer_size(tokenizer)
        if size is not None and size > vocab_size:
            raise InputError(f"tokenizer: has {size} tokens but the model returns logits over {vocab_size}")
    if mask_id is None:
        mask_id = tok_mask if tok_mask is not None else getattr(getattr(model, "config", None), "mask_token_id", None)
        if mask_id is None:
            raise InputError("mask_id: not given, and neither the tokenizer's mask_token_id nor "
                             "model.config.mask_token_id is set (LLaDA: 126336)")
    elif isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise InputTypeError(f"mask_id: expected an int, got {type(mask_id).__name__}")
    elif tok_mask is not None and mask_id != tok_mask:
        raise InputError(f"mask_id: {mask_id} differs from the tokenizer's mask_token_id {tok_mask}")
    if not 0 <= int(mask_id) < vocab_size:
        raise InputError(f"mask_id: {mask_id} is outside [0, {vocab_size}), the model's output vocabulary")
    return int(mask_id)


def _check_ids(input_ids: Any, name: str = "input_ids") -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise InputTypeError(f"{name}: expected a (B, L) integer tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise InputTypeError(f"{name}: expected an integer tensor, got {input_ids.dtype}")
    return input_ids


def _check_full(t: torch.Tensor | None, name: str, shape: tuple[int, int]) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise InputError(f"{name}: expected shape {shape}, got {getattr(t, 'shape', type(t).__name__)}")
    return t


def _positions(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, B: int, L: int,
               device: torch.device) -> torch.Tensor:
    """The given position ids, else ``cumsum(attention_mask) - 1`` (pads at 0), else ``0..L-1``."""
    if position_ids is not None:
        return position_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0).to(device)
    return torch.arange(L, device=device).expand(B, L)


@dataclass(frozen=True)
class HFKVCache:
    """What :meth:`HFBidirectional.kv_forward` returns: every layer's keys and values at every position
    (``(B, H_kv, L, D)``, after RoPE) and the tokens ``(B, L)`` they were computed from. Opaque to callers."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    tokens: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


class HFBidirectional(nn.Module):
    """A Hugging Face causal-LM architecture run with full attention, as a masked-diffusion denoiser.

    Parameters
    ----------
    model: an ``nn.Module`` of the transformers decoder family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
        ...) whose forward takes ``input_ids``, a 4-D ``attention_mask``, ``position_ids`` and a ``cache``
        (``past_key_values`` before transformers 5). It is not modified (not even put in eval mode).
    mask_id: the mask token; ``None``: ``tokenizer.mask_token_id``, else ``model.config.mask_token_id``.
    tokenizer: optional, to read and check ``mask_id`` and its vocabulary against the model's.
    shifted: the model's logits at ``i - 1`` predict token ``i`` (Dream); the adapter realigns them.

    Calling ``adapter(input_ids (B, L), attention_mask=None, position_ids=None)`` returns the logits
    ``(B, L, V)``: padding keys (``attention_mask`` 0) are hidden from every query; ``position_ids``
    default to ``cumsum(attention_mask) - 1`` (so a left-padded prompt gets RoPE positions 0, 1, ...).
    """

    shifted_logits = False  # the adapter realigns: fastdiff.generate must not shift again

    def __init__(self, model: nn.Module, *, mask_id: int | None = None, tokenizer: Any = None,
                 shifted: bool = False) -> None:
        super().__init__()
        _check_adapter_args(model, shifted)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl in _FLASH:
            raise InputError(f"model: attention implementation {impl!r} takes no 4-D mask, so it cannot be run "
                             "bidirectionally; call model.set_attn_implementation('sdpa') (or 'eager') first")
        self.model = model
        self.vocab_size = _output_vocab(model)
        self.mask_id = _resolve_mask_id(model, mask_id, tokenizer, self.vocab_size)
        self.shifted = shifted
        # transformers 5 renamed the forward's ``past_key_values`` to ``cache``; remote code keeps the old name
        self._cache_kw = "cache" if _has_param(model.forward, "cache") else "past_key_values"
        self._takes_use_cache = _has_param(model.forward, "use_cache")
        self._takes_keep = _has_param(model.forward, "logits_to_keep")

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    # --- the pieces ---------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.dtype.is_floating_point:
            return w.dtype
        return next((p.dtype for p in self.model.parameters() if p.dtype.is_floating_point), torch.float32)

    def _mask(self, key_ok: torch.Tensor, q: int) -> torch.Tensor:
        """The additive mask ``(B, 1, q, kv)`` from the visible keys ``key_ok (B, kv)`` bool (a view)."""
        dtype = self._dtype()
        bias = torch.zeros(key_ok.shape, dtype=dtype, device=key_ok.device)
        bias.masked_fill_(~key_ok, torch.finfo(dtype).min)
        return bias[:, None, None, :].expand(key_ok.shape[0], 1, q, key_ok.shape[1])

    def _run(self, ids: torch.Tensor, key_ok: torch.Tensor, pos: torch.Tensor, cache: Any = None,
             keep: torch.Tensor | None = None) -> Any:
        """The model's output; with ``keep`` (query indices), its logits only there: the model's own
        ``logits_to_keep`` when it takes one (the LM head then runs on those rows only), else a slice."""
        kw: dict[str, Any] = {"attention_mask": self._mask(key_ok, ids.shape[1]), "position_ids": pos}
        if cache is not None:
            kw[self._cache_kw] = cache
        if self._takes_use_cache:  # without a cache, none is built and returned
            kw["use_cache"] = cache is not None
        if keep is not None and self._takes_keep:
            kw["logits_to_keep"] = keep
        out = self.model(ids, **kw)
        if keep is not None and not self._takes_keep:
            return _KeptOutput(unwrap_logits(out)[:, keep], out)
        return out

    def _keep(self, logits_to_keep: torch.Tensor | None, q_lo: int, L: int) -> torch.Tensor | None:
        """Query indices of the raw logits behind the (realigned) positions ``logits_to_keep``, for queries
        that start at position ``q_lo``."""
        if logits_to_keep is None:
            return None
        idx = _check_keep(logits_to_keep, L)
        if self.shifted:
            return (idx - 1 - q_lo).clamp_min(0)
        return idx - q_lo

    @staticmethod
    def _realign(raw: torch.Tensor) -> torch.Tensor:
        """``out[:, 0] = raw[:, 0]``, ``out[:, i] = raw[:, i - 1]`` (Dream's shift)."""
        return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)

    def _prepare(self, input_ids: Any, attention_mask: Any, position_ids: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ids = _check_ids(input_ids)
        B, L = ids.shape
        _check_full(attention_mask, "attention_mask", (B, L))
        _check_full(position_ids, "position_ids", (B, L))
        device = ids.device
        key_ok = (attention_mask.to(device) != 0) if attention_mask is not None else \
            torch.ones(B, L, dtype=torch.bool, device=device)
        return ids, key_ok, _positions(attention_mask, position_ids, B, L, device), attention_mask

    # --- the LM calling convention -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits ``(B, L, V)`` of every position with full attention over the real (non-padding) tokens;
        ``logits_to_keep`` (1-D positions): ``(B, len(logits_to_keep), V)`` of those positions only."""
        ids, key_ok, pos, _ = self._prepare(input_ids, attention_mask, position_ids)
        keep = self._keep(logits_to_keep, 0, ids.shape[1])
        raw = unwrap_logits(self._run(ids, key_ok, pos, keep=keep))
        return self._realign(raw) if (self.shifted and keep is None) else raw

    # --- the prefix / dual cache protocol ------------------------------------------------------------------
    def kv_forward(self, x: torch.Tensor, t: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, logits_to_keep: torch.Tensor | None = None,
                   **cond: Any) -> tuple[torch.Tensor, HFKVCache]:
        """One full forward over ``x (B, L)``: ``(logits (B, L, V), cache)`` with every layer's keys and values
        at every position (logits of ``logits_to_keep`` only, when given). ``t`` is ignored (time-free)."""
        _no_cond(cond)
        ids, key_ok, pos, _ = self._prepare(x, attention_mask, position_ids)
        keep = self._keep(logits_to_keep, 0, ids.shape[1])
        out = self._run(ids, key_ok, pos, cache=_new_dynamic_cache(), keep=keep)
        raw = unwrap_logits(out)
        layers = tuple((k, v) for k, v in _cache_layers(_output_cache(out)))
        logits = self._realign(raw) if (self.shifted and keep is None) else raw
        return logits, HFKVCache(layers=layers, tokens=ids.detach().clone())

    def kv_window(self, x_win: torch.Tensor, t: torch.Tensor | None = None, *, cache: HFKVCache, start: int,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  logits_to_keep: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        """Logits ``(B, n, V)`` of the tokens ``x_win (B, n)`` at positions ``[start, start + n)``.

        In every layer the queries are the window's; the keys and values are the cache's outside the window
        and the window's own (computed now) inside it. The window's keys are appended after the cache's
        outside keys: with a full mask attention does not depend on the order of the keys, and RoPE is
        already in the cached keys and is applied to the window at its absolute positions. ``cache`` is not
        modified. ``attention_mask`` / ``position_ids`` are over the whole length ``L``.

        Shifted models: the prediction of token ``start`` is the raw logit at ``start - 1``, a position
        outside the window. Its query is run too (the cached token there, RoPE position ``start - 1``), with
        the cache's keys and values at ``start - 1`` and its own new key hidden from every query, so the
        realigned window equals ``kv_forward``'s slice when nothing changed.
        """
        _no_cond(cond)
        if not isinstance(cache, HFKVCache):
            raise InputTypeError(f"cache: expected the HFKVCache of kv_forward, got {type(cache).__name__}")
        ids = _check_ids(x_win, "x_win")
        B, n = ids.shape
        L = cache.length
        if isinstance(start, bool) or not isinstance(start, int):
            raise InputTypeError(f"start: expected an int, got {type(start).__name__}")
        if cache.tokens.shape[0] != B:
            raise InputError(f"x_win: batch {B} differs from the cache's {cache.tokens.shape[0]}")
        if not (0 <= start and start + n <= L and n >= 1):
            raise InputError(f"start: the window [{start}, {start + n}) is not inside the cached length {L}")
        _check_full(attention_mask, "attention_mask", (B, L))
        _check_full(position_ids, "position_ids", (B, L))
        device = ids.device
        key_ok = (attention_mask.to(device) != 0) if attention_mask is not None else \
            torch.ones(B, L, dtype=torch.bool, device=device)
        pos = _positions(attention_mask, position_ids, B, L, device)
        end = start + n
        extra = 1 if self.shifted and start > 0 else 0  # the query at start - 1 (shifted models)
        q_lo = start - extra
        q_ids = torch.cat([cache.tokens[:, q_lo:start].to(device), ids], dim=1)
        outside = [(torch.cat([k[:, :, :start], k[:, :, end:]], dim=2),
                    torch.cat([v[:, :, :start], v[:, :, end:]], dim=2)) for k, v in cache.layers]
        # keys: [cached outside the window (in order), the new ones for q_lo..end]; the new key at start - 1
        # (shifted) is hidden, the cache's is used
        new_ok = key_ok[:, q_lo:end].clone()
        new_ok[:, :extra] = False
        keys_ok = torch.cat([key_ok[:, :start], key_ok[:, end:], new_ok], dim=1)
        keep = None
        if logits_to_keep is not None:
            idx = _check_keep(logits_to_keep, L)
            if not _capturing() and bool(((idx < start) | (idx >= end)).any()):
                raise InputError(f"logits_to_keep: positions must lie in the window [{start}, {end})")
            keep = self._keep(idx, q_lo, L)
        out = self._run(q_ids, keys_ok, pos[:, q_lo:end], cache=_new_dynamic_cache(outside), keep=keep)
        raw = unwrap_logits(out)
        if keep is not None:
            return raw
        if not self.shifted:
            return raw
        if extra:
            return raw[:, :-1]  # raw at start - 1 .. end - 2 = the realigned start .. end - 1
        return self._realign(raw)  # start == 0: out[:, 0] = raw[:, 0]


class DreamAdapter(HFBidirectional):
    """Dream (Ye et al., 2025): a Qwen2 network run bidirectionally whose logits at ``i - 1`` predict token
    ``i``; :class:`HFBidirectional` with ``shifted=True`` (logits realigned, ``shifted_logits = False``)."""

    def __init__(self, model: nn.Module, **kw: Any) -> None:
        if "shifted" in kw:
            raise InputError("shifted: DreamAdapter is always shifted; use HFBidirectional to choose")
        super().__init__(model, shifted=True, **kw)


class HFMaskedLMAdapter(nn.Module):
    """A model that is bidirectional already (``BertForMaskedLM``, ``ModernBertForMaskedLM``, LLaDA's remote
    code) in the LM calling convention: ``adapter(input_ids, attention_mask=None, position_ids=None) ->
    logits (B, L, V)``. The 2-D ``attention_mask`` is passed as is; ``position_ids`` only to a model whose
    forward takes them. Output unwrapped with :func:`unwrap_logits`; ``mask_id`` / ``tokenizer`` as in
    :class:`HFBidirectional`; ``shifted=True`` realigns the same way. No cache protocol."""

    shifted_logits = False

    def __init__(self, model: nn.Module, *, mask_id: int | None = None, tokenizer: Any = None,
                 shifted: bool = False) -> None:
        super().__init__()
        _check_adapter_args(model, shifted)
        self.model = model
        self.vocab_size = _output_vocab(model)
        self.mask_id = _resolve_mask_id(model, mask_id, tokenizer, self.vocab_size)
        self.shifted = shifted
        self._takes_positions = _has_param(model.forward, "position_ids")

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = _check_ids(input_ids)
        B, L = ids.shape
        _check_full(attention_mask, "attention_mask", (B, L))
        _check_full(position_ids, "position_ids", (B, L))
        kw: dict[str, Any] = {}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask.to(ids.device).long()
        if position_ids is not None and self._takes_positions:
            kw["position_ids"] = position_ids.to(ids.device).long()
        raw = unwrap_logits(self.model(ids, **kw))
        return torch.cat([raw[:, :1], raw[:, :-1]], dim=1) if self.shifted else raw


# --- helpers over transformers' cache API ------------------------------------------------------------------
def _has_param(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _no_cond(cond: dict[str, Any]) -> None:
    if cond:
        raise InputError(f"cond: a Hugging Face LM takes no conditioning, got {sorted(cond)}")


def _new_dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """A ``transformers.DynamicCache`` of plain (full-attention) layers, filled with ``layers`` if given (the
    tensors are concatenated into new ones by its updates, never written in place)."""
    from transformers import DynamicCache

    return DynamicCache(layers) if layers is not None else DynamicCache()


def _output_cache(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        cache = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
        if cache is not None:
            return cache
    raise InputError("model: its output carries no cache ('cache' / 'past_key_values'); kv_forward needs a "
                     "transformers decoder model")


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``(B, H_kv, L, D)`` of a transformers ``Cache`` (or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(kv[0], kv[1]) for kv in cache]
