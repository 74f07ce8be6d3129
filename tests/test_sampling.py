"""fastdiff.sampling against exact output distributions (dynamic programming over all sequences of a
small known joint), plus the behaviours the sampler promises: caching, fixed positions, blocks, KV
cache, EOS, guidance, lengths, continuous steps, determinism, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import continuous, discrete, ops, schedules
from fastdiff.sampling import Sampler, as_denoiser, sample
from tests import _exact as E

V, MASK, L, T = 5, 4, 3, 12
N_SAMPLES = 100_000
P_MIN = 1e-4  # a fixed seed makes every test deterministic; this only sets how unlucky a seed may be


def _absorbing():
    return discrete.Absorbing(V, MASK, schedules.mutual_info(T))


@pytest.fixture(scope="module")
def joint():
    return E.Joint(V, L, data_tokens=[0, 1, 2], seed=3, zero_some=False)  # token 3: never data


def _den(joint, process, time_free=True):
    return E.ExactDenoiser(joint, process.kind, process.schedule.alpha_bar, MASK if process.kind == "absorbing" else None,
                           time_free=time_free)


def _check(samples, dist):
    p, outside = E.chi_square_pvalue(samples, dist)
    assert outside == 0, f"{outside} samples outside the support of the exact distribution"
    assert p > P_MIN, f"chi-square p = {p:.2e}"


# ------------------------------------------------------------------------------------------------
# exact distributions
# ------------------------------------------------------------------------------------------------
def test_dp_with_many_steps_approaches_the_joint(joint):
    """Sanity of the oracle itself: with T steps of a T=12 absorbing process the ancestral sampler
    is close to exact (few simultaneous unmaskings), with few steps it is visibly not."""
    p = _absorbing()
    den = _den(joint, p)
    start = {(MASK,) * L: 1.0}
    target = joint.as_dict()
    tv = lambda d: 0.5 * sum(abs(d.get(k, 0.0) - target.get(k, 0.0)) for k in set(d) | set(target))  # noqa: E731
    many = E.ancestral_distribution(den, T, start, [(0, L)], T, "absorbing", MASK)
    one = E.ancestral_distribution(den, 1, start, [(0, L)], T, "absorbing", MASK)
    assert abs(sum(many.values()) - 1) < 1e-12
    assert tv(many) < tv(one)
    assert tv(one) > 0.05  # one step draws the positions independently: not the joint


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_ancestral_absorbing_matches_exact_distribution(joint, steps):
    p = _absorbing()
    den = _den(joint, p)
    out = sample(den, p, shape=(N_SAMPLES, L), steps=steps, seed=11)
    dist = E.ancestral_distribution(den, steps, {(MASK,) * L: 1.0}, [(0, L)], T, "absorbing", MASK)
    _check(out.tokens, dist)
    assert out.stats["network_calls"] == steps


def test_ancestral_uniform_matches_exact_distribution(joint):
    p = discrete.Uniform(V, schedules.cosine(T))
    j = E.Joint(V, L, data_tokens=list(range(V)), seed=5, zero_some=False)
    den = E.ExactDenoiser(j, "uniform", p.schedule.alpha_bar)
    start = {k: 1.0 / V**L for k in E.Joint(V, L, list(range(V)), zero_some=False).as_dict()}
    out = sample(den, p, shape=(N_SAMPLES, L), steps=3, seed=2)
    _check(out.tokens, E.ancestral_distribution(den, 3, start, [(0, L)], T, "uniform", None))


def test_cache_identical_samples_fewer_network_rows(joint):
    p = _absorbing()
    den_a, den_b = _den(joint, p), _den(joint, p)
    a = sample(den_a, p, shape=(4000, L), steps=T, seed=4)
    b = sample(den_b, p, shape=(4000, L), steps=T, seed=4, cache=True)
    assert torch.equal(a.tokens, b.tokens)
    assert b.stats["sequences_evaluated"] < a.stats["sequences_evaluated"]
    assert den_b.rows == b.stats["sequences_evaluated"] < den_a.rows
    # the cache still samples the exact law
    c = sample(_den(joint, p), p, shape=(N_SAMPLES, L), steps=4, seed=9, cache=True)
    _check(c.tokens, E.ancestral_distribution(den_a, 4, {(MASK,) * L: 1.0}, [(0, L)], T, "absorbing", MASK))


def test_cache_needs_a_time_free_model(joint):
    p = _absorbing()
    with pytest.raises(ValueError, match="cache"):
        sample(_den(joint, p, time_free=False), p, shape=(2, L), steps=2, cache=True)


@pytest.mark.parametrize("block_size", [1, 2])
def test_semi_autoregressive_matches_exact_distribution(joint, block_size):
    p = _absorbing()
    den = _den(joint, p)
    out = sample(den, p, shape=(N_SAMPLES, L), steps=2, seed=5, block_size=block_size)
    blocks = [(a, min(a + block_size, L)) for a in range(0, L, block_size)]
    _check(out.tokens, E.ancestral_distribution(den, 2, {(MASK,) * L: 1.0}, blocks, T, "absorbing", MASK))
    assert out.stats["network_calls"] == 2 * len(blocks)


def test_infilling_fixed_positions_exact_and_unchanged(joint):
    p = _absorbing()
    den = _den(joint, p)
    x_init = torch.full((N_SAMPLES, L), MASK)
    x_init[:, 1] = 2
    fixed = torch.zeros(N_SAMPLES, L, dtype=torch.bool)
    fixed[:, 1] = True
    out = sample(den, p, shape=(N_SAMPLES, L), steps=3, seed=6, fixed=fixed, x_init=x_init, trajectory=True)
    assert all(bool((x[:, 1] == 2).all()) for x in out.trajectory)
    dist = E.ancestral_distribution(den, 3, {(MASK, 2, MASK): 1.0}, [(0, L)], T, "absorbing", MASK)
    _check(out.tokens, dist)
    # the infilled law is the joint conditioned on the middle token (checked on its marginal support)
    assert all(k[1] == 2 for k in dist)


def test_confidence_matches_exact_distribution(joint):
    p = _absorbing()
    den = _den(joint, p)
    out = sample(den, p, shape=(N_SAMPLES, L), steps=2, seed=7, strategy="confidence", temperature=1.0)
    dist = E.confidence_distribution(den, 2, {(MASK,) * L: 1.0}, T, MASK, (False,) * L)
    _check(out.tokens, dist)


def test_confidence_greedy_follows_argmax_path(joint):
    p = _absorbing()
    den = _den(joint, p)
    out = sample(den, p, shape=(3, L), steps=L, strategy="confidence", temperature=0.0)
    # by hand: each step commits the single most probable (position, token) among masked positions
    x = [MASK] * L
    for _ in range(L):
        probs = den.probs(torch.tensor([x]), torch.tensor([1]))[0]
        best = max(((float(probs[j].max()), -j) for j in range(L) if x[j] == MASK))
        j = -best[1]
        x[j] = int(probs[j].argmax())
    assert out.tokens.tolist() == [x] * 3


def test_threshold_commits_confident_tokens_and_finishes(joint):
    p = _absorbing()
    den = _den(joint, p)
    out = sample(den, p, shape=(64, L), steps=L, strategy="threshold", threshold=0.5, temperature=0.0)
    assert not bool((out.tokens == MASK).any())
    assert out.stats["steps"] <= L
    lo = sample(_den(joint, p), p, shape=(64, L), steps=L, strategy="threshold", threshold=1e-9, temperature=0.0)
    assert lo.stats["steps"] == 1  # every position is above a zero threshold: all decoded at once


def test_remask_keeps_the_absorbing_law_at_eta_zero_and_changes_it_otherwise(joint):
    p = _absorbing()
    den = _den(joint, p)
    a = sample(den, p, shape=(N_SAMPLES, L), steps=3, seed=8, strategy="remask", eta=0.0)
    _check(a.tokens, E.ancestral_distribution(den, 3, {(MASK,) * L: 1.0}, [(0, L)], T, "absorbing", MASK))
    b = sample(den, p, shape=(2000, L), steps=6, seed=8, strategy="remask", eta=1.0, trajectory=True)
    assert not bool((b.tokens == MASK).any())
    # with eta = 1 some decoded tokens go back to the mask between steps
    remasked = sum(int(((x0 != MASK) & (x1 == MASK)).sum()) for x0, x1 in zip(b.trajectory, b.trajectory[1:]))
    assert remasked > 0


# ------------------------------------------------------------------------------------------------
# behaviour
# ------------------------------------------------------------------------------------------------
class RecordingModel:
    """Random but deterministic logits that depend on the input; records calls."""

    def __init__(self, V, uses_time=False, accepts_attention_mask=False):
        self.V = V
        self.uses_time = uses_time
        self.accepts_attention_mask = accepts_attention_mask
        self.calls = []
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(V + 1, V, generator=g)

    def __call__(self, x_t, t, **kw):
        self.calls.append({"x": x_t.clone(), "t": t.clone(), **{k: v for k, v in kw.items()}})
        ctx = torch.cumsum(self.table[x_t].sum(-1, keepdim=True), 1)
        out = self.table[x_t] + 0.1 * ctx
        if "y" in kw:
            out = out + kw["y"].to(out.dtype)[:, None, None] * self.table[self.V]
        return out


def test_deterministic_for_a_seed_and_different_across_seeds():
    p = discrete.Absorbing(50, 49, schedules.cosine(100))
    m = RecordingModel(50)
    for strategy in ("ancestral", "confidence", "threshold", "remask"):
        kw = {"eta": 0.3} if strategy == "remask" else {}
        a = sample(m, p, shape=(4, 16), steps=8, seed=1, strategy=strategy, **kw)
        b = sample(m, p, shape=(4, 16), steps=8, seed=1, strategy=strategy, **kw)
        c = sample(m, p, shape=(4, 16), steps=8, seed=2, strategy=strategy, **kw)
        assert torch.equal(a.tokens, b.tokens), strategy
        assert not torch.equal(a.tokens, c.tokens), strategy


def test_reference_backend_equals_auto():
    p = discrete.Absorbing(50, 49, schedules.cosine(100))
    m = RecordingModel(50)
    a = sample(m, p, shape=(4, 16), steps=8, seed=1, backend="reference")
    b = sample(m, p, shape=(4, 16), steps=8, seed=1)
    assert torch.equal(a.tokens, b.tokens)


def test_each_step_is_one_posterior_sample_call():
    """The ancestral step equals the fused op called by hand with offsets 1, 2, ... (0: the prior)."""
    p = discrete.Uniform(50, schedules.cosine(100))
    m = RecordingModel(50)
    out = sample(m, p, shape=(3, 7), steps=4, seed=3, backend="reference")
    from fastdiff import random as R
    u = R.uniform((3, 7), seed=3, offset=0)
    x = (u * 50).floor().long().clamp_max(49)  # the uniform prior by the inverse CDF
    grid = [100, 75, 50, 25, 0]
    for k, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        x = ops.posterior_sample_ref(p, m(x, torch.full((3,), t)), x, t, s, seed=3, offset=k + 1)
    assert torch.equal(out.tokens, x)


def test_classifier_free_guidance_one_batch_and_combination():
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    m = RecordingModel(20)
    y = torch.tensor([1.0, 2.0])
    out = sample(m, p, shape=(2, 6), steps=3, seed=0, cond={"y": y}, uncond={"y": torch.zeros(2)},
                 guidance_scale=3.0, trajectory=True)
    assert out.stats["network_calls"] == 3 and len(m.calls) == 3
    first = m.calls[0]
    assert first["x"].shape == (4, 6) and torch.equal(first["y"], torch.tensor([1.0, 2.0, 0.0, 0.0]))
    # the guided logits: recompute step 1 by hand and compare the drawn tokens with the op
    x0 = first["x"][:2]
    lc, lu = m(x0, first["t"][:2], y=y), m(x0, first["t"][:2], y=torch.zeros(2))
    guided = lu + 3.0 * (lc - lu)
    want = ops.posterior_sample_ref(p, guided, x0, 50, 33, seed=0, offset=1)
    assert torch.equal(out.trajectory[0], want)


def test_guidance_with_prompt_masks_the_prompt_in_the_unconditional_half():
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    m = RecordingModel(20)
    fixed = torch.tensor([[True, True, False, False]])
    x_init = torch.tensor([[3, 4, 19, 19]])
    sample(m, p, shape=(1, 4), steps=2, fixed=fixed, x_init=x_init, guidance_scale=2.0)
    x = m.calls[0]["x"]
    assert x[0, :2].tolist() == [3, 4] and x[1, :2].tolist() == [19, 19]


def test_variable_lengths_pad_and_attention_mask():
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    m = RecordingModel(20, accepts_attention_mask=True)
    lengths = torch.tensor([2, 5])
    out = sample(m, p, shape=(2, 5), steps=3, lengths=lengths, pad_id=0)
    assert out.tokens[0, 2:].tolist() == [0, 0, 0]
    am = m.calls[0]["attention_mask"]
    assert am.tolist() == [[True, True, False, False, False], [True] * 5]
    assert not bool((out.tokens == 19).any())


def test_eos_stops_a_sequence_and_skips_its_later_blocks():
    V_ = 10
    p = discrete.Absorbing(V_, 9, schedules.cosine(20))

    class EosFirst(RecordingModel):
        def __call__(self, x_t, t, **kw):  # sequence 0 always predicts EOS (=1); others token 2
            self.calls.append({"x": x_t.clone()})
            out = torch.full(x_t.shape + (V_,), -10.0)
            out[..., 2] = 0.0
            first = (x_t[:, :1] == 1) | (x_t[:, :1] == 9)  # rows that look like sequence 0
            out[first[:, 0].nonzero().squeeze(1), :, 1] = 10.0
            return out

    m = EosFirst(V_)
    x_init = torch.tensor([[9] * 6, [2] + [9] * 5])
    fixed = torch.tensor([[False] * 6, [True] + [False] * 5])
    out = sample(m, p, shape=(2, 6), steps=2, block_size=2, eos_id=1, pad_id=0, fixed=fixed, x_init=x_init)
    assert out.tokens[0].tolist() == [1, 0, 0, 0, 0, 0]
    assert out.tokens[1].tolist() == [2, 2, 2, 2, 2, 2]
    assert out.stats["stopped_at_eos"] == 1
    rows = [c["x"].shape[0] for c in m.calls]
    assert rows == [2, 2, 1, 1, 1, 1]  # sequence 0 is not evaluated after its first block


class BlockCausal(torch.nn.Module):
    """A one-layer block-causal attention model: position i attends to j iff block(j) <= block(i).
    Earlier (clean) blocks are embedded at time 0, so their keys/values never change: cacheable."""

    uses_time = True

    def __init__(self, V, block, width=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.block = block
        self.emb = torch.nn.Parameter(torch.randn(V, width, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(64, width, generator=g))
        self.time = torch.nn.Parameter(torch.randn(1, width, generator=g) * 0.01)
        self.qkv = torch.nn.Parameter(torch.randn(width, 3 * width, generator=g) / width**0.5)
        self.out = torch.nn.Parameter(torch.randn(width, V, generator=g))

    def _h(self, x, t, start):
        n = x.shape[1]
        return self.emb[x] + self.pos[start:start + n] + t.float()[:, None, None] * self.time

    def forward(self, x, t, cache=None, start=0):
        if cache is None:  # full recompute on the prefix + current block
            n = x.shape[1]
            cur = (n - 1) // self.block * self.block
            tpos = torch.where(torch.arange(n) >= cur, 1.0, 0.0)[None, :] * t.float()[:, None]
            h = self.emb[x] + self.pos[:n] + tpos[..., None] * self.time
            q, k, v = (h @ self.qkv).chunk(3, -1)
            bi = torch.arange(n) // self.block
            allowed = bi[None, :] <= bi[:, None]
            att = (q @ k.transpose(1, 2)).masked_fill(~allowed, float("-inf")).softmax(-1)
            return (att @ v) @ self.out
        h = self._h(x, t, start)
        q, k, v = (h @ self.qkv).chunk(3, -1)
        k = torch.cat([cache[0], k], 1)
        v = torch.cat([cache[1], v], 1)
        att = (q @ k.transpose(1, 2)).softmax(-1)
        return (att @ v) @ self.out

    def new_cache(self, B):
        w = self.qkv.shape[0]
        return (torch.zeros(B, 0, w), torch.zeros(B, 0, w))

    def extend_cache(self, cache, x_block, start):
        h = self._h(x_block, torch.zeros(x_block.shape[0], dtype=torch.int64), start)
        _, k, v = (h @ self.qkv).chunk(3, -1)
        return (torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1))


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_kv_cache_path_equals_full_recompute(strategy):
    V_ = 30
    p = discrete.Absorbing(V_, V_ - 1, schedules.cosine(40))
    m = BlockCausal(V_, 3).eval()
    # the protocol's uncached reference is the model on x[:, :start + block] (this toy's time input marks
    # the last block of its input as the current one): block_context="prefix"
    kw = dict(shape=(5, 10), steps=4, seed=3, block_size=3, strategy=strategy)
    a = sample(m, p, block_context="prefix", **kw)
    b = sample(m, p, kv_cache=True, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert not bool((a.tokens == V_ - 1).any())


def test_progress_bar_and_stats():
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    out = sample(RecordingModel(20), p, shape=(2, 4), steps=5, progress=True)
    for key in ("network_calls", "steps", "tokens_per_s", "model_time_s", "overhead_fraction"):
        assert key in out.stats
    assert out.stats["steps"] == 5 and out.stats["tokens_per_s"] > 0


def test_sampler_object_reuse_and_overrides():
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    s = Sampler(p, steps=4, strategy="ancestral", temperature=0.8)
    m = RecordingModel(20)
    assert torch.equal(s.sample(m, shape=(2, 5), seed=1).tokens,
                       sample(m, p, shape=(2, 5), steps=4, seed=1, temperature=0.8).tokens)
    # an override applies to that call only, exactly as a sampler built with it
    hot = Sampler(p, steps=4, strategy="ancestral", temperature=2.0)
    assert torch.equal(s.sample(m, shape=(2, 5), seed=1, temperature=2.0).tokens,
                       hot.sample(m, shape=(2, 5), seed=1).tokens)
    assert s.options.temperature == 0.8


def test_top_k_one_is_greedy_x0():
    """top_k=1 leaves one candidate per position: every unmasked token is the row's argmax."""
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    m = RecordingModel(20)
    out = sample(m, p, shape=(3, 8), steps=8, top_k=1, trajectory=True)
    x_prev = torch.full((3, 8), 19)
    for call, x in zip(m.calls, out.trajectory):
        logits = m(call["x"], call["t"])
        logits[..., 19] = float("-inf")
        new = (x_prev == 19) & (x != 19)
        assert torch.equal(x[new], logits.argmax(-1)[new])
        x_prev = x


# ------------------------------------------------------------------------------------------------
# continuous
# ------------------------------------------------------------------------------------------------
def _emb(Vc=12, D=4):
    return torch.randn(Vc, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("strategy", ["ddpm", "ddim"])
def test_continuous_oracle_x0_model_recovers_target(strategy):
    emb = _emb()
    target = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    diff = continuous.GaussianDiffusion(schedules.sqrt(50), parameterization="x0")
    oracle = lambda x, t: emb[target].to(x.dtype)  # noqa: E731
    out = sample(oracle, diff, shape=(2, 5), steps=7, strategy=strategy, embedding=emb, clamp="never")
    assert torch.equal(out.tokens, target)
    torch.testing.assert_close(out.x, emb[target])


def test_ddim_matches_a_hand_written_loop_with_clamping_every_step():
    emb = _emb()
    diff = continuous.GaussianDiffusion(schedules.cosine(40), parameterization="eps")
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = lambda x, t: torch.tanh(x @ W) * (t.to(x.dtype)[:, None, None] / 40)  # noqa: E731
    out = sample(model, diff, shape=(2, 3), steps=5, strategy="ddim", embedding=emb, clamp="every", seed=4)
    from fastdiff import random as R
    ab = diff.alpha_bar
    x = R.randn((2, 3, 4), seed=4, offset=0, dtype=torch.float64)
    grid = [40, 32, 24, 16, 8, 0]
    for t, s in zip(grid[:-1], grid[1:]):
        eps = model(x, torch.full((2,), t))
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        d = ((x0[..., None, :] - emb) ** 2).sum(-1)  # brute-force nearest row
        x0 = emb[d.argmin(-1)]
        eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        x = ab[s].sqrt() * x0 + (1 - ab[s]).sqrt() * eps
    torch.testing.assert_close(out.x, x)
    d = ((x[..., None, :] - emb) ** 2).sum(-1)
    assert torch.equal(out.tokens, d.argmin(-1))


def test_ddpm_matches_a_hand_written_loop_with_classifier_guidance():
    emb = _emb()
    diff = continuous.GaussianDiffusion(schedules.sqrt(30), parameterization="x0")
    model = lambda x, t: 0.5 * x  # noqa: E731
    goal = emb[torch.tensor([[2, 7]])]
    grad = lambda x, t: goal - x  # noqa: E731  ∇ of -|x - goal|²/2
    out = sample(model, diff, shape=(1, 2), steps=3, strategy="ddpm", embedding=emb, clamp="never", seed=5,
                 classifier_grad=grad, classifier_scale=2.0)
    from fastdiff import random as R
    ab = diff.alpha_bar
    x = R.randn((1, 2, 4), seed=5, offset=0, dtype=torch.float64)
    grid = [30, 20, 10, 0]
    for k, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        x0 = 0.5 * x
        r = ab[t] / ab[s]
        mean = ab[s].sqrt() * (1 - r) / (1 - ab[t]) * x0 + r.sqrt() * (1 - ab[s]) / (1 - ab[t]) * x
        var = (1 - ab[s]) / (1 - ab[t]) * (1 - r)
        mean = mean + 2.0 * var * (goal - x)
        x = mean if s == 0 else mean + var.sqrt() * R.randn((1, 2, 4), seed=5, offset=k + 1, dtype=torch.float64)
    torch.testing.assert_close(out.x, x)


def test_self_conditioning_passes_the_previous_estimate():
    emb = _emb()
    diff = continuous.GaussianDiffusion(schedules.sqrt(30), parameterization="x0")
    seen = []

    def model(x, t, x_self_cond):
        seen.append(x_self_cond.clone())
        return 0.3 * x + 0.1 * x_self_cond

    sample(model, diff, shape=(2, 3), steps=3, strategy="ddim", embedding=emb, self_condition=True, clamp="never")
    assert torch.equal(seen[0], torch.zeros(2, 3, 4, dtype=torch.float64))
    assert not torch.equal(seen[1], seen[0])


def test_continuous_fixed_positions_are_clean_embeddings():
    emb = _emb()
    diff = continuous.GaussianDiffusion(schedules.sqrt(30), parameterization="x0")
    seen = []
    model = lambda x, t: (seen.append(x.clone()), torch.zeros_like(x))[1]  # noqa: E731
    fixed = torch.tensor([[True, False, False]])
    x_init = torch.tensor([[7, 0, 0]])
    out = sample(model, diff, shape=(1, 3), steps=3, strategy="ddpm", embedding=emb, fixed=fixed, x_init=x_init)
    for x in seen:
        torch.testing.assert_close(x[0, 0], emb[7])
    assert int(out.tokens[0, 0]) == 7


# ------------------------------------------------------------------------------------------------
# adapters and errors
# ------------------------------------------------------------------------------------------------
def test_adapter_time_keyword_and_output_unwrapping():
    seen = {}

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def fn(x, timestep):
        seen["t"] = timestep
        return Out(torch.zeros(x.shape + (6,)))

    den = as_denoiser(fn, time_kwarg="timestep")
    y = den(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([4, 4]))
    assert y.shape == (2, 3, 6) and seen["t"].tolist() == [4, 4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="nope"), "strategy"),
    (dict(steps=0), "steps"),
    (dict(steps=1000), "steps"),
    (dict(strategy="ddim"), "strategy"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(fixed=torch.zeros(2, 4, dtype=torch.bool)), "x_init"),
    (dict(fixed=torch.zeros(3, 4, dtype=torch.bool), x_init=torch.zeros(3, 4, dtype=torch.int64)), "fixed"),
    (dict(kv_cache=True), "kv_cache"),
    (dict(guidance_scale=2.0), "guidance_scale"),
    (dict(cond={"y": torch.zeros(2)}, guidance_scale=2.0), "uncond"),
    (dict(lengths=torch.tensor([1, 9])), "lengths"),
    (dict(eos_id=99), "eos_id"),
    (dict(backend="gpu"), "backend"),
    (dict(shape=(2,)), "shape"),
    (dict(wrong_option=1), "wrong_option"),
])
def test_bad_inputs_are_rejected(kwargs, match):
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    args = dict(shape=(2, 4), steps=3)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        sample(RecordingModel(20), p, **args)


def test_bad_model_output_is_rejected():
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    with pytest.raises(ValueError, match="model"):
        sample(lambda x, t: torch.zeros(x.shape + (7,)), p, shape=(2, 4), steps=2)
    with pytest.raises(ValueError, match="NaN"):
        sample(lambda x, t: torch.full(x.shape + (20,), math.nan), p, shape=(2, 4), steps=2)


def test_strategy_process_mismatch():
    with pytest.raises(ValueError, match="absorbing"):
        sample(RecordingModel(20), discrete.Uniform(20, schedules.cosine(50)), shape=(2, 4), steps=2,
               strategy="confidence")
    with pytest.raises(ValueError, match="embedding"):
        sample(lambda x, t: x, continuous.GaussianDiffusion(schedules.sqrt(20)), shape=(2, 4), steps=2,
               strategy="ddim")


def test_cuda_graph_needs_cuda():
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    with pytest.raises(ValueError, match="cuda_graph"):
        sample(RecordingModel(20), p, shape=(2, 4), steps=2, cuda_graph=True, device="cpu")
    with pytest.raises(ValueError, match="cuda_graph"):
        sample(RecordingModel(20), p, shape=(2, 4), steps=2, cuda_graph=True, cache=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager_on_gpu():
    from fastdiff.testing import TinyDenoiser
    p = discrete.Absorbing(64, 63, schedules.cosine(100))
    m = TinyDenoiser(64).cuda().eval()
    kw = dict(shape=(8, 32), steps=10, seed=3, device="cuda")
    for strategy in ("ancestral", "confidence"):
        a = sample(m, p, strategy=strategy, **kw)
        b = sample(m, p, strategy=strategy, cuda_graph=True, **kw)
        assert torch.equal(a.tokens, b.tokens), strategy


def test_hf_like_model_with_uses_time_needs_a_time_keyword():
    class FakeHF:
        class config:
            vocab_size = 8

        def get_input_embeddings(self):
            return None

        def __call__(self, input_ids, **kw):
            return torch.zeros(input_ids.shape + (8,))

    with pytest.raises(ValueError, match="time_kwarg"):
        as_denoiser(FakeHF(), uses_time=True)
    assert as_denoiser(FakeHF()).uses_time is False
    assert as_denoiser(FakeHF(), time_kwarg="timestep").uses_time is True


def test_chunked_logsumexp_equals_torch():
    from fastdiff.sampling._discrete import _logsumexp
    z = torch.randn(3, 50, 1000, dtype=torch.float64)
    z[0, 0, :500] = float("-inf")
    torch.testing.assert_close(_logsumexp(z, block=4096).double(), torch.logsumexp(z, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clamp", ["never", "last"])
def test_continuous_blocks_round_each_block_and_use_it_as_clean_context(clamp):
    emb = _emb()
    target = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    diff = continuous.GaussianDiffusion(schedules.sqrt(50), parameterization="x0")
    seen = []

    def oracle(x, t):
        seen.append(x.clone())
        return emb[target[:, : x.shape[1]]].to(x.dtype)

    out = sample(oracle, diff, shape=(2, 5), steps=3, strategy="ddpm", embedding=emb, clamp=clamp, block_size=2)
    assert torch.equal(out.tokens, target)
    assert out.stats["tokens_generated"] == 10 and out.stats["network_calls"] == 9
    # the second block's calls see the first block as its clean embeddings
    torch.testing.assert_close(seen[3][:, :2], emb[target[:, :2]])


def test_guidance_keeps_logits_that_both_halves_mask():
    """An MDLM-style model puts -inf on the mask column in both halves: guidance must keep it -inf
    (lerp alone would make it NaN), and the guided step equals the op on the hand-combined logits."""
    p = discrete.Absorbing(20, 19, schedules.cosine(50))
    m = RecordingModel(20)

    def subs_model(x, t, y):
        out = m(x, t, y=y)
        out[..., 19] = float("-inf")
        return out

    y = torch.tensor([1.0, 2.0])
    out = sample(subs_model, p, shape=(2, 6), steps=3, seed=0, cond={"y": y}, uncond={"y": torch.zeros(2)},
                 guidance_scale=2.5, trajectory=True)
    x0 = torch.full((2, 6), 19)
    lc, lu = subs_model(x0, torch.full((2,), 50), y), subs_model(x0, torch.full((2,), 50), torch.zeros(2))
    guided = lu + 2.5 * (lc - lu)
    guided[..., 19] = float("-inf")
    assert torch.equal(out.trajectory[0], ops.posterior_sample_ref(p, guided, x0, 50, 33, seed=0, offset=1))
