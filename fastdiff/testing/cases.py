"""The op cases: which ops are timed, on which variants and inputs. One definition for the pytest-benchmark
suite (``benchmarks/benchmark_<op>.py`` parametrise over :data:`OP_CASES`), ``fastdiff bench`` and
``fastdiff demo`` (both time :data:`CLI_OP_CASES` at :data:`CLI_SIZES`).

A case names an op of :mod:`fastdiff.ops`, a variant (its keyword arguments, or the process of a posterior
op) and the inputs it reads: ``"embed"`` (``x: (N, D)``, ``weight: (V, D)``, ``target: (N,)``) or
``"logits"`` (``(N, V)`` fp32, and for the posterior ops a process with ``x_t: (N,)``). The posterior ops
step ``t = T_STEP -> s = S_STEP`` of a ``T = 1000`` process (absorbing, ``mask_id = V - 1``,
``mutual_info`` schedule, ``x_t`` all mask: the worst case; uniform, ``cosine`` schedule, ``x_t`` uniform).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import discrete, ops, schedules
from .._protocols import DiscreteProcess

__all__ = ["CLI_OP_CASES", "CLI_SIZES", "OP_CASES", "S_STEP", "T_STEP", "OpCase", "OpInputs", "Size", "embed_inputs",
           "logits_input", "op_call", "op_cases", "op_inputs", "posterior_inputs", "targets_input"]

T_STEP, S_STEP = 500, 400  # the posterior step t -> s (absorbing: alpha_bar_t = 0.5, alpha_bar_s = 0.6)
EMBED_OPS = ("nearest_embedding", "rounding_loss")


@dataclass(frozen=True)
class Size:
    """Rows ``N``, vocabulary ``V`` and (for the embedding ops) width ``D``."""

    N: int
    V: int
    D: int | None = None

    @property
    def label(self) -> str:
        """``N=.. D=.. V=.. fp32`` (the benchmark suite's group names)."""
        d = "" if self.D is None else f" D={self.D}"
        return f"N={self.N}{d} V={self.V} fp32"

    @property
    def shape(self) -> str:
        """``NxD V=V`` or ``NxV`` (the CLI tables' row names)."""
        return f"{self.N}x{self.V}" if self.D is None else f"{self.N}x{self.D} V={self.V}"


@dataclass(frozen=True)
class OpCase:
    """One timed case: ``op`` (a public op of :mod:`fastdiff.ops`) on ``variant``.

    ``kwargs``: the op's keyword arguments for this variant; ``process``: ``"absorbing"`` or ``"uniform"``
    for the posterior ops; ``cli``: whether ``fastdiff bench`` / ``fastdiff demo`` time it (the benchmark
    suite times every case).
    """

    op: str
    variant: str
    kwargs: Mapping[str, object] = field(default_factory=dict)
    process: str | None = None
    cli: bool = True

    @property
    def inputs(self) -> str:
        """``"embed"`` or ``"logits"``: which inputs (and which :class:`Size`) the case reads."""
        return "embed" if self.op in EMBED_OPS else "logits"

    @property
    def unit(self) -> str:
        """The rate's unit: ``GFLOP/s`` for the embedding ops (2·N·D·V a matmul), ``GB/s`` of logits read."""
        return "GFLOP/s" if self.inputs == "embed" else "GB/s"

    def work(self, size: Size) -> float:
        """What one call does, in GFLOP (embedding ops; forward + backward = 3 matmuls) or GB of logits read."""
        if self.inputs == "embed":
            return (3 if self.op == "rounding_loss" else 1) * 2 * size.N * (size.D or 0) * size.V / 1e9
        return size.N * size.V * 4 / 1e9

    def label(self, size: Size) -> str:
        """The CLI row name, e.g. ``posterior_sample absorbing 256x4096`` (a ``plain`` variant is not named)."""
        variant = "" if self.variant == "plain" else f" {self.variant}"
        return f"{self.op}{variant} {size.shape}"


OP_CASES: tuple[OpCase, ...] = (
    OpCase("nearest_embedding", "l2", {"metric": "l2"}),
    OpCase("nearest_embedding", "cosine", {"metric": "cosine"}),
    OpCase("rounding_loss", "fwd+bwd"),
    # the unfused half of posterior_sample, and a second filter: the suite times them, the CLI tables do not
    OpCase("categorical_posterior", "absorbing", process="absorbing", cli=False),
    OpCase("categorical_posterior", "uniform", process="uniform", cli=False),
    OpCase("posterior_sample", "absorbing", process="absorbing"),
    OpCase("posterior_sample", "uniform", process="uniform"),
    OpCase("sample_categorical", "plain"),
    OpCase("sample_categorical", "top_k=50", {"top_k": 50}, cli=False),
    OpCase("sample_categorical", "top_p=0.9", {"top_p": 0.9}),
)
CLI_OP_CASES: tuple[OpCase, ...] = tuple(c for c in OP_CASES if c.cli)
#: (embed size, logits size) of the CLI tables: ``True`` is ``--quick``
CLI_SIZES: dict[bool, tuple[Size, Size]] = {False: (Size(1024, 8192, 128), Size(1024, 8192)),
                                            True: (Size(256, 4096, 64), Size(256, 4096))}


def op_cases(op: str | None = None, *, cli: bool = False) -> tuple[OpCase, ...]:
    """The cases of ``op`` (all ops when None); ``cli=True``: only those the CLI tables time."""
    return tuple(c for c in OP_CASES if (op is None or c.op == op) and (c.cli or not cli))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % 2**64)


def embed_inputs(size: Size, *, seed: int = 0, device: str | torch.device = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: (N, D)`` and ``weight: (V, D)``, standard normal fp32."""
    g = _generator(seed)
    x = torch.randn(size.N, size.D, generator=g)
    w = torch.randn(size.V, size.D, generator=g)
    return x.to(device), w.to(device)


def targets_input(size: Size, *, seed: int = 3, device: str | torch.device = "cpu") -> torch.Tensor:
    """``target: (N,)`` int64 uniform in ``[0, V)`` (``rounding_loss``)."""
    return torch.randint(0, size.V, (size.N,), generator=_generator(seed)).to(device)


def logits_input(size: Size, *, seed: int = 1, device: str | torch.device = "cpu") -> torch.Tensor:
    """``(N, V)`` fp32 logits, standard normal times 2."""
    return (2.0 * torch.randn(size.N, size.V, generator=_generator(seed))).to(device)


def posterior_inputs(size: Size, *, seed: int = 2, device: str | torch.device = "cpu"
                     ) -> dict[str, tuple[DiscreteProcess, torch.Tensor]]:
    """Process and ``x_t: (N,)`` int64 per kind: ``absorbing`` (x_t all mask) and ``uniform`` (x_t uniform)."""
    V = size.V
    absorbing = discrete.Absorbing(V, V - 1, schedules.mutual_info(1000))
    uniform = discrete.Uniform(V, schedules.cosine(1000))
    return {
        "absorbing": (absorbing, torch.full((size.N,), V - 1, dtype=torch.int64, device=device)),
        "uniform": (uniform, torch.randint(0, V, (size.N,), generator=_generator(seed)).to(device)),
    }


@dataclass
class OpInputs:
    """Every input of the cases: the embedding ops' ``x``, ``weight``, ``target`` at ``embed_size``, the
    logits ops' ``logits`` and ``posterior`` (kind -> (process, x_t)) at ``logits_size``."""

    embed_size: Size
    logits_size: Size
    x: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    posterior: dict[str, tuple[DiscreteProcess, torch.Tensor]]

    def size(self, case: OpCase) -> Size:
        return self.embed_size if case.inputs == "embed" else self.logits_size


def op_inputs(embed_size: Size, logits_size: Size, *, seed: int = 0, device: str | torch.device = "cpu"
              ) -> OpInputs:
    """All inputs, each from its own generator (seeds ``seed`` .. ``seed + 3``; ``seed = 0`` gives the
    benchmark suite's tensors)."""
    x, w = embed_inputs(embed_size, seed=seed, device=device)
    return OpInputs(embed_size, logits_size, x, w, targets_input(embed_size, seed=seed + 3, device=device),
                    logits_input(logits_size, seed=seed + 1, device=device),
                    posterior_inputs(logits_size, seed=seed + 2, device=device))


def op_call(case: OpCase, inputs: OpInputs, *, backend: str = "auto", seed: int = 0) -> Callable[[], object]:
    """One call of the case's op on ``backend`` (``rounding_loss``: forward and backward); ``seed`` is the
    sampling ops' seed."""
    fn = getattr(ops, case.op)
    kw = dict(case.kwargs)
    if case.op == "nearest_embedding":
        return lambda: fn(inputs.x, inputs.weight, backend=backend, **kw)
    if case.op == "rounding_loss":
        def forward_backward() -> None:
            x = inputs.x.detach().requires_grad_(True)
            w = inputs.weight.detach().requires_grad_(True)
            fn(x, w, inputs.target, backend=backend, **kw).backward()

        return forward_backward
    if case.process is not None:
        process, x_t = inputs.posterior[case.process]
        if case.op == "posterior_sample":
            kw["seed"] = seed
        return lambda: fn(process, inputs.logits, x_t, T_STEP, S_STEP, backend=backend, **kw)
    return lambda: fn(inputs.logits, seed=seed, backend=backend, **kw)
