"""CUDA graphs of whole ancestral steps: the network's forward and the posterior op of one step captured in
one ``torch.cuda.CUDAGraph`` per static shape, replayed every step (``sample(..., cuda_graph=True)``).

Why: at small batches a step is dozens of short kernel launches (the network's layers, the plan's gathers,
the fused posterior), each paying the host's launch cost; one replay launches them all at once.

What is captured, per key (the ``(B, L_ctx)`` input of the block, the block ``[a, b)``, the shapes and
dtypes of the condition tensors; the block's position is part of the captured slice, so a ``block_size`` run
captures one graph per block, each replayed for that block's steps, and a :class:`~fastdiff.sampling.Sampler`
keeps them for its later calls with the same model, temperature, device and parameter storage; each graph holds
its static ``(B, L_ctx, V)`` logits, so at most :data:`MAX_GRAPHS` are kept, the least recently replayed
released first: a run with more blocks than that captures its blocks again on every call):

* static inputs: the network's token input ``(B, L_ctx)`` int64, the condition tensors, and one ``(5,)``
  int64 device buffer ``(seed, offset, row_offset, t, s)`` (the uint64 counter words' bits): before each
  replay the sampler copies the step's values into them;
* the body: ``t`` broadcast to ``(B,)`` for the network, the forward, the block's logits, the lowered
  posterior plan (``a_t = alpha_bar[t]`` gathered on the device from the buffer, the schedule moved to the
  device once), and ``fastdiff_cuda::posterior_counters``, the CUDA posterior kernel that reads
  ``(seed, offset, row_offset)`` from the buffer, so a replay draws the numbers of its own step
  (a kernel taking them as host ints would replay the captured ones);
* static outputs: the tokens ``(B·(b - a),)`` and the logits, whose values are checked after each replay
  (NaN, +inf, rows with nothing to draw: the check the eager path makes before its kernel, here made
  before the tokens are used; the kernel draws nothing out of bounds meanwhile).

Capture: two warm-up calls of the body on a side stream, then the capture; a body that cannot be captured
(a model reading tensor values on the host, data-dependent shapes) raises
:class:`~fastdiff.errors.InputError` naming ``cuda_graph``. The tokens equal the eager path's exactly: the same
network kernels on the same shapes, the same posterior kernel and counters.

Scope: the ancestral strategy with the posterior op (no ``top_k`` / ``top_p`` / ``classifier_grad``), an
absorbing (scalar or per-token schedule) or uniform process, ``guidance_scale`` 1, no ``micro_batch``, the
CUDA posterior kernel (``backend`` "auto" resolving to it, or "cuda"). Every other ``cuda_graph=True`` run
replays the network's forward alone (:class:`~fastdiff.sampling.CUDAGraphed`): the decoding strategies'
selection reads counts on the host between network and op. ``cache``, ``kv_cache`` and EOS-stopping blocks
change the batch between steps and are refused with ``cuda_graph`` (``_options.py``).

The graphs' device-independent plumbing (keys, buffers, counters, plan) runs on CPU in the tests with a
stand-in capture (``capture=``) that re-runs the body into the static outputs; the CUDA path itself has
only been compile-checked where no GPU was at hand (tests/test_sampling_cuda_graph.py runs it on one).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..ops._common import check_finite_above
from ..ops._plan import KIND_ABSORBING, KIND_ABSORBING_PER_TOKEN, KIND_UNIFORM, PosteriorPlan, int64_bits
from ._adapters import Denoiser

if TYPE_CHECKING:
    from ._engine import _Run
    from ._options import Options, Process
    from .strategies import Strategy

#: a capture: ``capture(body) -> (replay, outputs)``; ``replay()`` recomputes ``outputs`` in place
Capture = Callable[[Callable[[], tuple[torch.Tensor, ...]]], tuple[Callable[[], None], tuple[torch.Tensor, ...]]]
#: the op: ``op(plan, counters) -> tokens (N,)`` reading ``(seed, offset, row_offset)`` from ``counters``
CounterOp = Callable[[PosteriorPlan, torch.Tensor], torch.Tensor]

WARMUP = 2
#: captured steps kept per :class:`StepGraphs` (each holds a graph and its static logits)
MAX_GRAPHS = 8


def unsupported(spec: Strategy, o: Options, process: Process) -> str | None:
    """Why a ``cuda_graph=True`` run cannot capture whole steps (None: it can), before the device is known."""
    if spec.name != "ancestral":
        return f"strategy {spec.name!r} selects tokens on the host between the network and the op"
    if o.classifier_grad is not None or o.top_k is not None or o.top_p is not None:
        return "top_k / top_p / classifier_grad draw with sample_categorical after host-side work"
    if o.guidance_scale != 1.0:
        return "classifier-free guidance is not captured"
    if o.micro_batch is not None:
        return "micro_batch splits the call on the host"
    if getattr(process, "kind", None) not in ("absorbing", "uniform"):
        return "only absorbing and uniform processes are lowered inside the graph"
    if o.backend not in ("auto", "cuda"):
        return f"backend {o.backend!r} is not the CUDA kernel"
    return None


def capture_error(e: BaseException) -> InputError:
    """The error naming ``cuda_graph`` for a step body that could not be captured (``e``: why)."""
    return InputError(f"cuda_graph: the step could not be captured in a CUDA graph ({type(e).__name__}: {e}); a "
                      "model that reads tensor values on the host, synchronises or changes shapes with them cannot "
                      "be replayed: use cuda_graph=False")


def cuda_capture(body: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[Callable[[], None], tuple[torch.Tensor, ...]]:
    """Warm ``body`` up on a side stream, capture it in a ``torch.cuda.CUDAGraph``: ``(graph.replay, outputs)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body()
    return graph.replay, outs


def cuda_counter_op(plan: PosteriorPlan, counters: torch.Tensor) -> torch.Tensor:
    """The CUDA posterior kernel reading its counters from the device (``fastdiff_cuda::posterior_counters``)."""
    from ..ops.backends.cuda.posterior import posterior_counters

    return posterior_counters(plan.logits, plan.x_t, plan.t, plan.s, plan.kind, plan.mask_id, plan.temperature,
                              plan.a_t, plan.a_s, plan.ab_table, plan.fact1, plan.qbar_s, plan.pair, counters)


class StepGraphs:
    """The captured steps of one model under one process and temperature, keyed by static shape.

    ``capture`` and ``op`` default to :func:`cuda_capture` and :func:`cuda_counter_op`; the tests pass
    stand-ins to run the plumbing on CPU."""

    def __init__(self, model: Denoiser, process: Process, temperature: float, device: torch.device, *,
                 capture: Capture | None = None, op: CounterOp | None = None) -> None:
        self.model, self.process, self.temperature, self.device = model, process, float(temperature), device
        self.capture = capture or cuda_capture
        self.op = op or cuda_counter_op
        ab = process.schedule.alpha_bar.to(device=device, dtype=torch.float64).contiguous()  # moved once
        self.kind = KIND_UNIFORM if process.kind == "uniform" else (
            KIND_ABSORBING_PER_TOKEN if ab.ndim == 2 else KIND_ABSORBING)
        self.alpha_bar = ab
        self.mask_id = process.mask_id if process.kind == "absorbing" else -1
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()  # least recently replayed first

    @staticmethod
    def key(x_ctx: torch.Tensor, a: int, b: int, kw: dict) -> tuple:
        """The static shape of a step: the network's input, the block, each keyword's shape and dtype (or
        value, for a non-tensor)."""
        parts: list[object] = [tuple(x_ctx.shape), x_ctx.dtype, a, b]
        for k in sorted(kw):
            v = kw[k]
            parts.append((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)))
        return tuple(parts)

    def _plan(self, logits: torch.Tensor, x_t: torch.Tensor, scalars: torch.Tensor) -> PosteriorPlan:
        V = self.process.vocab_size
        lr = logits.reshape(-1, V)
        if lr.stride(-1) != 1:
            lr = lr.contiguous()
        xt = x_t.reshape(-1).contiguous()
        n = xt.shape[0]
        t1 = scalars[3:4].expand(n).contiguous()
        s1 = scalars[4:5].expand(n).contiguous()
        common = dict(logits=lr, x_t=xt, t=t1, s=s1, vocab_size=V, temperature=self.temperature)
        if self.kind == KIND_ABSORBING_PER_TOKEN:
            return PosteriorPlan(self.kind, mask_id=self.mask_id, ab_table=self.alpha_bar, **common)
        return PosteriorPlan(self.kind, mask_id=self.mask_id, a_t=self.alpha_bar.index_select(0, t1),
                             a_s=self.alpha_bar.index_select(0, s1), **common)

    def _build(self, run: _Run, x_ctx: torch.Tensor, a: int, b: int, kw: dict, t: int, s: int) -> tuple:
        sx = x_ctx.clone()
        skw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        scalars = torch.zeros(5, dtype=torch.int64, device=self.device)
        B = sx.shape[0]
        model = self.model

        def body() -> tuple[torch.Tensor, ...]:
            tt = scalars[3:4].expand(B).contiguous()
            out = model(sx, tt, **skw)
            run.check_output(out, sx, t)  # shape, dtype, device: static, checked while capturing
            lr = out[:, a:b]
            tokens = self.op(self._plan(lr, sx[:, a:b], scalars), scalars[:3])
            return tokens, lr

        self._fill(scalars, run, t, s, sx[:, a:b].shape)  # warm-up and capture values: this step's, offset 0
        try:
            with run.op_values(t):  # a kernel's value error during warm-up names the model output, as eagerly
                replay, (tokens, lr) = self.capture(body)
        except InputError:
            raise
        except (RuntimeError, TypeError, ValueError) as e:
            raise capture_error(e) from e
        return replay, sx, skw, scalars, tokens, lr

    @staticmethod
    def _fill(scalars: torch.Tensor, run: _Run, t: int, s: int, shape: tuple[int, ...] | torch.Size,
              offset: int | None = None) -> None:
        vals = [int64_bits(run.seed), int64_bits(0 if offset is None else offset),
                int64_bits(run.row_offset(shape)), t, s]
        scalars.copy_(torch.tensor(vals, dtype=torch.int64))

    def step(self, run: _Run, x: torch.Tensor, a: int, b: int, ctx_end: int, t: int, s: int, kw: dict) -> torch.Tensor:
        """One ancestral step of block ``[a, b)`` on ``x`` (the whole batch): the drawn block ``(B, b - a)``
        (the static output: read it before the next step)."""
        x_ctx = x[:, :ctx_end]
        key = self.key(x_ctx, a, b, kw)
        entry = self.entries.get(key)
        if entry is None:
            while len(self.entries) >= MAX_GRAPHS:
                self.entries.popitem(last=False)  # its graph and static tensors go with the last reference
            entry = self.entries[key] = self._build(run, x_ctx, a, b, kw, t, s)
        self.entries.move_to_end(key)
        replay, sx, skw, scalars, tokens, lr = entry
        sx.copy_(x_ctx)
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                skw[k].copy_(v)
        xr_shape = (x.shape[0], b - a)
        self._fill(scalars, run, t, s, xr_shape, offset=run.next_offset())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        replay()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        run.count_call(sx.shape[0], time.perf_counter() - t0)
        with run.op_values(t):
            check_finite_above("x0_logits", lr, self.temperature, mask_id=self.mask_id if self.mask_id >= 0 else None,
                               x_t=sx[:, a:b])
        return tokens.reshape(xr_shape)
