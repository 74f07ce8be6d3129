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
