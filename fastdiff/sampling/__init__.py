"""Batched multi-step sampling: fastdiff as the sampling backend of somebody else's denoiser.

``sample(model, process, shape=(B, L), steps=K, strategy=..., seed=0, **options) -> SampleOutput``

The model is any callable ``model(x_t, t, **cond)`` (see :mod:`fastdiff.sampling._adapters` for the
protocol, :func:`as_denoiser` and the Hugging Face adapter). Each step is one network call and one
fused op from :mod:`fastdiff.ops` on the fastest available backend (``backend=`` picks one;
``backend="reference"`` is the PyTorch reference exactly). Runs are deterministic for a seed.

Discrete strategies (``process`` from :mod:`fastdiff.discrete`):

* ``"ancestral"``: D3PM ancestral sampling, ``x_s ~ p(x_s | x_t)`` over an evenly spaced grid of
  ``steps`` transitions from T to 0 (skip posterior). ``cache=True`` (absorbing, models that ignore
  ``t``) skips the network for every sequence whose input did not change, as MDLM does.
* ``"confidence"``: LLaDA low-confidence remasking (Nie et al. 2025): predict all masked tokens, keep
  the ``k`` most confident (``tokens_per_step=k``, or LLaDA's even split of the masked count over
  ``steps``); ``remasking="random"`` picks them at random.
* ``"threshold"``: Fast-dLLM parallel decoding (Wu et al. 2025): keep every prediction whose
  probability exceeds ``threshold`` (at least one per step, and enough to finish within ``steps``).
* ``"remask"``: ReMDM (Wang et al. 2025): the ancestral step plus remasking of decoded tokens with
  probability ``σ_t`` (``eta``, ``remask_schedule="rescale"|"cap"``, ``remask_window=(lo, hi)``).

Continuous strategies (``process`` a :class:`~fastdiff.continuous.GaussianDiffusion`; needs
``embedding=(V, D)``): ``"ddpm"`` and ``"ddim"`` (``eta``), ``clamp="never"|"every"|"last"`` (the
clamping trick through :func:`fastdiff.ops.nearest_embedding`), ``self_condition=True`` (the model
receives its previous x0 estimate as ``x_self_cond=``), ``classifier_grad=fn(x_t, t) -> ∇ log p(y|x_t)``
with ``classifier_scale``; the result is rounded to the nearest embedding's token.

Common options: ``temperature``, ``top_k``, ``top_p`` (discrete strategies; a continuous strategy
rejects them, as every strategy rejects a non-default option it would ignore, e.g. ``eta`` for
"ancestral"), ``cond`` / ``uncond`` (keyword tensors for the model, batch first, on the batch's device)
and ``guidance_scale`` (classifier-free guidance ``uncond + s·(cond - uncond)``, both passes in one
batch; with fixed prompt positions and no ``uncond``, the unconditional pass masks the prompt),
``fixed`` + ``x_init`` (positions that hold given tokens and are never noised: prompts, infilling),
``lengths`` + ``pad_id`` (variable lengths; the model gets ``attention_mask`` if it accepts one, so an
``attention_mask`` in ``cond`` together with ``lengths`` is an error), ``block_size``
(semi-autoregressive blocks, ``steps`` per block, earlier blocks as clean context; ``kv_cache=True`` for
block-causal models, see :class:`BlockCausalDenoiser`), ``eos_id`` (a sequence stops at its first EOS:
later positions become ``pad_id``, and with discrete blocks it is not evaluated any more; continuous
strategies cut the rounded tokens the same way), ``cuda_graph`` (replay the network's forward as a CUDA
graph per input shape; CUDA only), ``progress`` (a tqdm bar on stderr, shown only when stderr is a
terminal), ``trajectory`` (keep the tokens after every step), ``backend``, ``device``,
``sample_offset`` and ``micro_batch`` (below).

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
from typing import Protocol

import torch

from ._adapters import CUDAGraphed, Denoiser, HFMaskedLM, as_denoiser, unwrap_output
from ._continuous import run_continuous
from ._discrete import run_discrete
from ._engine import _Run, num_transfer
from ._options import CONTINUOUS_STRATEGIES, DISCRETE_STRATEGIES, STRATEGIES, Options, SampleOutput, \
    check_shape, check_static, step_grid

__all__ = [
    "sample",
    "Sampler",
    "SampleOutput",
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
    """Holds a process, a strategy, ``steps`` and options for repeated :meth:`sample` calls."""

    def __init__(self, process, *, steps: int, strategy: str = "ancestral", **options):
        self.process = process
        self.strategy = strategy
        self.options = Options.from_kwargs(options)
        self.steps = check_static(process, strategy, steps, self.options)

    def sample(self, model, *, shape: tuple[int, int], seed: int = 0, **overrides) -> SampleOutput:
        o = self.options.replace(**overrides) if overrides else self.options
        if overrides:
            check_static(self.process, self.strategy, self.steps, o)
        B, L = check_shape(shape)
        den = as_denoiser(model)
        if o.cuda_graph:
            den = CUDAGraphed(den)
        run = _Run(den, self.process, self.strategy, self.steps, (B, L), seed, o)
        t0 = time.perf_counter()
        with torch.no_grad(), _eval_mode(den.fn):
            if run.continuous:
                tokens, x = run_continuous(run)
            else:
                tokens, x = run_discrete(run), None
        return SampleOutput(tokens=tokens, stats=run.finish_stats(t0, tokens), x=x, trajectory=run.trajectory)

    def __repr__(self) -> str:
        return f"Sampler({self.process!r}, strategy={self.strategy!r}, steps={self.steps})"


@contextlib.contextmanager
def _eval_mode(fn: object):
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


def sample(model, process, *, shape: tuple[int, int], steps: int, strategy: str = "ancestral",
           seed: int = 0, **options) -> SampleOutput:
    """Generate ``shape = (B, L)`` token sequences from ``model`` under ``process`` (see the module doc)."""
    return Sampler(process, steps=steps, strategy=strategy, **options).sample(model, shape=shape, seed=seed)
