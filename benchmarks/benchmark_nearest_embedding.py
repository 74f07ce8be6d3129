"""``nearest_embedding`` (Diffusion-LM's clamping trick), l2 and cosine, at N×D vectors against V rows.

Providers: the op's own (see ``OP_PROVIDERS``) and ``diffusion-lm``, Diffusion-LM's full distance-matrix
formulation (``get_efficient_knn``: the whole V×N matrix ``|w|² + |x|² - 2 W·xᵀ``, clamped at 0, then
the top-1 over the vocabulary). Floor: one ``torch.mm(x, W.T)``; ``gflops`` counts ``2·N·D·V``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import EMBED, OP_PROVIDERS, grouped, op_callable, record, resolved_backend, run
from fastdiff.ops import nearest_embedding, nearest_embedding_ref
from fastdiff.testing import op_cases

OP = "nearest_embedding"
PROVIDERS = (*OP_PROVIDERS, "diffusion-lm")
METRICS = [grouped(c.kwargs["metric"], f"{OP} {c.variant} {EMBED.label}") for c in op_cases(OP)]  # the shared cases
CHECK_ROWS = 256  # rows compared with the reference after timing


def diffusion_lm_clamp(x: torch.Tensor, weight: torch.Tensor, metric: str = "l2"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest rows through one full ``(V, N)`` score matrix, as Diffusion-LM computes them."""
    flat = x.reshape(-1, x.shape[-1])
    if metric == "cosine":
        wn = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        idx = torch.topk(wn @ flat.T, k=1, dim=0).indices[0]
    else:
        emb_norm = (weight**2).sum(-1).view(-1, 1)  # (V, 1)
        arr_norm = (flat**2).sum(-1).view(-1, 1)  # (N, 1)
        dist = emb_norm + arr_norm.T - 2.0 * torch.mm(weight, flat.T)  # (V, N)
        dist = torch.clamp(dist, 0.0, float("inf"))
        idx = torch.topk(-dist, k=1, dim=0).indices[0]
    idx = idx.reshape(x.shape[:-1])
    return idx, F.embedding(idx, weight)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_embedding(benchmark, provider: str, metric: str, embed_inputs, mm_time: float) -> None:
    x, w = embed_inputs
    if provider == "diffusion-lm":
        fn = diffusion_lm_clamp
    else:
        fn = op_callable(OP, provider, nearest_embedding_ref, nearest_embedding)
        benchmark.extra_info["backend"] = resolved_backend(OP, provider, nearest_embedding_ref)

    idx, snapped = run(benchmark, fn, x, w, metric)

    N, D, V = EMBED.N, EMBED.D, EMBED.V
    record(benchmark, "mm", mm_time, {"gflops": 2 * N * D * V / 1e9})

    assert idx.shape == (N,) and snapped.shape == (N, D)
    want, _ = nearest_embedding_ref(x[:CHECK_ROWS], w, metric)
    agree = (idx[:CHECK_ROWS] == want).double().mean().item()
    assert agree >= 0.99, f"{provider}/{metric}: only {agree:.3f} of the first rows match the reference"
    assert torch.equal(snapped[:CHECK_ROWS], w[idx[:CHECK_ROWS]])
