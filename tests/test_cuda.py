"""The CUDA backend against the references, on a GPU.

Every op runs with ``backend="cuda"`` over odd shapes, every dtype and non-contiguous inputs, and is
compared with its reference: values within float tolerances; arg-min indices equal except where two scores
tie within rounding; sampled tokens equal for the same ``(seed, offset)`` except where the row's uniform
falls within rounding of a CDF boundary (or a top-p mass boundary), with the number of such rows
bounded. These are GPU tests: without a CUDA device they skip; on a CUDA machine where the extension
is not built they fail with the build command (scripts/gpu.sh builds it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fastdiff import _backends, ops
from fastdiff import discrete as D
from fastdiff import schedules as S
from fastdiff.ops.sample_categorical import filter_weights
from tests import _oracles as O

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU test of the CUDA kernels)"),
]
DEV = "cuda"
T = 50
NEAR = 1e-9  # relative distance of u·Z from a CDF boundary under which backends may disagree


@pytest.fixture(scope="module", autouse=True)
def built():
    be = _backends.cuda()
    assert be.available, f"the CUDA backend is unavailable on a CUDA machine: {be.reason}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# nearest_embedding
# --------------------------------------------------------------------------------------------------
def _scores64(x: torch.Tensor, w: torch.Tensor, metric: str) -> torch.Tensor:
    x64, w64 = x.reshape(-1, x.shape[-1]).double().cpu(), w.double().cpu()
    if metric == "cosine":
        return -(x64 @ (w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)).T)
    return (w64 * w64).sum(1) - 2 * x64 @ w64.T


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 1e-2),
                                       (torch.float16, 1e-2)])
@pytest.mark.parametrize("N,V,Dm", [(1, 1, 1), (19, 7, 5), (97, 1000, 64), (300, 50257, 16), (2, 3000, 129)])
def test_nearest_embedding_matches_reference(metric, dtype, tol, N, V, Dm):
    g = _gen(N * 7 + V)
    x = torch.randn(N, Dm, generator=g).to(dtype).to(DEV)
    w = torch.randn(V, Dm, generator=g).to(dtype).to(DEV)
    idx, snapped = ops.nearest_embedding(x, w, metric, backend="cuda")
    ref, _ = ops.nearest_embedding_ref(x, w, metric)
    assert idx.shape == (N,) and idx.dtype == torch.int64 and snapped.dtype == dtype
    assert torch.equal(snapped, w[idx])
    sc = _scores64(x, w, metric)
    got = sc.gather(1, idx.cpu()[:, None])[:, 0]
    want = sc.gather(1, ref.cpu()[:, None])[:, 0]
    scale = sc.abs().amax(1) + 1.0
    assert bool(((got - want) <= tol * scale).all()), "the kernel's choice is worse than the reference's beyond rounding"
    # the kernel only screens; near-ties are resolved by the same float64 evaluation (fastdiff.ops._nearest)
    assert torch.equal(idx, ref)


def test_nearest_embedding_ties_go_to_the_lowest_index_and_views_work():
    g = _gen(3)
    base = torch.randn(5, 12, generator=g)
    w = torch.cat([base, base, base]).to(DEV)  # rows v, v+5, v+10 are equal: exactly tied scores
    x = (base[[4, 0, 2, 2]] + 0.01 * torch.randn(4, 12, generator=g)).to(DEV)
    for metric in ("l2", "cosine"):
        idx, _ = ops.nearest_embedding(x, w, metric, backend="cuda")
        assert idx.tolist() == [4, 0, 2, 2], metric
    # non-contiguous x (a transposed view) and batched leading shape
    xb = torch.randn(12, 3, 7, generator=g).to(DEV).permute(1, 2, 0)
    idx, snapped = ops.nearest_embedding(xb, w, backend="cuda")
    ref, _ = ops.nearest_embedding_ref(xb, w)
    assert idx.shape == (3, 7) and torch.equal(idx, ref) and snapped.shape == (3, 7, 12)
    # an empty batch
    idx, snapped = ops.nearest_embedding(torch.zeros(0, 12, device=DEV), w, backend="cuda")
    assert idx.shape == (0,) and snapped.shape == (0, 12)


# --------------------------------------------------------------------------------------------------
# rounding_loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-11), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("N,V,Dm,bias", [(1, 1, 3, False), (19, 7, 5, True), (97, 5003, 33, True), (64, 50257, 8, False)])
def test_rounding_loss_values_and_gradients(reduction, dtype, atol, N, V, Dm, bias, monkeypatch):
    glue = _backends.cuda().module  # the module the dispatcher calls
    monkeypatch.setattr(glue, "LOSS_CHUNK_ELEMENTS", 3 * V + 1)  # several chunks, the last one partial
    g = _gen(N + V)
    x = torch.randn(N, Dm, generator=g).to(dtype).to(DEV).requires_grad_()
    w = (0.5 * torch.randn(V, Dm, generator=g)).to(dtype).to(DEV).requires_grad_()
    b = (torch.randn(V, generator=g)).to(dtype).to(DEV).requires_grad_() if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100
    target = target.to(DEV)
    inputs = [x, w] + ([b] if bias else [])
    out = ops.rounding_loss(x, w, target, b, reduction, backend="cuda")
    ref = ops.rounding_loss_ref(x, w, target, b, reduction)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if reduction == "mean" and bool((target == -100).all()):  # no valid target: 0 (sum / max(count, 1))
        assert float(out) == 0.0 and float(ref) == 0.0
        return
    tol = atol * (1 + ref.detach().abs().max().item())
    torch.testing.assert_close(out, ref, atol=tol, rtol=1e-5 if dtype != torch.float64 else 1e-11)
    go = torch.randn(out.shape, generator=_gen(1)).to(out.dtype).to(DEV) if reduction == "none" else None
    grads = torch.autograd.grad(out, inputs, go)
    grads_ref = torch.autograd.grad(ref, inputs, go)
    for gk, gr, name in zip(grads, grads_ref, ("x", "weight", "bias")):
        assert gk.dtype == gr.dtype and gk.shape == gr.shape, name
        gtol = (1e-2 if dtype == torch.bfloat16 else atol * 10) * (1 + gr.float().abs().max().item())
        torch.testing.assert_close(gk.double(), gr.double(), atol=gtol, rtol=1e-4, msg=name)


def test_rounding_loss_grad_only_for_what_requires_it():
    g = _gen(0)
    x = torch.randn(4, 6, 8, generator=g).to(DEV)
    w = torch.randn(11, 8, generator=g).to(DEV).requires_grad_()
    t = torch.randint(0, 11, (4, 6), generator=g).to(DEV)
    out = ops.rounding_loss(x, w, t, backend="cuda")
    (gw,) = torch.autograd.grad(out, [w])
    (gw_ref,) = torch.autograd.grad(ops.rounding_loss_ref(x, w, t), [w])
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ops.rounding_loss(x, w, t, reduction="none", backend="cuda"),
                                   ops.rounding_loss_ref(x, w, t, reduction="none"), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# categorical_posterior / posterior_sample
# --------------------------------------------------------------------------------------------------
def _processes(V: int) -> dict:
    g = _gen(V)
    procs = {
        "absorbing": D.Absorbing(V, V - 1, S.mutual_info(T)),
        "absorbing-spindle": D.Absorbing(V, V - 1, S.spindle(T, torch.randn(V, generator=g) * 0.3)),
        "uniform": D.Uniform(V, S.cosine(T)),
    }
    if V <= 64:
        procs["gaussian-band"] = D.GaussianBand(V, S.cosine(T), bandwidth=3)
    return procs


def _inputs(process, shape, seed, dtype=torch.float32):
    g = _gen(seed)
    V = process.vocab_size
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    xt = torch.randint(0, V, shape, generator=g)
    if process.kind == "absorbing":
        xt = torch.where(torch.rand(shape, generator=g) < 0.6, torch.full_like(xt, process.mask_id), xt)
    return logits.to(DEV), xt.to(DEV)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,shape", [(2, (1,)), (7, (19,)), (61, (3, 5)), (5003, (33,)), (50257, (4,))])
def test_categorical_posterior_matches_reference(dtype, V, shape):
    for name, process in _processes(V).items():
        logits, xt = _inputs(process, shape, seed=V, dtype=dtype)
        t = torch.randint(2, T + 1, shape[:1], generator=_gen(1)).to(DEV)
        s = t // 2
        for temp in (1.0, 0.7):
            out = ops.categorical_posterior(process, logits, xt, t, s, temperature=temp, backend="cuda")
            ref = ops.categorical_posterior_ref(process, logits, xt, t, s, temperature=temp)
            assert out.dtype == ref.dtype and out.shape == ref.shape, name
            atol = 1e-12 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5, msg=f"{name} T={temp}")


def _check_draws(out, probs64, seed, offset, rows, name, max_near=3):
    """Same tokens as the contract except near-ties, which must be few and genuinely near."""
    out = out.reshape(-1).cpu().numpy()
    near = 0
    for r in range(len(out)):
        w = probs64[r]
        u = O.row_uniform(seed, offset, int(rows[r]))
        want = O.inverse_cdf(w, u)
        if out[r] != want:
            assert O.margin(w, u) < NEAR, f"{name}: row {r} drew {out[r]}, contract {want}, not a near-tie"
            near += 1
        assert w[out[r]] > 0, f"{name}: row {r} drew a zero-probability token"
    assert near <= max_near, f"{name}: {near} near-tie disagreements"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,shape", [(2, (5,)), (9, (60,)), (61, (4, 25)), (5003, (40,)), (50257, (6,))])
def test_posterior_sample_same_seed_same_tokens(dtype, V, shape):
    for name, process in _processes(V).items():
        logits, xt = _inputs(process, shape, seed=3, dtype=dtype)
        seed, offset = 1234 + V, 77
        out = ops.posterior_sample(process, logits, xt, 40, 25, seed=seed, offset=offset, backend="cuda")
        assert out.dtype == torch.int64 and out.shape == xt.shape
        assert torch.equal(out, ops.posterior_sample(process, logits, xt, 40, 25, seed=seed, offset=offset,
                                                     backend="cuda"))
        probs = ops.categorical_posterior_ref(process, logits.double(), xt, 40, 25).reshape(-1, V).cpu().numpy()
        _check_draws(out, probs, seed, offset, np.arange(out.numel()), name)
        if process.kind == "absorbing":
            keep = xt != process.mask_id
            assert torch.equal(out[keep], xt[keep])


@pytest.mark.parametrize("name", ["absorbing", "absorbing-spindle", "uniform", "gaussian-band"])
def test_posterior_sample_frequencies_and_broadcast_rows(name):
    V, n = 7, 200_000
    process = _processes(V)[name]
    logits, _ = _inputs(process, (1,), seed=5)
    xt = torch.full((n,), process.mask_id if process.kind == "absorbing" else 3, device=DEV)
    out = ops.posterior_sample(process, logits.expand(n, V), xt, 30, 12, seed=11, backend="cuda")
    p = ops.categorical_posterior_ref(process, logits[:1].double(), xt[:1], 30, 12)[0].cpu().numpy()
    counts = np.bincount(out.cpu().numpy(), minlength=V)
    assert counts[p == 0].sum() == 0
    nz = p > 0
    assert stats.chisquare(counts[nz], p[nz] * n).pvalue > 1e-5


# --------------------------------------------------------------------------------------------------
# sample_categorical
# --------------------------------------------------------------------------------------------------
def _topp_boundary_distance(z: np.ndarray, top_k, top_p) -> float:
    """How close any category's 'mass strictly more probable' is to top_p (top-p near-tie indicator)."""
    if top_p is None:
        return 1.0
    w = filter_weights(torch.from_numpy(z)[None], top_k, None)[0].numpy()
    p = w / w.sum()
    vals, counts = np.unique(p, return_counts=True)  # ascending
    group = (vals * counts)[::-1]
    mass = (np.cumsum(group) - group)[::-1]  # mass of the strictly larger values, per distinct value
    return float(np.min(np.abs(mass - top_p)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 1000, 50257])
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.6), dict(top_k=5), dict(top_p=0.8),
                                  dict(top_k=50, top_p=0.9, temperature=1.3), dict(top_k=1)])
def test_sample_categorical_same_seed_same_tokens(dtype, V, opts):
    n = 64 if V <= 1000 else 8
    g = _gen(V)
    logits = (torch.randn(n, V, generator=g) * 3).to(dtype)
    logits[:, : max(1, V // 10)] = logits[:, : max(1, V // 10)].round()  # exact ties among the top logits
    logits = logits.to(DEV)
    seed, offset = 99 + V, 3
    out = ops.sample_categorical(logits, seed=seed, offset=offset, backend="cuda", **opts)
    assert out.shape == (n,) and out.dtype == torch.int64
    assert torch.equal(out, ops.sample_categorical(logits, seed=seed, offset=offset, backend="cuda", **opts))
    temp = opts.get("temperature", 1.0)
    z = logits.double().cpu() / temp
    w = filter_weights(z, opts.get("top_k"), opts.get("top_p")).numpy()
    near = 0
    for r in range(n):
        u = O.row_uniform(seed, offset, r)
        want = O.inverse_cdf(w[r], u)
        if int(out[r]) != want:
            close = O.margin(w[r], u) < NEAR or _topp_boundary_distance(z[r].numpy(), opts.get("top_k"),
                                                                        opts.get("top_p")) < NEAR
            assert close, f"row {r}: drew {int(out[r])}, reference {want}, not a near-tie"
            near += 1
        else:
            assert w[r, int(out[r])] > 0
    assert near <= 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_is_argmax_with_lowest_index(dtype):
    g = _gen(4)
    logits = torch.randint(-3, 4, (200, 33), generator=g).to(dtype)  # many exact ties
    logits[5] = float("-inf")
    logits[5, 30] = 0.0
    logits = logits.to(DEV)
    out = ops.sample_categorical(logits, seed=0, temperature=0.0, backend="cuda")
    assert torch.equal(out, torch.argmax(logits.cpu().float(), dim=-1).to(DEV))


def test_top_k_and_top_p_sets_are_tie_inclusive():
    # logits 2, 2, 1, 1, 0: top_k=1 keeps both 2s; top_p=0.5 keeps both 2s as well (each is strictly
    # less probable than nothing else), and no 1 or 0 is ever drawn.
    logits = torch.tensor([[2.0, 2.0, 1.0, 1.0, 0.0]]).expand(100_000, 5).to(DEV)
    for kw in (dict(top_k=1), dict(top_p=0.5), dict(top_k=3)):
        out = ops.sample_categorical(logits, seed=5, backend="cuda", **kw).cpu()
        w = filter_weights(logits[:1].double().cpu(), kw.get("top_k"), kw.get("top_p"))[0].numpy()
        counts = np.bincount(out.numpy(), minlength=5)
        assert counts[w == 0].sum() == 0, kw
        nz = w > 0
        assert stats.chisquare(counts[nz], w[nz] / w.sum() * out.numel()).pvalue > 1e-5, kw


def test_sample_categorical_frequencies_and_zero_probability():
    V, n = 1000, 200_000
    g = _gen(8)
    row = torch.randn(V, generator=g) * 2
    row[::7] = float("-inf")
    out = ops.sample_categorical(row.to(DEV).expand(n, V), seed=1, backend="cuda").cpu().numpy()
    p = torch.softmax(row.double(), -1).numpy()
    counts = np.bincount(out, minlength=V)
    assert counts[p == 0].sum() == 0
    order = np.argsort(p)
    bins = np.array_split(order[p[order] > 0], 10)
    assert stats.chisquare([counts[b].sum() for b in bins], [p[b].sum() * n for b in bins]).pvalue > 1e-5


def test_auto_picks_cuda_on_cuda_tensors(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    for op in ("nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample",
               "sample_categorical"):
        assert ops.explain(op, DEV)["cuda"] == "ok", op
