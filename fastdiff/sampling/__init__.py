"""Batched multi-step sampling: fastdiff as the sampling backend of somebody else's denoiser.

``sample(model, process, shape=(B, L), steps=K, strategy=..., seed=0, **options) -> SampleOutput``

The model is any callable ``model(x_t, t, **cond)`` (see :mod:`fastdiff.sampling._adapters` for the
protocol, :func:`as_denoiser` and the Hugging Face adapter). Each step is one network call and one
fused op from :mod:`fastdiff.ops` on the fastest available backend (``backend=`` picks one;
``backend="reference"`` is the PyTorch reference exactly). Runs are deterministic for a seed.

The strategies (:data:`STRATEGIES`) and the options each reads are listed in :func:`sample`'s
docstring, which is generated from the strategy table (:data:`fastdiff.sampling.strategies.TABLE`: each
strategy's family, paper, options, rules and step function) and from the documentation of every field of
:class:`Options`. A strategy rejects a non-default option it would ignore (``eta`` for "ancestral",
``temperature`` for "ddim"), naming it.

Blocks: ``block_size=b`` decodes positions ``[0, b)``, ``[b, 2b)``, ... left to right (counted from position
0, prompt positions included, which stay fixed), ``steps`` per block (a budget of rounds for "confidence" /
"threshold"); ``block_context`` says what the model sees meanwhile: ``"full"`` (default) the whole
sequence with later blocks still noised, as LLaDA and a bidirectionally trained model expect, or
``"prefix"`` the sequence up to the block's end; ``kv_cache=True`` keeps a block-causal model's keys and
values of finished blocks. For LLaDA's own convention (blocks from the end of the prompt, ``steps`` in
total, its ``cfg_scale``), use :func:`fastdiff.generate`.

What is checked: every option before anything runs (an :class:`~fastdiff.errors.InputError` /
:class:`~fastdiff.errors.InputTypeError` naming it, the same on every backend); the memory the run will
allocate (network outputs, the model's activations when it reports ``forward_memory(batch_size,
length)``, trajectories) against what the device has free, and the length against a model's positional
capacity (``max_length`` / Hugging Face ``max_position_embeddings``), before allocating; every model
output (shape, floating dtype, device, and NaN / +inf: ``"model output at step 12 (t=640): contains
NaN"``). Nothing passed in is modified: not ``x_init`` / ``fixed`` / ``cond`` / ``embedding``, and not
the model's output (a model may return a tensor it keeps). A model in training mode is put in eval mode
for the run (dropout would make samples random) and every submodule's mode is restored afterwards.

Randomness and batch size: every draw is keyed by the seed and the sample's global index
(``sample_offset`` = the index of the batch's first sample), so a batch of ``B`` samples at
``sample_offset=k`` draws exactly what rows ``k .. k+B-1`` of one run over all of them draw, whatever
the batching or the number of ranks (see :mod:`fastdiff.distributed`). The samples are then identical
across batch sizes exactly when the network returns bit-identical outputs for a sequence whatever batch
it sits in. Many networks do not (a GEMM's blocking, and so its rounding, depends on the batch shape:
the bundled model's logits differ by ~1e-5 between a batch of 4 and one row), and a draw whose uniform
falls that close to a CDF boundary (or a top-p set edge) flips, after which the sample diverges.
``micro_batch=m`` removes that dependence: every network call has exactly ``m`` rows per half (the
sample with global index ``g`` in row ``g mod m``, unused rows padded with a copy of a real row), so
with the same ``m`` (and seed, device, backend, thread count and library versions) the samples are
bit-identical for every batch size and rank split. It costs the padded rows (nothing when ``B`` is a
multiple of ``m`` and ``sample_offset`` too) and, for ``m`` smaller than ``B``, more, smaller calls;
``kv_cache`` does not combine with it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from . import _graph, strategies
from ..errors import InputError
from ..ops import _dispatch
from ._adapters import CUDAGraphed, Denoiser, HFMaskedLM, as_denoiser, unwrap_output
from ._engine import SampleStep, _Run, num_transfer, step_grid
from ._graph import StepGraphs
from ._options import Options, Process, SampleOutput, check_shape, check_static, options_doc, resolve_strategy, \
    strategies_doc
from .strategies import Strategy

#: the strategy names, in table order
STRATEGIES = tuple(strategies.TABLE)
DISCRETE_STRATEGIES = strategies.family("discrete")
CONTINUOUS_STRATEGIES = strategies.family("continuous")

__all__ = [
    "sample",
    "Sampler",
    "SampleOutput",
    "SampleStep",
    "Denoiser",
    "HFMaskedLM",
    "CUDAGraphed",
    "BlockCausalDenoiser",
    "as_denoiser",
    "unwrap_output",
    "step_grid",
    "num_transfer",
    "STRATEGIES",
    "DISCRETE_STRATEGIES",
    "CONTINUOUS_STRATEGIES",
    "Options",
    "Strategy",
    "strategies",
]


class BlockCausalDenoiser(Protocol):
    """What ``kv_cache=True`` needs: a model whose attention is block-causal (a block sees earlier
    blocks and itself), so the keys/values of finished blocks never change and can be cached exactly.

    * ``new_cache(batch_size) -> cache``
    * ``__call__(x_block, t, *, cache, start, **cond) -> (B, block, V)``: logits of the block at
      positions ``start:start + block`` given the cached earlier blocks;
    * ``extend_cache(cache, x_block, start) -> cache``: append the finished (clean) block.

    It must equal the same model run on ``x[:, :start + block]`` without a cache (the uncached path).
    """

    def new_cache(self, batch_size: int) -> object: ...

    def extend_cache(self, cache: object, x_block: torch.Tensor, start: int) -> object: ...


class Sampler:
    """(generated below: ``Sampler(process, *, steps, strategy="ancestral", **options)``)"""

    def __init__(self, process: Process, *, steps: int, strategy: str = "ancestral", **options: Any) -> None:
        self.process = process
        self.strategy = strategy
        self.options = Options.from_kwargs(options)
        self.steps = check_static(process, strategy, steps, self.options)
        self.spec = resolve_strategy(process, strategy)
        self._graphs: dict[tuple, tuple[object, StepGraphs]] = {}  # cuda_graph=True: captured steps per model

    def sample(self, model: Callable[..., Any], *, shape: tuple[int, int], seed: int = 0, **overrides: Any
               ) -> SampleOutput:
        o = self.options.replace(**overrides) if overrides else self.options
        if overrides:
            check_static(self.process, self.strategy, self.steps, o)
        B, L = check_shape(shape)
        den = as_denoiser(model)
        run = _Run(den, self.process, self.spec, self.steps, (B, L), seed, o)
        if o.cuda_graph:  # whole steps as graphs where they apply, else the network's forward alone
            graphs = self._step_graphs(model, den, run, o)
            run.use_graphs(graphs, CUDAGraphed(den) if graphs is None else None)
        t0 = time.perf_counter()
        with torch.no_grad(), _eval_mode(den.fn):
            tokens, x = self.spec.loop(run)
        return SampleOutput(tokens=tokens, stats=run.finish_stats(t0, tokens), x=x, trajectory=run.trajectory)

    def _step_graphs(self, model: object, den: Denoiser, run: _Run, o: Options) -> StepGraphs | None:
        """The captured steps for ``model`` (kept by this sampler across calls, per model, temperature,
        device and the addresses of the model's parameters and buffers), or None when whole steps cannot be
        captured (:func:`._graph.unsupported`, or the posterior op does not resolve to the CUDA kernel on
        this device)."""
        if _graph.unsupported(self.spec, o, self.process) is not None or run.device.type != "cuda":
            return None
        try:
            _, name = _dispatch.resolve("posterior_sample", "posterior", o.backend, run.device)
        except (InputError, ImportError, RuntimeError):
            return None
        if name != "cuda" or not hasattr(torch.ops.fastdiff_cuda, "posterior_counters"):
            return None
        fn = den.fn
        # the graphs read the parameters where they were at capture: a model moved or cast since is recaptured
        storage = tuple(q.data_ptr() for q in (*fn.parameters(), *fn.buffers())) \
            if isinstance(fn, torch.nn.Module) else ()
        key = (id(model), float(o.temperature), str(run.device), storage)
        hit = self._graphs.get(key)
        if hit is None or hit[0] is not model:
            hit = self._graphs[key] = (model, _graph.StepGraphs(den, self.process, o.temperature, run.device))
        return hit[1]

    def iterate(self, model: Callable[..., Any], *, shape: tuple[int, int], seed: int = 0, **overrides: Any
                ) -> Iterator[SampleStep]:
        """:meth:`sample` as an iterator of :class:`SampleStep` (one per step; ``tokens`` cloned, so a kept
        step stays as it was), for rendering tokens as they are revealed. The run happens in a worker
        thread that waits for the consumer after each step; its :class:`SampleOutput` is the iterator's
        return value (``StopIteration.value``, or ``out = yield from sampler.iterate(...)``). Leaving the
        loop early stops the run at the next step."""
        if "callback" in overrides and overrides["callback"] is not None:
            raise InputError("callback: iterate() yields the steps itself; use sample(callback=...) for a callback")
        o = self.options.replace(**overrides) if overrides else self.options
        check_static(self.process, self.strategy, self.steps, o)  # bad options raise here, not in the thread
        return _iterate(self, model, shape, seed, overrides)

    def __repr__(self) -> str:
        return f"Sampler({self.process!r}, strategy={self.strategy!r}, steps={self.steps})"


class _Stop(Exception):
    """Raised inside the worker's callback when the consumer left the loop."""


def _iterate(sampler: Sampler, model: Callable[..., Any], shape: tuple[int, int], seed: int, overrides: dict
             ) -> Iterator[SampleStep]:
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=1)
    go = threading.Event()
    stop = threading.Event()

    def callback(step: SampleStep) -> None:
        if stop.is_set():
            raise _Stop
        q.put(("step", SampleStep(step.step, None if step.tokens is None else step.tokens.clone(),
                                  step.network_calls)))
        go.wait()
        go.clear()
        if stop.is_set():
            raise _Stop

    def work() -> None:
        try:
            q.put(("done", sampler.sample(model, shape=shape, seed=seed, **{**overrides, "callback": callback})))
        except _Stop:
            q.put(("stopped", None))
        except BaseException as e:  # re-raised in the consumer's thread
            q.put(("error", e))

    threads = torch.get_num_threads()
    worker = threading.Thread(target=lambda: (torch.set_num_threads(threads), work()), daemon=True,
                              name="fastdiff-sampler-iterate")
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "step":
                yield value
                go.set()
            elif kind == "done":
                return value
            elif kind == "error":
                raise value
            else:
                return None
    finally:
        if worker.is_alive():
            stop.set()
            go.set()
            worker.join()


@contextlib.contextmanager
def _eval_mode(fn: object) -> Iterator[None]:
    """``fn`` (an ``nn.Module``) in eval mode inside, each submodule's own mode restored after."""
    if not isinstance(fn, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in fn.modules()]
    if not any(training for _, training in modes):
        yield
        return
    fn.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def sample(model: Callable[..., Any], process: Process, *, shape: tuple[int, int], steps: int,
           strategy: str = "ancestral", seed: int = 0, **options: Any) -> SampleOutput:
    """(generated below from the strategy table and :data:`._options.OPTION_DOCS`)"""
    return Sampler(process, steps=steps, strategy=strategy, **options).sample(model, shape=shape, seed=seed)


_SAMPLE_HEAD = """Generate ``shape = (B, L)`` token sequences from ``model`` under ``process``.

Each step is one network call and one fused op from :mod:`fastdiff.ops`; see the module docstring of
:mod:`fastdiff.sampling` for what is checked before the run and how randomness is keyed.

Parameters
----------
model : callable
    ``model(x_t, t, **cond) -> output`` (or a :class:`Denoiser` / Hugging Face model, see
    :func:`as_denoiser`): x0 logits ``(B, L, V)`` for a discrete process, the parameterised tensor
    ``(B, L, D)`` for a continuous one.
process : a :mod:`fastdiff.discrete` process or a :class:`~fastdiff.continuous.GaussianDiffusion`
shape : (int, int)
    ``(B, L)``.
steps : int
    Network calls per block: transitions of the step grid from T to 0 (``steps <= T``), or the budget of
    decoding rounds of "confidence" / "threshold".
strategy : str, default "ancestral"
    One of the strategies below.
seed : int, default 0
    Every draw is keyed by the seed and the sample's global index.
**options
    The options below. One that the strategy does not read must stay at its default.

Strategies
----------
{strategies}

Options
-------
{options}

Returns
-------
SampleOutput
    ``tokens (B, L)`` int64, ``stats`` (``network_calls``, ``steps``, ``tokens_per_s``, ...), ``x`` (the
    final vectors, continuous processes) and ``trajectory``.

Raises
------
InputError, InputTypeError
    A bad option, input or model output, naming it (before anything runs, for the options).
"""

if sample.__doc__ is not None:  # python -OO strips docstrings
    sample.__doc__ = _SAMPLE_HEAD.format(strategies=strategies_doc(), options=options_doc())
    Sampler.__doc__ = f"""Holds a process, a strategy, ``steps`` and options for repeated :meth:`sample` calls.

``Sampler(process, *, steps, strategy="ancestral", **options).sample(model, *, shape, seed=0, **overrides)``
equals :func:`sample` with the options updated by ``overrides`` (checked the same way).

Options
-------
{options_doc()}
"""
