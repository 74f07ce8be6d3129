"""An exact denoiser of a known joint distribution over short sequences, and the exact output
distribution of each sampling strategy computed by dynamic programming over whole sequences.

Everything here is written from the definitions (Bayes' rule over all sequences, explicit transition
matrices), independently of fastdiff's processes and ops: only the schedule's ``alpha_bar`` numbers
are read from the process.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


class Joint:
    """A random distribution ``pi`` over sequences of ``L`` tokens drawn from ``data_tokens``."""

    def __init__(self, V: int, L: int, data_tokens: list[int], seed: int = 0, zero_some: bool = False):
        self.V, self.L = V, L
        rng = np.random.default_rng(seed)
        seqs = list(itertools.product(data_tokens, repeat=L))
        w = rng.gamma(0.7, size=len(seqs))
        # Impossible sequences would let independent per-position draws reach an x_t that no x0
        # explains (a 0/0 posterior); leave zero_some off for the samplers' tests.
        if zero_some:
            w[rng.random(len(seqs)) < 0.25] = 0.0
        self.seqs = torch.tensor(seqs, dtype=torch.int64)  # (S, L)
        self.pi = torch.tensor(w / w.sum(), dtype=torch.float64)  # (S,)

    def prefix(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The marginal of the first ``n`` positions: (sequences (S', n), probabilities (S',))."""
        keys: dict[tuple, float] = {}
        for s, p in zip(self.seqs.tolist(), self.pi.tolist()):
            keys[tuple(s[:n])] = keys.get(tuple(s[:n]), 0.0) + p
        seqs = torch.tensor(list(keys), dtype=torch.int64).reshape(-1, n)
        return seqs, torch.tensor(list(keys.values()), dtype=torch.float64)

    def as_dict(self) -> dict[tuple, float]:
        return {tuple(s): p for s, p in zip(self.seqs.tolist(), self.pi.tolist()) if p > 0}


def qbar_matrix(kind: str, V: int, a: float, mask_id: int | None = None) -> torch.Tensor:
    """``Qbar[x0, x_t] = q(x_t | x0)`` for a scalar ``alpha_bar = a`` (absorbing or uniform), dense."""
    eye = torch.eye(V, dtype=torch.float64)
    if kind == "absorbing":
        m = a * eye
        m[:, mask_id] += 1 - a
        m[mask_id] = 0.0
        m[mask_id, mask_id] = 1.0
        return m
    return a * eye + (1 - a) / V


def transition_matrix(kind: str, V: int, a_t: float, a_s: float, mask_id: int | None = None) -> torch.Tensor:
    """``Q_{t|s}[x_s, x_t] = q(x_t | x_s)``, dense, from the definitions."""
    r = a_t / a_s if a_s > 0 else 0.0
    return qbar_matrix(kind, V, r, mask_id)


class ExactDenoiser:
    """``logits[b, l, v] = log p(x0_l = v | x_t)`` under the joint ``pi`` and the forward process.

    For an input of length ``n < L`` (semi-autoregressive prefix context) the joint of the first ``n``
    positions is used. ``time_free=True`` (absorbing only) uses the fact that ``p(x0 | x_t)`` does not
    depend on ``t`` for absorbing noise (it is ``pi`` restricted to the x0 consistent with x_t), so the
    model may ignore ``t``, as MDLM's caching requires.
    """

    def __init__(self, joint: Joint, kind: str, alpha_bar: torch.Tensor, mask_id: int | None = None,
                 time_free: bool = False):
        self.joint, self.kind, self.ab, self.mask_id = joint, kind, alpha_bar, mask_id
        self.time_free = time_free
        self.uses_time = not time_free
        self.calls = 0
        self.rows = 0
        self._prefix = {n: joint.prefix(n) for n in range(1, joint.L + 1)}

    def table(self, t: int) -> torch.Tensor:
        V = self.joint.V
        if self.time_free:
            c = torch.eye(V, dtype=torch.float64)
            c[:, self.mask_id] = 1.0
            c[self.mask_id] = 0.0
            return c
        return qbar_matrix(self.kind, V, float(self.ab[t]), self.mask_id)

    def probs(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``p(x0_l = v | x_t)``: ``(B, n, V)`` float64."""
        B, n = x_t.shape
        seqs, pi = self._prefix[n]
        V = self.joint.V
        out = torch.zeros(B, n, V, dtype=torch.float64)
        onehot = torch.nn.functional.one_hot(seqs, V).to(torch.float64)  # (S, n, V)
        for tv in torch.unique(t).tolist():
            rows = (t == tv).nonzero().squeeze(1)
            Q = self.table(tv)  # (V, V): Q[x0, x_t]
            lik = torch.ones(rows.numel(), seqs.shape[0], dtype=torch.float64)
            xr = x_t[rows]
            for pos in range(n):
                lik *= Q[seqs[:, pos]][:, xr[:, pos]].T  # (rows, S)
            post = lik * pi
            post = post / post.sum(1, keepdim=True)
            out[rows] = torch.einsum("bs,slv->blv", post, onehot)
        return out

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        return torch.log(self.probs(x_t, t)).to(torch.float32)


# ------------------------------------------------------------------------------------------------
# exact output distributions by dynamic programming over whole sequences
# ------------------------------------------------------------------------------------------------
def _grid(T: int, steps: int) -> list[int]:
    g = [round(T - k * T / steps) for k in range(steps + 1)]  # the sampler's evenly spaced grid
    out = [g[0]]
    for v in g[1:]:
        if v < out[-1]:
            out.append(v)
    return out


def _posterior_rows(kind, V, mask_id, p0: torch.Tensor, x_t: torch.Tensor, a_t: float, a_s: float) -> torch.Tensor:
    """Per position ``p(x_s | x_t) ∝ Q_{t|s}[:, x_t] ⊙ (p0 @ Qbar_s)`` from dense matrices: ``(n, V)``."""
    Qts = transition_matrix(kind, V, a_t, a_s, mask_id)
    Qs = qbar_matrix(kind, V, a_s, mask_id)
    w = Qts[:, x_t].T * (p0 @ Qs)
    if kind == "absorbing":  # a revealed token stays (also where the process could not have produced it:
        keep = x_t != mask_id  # fixed positions at t = T)
        w[keep] = torch.nn.functional.one_hot(x_t[keep], V).to(w.dtype)
    return w / w.sum(1, keepdim=True)


def ancestral_distribution(den: ExactDenoiser, steps: int, start: dict[tuple, float],
                           blocks: list[tuple[int, int]], T: int, kind: str, mask_id: int | None,
                           context: str = "prefix") -> dict[tuple, float]:
    """Exact law of the ancestral sampler's output: for each block, for each grid step, every position
    of the block moves independently by the posterior given the exact x0 marginals."""
    V = den.joint.V
    dist = dict(start)
    ab = den.ab
    grid = _grid(T, steps)
    for a, b in blocks:
        ctx = b if context == "prefix" else den.joint.L
        for t, s in zip(grid[:-1], grid[1:]):
            new: dict[tuple, float] = {}
            states = list(dist)
            xs = torch.tensor(states, dtype=torch.int64)
            p0 = den.probs(xs[:, :ctx], torch.full((len(states),), t))
            for i, st in enumerate(states):
                post = _posterior_rows(kind, V, mask_id, p0[i, a:b], xs[i, a:b], float(ab[t]), float(ab[s]))
                _spread(new, st, a, post, dist[st])
            dist = new
    return {k: v for k, v in dist.items() if v > 0}


def _spread(new: dict, st: tuple, a: int, post: torch.Tensor, mass: float) -> None:
    n = post.shape[0]
    choices = [torch.nonzero(post[j] > 0).squeeze(1).tolist() for j in range(n)]
    for combo in itertools.product(*choices):
        p = mass
        for j, v in enumerate(combo):
            p *= float(post[j, v])
        key = st[:a] + tuple(combo) + st[a + n:]
        new[key] = new.get(key, 0.0) + p


def confidence_distribution(den: ExactDenoiser, steps: int, start: dict[tuple, float], T: int, mask_id: int,
                            fixed: tuple[bool, ...]) -> dict[tuple, float]:
    """Exact law of LLaDA low-confidence remasking at temperature 1 (one block): each step draws a
    candidate for every masked position from its x0 marginal, ranks masked positions by the
    probability of their candidate (ties: lower position first) and commits the top ``n_k``, with
    ``n_k`` LLaDA's even split of the initial masked count over the steps."""
    dist = dict(start)
    L = den.joint.L
    n0 = sum(1 for j in range(L) if not fixed[j])
    base, rem = divmod(n0, steps)
    sched = [base + (1 if k < rem else 0) for k in range(steps)]
    for k in range(steps):
        t = max(1, min(T, round(T * (steps - k) / steps)))
        new: dict[tuple, float] = {}
        for st, mass in dist.items():
            masked = [j for j in range(L) if st[j] == mask_id and not fixed[j]]
            if not masked:
                new[st] = new.get(st, 0.0) + mass
                continue
            p0 = den.probs(torch.tensor([st]), torch.tensor([t]))[0]
            num = min(sched[k], len(masked))
            opts = [torch.nonzero(p0[j] > 0).squeeze(1).tolist() for j in masked]
            for combo in itertools.product(*opts):
                p = mass
                for j, v in zip(masked, combo):
                    p *= float(p0[j, v])
                conf = [math.log(float(p0[j, v])) for j, v in zip(masked, combo)]
                order = sorted(range(len(masked)), key=lambda i: (-conf[i], masked[i]))
                x = list(st)
                for i in order[:num]:
                    x[masked[i]] = combo[i]
                key = tuple(x)
                new[key] = new.get(key, 0.0) + p
        dist = new
    return dist


def chi_square_pvalue(samples: torch.Tensor, dist: dict[tuple, float], min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson chi-square of sampled sequences against ``dist`` (bins with small expectation pooled).
    Returns (p-value, number of samples that fell outside the support of ``dist``)."""
    from scipy import stats

    n = samples.shape[0]
    keys = list(dist)
    index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    outside = 0
    for row in samples.tolist():
        i = index.get(tuple(row))
        if i is None:
            outside += 1
        else:
            counts[i] += 1
    exp = np.array([dist[k] for k in keys]) * n
    big = exp >= min_expected
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big).any():
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    obs_b, exp_b = np.array(obs_b), np.array(exp_b)
    exp_b *= obs_b.sum() / exp_b.sum()
    return float(stats.chisquare(obs_b, exp_b).pvalue), outside


class ToyDenoiser:
    """A fixed, deliberately wrong denoiser: float32 logits from random tables of the position, the
    token there, its right neighbour's token and ``t`` (the mask column at ``-inf``, as SUBS). Samplers
    run on it are held to their exact law *for this model*, which, unlike the exact denoiser's, is not
    close to the data law, so small changes of the sampler's kernel show."""

    def __init__(self, V: int, L: int, mask_id: int, alpha_bar: torch.Tensor, seed: int = 0,
                 sharpness: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.sharpness = sharpness
        self.own = 1.5 * torch.randn(L, V, V, generator=g)
        self.right = 3.0 * torch.randn(V, V, generator=g)
        self.time = torch.randn(V, generator=g)
        self.V, self.L, self.mask_id, self.ab = V, L, mask_id, alpha_bar
        self.uses_time = True

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        n = x_t.shape[1]
        pos = torch.arange(n)
        out = self.own[pos[None, :], x_t] + self.right[torch.roll(x_t, -1, 1)]
        out = out + 0.1 * t.to(torch.float32)[:, None, None] * self.time
        out = self.sharpness * out
        out[..., self.mask_id] = float("-inf")
        return out

    def probs(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``softmax`` of the same float32 logits, in float64: ``(B, n, V)``."""
        return torch.softmax(self(x_t, t).to(torch.float64), -1)


def remdm_sigma(a_t: float, a_s: float, t: int, T: int, eta: float, schedule: str,
                window: tuple[float, float] | None) -> float:
    """ReMDM's remasking probability (Wang et al. 2025, §3 and §4.1), from the paper's definitions:
    ``σ_max = min(1, (1 - α_s)/α_t)`` (the largest σ that keeps the posterior a distribution),
    "rescale" ``σ = η·σ_max``, "cap" ``σ = min(η, σ_max)``; ReMDM-loop remasks only while ``t/T`` lies in
    the window."""
    if window is not None and not (window[0] <= t / T <= window[1]):
        return 0.0
    if a_t == 0:  # every position is masked at α_t = 0: σ moves nothing
        return 0.0
    smax = min(1.0, (1.0 - a_s) / a_t)
    return eta * smax if schedule == "rescale" else min(eta, smax)


def remdm_distribution(den: ExactDenoiser, steps: int, start: dict[tuple, float], T: int, mask_id: int,
                       eta: float, schedule: str = "rescale", window: tuple[float, float] | None = None,
                       top_k: int | None = None) -> dict[tuple, float]:
    """Exact law of ReMDM's output (one block), by dynamic programming over whole sequences.

    Each step ``t -> s`` moves every position independently by ReMDM's reverse kernel (Wang et al.
    2025, eq. 7), with ``x`` the denoiser's x0 marginal (restricted to its ``top_k`` tokens and
    renormalised when ``top_k`` is given):

    * a masked position becomes token ``v`` with probability ``(α_s - (1 - σ)·α_t)/(1 - α_t)·x[v]`` and
      stays masked with probability ``(1 - α_s - σ·α_t)/(1 - α_t)``;
    * a decoded token stays with probability ``1 - σ`` and goes back to the mask with probability ``σ``.
    """
    dist = dict(start)
    ab = den.ab
    grid = _grid(T, steps)
    L = len(next(iter(start)))
    for t, s in zip(grid[:-1], grid[1:]):
        a_t, a_s = float(ab[t]), float(ab[s])
        sigma = remdm_sigma(a_t, a_s, t, T, eta, schedule, window)
        states = list(dist)
        xs = torch.tensor(states, dtype=torch.int64)
        p0 = den.probs(xs, torch.full((len(states),), t))
        V = p0.shape[-1]
        if top_k is not None:
            kth = p0.topk(top_k, dim=-1).values[..., -1:]
            p0 = torch.where(p0 >= kth, p0, torch.zeros_like(p0))
            p0 = p0 / p0.sum(-1, keepdim=True)
        new: dict[tuple, float] = {}
        for i, st in enumerate(states):
            rows = torch.zeros(L, V, dtype=torch.float64)
            for j in range(L):
                if st[j] == mask_id:
                    rows[j] = (a_s - (1 - sigma) * a_t) / (1 - a_t) * p0[i, j]
                    rows[j, mask_id] = (1 - a_s - sigma * a_t) / (1 - a_t)
                else:
                    rows[j, st[j]] = 1 - sigma
                    rows[j, mask_id] += sigma
            _spread(new, st, 0, rows, dist[st])
        dist = new
    return {k: v for k, v in dist.items() if v > 0}


def guided_ancestral_distribution(den, steps: int, start: dict[tuple, float], T: int, kind: str,
                                  mask_id: int | None, grad, scale: float) -> dict[tuple, float]:
    """Exact law of the ancestral sampler under first-order discrete classifier guidance (one block):
    each step moves every position independently by its posterior ``p(x_s | x_t)`` (dense matrices, as
    :func:`ancestral_distribution`) tilted by ``exp(scale·g[l, x_s])`` and renormalised, with
    ``g = grad(x_t)`` the classifier's ``(n, L, V)`` gradient with respect to the one-hot ``x_t``
    (DiGress §5, Vignac et al. 2023)."""
    dist = dict(start)
    ab = den.ab
    for t, s in zip(_grid(T, steps)[:-1], _grid(T, steps)[1:]):
        states = list(dist)
        xs = torch.tensor(states, dtype=torch.int64)
        p0 = den.probs(xs, torch.full((len(states),), t))
        g = grad(xs).to(torch.float64)
        V = p0.shape[-1]
        new: dict[tuple, float] = {}
        for i, st in enumerate(states):
            post = _posterior_rows(kind, V, mask_id, p0[i], xs[i], float(ab[t]), float(ab[s]))
            w = post * torch.exp(scale * g[i])
            _spread(new, st, 0, w / w.sum(1, keepdim=True), dist[st])
        dist = new
    return {k: v for k, v in dist.items() if v > 0}
