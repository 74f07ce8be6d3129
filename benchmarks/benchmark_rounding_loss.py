"""``rounding_loss`` (Diffusion-LM's ``L_round``) forward + backward at N×D vectors against V rows.

Providers: the op's own (see ``OP_PROVIDERS``) and ``plain``, ``F.cross_entropy(x @ W.T, target)`` with
autograd. Floor: the three matmuls of forward + backward (``x·Wᵀ``, ``G·W``, ``Gᵀ·x``); ``gflops``
counts ``3 · 2·N·D·V``. ``logits_buffer_mib`` is *analytic*, not measured: the N×V fp32 logits a
formulation materialises and keeps for the backward (0 for kernels, which compute the gradient in the
forward pass); the transient peak during the backward of an autograd formulation is higher.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import (
    DEVICE,
    EMBED,
    KERNELS,
    OP_PROVIDERS,
    best_time,
    op_callable,
    record,
    resolved_backend,
    run,
)
from fastdiff.ops import rounding_loss, rounding_loss_ref
from fastdiff.testing import op_cases

OP = "rounding_loss"
PROVIDERS = (*OP_PROVIDERS, "plain")
(CASE,) = op_cases(OP)  # the shared case: forward + backward
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def plain_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The formulation most training code writes: full logits, then cross-entropy."""
    return F.cross_entropy(x @ weight.T, target)


def forward_backward(loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and its gradients in ``x`` and ``weight`` (returned, not accumulated into ``.grad``)."""
    loss = loss_fn(x, weight, target)
    gx, gw = torch.autograd.grad(loss, (x, weight))
    return loss.detach(), gx, gw


@pytest.fixture(scope="module")
def inputs(embed_inputs) -> Inputs:
    """Leaf ``x``, ``W`` requiring grad, and random targets."""
    x, w = embed_inputs
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, EMBED.V, (EMBED.N,), generator=g).to(DEVICE)
    return x.clone().requires_grad_(), w.clone().requires_grad_(), target


@pytest.fixture(scope="module")
def expected_loss(inputs: Inputs) -> float:
    x, w, target = inputs
    with torch.no_grad():
        return plain_loss(x, w, target).item()


@pytest.fixture(scope="module")
def matmul_time(inputs: Inputs) -> float:
    """Best time of the forward and the two backward matmuls at this size."""
    x, w, _ = (t.detach() for t in inputs)
    grad = torch.randn(EMBED.N, EMBED.V, device=DEVICE)

    def matmuls() -> None:
        x @ w.T
        grad @ w
        grad.T @ x

    return best_time(matmuls, repeats=3)


@pytest.mark.benchmark(group=f"{OP} {CASE.variant} {EMBED.label}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rounding_loss(benchmark, provider: str, inputs: Inputs, expected_loss: float,
                       matmul_time: float) -> None:
    x, w, target = inputs
    if provider == "plain":
        loss_fn, backend = plain_loss, "plain"
    else:
        loss_fn = op_callable(OP, provider, rounding_loss_ref, rounding_loss)
        backend = resolved_backend(OP, provider, rounding_loss_ref)
        benchmark.extra_info["backend"] = backend

    loss, gx, gw = run(benchmark, forward_backward, loss_fn, x, w, target)

    N, D, V = EMBED.N, EMBED.D, EMBED.V
    benchmark.extra_info["logits_buffer_mib"] = 0.0 if backend in KERNELS else N * V * 4 / 2**20
    benchmark.extra_info["logits_buffer_basis"] = "analytic"
    record(benchmark, "matmuls", matmul_time, {"gflops": 3 * 2 * N * D * V / 1e9})

    assert gx.shape == x.shape and gw.shape == w.shape
    assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gw).all())
    assert loss.item() == pytest.approx(expected_loss, rel=1e-4)
