"""The closed-form PyTorch reference of posterior_sample (absorbing with a scalar schedule, uniform: a softmax
pass, block sums, float64 only in the crossing block, the mask's closed-form share) against the dense
formulation it replaced, kept as the slow oracle ``_dense_sample`` (the process's own ``x0_log_probs`` /
``posterior_probs`` in float64, ``draw_from_weights``): the same tokens on many seeds, except rows whose
draw lies within rounding of a CDF boundary of the float64 posterior.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from fastdiff import discrete as D
from fastdiff import ops
from fastdiff import schedules as S
from tests import _oracles as O
from tests.ops import _cases as C

PS = importlib.import_module("fastdiff.ops.posterior_sample")
T = 50


def _inputs(process, n: int, seed: int, dtype: torch.dtype, all_masked: bool):
    g = C.gen(seed)
    V = process.vocab_size
    logits = torch.randn(n, V, generator=g, dtype=torch.float64) * 3.0
    logits[torch.rand(n, V, generator=g) < 0.05] = float("-inf")  # masked-out categories
    keep = (process.mask_id + 1) % V if process.kind == "absorbing" else 0
    logits[:, keep] = 0.0  # every row keeps a finite logit off the mask column
    if process.kind == "absorbing":
        logits[::7, process.mask_id] = 1e4  # a dominant mask logit: ignored all the same
        mask = torch.full((n,), process.mask_id)
        xt = mask if all_masked else torch.where(torch.rand(n, generator=g) < 0.7, mask,
                                                 torch.randint(0, V, (n,), generator=g))
    else:
        xt = torch.randint(0, V, (n,), generator=g)
    t = torch.randint(1, T + 1, (n,), generator=g)
    s = (torch.rand(n, generator=g) * t).long()  # 0 <= s < t, s = 0 included
    return logits.to(dtype), xt, t, s


def _check(process, logits, xt, t, s, seed: int, offset: int, temp: float, near: float, max_frac: float) -> None:
    n = xt.shape[0]
    got = ops.posterior_sample_ref(process, logits, xt, t, s, seed=seed, offset=offset, temperature=temp)
    want = PS._dense_sample(process, logits, xt, t, s, torch.arange(n), seed, offset, temp, 0)
    if process.kind == "absorbing":
        want = torch.where(xt == process.mask_id, want, xt)
        assert torch.equal(got[xt != process.mask_id], xt[xt != process.mask_id])
    diff = (got != want).nonzero().squeeze(-1).tolist()
    for r in diff:
        w = ops.categorical_posterior_ref(process, logits[r:r + 1].double(), xt[r:r + 1], t[r:r + 1], s[r:r + 1],
                                          temp)[0].numpy()
        assert w[int(got[r])] > 0, f"row {r}: a zero-probability token"
        assert O.margin(w, O.row_uniform(seed, offset, r)) < near, f"row {r} differs away from a CDF boundary"
    assert len(diff) <= max(1, int(n * max_frac)), f"{len(diff)} of {n} rows differ"


def _processes(V: int) -> dict:
    return {"absorbing-last": D.Absorbing(V, V - 1, S.cosine(T)),
            "absorbing-first": D.Absorbing(V, 0, S.mutual_info(T)),
            "absorbing-mid": D.Absorbing(V, V // 2, S.cosine(T)),
            "uniform": D.Uniform(V, S.cosine(T))}


@pytest.mark.parametrize("name", ["absorbing-last", "absorbing-first", "absorbing-mid", "uniform"])
@pytest.mark.parametrize("V,dtype", [(3001, torch.float32), (2500, torch.bfloat16)])
def test_wide_rows_equal_the_dense_oracle_but_at_boundaries(name, V, dtype):
    """Wide float32 / bfloat16 rows (the float32 softmax path): tokens differ only at near-ties, rarely."""
    process = _processes(V)[name]
    for k in range(4):
        logits, xt, t, s = _inputs(process, 120, seed=k, dtype=dtype, all_masked=k == 0)
        _check(process, logits, xt, t, s, seed=100 + k, offset=k, temp=(1.0, 0.6)[k % 2], near=1e-6,
               max_frac=1 / 100)


@pytest.mark.parametrize("name", ["absorbing-last", "absorbing-first", "absorbing-mid", "uniform"])
@pytest.mark.parametrize("V,dtype", [(2, torch.float32), (61, torch.float16), (700, torch.float32),
                                     (3001, torch.float64)])
def test_exact_rows_equal_the_dense_oracle(name, V, dtype):
    """Rows of at most 2048 categories and float64 logits are computed in float64 throughout: equal tokens
    except float64 near-ties (margin below 1e-12)."""
    process = _processes(V)[name]
    for k in range(3):
        logits, xt, t, s = _inputs(process, 150 if V < 3000 else 40, seed=10 + k, dtype=dtype, all_masked=k == 1)
        _check(process, logits, xt, t, s, seed=2**64 - 1 - k, offset=2**40 + k, temp=(1.0, 2.5, 0.3)[k],
               near=1e-12, max_frac=0.0)


def test_mask_share_is_closed_form_and_rows_without_weight_keep_x_t():
    """Absorbing, mask last: a masked row stays masked exactly when u·(1 - a_t) >= a_s - a_t; at a_t = a_s
    it always stays, at a_t = 1 (no weight) it is kept; s = 0 (a_s = 1) never. Uniform with every logit but one at -inf and s = 0: that token."""
    V, n = 4099, 400
    process = D.Absorbing(V, V - 1, S.cosine(T))
    logits = torch.randn(n, V, generator=C.gen(3))
    xt = torch.full((n,), V - 1)
    seed, tt, ss = 77, 30, 20
    got = ops.posterior_sample_ref(process, logits, xt, tt, ss, seed=seed)
    ab = process.schedule.alpha_bar.double()
    a_t, a_s = float(ab[tt]), float(ab[ss])
    u = np.array([O.row_uniform(seed, 0, r) for r in range(n)])
    stays = u * (1.0 - a_t) >= a_s - a_t
    assert 0 < stays.sum() < n
    np.testing.assert_array_equal(got.numpy() == V - 1, stays)
    assert torch.equal(ops.posterior_sample_ref(process, logits, xt, 30, 0, seed=seed) == V - 1,
                       torch.zeros(n, dtype=torch.bool))
    # alpha_bar 1 up to t = 10 (no weight at all: x_t kept), then flat at 0.5 (a_t = a_s: the mask stays)
    flat = D.Absorbing(V, V - 1, S.Schedule(torch.cat([torch.ones(11), torch.full((T - 10,), 0.5)]).double()))
    for t_, s_ in ((5, 2), (30, 20)):
        assert torch.equal(ops.posterior_sample_ref(flat, logits, xt, t_, s_, seed=seed), xt)
    one = torch.full((n, V), float("-inf"))
    one[:, 17] = 0.0
    uni = D.Uniform(V, S.cosine(T))
    got = ops.posterior_sample_ref(uni, one, torch.randint(0, V, (n,), generator=C.gen(4)), 30, 0, seed=seed)
    assert torch.equal(got, torch.full_like(got, 17))
