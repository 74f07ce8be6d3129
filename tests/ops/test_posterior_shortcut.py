"""The mask shortcut of posterior_sample (issue 16) on every backend: a masked absorbing row with a scalar schedule
whose mask is the first or last category, and whose uniform falls in the mask's closed-form share of the
index-order CDF, stays the mask without an exp pass over its logits. The tests compute, independently in float64
(numpy, the Philox oracle of tests/_oracles.py), which rows take the shortcut, assert that both kinds of row occur,
and compare every backend's tokens with the reference's; the value check must still reject a shortcut row's NaN,
+inf or missing x0 distribution with the reference's message.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from fastdiff import discrete as D
from fastdiff import ops
from fastdiff import random as R
from fastdiff import schedules as S
from fastdiff.errors import InputError
from fastdiff.ops._plan import int64_bits, posterior_plan
from tests import _oracles as O
from tests.ops import _cases as C
from tests.ops import _triton_compile as _tc

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
STEPS = 20


def _process(V: int, mask_at: str, schedule: str = "cosine") -> D.Absorbing:
    sched = S.cosine(STEPS) if schedule == "cosine" else S.mutual_info(STEPS)
    return D.Absorbing(V, 0 if mask_at == "first" else V - 1, sched)


def _inputs(process: D.Absorbing, n: int, seed: int, dtype: torch.dtype):
    """n rows, 80 % masked, each with its own step t in [1, STEPS] and s in {t - 1, t // 2}; column 1 at -inf
    when V > 3 (a zero-weight category on the non-shortcut path)."""
    g = C.gen(seed)
    V = process.vocab_size
    logits = (torch.randn(n, V, generator=g) * 2).to(dtype)
    if V > 3:
        logits[:, 1] = float("-inf")
    xt = torch.randint(0, V, (n,), generator=g)
    xt = torch.where(torch.rand(n, generator=g) < 0.8, torch.full_like(xt, process.mask_id), xt)
    t = torch.randint(1, STEPS + 1, (n,), generator=g)
    s = torch.where(torch.arange(n) % 2 == 0, t - 1, t // 2)
    return logits, xt, t, s


def _shortcut_rows(process: D.Absorbing, xt: torch.Tensor, t: torch.Tensor, s: torch.Tensor, seed: int,
                   offset: int) -> np.ndarray:
    """Which rows take the shortcut, in float64 from the definition: the mask's share of the CDF is
    ``[a_s - a_t, 1 - a_t)`` (mask last) or ``[0, 1 - a_s)`` (mask first); the row's draw point is
    ``u · (1 - a_t)`` with u the Philox oracle's uniform."""
    ab = process.schedule.alpha_bar.double().numpy()
    out = np.zeros(xt.numel(), dtype=bool)
    last = process.mask_id == process.vocab_size - 1
    for r in range(xt.numel()):
        if int(xt[r]) != process.mask_id:
            continue
        a_t, a_s = float(ab[int(t[r])]), float(ab[int(s[r])])
        target = O.row_uniform(seed, offset, r) * (1.0 - a_t)
        out[r] = target >= a_s - a_t if last else target < 1.0 - a_s
    return out


def _check_against_reference(backend: str, process: D.Absorbing, logits: torch.Tensor, xt: torch.Tensor,
                             t: torch.Tensor, s: torch.Tensor, seed: int, offset: int, temperature: float,
                             max_near: int = 1) -> None:
    dev = C.device(backend)
    got = ops.posterior_sample(process, logits.to(dev), xt.to(dev), t.to(dev), s.to(dev), seed=seed, offset=offset,
                               temperature=temperature, backend=backend).cpu()
    want = ops.posterior_sample_ref(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temperature)
    short = _shortcut_rows(process, xt, t, s, seed, offset)
    masked = (xt == process.mask_id).numpy()
    assert short.any() and (masked & ~short).any(), "the case must hold shortcut and evaluated masked rows"
    sh = torch.from_numpy(short)
    # shortcut rows: the mask, exactly (the decision is the reference's float64 arithmetic), on both sides
    assert torch.equal(want[sh], xt[sh]) and torch.equal(got[sh], xt[sh])
    keep = xt != process.mask_id
    assert torch.equal(got[keep], xt[keep])
    # the evaluated rows: the reference's tokens except within 1e-6 of a CDF boundary
    w = ops.categorical_posterior_ref(process, logits.double(), xt, t, s, temperature)
    C.check_draws_near(got, want, w, R.row_uniforms(seed, offset, torch.arange(xt.numel())), max_near=max_near)
    # and they are drawn from the posterior: some leave the mask (the weight off the mask is positive)
    assert bool((got[~sh & ~keep] != process.mask_id).any())


@pytest.mark.parametrize("mask_at", ["first", "last"])
@pytest.mark.parametrize("backend,V,dtype", C.cases({"reference": [(7, F32)],
                                                     "cpp": [(7, F32), (300, BF16), (3001, F32)],
                                                     "triton": [(7, F32), (7, F64), (300, F16), (300, BF16),
                                                                (300, F32), (130, F64)]}))
def test_shortcut_and_evaluated_rows_equal_the_reference(backend, V, dtype, mask_at):
    process = _process(V, mask_at)
    n = 24 if backend == "triton" else 64
    logits, xt, t, s = _inputs(process, n, seed=V + (mask_at == "last"), dtype=dtype)
    _check_against_reference(backend, process, logits, xt, t, s, seed=2**64 - 1 - V, offset=2**33 + 5,
                             temperature=0.9)


@pytest.mark.parametrize("backend", C.backends("cpp", "triton"))
def test_shortcut_with_a_row_offset_and_a_second_schedule(backend):
    """The shortcut's uniform is the row's global counter (row_offset + r): a slice drawn alone equals the
    same rows of the whole batch; mutual-information schedule, mask last."""
    dev = C.device(backend)
    process = _process(9, "last", "mutual_info")
    logits, xt, t, s = _inputs(process, 16, seed=4, dtype=F32)
    full = ops.posterior_sample(process, logits.to(dev), xt.to(dev), t.to(dev), s.to(dev), seed=3, backend=backend)
    part = ops.posterior_sample(process, logits[5:].to(dev), xt[5:].to(dev), t[5:].to(dev), s[5:].to(dev), seed=3,
                                row_offset=5, backend=backend)
    assert torch.equal(full[5:], part)
    _check_against_reference(backend, process, logits, xt, t, s, seed=3, offset=0, temperature=1.0)


def _shortcut_case(V: int, mask_at: str, dtype: torch.dtype, seed: int = 8):
    """A case with at least one shortcut row: (process, logits, xt, t, s, index of a shortcut row)."""
    process = _process(V, mask_at)
    logits, xt, t, s = _inputs(process, 12, seed=seed, dtype=dtype)
    xt[:] = process.mask_id
    short = _shortcut_rows(process, xt, t, s, seed=0, offset=0)
    assert short.any() and not short.all()
    return process, logits, xt, t, s, int(np.nonzero(short)[0][0])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("mask_at", ["first", "last"])
@pytest.mark.parametrize("bad,match", [(float("nan"), "contains NaN"), (float("inf"), "contains +inf"),
                                       ("row", "a row has every logit at -inf"),
                                       ("mask-only", "a masked row (x_t == mask_id)"), ("nan-mask", "contains NaN")])
def test_a_shortcut_row_is_still_value_checked(bad, match, mask_at, dtype):
    """A bad value in a row that stays masked (its draw decided without its logits) raises the reference's
    InputError on every backend (the C++ kernel in its own pass, the others in the public op), in the same
    order (NaN before +inf before rows of -inf)."""
    V = 7
    process, logits, xt, t, s, r = _shortcut_case(V, mask_at, dtype)
    other = 3  # a column that is not the mask, whichever end the mask is at
    if bad == "row":
        logits[r] = float("-inf")
    elif bad == "mask-only":
        logits[r] = float("-inf")
        logits[r, process.mask_id] = 0.5
    elif bad == "nan-mask":
        logits[r, process.mask_id] = float("nan")
    else:
        logits[r, other] = bad
    before = logits.clone()
    C.same_error(lambda be: ops.posterior_sample(process, logits, xt, t, s, seed=0, backend=be), InputError,
                 f"x0_logits: {match}")
    assert torch.equal(logits.isnan(), before.isnan()) and torch.equal(logits.nan_to_num(), before.nan_to_num())
    if bad == "inf":  # +inf in one row, NaN in a later one: NaN is reported first, as the reference checks
        logits[-1, other] = float("nan")
        C.same_error(lambda be: ops.posterior_sample(process, logits, xt, t, s, seed=0, backend=be), InputError,
                     "x0_logits: contains NaN")


@pytest.mark.parametrize("mask_at", ["first", "last"])
def test_cpp_kernel_checks_a_shortcut_row_itself(mask_at):
    """The C++ kernel's own pass (the public op skips its check for it) on a shortcut row: a direct call on the
    lowered plan, bypassing the op, raises the same error."""
    if "cpp" not in C.HERE:
        pytest.skip("the C++ backend is not selected")
    glue = importlib.import_module("fastdiff.ops.backends.cpp.posterior")
    process, logits, xt, t, s, r = _shortcut_case(7, mask_at, F32)
    logits[r, 3] = float("nan")
    plan = posterior_plan(process, logits, xt, t, s, 1.0)
    with pytest.raises(ValueError, match="x0_logits: contains NaN"):
        glue.posterior(*plan.args(sample=True))


@pytest.mark.parametrize("backend", C.backends("cpp", "triton", "cuda"))
def test_one_category_rows_in_the_kernel(backend):
    """V = 1 (the public processes need two categories; the kernel ABI allows one): the only category is the
    mask, at both ends. A direct kernel call on such rows, shortcut or not, must not read past the row: Triton
    and CUDA keep the mask (no x0 weight), the C++ kernel's own value check rejects the masked rows as the
    public op would (no finite logit off the mask)."""
    dev = C.device(backend)
    glue = importlib.import_module(f"fastdiff.ops.backends.{backend}.posterior")
    n = 16
    ab = S.cosine(STEPS).alpha_bar.double()
    t = torch.arange(1, n + 1)
    s = t - 1
    xt = torch.zeros(n, dtype=torch.int64)
    a_t, a_s = ab[t].contiguous(), ab[s].contiguous()
    short = np.array([O.row_uniform(4, 0, r) * (1.0 - float(a_t[r])) >= float(a_s[r] - a_t[r]) for r in range(n)])
    assert short.any() and not short.all()
    args = (torch.zeros(n, 1, device=dev), xt.to(dev), t.to(dev), s.to(dev), 0, 0, 1.0, a_t.to(dev), a_s.to(dev),
            None, None, None, None, True, 4, 0, 0)
    if backend == "cpp":
        with pytest.raises(ValueError, match="x0_logits: a masked row"):
            glue.posterior(*args)
    else:
        assert torch.equal(glue.posterior(*args).cpu(), xt)


@pytest.mark.parametrize("backend", C.backends("cpp", "triton", "cuda"))
def test_kernel_rows_without_x0_weight_stay_masked(backend):
    """Direct kernel calls on a lowered plan (the public op requires s < t): s = t (a_s = a_t, the mask's share
    is the whole row) and t = s = 0 (a_t = 1, no weight at all: x_t kept) stay the mask, at either end."""
    dev = C.device(backend)
    glue = importlib.import_module(f"fastdiff.ops.backends.{backend}.posterior")
    for mask_at in ("first", "last"):
        process = _process(5, mask_at)
        logits = torch.randn(5, 5, device=dev)
        xt = torch.full((5,), process.mask_id, device=dev)
        t = torch.tensor([0, 3, 7, 12, 20], device=dev)
        plan = posterior_plan(process, logits, xt, t, t, 1.0)
        for seed in (1, 2, 3):
            assert torch.equal(glue.posterior(*plan.args(sample=True, seed=seed)), xt), (mask_at, seed)


# --------------------------------------------------------------------------------------------------------
# CUDA (needs a GPU; skipped here): the same contract, wide rows, and the counters entry of CUDA graphs
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_at", ["first", "last"])
@pytest.mark.parametrize("backend,V,dtype", C.cases({"cuda": [(7, F32), (300, BF16), (300, F64), (5003, F16),
                                                              (50257, F32)]}))
def test_cuda_shortcut_and_evaluated_rows_equal_the_reference(backend, V, dtype, mask_at):
    process = _process(V, mask_at)
    logits, xt, t, s = _inputs(process, 96, seed=V, dtype=dtype)
    _check_against_reference(backend, process, logits, xt, t, s, seed=77 + V, offset=9, temperature=0.9,
                             max_near=2)


@pytest.mark.parametrize("mask_at", ["first", "last"])
@pytest.mark.parametrize("backend", C.backends("cuda"))
def test_cuda_counters_entry_takes_the_same_shortcut(backend, mask_at):
    """posterior_counters (the CUDA graph form, counters read on the device) draws what posterior draws with
    the same (seed, offset, row_offset), shortcut rows included."""
    glue = importlib.import_module("fastdiff.ops.backends.cuda.posterior")
    process = _process(301, mask_at)
    logits, xt, t, s = (a.cuda() for a in _inputs(process, 64, seed=5, dtype=F32))
    plan = posterior_plan(process, logits, xt, t, s, 1.0)
    seed, offset, row0 = 2**64 - 3, 2**40 + 1, 7
    want = glue.posterior(*plan.args(sample=True, seed=seed, offset=offset, row_offset=row0))
    counters = torch.tensor([int64_bits(seed), int64_bits(offset), int64_bits(row0)], device="cuda")
    got = glue.posterior_counters(*plan.args(sample=True)[:13], counters)
    assert torch.equal(got, want)
    ref = ops.posterior_sample_ref(process, logits.cpu(), xt.cpu(), t.cpu(), s.cpu(), seed=seed, offset=offset,
                                   row_offset=row0)
    u = R.row_uniforms(seed, offset, torch.arange(64), start=row0)
    w = ops.categorical_posterior_ref(process, logits.cpu().double(), xt.cpu(), t.cpu(), s.cpu())
    C.check_draws_near(got, ref, w, u, max_near=1)


@pytest.mark.parametrize("backend", C.backends("cuda"))
def test_cuda_shortcut_rows_are_value_checked(backend):
    """On CUDA the public op checks the values before the kernel: a NaN in a shortcut row still raises."""
    process, logits, xt, t, s, r = _shortcut_case(7, "last", F32)
    logits[r, 3] = float("nan")
    with pytest.raises(InputError, match="x0_logits: contains NaN"):
        ops.posterior_sample(process, logits.cuda(), xt.cuda(), t.cuda(), s.cuda(), seed=0, backend=backend)


@pytest.mark.skipif(not C.HAVE_TRITON or not _tc.ptxas_available(), reason="needs Triton with its NVIDIA backend")
def test_triton_posterior_kernel_compiles_for_a_gpu():
    """The interpreter never compiles the kernel: the sampling configurations with the shortcut (absorbing,
    float32 and float64 logits) and the others compile for sm_90 (Triton's whole pipeline and ptxas, no GPU
    needed) without register spills."""
    from fastdiff.kernels.posterior import _posterior_fwd_kernel as kernel

    types = {n: "*fp64" for n in kernel.arg_names if n.endswith("_ptr")}
    types.update(logits_ptr="*fp32", xt_ptr="*i64", t_ptr="*i64", s_ptr="*i64", pair_ptr="*i64", probs_ptr="*fp32",
                 tok_ptr="*i64", stride_l="i64", V="i32", n_tab="i32", mask_id="i32", temperature_bits="i64",
                 seed_lo="i32", seed_hi="i32", off_lo="i32", off_hi="i32", row_lo="i32", row_hi="i32")
    configs = []
    for kind, f64 in ((0, False), (0, True), (1, False), (2, False)):
        consts = dict(KIND=kind, SAMPLE=True, WDT="tl.float64" if f64 else "tl.float32", BLOCK=4096, BLOCK_I=32)
        configs.append((dict(types, logits_ptr="*fp64" if f64 else "*fp32"), consts, 8))
    for (_, consts, _), res in zip(configs, _tc.compile_sm90("posterior", "_posterior_fwd_kernel", configs)):
        assert res["error"] is None and res["spill"] == 0, (consts, res)
