"""End-to-end ``fastdiff.generate`` against LLaDA's and Fast-dLLM's own loops (written here in plain PyTorch
from their published algorithms), on a transformer big enough that the network dominates.

Model: a randomly initialised Llama-architecture LM run bidirectionally through
:class:`fastdiff.models.hf.HFBidirectional` (LLaDA is a Llama-like network run without the causal mask):
full size 6 layers, width 512, 8 heads, FFN 1376, ``V = 32768``; ``FASTDIFF_BENCH_SMALL=1``: 2 layers,
width 128, ``V = 4096``. One prompt of 32 tokens (batch 1, as Fast-dLLM reports), generation length
``N`` = 256 and 512 (small: 32), blocks of 32, ``steps = N`` (LLaDA's one token per step), greedy.

Providers (group ``generate N=<N>``):

* ``llada-loop``: LLaDA's ``generate`` (blocks from the end of the prompt, ``get_num_transfer_tokens``,
  float64 softmax confidence over the whole sequence, ``torch.topk``), full forward every step.
* ``fast-dllm-loop``: Fast-dLLM's ``generate_with_dual_cache`` with ``threshold=0.9`` through the same
  cache protocol (``kv_forward`` at a block start, ``kv_window`` on the block), with its
  ``get_transfer_index`` (float64 softmax over the window).
* ``fastdiff``: ``generate(preset="llada")``; ``fastdiff-prefix`` / ``fastdiff-dual``: with Fast-dLLM's
  caches; ``fastdiff-threshold``: ``preset="fast_dllm", threshold=0.9`` uncached; ``fastdiff-dual-threshold``:
  the same with the dual cache.
* ``fastdiff-graph``, ``fastdiff-dual-graph``, ``fastdiff-dual-threshold-graph`` (CUDA only; skipped elsewhere):
  ``fastdiff``, ``fastdiff-dual``, ``fastdiff-dual-threshold`` with ``cuda_graph=True`` (each step's forward and
  selection replayed as a CUDA graph; the captures happen inside the timed call); ``speedup_vs_eager`` and the
  tokens checked equal to the eager run's.

``FASTDIFF_BENCH_THREADS=n`` sets torch's threads for the module. ``extra_info``: ``tokens_per_s``, ``network_calls``, ``model_time_s``, ``overhead_fraction`` (1 − network time /
wall time: the non-network part of the steps; the target is ≤ 10%), ``speedup_vs_llada`` (tokens/s ÷ the
LLaDA loop's, when it ran earlier in the session) and, for the cached runs, ``tokens_differing`` /
``fraction_differing`` against the uncached run of the same rule (the caches are approximate). A random
network is not a trained one: its confidences rarely pass a threshold of 0.9, so parallel decoding gains
little here and the figures measure the caches; the agreement of the caches on a trained model is measured
in ``tests/test_generate_cache.py`` on the bundled model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, SMALL
import fastdiff
from fastdiff.models.hf import HFBidirectional

V = 4096 if SMALL else 32768
WIDTH, LAYERS, FFN = (128, 2, 344) if SMALL else (512, 6, 1376)
LENGTHS = (32,) if SMALL else (256, 512)
PROMPT, BLOCK, THRESHOLD = 32, 32, 0.9
MASK = V - 1
ROUNDS = int(os.environ.get("FASTDIFF_BENCH_ROUNDS", "1"))
_RESULTS: dict[tuple[int, str], dict] = {}



@pytest.fixture(scope="module")
def lm() -> HFBidirectional:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      mask_token_id=MASK)
    net = LlamaForCausalLM(cfg).to(DEVICE).eval()
    net.set_attn_implementation("sdpa")
    return HFBidirectional(net)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V - 1, (1, PROMPT), generator=g).to(DEVICE)


class Timed:
    """The model with a timer around every call (the peers' network time)."""

    def __init__(self, model: Callable) -> None:
        self.model, self.seconds, self.calls = model, 0.0, 0

    def _t(self, fn: Callable, *a: object, **k: object) -> object:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._t(self.model, x)

    def kv_forward(self, x: torch.Tensor) -> tuple:
        return self._t(self.model.kv_forward, x, None)

    def kv_window(self, x: torch.Tensor, cache: object, start: int) -> torch.Tensor:
        return self._t(self.model.kv_window, x, None, cache=cache, start=start)


# --------------------------------------------------------------------------------------------------
# The peers' loops, from their published algorithms
# --------------------------------------------------------------------------------------------------
def _num_transfer(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    n = mask_index.sum(1, keepdim=True)
    base, rem = n // steps, n % steps
    out = torch.zeros(n.shape[0], steps, dtype=torch.int64, device=n.device) + base
    for i in range(n.shape[0]):
        out[i, :rem[i]] += 1
    return out


def llada_loop(model: Timed, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int) -> torch.Tensor:
    P = prompt.shape[1]
    x = torch.full((prompt.shape[0], P + gen_length), MASK, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    nb = gen_length // block_length
    spb = steps // nb
    for b in range(nb):
        block_mask = x[:, P + b * block_length:P + (b + 1) * block_length] == MASK
        ntt = _num_transfer(block_mask, spb)
        for i in range(spb):
            mask_index = x == MASK
            logits = model(x)
            x0 = logits.argmax(-1)  # temperature 0: no Gumbel noise
            p = F.softmax(logits.to(torch.float64), -1)
            x0_p = p.gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, P + (b + 1) * block_length:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.full_like(x0_p, -torch.inf))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(conf.shape[0]):
                _, idx = torch.topk(conf[j], k=int(ntt[j, i]))
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
    return x


def _transfer_threshold(logits: torch.Tensor, mask_index: torch.Tensor, x: torch.Tensor, threshold: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = logits.argmax(-1)
    p = F.softmax(logits.to(torch.float64), -1)
    x0_p = p.gather(-1, x0[..., None]).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, x0_p, torch.full_like(x0_p, -torch.inf))
    transfer = mask_index & (conf >= threshold)
    best = conf.argmax(1, keepdim=True)
    transfer |= torch.zeros_like(transfer).scatter_(1, best, True)
    return x0, transfer & mask_index


def fast_dllm_dual_loop(model: Timed, prompt: torch.Tensor, gen_length: int, block_length: int, threshold: float
                        ) -> torch.Tensor:
    P = prompt.shape[1]
    x = torch.full((prompt.shape[0], P + gen_length), MASK, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    for b in range(gen_length // block_length):
        s, e = P + b * block_length, P + (b + 1) * block_length
        logits, cache = model.kv_forward(x)
        mask_index = x == MASK
        mask_index[:, e:] = False
        x0, tr = _transfer_threshold(logits, mask_index, x, threshold)
        x = torch.where(tr, x0, x)
        while bool((x[:, s:e] == MASK).any()):
            logits = model.kv_window(x[:, s:e], cache, s)
            blk = x[:, s:e]
            x0, tr = _transfer_threshold(logits, blk == MASK, blk, threshold)
            x[:, s:e] = torch.where(tr, x0, blk)
    return x


# --------------------------------------------------------------------------------------------------
PROVIDERS = {
    "llada-loop": None,
    "fast-dllm-loop": None,
    "fastdiff": dict(preset="llada"),
    "fastdiff-prefix": dict(preset="llada", cache="prefix"),
    "fastdiff-dual": dict(preset="llada", cache="dual"),
    "fastdiff-threshold": dict(preset="fast_dllm", threshold=THRESHOLD),
    "fastdiff-dual-threshold": dict(preset="fast_dllm", threshold=THRESHOLD, cache="dual"),
    # CUDA only (skipped elsewhere): the same runs with each step replayed as a CUDA graph (the same tokens)
    "fastdiff-graph": dict(preset="llada", cuda_graph=True),
    "fastdiff-dual-graph": dict(preset="llada", cache="dual", cuda_graph=True),
    "fastdiff-dual-threshold-graph": dict(preset="fast_dllm", threshold=THRESHOLD, cache="dual", cuda_graph=True),
}
#: the uncached run each cached run is compared with
UNCACHED = {"fastdiff-prefix": "fastdiff", "fastdiff-dual": "fastdiff", "fastdiff-dual-threshold": "fastdiff-threshold",
            "fast-dllm-loop": "fastdiff-threshold"}


@pytest.mark.parametrize("N", [pytest.param(n, id=f"N{n}", marks=pytest.mark.benchmark(group=f"generate N={n}"))
                               for n in LENGTHS])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_generate(benchmark, lm: HFBidirectional, prompt: torch.Tensor, N: int, provider: str) -> None:
    if (PROVIDERS[provider] or {}).get("cuda_graph") and DEVICE.type != "cuda":
        pytest.skip("cuda_graph=True needs a CUDA device")
    stats: dict = {}

    def call() -> torch.Tensor:
        with torch.inference_mode():
            peers = {"llada-loop": lambda t: llada_loop(t, prompt, N, N, BLOCK),
                     "fast-dllm-loop": lambda t: fast_dllm_dual_loop(t, prompt, N, BLOCK, THRESHOLD)}
            if provider in peers:
                t = Timed(lm)
                t0 = time.perf_counter()
                out = peers[provider](t)
                stats.update(time_s=time.perf_counter() - t0, model_time_s=t.seconds, network_calls=t.calls)
                return out
            res = fastdiff.generate(lm, prompt, max_new_tokens=N, steps=N, block_length=BLOCK, **PROVIDERS[provider])
            stats.update({k: res.stats[k] for k in ("time_s", "model_time_s", "network_calls")})
            return res.sequences

    if benchmark.enabled:
        out = benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    else:
        out = benchmark.pedantic(call)
    info = benchmark.extra_info
    info.update(stats)
    info["threads"] = torch.get_num_threads()
    info["load_average_1min"] = os.getloadavg()[0]
    info["tokens_per_s"] = N / stats["time_s"]
    info["overhead_fraction"] = max(0.0, 1 - stats["model_time_s"] / stats["time_s"])
    _RESULTS[(N, provider)] = {"tokens": out[:, PROMPT:].cpu(), "rate": info["tokens_per_s"]}
    base = _RESULTS.get((N, "llada-loop"))
    if base is not None:
        info["speedup_vs_llada"] = info["tokens_per_s"] / base["rate"]
    ref = _RESULTS.get((N, UNCACHED.get(provider, "")))
    if ref is not None:
        diff = int((ref["tokens"] != out[:, PROMPT:].cpu()).sum())
        info["tokens_differing"] = diff
        info["fraction_differing"] = diff / out[:, PROMPT:].numel()
    eager = _RESULTS.get((N, provider.removesuffix("-graph"))) if provider.endswith("-graph") else None
    if eager is not None:  # the graphs replay the eager steps: the same tokens
        info["speedup_vs_eager"] = info["tokens_per_s"] / eager["rate"]
        assert torch.equal(eager["tokens"], out[:, PROMPT:].cpu())
    if provider == "fastdiff":  # fastdiff's LLaDA preset is LLaDA's algorithm: the same tokens, greedy
        peer = _RESULTS.get((N, "llada-loop"))
        if peer is not None:
            assert torch.equal(peer["tokens"], out[:, PROMPT:].cpu())
