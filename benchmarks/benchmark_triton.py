"""Triton-specific benchmarks: the issue's GPU-size targets (the ``torch.library`` wrapper's cost of every
backend, Triton's included, is ``benchmark_dispatch.py``).

* CUDA only (skipped otherwise, never emulated), with the targets in ``extra_info``:
  - clamp: bf16 N=8192, D=768, V=50257 (GPT-2): ``ratio_to_mm`` (target ≤ 1/0.7, i.e. ≥ 70% of the
    bf16 ``torch.mm`` rate) and ``speedup_vs_diffusion_lm`` (target ≥ 3);
  - posterior_sample: 16384×50257 bf16 logits, absorbing and uniform: ``read_gbps`` (bytes of logits
    read / time) and ``fraction_of_copy_bw`` = read_gbps / device-to-device copy bandwidth (target ≥ 0.8;
    copy bandwidth = (bytes read + bytes written) / time of ``dst.copy_(logits)``);
  - rounding_loss forward + backward, bf16 N=8192, D=768, V=50257: ``peak_mib`` (measured
    ``torch.cuda.max_memory_allocated`` above the inputs) and, for the Triton provider,
    ``memory_fraction_of_reference`` (target ≤ 0.1) and ``time_ratio_to_reference`` (target ≤ 1.0).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICE, best_time, op_callable, run, sync
from benchmarks.benchmark_nearest_embedding import diffusion_lm_clamp
from fastdiff import discrete, schedules
from fastdiff.ops import nearest_embedding, posterior_sample, rounding_loss

CUDA = DEVICE.type == "cuda"
cuda_only = pytest.mark.skipif(not CUDA, reason="GPU-size target: needs a CUDA device (not measurable on CPU)")
N_CLAMP, D_CLAMP, V_GPT2 = 8192, 768, 50257
N_POST = 16384


# --------------------------------------------------------------------------------------------------
# CUDA only: the targets
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clamp_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_CLAMP, D_CLAMP, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(V_GPT2, D_CLAMP, generator=g).to(DEVICE, torch.bfloat16)
    return x, w


@cuda_only
@pytest.mark.benchmark(group=f"clamp bf16 N={N_CLAMP} D={D_CLAMP} V={V_GPT2}")
@pytest.mark.parametrize("provider", ["triton", "cuda", "diffusion-lm"])
def test_gpu_clamp_bf16(benchmark, provider: str, clamp_inputs) -> None:
    x, w = clamp_inputs
    fn = diffusion_lm_clamp if provider == "diffusion-lm" else op_callable(
        "nearest_embedding", provider, None, nearest_embedding)
    idx, _ = run(benchmark, fn, x, w, "l2")
    mm_s = best_time(lambda: torch.mm(x, w.T), repeats=10)
    dlm_s = best_time(lambda: diffusion_lm_clamp(x, w, "l2"), repeats=3)
    benchmark.extra_info.update(mm_s=mm_s, diffusion_lm_s=dlm_s)
    if benchmark.stats is not None:
        t = benchmark.stats.stats.min
        benchmark.extra_info.update(ratio_to_mm=t / mm_s, fraction_of_mm_rate=mm_s / t,
                                    speedup_vs_diffusion_lm=dlm_s / t, gflops=2 * N_CLAMP * D_CLAMP * V_GPT2 / t / 1e9)
    want, _ = diffusion_lm_clamp(x[:512], w, "l2")
    assert (idx[:512] == want).double().mean().item() >= 0.99


@pytest.fixture(scope="module")
def post_logits():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return (2.0 * torch.randn(N_POST, V_GPT2, generator=g, device=DEVICE)).to(torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("provider", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_gpu_posterior_sample_bf16(benchmark, provider: str, kind: str, post_logits) -> None:
    benchmark.group = f"posterior_sample {kind} bf16 {N_POST}x{V_GPT2}"
    V = V_GPT2
    if kind == "absorbing":
        process = discrete.Absorbing(V, V - 1, schedules.mutual_info(1000))
        x_t = torch.full((N_POST,), V - 1, dtype=torch.int64, device=DEVICE)
    else:
        process = discrete.Uniform(V, schedules.cosine(1000))
        x_t = torch.randint(0, V, (N_POST,), device=DEVICE)
    fn = op_callable("posterior_sample", provider, None, posterior_sample)
    tokens = run(benchmark, fn, process, post_logits, x_t, 500, 400, seed=1234)
    nbytes = post_logits.numel() * post_logits.element_size()
    dst = torch.empty_like(post_logits)
    copy_s = best_time(lambda: dst.copy_(post_logits), repeats=10)
    copy_gbps = 2 * nbytes / copy_s / 1e9
    benchmark.extra_info.update(copy_s=copy_s, copy_gbps=copy_gbps)
    if benchmark.stats is not None:
        gbps = nbytes / benchmark.stats.stats.min / 1e9
        benchmark.extra_info.update(read_gbps=gbps, fraction_of_copy_bw=gbps / copy_gbps)
    assert tokens.shape == (N_POST,) and int(tokens.min()) >= 0 and int(tokens.max()) < V


@pytest.fixture(scope="module")
def loss_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_CLAMP, D_CLAMP, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    w = (0.05 * torch.randn(V_GPT2, D_CLAMP, generator=g)).to(DEVICE, torch.bfloat16).requires_grad_()
    target = torch.randint(0, V_GPT2, (N_CLAMP,), generator=g).to(DEVICE)
    return x, w, target


def _fwd_bwd(fn, x, w, target):
    loss = fn(x, w, target)
    return (loss.detach(), *torch.autograd.grad(loss, (x, w)))


def _peak_mib(fn, *args) -> float:
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_reference_figures: dict[str, float] = {}


@cuda_only
@pytest.mark.benchmark(group=f"rounding_loss fwd+bwd bf16 N={N_CLAMP} D={D_CLAMP} V={V_GPT2}")
@pytest.mark.parametrize("provider", ["reference", "triton", "cuda"])
def test_gpu_rounding_loss_bf16(benchmark, provider: str, loss_inputs) -> None:
    x, w, target = loss_inputs
    fn = op_callable("rounding_loss", provider, None, rounding_loss) if provider != "reference" else \
        (lambda a, b, c: rounding_loss(a, b, c, backend="reference"))
    loss, gx, gw = run(benchmark, _fwd_bwd, fn, x, w, target)
    peak = _peak_mib(_fwd_bwd, fn, x, w, target)
    benchmark.extra_info["peak_mib"] = peak
    if provider == "reference":
        _reference_figures["peak_mib"] = peak
        if benchmark.stats is not None:
            _reference_figures["best_s"] = benchmark.stats.stats.min
    else:
        if "peak_mib" in _reference_figures:
            benchmark.extra_info["memory_fraction_of_reference"] = peak / _reference_figures["peak_mib"]
        if benchmark.stats is not None and "best_s" in _reference_figures:
            benchmark.extra_info["time_ratio_to_reference"] = benchmark.stats.stats.min / _reference_figures["best_s"]
    ref = rounding_loss(x.detach()[:256], w.detach(), target[:256], backend="reference")
    sub = rounding_loss(x.detach()[:256], w.detach(), target[:256], backend=provider if provider != "reference"
                        else "reference")
    assert abs(ref.item() - sub.item()) <= 1e-3 * max(1.0, abs(ref.item()))
    assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gw).all())
