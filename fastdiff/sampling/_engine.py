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
"""

from __future__ import annotations

from ..errors import InputError, InputTypeError

import time

import torch

from .. import _checks
from .. import random as _random
from ._adapters import Denoiser
from ._options import Options, is_continuous


class _Run:
    def __init__(self, model: Denoiser, process, strategy: str, steps: int, shape: tuple[int, int],
                 seed: int, o: Options):
        self.model, self.process, self.strategy, self.steps, self.o = model, process, strategy, steps, o
        self.B, self.L = shape
        self.seed = _random._check_seed(seed)
        self.sample_offset = _checks.positive_int("sample_offset", o.sample_offset, 0)
        self.continuous = is_continuous(process)
        self.device = torch.device(o.device) if o.device is not None else self._guess_device()
        self.draws = 0  # op-call counter: the Philox offset of the next draw
        self.stats = {"network_calls": 0, "sequences_evaluated": 0, "steps": 0, "model_time_s": 0.0}
        self.trajectory: list[torch.Tensor] | None = [] if o.trajectory else None
        self._check_batch_options()
        self._kv = None

    # ------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------
    def _guess_device(self) -> torch.device:
        o = self.o
        for t in (o.x_init, o.fixed, o.embedding, o.lengths):
            if isinstance(t, torch.Tensor):
                return t.device
        params = getattr(self.model.fn, "parameters", None)
        if callable(params):
            try:
                return next(params()).device
            except (StopIteration, TypeError):
                pass
        return torch.device("cpu")

    def _check_batch_options(self) -> None:
        o, B, L = self.o, self.B, self.L
        V = self.vocab_size
        self.fixed = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        self.values = torch.zeros(B, L, dtype=torch.int64, device=self.device)  # tokens held where frozen
        if o.fixed is not None or o.x_init is not None:
            if o.fixed is None or o.x_init is None:
                raise InputError("fixed: 'fixed' and 'x_init' go together (the mask and the tokens it holds)")
            fixed = _checks.tensor("fixed", o.fixed)
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
            self.fixed |= fixed
            self.values = torch.where(fixed, x_init, self.values)
        self.prompt = self.fixed.clone()  # user-fixed positions (prompts, infilling context)
        self.attention_mask = None
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
            self.attention_mask = real
            self.fixed |= ~real
            self.values = torch.where(real, self.values, torch.full_like(self.values, pad))
        if o.guidance_scale != 1.0:
            if o.cond is None and not bool(self.prompt.any()):
                raise InputError("guidance_scale: classifier-free guidance needs a condition: cond/uncond "
                                 "keyword tensors, or fixed prompt positions (masked out for the unconditional pass)")
            if o.cond is not None and o.uncond is None:
                raise InputError("uncond: classifier-free guidance with cond= needs uncond= (the same keywords "
                                 "holding the null condition) so both passes run in one batch")
            if o.cond is None and (self.continuous or self.process.kind != "absorbing") and o.uncond is None:
                raise InputError("uncond: without cond/uncond, the unconditional pass masks the prompt, which "
                                 "needs an absorbing process")
        for name in ("cond", "uncond"):
            d = getattr(o, name)
            for k, v in (d or {}).items():
                if isinstance(v, torch.Tensor) and (v.ndim == 0 or v.shape[0] != B):
                    raise InputError(f"{name}: tensor {k!r} must have the batch size {B} as its first dimension, "
                                     f"got {tuple(v.shape)}")
        if o.cond is not None and o.uncond is not None and set(o.cond) != set(o.uncond):
            raise InputError(f"uncond: keys {sorted(o.uncond)} differ from cond's {sorted(o.cond)}")
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

    def _call(self, x_in: torch.Tensor, t: int, kw: dict) -> torch.Tensor:
        tt = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x_in.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.model(x_in, tt, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stats["model_time_s"] += time.perf_counter() - t0
        self.stats["network_calls"] += 1
        self.stats["sequences_evaluated"] += x_in.shape[0]
        return out

    def evaluate(self, x_ctx: torch.Tensor, t: int, rows: torch.Tensor | None = None, *,
                 extra: dict | None = None, ctx_fixed: torch.Tensor | None = None) -> torch.Tensor:
        """The network's output on ``x_ctx`` (rows ``rows`` of the batch, all when None), with
        classifier-free guidance combined: ``uncond + s·(cond - uncond)``."""
        o = self.o
        kw = self._kw(o.cond, rows)
        if extra:
            kw.update(extra)
        Lc = x_ctx.shape[1]
        if self.attention_mask is not None and self.model.accepts_attention_mask:
            am = self.attention_mask[:, :Lc]
            kw["attention_mask"] = am if rows is None else am.index_select(0, rows)
        out_shape_check = (x_ctx.shape[0], Lc)
        if o.guidance_scale == 1.0:
            out = self._call(x_ctx, t, kw)
            self._check_output(out, out_shape_check)
            return out
        if o.uncond is not None:
            ukw = self._kw(o.uncond, rows)
            ukw.update({k: v for k, v in kw.items() if k not in o.uncond})  # extra / attention_mask
            x_u = x_ctx
        else:  # the prompt masked out: LLaDA's unconditional pass
            ukw = dict(kw)
            prompt = self.prompt[:, :Lc] if ctx_fixed is None else ctx_fixed
            if rows is not None:
                prompt = prompt.index_select(0, rows)
            x_u = torch.where(prompt, torch.full_like(x_ctx, self.process.mask_id), x_ctx)
        both = {}
        for k in set(kw) | set(ukw):
            a, b = kw.get(k), ukw.get(k)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                both[k] = torch.cat([a, b])
            elif a is b or (a is not None and b is not None and a == b):
                both[k] = a
            else:
                raise InputError(f"uncond: keyword {k!r} must be a tensor in both cond and uncond (or equal in both)")
        out = self._call(torch.cat([x_ctx, x_u]), t, both)
        self._check_output(out, (2 * x_ctx.shape[0], Lc))
        cond_out, uncond_out = out.chunk(2)
        # A logit at -inf in both halves (e.g. the mask column of an MDLM/SUBS model) stays -inf;
        # lerp would give -inf + s·NaN there. Any other NaN still reaches the ops' check.
        both_masked = torch.isneginf(cond_out)
        both_masked &= torch.isneginf(uncond_out)
        guided = uncond_out.lerp_(cond_out, float(o.guidance_scale))
        return guided.masked_fill_(both_masked, float("-inf"))

    def _check_output(self, out: torch.Tensor, bl: tuple[int, int]) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise InputTypeError(f"model: expected a floating tensor output, got {type(out).__name__}")
        if self.continuous:
            want = bl + (self.o.embedding.shape[1],)
        else:
            want = bl + (self.vocab_size,)
        if tuple(out.shape) != want:
            raise InputError(f"model: output shape {tuple(out.shape)} differs from the expected {want}")

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
        k = self.draws
        self.draws += 1
        return k

    def after_step(self, x: torch.Tensor, bar) -> None:
        self.stats["steps"] += 1
        if self.trajectory is not None:
            self.trajectory.append(x.detach().clone())
        if bar is not None:
            bar.update(1)

    def progress(self, total: int | None):
        if not self.o.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"fastdiff {self.strategy}", unit="step", leave=False)

    def finish_stats(self, t_start: float, tokens: torch.Tensor) -> dict:
        dt = max(time.perf_counter() - t_start, 1e-12)
        generated = int((~self.fixed).sum())
        st = dict(self.stats)
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
            st["stopped_at_eos"] = int(getattr(self, "_stopped", torch.zeros(1)).sum())
        return st


def num_transfer(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: ``n`` masked tokens spread over ``steps`` steps as evenly as possible, the
    remainder going to the first steps: ``(B, steps)`` int64."""
    base = n_masked // steps
    rem = n_masked % steps
    k = torch.arange(steps, device=n_masked.device)
    return base[:, None] + (k[None, :] < rem[:, None]).to(torch.int64)


