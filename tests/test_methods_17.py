"""Issue 17's rows: ReMDM at η > 0 against its exact finite-step law, clamping at the last step only
where it changes the result, classifier guidance through the DDIM sampler against a hand computation,
and classifier guidance for discrete diffusion (first-order Taylor over one-hot inputs)."""

from __future__ import annotations

import pytest
import torch

from fastdiff import continuous, discrete, schedules
from fastdiff import random as R
from fastdiff.sampling import sample
from tests import _exact as E

V, MASK, L, T = 5, 4, 3, 12
N_SAMPLES = 100_000
P_MIN = 1e-4  # fixed seeds make every test deterministic; this only sets how unlucky a seed may be


def _absorbing():
    return discrete.Absorbing(V, MASK, schedules.mutual_info(T))


@pytest.fixture(scope="module")
def joint():
    return E.Joint(V, L, data_tokens=[0, 1, 2], seed=3, zero_some=False)  # token 3: never data


def _den(joint, process):
    return E.ExactDenoiser(joint, "absorbing", process.schedule.alpha_bar, MASK, time_free=True)


def _check(samples, dist):
    p, outside = E.chi_square_pvalue(samples, dist)
    assert outside == 0, f"{outside} samples outside the support of the exact distribution"
    assert p > P_MIN, f"chi-square p = {p:.2e}"


def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


# ------------------------------------------------------------------------------------------------
# row 5: ReMDM at η > 0, exact law by dynamic programming
# ------------------------------------------------------------------------------------------------
def _toy(process):
    return E.ToyDenoiser(V, L, MASK, process.schedule.alpha_bar, seed=0)


@pytest.mark.parametrize("steps, eta, schedule, window, top_k, seed", [
    (4, 1.0, "rescale", None, None, 21),
    (6, 0.6, "rescale", None, None, 22),
    (6, 0.3, "cap", None, None, 23),
    (6, 2.0, "cap", None, None, 24),  # cap takes η > 1: σ = σ_max wherever η exceeds it
    (6, 1.0, "rescale", (0.6, 0.9), None, 25),  # ReMDM-loop: remask only at t ∈ {10, 8}
    (6, 1.0, "rescale", (0.0, 0.4), None, 26),  # only at t ∈ {4, 2} (σ_max = 0 at the last step)
    (6, 1.0, "rescale", (0.25, 0.5), None, 28),  # both ends inclusive: t = 6 = 0.5·T remasks
    (6, 0.8, "rescale", None, 2, 27),  # the two-stage (filtered x0) path
])
def test_remask_matches_its_exact_law(steps, eta, schedule, window, top_k, seed):
    """ReMDM (Wang et al. 2025) with a fixed toy denoiser, against its exact law by dynamic programming
    over every sequence (tests/_exact.py ``remdm_distribution``), by Pearson's chi-square."""
    p = _absorbing()
    den = _toy(p)
    kw = {} if window is None else {"remask_window": window}
    if top_k is not None:
        kw["top_k"] = top_k
    out = sample(den, p, shape=(N_SAMPLES, L), steps=steps, seed=seed, strategy="remask", eta=eta,
                 remask_schedule=schedule, **kw)
    start = {(MASK,) * L: 1.0}
    dist = E.remdm_distribution(den, steps, start, T, MASK, eta, schedule, window, top_k)
    assert abs(sum(dist.values()) - 1) < 1e-12
    # the test can fail: remasking moves the law away from the ancestral sampler's (η = 0) by far more
    # than the chi-square test resolves at this sample size (TV ~ 0.005)
    plain = E.remdm_distribution(den, steps, start, T, MASK, 0.0, schedule, None, top_k)
    assert _tv(dist, plain) > 0.02
    _check(out.tokens, dist)


def test_remask_oracle_at_eta_zero_is_the_ancestral_law(joint):
    """The ReMDM oracle is written separately from the ancestral one; at η = 0 they must agree."""
    p = _absorbing()
    den = _den(joint, p)
    start = {(MASK,) * L: 1.0}
    a = E.remdm_distribution(den, 4, start, T, MASK, 0.0)
    b = E.ancestral_distribution(den, 4, start, [(0, L)], T, "absorbing", MASK)
    assert _tv(a, b) < 1e-12


def test_remask_window_and_schedule_change_the_law():
    """The options the chi-square tests vary change the exact law by more than the test resolves (so a
    sampler that ignored the window or mixed up the schedules would fail it)."""
    p = _absorbing()
    den = _toy(p)
    start = {(MASK,) * L: 1.0}
    law = lambda *a: E.remdm_distribution(den, 6, start, T, MASK, *a)  # noqa: E731
    full = law(1.0, "rescale")
    assert _tv(full, law(1.0, "rescale", (0.6, 0.9))) > 0.02
    assert _tv(full, law(1.0, "rescale", (0.0, 0.4))) > 0.02
    assert _tv(law(1.0, "rescale", (0.25, 0.5)), law(1.0, "rescale", (0.25, 0.49))) > 0.01
    assert _tv(law(0.3, "cap"), law(0.3, "rescale")) > 0.02
    assert _tv(law(0.6, "rescale"), law(0.5, "rescale")) > 0.005


# ------------------------------------------------------------------------------------------------
# row 5: clamping at the last step only, where it changes the result
# ------------------------------------------------------------------------------------------------
def _emb(Vc=12, D=4):
    return torch.randn(Vc, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _nearest(x, emb):
    d = ((x[..., None, :] - emb) ** 2).sum(-1)
    return d.argmin(-1)


@pytest.mark.parametrize("strategy", ["ddpm", "ddim"])
def test_clamp_last_snaps_only_the_final_estimate(strategy):
    """clamp="last" (Diffusion-LM §4.2 applied at the final step only): every step but the last uses the
    network's x0 as is, the last one its nearest embedding. Computed by hand both ways; the final
    vectors differ between clamp="last" and clamp="never" (the tokens are the same rounding of them)."""
    emb = _emb()
    diff = continuous.GaussianDiffusion(schedules.sqrt(30), parameterization="x0")
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = lambda x, t: 2 * torch.tanh(x @ W) + 0.01 * t.to(x.dtype)[:, None, None]  # noqa: E731
    kw = {"eta": 0.7} if strategy == "ddim" else {}
    got = {c: sample(model, diff, shape=(2, 3), steps=3, strategy=strategy, embedding=emb, clamp=c, seed=8, **kw)
           for c in ("last", "never", "every")}
    ab = diff.alpha_bar
    grid = [30, 20, 10, 0]

    def hand(clamp_at_last: bool, clamp_every: bool) -> torch.Tensor:
        x = R.randn((2, 3, 4), seed=8, offset=0, dtype=torch.float64)
        for k, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
            x0 = model(x, torch.full((2,), t))
            if clamp_every or (clamp_at_last and s == 0):
                x0 = emb[_nearest(x0, emb)]
            a_t, a_s = ab[t], ab[s]
            if strategy == "ddpm":
                r = a_t / a_s
                mean = a_s.sqrt() * (1 - r) / (1 - a_t) * x0 + r.sqrt() * (1 - a_s) / (1 - a_t) * x
                var = (1 - a_s) / (1 - a_t) * (1 - r)
                x = mean if s == 0 else mean + var.sqrt() * R.randn((2, 3, 4), seed=8, offset=k + 1,
                                                                     dtype=torch.float64)
            else:
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                sig = 0.7 * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
                x = a_s.sqrt() * x0 + (1 - a_s - sig**2).sqrt() * eps
                if s > 0:
                    x = x + sig * R.randn((2, 3, 4), seed=8, offset=k + 1, dtype=torch.float64)
        return x

    last, never, every = hand(True, False), hand(False, False), hand(True, True)
    torch.testing.assert_close(got["last"].x, last, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["never"].x, never, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["every"].x, every, rtol=1e-10, atol=1e-10)
    # where it changes the result: the final vectors are embedding rows with "last", not with "never"
    assert (last - never).abs().max() > 1e-3
    assert torch.equal(got["last"].tokens, _nearest(last, emb))
    torch.testing.assert_close(got["last"].x, emb[got["last"].tokens])
    assert torch.equal(got["never"].tokens, _nearest(never, emb))
    # and the earlier steps were not clamped: "every" ends elsewhere
    assert (every - last).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# row 5: classifier guidance through the DDIM sampler
# ------------------------------------------------------------------------------------------------
class _LinearClassifier:
    """``log p(y | x) = log softmax_c(Σ_l x_l · w_c)_y``; its gradient by hand:
    ``∂/∂x_l = w_y - Σ_c p_c w_c`` (the same for every position ``l``)."""

    def __init__(self, C: int, D: int, y: torch.Tensor) -> None:
        self.w = torch.randn(C, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        self.y = y
        self.seen: list[torch.Tensor] = []

    def autograd(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a user writes: the classifier's log-likelihood differentiated by autograd."""
        self.seen.append(t.clone())
        x = x.detach().requires_grad_(True)
        logp = torch.log_softmax(x.sum(1) @ self.w.T, -1).gather(1, self.y[:, None]).sum()
        return torch.autograd.grad(logp, x)[0]

    def by_hand(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(x.sum(1) @ self.w.T, -1)  # (B, C)
        g = self.w[self.y] - p @ self.w  # (B, D)
        return g[:, None, :].expand_as(x)


@pytest.mark.parametrize("param", ["x0", "eps"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_sampler_classifier_guidance_matches_a_hand_computation(param, eta):
    """Dhariwal & Nichol 2021 Alg. 2 on Song et al. 2021's update: ``ε̂ = ε - sqrt(1 - ᾱ_t)·s·∇ log p(y|x_t)``,
    ``x0̂ = (x_t - sqrt(1 - ᾱ_t)·ε̂)/sqrt(ᾱ_t)``, ``x_s = sqrt(ᾱ_s)·x0̂ + sqrt(1 - ᾱ_s - σ²)·ε̂ + σ·z``;
    the gradient is computed here by hand, in the sampler by autograd through the user's callable."""
    emb = _emb()
    diff = continuous.GaussianDiffusion(schedules.cosine(40), parameterization=param)
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = lambda x, t: torch.tanh(x @ W) * (t.to(x.dtype)[:, None, None] / 40)  # noqa: E731
    y = torch.tensor([0, 2])
    clf = _LinearClassifier(3, 4, y)
    scale = 3.0
    out = sample(model, diff, shape=(2, 3), steps=4, strategy="ddim", eta=eta, embedding=emb, clamp="never",
                 seed=6, classifier_grad=clf.autograd, classifier_scale=scale)
    plain = sample(model, diff, shape=(2, 3), steps=4, strategy="ddim", eta=eta, embedding=emb, clamp="never",
                   seed=6)
    ab = diff.alpha_bar
    grid = [40, 30, 20, 10, 0]
    x = R.randn((2, 3, 4), seed=6, offset=0, dtype=torch.float64)
    for k, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        a_t, a_s = ab[t], ab[s]
        o = model(x, torch.full((2,), t))
        eps = o if param == "eps" else (x - a_t.sqrt() * o) / (1 - a_t).sqrt()
        eps = eps - (1 - a_t).sqrt() * scale * clf.by_hand(x)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sig = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        x = a_s.sqrt() * x0 + (1 - a_s - sig**2).sqrt() * eps
        if eta > 0 and s > 0:
            x = x + sig * R.randn((2, 3, 4), seed=6, offset=k + 1, dtype=torch.float64)
    torch.testing.assert_close(out.x, x, rtol=1e-9, atol=1e-9)
    assert (out.x - plain.x).abs().max() > 1e-2  # guidance moved the result
    assert [tt.tolist() for tt in clf.seen] == [[t, t] for t in grid[:-1]]  # the step, per row


# ------------------------------------------------------------------------------------------------
# row 4: classifier guidance for discrete diffusion (first order over one-hot inputs)
# ------------------------------------------------------------------------------------------------
class _AdditiveClassifier:
    """``log p(y | x) = log softmax_c(Σ_l U[l, x_l, c])_y``. By hand, with ``p`` the class probabilities:
    ``∂ log p(y | x)/∂ onehot(x)[l, v] = U[l, v, y] - Σ_c p_c U[l, v, c]``."""

    def __init__(self, V: int, L: int, C: int, y: int) -> None:
        self.U = torch.randn(L, V, C, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        self.y = y
        self.calls = 0

    def autograd(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a user writes: autograd through a one-hot input."""
        self.calls += 1
        assert t.shape == x.shape[:1] and t.dtype == torch.int64
        oh = torch.nn.functional.one_hot(x, self.U.shape[1]).to(torch.float64).requires_grad_(True)
        score = torch.einsum("blv,lvc->bc", oh, self.U)
        lp = torch.log_softmax(score, -1)[:, self.y].sum()
        return torch.autograd.grad(lp, oh)[0].float()

    def by_hand(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        score = sum(self.U[l, x[:, l]] for l in range(L))  # (B, C)
        p = torch.softmax(score, -1)
        return self.U[None, :, :, self.y] - torch.einsum("bc,lvc->blv", p, self.U)


@pytest.mark.parametrize("steps, scale, seed", [(1, 2.0, 31), (3, 2.0, 32), (4, -1.5, 33)])
def test_discrete_classifier_guidance_absorbing_matches_its_exact_law(steps, scale, seed):
    p = _absorbing()
    den = E.ToyDenoiser(V, L, MASK, p.schedule.alpha_bar, seed=1, sharpness=0.3)
    clf = _AdditiveClassifier(V, L, 3, y=1)
    out = sample(den, p, shape=(N_SAMPLES, L), steps=steps, seed=seed, classifier_grad=clf.autograd,
                 classifier_scale=scale)
    assert clf.calls == steps
    start = {(MASK,) * L: 1.0}
    dist = E.guided_ancestral_distribution(den, steps, start, T, "absorbing", MASK, clf.by_hand, scale)
    plain = E.guided_ancestral_distribution(den, steps, start, T, "absorbing", MASK, clf.by_hand, 0.0)
    assert _tv(dist, plain) > 0.05  # the guidance changes the law by far more than the test resolves
    _check(out.tokens, dist)


def test_discrete_classifier_guidance_uniform_matches_its_exact_law():
    """Any process kind: the tilt applies to the process's own posterior (uniform noise here)."""
    p = discrete.Uniform(V, schedules.cosine(T))
    j = E.Joint(V, L, data_tokens=list(range(V)), seed=5, zero_some=False)
    den = E.ExactDenoiser(j, "uniform", p.schedule.alpha_bar)
    clf = _AdditiveClassifier(V, L, 2, y=0)
    out = sample(den, p, shape=(N_SAMPLES, L), steps=3, seed=34, classifier_grad=clf.autograd, classifier_scale=1.0)
    start = {k: 1.0 / V**L for k in j.as_dict()}
    dist = E.guided_ancestral_distribution(den, 3, start, T, "uniform", None, clf.by_hand, 1.0)
    assert _tv(dist, E.ancestral_distribution(den, 3, start, [(0, L)], T, "uniform", None)) > 0.05
    _check(out.tokens, dist)


def test_discrete_classifier_guidance_steers_towards_the_label():
    """Larger scales put more mass on sequences the classifier assigns to the label (exact laws)."""
    p = _absorbing()
    den = E.ToyDenoiser(V, L, MASK, p.schedule.alpha_bar, seed=1, sharpness=0.3)
    clf = _AdditiveClassifier(V, L, 3, y=1)
    start = {(MASK,) * L: 1.0}

    def accuracy(scale: float) -> float:
        d = E.guided_ancestral_distribution(den, 4, start, T, "absorbing", MASK, clf.by_hand, scale)
        xs = torch.tensor(list(d))
        score = sum(clf.U[l, xs[:, l]] for l in range(L))
        return float(sum(m for m, c in zip(d.values(), score.argmax(-1).tolist()) if c == clf.y))

    a0, a2, a5 = accuracy(0.0), accuracy(2.0), accuracy(5.0)
    assert a0 < a2 < a5


def test_discrete_classifier_guidance_keeps_draws_aligned_and_checks_its_inputs():
    """Scale 0 draws exactly the unguided tokens (same counter offsets); bad gradients and unsupported
    combinations are named."""
    from fastdiff.errors import InputError, InputTypeError

    p = discrete.Absorbing(50, 49, schedules.cosine(100))
    den = E.ToyDenoiser(50, 6, 49, p.schedule.alpha_bar, seed=2)
    zero = lambda x, t: torch.zeros(*x.shape, 50)  # noqa: E731
    a = sample(den, p, shape=(64, 6), steps=5, seed=3)
    b = sample(den, p, shape=(64, 6), steps=5, seed=3, classifier_grad=zero, classifier_scale=0.0)
    c = sample(den, p, shape=(64, 6), steps=5, seed=3, classifier_grad=zero, classifier_scale=3.0)
    assert torch.equal(a.tokens, c.tokens)
    # scale 0 draws from the same law by another op (float64 log-probabilities): equal up to ties at a
    # category boundary
    assert (a.tokens != b.tokens).float().mean() < 0.01
    with pytest.raises(InputError, match=r"^classifier_grad: must return a tensor of shape \(2, 6, 50\)"):
        sample(den, p, shape=(2, 6), steps=2, classifier_grad=lambda x, t: torch.zeros(2, 6, 49))
    with pytest.raises(InputError, match="^classifier_grad: returned"):
        sample(den, p, shape=(2, 6), steps=2, classifier_grad=lambda x, t: torch.full((2, 6, 50), float("nan")))
    with pytest.raises(InputTypeError, match=r"^classifier_grad: expected a callable grad\(x_t, t\) -> \(B, L, V\)"):
        sample(den, p, shape=(2, 6), steps=2, classifier_grad=3)
    with pytest.raises(InputError, match="^top_k: does not combine with classifier_grad"):
        sample(den, p, shape=(2, 6), steps=2, classifier_grad=zero, top_k=3)
    with pytest.raises(InputError, match="^classifier_grad: applies to strategy"):
        sample(den, p, shape=(2, 6), steps=2, classifier_grad=zero, strategy="confidence")


def test_text_classifier_onehot_grad_matches_finite_differences():
    """TextClassifier.onehot_grad against central differences of the public forward, the one-hot entry
    (l, v) moved by ±ε through a hook that adds ±ε·E[v] to the embedding at position l."""
    from fastdiff.models.scorers import TextClassifier

    torch.manual_seed(0)
    clf = TextClassifier(vocab_size=7, num_labels=3, width=8, layers=1, heads=2, pad_id=0).double().eval()
    tokens = torch.tensor([[3, 1, 5, 2], [6, 6, 4, 1]])
    labels = torch.tensor([2, 0])
    with torch.inference_mode():  # as the pipeline calls it
        got = clf.onehot_grad(tokens, labels)
    assert got.shape == (2, 4, 7)
    eps = 1e-5
    E_ = clf.embedding.weight.detach()
    for b, l, v in [(0, 0, 0), (0, 2, 4), (1, 3, 6), (1, 1, 2), (0, 3, 1)]:
        vals = []
        for sgn in (1, -1):
            def hook(mod, inp, out, sgn=sgn):
                out = out.clone()
                out[:, l] += sgn * eps * E_[v]
                return out
            h = clf.embedding.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    vals.append(torch.log_softmax(clf(tokens), -1)[b, labels[b]].item())
            finally:
                h.remove()
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert abs(float(got[b, l, v]) - fd) < 1e-5, (b, l, v)
    # the guidance_grad callable is onehot_grad at a fixed label
    g = clf.guidance_grad(2)(tokens, torch.tensor([5, 5]))
    torch.testing.assert_close(g, clf.onehot_grad(tokens, torch.tensor([2, 2])))


def test_cli_generate_classifier_scale_is_the_pipeline_with_the_classifiers_gradient(capsys, tmp_path):
    """``fastdiff generate --classifier-scale`` samples what TextDiffusion.generate samples with the bundled
    classifier's one-hot gradient towards the label; bad combinations are named before any work."""
    import json

    from fastdiff import cli, evaluation
    from fastdiff.pipeline import TextDiffusion

    torch.set_num_threads(1)
    out = tmp_path / "g.jsonl"
    code = cli.main(["generate", "-n", "2", "--steps", "4", "--length", "12", "--seed", "1", "--classifier-label",
                     "library", "--classifier-scale", "2.5", "--threads", "1", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "classifier guidance 2.5" in text
    got = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    td = TextDiffusion.load("discrete")
    clf = evaluation.load_scorer("classifier")
    want = td.generate(2, length=12, steps=4, seed=1, classifier_grad=clf.guidance_grad(1), classifier_scale=2.5)
    assert got == want.texts
    for argv, match in [(["--classifier-scale", "2"], "needs an attribute"),
                        (["--classifier-label", "library"], "give a scale"),
                        (["--classifier-scale", "2", "--label", "nope"], "not one of"),
                        (["--classifier-scale", "2", "--label", "library", "--strategy", "confidence"],
                         "classifier_grad: applies to strategy"),
                        (["-c", "continuous", "--classifier-scale", "2", "--label", "library"], "discrete checkpoints")]:
        code = cli.main(["generate", "-n", "1", "--steps", "2", "--length", "8", "--quiet", *argv])
        assert code != 0
        assert match in capsys.readouterr().err, argv


# ------------------------------------------------------------------------------------------------
# row 3: AR-Diffusion's anchor-point timesteps and the per-position skip step
# ------------------------------------------------------------------------------------------------
def test_ar_timesteps_by_hand():
    """Wu et al. 2023 §3.1 with N = 4, T = 10, anchor (2N, T) = (8, 10); f rounded half up.

    t = 4 (= N): start (0, 0), slope 10/8: f(n) = 1.25 n -> 1.25, 2.5, 3.75, 5 -> 1, 3, 4, 5.
    t = 2: start (2, 0), slope 10/6: f = (n - 2)·10/6 -> -1.67, 0, 1.67, 3.33 -> 0, 0, 2, 3.
    t = 9 (= N + 5): start (0, 5), slope 5/8: f = 5 + 0.625 n -> 5.625, 6.25, 6.875, 7.5 -> 6, 6, 7, 8.
    t = 0: start (4, 0): every n <= 4 gets <= 0 -> 0. t = 14 (= N + T): start (0, 10): every n at 10."""
    from fastdiff.continuous import ar_timesteps

    assert ar_timesteps(4, 10, 4).tolist() == [1, 3, 4, 5]
    assert ar_timesteps(4, 10, 2).tolist() == [0, 0, 2, 3]
    assert ar_timesteps(4, 10, 9).tolist() == [6, 6, 7, 8]
    assert ar_timesteps(4, 10, 0).tolist() == [0, 0, 0, 0]
    assert ar_timesteps(4, 10, 14).tolist() == [10, 10, 10, 10]
    # a batch of sentence-level steps, and a custom anchor (n_e, t_e) = (6, 10) at t = 4: f = 10 n / 6
    # -> 1.67, 3.33, 5, 6.67 -> 2, 3, 5, 7
    assert ar_timesteps(4, 10, torch.tensor([4, 2])).tolist() == [[1, 3, 4, 5], [0, 0, 2, 3]]
    assert ar_timesteps(4, 10, 4, anchor=(6, 10)).tolist() == [2, 3, 5, 7]
    # monotone in n and in t, left positions first
    f = ar_timesteps(16, 50, torch.arange(0, 67))
    assert bool((f[:, 1:] >= f[:, :-1]).all()) and bool((f[1:] >= f[:-1]).all())
    from fastdiff.errors import InputError
    with pytest.raises(InputError, match="^t:"):
        ar_timesteps(4, 10, 15)
    with pytest.raises(InputError, match="^anchor:"):
        ar_timesteps(4, 10, 3, anchor=(4, 10))


def test_ar_step_pairs_skip_the_sentence_grid():
    """steps = 3 over N + T = 14: sentence steps 14, 9, 5, 0 (linspace 14, 9.33, 4.67, 0 rounded)."""
    from fastdiff.continuous import ar_step_pairs, ar_timesteps

    pairs = ar_step_pairs(4, 10, 3)
    want = [ar_timesteps(4, 10, t) for t in (14, 9, 5, 0)]
    assert len(pairs) == 3
    for (t, s), a, b in zip(pairs, want, want[1:]):
        assert t.tolist() == a.tolist() and s.tolist() == b.tolist()
    # t = 5: start (0, 1)... no: t - N = 1 -> start (0, 1), slope 9/8: 2.125, 3.25, 4.375, 5.5 -> 2, 3, 4, 6
    assert pairs[1][1].tolist() == [2, 3, 4, 6]
    assert pairs[-1][1].tolist() == [0, 0, 0, 0]


def test_ar_ddim_step_moves_each_position_from_its_own_step():
    from fastdiff.continuous import ar_ddim_step

    diff = continuous.GaussianDiffusion(schedules.cosine(40), parameterization="x0")
    g = torch.Generator().manual_seed(4)
    x, out = torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    t_tok, s_tok = torch.tensor([0, 10, 25, 40]), torch.tensor([0, 0, 12, 40])  # done, to 0, skip, not started
    got = ar_ddim_step(diff, out, x, t_tok, s_tok)
    ab = diff.alpha_bar
    want = x.clone()
    for n in (1, 2):
        a_t, a_s = ab[t_tok[n]], ab[s_tok[n]]
        eps = (x[:, n] - a_t.sqrt() * out[:, n]) / (1 - a_t).sqrt()
        want[:, n] = a_s.sqrt() * out[:, n] + (1 - a_s).sqrt() * eps
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clamp", ["never", "last"])
def test_ar_strategy_matches_a_hand_written_loop(clamp):
    """strategy="ar": the model sees each position's own step ``(B, L)``; each transition moves the
    positions whose step decreases by the DDIM formula (η = 0) and keeps the others; with clamp="last"
    a position's x0 is snapped at the transition that brings it to 0."""
    from fastdiff.continuous import ar_timesteps

    emb = _emb()
    Tn, N = 30, 4
    diff = continuous.GaussianDiffusion(schedules.cosine(Tn), parameterization="x0")
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return 2 * torch.tanh(x @ W) * (1 + t.to(x.dtype)[..., None] / Tn)

    out = sample(model, diff, shape=(2, N), steps=5, strategy="ar", embedding=emb, clamp=clamp, seed=3)
    ab = diff.alpha_bar
    sent = [34, 27, 20, 14, 7, 0]  # linspace(N + T = 34, 0, 6) rounded
    x = R.randn((2, N, 4), seed=3, offset=0, dtype=torch.float64)
    for k, (a, b) in enumerate(zip(sent[:-1], sent[1:])):
        t_tok, s_tok = ar_timesteps(N, Tn, a), ar_timesteps(N, Tn, b)
        assert torch.equal(seen[k], t_tok.expand(2, N))
        x0 = 2 * torch.tanh(x @ W) * (1 + t_tok.to(x.dtype)[None, :, None] / Tn)
        new = x.clone()
        for n in range(N):
            tn, sn = int(t_tok[n]), int(s_tok[n])
            if sn == tn:
                continue
            x0n = x0[:, n]
            if clamp == "last" and sn == 0:
                x0n = emb[_nearest(x0n, emb)]
            eps = (x[:, n] - ab[tn].sqrt() * x0n) / (1 - ab[tn]).sqrt()
            new[:, n] = ab[sn].sqrt() * x0n + (1 - ab[sn]).sqrt() * eps
        x = new
    assert len(seen) == 5
    torch.testing.assert_close(out.x, x, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.tokens, _nearest(x, emb))
    if clamp == "last":  # every position ended on an embedding row
        torch.testing.assert_close(out.x, emb[out.tokens])


def test_ar_strategy_rejects_what_it_does_not_define():
    from fastdiff.errors import InputError

    emb = _emb()
    diff = continuous.GaussianDiffusion(schedules.cosine(30), parameterization="x0")
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(InputError, match="^block_size: AR-Diffusion"):
        sample(model, diff, shape=(1, 4), steps=3, strategy="ar", embedding=emb, block_size=2)
    with pytest.raises(InputError, match="^classifier_grad: applies to strategy"):
        sample(model, diff, shape=(1, 4), steps=3, strategy="ar", embedding=emb, classifier_grad=lambda x, t: x)
