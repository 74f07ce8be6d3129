"""Noise schedules (fastdiff.schedules) against independent implementations typed from the papers.

Every expected value is computed here with numpy / math from the published formula, never taken from
the code under test.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fastdiff import schedules as S

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def raises_naming(exc, name: str, fn, *args, **kw) -> None:
    """``fn(*args, **kw)`` raises ``exc`` and the message names the argument ``name``."""
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", msg), f"message does not name {name!r}: {msg!r}"


def ab_np(sched: S.Schedule) -> np.ndarray:
    return sched.alpha_bar.detach().cpu().numpy().astype(np.float64)


def cumprod_ab(betas: np.ndarray) -> np.ndarray:
    """alpha_bar[0] = 1, alpha_bar[t] = prod_{k<=t} (1 - beta_k)."""
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


def diffusion_lm_betas_for_alpha_bar(T: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Verbatim port of improved-diffusion / Diffusion-LM ``betas_for_alpha_bar`` (pure python floats)."""
    betas = []
    for i in range(T):
        t1 = i / T
        t2 = (i + 1) / T
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def entropy_np(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_information_np(marginal: np.ndarray, qbar: np.ndarray) -> float:
    """Brute force I(x0; xt) = sum_{i,j} p(i,j) log p(i,j) / (p(i) p(j)), in nats."""
    joint = marginal[:, None] * qbar
    pxt = joint.sum(0)
    total = 0.0
    for i in range(joint.shape[0]):
        for j in range(joint.shape[1]):
            if joint[i, j] > 0:
                total += joint[i, j] * math.log(joint[i, j] / (marginal[i] * pxt[j]))
    return total


def expected_betas(ab: np.ndarray) -> np.ndarray:
    """beta_t = 1 - ab[t]/ab[t-1]; 1 where ab[t-1] == 0 (the state is already fully noised)."""
    prev, cur = ab[:-1], ab[1:]
    out = np.ones_like(cur)
    np.divide(cur, prev, out=out, where=prev > 0)
    out = np.where(prev > 0, out, 0.0)
    return 1.0 - out


COUNTS = torch.tensor([5000.0, 1200.0, 300.0, 40.0, 3.0, 0.0], dtype=torch.float64)


def token_info_np(counts: np.ndarray) -> np.ndarray:
    """DiffusionBERT-style information, as documented: -log p with add-one smoothing, / max, centred
    by its mean under that (smoothed) distribution."""
    p = (counts + 1.0) / (counts.sum() + counts.size)
    info = -np.log(p)
    info = info / info.max()
    return info - (p * info).sum()


def band_process(V: int = 5):
    """A Gaussian-band-like step matrix Q(beta) = expm(c R), c = beta/(1 - beta), with R the generator of
    a symmetric band (|i - j| <= 2, rate exp(-(i-j)^2)). Q(0) = I, Q(1) = uniform (R irreducible and
    symmetric), and I(x0; xt) falls monotonically in beta (data processing), so every MI target is
    reachable. Computed through the eigendecomposition so large c is stable."""
    R = np.zeros((V, V))
    for i in range(V):
        for j in range(V):
            if i != j and abs(i - j) <= 2:
                R[i, j] = math.exp(-((i - j) ** 2))
    R -= np.diag(R.sum(1))
    lam, U = np.linalg.eigh(R)
    lam[np.abs(lam) < 1e-12] = 0.0

    def Q(beta: float) -> np.ndarray:
        if beta >= 1.0:
            return np.full((V, V), 1.0 / V)
        c = beta / (1.0 - beta)
        return (U * np.exp(c * lam)) @ U.T

    def process(beta: float) -> torch.Tensor:
        return torch.from_numpy(Q(float(beta)))

    return process, Q


MARGINAL5 = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


# ------------------------------------------------------------------------------------------------
# each formula against its own implementation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 50, 250])
def test_linear_matches_ddpm(T):
    scale = 1000.0 / T
    betas = np.linspace(1e-4 * scale, 0.02 * scale, T)
    sch = S.linear(T)
    assert sch.alpha_bar.dtype == torch.float64 and sch.alpha_bar.shape == (T + 1,)
    np.testing.assert_allclose(sch.betas.numpy(), betas, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ab_np(sch), cumprod_ab(betas), rtol=1e-12, atol=1e-300)


def test_linear_custom_ends():
    T = 200
    betas = np.linspace(3e-4 * 5, 0.01 * 5, T)
    np.testing.assert_allclose(ab_np(S.linear(T, beta_start=3e-4, beta_end=0.01)), cumprod_ab(betas), rtol=1e-12)


def _cosine_f(t: float, T: int, s: float) -> float:
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T,s", [(1000, 0.008), (50, 0.008), (7, 0.008), (100, 0.02)])
def test_cosine_matches_nichol_dhariwal(T, s):
    betas = np.array([min(1 - _cosine_f(t, T, s) / _cosine_f(t - 1, T, s), 0.999) for t in range(1, T + 1)])
    sch = S.cosine(T) if s == 0.008 else S.cosine(T, s=s)  # 0.008 is the documented default
    np.testing.assert_allclose(sch.betas.numpy(), betas, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ab_np(sch), cumprod_ab(betas), rtol=1e-10, atol=1e-300)
    # Below the clip alpha_bar is the closed form f(t)/f(0) (Nichol & Dhariwal eq. 17).
    closed = np.array([_cosine_f(t, T, s) / _cosine_f(0, T, s) for t in range(T + 1)])
    unclipped = np.concatenate([[True], np.cumprod(betas < 0.999).astype(bool)])
    np.testing.assert_allclose(ab_np(sch)[unclipped], closed[unclipped], rtol=1e-10)
    assert betas[-1] == pytest.approx(0.999)  # cos²(π/2) = 0: the last beta is the clip


@pytest.mark.parametrize("T", [1000, 50, 3])
def test_sqrt_formula_and_clip(T):
    s = 1e-4
    sch = S.sqrt(T)
    ab = ab_np(sch)
    assert ab[0] == 1.0
    formula = np.array([1 - math.sqrt(t / T + s) for t in range(1, T)])
    # cumprod of the ratios reproduces the formula up to accumulated rounding (~T ulp)
    np.testing.assert_allclose(ab[1:T], formula, rtol=1e-11, atol=0)
    # 1 - sqrt(1 + s) < 0 at t = T: beta_T is clipped at 0.999
    assert sch.betas[-1].item() == pytest.approx(0.999, abs=1e-15)
    assert ab[T] == pytest.approx(0.001 * ab[T - 1], rel=1e-12)


@pytest.mark.parametrize("T", [1000, 64])
def test_sqrt_normalize_equals_diffusion_lm(T):
    betas = diffusion_lm_betas_for_alpha_bar(T, lambda t: 1 - math.sqrt(t + 0.0001), 0.999)
    sch = S.sqrt(T, normalize=True)
    np.testing.assert_allclose(sch.betas.numpy(), betas, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(ab_np(sch), cumprod_ab(betas), rtol=1e-11, atol=1e-300)
    # Diffusion-LM's alpha_bar is the formula divided by f(0) = 1 - sqrt(s) (below the clip)
    closed = np.array([(1 - math.sqrt(t / T + 1e-4)) / (1 - math.sqrt(1e-4)) for t in range(T)])
    np.testing.assert_allclose(ab_np(sch)[:T], closed, rtol=1e-11)


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_mutual_info_absorbing_exact(T):
    sch = S.mutual_info(T)
    np.testing.assert_array_equal(ab_np(sch), np.array([1 - t / T for t in range(T + 1)]))
    np.testing.assert_allclose(sch.betas.numpy(), [1 / (T - t + 1) for t in range(1, T + 1)], rtol=1e-12)


def test_absorbing_mi_is_alpha_bar_times_entropy():
    """Brute-force check of D3PM's claim that absorbing I(x0; xt) = alpha_bar·H(x0), so 1 - t/T is linear MI."""
    T, V = 10, 5
    m = np.concatenate([MARGINAL5, [0.0]])  # mask token (index V) has no data mass
    H = entropy_np(MARGINAL5)
    ab = ab_np(S.mutual_info(T))
    for t in range(T + 1):
        qbar = np.zeros((V + 1, V + 1))
        qbar[:, :] = 0
        qbar[np.arange(V + 1), np.arange(V + 1)] = ab[t]
        qbar[:, V] += 1 - ab[t]
        assert mutual_information_np(m, qbar) == pytest.approx((1 - t / T) * H, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("marginal", [MARGINAL5, None])
@pytest.mark.parametrize("T", [40, 7])
def test_mutual_info_uniform_linear_in_t(marginal, T):
    V = 5
    m = MARGINAL5 if marginal is not None else np.full(V, 1 / V)
    sch = S.mutual_info(T, "uniform", vocab_size=V,
                        marginal=None if marginal is None else torch.tensor(marginal))
    ab = ab_np(sch)
    H = entropy_np(m)
    assert ab[0] == 1.0 and ab[T] == 0.0
    for t in range(T + 1):
        qbar = ab[t] * np.eye(V) + (1 - ab[t]) / V
        mi = mutual_information_np(m, qbar)
        assert abs(mi - (1 - t / T) * H) <= 1e-6 * H, (t, mi, (1 - t / T) * H)


@pytest.mark.parametrize("V", [600, 4096, 100_000])
def test_mutual_info_uniform_large_vocabularies(V):
    """Large V (the outside pass: > 120 s for V in 513..4096, a V×V matrix per bisection step; at V = 10^5
    that matrix alone is 80 GB). Checked against a brute-force O(V) NumPy evaluation of each row's MI with
    a non-uniform marginal of 3 distinct values and a uniform one."""
    T = 16
    rng = np.random.default_rng(V)
    for m in (np.full(V, 1.0 / V), rng.choice([1.0, 5.0, 40.0], size=V)):
        m = m / m.sum()
        ab = ab_np(S.mutual_info(T, "uniform", vocab_size=V, marginal=torch.tensor(m)))
        H = entropy_np(m)
        assert ab[0] == 1.0 and ab[T] == 0.0 and np.all(np.diff(ab) <= 0)
        for t in range(1, T):
            a, c = ab[t], (1 - ab[t]) / V
            # I = H(xt) - H(xt | x0): p(xt) = a m + c; every row of Qbar is (a + c) once and c V-1 times.
            h_cond = -((a + c) * math.log(a + c) + (V - 1) * c * math.log(c))
            mi = entropy_np(a * m + c) - h_cond
            assert abs(mi - (1 - t / T) * H) <= 1e-9 * H, (t, mi, (1 - t / T) * H)


def test_mutual_info_uniform_marginal_is_normalised():
    """Unnormalised weights give the same schedule as the normalised marginal."""
    a = S.mutual_info(12, "uniform", vocab_size=5, marginal=torch.tensor(MARGINAL5 * 7.0))
    b = S.mutual_info(12, "uniform", vocab_size=5, marginal=torch.tensor(MARGINAL5))
    np.testing.assert_allclose(ab_np(a), ab_np(b), rtol=1e-12, atol=1e-15)


def test_mutual_info_matrix_process_linear_in_t():
    T, V = 12, 5
    process, Q = band_process(V)
    sch = S.mutual_info(T, process, marginal=torch.tensor(MARGINAL5))
    betas = sch.params["betas"].numpy()
    assert betas.shape == (T,) and np.all((betas >= 0) & (betas <= 1))
    H = entropy_np(MARGINAL5)
    qbar = np.eye(V)
    for t in range(1, T + 1):
        qbar = qbar @ Q(betas[t - 1])
        mi = mutual_information_np(MARGINAL5, qbar)
        assert abs(mi - (1 - t / T) * H) <= 1e-6 * H, (t, mi, (1 - t / T) * H)


# ------------------------------------------------------------------------------------------------
# spindle (DiffusionBERT) and token information
# ------------------------------------------------------------------------------------------------


def test_token_information_formula_and_properties():
    h = S.token_information(COUNTS)
    c = COUNTS.numpy()
    np.testing.assert_allclose(h.numpy(), token_info_np(c), rtol=1e-12, atol=1e-14)
    p = (c + 1) / (c.sum() + c.size)
    assert abs(float((p * h.numpy()).sum())) < 1e-12  # frequency-weighted mean 0
    # rarer -> more information (COUNTS is sorted by decreasing frequency)
    assert np.all(np.diff(h.numpy()) > 0)
    # scaled by the maximum before centring: range is within an interval of length <= 1
    assert h.max() - h.min() <= 1.0 + 1e-12


def test_token_information_equal_counts_is_zero():
    h = S.token_information(torch.full((7,), 10.0))
    np.testing.assert_allclose(h.numpy(), 0.0, atol=1e-12)


def _spindle_raw(T: int, h: np.ndarray, lam: float) -> np.ndarray:
    t = np.arange(T + 1, dtype=np.float64)[:, None]
    return 1 - t / T - lam * np.sin(np.pi * t / T) * h[None, :]


@pytest.mark.parametrize("lam", [0.3, 0.8, 1.5])
@pytest.mark.parametrize("T", [100, 9])
def test_spindle_formula_where_valid(T, lam):
    h = S.token_information(COUNTS)
    sch = S.spindle(T, h, lam=lam)
    V = COUNTS.numel()
    ab = ab_np(sch)
    assert sch.per_token and ab.shape == (T + 1, V)
    raw = _spindle_raw(T, h.numpy(), lam)
    # where the formula lies in [0, 1] and is non-increasing up to t, the schedule *is* the formula
    running_min = np.minimum.accumulate(raw, axis=0)
    valid = (raw >= 0) & (raw <= 1) & (raw <= running_min)
    valid[0] = False
    valid[T] = False
    assert valid.sum() > 0
    np.testing.assert_allclose(ab[valid], raw[valid], rtol=0, atol=1e-12)
    assert np.all(ab[0] == 1.0)
    assert np.all(ab[T] == 0.0)
    assert np.all(np.diff(ab, axis=0) <= 0)
    assert np.all((ab >= 0) & (ab <= 1))


def test_spindle_small_lam_is_the_formula_everywhere_inside():
    """With lam·π·|H| < 1 the formula is monotone: every value strictly inside (0, 1) is the formula."""
    T = 64
    h = S.token_information(COUNTS)
    lam = 0.3
    assert lam * math.pi * float(h.abs().max()) < 1
    raw = _spindle_raw(T, h.numpy(), lam)
    ab = ab_np(S.spindle(T, h, lam=lam))
    inside = (raw > 0) & (raw < 1)
    inside[0] = inside[T] = False
    np.testing.assert_allclose(ab[inside], raw[inside], atol=1e-12, rtol=0)
    np.testing.assert_array_equal(ab[raw >= 1], 1.0)


def test_spindle_rare_tokens_masked_first():
    T = 100
    h = S.token_information(COUNTS)
    ab = ab_np(S.spindle(T, h, lam=0.3))
    mid = ab[T // 2]
    # COUNTS decreasing -> information increasing -> alpha_bar at mid t strictly decreasing
    assert np.all(np.diff(mid) < 0)
    # and the average token (H = 0 would be) sits around the plain 1 - t/T
    assert mid.min() < 0.5 < mid.max()


def test_spindle_zero_information_is_linear():
    T = 20
    ab = ab_np(S.spindle(T, torch.zeros(3, dtype=torch.float64), lam=0.7))
    np.testing.assert_allclose(ab, np.repeat(1 - np.arange(T + 1)[:, None] / T, 3, axis=1), atol=1e-15)


# ------------------------------------------------------------------------------------------------
# invariants for every schedule, registry
# ------------------------------------------------------------------------------------------------

_PROCESS, _ = band_process(5)


def _adaptive_refitted(T=50):
    a = S.adaptive(T)
    ab = a.alpha_bar.clone()
    a.record(torch.arange(1, T + 1), 1 - ab[1:] ** 2)
    assert a.refit()
    return a


SCHEDULE_FACTORIES = {
    "linear-1000": lambda: S.linear(1000),
    "linear-50": lambda: S.linear(50),
    "cosine-1000": lambda: S.cosine(1000),
    "cosine-5": lambda: S.cosine(5),
    "sqrt-1000": lambda: S.sqrt(1000),
    "sqrt-norm-20": lambda: S.sqrt(20, normalize=True),
    "mi-absorbing": lambda: S.mutual_info(30),
    "mi-uniform": lambda: S.mutual_info(15, "uniform", vocab_size=5, marginal=torch.tensor(MARGINAL5)),
    "mi-matrix": lambda: S.mutual_info(6, _PROCESS, marginal=torch.tensor(MARGINAL5)),
    "spindle": lambda: S.spindle(40, S.token_information(COUNTS), lam=0.8),
    "adaptive": lambda: S.adaptive(40),
    "adaptive-refit": _adaptive_refitted,
}


@pytest.mark.parametrize("key", list(SCHEDULE_FACTORIES))
def test_schedule_invariants(key):
    sch = SCHEDULE_FACTORIES[key]()
    ab = ab_np(sch)
    T = sch.T
    assert sch.alpha_bar.dtype == torch.float64
    assert ab.shape[0] == T + 1
    assert np.all(ab[0] == 1.0)
    assert np.all(np.diff(ab, axis=0) <= 0), "alpha_bar must be non-increasing"
    assert np.all((ab >= 0) & (ab <= 1))
    betas = sch.betas.numpy()
    assert betas.shape == (T,) + ab.shape[1:]
    np.testing.assert_allclose(betas, expected_betas(ab), rtol=1e-12, atol=1e-15)
    # alpha_bar is recovered from its betas
    np.testing.assert_allclose(np.concatenate([np.ones((1,) + ab.shape[1:]), np.cumprod(1 - betas, 0)]),
                               ab, rtol=1e-10, atol=1e-15)
    # __call__ indexes alpha_bar
    assert torch.equal(sch(3), sch.alpha_bar[3])


def test_names_lists_every_schedule():
    assert set(S.names()) == {"linear", "cosine", "sqrt", "mutual_info", "spindle", "adaptive"}


GET_KW = {"spindle": lambda: {"token_info": S.token_information(COUNTS)}}
DIRECT = {"linear": S.linear, "cosine": S.cosine, "sqrt": S.sqrt, "mutual_info": S.mutual_info,
          "spindle": S.spindle, "adaptive": S.adaptive}


@pytest.mark.parametrize("name", sorted(DIRECT))
@pytest.mark.parametrize("T", [100, 1000])
def test_get_every_name(name, T):
    kw = GET_KW.get(name, dict)()
    sch = S.get(name, T, **kw)
    assert isinstance(sch, S.Schedule) and sch.T == T
    ref = DIRECT[name](T, **kw)
    assert torch.equal(sch.alpha_bar, ref.alpha_bar)


def test_get_passes_keywords():
    np.testing.assert_allclose(ab_np(S.get("cosine", 50, s=0.02)), ab_np(S.cosine(50, s=0.02)))
    assert not torch.equal(S.get("cosine", 50, s=0.02).alpha_bar, S.cosine(50).alpha_bar)


@pytest.mark.parametrize("bad", ["nope", "Linear", "", "cos"])
def test_get_unknown_name(bad):
    raises_naming(ValueError, "name", S.get, bad, 10)


def test_schedule_validation():
    raises_naming(ValueError, "alpha_bar", S.Schedule, torch.tensor([0.9, 0.5], dtype=torch.float64))
    raises_naming(ValueError, "alpha_bar", S.Schedule, torch.tensor([1.0, 0.5, 0.6], dtype=torch.float64))
    raises_naming(ValueError, "alpha_bar", S.Schedule, torch.tensor([1.0, -0.1], dtype=torch.float64))
    raises_naming(ValueError, "alpha_bar", S.Schedule, torch.tensor([1.0, float("nan")], dtype=torch.float64))
    raises_naming(ValueError, "alpha_bar", S.Schedule, torch.tensor([1.0], dtype=torch.float64))
    raises_naming(TypeError, "alpha_bar", S.Schedule, torch.tensor([1, 0]))


# ------------------------------------------------------------------------------------------------
# adaptive (SeqDiffuSeq)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sqrt", "cosine", "linear"])
def test_adaptive_refit_makes_loss_linear(base):
    T = 200
    a = S.adaptive(T, base=base)
    base_ab = ab_np(a)[1:]

    def loss_of(ab):  # a known, strictly decreasing function of alpha_bar on [0, 1]
        return 1 - ab**2

    base_loss = loss_of(base_ab)
    a.record(torch.arange(1, T + 1), torch.from_numpy(base_loss))
    assert a.refit() is True
    new = ab_np(a)
    assert new[0] == 1.0 and np.all(np.diff(new) <= 0)
    lo, hi = base_loss.min(), base_loss.max()
    target = np.linspace(lo, hi, T)
    # 1) the refit is the inverse of the measured loss map, interpolated piecewise-linearly (numpy.interp)
    order = np.argsort(base_loss)
    np.testing.assert_allclose(new[1:], np.interp(target, base_loss[order], base_ab[order]), atol=1e-12)
    # 2) under the new schedule the loss is linear in t. Interpolating between two grid points keeps the
    #    loss between their two losses, so the error is bounded by the largest gap of the base grid.
    new_loss = loss_of(new[1:])
    gap = np.diff(np.sort(base_loss)).max()
    err = np.abs(new_loss - target).max()
    assert err <= gap + 1e-12
    base_dev = np.abs(base_loss - target).max()
    assert err < 0.05 * base_dev, (err, base_dev)
    # 3) the recorded losses move with the steps: each is the measured loss at the step's new alpha_bar
    np.testing.assert_allclose(a.loss[1:].numpy(), loss_of(new[1:]), atol=gap + 1e-12)


def test_adaptive_refit_twice_converges():
    """Refitting on the losses of the refitted schedule: the grid is now even, the error O(1/T²)."""
    T = 200
    a = S.adaptive(T, momentum=0.0)
    for _ in range(2):
        a.record(torch.arange(1, T + 1), 1 - a.alpha_bar[1:] ** 2)
        assert a.refit()
    loss = 1 - ab_np(a)[1:] ** 2
    lin = np.linspace(loss[0], loss[-1], T)
    assert np.abs(loss - lin).max() < 2e-3 * (loss[-1] - loss[0])


def test_adaptive_refit_false_until_every_step_seen():
    T = 20
    a = S.adaptive(T)
    before = a.alpha_bar.clone()
    assert a.refit() is False
    a.record(torch.arange(1, T), torch.linspace(0.1, 0.9, T - 1, dtype=torch.float64))  # step T missing
    assert a.refit() is False
    assert torch.equal(a.alpha_bar, before)
    a.record(torch.tensor([T]), torch.tensor([1.0], dtype=torch.float64))
    assert a.refit() is True


def test_adaptive_record_ema_and_batch_mean():
    a = S.adaptive(10, momentum=0.75)
    a.record(torch.tensor([3, 3, 5]), torch.tensor([1.0, 3.0, 4.0]))
    assert a.loss[3].item() == pytest.approx(2.0)  # batch mean at a step
    assert a.loss[5].item() == pytest.approx(4.0)
    a.record(torch.tensor([3]), torch.tensor([10.0]))
    assert a.loss[3].item() == pytest.approx(0.75 * 2.0 + 0.25 * 10.0)


def test_adaptive_bad_inputs():
    a = S.adaptive(10)
    raises_naming(ValueError, "t", a.record, torch.tensor([0]), torch.tensor([1.0]))
    raises_naming(ValueError, "t", a.record, torch.tensor([11]), torch.tensor([1.0]))
    raises_naming(ValueError, "losses", a.record, torch.tensor([1, 2]), torch.tensor([1.0]))
    raises_naming(ValueError, "losses", a.record, torch.tensor([1]), torch.tensor([float("nan")]))
    raises_naming(ValueError, "base", S.adaptive, 10, base=S.linear(20))
    raises_naming(TypeError, "base", S.adaptive, 10, base=3)
    raises_naming(ValueError, "base", S.AdaptiveSchedule, S.spindle(10, torch.zeros(3, dtype=torch.float64)))
    raises_naming(ValueError, "momentum", S.adaptive, 10, momentum=1.0)


# ------------------------------------------------------------------------------------------------
# plotting
# ------------------------------------------------------------------------------------------------


def test_plot_schedules_writes_png(tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "schedules.png"
    ax = S.plot_schedules({"cosine": S.cosine(50), "sqrt": S.sqrt(50),
                           "spindle": S.spindle(50, S.token_information(COUNTS))}, path=str(path))
    try:
        assert path.exists() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(ax.get_lines()) == 3
    finally:
        plt.close("all")


# ------------------------------------------------------------------------------------------------
# bad inputs: every error names its argument
# ------------------------------------------------------------------------------------------------

_CONSTRUCTOR_KW = {"spindle": lambda: {"token_info": torch.zeros(3, dtype=torch.float64)}}


@pytest.mark.parametrize("name", sorted(DIRECT))
@pytest.mark.parametrize("T,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                                   ("10", TypeError)])
def test_bad_T(name, T, exc):
    kw = _CONSTRUCTOR_KW.get(name, dict)()
    raises_naming(exc, "T", DIRECT[name], T, **kw)
    raises_naming(exc, "T", S.get, name, T, **kw)


@pytest.mark.parametrize("kw,arg,exc", [
    ({"beta_end": 1.5}, "beta_end", ValueError),
    ({"beta_end": -0.1}, "beta_end", ValueError),
    ({"beta_start": -1e-4}, "beta_start", ValueError),
    ({"beta_start": float("nan")}, "beta_start", ValueError),
    ({"beta_end": "0.02"}, "beta_end", TypeError),
])
def test_linear_bad_betas(kw, arg, exc):
    raises_naming(exc, arg, S.linear, 1000, **kw)


@pytest.mark.parametrize("T", [1, 10, 19])
def test_linear_T_too_small_for_scaled_betas(T):
    # 0.02 * 1000 / T > 1 for T < 20
    raises_naming(ValueError, "T", S.linear, T)


def test_linear_T_20_is_the_boundary():
    sch = S.linear(20)  # scaled beta_end = 1 exactly: allowed, alpha_bar hits 0
    assert sch.betas[-1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("fn,args,kw,arg,exc", [
    (S.cosine, (10,), {"s": -0.1}, "s", ValueError),
    (S.sqrt, (10,), {"s": 0.0}, "s", ValueError),
    (S.sqrt, (10,), {"s": 2.0}, "s", ValueError),
    (S.mutual_info, (10, "uniform"), {}, "vocab_size", TypeError),
    (S.mutual_info, (10, "uniform"), {"vocab_size": 1}, "vocab_size", ValueError),
    (S.mutual_info, (10, "uniform"), {"vocab_size": 5, "marginal": torch.ones(4, dtype=torch.float64)},
     "marginal", ValueError),
    (S.mutual_info, (10, "uniform"), {"vocab_size": 3, "marginal": torch.tensor([1.0, -1.0, 1.0])},
     "marginal", ValueError),
    (S.mutual_info, (10, "gaussian"), {}, "process", ValueError),
    (S.mutual_info, (10, _PROCESS), {}, "marginal", ValueError),
    (S.spindle, (10, torch.zeros(2, 3, dtype=torch.float64)), {}, "token_info", ValueError),
    (S.spindle, (10, torch.tensor([0.0, float("nan")], dtype=torch.float64)), {}, "token_info", ValueError),
    (S.spindle, (10, [0.0, 1.0]), {}, "token_info", TypeError),
    (S.spindle, (10, torch.zeros(3, dtype=torch.float64)), {"lam": "x"}, "lam", TypeError),
    (S.token_information, (torch.tensor([1.0, -2.0]),), {}, "counts", ValueError),
    (S.token_information, (torch.zeros(0),), {}, "counts", ValueError),
])
def test_bad_arguments_named(fn, args, kw, arg, exc):
    raises_naming(exc, arg, fn, *args, **kw)
