"""Discrete processes against explicit dense-matrix D3PM computations (float64, small V)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import stats

from fastdiff import discrete as D
from fastdiff import schedules as S

V = 6
T = 9
MASK = 2


# ------------------------------------------------------------------------------------------------
# Independent dense constructions of Q_t (written from the papers, not from fastdiff's code)
# ------------------------------------------------------------------------------------------------
def dense_absorbing(alpha_bar: torch.Tensor, mask: int) -> list[np.ndarray]:
    """Q_t[i, i] = a_t(i)/a_{t-1}(i), the rest of row i to the mask; the mask row stays (D3PM App. A.2)."""
    ab = alpha_bar.numpy()
    if ab.ndim == 1:
        ab = np.repeat(ab[:, None], V, 1)
    qs = []
    for t in range(1, ab.shape[0]):
        q = np.zeros((V, V))
        for i in range(V):
            keep = ab[t, i] / ab[t - 1, i] if ab[t - 1, i] > 0 else 0.0
            q[i, i] += keep
            q[i, mask] += 1 - keep
        q[mask] = 0
        q[mask, mask] = 1
        qs.append(q)
    return qs


def dense_uniform(alpha_bar: torch.Tensor) -> list[np.ndarray]:
    ab = alpha_bar.numpy()
    return [(ab[t] / ab[t - 1]) * np.eye(V) + (1 - ab[t] / ab[t - 1]) / V for t in range(1, len(ab))]


def dense_gaussian(betas: torch.Tensor, band: int) -> list[np.ndarray]:
    """D3PM eq. (App. A.2.2): off-diagonal exp(-4 (i-j)²/((V-1)² β)) normalised over n in [-band, band]."""
    qs = []
    for beta in betas.tolist():
        z = sum(np.exp(-4 * n * n / ((V - 1) ** 2 * beta)) for n in range(-band, band + 1))
        q = np.zeros((V, V))
        for i in range(V):
            for j in range(V):
                if i != j and abs(i - j) <= band:
                    q[i, j] = np.exp(-4 * (i - j) ** 2 / ((V - 1) ** 2 * beta)) / z
            q[i, i] = 1 - q[i].sum()
        qs.append(q)
    return qs


def dense_knn(emb: np.ndarray, betas: torch.Tensor, k: int) -> list[np.ndarray]:
    d = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    g = np.zeros((V, V))
    for i in range(V):
        g[i, np.argsort(d[i], kind="stable")[:k]] = 1
    a = (g + g.T) / (2 * k)
    r = a - np.diag(a.sum(1))
    return [scipy.linalg.expm(b * r) for b in betas.tolist()]


def products(qs: list[np.ndarray], s: int, t: int) -> np.ndarray:
    m = np.eye(V)
    for k in range(s + 1, t + 1):
        m = m @ qs[k - 1]
    return m


def dense_posterior(qs, x0p: np.ndarray, xt: np.ndarray, t: int, s: int) -> np.ndarray:
    """D3PM eq. 4 with a skip: p(x_s | x_t) ∝ Q_{t|s}[:, x_t] ⊙ (x0_probs @ Qbar_s)."""
    w = products(qs, s, t)[:, xt].T * (x0p @ products(qs, 0, s))
    with np.errstate(invalid="ignore"):  # 0/0 marks an impossible x_t; callers drop those rows
        return w / w.sum(-1, keepdims=True)


def _cases():
    g = torch.Generator().manual_seed(0)
    cos = S.cosine(T)
    lin = S.Schedule(torch.cat([torch.ones(1, dtype=torch.float64),
                                torch.cumprod(1 - torch.linspace(0.05, 0.6, T, dtype=torch.float64), 0)]))
    info = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    spin = S.spindle(T, info, lam=0.3)
    emb = torch.randn(V, 3, generator=g, dtype=torch.float64)
    qd = torch.rand(T, V, V, generator=g, dtype=torch.float64) + 0.05
    qd = qd / qd.sum(-1, keepdim=True)
    return {
        "absorbing-cosine": (D.Absorbing(V, MASK, cos), dense_absorbing(cos.alpha_bar, MASK)),
        "absorbing-mi": (D.Absorbing(V, MASK, S.mutual_info(T)), dense_absorbing(S.mutual_info(T).alpha_bar, MASK)),
        "absorbing-spindle": (D.Absorbing(V, MASK, spin), dense_absorbing(spin.alpha_bar, MASK)),
        "uniform": (D.Uniform(V, cos), dense_uniform(cos.alpha_bar)),
        "gaussian-full": (D.GaussianBand(V, lin), dense_gaussian(lin.betas, V - 1)),
        "gaussian-band2": (D.GaussianBand(V, lin, bandwidth=2), dense_gaussian(lin.betas, 2)),
        "knn": (D.NearestNeighbor(emb, lin, k=2), dense_knn(emb.numpy(), lin.betas, 2)),
        "dense": (D.Dense(qd), [q.numpy() for q in qd]),
    }


CASES = _cases()


def _x0_probs(process, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(n, V, generator=g, dtype=torch.float64), -1)
    if process.kind == "absorbing":  # SUBS: no mass on the mask
        p[:, MASK] = 0
        p = p / p.sum(-1, keepdim=True)
    return p


@pytest.mark.parametrize("name", list(CASES))
def test_posterior_equals_dense_d3pm(name):
    process, qs = CASES[name]
    x0p = _x0_probs(process, V, 1)
    xt = torch.arange(V)  # every x_t value, masked or not
    worst = 0.0
    for t in range(1, T + 1):
        for s in range(t):
            out = process.posterior_probs(x0p, xt, t, s)
            ref = dense_posterior(qs, x0p.numpy(), xt.numpy(), t, s)
            if process.kind == "absorbing":
                # Rows with x_t ≠ mask that the x0 distribution cannot explain are 0/0 in eq. 4; the
                # SUBS convention carries the token over (compare only where eq. 4 is defined).
                ok = ~np.isnan(ref).any(-1)
                out, ref = out[torch.from_numpy(ok)], ref[ok]
            worst = max(worst, float(np.abs(out.numpy() - ref).max()))
    assert worst < 1e-10, worst


@pytest.mark.parametrize("name", list(CASES))
def test_posterior_with_one_hot_x0_is_the_true_posterior(name):
    """q(x_s | x_t, x_0) by Bayes' rule over the dense chain: q(x_t|x_s) q(x_s|x_0) / q(x_t|x_0)."""
    process, qs = CASES[name]
    t, s = T - 2, 3
    for x0, xt in itertools.product(range(V), range(V)):
        if process.kind == "absorbing" and x0 == MASK:
            continue
        qt_given_x0 = products(qs, 0, t)[x0, xt]
        if qt_given_x0 < 1e-300:
            continue
        ref = products(qs, s, t)[:, xt] * products(qs, 0, s)[x0] / qt_given_x0
        out = process.posterior_probs(F.one_hot(torch.tensor(x0), V).double(), torch.tensor(xt), t, s)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_q_probs_equal_dense_and_sum_to_one(name):
    process, qs = CASES[name]
    x0 = torch.tensor([i for i in range(V) if not (process.kind == "absorbing" and i == MASK)])
    for t in range(0, T + 1):
        out = process.q_probs(x0, t)
        np.testing.assert_allclose(out.numpy(), products(qs, 0, t)[x0.numpy()], atol=1e-12)
        np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", ["absorbing-cosine", "absorbing-spindle", "uniform", "gaussian-band2", "dense"])
def test_q_sample_matches_q_probs(name):
    """Chi-square of 60k draws of q_sample against q_probs, per x0."""
    process, _ = CASES[name]
    g = torch.Generator().manual_seed(7)
    t = T // 2
    for x0 in (0, V - 1):
        x = torch.full((60_000,), x0)
        draws = process.q_sample(x, t, generator=g)
        p = process.q_probs(torch.tensor([x0]), t)[0].numpy()
        counts = np.bincount(draws.numpy(), minlength=V)
        assert counts[p == 0].sum() == 0
        nz = p > 0
        if nz.sum() > 1:
            assert stats.chisquare(counts[nz], p[nz] / p[nz].sum() * counts.sum()).pvalue > 1e-5


def test_per_sequence_steps_broadcast_like_a_loop():
    process, _ = CASES["uniform"]
    x0p = _x0_probs(process, 4 * 5, 2).reshape(4, 5, V)
    xt = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([9, 5, 3, 1])
    s = torch.tensor([4, 0, 2, 0])
    out = process.posterior_probs(x0p, xt, t, s)
    for b in range(4):
        np.testing.assert_allclose(out[b].numpy(), process.posterior_probs(x0p[b], xt[b], int(t[b]), int(s[b])).numpy(),
                                   atol=1e-14)
    out_m = CASES["dense"][0].posterior_probs(x0p, xt, t, s)
    for b in range(4):
        ref = dense_posterior(CASES["dense"][1], x0p[b].numpy(), xt[b].numpy(), int(t[b]), int(s[b]))
        np.testing.assert_allclose(out_m[b].numpy(), ref, atol=1e-10)


def test_absorbing_subs_ignores_mask_mass_and_carries_tokens():
    process = D.Absorbing(V, MASK, S.mutual_info(T))
    p = torch.softmax(torch.randn(3, V, dtype=torch.float64), -1)
    q = p.clone()
    q[:, MASK] = 0
    q = q / q.sum(-1, keepdim=True)
    xt = torch.tensor([MASK, 0, 4])
    a = process.posterior_probs(p, xt, 5, 2)
    b = process.posterior_probs(q, xt, 5, 2)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-14)
    assert a[1, 0] == 1 and a[2, 4] == 1
    # Masked row, closed form with a_t = 1 - t/T.
    a_t, a_s = 1 - 5 / T, 1 - 2 / T
    ref = (a_s - a_t) / (1 - a_t) * q[0].numpy()
    ref[MASK] = (1 - a_s) / (1 - a_t)
    np.testing.assert_allclose(a[0].numpy(), ref, atol=1e-14)


def test_large_vocab_closed_forms_need_no_dense_matrix():
    """V = 50257: closed forms run in O(V) per row (a V×V float64 matrix would be 20 GB)."""
    Vb = 50257
    for process in (D.Absorbing(Vb, Vb - 1, S.cosine(1000)), D.Uniform(Vb, S.cosine(1000))):
        x0p = torch.softmax(torch.randn(4, Vb), -1)
        xt = torch.tensor([Vb - 1, 5, 17, Vb - 1])
        out = process.posterior_probs(x0p, xt, 700, 350)
        assert out.shape == (4, Vb)
        np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def _batch(process, seed=0, B=4, L=5):
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([i for i in range(V) if not (process.kind == "absorbing" and i == MASK)])
    x0 = choices[torch.randint(0, len(choices), (B, L), generator=g)]
    t = torch.randint(1, T + 1, (B,), generator=g)
    xt = process.q_sample(x0, t, generator=g)
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    return x0, xt, t, logits


@pytest.mark.parametrize("name", list(CASES))
def test_kl_terms_equal_dense_kl(name):
    process, qs = CASES[name]
    x0, xt, t, logits = _batch(process)
    out = D.kl_terms(process, x0, xt, t, logits)
    for b, l in itertools.product(range(4), range(5)):
        tb = int(t[b])
        q = dense_posterior(qs, F.one_hot(x0[b, l], V).double().numpy()[None], xt[b, l].numpy()[None], tb, tb - 1)[0]
        p0 = torch.softmax(logits[b, l], -1).numpy()
        if process.kind == "absorbing":
            p0[MASK] = 0
            p0 /= p0.sum()
        p = dense_posterior(qs, p0[None], xt[b, l].numpy()[None], tb, tb - 1)[0]
        m = q > 0
        ref = float((q[m] * (np.log(q[m]) - np.log(p[m]))).sum())
        assert abs(float(out[b, l]) - ref) < 1e-9


def test_kl_zero_for_perfect_prediction_and_vlb_uses_decoder_at_t1():
    process, qs = CASES["uniform"]
    x0, xt, t, _ = _batch(process, seed=1)
    perfect = 60.0 * F.one_hot(x0, V).double()
    assert float(D.kl_terms(process, x0, xt, t, perfect).abs().max()) < 1e-12
    t1 = torch.ones(4, dtype=torch.int64)
    x1 = process.q_sample(x0, t1, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(4, 5, V, dtype=torch.float64)
    vlb = D.vlb_terms(process, x0, x1, t1, logits)
    # p(x0 | x1) ∝ Q_1[:, x1] ⊙ softmax(logits), independently.
    w = np.asarray(qs[0])[:, x1.numpy()].transpose(1, 2, 0) * torch.softmax(logits, -1).numpy()
    w /= w.sum(-1, keepdims=True)
    ref = -np.log(np.take_along_axis(w, x0.numpy()[..., None], -1)[..., 0])
    np.testing.assert_allclose(vlb.numpy(), ref, atol=1e-10)
    direct = D.decoder_nll(process, x0, x1, logits, direct=True)
    np.testing.assert_allclose(direct.numpy(), -torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0].numpy(),
                               atol=1e-12)


def test_hybrid_loss_is_vlb_plus_lambda_ce():
    process, _ = CASES["absorbing-cosine"]
    x0, xt, t, logits = _batch(process, seed=2)
    lam = 0.25
    per = D.hybrid_loss(process, x0, xt, t, logits, lam=lam, reduction="none")
    masked = logits.clone()
    masked[..., MASK] = float("-inf")
    ce = -torch.log_softmax(masked, -1).gather(-1, x0[..., None])[..., 0]
    np.testing.assert_allclose(per.numpy(), (D.vlb_terms(process, x0, xt, t, logits) + lam * ce).numpy(), atol=1e-12)
    assert torch.isclose(D.hybrid_loss(process, x0, xt, t, logits, lam=lam), per.mean())


def test_mdlm_loss_equals_absorbing_kl():
    """MDLM's weighted cross-entropy is exactly the absorbing KL term under SUBS (Sahoo et al. 2024)."""
    process, _ = CASES["absorbing-cosine"]
    x0, xt, t, logits = _batch(process, seed=3)
    t = t.clamp_min(2)
    xt = process.q_sample(x0, t, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(D.mdlm_loss(process, x0, xt, t, logits, reduction="none").numpy(),
                               D.kl_terms(process, x0, xt, t, logits).numpy(), atol=1e-10)


@pytest.mark.parametrize("objective,name", [("hybrid", "gaussian-band2"), ("hybrid", "absorbing-cosine"),
                                            ("mdlm", "absorbing-cosine")])
def test_losses_reductions_weights_and_the_shared_ce(objective, name):
    """losses(): per-token values reduced per sequence / over all tokens, the CE term, and the importance-
    weighted objective mean_b(w_b · L_b) a training loop minimises."""
    process, _ = CASES[name]
    x0, xt, t, logits = _batch(process, seed=5)
    lam = 0.3
    if objective == "hybrid":
        per_tok = D.hybrid_loss(process, x0, xt, t, logits, lam=lam, reduction="none")
    else:
        per_tok = D.mdlm_loss(process, x0, xt, t, logits, reduction="none")
    ce = D.x0_nll(process, x0, logits)
    np.testing.assert_allclose(D.decoder_nll(process, x0, xt, logits, direct=True).numpy(), ce.numpy(), atol=0)
    w = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    out = D.losses(process, x0, xt, t, logits, objective=objective, lam=lam, reduction="sequence", weights=w)
    assert set(out) == {objective, "ce", "loss", "per_sequence"}
    np.testing.assert_allclose(out[objective].numpy(), per_tok.mean(-1).numpy(), atol=1e-12)
    np.testing.assert_allclose(out["per_sequence"].numpy(), per_tok.mean(-1).numpy(), atol=1e-12)
    np.testing.assert_allclose(out["ce"].numpy(), ce.mean(-1).numpy(), atol=1e-12)
    np.testing.assert_allclose(float(out["loss"]), float((w * per_tok.mean(-1)).mean()), rtol=1e-12)
    plain = D.losses(process, x0, xt, t, logits, objective=objective, lam=lam)
    assert set(plain) == {objective, "ce", "loss"}
    np.testing.assert_allclose(float(plain["loss"]), float(per_tok.mean()), rtol=1e-12)
    assert float(D.losses(process, x0, xt, t, logits, objective=objective, lam=lam, reduction="sum")["loss"]) == \
        pytest.approx(float(per_tok.sum()), rel=1e-12)
    fn = D.hybrid_loss if objective == "hybrid" else D.mdlm_loss
    kw = {"lam": lam} if objective == "hybrid" else {}
    assert torch.equal(fn(process, x0, xt, t, logits, weights=w, **kw), out["loss"])
    with pytest.raises(ValueError, match="weights"):
        D.losses(process, x0, xt, t, logits, objective=objective, weights=w[:3])
    with pytest.raises(ValueError, match="reduction"):
        D.losses(process, x0, xt, t, logits, reduction="batch")
    with pytest.raises(ValueError, match="objective"):
        D.losses(process, x0, xt, t, logits, objective="vlb")


def test_mdlm_objective_needs_a_scalar_absorbing_process():
    process, _ = CASES["uniform"]
    x0, xt, t, logits = _batch(process, seed=6)
    with pytest.raises(TypeError, match="mdlm"):
        D.losses(process, x0, xt, t, logits, objective="mdlm")


def test_losses_are_differentiable():
    process, _ = CASES["gaussian-band2"]
    x0, xt, t, logits = _batch(process, seed=4)
    logits = logits.float().requires_grad_(True)
    D.hybrid_loss(process, x0, xt, t, logits).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_prior_kl_vanishes_for_absorbing_to_all_mask():
    process = D.Absorbing(V, MASK, S.mutual_info(T))
    x0 = torch.tensor([0, 1, 3, 5])
    assert float(D.prior_kl(process, x0).abs().max()) < 1e-12
    uni = D.Uniform(V, S.mutual_info(T, "uniform", vocab_size=V))
    assert float(D.prior_kl(uni, x0).abs().max()) < 1e-9


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["absorbing-cosine", "uniform", "dense"])
def test_bad_inputs_name_the_argument(name):
    process, _ = CASES[name]
    p = torch.full((3, V), 1.0 / V, dtype=torch.float64)
    xt = torch.tensor([0, 1, MASK])
    with pytest.raises(ValueError, match="x_t"):
        process.posterior_probs(p, torch.tensor([0, 1, V]), 3)
    with pytest.raises(ValueError, match="x_t"):
        process.posterior_probs(p, torch.tensor([0, -1, 2]), 3)
    with pytest.raises(TypeError, match="x_t"):
        process.posterior_probs(p, xt.float(), 3)
    with pytest.raises(ValueError, match="t"):
        process.posterior_probs(p, xt, T + 1)
    with pytest.raises(ValueError, match="t"):
        process.posterior_probs(p, xt, 0)
    with pytest.raises(ValueError, match="s"):
        process.posterior_probs(p, xt, 3, 3)
    with pytest.raises(ValueError, match="s"):
        process.posterior_probs(p, xt, 3, 5)
    with pytest.raises(ValueError, match="x0_probs"):
        process.posterior_probs(p[:, :-1], xt, 3)
    with pytest.raises(ValueError, match="x0_probs"):
        process.posterior_probs(torch.full((3, V), float("nan"), dtype=torch.float64), xt, 3)
    with pytest.raises(TypeError, match="x0_probs"):
        process.posterior_probs(p.long(), xt, 3)
    with pytest.raises(ValueError, match="x0"):
        process.q_probs(torch.tensor([V]), 2)
    with pytest.raises(ValueError, match="t"):
        process.q_sample(torch.tensor([0, 1]), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="x0_logits"):
        D.kl_terms(process, xt, xt, 2, torch.randn(3, V + 1))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="mask_id"):
        D.Absorbing(V, V, S.cosine(T))
    with pytest.raises(ValueError, match="vocab_size"):
        D.Absorbing(1, 0, S.cosine(T))
    with pytest.raises(TypeError, match="schedule"):
        D.Uniform(V, "cosine")
    with pytest.raises(ValueError, match="schedule"):
        D.Uniform(V, S.spindle(T, torch.zeros(V)))
    with pytest.raises(ValueError, match="schedule"):
        D.Absorbing(V + 1, 0, S.spindle(T, torch.zeros(V)))
    with pytest.raises(ValueError, match="Q"):
        D.Dense(torch.ones(T, V, V))
    with pytest.raises(ValueError, match="T"):
        D.Dense(torch.eye(V))
    with pytest.raises(ValueError, match="k"):
        D.NearestNeighbor(torch.randn(V, 2), S.cosine(T), k=V)


def test_from_betas_drives_matrix_processes_exactly():
    betas = torch.linspace(0.02, 1.0, T, dtype=torch.float64)
    sched = S.from_betas(betas)
    process = D.GaussianBand(V, sched)
    for t, q in enumerate(dense_gaussian(betas, V - 1), start=1):
        np.testing.assert_allclose(process.step_matrix(t).numpy(), q, atol=1e-14)
    with pytest.raises(ValueError, match="betas"):
        S.from_betas(torch.tensor([0.5, 1.5]))


def test_unreachable_x_t_keeps_x_t_like_the_ops():
    """A band process where x_t cannot be reached in one step from the x0 distribution's support: the
    posterior has no weight at all. The method returned 0/0 = NaN; it now keeps x_t (one-hot), the rule
    of every op backend (``ops.categorical_posterior``)."""
    from fastdiff import ops

    V = 9
    proc = D.GaussianBand(V, S.linear(100), bandwidth=1)
    x0p = F.one_hot(torch.tensor([0, 4]), V).double()  # x0 = 0 (x_t = 8 unreachable), x0 = 4 (reachable)
    xt = torch.tensor([8, 4])
    out = proc.posterior_probs(x0p, xt, 1, 0)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], F.one_hot(torch.tensor(8), V).double())
    assert torch.allclose(out[1].sum(), torch.tensor(1.0, dtype=torch.float64))
    ref = ops.categorical_posterior_ref(proc, torch.log(x0p.clamp_min(1e-300)).float(), xt, 1, 0)
    assert torch.equal(ref[0].double(), out[0])
