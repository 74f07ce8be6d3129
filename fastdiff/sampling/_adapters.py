"""Denoiser protocol and adapters: plain callables, ``nn.Module``s, Hugging Face models.

A denoiser is called as ``model(x_t, t, **cond) -> output`` with ``x_t: (B, L)`` int64 (discrete) or
``(B, L, D)`` float (continuous) and ``t: (B,)`` int64. The output is x0 logits ``(B, L, V)`` for a
discrete process and the parameterised tensor (x0 / eps / mean) for a continuous one. Tuples (first
element) and objects with a ``.logits`` attribute (Hugging Face ``ModelOutput``) are unwrapped.

Every adapter carries two flags the sampler reads:

* ``uses_time``: False for models whose output does not depend on ``t`` (masked LMs). Only such models
  may be cached (MDLM's trick: an unchanged input gives an unchanged output, so the network is skipped).
  It says nothing about whether ``t`` is passed: that is ``pass_time`` / ``time_kwarg``.
* ``accepts_attention_mask``: the sampler passes ``attention_mask=(B, L) bool`` (True = real token)
  when sequences have different lengths.
* ``fresh_output``: True when every call returns a tensor made for that call that the model keeps no
  reference to (no buffer it reuses, no view of one), e.g. ``h @ W.T + b``. The sampler may then write
  into it (the mask column at ``-inf`` for the decoding strategies, guidance combined in place), which
  saves a copy of the ``(B, L, V)`` logits per step. False (the default) for any model that does not say so.

The sampler never writes into what a model returns (it may be a buffer the model keeps, or an expanded
view); a model may return the same tensor object every call. The one exception is a model that declares
``fresh_output = True`` (above).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from ..errors import InputError, InputTypeError


def unwrap_output(out: object) -> torch.Tensor:
    """The tensor inside a model's output (tensor, tuple/list, or an object with ``.logits``)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputTypeError(f"model: expected a tensor output (or a tuple / an object with .logits), got {type(out).__name__}")


class Denoiser:
    """Adapter for ``fn(x_t, t, **cond)`` (any callable, including an ``nn.Module``).

    Parameters
    ----------
    fn : the model.
    uses_time : False if ``fn``'s output does not depend on ``t`` (enables the MDLM cache). ``t`` is
        still passed (a model may take the argument and ignore it); see ``pass_time``.
    time_kwarg : pass the step as this keyword (``fn(x_t, **{time_kwarg: t}, **cond)``) instead of
        positionally.
    accepts_attention_mask : the model takes ``attention_mask=(B, L)``.
    pass_time : False calls ``fn(x_t, **cond)``, for a model without a step argument (a plain masked
        LM). A model that cannot take a second positional argument while ``pass_time`` is True (and no
        ``time_kwarg``) is rejected here, naming this option.
    fresh_output : True if every call returns a new tensor the model keeps no reference to; the sampler
        may then write into it instead of copying it (see the module docstring).
    """

    def __init__(self, fn: Callable, *, uses_time: bool = True, time_kwarg: str | None = None,
                 accepts_attention_mask: bool = False, pass_time: bool = True, fresh_output: bool = False) -> None:
        if not callable(fn):
            raise InputTypeError(f"model: expected a callable, got {type(fn).__name__}")
        for name, v in (("uses_time", uses_time), ("accepts_attention_mask", accepts_attention_mask),
                        ("pass_time", pass_time), ("fresh_output", fresh_output)):
            if not isinstance(v, (bool, int)) or v not in (0, 1):
                raise InputTypeError(f"{name}: expected True or False, got {v!r}")
        if time_kwarg is not None and (not isinstance(time_kwarg, str) or not time_kwarg.isidentifier()):
            raise InputTypeError(f"time_kwarg: expected a keyword name, got {time_kwarg!r}")
        self.fn = fn
        self.uses_time = bool(uses_time)
        self.time_kwarg = time_kwarg
        self.accepts_attention_mask = bool(accepts_attention_mask)
        self.pass_time = bool(pass_time)
        self.fresh_output = bool(fresh_output)
        if type(self) is Denoiser and pass_time and time_kwarg is None:
            _check_takes_time(fn)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if not self.pass_time:
            return unwrap_output(self.fn(x_t, **cond))
        if self.time_kwarg is not None:
            return unwrap_output(self.fn(x_t, **{self.time_kwarg: t}, **cond))
        return unwrap_output(self.fn(x_t, t, **cond))

    def declared_mask_id(self) -> tuple[int, str] | None:
        """The mask token the model says it was trained with, and where it says so: an int ``mask_id``
        attribute, or a Hugging Face config's ``mask_token_id``; None when it does not say."""
        v = getattr(self.fn, "mask_id", None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v, f"{type(self.fn).__name__}.mask_id"
        v = getattr(getattr(self.fn, "config", None), "mask_token_id", None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v, "config.mask_token_id"
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.fn).__name__}, uses_time={self.uses_time})"


def _check_takes_time(fn: Callable) -> None:
    """A callable that cannot take ``(x_t, t)`` positionally gets a clear error instead of the TypeError
    of its first call; one whose signature cannot be read is left alone."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    try:
        sig.bind_partial(None, None)
    except TypeError:
        raise InputTypeError(f"model: {type(fn).__name__} takes no step argument t (signature {sig}); wrap it "
                             "with as_denoiser(model, pass_time=False) to call it as model(x_t, **cond)") from None


class HFMaskedLM(Denoiser):
    """A Hugging Face masked LM (``AutoModelForMaskedLM``-style) as an absorbing-diffusion denoiser.

    The model sees ``input_ids = x_t`` (masked positions hold the process's ``mask_id``, which should be
    the tokenizer's ``[MASK]`` id) and returns ``.logits (B, L, V)`` read as x0 logits, as DiffusionBERT
    does. A plain MLM ignores the step (``uses_time=False``, so the MDLM cache applies); a model
    fine-tuned with a time input takes it through ``time_kwarg`` (e.g. ``"timestep"``).
    """

    def __init__(self, model: Callable, *, time_kwarg: str | None = None) -> None:
        super().__init__(model, uses_time=time_kwarg is not None, time_kwarg=time_kwarg,
                         accepts_attention_mask=True)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        kw = dict(cond)
        mask = kw.pop("attention_mask", None)
        if mask is not None:
            kw["attention_mask"] = mask.to(torch.int64)
        if self.time_kwarg is not None:
            kw[self.time_kwarg] = t
        return unwrap_output(self.fn(input_ids=x_t, **kw))


def _looks_like_hf(model: object) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "vocab_size") and hasattr(model, "get_input_embeddings")


def as_denoiser(model: object, *, uses_time: bool | None = None, time_kwarg: str | None = None,
                pass_time: bool = True) -> Denoiser:
    """Wrap ``model`` in the adapter the sampler calls.

    * a :class:`Denoiser` is returned as is;
    * a Hugging Face model (it has ``.config.vocab_size`` and ``get_input_embeddings``) becomes
      :class:`HFMaskedLM` (the step goes through ``time_kwarg`` if given, else it is not passed);
    * any other callable is called ``model(x_t, t, **cond)`` (``t`` as ``time_kwarg`` if given;
      ``pass_time=False``: ``model(x_t, **cond)``, for a model without a step argument).
      ``uses_time`` (does the output depend on ``t``? False allows the MDLM cache) defaults to True, or
      to the model's own ``uses_time`` attribute; it does not change what is passed. ``fresh_output`` and
      ``accepts_attention_mask`` are read from the model's attributes of those names (default False).
    """
    if isinstance(model, Denoiser):
        return model
    if uses_time is not None and (not isinstance(uses_time, (bool, int)) or uses_time not in (0, 1)):
        raise InputTypeError(f"uses_time: expected True, False or None, got {uses_time!r}")
    if _looks_like_hf(model):
        if uses_time and time_kwarg is None:
            raise InputError("uses_time: a Hugging Face model receives the step only through time_kwarg=...; "
                             "give time_kwarg, or leave uses_time unset for a plain masked LM")
        return HFMaskedLM(model, time_kwarg=time_kwarg)
    if not callable(model):
        raise InputTypeError(f"model: expected a callable denoiser, got {type(model).__name__}")
    if uses_time is None:
        uses_time = bool(getattr(model, "uses_time", True))
    accepts = bool(getattr(model, "accepts_attention_mask", False))
    fresh = getattr(model, "fresh_output", False) is True
    return Denoiser(model, uses_time=uses_time, time_kwarg=time_kwarg, accepts_attention_mask=accepts,
                    pass_time=pass_time, fresh_output=fresh)


class CUDAGraphed(Denoiser):
    """Replays the wrapped denoiser's forward as a CUDA graph, one graph per input signature (shape and
    dtype of ``x_t`` and of every tensor keyword). The first call with a signature warms up on a side
    stream and captures; later calls copy the inputs into the static buffers and replay, which removes
    the per-kernel launch cost of small models. The model must be capturable (no host syncs, no
    data-dependent shapes). Returns a copy of the static output, so callers may keep or modify it.
    """

    def __init__(self, inner: Denoiser, warmup: int = 2) -> None:
        # every call returns a clone of the graph's static output: the sampler's to write into
        super().__init__(inner, uses_time=inner.uses_time, accepts_attention_mask=inner.accepts_attention_mask,
                         fresh_output=True)
        self.inner = inner
        self.fn = inner.fn  # the user's model (its parameters tell the sampler the device)
        self.warmup = warmup
        self.graphs: dict = {}

    @staticmethod
    def _key(x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple:
        parts = [tuple(x_t.shape), x_t.dtype, tuple(t.shape)]
        for k in sorted(cond):
            v = cond[k]
            parts.append((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)))
        return tuple(parts)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if x_t.device.type != "cuda":
            raise InputError(f"cuda_graph: CUDA graphs need CUDA tensors, got x_t on {x_t.device}")
        key = self._key(x_t, t, cond)
        entry = self.graphs.get(key)
        if entry is None:
            sx, st = x_t.clone(), t.clone()
            skw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.inner(sx, st, **skw)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.inner(sx, st, **skw)
            entry = self.graphs[key] = (graph, sx, st, skw, out)
        graph, sx, st, skw, out = entry
        sx.copy_(x_t)
        st.copy_(t)
        for k, v in cond.items():
            if isinstance(v, torch.Tensor):
                skw[k].copy_(v)
        graph.replay()
        return out.clone()
