"""Edge inputs of the ops found by an outside fuzzing pass: every backend (reference, cpp, triton) must accept
and reject the same inputs with the same error, read indices in int64 as the kernels do, never crash, and
agree on the numerics at the edges (huge / tiny magnitudes, exact ties, empty and degenerate tensors).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import _backends, ops
from fastdiff import discrete as D
from fastdiff import schedules as S
from fastdiff.errors import InputError, InputTypeError
from tests._triton import triton_backend

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["reference", "cpp"] + (["triton"] if HAVE_TRITON else [])
T = 20


@pytest.fixture(scope="module", autouse=True)
def _triton():
    if HAVE_TRITON:
        yield from triton_backend()
    else:
        yield None


def _outcome(call):
    """``("ok", value)`` or ``(exception type, message)``."""
    try:
        return "ok", call()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)


def _same_error(call, err, match):
    """``call(backend)`` raises ``err`` with the same message on every backend; that message matches."""
    seen = {be: _outcome(lambda: call(be)) for be in BACKENDS}
    kinds = {be: o[0] for be, o in seen.items()}
    assert all(k is err for k in kinds.values()), seen
    msgs = {o[1] for o in seen.values()}
    assert len(msgs) == 1, seen
    assert match in msgs.pop()


def _in_child(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a crash there fails the test instead of killing pytest)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------------
# 1. indices in int64, exactly as the kernels read them
# ------------------------------------------------------------------------------------------------------
def test_rounding_loss_wrapping_ignore_index_is_rejected_not_a_segfault():
    """int32 target -2**31 with ignore_index=2**31: the check compared in int32 (where 2**31 wraps to
    -2**31, "ignored"), the C++ kernel in int64 and wrote out of bounds (exit 139)."""
    res = _in_child(
        "import torch\n"
        "from fastdiff import ops\n"
        "from fastdiff.errors import InputError\n"
        "for be in ('reference', 'cpp'):\n"
        "    try:\n"
        "        t = torch.tensor([-2**31, 3], dtype=torch.int32)\n"
        "        ops.rounding_loss(torch.randn(2, 8), torch.randn(100, 8), t, ignore_index=2**31, backend=be)\n"
        "    except InputError as e:\n"
        "        print(be, 'InputError', str(e).split(':')[0])\n")
    assert res.returncode == 0, f"crashed (rc {res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.split("\n")[:2] == ["reference InputError target", "cpp InputError target"], res.stdout


def test_rounding_loss_narrow_targets_are_checked_in_int64():
    x, w = torch.randn(2, 8), torch.randn(100, 8)
    # uint8 156 with V = 100: -100 wraps to 156 in uint8, so the check let it through as "ignored"
    _same_error(lambda be: ops.rounding_loss(x, w, torch.tensor([156, 3], dtype=torch.uint8), backend=be),
                InputError, "target: token ids must lie in [0, 100)")
    # valid narrow targets are accepted: uint8 255 with V = 256 (256 wrapped to 0 in the old check)
    w256 = torch.randn(256, 8, dtype=torch.float64)
    x64 = x.double()
    t8 = torch.tensor([255, 3], dtype=torch.uint8)
    want = ops.rounding_loss(x64, w256, t8.long(), backend="reference")
    for be in BACKENDS:
        got = ops.rounding_loss(x64, w256, t8, backend=be)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for dt in (torch.int8, torch.int16, torch.int32):  # -100 fits: ignored in every dtype
        t = torch.tensor([-100, 3], dtype=dt)
        got = {be: float(ops.rounding_loss(x64, w256, t, reduction="sum", backend=be)) for be in BACKENDS}
        assert max(got.values()) - min(got.values()) < 1e-10, got


def test_cpp_rounding_loss_kernel_checks_targets_itself():
    """A direct call (no public check) raises instead of indexing outside the row."""
    from fastdiff import _cpp
    for tgt in ([-2**31, 3], [100, 0], [-1, 0]):
        with pytest.raises(ValueError, match="rounding_loss: target"):
            _cpp.rounding_loss(torch.randn(2, 8), torch.randn(100, 8), torch.tensor(tgt), None, "mean", 2**31)


@pytest.mark.skipif(not HAVE_TRITON, reason="optional backend: triton is not installed")
def test_triton_posterior_kernels_mark_rows_with_out_of_range_indices():
    """A direct call (no public check) with x_t or a step outside its table must not read out of bounds:
    the row is marked (token -1, NaN probabilities), as the CUDA kernels do."""
    import importlib
    kp = importlib.import_module("fastdiff.kernels.posterior")
    logits = torch.randn(3, 5)
    cases = [
        (D.Uniform(5, S.cosine(T)), torch.tensor([0, 7, -1]), torch.tensor([5, 5, 5]), torch.tensor([4, 4, 4])),
        (D.Absorbing(5, 4, S.spindle(T, torch.linspace(0, 1, 5))), torch.tensor([4, 4, 4]),
         torch.tensor([5, 99, 5]), torch.tensor([4, 4, -3])),
    ]  # (matrix processes: the Python lowering indexes its tables with x_t first and raises IndexError)
    for process, xt, tt, ss in cases:
        tok = kp.posterior_sample(process, logits, xt, tt, ss, seed=0)
        assert tok.tolist()[1:] == [-1, -1], (process, tok)
        assert 0 <= int(tok[0]) < 5
        probs = kp.categorical_posterior(process, logits, xt, tt, ss)
        assert bool(torch.isnan(probs[1:]).all()) and bool(torch.isfinite(probs[0]).all())


@pytest.mark.parametrize("bad,err,match", [
    (2**70, InputError, "ignore_index: must fit in int64"),
    (None, InputTypeError, "ignore_index: expected an int, got NoneType"),
    ("0", InputTypeError, "ignore_index: expected an int, got str"),
    (2.5, InputTypeError, "ignore_index: expected an int, got float"),
    (True, InputTypeError, "ignore_index: expected an int, got bool"),
])
def test_rounding_loss_ignore_index_type_and_range(bad, err, match):
    x, w, t = torch.randn(2, 8), torch.randn(10, 8), torch.tensor([1, 3])
    _same_error(lambda be: ops.rounding_loss(x, w, t, ignore_index=bad, backend=be), err, match)


def test_top_k_beyond_int64_is_no_filter():
    x = torch.randn(5, 7, dtype=torch.float64)
    want = ops.sample_categorical(x, seed=3, backend="reference")
    for k in (7, 8, 2**63, 2**80):
        for be in BACKENDS:
            assert torch.equal(ops.sample_categorical(x, seed=3, top_k=k, backend=be), want), (k, be)


def test_seed_tensors_must_hold_an_integer():
    """A float or bool one-element tensor was truncated to an int (1.5 drew with seed 1)."""
    x = torch.randn(3, 5)
    for bad in (torch.tensor(1.5), torch.tensor(True), torch.tensor([2.0])):
        _same_error(lambda be: ops.sample_categorical(x, seed=bad, backend=be), InputTypeError, "seed:")
    want = ops.sample_categorical(x, seed=3, backend="reference")
    for seed in (torch.tensor(3), torch.tensor([3], dtype=torch.uint8)):
        for be in BACKENDS:
            assert torch.equal(ops.sample_categorical(x, seed=seed, backend=be), want), be


# ------------------------------------------------------------------------------------------------------
# 2. the same decision for bad values on every backend
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temp", [float("inf"), 1e300, 1e31, 1e-31, 1e-300, 5e-324, -1.0, float("nan"), -float("inf")])
def test_temperature_outside_the_documented_range_is_rejected(temp):
    x = torch.randn(3, 7)
    process = D.Absorbing(7, 6, S.cosine(T))
    xt = torch.tensor([6, 6, 0])
    match = "temperature:"
    _same_error(lambda be: ops.sample_categorical(x, seed=1, temperature=temp, backend=be), InputError, match)
    _same_error(lambda be: ops.posterior_sample(process, x, xt, 5, seed=1, temperature=temp, backend=be),
                InputError, match)
    _same_error(lambda be: ops.categorical_posterior(process, x, xt, 5, temperature=temp, backend=be),
                InputError, match)


@pytest.mark.parametrize("temp", [1e-30, 1e30])
def test_temperature_range_endpoints_agree(temp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    x[0, 3] = x[0, 5] = x[0].max() + 1  # a tie at the maximum: tiny T draws one of the two
    process = D.Uniform(9, S.cosine(T))
    xt = torch.randint(0, 9, (6,), generator=g)
    want = ops.sample_categorical(x, seed=2, temperature=temp, backend="reference")
    want_p = ops.posterior_sample(process, x, xt, 5, seed=2, temperature=temp, backend="reference")
    probs = ops.categorical_posterior(process, x, xt, 5, temperature=temp, backend="reference")
    assert bool(torch.isfinite(probs).all())
    if temp < 1:
        assert int(want[0]) in (3, 5)
    for be in BACKENDS:
        assert torch.equal(ops.sample_categorical(x, seed=2, temperature=temp, backend=be), want), be
        assert torch.equal(ops.posterior_sample(process, x, xt, 5, seed=2, temperature=temp, backend=be), want_p), be
        torch.testing.assert_close(ops.categorical_posterior(process, x, xt, 5, temperature=temp, backend=be), probs,
                                   atol=1e-12, rtol=1e-9)


def test_float64_logits_over_temperature_overflow_is_rejected():
    x = torch.tensor([[1e300, 0.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    _same_error(lambda be: ops.sample_categorical(x, seed=1, temperature=1e-10, backend=be), InputError,
                "temperature: too small for these logits")
    process = D.Uniform(3, S.cosine(T))
    _same_error(lambda be: ops.categorical_posterior(process, x, torch.tensor([0, 1]), 5, temperature=1e-10,
                                                     backend=be), InputError, "temperature: too small")
    for be in BACKENDS:  # the same logits at temperature 1: fine
        ops.sample_categorical(x, seed=1, backend=be)
    # NaN is reported first, whatever the temperature (the order of the checks is the same everywhere)
    x[1, 0] = float("nan")
    _same_error(lambda be: ops.sample_categorical(x, seed=1, temperature=1e-10, backend=be), InputError,
                "logits: contains NaN")


@pytest.mark.parametrize("mask_id", [0, 3, 6])
def test_nan_in_the_mask_column_of_a_masked_row_is_rejected(mask_id):
    for process in (D.Absorbing(7, mask_id, S.cosine(T)),
                    D.Absorbing(7, mask_id, S.spindle(T, torch.linspace(0, 1, 7)))):
        x = torch.randn(3, 7)
        x[1, mask_id] = float("nan")
        xt = torch.full((3,), mask_id)
        _same_error(lambda be: ops.posterior_sample(process, x, xt, 5, seed=0, backend=be), InputError,
                    "x0_logits: contains NaN")
        _same_error(lambda be: ops.categorical_posterior(process, x, xt, 5, backend=be), InputError,
                    "x0_logits: contains NaN")


def test_masked_row_whose_only_finite_logit_is_the_mask_is_rejected():
    """``sample()`` could return all-[MASK] output without a word: C++ and Triton kept x_t."""
    for process in (D.Absorbing(5, 4, S.cosine(T)), D.Absorbing(5, 4, S.spindle(T, torch.linspace(0, 1, 5)))):
        x = torch.randn(3, 5)
        x[1] = float("-inf")
        x[1, 4] = 0.0
        for xt in (torch.tensor([4, 4, 4]), torch.tensor([0, 4, 1])):
            _same_error(lambda be: ops.posterior_sample(process, x, xt, 5, seed=0, backend=be), InputError,
                        "x0_logits: a masked row (x_t == mask_id)")
            _same_error(lambda be: ops.categorical_posterior(process, x, xt, 5, backend=be), InputError,
                        "x0_logits: a masked row (x_t == mask_id)")
        carried = torch.tensor([0, 1, 2])  # the row is not masked: carried over, never evaluated
        onehot = torch.nn.functional.one_hot(carried, 5).float()
        for be in BACKENDS:  # (the reference's categorical_posterior raised "x0_probs: contains NaN": fuzzing)
            assert torch.equal(ops.posterior_sample(process, x, carried, 5, seed=0, backend=be), carried)
            assert torch.equal(ops.categorical_posterior(process, x, carried, 5, backend=be), onehot), be


def test_unreachable_x_t_keeps_x_t_instead_of_nan():
    """x_t that no x0 category can lead to (a band process, -inf logits; found by the fuzz harness): the
    reference, C++ and Triton returned NaN probabilities and drew V - 1 (CUDA kept x_t). Every backend now
    keeps x_t: one-hot probabilities, x_t drawn."""
    process = D.GaussianBand(5, S.cosine(10), bandwidth=2)
    x = torch.full((2, 5), float("-inf"))
    x[:, 3:] = torch.tensor([0.5684, -1.0845])
    xt = torch.tensor([0, 4])
    for be in BACKENDS:
        probs = ops.categorical_posterior(process, x, xt, 1, backend=be)
        assert bool(torch.isfinite(probs).all()), be
        assert torch.equal(probs[0], torch.tensor([1.0, 0, 0, 0, 0])), be
        assert ops.posterior_sample(process, x, xt, 1, seed=3, backend=be)[0] == 0, be
    torch.testing.assert_close(ops.categorical_posterior(process, x, xt, 1, backend="cpp"),
                               ops.categorical_posterior(process, x, xt, 1, backend="reference"))


# ------------------------------------------------------------------------------------------------------
# 3. meta / empty / degenerate tensors, bias values, the all-ignored mean
# ------------------------------------------------------------------------------------------------------
def _op_calls(dev: str):
    x, w = torch.randn(3, 4, device=dev), torch.randn(6, 4, device=dev)
    process = D.Uniform(5, S.cosine(T))
    logits = torch.randn(3, 5, device=dev)
    xt = torch.zeros(3, dtype=torch.int64, device=dev)
    return {
        "nearest_embedding": lambda be: ops.nearest_embedding(x, w, backend=be),
        "rounding_loss": lambda be: ops.rounding_loss(x, w, torch.zeros(3, dtype=torch.int64, device=dev), backend=be),
        "categorical_posterior": lambda be: ops.categorical_posterior(process, logits, xt, 5, backend=be),
        "posterior_sample": lambda be: ops.posterior_sample(process, logits, xt, 5, seed=0, backend=be),
        "sample_categorical": lambda be: ops.sample_categorical(logits, seed=0, backend=be),
    }


@pytest.mark.parametrize("op", list(_op_calls("cpu")))
def test_meta_tensors_are_rejected_by_every_op_and_backend(op):
    _same_error(_op_calls("meta")[op], InputError, "meta device")


def test_sparse_tensors_are_rejected():
    x = torch.randn(3, 4).to_sparse()
    with pytest.raises(InputError, match="x: expected a dense"):
        ops.nearest_embedding(x, torch.randn(6, 4))


def test_empty_stride_zero_tensors_are_accepted_everywhere():
    e = torch.empty_strided((0, 5), (0, 0))
    process = D.Absorbing(5, 4, S.cosine(T))
    xt = torch.empty(0, dtype=torch.int64)
    w = torch.randn(6, 5)
    for be in BACKENDS:
        assert ops.sample_categorical(e, seed=1, backend=be).shape == (0,)
        assert ops.posterior_sample(process, e, xt, 5, seed=1, backend=be).shape == (0,)
        assert ops.categorical_posterior(process, e, xt, 5, backend=be).shape == (0, 5)
        assert ops.nearest_embedding(e, w, backend=be)[0].shape == (0,)
        assert float(ops.rounding_loss(e, w, xt, backend=be)) == 0.0
    # a single category with a zero column stride
    one = torch.randn(4, 1).as_strided((4, 1), (1, 0))
    for be in BACKENDS:
        assert torch.equal(ops.sample_categorical(one, seed=1, backend=be), torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_bias_values_are_checked(bad):
    b = torch.zeros(10)
    b[4] = bad
    _same_error(lambda be: ops.rounding_loss(torch.randn(2, 8), torch.randn(10, 8), torch.tensor([1, 3]), bias=b,
                                             backend=be), InputError, "bias: contains NaN or infinity")


def test_rounding_loss_logits_that_would_overflow_are_rejected():
    """Finite x and weight of 1e20 overflowed the float32 logits into a NaN loss on every backend."""
    x, w, t = torch.tensor([[1e20, 0.0]]), torch.tensor([[1e20, 0.0], [0.0, 1.0]]), torch.tensor([1])
    _same_error(lambda be: ops.rounding_loss(x, w, t, backend=be), InputError, "x: too large for weight")
    _same_error(lambda be: ops.rounding_loss(torch.randn(1, 2), torch.randn(2, 2), t,
                                             bias=torch.tensor([1e300, 0.0], dtype=torch.float64), backend=be),
                InputError, "bias: values up to 1e+300 overflow the float32 logits")
    # large but orthogonal rows pass the Cauchy-Schwarz bound only if |x||w| is small: 1e18 · 1e18 is fine
    xs, ws = torch.tensor([[1e18, 0.0]]), torch.tensor([[0.0, 1e18], [1e-3, 0.0]])
    want = ops.rounding_loss(xs.double(), ws.double(), t, backend="reference")
    for be in BACKENDS:
        got = ops.rounding_loss(xs, ws, t, backend=be)
        assert bool(torch.isfinite(got)), be
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounding_loss_large_logits_keep_the_log_normaliser(dtype):
    """Logits of ±1e20 (found by the fuzz harness): m + log s rounds log 2 away, so C++ returned a loss of 0
    and Triton's backward p = exp(z - lse) was 1 in both columns (gradient off by 0.31)."""
    x = torch.tensor([[1.541], [-0.2934]], dtype=dtype)
    w = torch.tensor([[1e20], [1e20]], dtype=dtype)
    t = torch.tensor([0, 0])
    # softmax = (1/2, 1/2) in both rows: dW_0 = mean_r (1/2 - 1) x_r, dW_1 = mean_r (1/2) x_r
    q = float(x.double().sum()) / 4
    want_gw = torch.tensor([[-q], [q]], dtype=torch.float64)
    for be in BACKENDS:
        ww = w.clone().requires_grad_()
        loss = ops.rounding_loss(x, ww, t, backend=be)
        loss.backward()
        assert abs(float(loss) - math.log(2)) < 1e-6, (be, float(loss))
        torch.testing.assert_close(ww.grad.double(), want_gw, atol=1e-6, rtol=1e-5)


def test_mean_over_no_valid_target_is_zero_with_zero_gradient_everywhere():
    """The documented definition (sum / max(count, 1)): every backend, forward and backward. (NaN before on
    every backend, and the C++ / Triton gradients scaled by inf / NaN.)"""
    for target, n in ((torch.full((4,), -100), 4), (torch.empty(0, dtype=torch.int64), 0)):
        for be in BACKENDS:
            x = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
            w = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
            b = torch.randn(10, dtype=torch.float64, requires_grad=True)
            loss = ops.rounding_loss(x, w, target, bias=b, backend=be)
            loss.backward()
            assert float(loss) == 0.0, be
            for g in (x.grad, w.grad, b.grad):
                assert g is not None and not bool(g.any()), be


# ------------------------------------------------------------------------------------------------------
# 4. nearest_embedding numerics at the edges
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e37])
def test_nearest_embedding_huge_and_tiny_magnitudes(metric, scale):
    """|w|² - 2 x·w overflowed (1e20: the true answer 1, every backend returned 0) or underflowed."""
    x = torch.tensor([[scale, 0.0]])
    w = torch.tensor([[0.0, 0.0], [scale, 0.0]])
    for be in BACKENDS:
        assert ops.nearest_embedding(x, w, metric, backend=be)[0].tolist() == [1], be
    for s64 in (1e300, 1e-300, 1e-310):  # float64: squares overflow / underflow (1e-310 is subnormal)
        x64 = torch.tensor([[s64, 0.0], [0.0, -s64]], dtype=torch.float64)
        w64 = torch.tensor([[0.0, 0.0], [s64, 0.0], [s64, -s64]], dtype=torch.float64)
        want = [1, 0] if metric == "l2" else [1, 2]
        for be in BACKENDS:
            assert ops.nearest_embedding(x64, w64, metric, backend=be)[0].tolist() == want, (be, s64)


def test_cosine_rows_of_x_far_apart_in_magnitude():
    """Cosine ranks each row of x on its own: a row of 1e-300 next to one of 1e300 is still ranked."""
    x = torch.tensor([[1e300, 0.0], [1e-300, 0.0], [0.0, 1e-30]], dtype=torch.float64)
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    for be in BACKENDS:
        assert ops.nearest_embedding(x, w, "cosine", backend=be)[0].tolist() == [1, 1, 3], be


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("Dm", [4, 33])
def test_identical_rows_tie_to_the_lowest_index(metric, Dm):
    """1025 identical rows: a BLAS scores the column past a 1024 tile with other instructions, so index 1024
    won on C++ (and on the reference for some x)."""
    g = torch.Generator().manual_seed(Dm)
    row = torch.randn(1, Dm, generator=g)
    x = row + 0.1 * torch.randn(5, Dm, generator=g)
    others = -row - torch.rand(3, Dm, generator=g)  # far away, and pointing the other way
    for w in (row.expand(1025, Dm).contiguous(), torch.cat([others, row.expand(1030, Dm)])):
        first = int((w == row).all(1).nonzero()[0])
        for be in BACKENDS:
            idx = ops.nearest_embedding(x, w, metric, backend=be)[0]
            assert idx.tolist() == [first] * 5, be


def test_cosine_rows_of_one_direction_tie():
    w = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, 1.0, 1.5], [-1.0, 0.0, 0.0]])
    x = torch.tensor([[0.3, 0.5, 0.7], [1.0, 2.0, 3.0]])
    for be in BACKENDS:
        assert ops.nearest_embedding(x, w, "cosine", backend=be)[0].tolist() == [0, 0], be


def test_cosine_norm_clamp_is_kept_with_rescaled_rows():
    """Rows below the 1e-12 norm clamp next to rows that need rescaling keep the clamp's meaning:
    score = x·w / max(|w|, 1e-12)."""
    w = torch.tensor([[1e-13, 0.0], [0.5e-12, 0.0], [1e30, 1e31]], dtype=torch.float32)
    x = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    want = [1, 0]  # x·ŵ: 0.1, 0.5, ~0.0995 for x0; for x1 rows 0 and 1 tie at 0, row 2 is negative
    for be in BACKENDS:
        assert ops.nearest_embedding(x, w, "cosine", backend=be)[0].tolist() == want, be


# ------------------------------------------------------------------------------------------------------
# 5. errors name the public op's arguments
# ------------------------------------------------------------------------------------------------------
def test_errors_name_the_public_arguments():
    process = D.Absorbing(5, 4, S.cosine(T))
    x, xt = torch.randn(3, 5), torch.tensor([4, 4, 0])
    cases = [
        (lambda be: ops.posterior_sample(process, x, xt.double(), 5, seed=0, backend=be), InputTypeError, "x_t:"),
        (lambda be: ops.posterior_sample(process, x, xt + 9, 5, seed=0, backend=be), InputError, "x_t:"),
        (lambda be: ops.posterior_sample(process, x, xt, 5, 7, seed=0, backend=be), InputError, "s:"),
        (lambda be: ops.posterior_sample(process, x, xt, 99, seed=0, backend=be), InputError, "t:"),
        (lambda be: ops.posterior_sample(process, x, xt, 5, seed=2**64, backend=be), InputError, "seed:"),
        (lambda be: ops.posterior_sample(process, x, xt, 5, seed=0, row_offset=2**64, backend=be), InputError,
         "row_offset:"),
        (lambda be: ops.sample_categorical(x, seed=0, top_p=0.0, backend=be), InputError, "top_p:"),
        (lambda be: ops.sample_categorical(x, seed=0, top_k=-1, backend=be), InputError, "top_k:"),
        (lambda be: ops.sample_categorical(x, seed=0, offset=-1, backend=be), InputError, "offset:"),
        (lambda be: ops.rounding_loss(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1]), backend=be),
         InputError, "target:"),
        (lambda be: ops.nearest_embedding(torch.randn(3, 4), torch.randn(6, 4), metric="dot", backend=be),
         InputError, "metric:"),
    ]
    for call, err, match in cases:
        _same_error(call, err, match)
    assert _backends.cpp().available
