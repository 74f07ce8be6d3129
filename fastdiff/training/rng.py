"""The random streams of a training step.

Every random draw of step ``n`` — timesteps, noise, masks, label dropout, the self-conditioning coin, dropout
inside the model — comes from generators seeded by ``(seed, n, stream)`` (a SHA-256 of the three), never
from a generator's running state. So ``k`` steps + save + resume + ``N - k`` steps draw exactly what ``N``
steps in one go draw, and a run's randomness does not depend on how its global batch is split over
processes and micro-batches (each rank draws for the whole global batch and keeps its rows).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["StepRNG", "stream_seed"]


def stream_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` at ``step`` of a run seeded ``seed``."""
    digest = hashlib.sha256(f"fastdiff.train:{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class StepRNG:
    """The generators of a run with ``seed`` on ``device``.

    Streams: ``generators(step, "train" | "eval")`` give a CPU generator (timesteps, the coin) and one on
    the device (noise, masks, label dropout); :meth:`seed_global` seeds torch's global RNG, which dropout
    inside the model reads, for one named stream (one per rank and micro-batch). :meth:`fork` restores the
    global RNG state afterwards, so training leaves the caller's randomness alone.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device

    def generators(self, step: int, stream: str) -> tuple[torch.Generator, torch.Generator]:
        cpu = torch.Generator().manual_seed(stream_seed(self.seed, step, stream + ":t"))
        if self.device.type == "cpu":
            return cpu, torch.Generator().manual_seed(stream_seed(self.seed, step, stream + ":x"))
        return cpu, torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, step, stream + ":x"))

    def seed_global(self, step: int, stream: str) -> None:
        torch.manual_seed(stream_seed(self.seed, step, stream))

    def devices(self) -> list[int]:
        """CUDA devices whose global RNG a step reseeds (and restores afterwards)."""
        if self.device.type != "cuda":
            return []
        return [self.device.index if self.device.index is not None else torch.cuda.current_device()]

    def fork(self):
        """A context that restores torch's global RNG state (CPU and the step's CUDA device) on exit."""
        return torch.random.fork_rng(devices=self.devices())
