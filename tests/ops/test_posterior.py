"""categorical_posterior and posterior_sample (one kernel family, ``posterior``) on every backend: the process's
posterior of softmax(x0 logits), the draw contract (the inverse CDF at the row's Philox uniform), frequencies,
zero-probability tokens, carried (unmasked) tokens, views and empty inputs, value checks (in the public op or
in the C++ kernel's own pass: the same error), the lowering to the one kernel ABI (fastdiff.ops._plan), and
bad input rejected before any kernel runs.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fastdiff import discrete as D
from fastdiff import ops
from fastdiff import random as R
from fastdiff import schedules as S
from fastdiff.errors import InputError
from fastdiff.ops._plan import posterior_plan
from tests import _oracles as O
from tests.conftest import assert_close
from tests.ops import _cases as C

T = C.T
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


# --------------------------------------------------------------------------------------------------------
# The process's posterior and the draw contract
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [2, 7, 61])
@pytest.mark.parametrize("shape", [(1,), (19,), (3, 5)])
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_categorical_posterior_is_softmax_then_process_posterior(backend, V, shape):
    dev = C.device(backend)
    for name, process in C.processes(V).items():
        logits, xt = C.logits_and_xt(process, shape, seed=V)
        t = torch.randint(2, T + 1, shape[:1], generator=C.gen(1))
        s = t // 2
        out = ops.categorical_posterior(process, logits.to(dev), xt.to(dev), t.to(dev), s.to(dev), backend=backend)
        assert out.dtype == F32 and out.shape == shape + (V,)
        z = logits.double()
        if process.kind == "absorbing":
            z[..., process.mask_id] = float("-inf")
        ref = process.posterior_probs(torch.softmax(z, -1), xt, t, s)
        np.testing.assert_allclose(out.double().cpu().numpy(), ref.numpy(), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_absorbing_mask_logit_is_ignored_and_temperature_applies(backend):
    dev = C.device(backend)
    process = C.processes(11)["absorbing"]
    logits, xt = C.logits_and_xt(process, (8,), seed=2)
    logits, xt = logits.to(dev), xt.to(dev)
    a = ops.categorical_posterior(process, logits, xt, 30, 10, temperature=0.5, backend=backend)
    logits2 = logits.clone()
    logits2[:, process.mask_id] = 1e4
    b = ops.categorical_posterior(process, logits2, xt, 30, 10, temperature=0.5, backend=backend)
    assert torch.equal(a, b)
    ref = ops.categorical_posterior(process, logits / 0.5, xt, 30, 10, backend=backend)
    np.testing.assert_allclose(a.cpu().numpy(), ref.cpu().numpy(), atol=1e-6)


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_posterior_sample_follows_the_documented_contract(backend):
    """float64 logits: every row's token is exactly the inverse CDF at the Philox uniform of (seed; row, offset)."""
    dev = C.device(backend)
    for name, process in C.processes(9).items():
        logits, xt = C.logits_and_xt(process, (60,), seed=3, dtype=F64)
        seed, offset = 1234, 77
        out = ops.posterior_sample(process, logits.to(dev), xt.to(dev), 40, 25, seed=seed, offset=offset,
                                   backend=backend).cpu()
        probs = ops.categorical_posterior(process, logits, xt, 40, 25, backend="reference").numpy()
        for r in range(60):
            assert int(out[r]) == O.inverse_cdf(probs[r], O.row_uniform(seed, offset, r)), (name, r)


@pytest.mark.parametrize("name", ["absorbing", "absorbing-spindle", "uniform", "gaussian-band"])
@pytest.mark.parametrize("backend,n", C.cases({C.AUTO_CPU: [100_000], "cuda": [200_000]}))
def test_posterior_sample_frequencies(backend, n, name):
    """n draws of one broadcast row (expanded logits): zero-probability tokens never drawn, chi-square."""
    V = 7
    dev = C.device(backend)
    process = C.processes(V)[name]
    logits, _ = C.logits_and_xt(process, (1,), seed=5)
    xt = torch.full((n,), process.mask_id if process.kind == "absorbing" else 3)
    out = ops.posterior_sample(process, logits.to(dev).expand(n, V), xt.to(dev), 30, 12, seed=11, backend=backend)
    p = ops.categorical_posterior(process, logits[:1].double(), xt[:1], 30, 12, backend="reference")[0].numpy()
    counts = np.bincount(out.cpu().numpy(), minlength=V)
    assert counts[p == 0].sum() == 0
    nz = p > 0
    assert stats.chisquare(counts[nz], p[nz] * n).pvalue > 1e-5


@pytest.mark.parametrize("backend,V,n", C.cases({C.AUTO_CPU: [(23, 50_000)], "triton": [(7, 30)],
                                                 "cuda": [(23, 50_000)]}))
def test_zero_probability_tokens_never_sampled(backend, V, n):
    dev = C.device(backend)
    process = D.Uniform(V, S.cosine(T))
    logits = torch.full((n, V), float("-inf"), device=dev)
    logits[:, 4] = 0.0
    # s = 0: the posterior of x_0 is the x0 distribution times the likelihood: only token 4 survives.
    out = ops.posterior_sample(process, logits, torch.randint(0, V, (n,), generator=C.gen(0)).to(dev), 10, 0, seed=2,
                               backend=backend)
    assert torch.equal(out, torch.full_like(out, 4))
    absorbing = D.Absorbing(V, V - 1, S.mutual_info(T))
    out = ops.posterior_sample(absorbing, logits, torch.full((n,), V - 1, device=dev), 10, 0, seed=2, backend=backend)
    assert torch.equal(out, torch.full_like(out, 4))  # mask has probability 1 - a_0 = 0 at s = 0


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_absorbing_carries_unmasked_tokens_and_same_seed_same_tokens(backend):
    dev = C.device(backend)
    process = C.processes(33)["absorbing-spindle"]
    logits, xt = C.logits_and_xt(process, (4, 25), seed=6, dtype=BF16)
    logits, xt, t = logits.to(dev), xt.to(dev), torch.tensor([50, 40, 20, 3], device=dev)
    a = ops.posterior_sample(process, logits, xt, t, seed=9, backend=backend)
    keep = xt != process.mask_id
    assert torch.equal(a[keep], xt[keep])
    assert torch.equal(a, ops.posterior_sample(process, logits, xt, t, seed=9, backend=backend))
    assert a.dtype == torch.int64 and a.shape == xt.shape


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_same_seed_same_tokens_views_and_empty(backend):
    dev = C.device(backend)
    process = C.processes(97)["uniform"]
    g = C.gen(1)
    logits = (torch.randn(6, 4, 97, generator=g) * 2).to(dev)
    xt = torch.randint(0, 97, (6, 4), generator=g).to(dev)
    t = torch.randint(2, T + 1, (6,), generator=g).to(dev)
    s = torch.where(torch.arange(6, device=dev) % 3 == 0, torch.zeros_like(t), t // 2)
    a = ops.posterior_sample(process, logits, xt, t, s, seed=1, backend=backend)
    assert torch.equal(a, ops.posterior_sample(process, logits.clone(), xt, t, s, seed=1, backend=backend))
    assert not torch.equal(a, ops.posterior_sample(process, logits, xt, t, s, seed=1, offset=1, backend=backend))
    assert torch.equal(a.cpu(), ops.posterior_sample(process, logits.cpu(), xt.cpu(), t.cpu(), s.cpu(), seed=1,
                                                     backend="reference"))
    # a (B, L) transposed view and a view with a strided vocabulary axis give the same draws
    lt = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(a, ops.posterior_sample(process, lt, xt, t, s, seed=1, backend=backend))
    wide = torch.zeros(6, 4, 2 * 97, device=dev)
    wide[..., ::2] = logits
    assert torch.equal(a, ops.posterior_sample(process, wide[..., ::2], xt, t, s, seed=1, backend=backend))
    assert_close(ops.categorical_posterior(process, wide[..., ::2], xt, t, s, backend=backend),
                 ops.categorical_posterior(process, logits.cpu(), xt.cpu(), t.cpu(), s.cpu(), backend="reference"),
                 atol=1e-6)
    # non-contiguous rows of another process
    p17 = C.processes(17)["uniform"]
    g = C.gen(4)
    l17 = torch.randn(9, 6, 17, generator=g).to(dev).transpose(0, 1)  # (6, 9, 17) non-contiguous rows
    x17 = torch.randint(0, 17, (6, 9), generator=g).to(dev)
    got = ops.posterior_sample(p17, l17, x17, 20, 5, seed=1, backend=backend)
    assert torch.equal(got.cpu(), ops.posterior_sample(p17, l17.cpu(), x17.cpu(), 20, 5, seed=1, backend="reference"))
    # no rows
    empty = ops.posterior_sample(process, logits[:0], xt[:0], t[:0], s[:0], seed=1, backend=backend)
    assert empty.shape == (0, 4)
    assert ops.categorical_posterior(process, logits[:0], xt[:0], t[:0], s[:0], backend=backend).shape == (0, 4, 97)
    e17 = torch.zeros(0, 17, device=dev)
    x0 = torch.zeros(0, dtype=torch.int64, device=dev)
    assert ops.posterior_sample(p17, e17, x0, 3, seed=0, backend=backend).shape == (0,)
    assert ops.categorical_posterior(p17, e17, x0, 3, backend=backend).shape == (0, 17)


@pytest.mark.parametrize("backend", C.backends("reference", "cpp"))
def test_chunking_and_non_contiguous_inputs_do_not_change_draws(backend, monkeypatch):
    mod = importlib.import_module("fastdiff.ops.posterior_sample")
    process = C.processes(17)["uniform"]
    logits, xt = C.logits_and_xt(process, (6, 9), seed=7)
    full = ops.posterior_sample(process, logits, xt, 20, 5, seed=1, backend=backend)
    lt = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(full, ops.posterior_sample(process, lt, xt, 20, 5, seed=1, backend=backend))
    monkeypatch.setattr(mod, "rows_per_chunk", lambda width: 4)
    assert torch.equal(full, ops.posterior_sample(process, logits, xt, 20, 5, seed=1, backend=backend))


@pytest.mark.parametrize("backend", C.backends("reference", "cpp"))
def test_gpt2_vocabulary_in_blocks(backend):
    """V = 50257 with many rows: blocked float64 temporaries in the reference, rows in parallel in the
    kernel; row r uses counter r (a one-row call uses counter 0: compare with the oracle)."""
    V = 50257
    process = D.Uniform(V, S.cosine(1000))
    g = C.gen(0)
    logits = torch.randn(300, V, generator=g)
    xt = torch.randint(0, V, (300,), generator=g)
    out = ops.posterior_sample(process, logits, xt, 900, 800, seed=4, backend=backend)
    for r in (0, 150, 299):
        one = ops.posterior_sample(process, logits[r:r + 1], xt[r:r + 1], 900, 800, seed=4, backend=backend)
        probs = ops.categorical_posterior(process, logits[r:r + 1].double(), xt[r:r + 1], 900, 800,
                                          backend="reference")[0].numpy()
        assert int(out[r]) == O.inverse_cdf(probs, O.row_uniform(4, 0, r))
        assert one.shape == (1,)


# --------------------------------------------------------------------------------------------------------
# Against the reference, per backend at the sizes it is built for
# --------------------------------------------------------------------------------------------------------
def _rows_cpp(process, n, seed, dtype):
    """Row 0 with its first third masked by -inf; 60 % masked x_t; steps t -> t - 1 or t - 2."""
    g = C.gen(seed)
    V = process.vocab_size
    logits = (torch.randn(n, V, generator=g) * 2).to(dtype)
    logits[0, : V // 3] = float("-inf")
    xt = torch.randint(0, V, (n,), generator=g)
    if process.kind == "absorbing":
        xt = torch.where(torch.rand(n, generator=g) < 0.6, torch.full_like(xt, process.mask_id), xt)
    t = torch.randint(2, T + 1, (n,), generator=g)
    s = t - torch.randint(1, 3, (n,), generator=g)
    return logits, xt, t, s


def _rows_triton(process, shape, seed, dtype):
    """Column 2 at -inf; 70 % masked x_t; every third batch row steps to s = 0."""
    g = C.gen(seed)
    V = process.vocab_size
    logits = (torch.randn(*shape, V, generator=g) * 2).to(dtype)
    if V > 3:
        logits[..., 2] = float("-inf")
    xt = torch.randint(0, V, shape, generator=g)
    if process.kind == "absorbing":
        xt = torch.where(torch.rand(shape, generator=g) < 0.7, torch.full_like(xt, process.mask_id), xt)
    t = torch.randint(2, T + 1, shape[:1], generator=g)
    s = torch.where(torch.arange(shape[0]) % 3 == 0, torch.zeros_like(t), t // 2)
    return logits, xt, t, s


@pytest.mark.parametrize("backend,V", C.cases({"cpp": [2, 7, 61, 50257]}))
def test_cpp_equals_the_reference(backend, V):
    """Probabilities within float rounding; draws equal except near-ties on the float32 fast path (rows wider
    than 2048), which must be rare."""
    n = 40 if V < 1000 else 24
    for k, (name, process) in enumerate(C.processes(V, mid=True, band=2, dense=True).items()):
        dtypes = (F32, F64, BF16, F16) if V < 1000 else (F32,)
        for dtype in dtypes:
            logits, xt, t, s = _rows_cpp(process, n, seed=V + k, dtype=dtype)
            temp = 0.8 if k % 2 else 1.0
            probs = ops.categorical_posterior(process, logits, xt, t, s, temp, backend=backend)
            ref = ops.categorical_posterior_ref(process, logits, xt, t, s, temp)
            assert probs.dtype == ref.dtype and probs.shape == ref.shape
            assert_close(probs, ref, atol=2e-7 if dtype == F64 else 1e-6, rtol=1e-5, name=name)
            seed, offset = 1000 + k, 7
            got = ops.posterior_sample(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp,
                                       backend=backend)
            want = ops.posterior_sample_ref(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp)
            w64 = lambda r: ops.categorical_posterior_ref(process, logits[r:r + 1].double(), xt[r:r + 1],  # noqa
                                                          t[r:r + 1], s[r:r + 1], temp)[0].numpy()
            C.check_draws_rare(got, want, w64, seed, offset, fast=V > 2048 and dtype != F64)


@pytest.mark.parametrize("backend", C.backends("cpp"))
def test_cpp_wide_rows_bounded_near_ties(backend):
    """Many wide float32 rows (the fast path): count the rows that differ from the reference."""
    V, n = 50257, 300
    for name in ("absorbing", "uniform"):
        process = C.processes(V, mid=True)[name]
        logits, xt, t, s = _rows_cpp(process, n, seed=3, dtype=F32)
        xt = torch.full_like(xt, process.mask_id) if name == "absorbing" else xt
        got = ops.posterior_sample(process, logits, xt, t, s, seed=5, backend=backend)
        want = ops.posterior_sample_ref(process, logits, xt, t, s, seed=5)
        w64 = lambda r: ops.categorical_posterior_ref(process, logits[r:r + 1].double(), xt[r:r + 1],  # noqa
                                                      t[r:r + 1], s[r:r + 1])[0].numpy()
        C.check_draws_rare(got, want, w64, 5, 0, fast=True)


@pytest.mark.parametrize("backend,V,dtype", C.cases({"triton": [(2, F32), (7, F64), (7, BF16), (300, F16), (300, BF16),
                                                                (300, F32), (300, F64)]}))
def test_triton_equals_the_reference(backend, V, dtype):
    """Probabilities within float rounding; draws equal except within 1e-6 of a CDF boundary (one row at
    most); carried tokens kept. Seed 2**64 - 1, offset past 2**32."""
    dev = C.device(backend)
    seed, offset, temp = 2**64 - 1, 2**40 + 3, 0.8
    for name, process in C.processes(V, spindle_mask=1, dense=True, dense_scale=2.0).items():
        shape = (4, 5) if V > 64 else (3, 7)
        logits, xt, t, s = (a.to(dev) for a in _rows_triton(process, shape, seed=V, dtype=dtype))
        probs = ops.categorical_posterior(process, logits, xt, t, s, temp, backend=backend)
        ref = ops.categorical_posterior(process, logits, xt, t, s, temp, backend="reference")
        assert probs.dtype == ref.dtype and probs.shape == ref.shape, name
        assert_close(probs, ref, atol=1e-12 if dtype == F64 else 1e-6, name=name)
        tok = ops.posterior_sample(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp,
                                   backend=backend)
        want = ops.posterior_sample(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp,
                                    backend="reference")
        assert tok.dtype == torch.int64 and tok.shape == xt.shape
        C.check_draws_near(tok, want, ref.double(), R.row_uniforms(seed, offset, torch.arange(xt.numel())))
        if process.kind == "absorbing":
            keep = xt != process.mask_id
            assert torch.equal(tok[keep], xt[keep]), name


@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("backend,V,shape", C.cases({"cuda": [(2, (1,)), (7, (19,)), (61, (3, 5)), (5003, (33,)),
                                                              (50257, (4,))]}))
def test_cuda_categorical_posterior_equals_the_reference(backend, V, shape, dtype):
    for name, process in C.processes(V).items():
        logits, xt = (a.to("cuda") for a in C.logits_and_xt(process, shape, seed=V, dtype=dtype))
        t = torch.randint(2, T + 1, shape[:1], generator=C.gen(1)).to("cuda")
        s = t // 2
        for temp in (1.0, 0.7):
            out = ops.categorical_posterior(process, logits, xt, t, s, temperature=temp, backend=backend)
            ref = ops.categorical_posterior_ref(process, logits, xt, t, s, temperature=temp)
            assert out.dtype == ref.dtype and out.shape == ref.shape, name
            torch.testing.assert_close(out, ref, atol=1e-12 if dtype == F64 else 1e-6, rtol=1e-5,
                                       msg=f"{name} T={temp}")


@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("backend,V,shape", C.cases({"cuda": [(2, (5,)), (9, (60,)), (61, (4, 25)), (5003, (40,)),
                                                              (50257, (6,))]}))
def test_cuda_posterior_sample_follows_the_contract(backend, V, shape, dtype):
    """Same tokens for the same seed, and the contract's token except near-ties (margin < 1e-9, at most 3)."""
    for name, process in C.processes(V).items():
        logits, xt = (a.to("cuda") for a in C.logits_and_xt(process, shape, seed=3, dtype=dtype))
        seed, offset = 1234 + V, 77
        out = ops.posterior_sample(process, logits, xt, 40, 25, seed=seed, offset=offset, backend=backend)
        assert out.dtype == torch.int64 and out.shape == xt.shape
        assert torch.equal(out, ops.posterior_sample(process, logits, xt, 40, 25, seed=seed, offset=offset,
                                                     backend=backend))
        probs = ops.categorical_posterior_ref(process, logits.double(), xt, 40, 25).reshape(-1, V).cpu().numpy()
        C.check_draws_contract(out, probs, seed, offset, np.arange(out.numel()), name, near=1e-9)
        if process.kind == "absorbing":
            keep = xt != process.mask_id
            assert torch.equal(out[keep], xt[keep])


@pytest.mark.gpu
@pytest.mark.skipif(not C.GPU, reason="needs a CUDA device (GPT-2 vocabulary)")
@pytest.mark.parametrize("backend", C.backends("triton"))
def test_gpu_gpt2_vocabulary(backend):
    V = 50257
    logits = (torch.randn(256, V, generator=C.gen(2)) * 3).to("cuda", BF16)
    for process in (D.Absorbing(V, V - 1, S.mutual_info(1000)), D.Uniform(V, S.cosine(1000))):
        xt = torch.full((256,), V - 1, device="cuda") if process.kind == "absorbing" else \
            torch.randint(0, V, (256,), generator=C.gen(3)).to("cuda")
        ref = ops.categorical_posterior(process, logits, xt, 500, 400, backend="reference")
        assert_close(ops.categorical_posterior(process, logits, xt, 500, 400, backend=backend), ref, atol=1e-6)
        tok = ops.posterior_sample(process, logits, xt, 500, 400, seed=5, backend=backend)
        want = ops.posterior_sample(process, logits, xt, 500, 400, seed=5, backend="reference")
        C.check_draws_near(tok, want, ref.double(), R.row_uniforms(5, 0, 256), max_near=2)


# --------------------------------------------------------------------------------------------------------
# Fuzzing against the reference
# --------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(V=st.integers(2, 30), n=st.integers(1, 8), data=st.data(),
       kind=st.sampled_from(["absorbing", "absorbing-mid", "absorbing-spindle", "uniform", "gaussian-band"]),
       seed=st.integers(0, 2**64 - 1), temp=st.floats(0.1, 4.0))
def test_fuzz_float64_rows_cpp(V, n, data, kind, seed, temp):
    """float64 logits with -inf entries: probabilities to 1e-12, draws equal except at float64 near-ties."""
    if "cpp" not in C.HERE:
        pytest.skip("the C++ backend is not selected")
    process = C.processes(V, mid=True, band=2)[kind]
    t = data.draw(st.integers(1, T))
    s = data.draw(st.integers(0, t - 1))
    vals = data.draw(st.lists(st.one_of(st.floats(-20, 20), st.just(float("-inf"))), min_size=n * V, max_size=n * V))
    logits = torch.tensor(vals, dtype=F64).reshape(n, V)
    logits[:, data.draw(st.integers(0, V - 1))] = 0.0
    logits[:, (process.mask_id + 1) % V if kind.startswith("absorbing") else 0] = 1.0
    xt = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)))
    probs = ops.categorical_posterior(process, logits, xt, t, s, temp, backend="cpp")
    assert_close(probs, ops.categorical_posterior_ref(process, logits, xt, t, s, temp), atol=1e-12)
    got = ops.posterior_sample(process, logits, xt, t, s, seed=seed, temperature=temp, backend="cpp")
    want = ops.posterior_sample_ref(process, logits, xt, t, s, seed=seed, temperature=temp)
    for r in range(n):
        if got[r] != want[r]:  # only a float64 near-tie may differ
            assert O.margin(probs[r].numpy(), O.row_uniform(seed, 0, r)) < 1e-12


@settings(max_examples=12, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([F64, F32, BF16, F16]), seed=st.integers(0, 2**64 - 1),
       temperature=st.sampled_from([0.3, 1.0, 2.0]))
def test_fuzz_every_dtype_triton(data, dtype, seed, temperature):
    """Every dtype, -inf / ±0 / tied logits, any seed: probabilities within rounding, draws equal except
    within 1e-6 of a CDF boundary."""
    if "triton" not in C.HERE:
        pytest.skip("the Triton backend is not selected or not installed")
    dev = C.device("triton")
    V = data.draw(st.sampled_from([2, 3, 9, 140]))
    Tn = data.draw(st.sampled_from([3, 20]))
    mask = data.draw(st.integers(0, V - 1))
    kinds = ["absorbing", "spindle", "uniform"] + (["band"] if V <= 9 else [])
    kind = data.draw(st.sampled_from(kinds))
    process = {"absorbing": lambda: D.Absorbing(V, mask, S.mutual_info(Tn)),
               "spindle": lambda: D.Absorbing(V, mask, S.spindle(Tn, torch.linspace(0, 1, V))),
               "uniform": lambda: D.Uniform(V, S.cosine(Tn)),
               "band": lambda: D.GaussianBand(V, S.cosine(Tn), bandwidth=1)}[kind]()
    x = data.draw(C.logit_rows(max_rows=4, sizes=(V,)))
    if process.kind == "absorbing":
        x[:, (mask + 1) % V] = 0.5  # some x0 mass off the (ignored) mask column
    n = x.shape[0]
    xt = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)))
    if process.kind == "absorbing":
        xt[::2] = mask
    t = data.draw(st.integers(1, Tn))
    s = data.draw(st.integers(0, t - 1))
    x, xt = x.to(dev, dtype), xt.to(dev)
    probs = ops.categorical_posterior(process, x, xt, t, s, temperature, backend="triton")
    ref = ops.categorical_posterior(process, x, xt, t, s, temperature, backend="reference")
    assert_close(probs, ref, atol=1e-12 if dtype == F64 else 1e-6)
    kw = dict(seed=seed, offset=7, temperature=temperature)
    C.check_draws_near(ops.posterior_sample(process, x, xt, t, s, backend="triton", **kw),
                       ops.posterior_sample(process, x, xt, t, s, backend="reference", **kw),
                       ref.double(), R.row_uniforms(seed, 7, n))


# --------------------------------------------------------------------------------------------------------
# Edges: -inf tiles, large logits at small temperatures, unreachable x_t, out-of-range indices in a kernel
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", C.KERNELS)
def test_leading_tiles_of_minus_inf(backend):
    """Rows whose first row tiles (128 wide in the Triton interpreter) are all -inf: the online max and sums
    start from -inf without producing NaN."""
    dev = C.device(backend)
    logits = torch.full((3, 300), float("-inf"), device=dev)
    logits[:, 260:] = torch.randn(3, 40, generator=C.gen(8)).to(dev)
    logits[2, 299] = 50.0
    process = D.Uniform(300, S.cosine(T))
    xt = torch.tensor([0, 270, 299], device=dev)
    ref = ops.categorical_posterior(process, logits, xt, 20, 10, backend="reference")
    assert_close(ops.categorical_posterior(process, logits, xt, 20, 10, backend=backend), ref, atol=1e-6)
    C.check_draws_near(ops.posterior_sample(process, logits, xt, 20, 10, seed=3, backend=backend),
                       ops.posterior_sample(process, logits, xt, 20, 10, seed=3, backend="reference"),
                       ref.double(), R.row_uniforms(3, 0, 3))


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
@pytest.mark.parametrize("backend", C.KERNELS)
def test_large_logits_small_temperature_keep_fp32_precision(backend, kind):
    """Logits ~27 at temperature 0.3 (|x/T| ~ 90): the kernels shift by the max before scaling, so float32
    loses no more than PyTorch's float32 computation does (a hypothesis example once found 1.1e-6 error
    from scaling first). Checked against float64 with the baseline rule, and draws equal the reference's."""
    dev = C.device(backend)
    V = 140
    x = torch.zeros(3, V, dtype=F64)
    x[:, 40:90] = float("-inf")
    x[:, 13], x[:, 118] = 27.25, 27.0
    x[1, 7] = -30.0
    process = D.Absorbing(V, 0, S.mutual_info(3)) if kind == "absorbing" else D.Uniform(V, S.cosine(3))
    xt = torch.tensor([0, 5, 0])
    x32 = x.float().to(dev)
    truth = ops.categorical_posterior(process, x, xt, 1, 0, 0.3, backend="reference")
    base = ops.categorical_posterior(process, x32, xt.to(dev), 1, 0, 0.3, backend="reference")
    got = ops.categorical_posterior(process, x32, xt.to(dev), 1, 0, 0.3, backend=backend)
    assert_close(got, truth, atol=1e-7, baseline=base)
    want = ops.posterior_sample(process, x32, xt.to(dev), 1, 0, seed=3, temperature=0.3, backend="reference")
    assert torch.equal(ops.posterior_sample(process, x32, xt.to(dev), 1, 0, seed=3, temperature=0.3, backend=backend),
                       want)


def test_unreachable_x_t_keeps_x_t_instead_of_nan():
    """x_t that no x0 category can lead to (a band process, -inf logits; found by the fuzz harness): the
    reference, C++ and Triton returned NaN probabilities and drew V - 1 (CUDA kept x_t). Every backend now
    keeps x_t: one-hot probabilities, x_t drawn."""
    process = D.GaussianBand(5, S.cosine(10), bandwidth=2)
    x = torch.full((2, 5), float("-inf"))
    x[:, 3:] = torch.tensor([0.5684, -1.0845])
    xt = torch.tensor([0, 4])
    for be in C.HERE:
        probs = ops.categorical_posterior(process, x, xt, 1, backend=be)
        assert bool(torch.isfinite(probs).all()), be
        assert torch.equal(probs[0], torch.tensor([1.0, 0, 0, 0, 0])), be
        assert ops.posterior_sample(process, x, xt, 1, seed=3, backend=be)[0] == 0, be
    torch.testing.assert_close(ops.categorical_posterior(process, x, xt, 1, backend="cpp"),
                               ops.categorical_posterior(process, x, xt, 1, backend="reference"))
    process = D.GaussianBand(3, S.cosine(3), bandwidth=1)  # (found by hypothesis on Triton)
    logits = torch.tensor([[0.0, float("-inf"), float("-inf")]] * 2, dtype=F64)
    xt = torch.tensor([0, 2])
    want = ops.posterior_sample(process, logits, xt, 1, 0, seed=0, backend="reference")
    assert int(want[1]) == 2
    for be in C.HERE:
        assert torch.equal(ops.posterior_sample(process, logits, xt, 1, 0, seed=0, backend=be), want), be


@pytest.mark.parametrize("backend", C.backends("triton", "cuda"))
def test_kernels_mark_rows_with_out_of_range_indices(backend):
    """A direct call of the kernel (no public check) with x_t or a step outside its table must not read out of
    bounds: the row is marked (token -1, NaN probabilities), as the CUDA kernels do."""
    dev = C.device(backend)
    glue = importlib.import_module(f"fastdiff.ops.backends.{backend}.posterior")
    logits = torch.randn(3, 5).to(dev)
    cases = [
        (D.Uniform(5, S.cosine(20)), [0, 7, -1], [5, 5, 5], [4, 4, 4]),
        (D.Absorbing(5, 4, S.spindle(20, torch.linspace(0, 1, 5))), [4, 4, 4], [5, 99, 5], [4, 4, -3]),
    ]  # (matrix processes: the Python lowering indexes its tables with x_t first and raises IndexError)
    for process, xt, tt, ss in cases:
        xt, tt, ss = (torch.tensor(v, device=dev) for v in (xt, tt, ss))
        plan = posterior_plan(process, logits, xt, tt, ss, 1.0)
        tok = glue.posterior(*plan.args(sample=True))
        assert tok.tolist()[1:] == [-1, -1], (process, tok)
        assert 0 <= int(tok[0]) < 5
        probs = glue.posterior(*plan.args(sample=False))
        assert bool(torch.isnan(probs[1:]).all()) and bool(torch.isfinite(probs[0]).all())


# --------------------------------------------------------------------------------------------------------
# Value checks: the public op's, or the C++ kernel's own pass (CHECKS_VALUES), with the same message
# --------------------------------------------------------------------------------------------------------
def _posterior_ops():
    return (ops.categorical_posterior, lambda *a, **k: ops.posterior_sample(*a, seed=0, **k))


def _cpp_kernel_direct(process, logits, xt, t, s, sample, temperature=1.0):
    """The C++ glue's kernel entry on a lowered plan, bypassing every check of the public op."""
    glue = importlib.import_module("fastdiff.ops.backends.cpp.posterior")
    plan = posterior_plan(process, logits, xt, torch.as_tensor(t).expand(xt.shape), torch.as_tensor(s).expand(xt.shape),
                          temperature)
    return glue.posterior(*plan.args(sample=sample))


def test_masked_row_whose_only_finite_logit_is_the_mask_is_rejected():
    """A masked row whose only finite logit is the (ignored) mask logit has no x0 distribution: every backend
    raises the reference's InputError (the C++ kernel in its own pass; C++ and Triton kept x_t, so sampling
    could return all-[MASK] output silently). Unmasked rows are carried over and may look like that."""
    for process in (D.Absorbing(5, 4, S.cosine(20)), D.Absorbing(5, 4, S.spindle(20, torch.linspace(0, 1, 5)))):
        x = torch.randn(3, 5)
        x[1] = float("-inf")
        x[1, 4] = 0.0
        for xt in (torch.tensor([4, 4, 4]), torch.tensor([0, 4, 1])):
            for op in _posterior_ops():
                C.same_error(lambda be: op(process, x, xt, 5, backend=be), InputError,
                             "x0_logits: a masked row (x_t == mask_id)")
        carried = torch.tensor([0, 1, 2])  # the row is not masked: carried over, never evaluated
        onehot = torch.nn.functional.one_hot(carried, 5).float()
        for be in C.HERE:  # (the reference's categorical_posterior raised "x0_probs: contains NaN": fuzzing)
            assert torch.equal(ops.posterior_sample(process, x, carried, 5, seed=0, backend=be), carried)
            assert torch.equal(ops.categorical_posterior(process, x, carried, 5, backend=be), onehot), be
    if "cpp" in C.HERE:
        process = D.Absorbing(6, 5, S.cosine(T))
        logits = torch.full((2, 6), float("-inf"))
        logits[:, 5] = 0.0
        with pytest.raises(ValueError, match="x0_logits: a masked row"):  # the kernel's check, bypassing the op's
            _cpp_kernel_direct(process, logits, torch.tensor([5, 5]), 10, 3, sample=True)


@pytest.mark.parametrize("mask_id", [0, 3, 6])
def test_nan_in_the_mask_column_of_a_masked_row_is_rejected(mask_id):
    """The absorbing row pass skips the mask column; a NaN there was dropped by std::max (found by fuzzing)."""
    for process in (D.Absorbing(7, mask_id, S.cosine(20)),
                    D.Absorbing(7, mask_id, S.spindle(20, torch.linspace(0, 1, 7)))):
        for dtype in (F32, F64):
            x = torch.randn(3, 7, dtype=dtype)
            x[1, mask_id] = float("nan")
            xt = torch.full((3,), mask_id)
            for op in _posterior_ops():
                C.same_error(lambda be: op(process, x, xt, 5, backend=be), InputError, "x0_logits: contains NaN")


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN"), (float("inf"), r"\+inf"), (None, "-inf")])
def test_bad_values_rejected_by_the_op_and_by_the_kernel(bad, match):
    process = C.processes(7)["absorbing"]
    logits, xt, t, s = _rows_cpp(process, 5, seed=1, dtype=F32)
    xt[:] = 0  # no masked row: the kernel must still check every row
    if bad is None:
        logits[3] = float("-inf")
    else:
        logits[3, 2] = bad
    for op in _posterior_ops():
        for be in C.HERE:  # the C++ kernel checks in its pass; the others before the kernel
            with pytest.raises(ValueError, match="x0_logits.*" + match):
                op(process, logits, xt, t, s, backend=be)
    if "cpp" in C.HERE:  # the kernel's own check, bypassing the public one
        for sample in (True, False):
            with pytest.raises(ValueError, match="x0_logits.*" + match):
                _cpp_kernel_direct(process, logits, xt, t, s, sample)


@pytest.mark.parametrize("temp", [float("inf"), 1e300, 1e31, 1e-31, 1e-300, 5e-324, -1.0, float("nan"), -float("inf")])
def test_temperature_outside_the_documented_range_is_rejected(temp):
    x = torch.randn(3, 7)
    process = D.Absorbing(7, 6, S.cosine(20))
    xt = torch.tensor([6, 6, 0])
    C.same_error(lambda be: ops.posterior_sample(process, x, xt, 5, seed=1, temperature=temp, backend=be),
                 InputError, "temperature:")
    C.same_error(lambda be: ops.categorical_posterior(process, x, xt, 5, temperature=temp, backend=be),
                 InputError, "temperature:")


@pytest.mark.parametrize("temp", [1e-30, 1e30])
def test_temperature_range_endpoints_agree(temp):
    g = C.gen(0)
    x = torch.randn(6, 9, generator=g, dtype=F64)
    x[0, 3] = x[0, 5] = x[0].max() + 1  # a tie at the maximum
    process = D.Uniform(9, S.cosine(20))
    xt = torch.randint(0, 9, (6,), generator=g)
    want_p = ops.posterior_sample(process, x, xt, 5, seed=2, temperature=temp, backend="reference")
    probs = ops.categorical_posterior(process, x, xt, 5, temperature=temp, backend="reference")
    assert bool(torch.isfinite(probs).all())
    for be in C.HERE:
        assert torch.equal(ops.posterior_sample(process, x, xt, 5, seed=2, temperature=temp, backend=be), want_p), be
        torch.testing.assert_close(ops.categorical_posterior(process, x, xt, 5, temperature=temp, backend=be), probs,
                                   atol=1e-12, rtol=1e-9)


def test_float64_logits_over_temperature_overflow_is_rejected():
    x = torch.tensor([[1e300, 0.0, 1.0], [0.0, 1.0, 2.0]], dtype=F64)
    process = D.Uniform(3, S.cosine(20))
    C.same_error(lambda be: ops.categorical_posterior(process, x, torch.tensor([0, 1]), 5, temperature=1e-10,
                                                      backend=be), InputError, "temperature: too small")


# --------------------------------------------------------------------------------------------------------
# Bad arguments: rejected before any kernel runs, naming the argument
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["categorical_posterior", "posterior_sample"])
@pytest.mark.parametrize("backend", C.BACKENDS)
def test_bad_input_is_rejected_before_the_kernel(backend, op, monkeypatch):
    glue = None if backend == "reference" else importlib.import_module(f"fastdiff.ops.backends.{backend}.posterior")
    kernel = getattr(glue, "posterior", None)
    dev = C.device(backend)
    process = C.processes(5)["absorbing"]
    logits, xt = (a.to(dev) for a in C.logits_and_xt(process, (3,), seed=8))
    fn = getattr(ops, op)
    kw = {"seed": 0} if op == "posterior_sample" else {}
    cases = [
        (dict(x0_logits=logits[:, :4]), ValueError, "x0_logits"),
        (dict(x0_logits=logits[:2]), ValueError, "x0_logits"),
        (dict(x0_logits=torch.full_like(logits, float("nan"))), ValueError, "x0_logits"),
        (dict(x0_logits=logits.long()), TypeError, "x0_logits"),
        (dict(x_t=torch.tensor([0, 1, 5], device=dev)), ValueError, "x_t"),
        (dict(x_t=xt + 7), ValueError, "x_t"),
        (dict(x_t=xt.float()), TypeError, "x_t"),
        (dict(t=T + 1), ValueError, "t"),
        (dict(t=0), ValueError, "t"),
        (dict(t=5, s=5), ValueError, "s"),
        (dict(t=10, s=10), ValueError, "s"),
        (dict(t=torch.tensor([5, 6], device=dev)), ValueError, "t"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(process="absorbing"), TypeError, "process"),
        (dict(backend="cpu"), ValueError, "backend"),
    ]
    if op == "posterior_sample":
        cases += [(dict(seed=-3), ValueError, "seed"), (dict(offset=1.5), TypeError, "offset")]
    for change, err, match in cases:
        args = dict(process=process, x0_logits=logits, x_t=xt, t=10, s=None, backend=backend, **kw)
        args.update(change)
        if glue is not None:  # a kernel that checks the values itself (C++) runs on NaN logits, and raises
            values = "x0_logits" in change and bool(torch.isnan(change["x0_logits"]).any())
            monkeypatch.setattr(glue, "posterior", kernel if values and getattr(glue, "CHECKS_VALUES", False) else
                                lambda *a, **k: pytest.fail("the kernel ran on bad input"))
        with pytest.raises(err, match=match):
            fn(**args)
    with pytest.raises(ValueError, match="x0_logits"):
        fn(D.Absorbing(5, 4, S.cosine(T)), torch.zeros(3, 0, device=dev), xt, 10, backend=backend, **kw)


def test_device_mismatch_meta_and_empty_strides():
    process = C.processes(5)["uniform"]
    with pytest.raises(ValueError, match="device"):
        ops.posterior_sample(process, torch.zeros(3, 5, device="meta"), torch.zeros(3, dtype=torch.int64), 10, seed=0)
    logits = torch.randn(3, 5, device="meta")
    xt = torch.zeros(3, dtype=torch.int64, device="meta")
    C.same_error(lambda be: ops.categorical_posterior(process, logits, xt, 5, backend=be), InputError, "meta device")
    C.same_error(lambda be: ops.posterior_sample(process, logits, xt, 5, seed=0, backend=be), InputError, "meta device")
    e = torch.empty_strided((0, 5), (0, 0))
    absorbing = D.Absorbing(5, 4, S.cosine(20))
    x0 = torch.empty(0, dtype=torch.int64)
    for be in C.HERE:
        assert ops.posterior_sample(absorbing, e, x0, 5, seed=1, backend=be).shape == (0,)
        assert ops.categorical_posterior(absorbing, e, x0, 5, backend=be).shape == (0, 5)


def test_errors_name_the_public_arguments():
    process = D.Absorbing(5, 4, S.cosine(20))
    x, xt = torch.randn(3, 5), torch.tensor([4, 4, 0])
    cases = [
        (lambda be: ops.posterior_sample(process, x, xt.double(), 5, seed=0, backend=be), TypeError, "x_t:"),
        (lambda be: ops.posterior_sample(process, x, xt + 9, 5, seed=0, backend=be), ValueError, "x_t:"),
        (lambda be: ops.posterior_sample(process, x, xt, 5, 7, seed=0, backend=be), ValueError, "s:"),
        (lambda be: ops.posterior_sample(process, x, xt, 99, seed=0, backend=be), ValueError, "t:"),
        (lambda be: ops.posterior_sample(process, x, xt, 5, seed=2**64, backend=be), ValueError, "seed:"),
        (lambda be: ops.posterior_sample(process, x, xt, 5, seed=0, row_offset=2**64, backend=be), ValueError,
         "row_offset:"),
    ]
    from fastdiff.errors import InputTypeError
    for call, err, match in cases:
        C.same_error(call, InputTypeError if err is TypeError else InputError, match)


# --------------------------------------------------------------------------------------------------------
# As torch.library ops: opcheck (schema, fake kernel, autograd registration, AOT dispatch with dynamic shapes)
# on every backend, and the public op traced by torch.compile(fullgraph=True) with the same results
# --------------------------------------------------------------------------------------------------------
def _plan_args(process, V, sample, dev):
    g = C.gen(V)
    logits = torch.randn(2, 3, V, generator=g).to(dev)
    xt = torch.randint(0, V, (2, 3), generator=g).to(dev)
    if process.kind == "absorbing":
        xt[:, ::2] = process.mask_id
    t = torch.tensor([[9], [5]], device=dev).expand(2, 3)
    s = torch.tensor([[4], [0]], device=dev).expand(2, 3)
    return posterior_plan(process, logits, xt, t, s, 0.9).args(sample, seed=2**64 - 7, offset=2**33 + 1, row_offset=11)


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("backend", C.KERNELS)
def test_opcheck_posterior(backend, sample):
    """Every kind code (absorbing, absorbing per-token, uniform, matrix), seeds past 2**63 (int64 bits)."""
    V, steps = 7, 10
    for process in (D.Absorbing(V, V - 1, S.mutual_info(steps)),
                    D.Absorbing(V, 0, S.spindle(steps, torch.linspace(0, 1, V))), D.Uniform(V, S.cosine(steps)), D.GaussianBand(V, S.cosine(steps), bandwidth=2)):
        torch.library.opcheck(C.op(backend, "posterior"), _plan_args(process, V, sample, C.device(backend)))


@pytest.mark.parametrize("backend", C.KERNELS)
def test_torch_compile_traces_without_a_graph_break(backend):
    """Both posterior ops, an absorbing and a uniform process, a seed past 2**63 and a row offset."""
    dev = C.device(backend)
    g = C.gen(3)
    logits = torch.randn(4, 9, generator=g).to(dev)
    xt = torch.randint(0, 9, (4,), generator=g).to(dev)
    uniform, absorbing = D.Uniform(9, S.cosine(10)), D.Absorbing(9, 8, S.mutual_info(10))

    def fn(logits, xt):
        return (ops.categorical_posterior(uniform, logits, xt, 6, 2, backend=backend),
                ops.posterior_sample(absorbing, logits, xt, 6, 2, seed=2**64 - 1, row_offset=5, backend=backend),
                ops.posterior_sample(uniform, logits, xt, 6, 2, seed=3, offset=1, backend=backend))

    for got, want in zip(torch.compile(fn, backend="aot_eager", fullgraph=True)(logits, xt), fn(logits, xt)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# A process kind the kernels cannot lower (a user's own closed form)
# --------------------------------------------------------------------------------------------------------
class _OwnKind(D.Uniform):
    """A user's process: Uniform's maths under a kind no kernel knows."""

    kind = "own_closed_form"


def _own_kind_case():
    proc = _OwnKind(11, S.cosine(T))
    g = torch.Generator().manual_seed(3)
    return proc, torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)


@pytest.mark.parametrize("op", ["posterior_sample", "categorical_posterior"])
def test_auto_runs_a_process_the_kernels_cannot_lower_on_the_reference(op):
    proc, logits, xt = _own_kind_case()
    kw = {"seed": 5} if op == "posterior_sample" else {}
    got = getattr(ops, op)(proc, logits, xt, T // 2, T // 3, backend="auto", **kw)
    want = getattr(ops, op)(proc, logits, xt, T // 2, T // 3, backend="reference", **kw)
    assert torch.equal(got, want)  # auto ran the reference itself


@pytest.mark.parametrize("op", ["posterior_sample", "categorical_posterior"])
@pytest.mark.parametrize("backend", C.KERNELS)
def test_a_kernel_backend_asked_for_a_process_it_cannot_lower_says_so(backend, op):
    proc, logits, xt = _own_kind_case()
    kw = {"seed": 5} if op == "posterior_sample" else {}
    with pytest.raises(TypeError, match=f"the {backend} backend has no kernel lowering for processes of kind "
                                        "'own_closed_form'"):
        getattr(ops, op)(proc, logits, xt, T // 2, T // 3, backend=backend, **kw)


def test_the_sampler_runs_a_process_the_kernels_cannot_lower():
    from fastdiff import sampling

    proc = _OwnKind(9, S.cosine(T))

    def model(x, t):
        return torch.zeros(*x.shape, 9)

    out = sampling.sample(model, proc, shape=(2, 5), steps=4, seed=0)
    ref = sampling.sample(model, proc, shape=(2, 5), steps=4, seed=0, backend="reference")
    assert torch.equal(out.tokens, ref.tokens)
