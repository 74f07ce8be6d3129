"""How :func:`fastdiff.generate` calls a model: the LM calling convention, output unwrapping, the cache
protocols, logit shifting (Dream) and the time input (MDLM / DUO).

The LM calling convention is that of the models people bring (LLaDA, Dream, Hugging Face masked LMs)::

    model(input_ids, attention_mask=None, position_ids=None) -> logits (B, L, V)

as a tensor, a tuple (first item), an object with ``.logits`` (``ModelOutput``, ``MaskedLMOutput``) or a
dict with ``"logits"``. ``attention_mask`` (int64, 1 = real token) is passed only when the batch has
padding and the model takes the keyword; ``position_ids`` (``cumsum(attention_mask) - 1``, pads at 0) only
when the batch has padding and the model takes that keyword. A fastdiff denoiser (a
:class:`fastdiff.sampling.Denoiser`, or a model with a ``uses_time`` attribute such as
:class:`~fastdiff.models.SEDDenoiser`) is called the fastdiff way, ``model(x, t, attention_mask=bool)``.

Cache protocols (see ``docs/generation.md``): ``kv_forward`` / ``kv_window`` (Fast-dLLM's prefix and dual
caches) and ``new_cache`` / ``extend_cache`` with ``cache=, start=`` keywords (the exact block-causal KV
cache of BD3-LM).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError, InputTypeError


def unwrap_logits(out: object, where: str = "model output") -> torch.Tensor:
    """The logits inside a model's output: a tensor, a tuple/list (first item), an object with
    ``.logits`` or a mapping with ``"logits"``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or (hasattr(out, "keys") and hasattr(out, "__getitem__") and not hasattr(out, "logits")):
        if "logits" in out:
            return unwrap_logits(out["logits"], where)
        raise InputTypeError(f"{where}: a mapping without a 'logits' entry (keys: {sorted(map(str, out.keys()))})")
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputTypeError(f"{where}: expected logits (a tensor, a tuple, an object with .logits or a dict with "
                         f"'logits'), got {type(out).__name__}")


def _keywords(fn: Callable) -> tuple[set[str], bool, int]:
    """``(keyword names, takes **kwargs, positional parameters)`` of a callable's signature."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return set(), True, 1
    names, var_kw, positional = set(), False, 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
            if p.kind is p.POSITIONAL_OR_KEYWORD:
                positional += 1
        elif p.kind is p.POSITIONAL_ONLY:
            positional += 1
        elif p.kind is p.VAR_POSITIONAL:
            positional += 2
    return names, var_kw, positional


def is_fastdiff_denoiser(model: object) -> bool:
    from ..sampling import Denoiser

    return isinstance(model, Denoiser) or (hasattr(model, "uses_time") and not hasattr(model, "get_input_embeddings"))


class LM:
    """A model behind the LM calling convention, with the statistics of its calls.

    ``time_input``: "none" (the model takes no step), "step" (a fastdiff denoiser: integer ``t``),
    "sigma" (MDLM / DUO: the float noise level, passed as the keyword the model's signature names:
    ``sigma``, ``timesteps``, ``timestep``, ``t`` or ``time``; a model without one is time-free)."""

    def __init__(self, model: object, *, shift: bool, time_input: str = "none") -> None:
        if not callable(model):
            raise InputTypeError(f"model: expected a callable model, got {type(model).__name__}")
        self.model = model
        self.shift = bool(shift)
        self.fastdiff = is_fastdiff_denoiser(model)
        names, var_kw, positional = _keywords(model)
        self.takes_mask = var_kw or "attention_mask" in names
        self.takes_positions = var_kw or "position_ids" in names
        # Hugging Face's ``logits_to_keep``: the model computes the LM head only at these positions (the head
        # is most of a step's work at V = 32k and short windows); only a model that names it explicitly gets it
        self.takes_keep = "logits_to_keep" in names and not self.fastdiff
        self.kv_takes_keep = any("logits_to_keep" in _keywords(getattr(model, m, None) or (lambda: None))[0]
                                 for m in ("kv_forward",)) and not self.fastdiff
        self.time_kw: str | None = None
        self.time_positional = False
        if time_input == "sigma" and not self.fastdiff:
            for kw in ("sigma", "timesteps", "timestep", "t", "time"):  # MDLM's DiT: (indices, sigma); its HF
                if kw in names:                                         # port: (input_ids, timesteps)
                    self.time_kw = kw
                    break
        self.time_input = time_input
        #: does the output depend on the time input? (False allows MDLM's cache: reuse an unchanged input's output)
        self.takes_time = bool(getattr(model, "uses_time", True)) if self.fastdiff else (
            time_input == "sigma" and (self.time_kw is not None or self.time_positional))
        self.calls = 0
        self.rows = 0
        self.seconds = 0.0
        self.kv_capable = callable(getattr(model, "kv_forward", None)) and callable(getattr(model, "kv_window", None))
        self.exact_kv = callable(getattr(model, "new_cache", None)) and callable(getattr(model, "extend_cache", None))

    # --------------------------------------------------------------------------------------------
    def _time(self, B: int, t: float | int | torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(t, torch.Tensor):  # a CUDA graph's static (B,) time buffer (generation/_graph.py)
            return t
        if self.fastdiff:
            return torch.full((B,), int(t), dtype=torch.int64, device=device)
        return torch.full((B,), float(t), dtype=torch.float32, device=device)

    def _kwargs(self, am: torch.Tensor | None, pos: torch.Tensor | None) -> dict:
        kw: dict[str, Any] = {}
        if self.fastdiff:
            if am is not None:
                kw["attention_mask"] = am.to(torch.bool)
            return kw
        if am is not None and self.takes_mask:
            kw["attention_mask"] = am.to(torch.int64)
        if pos is not None and self.takes_positions:
            kw["position_ids"] = pos
        return kw

    def _invoke(self, fn: Callable, x: torch.Tensor, t: float | int, kw: dict) -> object:
        B = x.shape[0]
        if self.fastdiff:
            return fn(x, self._time(B, t, x.device), **kw)
        if self.time_input == "sigma":
            if self.time_kw is not None:
                kw = {**kw, self.time_kw: self._time(B, t, x.device)}
            elif self.time_positional:
                return fn(x, self._time(B, t, x.device), **kw)
        return fn(x, **kw)

    def _timed(self, thunk: Callable[[], object], x: torch.Tensor) -> object:
        sync = x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()  # no sync in a capture
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = thunk()
        if sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += x.shape[0]
        return out

    def _check(self, out: object, B: int, n: int, vocab: int | None) -> torch.Tensor:
        logits = unwrap_logits(out, f"model output at call {self.calls}")
        where = f"model output at call {self.calls}"
        if not logits.is_floating_point() or logits.ndim != 3 or logits.shape[:2] != (B, n):
            raise InputError(f"{where}: expected ({B}, {n}, V) floating logits, got {tuple(logits.shape)} "
                             f"{logits.dtype}")
        if vocab is not None and logits.shape[-1] < vocab:
            raise InputError(f"{where}: {logits.shape[-1]} logits per position, but mask_id needs at least {vocab}")
        return logits

    @staticmethod
    def _shifted(logits: torch.Tensor) -> torch.Tensor:
        """Dream's realignment: the logits at ``i - 1`` predict token ``i``; position 0 keeps its own."""
        return torch.cat([logits[:, :1], logits[:, :-1]], 1)

    def _keep(self, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """The ``logits_to_keep`` indices of positions ``[lo, hi)`` (raw positions of a shifted model: the
        logits at ``i - 1`` predict ``i``; position 0 keeps its own)."""
        idx = torch.arange(lo, hi, device=device)
        return (idx - 1).clamp_min(0) if self.shift else idx

    def __call__(self, x: torch.Tensor, t: float | int, am: torch.Tensor | None, pos: torch.Tensor | None,
                 vocab: int | None = None, keep: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits ``(B, L, V)``, or ``(B, hi - lo, V)`` of positions ``[lo, hi)`` when ``keep = (lo, hi)``
        (computed only there when the model takes ``logits_to_keep``)."""
        kw = self._kwargs(am, pos)
        lo, hi = keep if keep is not None else (0, x.shape[1])
        if keep is not None and self.takes_keep:
            kw["logits_to_keep"] = self._keep(lo, hi, x.device)
            out = self._timed(lambda: self._invoke(self.model, x, t, kw), x)
            return self._check(out, x.shape[0], hi - lo, vocab)  # already aligned (see _keep)
        out = self._timed(lambda: self._invoke(self.model, x, t, kw), x)
        logits = self._check(out, x.shape[0], x.shape[1], vocab)
        logits = self._shifted(logits) if self.shift else logits
        return logits if keep is None else logits[:, lo:hi]

    # --- Fast-dLLM caches --------------------------------------------------------------------------
    def kv_forward(self, x: torch.Tensor, t: float | int, am: torch.Tensor | None, pos: torch.Tensor | None,
                   vocab: int | None = None, keep: tuple[int, int] | None = None) -> tuple[torch.Tensor, object]:
        kw = self._kwargs(am, pos)
        B = x.shape[0]
        tt = self._time(B, t, x.device)
        lo, hi = keep if keep is not None else (0, x.shape[1])
        if keep is not None and self.kv_takes_keep:
            kw["logits_to_keep"] = self._keep(lo, hi, x.device)
        res = self._timed(lambda: self.model.kv_forward(x, tt, **kw), x)
        if not isinstance(res, tuple) or len(res) != 2:
            raise InputTypeError("model.kv_forward: expected (logits, cache)")
        if "logits_to_keep" in kw:
            return self._check(res[0], B, hi - lo, vocab), res[1]
        logits = self._check(res[0], B, x.shape[1], vocab)
        logits = self._shifted(logits) if self.shift else logits
        return (logits if keep is None else logits[:, lo:hi]), res[1]

    def kv_window(self, x: torch.Tensor, start: int, end: int, t: float | int, cache: object,
                  am: torch.Tensor | None, pos: torch.Tensor | None, vocab: int | None = None,
                  keep_to: int | None = None) -> torch.Tensor:
        """Logits of positions ``[start, end)`` of ``x`` through the cache (only ``[start, keep_to)`` when
        given, computed only there when the model's ``kv_window`` takes ``logits_to_keep``). A shifted model
        needs the raw logits of ``[start - 1, end - 1)``: its window then starts one position earlier."""
        a = start - 1 if (self.shift and start > 0) else start
        kw = self._kwargs(am, pos)
        if keep_to is not None and self.kv_takes_keep and not self.shift:
            B = x.shape[0]
            kw["logits_to_keep"] = torch.arange(start, keep_to, device=x.device)
            tt = self._time(B, t, x.device)
            win = x[:, start:end]
            out = self._timed(lambda: self.model.kv_window(win, tt, cache=cache, start=start, **kw), win)
            return self._check(out, B, keep_to - start, vocab)
        B = x.shape[0]
        tt = self._time(B, t, x.device)
        win = x[:, a:end]
        out = self._timed(lambda: self.model.kv_window(win, tt, cache=cache, start=a, **kw), win)
        logits = self._check(out, B, end - a, vocab)
        if not self.shift:
            return logits
        if a == start:  # window at position 0: position 0 keeps its own logits
            return self._shifted(logits)
        return logits[:, :-1]

    # --- BD3-LM exact cache --------------------------------------------------------------------------
    def block(self, x_block: torch.Tensor, start: int, t: float | int, cache: object,
              vocab: int | None = None) -> torch.Tensor:
        B = x_block.shape[0]
        tt = self._time(B, t, x_block.device)
        out = self._timed(lambda: self.model(x_block, tt, cache=cache, start=start), x_block)
        return self._check(out, B, x_block.shape[1], vocab)
