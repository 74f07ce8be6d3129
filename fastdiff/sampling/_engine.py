"""The sampling loop: batch state, blocks, model calls (guidance, caching, KV cache), statistics.

One :class:`_Run` holds the state of a batch. Its loop walks the semi-autoregressive blocks (one block
covering the whole sequence when ``block_size`` is None); inside a block every step is one network
call (one batch holding the conditional and unconditional halves under classifier-free guidance) and
one fused update op (:func:`fastdiff.ops.posterior_sample`, :func:`~fastdiff.ops.sample_categorical`
or the continuous step), so no ``(B, L, V)`` temporary is built in Python besides the network's output.

Randomness: op call number ``k`` of the run draws with counter offset ``k`` under ``seed`` (rows in C
order over the ``(B, block)`` region), and the continuous noise likewise, so a run is a pure function
of the seed and the inputs. Rows are numbered globally: with ``sample_offset = s0`` the batch holds
samples ``s0 .. s0 + B - 1`` of a larger run, and row ``r`` of a draw over ``(B, n)`` uses counter row
``s0·n + r``, so a sample's draws depend on its global index only, never on how the run was split into
batches or ranks (:mod:`fastdiff.distributed`).

Network calls: what the model returns is never written to (it may be a tensor the model keeps, or an
expanded view): guidance, the mask column and the MDLM cache work on tensors the sampler made, copying
a model's output only where no new tensor is made anyway. With ``micro_batch = m`` every call has
exactly ``m`` rows per half and sample ``g`` (global index) sits in row ``g mod m`` of its call; the rows
no sample fills repeat a real row of that call. A sample's network output then depends on its own input
only, not on the batch it was generated in (see :func:`fastdiff.sampling.sample`).

Model outputs are checked right after each call (shape, floating dtype, device; the values of a
continuous output) and a discrete output's values inside the op that reads them anyway (NaN, +inf, rows
with nothing to draw): both raise :class:`~fastdiff.errors.InputError` naming the model output, the step
and ``t``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

import torch

from .. import _checks
from .. import random as _random
from ..errors import InputError, InputTypeError
from . import _memory
from ._adapters import Denoiser

if TYPE_CHECKING:
    from tqdm import tqdm

    from ._graph import StepGraphs
    from ._options import Options, Process
    from .strategies import Strategy

#: argument names under which the ops report the values of the logits they were given
_OP_LOGIT_ARGS = ("x0_logits: ", "logits: ")


def _module_params(fn: object) -> torch.nn.Parameter | None:
    params = getattr(fn, "parameters", None)
    if not callable(params):
        return None
    try:
        return next(iter(params()))
    except (StopIteration, TypeError):
        return None


class _Run:
    """The state of one batch's run. The strategies read it and change it only through its methods.

    Set once (the run's inputs): ``model``, ``process``, ``spec`` (the strategy's table entry) and
    ``strategy`` (its name), ``steps``, ``o`` (the sampler's own :class:`Options`), ``B``, ``L``, ``seed``,
    ``sample_offset``, ``continuous``, ``device``.

    State, read through properties and changed by the methods named:

    * ``fixed`` ``(B, L)`` bool: positions whose token is decided (prompts, padding, and the positions
      after an EOS once a block stops its row: :meth:`stop_at_eos`); ``values`` ``(B, L)`` int64: their
      tokens; ``prompt``: the user-fixed positions only (set up once); ``attention_mask``: ``(B, L)``
      bool for ``lengths`` (or None);
    * ``finished`` ``(B,)`` bool: rows stopped at an EOS in an earlier block, never evaluated again
      (:meth:`stop_at_eos`); and the rows whose final tokens hold an EOS, counted in the stats
      (:meth:`cut_at_eos`);
    * ``kv``: the block-causal model's KV cache (:meth:`start_kv`, :meth:`extend_kv`);
    * ``trajectory``: the tokens after every step (:meth:`after_step`), or None;
    * the draw counter (:meth:`next_offset`, :meth:`uniform`, :meth:`randn`) and the statistics
      (:meth:`evaluate`, :meth:`after_step`, read by :meth:`finish_stats`).
    """

    def __init__(self, model: Denoiser, process: Process, spec: Strategy, steps: int, shape: tuple[int, int],
                 seed: int, o: Options) -> None:
        self.model, self.process, self.spec, self.steps, self.o = model, process, spec, steps, o
        self.strategy = spec.name
        self.B, self.L = shape
        self.seed = _random._check_seed(seed)
        self.sample_offset = _checks.positive_int("sample_offset", o.sample_offset, 0)
        self.continuous = spec.family == "continuous"
        self._check_tensor_inputs()
        self.device = self._pick_device()
        self._stats = {"network_calls": 0, "sequences_evaluated": 0, "steps": 0, "model_time_s": 0.0}
        self._check_counter_rows()
        self._check_capacity()
        self._check_memory()
        self._draws = 0  # op-call counter: the Philox offset of the next draw
        self._trajectory: list[torch.Tensor] | None = [] if o.trajectory else None
        self._fixed = torch.zeros(self.B, self.L, dtype=torch.bool, device=self.device)
        self._values = torch.zeros(self.B, self.L, dtype=torch.int64, device=self.device)
        self._prompt = self._fixed
        self._attention_mask: torch.Tensor | None = None
        self._check_batch_options()
        self._finished = torch.zeros(self.B, dtype=torch.bool, device=self.device)
        self._stopped = self._finished
        self._kv: object | None = None
        self._step_graphs: StepGraphs | None = None

    # ------------------------------------------------------------------------------------------------
    # state, read-only from outside
    # ------------------------------------------------------------------------------------------------
    @property
    def fixed(self) -> torch.Tensor:
        return self._fixed

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @property
    def prompt(self) -> torch.Tensor:
        return self._prompt

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._attention_mask

    @property
    def finished(self) -> torch.Tensor:
        return self._finished

    @property
    def kv(self) -> object | None:
        return self._kv

    @property
    def trajectory(self) -> list[torch.Tensor] | None:
        return self._trajectory

    @property
    def step_graphs(self) -> StepGraphs | None:
        """Whole ancestral steps replayed as CUDA graphs (``cuda_graph=True`` where they apply), or None."""
        return self._step_graphs

    def use_graphs(self, step_graphs: StepGraphs | None, model: Denoiser | None = None) -> None:
        """``cuda_graph=True``, set up once before the loop: the captured steps (:mod:`._graph`), or
        ``model``, the network replayed as a graph alone (:class:`~fastdiff.sampling.CUDAGraphed`)."""
        self._step_graphs = step_graphs
        if model is not None:
            self.model = model

    # ------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------
    def _check_tensor_inputs(self) -> None:
        """The per-position tensors: given together, tensors, dense, with values (not on the meta device)."""
        o = self.o
        if (o.fixed is None) != (o.x_init is None):
            given, missing = ("fixed", "x_init") if o.x_init is None else ("x_init", "fixed")
            raise InputError(f"{given}: needs {missing}= too ('fixed' is the mask of held positions, 'x_init' the "
                             "tokens they hold)")
        for name in ("fixed", "x_init", "lengths"):
            t = getattr(o, name)
            if t is None:
                continue
            _checks.tensor(name, t)
            if t.device.type == "meta" or t.layout != torch.strided:
                raise InputError(f"{name}: expected a dense CPU or CUDA tensor with values, got a {t.device.type} "
                                 f"{str(t.layout).replace('torch.', '')} tensor")

    def _pick_device(self) -> torch.device:
        o = self.o
        if o.device is None:
            dev = self._guess_device()
        else:
            if not isinstance(o.device, (str, torch.device)):
                raise InputTypeError(f"device: expected a str or torch.device, got {type(o.device).__name__}")
            try:
                dev = torch.device(o.device)
            except (RuntimeError, ValueError, TypeError) as e:
                raise InputError(f"device: {o.device!r} is not a device ({e})") from e
        if dev.type == "meta":
            raise InputError("device: the sampler computes values; the meta device has none")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device: {dev} requested but CUDA is not available")
        p = _module_params(self.model.fn)
        if p is not None and p.device != dev and not (p.device.type == dev.type == "cuda" and dev.index is None):
            raise InputError(f"device: the batch is on {dev} but the model's parameters are on {p.device}; move "
                             "the model or pass device= to match")
        return dev

    def _guess_device(self) -> torch.device:
        o = self.o
        for t in (o.x_init, o.fixed, o.embedding, o.lengths):
            if isinstance(t, torch.Tensor):
                return t.device
        p = _module_params(self.model.fn)
        return p.device if p is not None else torch.device("cpu")

    def _per_sample_rows(self) -> int:
        """Counter rows one sample owns in its largest draw (``L``, or ``L·D`` for continuous noise)."""
        return self.L * (self.o.embedding.shape[1] if self.continuous else 1)

    def _check_counter_rows(self) -> None:
        end = (self.sample_offset + self.B) * self._per_sample_rows()
        if end > 2**64:
            raise InputError(f"sample_offset: samples {self.sample_offset} .. {self.sample_offset + self.B - 1} "
                             f"need counter rows up to {end}, past the 2**64 rows of the random stream")

    def _check_capacity(self) -> None:
        cap = _memory.positional_capacity(self.model.fn)
        if cap is not None and self.L > cap[0]:
            raise InputError(f"shape: length {self.L} exceeds the model's positional capacity {cap[0]} ({cap[1]})")

    def _itemsize(self) -> int:
        p = _module_params(self.model.fn)
        return p.element_size() if p is not None and p.is_floating_point() else 4

    def calls_rows(self) -> int:
        """Rows of one network call (both halves under guidance)."""
        halves = 2 if self.o.guidance_scale != 1.0 else 1
        return halves * (self.o.micro_batch if self.o.micro_batch is not None else self.B)

    def _check_memory(self) -> None:
        """The large buffers of this run, against what the device has free, before allocating any."""
        o, B, L = self.o, self.B, self.L
        width = o.embedding.shape[1] if self.continuous else self.process.vocab_size
        item = self._itemsize()
        rows = self.calls_rows()
        parts = {f"network output ({rows}, {L}, {width})": rows * L * width * item,
                 "working copy": B * L * width * max(item, 4)}
        if o.cache or (o.eos_id is not None and o.block_size is not None):
            parts["cached logits"] = B * L * width * max(item, 4)
        fwd = getattr(self.model.fn, "forward_memory", None)
        if callable(fwd):
            try:
                parts["model activations"] = float(fwd(rows, L))
            except (TypeError, ValueError):
                pass
        if o.trajectory:
            nblocks = -(-L // (o.block_size or L))
            per_block = self.steps
            if not self.spec.walks_grid:
                per_block = min(per_block, o.block_size or L)
            parts["trajectory"] = nblocks * per_block * B * L * 8
        parts["batch state"] = B * L * 8 * 6
        name = "micro_batch" if o.micro_batch is not None and o.micro_batch > B else "shape"
        _memory.check_fits(name, parts, self.device,
                           "lower the batch size (shape[0]) or the length (shape[1]), or set micro_batch= to "
                           "bound the rows of each network call")

    def _check_batch_options(self) -> None:
        o, B, L = self.o, self.B, self.L
        V = self.vocab_size
        if self.spec.per_position and self.steps > L + self.process.T:
            raise InputError(f"steps: at most N + T = {L + self.process.T} sentence-level transitions "
                             f"(AR-Diffusion; N = {L} the length), got {self.steps}")
        if o.fixed is not None or o.x_init is not None:
            fixed = o.fixed
            if fixed.dtype != torch.bool:
                raise InputTypeError(f"fixed: expected a bool mask, got {fixed.dtype}")
            if fixed.shape != (B, L):
                raise InputError(f"fixed: expected shape {(B, L)}, got {tuple(fixed.shape)}")
            x_init = _checks.integer("x_init", o.x_init)
            if x_init.shape != (B, L):
                raise InputError(f"x_init: expected shape {(B, L)}, got {tuple(x_init.shape)}")
            x_init = x_init.to(self.device, torch.int64)
            fixed = fixed.to(self.device)
            held = x_init[fixed]
            if held.numel() and bool(((held < 0) | (held >= V)).any()):
                raise InputError(f"x_init: tokens at fixed positions must lie in [0, {V})")
            if not self.continuous and self.process.kind == "absorbing" and bool((held == self.process.mask_id).any()):
                raise InputError("x_init: a fixed position holds the mask token")
            self._fixed |= fixed
            self._values = torch.where(fixed, x_init, self._values)
        self._prompt = self._fixed.clone()  # user-fixed positions (prompts, infilling context)
        if o.lengths is not None:
            lengths = _checks.integer("lengths", o.lengths).to(self.device, torch.int64)
            if lengths.shape != (B,):
                raise InputError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
            if bool(((lengths < 1) | (lengths > L)).any()):
                raise InputError(f"lengths: every length must lie in [1, L={L}]")
            pad = o.pad_id if o.pad_id is not None else o.eos_id
            if pad is None:
                raise InputError("pad_id: variable lengths need pad_id (or eos_id) to fill the padding")
            real = torch.arange(L, device=self.device)[None, :] < lengths[:, None]
            self._attention_mask = real
            self._fixed |= ~real
            self._values = torch.where(real, self._values, torch.full_like(self._values, pad))
        if o.guidance_scale != 1.0:
            if o.cond is None and not bool(self._prompt.any()):
                raise InputError("guidance_scale: classifier-free guidance needs a condition: cond/uncond "
                                 "keyword tensors, or fixed prompt positions (masked out for the unconditional pass)")
            if o.cond is not None and o.uncond is None:
                raise InputError("uncond: classifier-free guidance with cond= needs uncond= (the same keywords "
                                 "holding the null condition) so both passes run in one batch")
            if o.cond is None and (self.continuous or self.process.kind != "absorbing") and o.uncond is None:
                raise InputError("uncond: without cond/uncond, the unconditional pass masks the prompt, which "
                                 "needs an absorbing process")
        reserved = {}
        if o.lengths is not None:
            reserved["attention_mask"] = "lengths= builds the attention mask from the lengths; give one or the other"
        if self.continuous and o.self_condition:
            reserved[o.self_cond_kwarg] = "self_condition=True passes the previous x0 estimate under this name"
        if o.kv_cache:
            reserved["cache"] = reserved["start"] = "kv_cache=True passes the cache and the block start"
        if self.model.time_kwarg is not None:
            reserved[self.model.time_kwarg] = "the model receives the step under this name"
        for name in ("cond", "uncond"):
            d = getattr(o, name)
            for k, v in (d or {}).items():
                if k in reserved:
                    raise InputError(f"{name}: keyword {k!r} is set by the sampler ({reserved[k]})")
                if isinstance(v, torch.Tensor):
                    if v.ndim == 0 or v.shape[0] != B:
                        raise InputError(f"{name}: tensor {k!r} must have the batch size {B} as its first "
                                         f"dimension, got {tuple(v.shape)}")
                    if v.device != self.device:
                        raise InputError(f"{name}: tensor {k!r} is on {v.device}, the batch on {self.device}")
        if o.cond is not None and o.uncond is not None and set(o.cond) != set(o.uncond):
            raise InputError(f"uncond: keys {sorted(o.uncond)} differ from cond's {sorted(o.cond)}")
        if o.guidance_scale != 1.0 and o.cond is not None and o.uncond is not None and _same_keywords(o.cond, o.uncond):
            raise InputError("uncond: is cond itself (the same tensors), so classifier-free guidance would change "
                             "nothing (uncond + s·(cond - uncond) = cond); give the null condition (e.g. the null "
                             "label) or leave guidance_scale at 1")
        if o.cuda_graph and self.device.type != "cuda":
            raise InputError(f"cuda_graph: CUDA graphs need a CUDA device, the batch is on {self.device}")
        if o.kv_cache and o.guidance_scale != 1.0:
            raise InputError("guidance_scale: classifier-free guidance doubles the batch, which the KV cache "
                             "of a block-causal model does not hold; use kv_cache=False")
        if o.kv_cache:
            for attr in ("new_cache", "extend_cache"):
                if not callable(getattr(self.model.fn, attr, None)):
                    raise InputTypeError(f"model: kv_cache=True needs a block-causal model with {attr}(); "
                                    "see fastdiff.sampling.BlockCausalDenoiser")
        if o.cache and self.model.uses_time:
            raise InputError("cache: MDLM caching is exact only for models that ignore t; wrap the model with "
                             "as_denoiser(model, uses_time=False) if it does")
        if not self.continuous and self.process.kind == "absorbing":
            declared = self.model.declared_mask_id()
            if declared is not None and declared[0] != self.process.mask_id:
                raise InputError(f"process: mask_id {self.process.mask_id} differs from the model's mask token "
                                 f"{declared[0]} ({declared[1]}); the model would read the process's masks as "
                                 "ordinary tokens")

    @property
    def vocab_size(self) -> int:
        if self.continuous:
            return self.o.embedding.shape[0]
        return self.process.vocab_size

    # ------------------------------------------------------------------------------------------------
    # model calls
    # ------------------------------------------------------------------------------------------------
    def _kw(self, d: dict | None, rows: torch.Tensor | None) -> dict:
        out = {}
        for k, v in (d or {}).items():
            out[k] = v.index_select(0, rows) if (rows is not None and isinstance(v, torch.Tensor)) else v
        return out

    def _call(self, x_in: torch.Tensor, t: int | torch.Tensor, kw: dict) -> torch.Tensor:
        if isinstance(t, torch.Tensor):  # per-position steps (L,) (AR-Diffusion): (rows, L) for the model
            tt = t.to(device=x_in.device, dtype=torch.int64).expand(x_in.shape[0], -1)
        else:
            tt = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x_in.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.model(x_in, tt, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._stats["model_time_s"] += time.perf_counter() - t0
        self._stats["network_calls"] += 1
        self._stats["sequences_evaluated"] += x_in.shape[0]
        self.check_output(out, x_in, t)
        return out

    def count_call(self, rows: int, seconds: float) -> None:
        """Count one network call made outside :meth:`_call` (a CUDA graph replay of a whole step, whose
        time, network and op together, goes to ``model_time_s``)."""
        self._stats["model_time_s"] += seconds
        self._stats["network_calls"] += 1
        self._stats["sequences_evaluated"] += rows

    def call_kw(self, Lc: int) -> dict:
        """The keywords of a network call over all rows and ``Lc`` context positions (no guidance): the
        condition, and the attention mask when the model takes one."""
        kw = self._kw(self.o.cond, None)
        if self._attention_mask is not None and self.model.accepts_attention_mask:
            kw["attention_mask"] = self._attention_mask[:, :Lc]
        return kw

    def _where(self, t: int | torch.Tensor) -> str:
        t = t.tolist() if isinstance(t, torch.Tensor) else t
        return f"model output at step {self._stats['steps'] + 1} (t={t})"

    def check_output(self, out: object, x_in: torch.Tensor, t: int) -> None:
        """Shape, dtype and device of one call's output; the values of a continuous output (one
        reduction). A discrete output's values are checked by the op that reads them (:meth:`op_values`)."""
        where = self._where(t)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputTypeError(f"{where}: expected a floating tensor, got {got}")
        width = self.o.embedding.shape[1] if self.continuous else self.vocab_size
        want = (x_in.shape[0], x_in.shape[1], width)
        if tuple(out.shape) != want:
            raise InputError(f"{where}: shape {tuple(out.shape)} differs from the expected {want}")
        if out.device != x_in.device:
            raise InputError(f"{where}: on {out.device}, the batch on {x_in.device}")
        if out.layout != torch.strided:
            raise InputError(f"{where}: expected a dense tensor, got layout {out.layout}")
        if self.continuous and out.numel():
            lo, hi = torch.aminmax(out)
            if bool(torch.isnan(lo) | torch.isnan(hi)):
                raise InputError(f"{where}: contains NaN")
            if bool(torch.isinf(lo) | torch.isinf(hi)):
                raise InputError(f"{where}: contains infinity")

    @contextlib.contextmanager
    def op_values(self, t: int) -> Iterator[None]:
        """Inside: an op's value error about the logits it was given (NaN, +inf, a row with nothing to
        draw) is about the model's output; it is raised again naming the output, the step and ``t``."""
        try:
            yield
        except ValueError as e:
            msg = str(e)
            for prefix in _OP_LOGIT_ARGS:
                if msg.startswith(prefix):
                    guided = " (guided)" if self.o.guidance_scale != 1.0 else ""
                    raise InputError(f"{self._where(t)}{guided}: {msg[len(prefix):]}") from e
            raise

    def _own(self, out: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(out, owned)`` for a model's output: the sampler may write into it only when the model declares
        ``fresh_output`` (a new tensor every call, kept nowhere) and the tensor is contiguous (no expanded,
        self-overlapping view)."""
        return out, self.model.fresh_output and out.is_contiguous()

    def _forward(self, x_all: torch.Tensor, kw: dict, halves: int, t: int,
                 rows: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
        """The network on ``x_all`` (``halves`` stacked copies of ``n`` batch rows ``rows``, all rows when
        None): ``(output, owned)``, ``owned`` when the tensor is the sampler's (not the model's)."""
        m = self.o.micro_batch
        if m is None:
            return self._own(self._call(x_all, t, kw))
        n = x_all.shape[0] // halves
        local = list(range(n)) if rows is None else rows.tolist()
        glob = [self.sample_offset + r for r in local]
        if n == m and glob[0] % m == 0 and all(g == glob[0] + i for i, g in enumerate(glob)):
            return self._own(self._call(x_all, t, kw))  # already one aligned call of m rows
        chunks: dict[int, list[tuple[int, int]]] = {}
        for pos, g in enumerate(glob):
            chunks.setdefault(g // m, []).append((pos, g % m))
        dev = x_all.device
        res = None
        for members in chunks.values():
            src = [members[0][0]] * m  # rows no sample fills repeat the call's first real row
            for pos, slot in members:
                src[slot] = pos
            idx = torch.tensor([h * n + s for h in range(halves) for s in src], device=dev)
            x_c = x_all.index_select(0, idx)
            kw_c = {k: (v.index_select(0, idx) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            out = self._call(x_c, t, kw_c)
            if res is None:
                res = torch.empty((halves * n,) + tuple(out.shape[1:]), dtype=out.dtype, device=dev)
            dst = torch.tensor([h * n + pos for h in range(halves) for pos, _ in members], device=dev)
            pick = torch.tensor([h * m + slot for h in range(halves) for _, slot in members], device=dev)
            res.index_copy_(0, dst, out.index_select(0, pick).to(res.dtype))
        return res, True

    def evaluate(self, x_ctx: torch.Tensor, t: int, rows: torch.Tensor | None = None, *,
                 extra: dict | None = None, ctx_fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """The network's output on ``x_ctx`` (rows ``rows`` of the batch, all when None), with
        classifier-free guidance combined: ``uncond + s·(cond - uncond)``. Returns ``(output, owned)``:
        ``owned`` is False when the tensor is the model's own output, which must not be written to."""
        o = self.o
        kw = self._kw(o.cond, rows)
        if extra:
            kw.update(extra)
        Lc = x_ctx.shape[1]
        if self._attention_mask is not None and self.model.accepts_attention_mask:
            am = self._attention_mask[:, :Lc]
            kw["attention_mask"] = am if rows is None else am.index_select(0, rows)
        if o.guidance_scale == 1.0:
            return self._forward(x_ctx, kw, 1, t, rows)
        if o.uncond is not None:
            ukw = self._kw(o.uncond, rows)
            ukw.update({k: v for k, v in kw.items() if k not in o.uncond})  # extra / attention_mask
            x_u = x_ctx
        else:  # the prompt masked out: LLaDA's unconditional pass
            ukw = dict(kw)
            prompt = self._prompt[:, :Lc] if ctx_fixed is None else ctx_fixed
            if rows is not None:
                prompt = prompt.index_select(0, rows)
            x_u = torch.where(prompt, torch.full_like(x_ctx, self.process.mask_id), x_ctx)
        both = {}
        for k in set(kw) | set(ukw):
            a, b = kw.get(k), ukw.get(k)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                both[k] = torch.cat([a, b])
            elif a is b or (a is not None and b is not None and not isinstance(a, torch.Tensor)
                            and not isinstance(b, torch.Tensor) and a == b):
                both[k] = a
            else:
                raise InputError(f"uncond: keyword {k!r} must be a tensor in both cond and uncond (or equal in both)")
        out, owned = self._forward(torch.cat([x_ctx, x_u]), both, 2, t, rows)
        cond_out, uncond_out = out.chunk(2)
        # A logit at -inf in both halves (e.g. the mask column of an MDLM/SUBS model) stays -inf;
        # lerp would give -inf + s·NaN there. Any other NaN still reaches the ops' check.
        both_masked = torch.isneginf(cond_out)
        both_masked &= torch.isneginf(uncond_out)
        s = float(o.guidance_scale)
        guided = uncond_out.lerp_(cond_out, s) if owned else torch.lerp(uncond_out, cond_out, s)
        return guided.masked_fill_(both_masked, float("-inf")), True

    # ------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[int, int]]:
        bs = self.o.block_size or self.L
        return [(a, min(a + bs, self.L)) for a in range(0, self.L, bs)]

    def row_offset(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Global counter row of the first element of a draw over ``shape = (B, ...)``: every sample owns
        ``prod(shape[1:])`` consecutive rows, numbered from its global index (``sample_offset + b``)."""
        per = 1
        for d in tuple(shape)[1:]:
            per *= int(d)
        return self.sample_offset * per

    def next_offset(self) -> int:
        """The counter offset of the next draw (each op call or noise draw takes one)."""
        k = self._draws
        self._draws += 1
        return k

    def uniform(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """float64 uniforms over ``shape = (B, ...)`` at the next offset, rows numbered globally."""
        return _random.uniform(tuple(shape), seed=self.seed, offset=self.next_offset(), start=self.row_offset(shape),
                               device=self.device)

    def randn(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise over ``shape = (B, ...)`` at the next offset, rows numbered globally."""
        return _random.randn(tuple(shape), seed=self.seed, offset=self.next_offset(), start=self.row_offset(shape),
                             dtype=dtype, device=self.device)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """:meth:`randn` shaped like ``like`` (the ``noise`` hook of the continuous steps)."""
        return self.randn(like.shape, like.dtype)

    def after_step(self, x: torch.Tensor, bar: tqdm | None) -> None:
        self._stats["steps"] += 1
        if self._trajectory is not None:
            self._trajectory.append(x.detach().clone())
        if self.o.callback is not None:
            self.o.callback(SampleStep(step=self._stats["steps"], tokens=x, network_calls=self._stats["network_calls"]))
        if bar is not None:
            bar.update(1)

    def rounds_per_block(self) -> int | None:
        """Steps per block for the progress bar: ``steps`` along the grid; a decoding strategy finishes a
        block within its length; with ``tokens_per_step`` the count depends on the masks (None)."""
        if self.spec.walks_grid:
            return self.steps
        if self.o.tokens_per_step is not None:
            return None
        return min(self.steps, self.o.block_size or self.L)

    # ------------------------------------------------------------------------------------------------
    # state changes between blocks
    # ------------------------------------------------------------------------------------------------
    def start_kv(self) -> None:
        """A new KV cache of the block-causal model (``kv_cache=True``)."""
        self._kv = self.model.fn.new_cache(self.B)

    def extend_kv(self, x: torch.Tensor, a: int, b: int) -> None:
        """Append the finished block ``x[:, a:b]`` to the KV cache."""
        self._kv = self.model.fn.extend_cache(self._kv, x[:, a:b], a)

    @property
    def pad_token(self) -> int | None:
        """``pad_id``, or ``eos_id`` when no pad is given."""
        return self.o.pad_id if self.o.pad_id is not None else self.o.eos_id

    def stop_at_eos(self, x: torch.Tensor, a: int, b: int) -> None:
        """After block ``[a, b)``: a row that generated ``eos_id`` in it stops: its later positions become
        ``pad_id`` (in ``x`` and as fixed values) and it is not evaluated any more (``finished``)."""
        hit = (x[:, a:b] == self.o.eos_id).any(1) & ~self._finished
        if bool(hit.any()):
            pad = self.pad_token
            rest = torch.zeros_like(self._fixed)
            rest[:, b:] = hit[:, None]
            self._fixed |= rest
            self._values = torch.where(rest, torch.full_like(self._values, pad), self._values)
            x[:, b:] = torch.where(hit[:, None], torch.full_like(x[:, b:], pad), x[:, b:])
            self._finished = self._finished | hit

    def cut_at_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final tokens with every position after a row's first generated EOS at ``pad_id``; the rows
        that hold one are counted in the stats (``stopped_at_eos``)."""
        is_eos = (tokens == self.o.eos_id) & ~self._prompt
        after = (torch.cumsum(is_eos.to(torch.int64), 1) - is_eos.to(torch.int64)) > 0
        after &= ~self._prompt
        self._stopped = is_eos.any(1)
        return torch.where(after, torch.full_like(tokens, self.pad_token), tokens)

    def progress(self, total: int | None) -> tqdm | None:
        """A tqdm bar on stderr when ``progress=True`` and stderr is a terminal (a log file or pipe gets
        no ``\\r`` frames)."""
        if not self.o.progress or not _isatty(sys.stderr):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"fastdiff {self.strategy}", unit="step", leave=False, file=sys.stderr)

    def finish_stats(self, t_start: float, tokens: torch.Tensor) -> dict:
        dt = max(time.perf_counter() - t_start, 1e-12)
        generated = int((~self._fixed).sum())
        st = dict(self._stats)
        st.update(
            time_s=dt,
            tokens_generated=generated,
            tokens_per_s=generated / dt,
            overhead_fraction=max(0.0, 1.0 - st["model_time_s"] / dt),
            strategy=self.strategy,
            batch=self.B,
            length=self.L,
            blocks=len(self.blocks()),
        )
        if self.o.eos_id is not None:
            st["stopped_at_eos"] = int(self._stopped.sum())
        return st


@dataclass
class SampleStep:
    """What ``callback`` / :meth:`Sampler.iterate` get after every step: ``step`` (1-based),
    ``tokens (B, L)`` (the sampler's working tensor: read it, clone it to keep it; a continuous run's are
    the current vectors rounded to their nearest embeddings), ``network_calls`` so far."""

    step: int
    tokens: torch.Tensor | None
    network_calls: int


def _same_keywords(a: dict, b: dict) -> bool:
    """``uncond`` passes the very objects of ``cond`` under every key (``uncond=cond``, a copy of the dict,
    or the same tensors): a mistake, not a batch whose condition happens to equal the null one."""
    return a is b or all(a[k] is b.get(k) for k in a)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def step_grid(T: int, steps: int) -> list[int]:
    """A decreasing integer grid ``T = t_K > ... > t_0 = 0`` with ``steps`` transitions (evenly spaced,
    rounded; never repeats a step)."""
    grid = torch.linspace(T, 0, steps + 1, dtype=torch.float64).round().long().tolist()
    out = [grid[0]]
    for g in grid[1:]:
        if g < out[-1]:
            out.append(g)
    return out


def num_transfer(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: ``n`` masked tokens spread over ``steps`` steps as evenly as possible, the
    remainder going to the first steps: ``(B, steps)`` int64."""
    base = n_masked // steps
    rem = n_masked % steps
    k = torch.arange(steps, device=n_masked.device)
    return base[:, None] + (k[None, :] < rem[:, None]).to(torch.int64)
