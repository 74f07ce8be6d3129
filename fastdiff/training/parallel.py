"""Scale-out of a training step under ``torchrun`` (see :mod:`fastdiff.distributed`).

An update sees the global batch ``batch_size × world_size × grad_accum``; rank ``r`` takes rows ``r, r + W,
...`` of it in ``grad_accum`` micro-batches. The model runs under ``DistributedDataParallel`` (a full
replica per rank, gradients averaged during backward) or FSDP2 ``fully_shard`` (the transformer blocks
sharded); gradients are synchronised on the last micro-batch only, then clipped by their global norm.
Per-row values are gathered back into global-batch order, so what the timestep sampler and the adaptive
schedule see does not depend on the split. In a world of one process every method is the plain
single-process operation.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .. import distributed as _dist
from ..errors import InputError, InputTypeError

__all__ = ["Parallel", "check_device", "full_tensor"]


def check_device(name: object, what: str = "device") -> torch.device:
    """``name`` ("auto", "cpu", "cuda", "cuda:N", ...) as a device that exists here; InputError naming
    ``what`` otherwise (an unknown device string, CUDA where there is none, a CUDA index too large)."""
    if not isinstance(name, (str, torch.device)):
        raise InputTypeError(f"{what}: expected a device name, got {type(name).__name__}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what}: {str(name)!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what}: {str(name)!r}, but CUDA is not available here (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{what}: {str(name)!r}, but there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) gathered to a plain tensor; anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Parallel:
    """This process's part in a run: ``rank`` of ``world`` under the context ``ctx``, on ``device``
    (``device`` names one; a bare "cuda" under torchrun becomes ``cuda:LOCAL_RANK``), with ``mode``
    "ddp" or "fsdp" when distributed."""

    def __init__(self, ctx: _dist.Context, device: str, mode: str) -> None:
        self.ctx, self.mode = ctx, mode
        self.rank, self.world = ctx.rank, ctx.world_size
        dev = check_device(device)
        if dev.type == "cuda" and dev.index is None and ctx.distributed:
            dev = torch.device("cuda", ctx.local_rank % max(1, torch.cuda.device_count()))
        if ctx.backend == "nccl" and dev.type != "cuda":
            raise InputError(f"device: the process group uses NCCL but the device is {dev}")
        self.device = dev
        self._sharded: list[nn.Module] = []

    @property
    def distributed(self) -> bool:
        return self.ctx.distributed

    @property
    def fsdp(self) -> bool:
        return self.distributed and self.mode == "fsdp"

    def rows(self, global_batch: int) -> torch.Tensor:
        """This rank's rows of the global batch: ``rank, rank + world, ...``."""
        return torch.arange(self.rank, global_batch, self.world, device=self.device)

    # --- the model -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward runs through: ``DistributedDataParallel`` (one full replica
        per rank; gradients all-reduced, averaged, during backward) or FSDP2 ``fully_shard`` (each
        transformer block sharded; the model itself is returned), or the model itself in a world of one."""
        if not self.distributed:
            return model
        if self.mode == "fsdp":
            # The transformer blocks (where the parameters of a large model are) are sharded; the rest
            # (embeddings, heads) stays replicated with gradients all-reduced after backward, because the
            # trainer also uses the embeddings outside the model's forward (continuous x0 = E[w],
            # L_round), which a sharded root would not see.
            from torch.distributed.fsdp import fully_shard

            for name in ("blocks", "encoder_blocks", "encoder"):
                sub = getattr(model, name, None)
                if isinstance(sub, nn.ModuleList):
                    for block in sub:
                        fully_shard(block)
                        self._sharded.append(block)
            if not self._sharded:
                raise InputError(f"parallel: fsdp shards a model's transformer blocks (.blocks), and "
                                 f"{type(model).__name__} has none; use parallel='ddp'")
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A model may hold parameters a task never uses (the condition-segment embedding outside
        # text-to-text, the label table without labels): DDP must not wait for their gradients.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def sync(self, net: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Gradient synchronisation only on the ``last`` micro-batch of an update."""
        if self.fsdp:
            for block in self._sharded:
                block.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if not self.distributed or last:
            return contextlib.nullcontext()
        return net.no_sync()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the gradients by their global norm (``max_norm=0``: no clipping); returns the norm.

        FSDP: the replicated parameters' gradients are first averaged over ranks (the sharded blocks'
        were reduce-scattered in backward), then clipped as ``clip_grad_norm_`` does."""
        max_norm = max_norm if max_norm > 0 else math.inf
        if not self.fsdp:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        plain = [p.grad for p in params if not hasattr(p.grad, "full_tensor")]
        if plain:
            flat = torch.cat([g.reshape(-1) for g in plain])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in plain:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            n = torch.linalg.vector_norm(p.grad, 2)
            sq += full_tensor(n).double() ** 2
        total = sq.sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.device))
        return total

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's unsharded ``state_dict`` (collective under FSDP)."""
        if not self.fsdp:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # --- values across ranks ---------------------------------------------------------------------
    def all_finite(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is finite on every rank (one collective), so all ranks raise together."""
        ok = torch.isfinite(x.detach()).all().to(torch.float32).reshape(1)
        if self.distributed:
            ok = ok.to(self.device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def global_rows(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's per-row values (in its row order ``r, r+W, ...``) gathered into global-batch order."""
        if not self.distributed:
            return local
        local = local.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(parts, local)
        return torch.stack(parts, 1).reshape(-1).cpu()  # row i*W + r comes from rank r

    def global_mean(self, terms: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the ranks."""
        if not self.distributed:
            return terms
        keys = sorted(terms)
        v = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(v)
        v = (v / self.world).tolist()
        return dict(zip(keys, v))
