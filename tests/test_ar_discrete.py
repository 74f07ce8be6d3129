"""AR-Diffusion carried over to discrete processes (``strategy="ar_ancestral"``; issue 17, row 3): the
sampler's output law equals the exact law of the method, computed by dynamic programming over whole
sequences from the definitions (per-position transition matrices, tests/_exact.py), for a fixed toy
denoiser that reads each position's own step; the model is called with the anchor-point steps; and
positions are decoded left to right."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastdiff import discrete, schedules
from fastdiff.continuous import ar_step_pairs, ar_timesteps
from fastdiff.errors import InputError, InputTypeError
from fastdiff.sampling import sample
from tests import _exact as E

V, MASK, L, T = 5, 4, 3, 12
N_SAMPLES = 60_000
P_MIN = 1e-4


class _PerPositionToy:
    """Fixed, deliberately wrong float32 logits from random tables of the position, its token, its right
    neighbour and its own step ``t[b, l]`` (the mask column at -inf for absorbing processes)."""

    def __init__(self, mask_id: int | None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.own = 1.5 * torch.randn(L, V, V, generator=g)
        self.right = 2.0 * torch.randn(V, V, generator=g)
        self.time = torch.randn(V, generator=g)
        self.mask_id = mask_id
        self.seen: list[torch.Tensor] = []

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1])
        out = self.own[pos[None, :], x] + self.right[torch.roll(x, -1, 1)]
        out = out + 0.2 * t.to(torch.float32)[..., None] * self.time
        if self.mask_id is not None:
            out[..., self.mask_id] = float("-inf")
        return out

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.clone())
        return self.logits(x_t, t)


def _exact_law(model: _PerPositionToy, process, kind: str, steps: int, start: dict) -> dict:
    ab = process.schedule.alpha_bar
    dist = dict(start)
    for t_tok, s_tok in ar_step_pairs(L, T, steps):
        new: dict = {}
        for st, mass in dist.items():
            x = torch.tensor([st])
            p0 = torch.softmax(model.logits(x, t_tok[None]).to(torch.float64), -1)[0]  # (L, V)
            rows = []
            for n in range(L):
                tn, sn = int(t_tok[n]), int(s_tok[n])
                if sn == tn:
                    rows.append(torch.nn.functional.one_hot(torch.tensor(st[n]), V).to(torch.float64))
                else:
                    rows.append(E._posterior_rows(kind, V, MASK if kind == "absorbing" else None, p0[n:n + 1],
                                                  x[0, n:n + 1], float(ab[tn]), float(ab[sn]))[0])
            choices = [torch.nonzero(r > 0).squeeze(1).tolist() for r in rows]
            for combo in itertools.product(*choices):
                p = mass
                for n, v in enumerate(combo):
                    p *= float(rows[n][v])
                new[combo] = new.get(combo, 0.0) + p
        dist = new
    return {k: v for k, v in dist.items() if v > 0}


def _check(samples: torch.Tensor, dist: dict) -> None:
    p, outside = E.chi_square_pvalue(samples, dist)
    assert outside == 0, f"{outside} samples outside the support of the exact distribution"
    assert p > P_MIN, f"chi-square p = {p:.2e}"


def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize("steps, seed", [(5, 11), (15, 12)])
def test_absorbing_matches_its_exact_law(steps, seed):
    process = discrete.Absorbing(V, MASK, schedules.mutual_info(T))
    model = _PerPositionToy(MASK, seed=1)
    out = sample(model, process, shape=(N_SAMPLES, L), steps=steps, strategy="ar_ancestral", seed=seed)
    dist = _exact_law(model, process, "absorbing", steps, {(MASK,) * L: 1.0})
    # the per-position schedule matters: the same model under the plain ancestral sampler has another law
    plain = E.ancestral_distribution(_Const(model, T), steps, {(MASK,) * L: 1.0}, [(0, L)], T, "absorbing", MASK,
                                     context="full")
    assert _tv(dist, plain) > 0.02
    _check(out.tokens, dist)


def test_uniform_matches_its_exact_law():
    process = discrete.Uniform(V, schedules.cosine(T))
    model = _PerPositionToy(None, seed=2)
    out = sample(model, process, shape=(N_SAMPLES, L), steps=6, strategy="ar_ancestral", seed=13)
    start = {k: 1.0 / V**L for k in itertools.product(range(V), repeat=L)}
    _check(out.tokens, _exact_law(model, process, "uniform", 6, start))


class _Const:
    """The toy model as an exact-law oracle's denoiser with one step per sequence (for the contrast above)."""

    def __init__(self, model: _PerPositionToy, T: int) -> None:
        self.model, self.joint = model, type("J", (), {"V": V, "L": L})()

    def probs(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model.logits(x, t[:, None].expand(-1, x.shape[1])).to(torch.float64), -1)

    @property
    def ab(self) -> torch.Tensor:
        return discrete.Absorbing(V, MASK, schedules.mutual_info(T)).schedule.alpha_bar


def test_model_sees_the_anchor_point_steps_and_positions_finish_left_to_right():
    process = discrete.Absorbing(V, MASK, schedules.mutual_info(T))
    model = _PerPositionToy(MASK, seed=3)
    steps, B = 6, 64
    out = sample(model, process, shape=(B, L), steps=steps, strategy="ar_ancestral", seed=5, trajectory=True)
    pairs = ar_step_pairs(L, T, steps)
    sent = torch.linspace(L + T, 0, steps + 1, dtype=torch.float64).round().long()
    assert len(model.seen) == len(pairs) == steps
    for k, (t_tok, s_tok) in enumerate(pairs):
        assert torch.equal(model.seen[k], t_tok.expand(B, L))
        assert torch.equal(t_tok, ar_timesteps(L, T, int(sent[k])))
        x = out.trajectory[k]
        assert not bool((x[:, s_tok == 0] == MASK).any())  # a position whose step reached 0 is clean
        assert bool((x[:, s_tok == T] == MASK).all())  # a position not started is still masked
    assert not bool((out.tokens == MASK).any())


def test_fixed_positions_are_kept():
    process = discrete.Absorbing(V, MASK, schedules.mutual_info(T))
    model = _PerPositionToy(MASK, seed=4)
    fixed = torch.tensor([[False, True, False]]).expand(8, L)
    x_init = torch.full((8, L), MASK)
    x_init[:, 1] = 2
    out = sample(model, process, shape=(8, L), steps=5, strategy="ar_ancestral", seed=6, fixed=fixed,
                 x_init=x_init, trajectory=True)
    for x in out.trajectory:
        assert bool((x[:, 1] == 2).all())


def test_rejects_what_it_does_not_define():
    process = discrete.Absorbing(V, MASK, schedules.mutual_info(T))
    model = _PerPositionToy(MASK)
    with pytest.raises(InputError, match="^block_size: AR-Diffusion"):
        sample(model, process, shape=(1, L), steps=3, strategy="ar_ancestral", block_size=1)
    with pytest.raises((InputError, InputTypeError), match="^top_k"):
        sample(model, process, shape=(1, L), steps=3, strategy="ar_ancestral", top_k=2)
    with pytest.raises(InputError, match="^steps"):
        sample(model, process, shape=(1, L), steps=L + T + 1, strategy="ar_ancestral")
