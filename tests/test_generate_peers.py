"""fastdiff.generate against independent re-implementations of each family's published loop (tests/peers).

Part 1 checks the peers and the test models themselves (so a failure in part 2 points at fastdiff);
part 2 compares ``fastdiff.generate(..., preset=...)`` with the peers: token-for-token and network-call
counts for the deterministic settings, a chi-square two-sample test on the joint outcome of a very short
generation for the random ones.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, Callable

import pytest
import torch

from tests.peers import models as M
from tests.peers.bd3lm import bd3lm_generate
from tests.peers.dream import dream_generate
from tests.peers.fast_dllm import choose, fast_dllm_generate
from tests.peers.llada import llada_generate
from tests.peers.mdlm import duo_generate, mdlm_generate

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 50, 49
P_ALPHA = 1e-3  # significance of every two-sample test


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompts(B: int, P: int, seed: int = 1, vocab: int = V - 1) -> torch.Tensor:
    return torch.randint(vocab, (B, P), generator=gen(seed))


# ------------------------------------------------------------------------------------------------
# chi-square two-sample test (scipy if present, else our own statistic and the Wilson-Hilferty tail)
# ------------------------------------------------------------------------------------------------
def two_sample_p(a: list[tuple], b: list[tuple]) -> float:
    """p-value of "a and b come from the same distribution" (chi-square on the 2 x K table; categories
    with fewer than 10 draws in both samples together are pooled into one)."""
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb))
    rows, rare = [], [0, 0]
    for k in keys:
        if ca[k] + cb[k] < 10:
            rare[0] += ca[k]
            rare[1] += cb[k]
        else:
            rows.append([ca[k], cb[k]])
    if sum(rare):
        rows.append(rare)
    if len(rows) < 2:
        return 1.0
    na, nb = len(a), len(b)
    n = na + nb
    stat = 0.0
    for r in rows:
        tot = r[0] + r[1]
        for x, m in ((r[0], na), (r[1], nb)):
            e = tot * m / n
            stat += (x - e) ** 2 / e
    dof = len(rows) - 1
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:  # pragma: no cover
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / (2 / (9 * dof)) ** 0.5
        return float(0.5 * torch.erfc(torch.tensor(z / 2 ** 0.5)))


def outcomes(x: torch.Tensor, P: int) -> list[tuple]:
    return [tuple(r) for r in x[:, P:].tolist()]


# ================================================================================================
# Part 1: the test models and the peers on their own
# ================================================================================================
def test_models_agree_on_output_wrappers() -> None:
    x = prompts(2, 6)
    ref = M.TinyLM(seed=3)(x)
    for cls in (M.DictLM, M.MaskedLMOutputLM, M.CachedLM):
        torch.testing.assert_close(M.logits_of(cls(seed=3)(x)), ref, rtol=0, atol=0)
    assert ref.shape == (2, 6, V)


def test_model_honours_padding_and_positions() -> None:
    """A left-padded row's real-token logits equal those of the unpadded prompt (fp32, atol 1e-5)."""
    m = M.TinyLM(seed=4)
    p = prompts(1, 4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), p], dim=1)
    am = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    out = M.call_lm(m, padded, am)[:, 3:]
    torch.testing.assert_close(out, M.call_lm(m, p, torch.ones_like(p)), rtol=0, atol=1e-5)
    # and positions matter: the same tokens without position_ids shifted give other logits
    assert (m(padded)[:, 3:] - out).abs().max() > 1e-3


def test_cached_model_window_equals_full_forward() -> None:
    m = M.CachedLM(seed=5)
    x = prompts(3, 9)
    full, cache = m.kv_forward(x, torch.zeros(3, dtype=torch.long))
    for s, e in ((0, 9), (4, 9), (3, 6), (8, 9)):
        win = m.kv_window(x[:, s:e], None, cache=cache, start=s)
        torch.testing.assert_close(win, full[:, s:e], rtol=0, atol=1e-5)
    # a changed window sees its own new tokens: differs from the stale full forward
    y = x.clone()
    y[:, 4] = (y[:, 4] + 1) % (V - 1)
    assert (m.kv_window(y[:, 3:6], None, cache=cache, start=3) - full[:, 3:6]).abs().max() > 1e-4


def test_block_causal_model_cache_is_exact() -> None:
    m = M.BlockCausalLM(seed=6, block_size=2)
    x = prompts(2, 8)
    full = m(x)
    cache = m.new_cache(2)
    for s in range(0, 8, 2):
        torch.testing.assert_close(m(x[:, s:s + 2], None, cache=cache, start=s), full[:, s:s + 2],
                                   rtol=0, atol=1e-5)
        cache = m.extend_cache(cache, x[:, s:s + 2], s)
    # block-causal: changing a later block does not change an earlier block's logits
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % (V - 1)
    torch.testing.assert_close(m(y)[:, :6], full[:, :6], rtol=0, atol=0)


class _Recorder:
    """Wraps a model; records the number of masks in every call's input."""

    def __init__(self, model: Any) -> None:
        self.model, self.masks = model, []

    def __call__(self, x: torch.Tensor, **kw: Any) -> Any:
        self.masks.append(int((x == MASK).sum()))
        return self.model(x, **kw)


def test_llada_peer_one_token_per_step_when_steps_equal_length() -> None:
    rec = _Recorder(M.TinyLM(seed=7))
    x, calls = llada_generate(rec, prompts(1, 5), max_new_tokens=6, steps=6, block_length=6, mask_id=MASK,
                              generator=gen())
    assert calls == 6 and rec.masks == [6, 5, 4, 3, 2, 1]
    assert not bool((x == MASK).any())


def test_llada_peer_greedy_reveals_most_confident_first() -> None:
    """Steps = N, one block: the first revealed position is the argmax over positions of max softmax."""
    m = M.TinyLM(seed=8)
    p = prompts(1, 3)
    x, _ = llada_generate(m, p, max_new_tokens=4, steps=4, mask_id=MASK, generator=gen())
    first = torch.cat([p, torch.full((1, 4), MASK)], dim=1)
    probs = torch.softmax(m(first).double(), -1)[0, 3:]
    j = int(probs.max(-1).values.argmax())
    assert x[0, 3 + j] == probs[j].argmax()


def test_llada_peer_blocks_fill_left_to_right() -> None:
    rec = _Recorder(M.TinyLM(seed=9))
    x, calls = llada_generate(rec, prompts(1, 2), max_new_tokens=6, steps=6, block_length=2, mask_id=MASK,
                              generator=gen())
    assert calls == 6 and rec.masks == [6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("block", [3, 6])
def test_fast_dllm_peer_threshold_above_one_is_llada_one_per_step(block: int) -> None:
    m = M.TinyLM(seed=10)
    p = prompts(2, 5)
    a, ca = fast_dllm_generate(m, p, max_new_tokens=6, steps=6, block_length=block, mask_id=MASK,
                               threshold=1.01, generator=gen())
    b, cb = llada_generate(m, p, max_new_tokens=6, steps=6, block_length=block, mask_id=MASK, generator=gen())
    assert torch.equal(a, b) and ca == cb == 6


def test_fast_dllm_peer_without_threshold_is_llada() -> None:
    m = M.TinyLM(seed=11)
    p = prompts(1, 4)
    a, ca = fast_dllm_generate(m, p, max_new_tokens=8, steps=4, block_length=4, mask_id=MASK, generator=gen())
    b, cb = llada_generate(m, p, max_new_tokens=8, steps=4, block_length=4, mask_id=MASK, generator=gen())
    assert torch.equal(a, b) and ca == cb == 4


def test_fast_dllm_choose_rules_by_hand() -> None:
    c = torch.tensor([0.5, 0.9, 0.3, 0.8], dtype=torch.float64)
    cand = torch.tensor([True, True, True, True])
    # threshold 0.7: 0.9 and 0.8
    assert choose(c, cand, count=None, threshold=0.7, factor=None).tolist() == [False, True, False, True]
    # threshold 0.95: only the argmax
    assert choose(c, cand, count=None, threshold=0.95, factor=None).tolist() == [False, True, False, False]
    # factor 1: sorted 0.9, 0.8, 0.5, 0.3; thresholds (i >= 1) 1 - 1/(i + 2): 0.667, 0.75, 0.8
    # 0.8 >= 0.667 ok; 0.5 < 0.75 fails at i = 2 (not the last) -> 2 tokens
    assert choose(c, cand, count=None, threshold=None, factor=1.0).tolist() == [False, True, False, True]
    # the quirk: failing at the last candidate reveals all (sorted 0.9, 0.8, 0.5: 0.5 < 0.75 at i = 2 = last)
    c3, cand3 = torch.tensor([0.9, 0.8, 0.5], dtype=torch.float64), torch.tensor([True, True, True])
    assert choose(c3, cand3, count=None, threshold=None, factor=1.0).tolist() == [True, True, True]
    # failing at i = 1 -> only the first
    c4 = torch.tensor([0.9, 0.2, 0.1, 0.05], dtype=torch.float64)
    assert choose(c4, cand, count=None, threshold=None, factor=1.0).tolist() == [True, False, False, False]
    # non-candidates are never chosen; a single candidate always is
    one = torch.tensor([False, False, True, False])
    assert choose(c, one, count=None, threshold=None, factor=1.0).tolist() == [False, False, True, False]
    assert choose(c, one, count=None, threshold=0.99, factor=None).tolist() == [False, False, True, False]


def test_fast_dllm_cached_peers_reveal_everything_and_count_calls() -> None:
    m = M.CachedLM(seed=12)
    p = prompts(1, 5)
    for cache in ("prefix", "dual"):
        x, calls = fast_dllm_generate(m, p, max_new_tokens=8, steps=8, block_length=4, mask_id=MASK,
                                      cache=cache, generator=gen())
        assert calls == 8 and not bool((x == MASK).any())
    # one block, first step of it: the full forward, identical to the uncached loop's first step
    a, _ = fast_dllm_generate(m, p, max_new_tokens=4, steps=1, block_length=4, mask_id=MASK, cache="dual",
                              generator=gen())
    b, _ = fast_dllm_generate(m, p, max_new_tokens=4, steps=1, block_length=4, mask_id=MASK, generator=gen())
    assert torch.equal(a, b)


def test_dream_peer_reveals_everything_by_the_last_step() -> None:
    m = M.TinyLM(seed=13)
    for alg in ("maskgit_plus", "topk_margin", "entropy", "origin"):
        x, calls = dream_generate(m, prompts(2, 3), max_new_tokens=5, steps=3, mask_id=MASK, alg=alg,
                                  generator=gen())
        assert calls == 3 and not bool((x == MASK).any())


def test_mdlm_peer_single_token_follows_p_x0() -> None:
    """One new token: the MDLM sampler's output law is p_x0 at the all-masked input (mask excluded)."""
    m = M.TinyLM(vocab=5, mask_id=4, seed=14, mask_bias=0.0)
    p = torch.tensor([[1, 2]])
    first = torch.tensor([[1, 2, 4]])
    logits = m(first)[0, 2].double()
    logits[4] = float("-inf")
    probs = torch.softmax(logits, -1)
    x, _ = mdlm_generate(m, p.repeat(4000, 1), max_new_tokens=1, steps=4, mask_id=4, generator=gen())
    exact = torch.multinomial(probs, 4000, replacement=True, generator=gen(1))
    assert two_sample_p(outcomes(x, 2), [(int(v),) for v in exact]) > P_ALPHA


def test_bd3lm_peer_block_one_is_autoregressive_and_cache_is_exact() -> None:
    m = M.BlockCausalLM(vocab=5, mask_id=4, seed=15, block_size=1, mask_bias=0.0)
    p = torch.tensor([[1, 2]])
    a, ca = bd3lm_generate(m, p.repeat(2000, 1), max_new_tokens=2, block_length=1, mask_id=4, cache="kv",
                           generator=gen())
    b, cb = bd3lm_generate(m, p.repeat(2000, 1), max_new_tokens=2, block_length=1, mask_id=4,
                           generator=gen())
    assert ca == cb == 2 and torch.equal(a, b)

    def law(ctx: list[int]) -> torch.Tensor:
        lg = m(torch.tensor([ctx + [4]]))[0, -1].double()
        lg[4] = float("-inf")
        return torch.softmax(lg, -1)

    # exact AR law of the two tokens: p(v1) p(v2 | v1)
    p1 = law([1, 2])
    joint = torch.stack([p1[v] * law([1, 2, v]) for v in range(5)]).flatten()
    exact = [divmod(int(i), 5) for i in torch.multinomial(joint, 2000, replacement=True, generator=gen(2))]
    assert two_sample_p(outcomes(a, 2), exact) > P_ALPHA


# ================================================================================================
# Part 2: fastdiff.generate against the peers
# ================================================================================================
import fastdiff  # noqa: E402


def fd(model: Any, ids: torch.Tensor, am: torch.Tensor | None = None, **kw: Any) -> Any:
    return fastdiff.generate(model, ids, am, **kw)


def generated(out: Any, ids: torch.Tensor, am: torch.Tensor | None, N: int) -> torch.Tensor:
    """The (B, N) generated tokens of a fastdiff output, whatever its padding side."""
    seq = out.sequences
    P = ids.shape[1]
    if am is None or bool(am[:, -1].all()):  # no padding, or left padding
        return seq[:, P:P + N]
    lens = am.long().sum(1)
    return torch.stack([seq[b, int(lens[b]):int(lens[b]) + N] for b in range(seq.shape[0])])


LLADA_CASES = [  # (B, P, N, steps, block, cfg)
    (1, 1, 8, 8, 8, 0.0),
    (1, 5, 8, 4, 4, 0.0),
    (3, 7, 8, 8, 4, 0.0),
    (3, 5, 8, 4, 8, 0.0),
    (1, 5, 6, 6, 2, 0.5),
    (3, 7, 8, 8, 4, 1.0),
]


@pytest.mark.parametrize("B,P,N,steps,block,cfg", LLADA_CASES)
def test_llada_greedy_matches_peer(B: int, P: int, N: int, steps: int, block: int, cfg: float) -> None:
    m = M.TinyLM(seed=20 + P)
    ids = prompts(B, P, seed=P)
    out = fd(m, ids, max_new_tokens=N, steps=steps, block_length=block, preset="llada", mask_id=MASK,
             cfg_scale=cfg)
    ref, calls = llada_generate(m, ids, max_new_tokens=N, steps=steps, block_length=block, mask_id=MASK,
                                cfg_scale=cfg, generator=gen())
    assert torch.equal(generated(out, ids, None, N), ref[:, P:])
    assert out.stats["network_calls"] == calls


@pytest.mark.parametrize("cls", [M.DictLM, M.MaskedLMOutputLM])
def test_llada_output_wrappers_match_peer(cls: type) -> None:
    m = cls(seed=30)
    ids = prompts(3, 5)
    out = fd(m, ids, max_new_tokens=8, steps=4, block_length=4, preset="llada", mask_id=MASK)
    ref, _ = llada_generate(m, ids, max_new_tokens=8, steps=4, block_length=4, mask_id=MASK, generator=gen())
    assert torch.equal(generated(out, ids, None, 8), ref[:, 5:])


FAST_CASES = [  # (B, P, threshold, factor, cache)
    (1, 5, 0.9, None, None),
    (3, 7, 0.7, None, None),
    (3, 1, None, 1.0, None),
    (1, 5, None, None, "prefix"),
    (3, 7, 0.9, None, "prefix"),
    (3, 5, 0.7, None, "dual"),
    (1, 7, None, 1.0, "dual"),
    (3, 5, None, 1.0, "prefix"),
    (1, 1, None, None, "dual"),
]


@pytest.mark.parametrize("B,P,threshold,factor,cache", FAST_CASES)
@pytest.mark.parametrize("block", [4, 8])
def test_fast_dllm_greedy_matches_peer(B: int, P: int, threshold: float | None, factor: float | None,
                                       cache: str | None, block: int) -> None:
    m = M.CachedLM(seed=40 + P, scale=5.0)
    ids = prompts(B, P, seed=P + 1)
    kw = dict(max_new_tokens=8, steps=8, block_length=block, mask_id=MASK, threshold=threshold,
              factor=factor, cache=cache)
    out = fd(m, ids, preset="fast_dllm", **kw)
    ref, calls = fast_dllm_generate(m, ids, generator=gen(), **kw)
    assert torch.equal(generated(out, ids, None, 8), ref[:, P:])
    assert out.stats["network_calls"] == calls


DREAM_CASES = [  # (B, P, N, steps)
    (1, 1, 8, 8),
    (1, 5, 8, 4),
    (3, 7, 8, 3),
    (3, 5, 6, 6),
]


@pytest.mark.parametrize("B,P,N,steps", DREAM_CASES)
@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_greedy_matches_peer(B: int, P: int, N: int, steps: int, alg: str) -> None:
    m = M.TinyLM(seed=50 + P)
    ids = prompts(B, P, seed=P + 2)
    out = fd(m, ids, max_new_tokens=N, steps=steps, preset="dream", mask_id=MASK, alg=alg)
    ref, calls = dream_generate(m, ids, max_new_tokens=N, steps=steps, mask_id=MASK, alg=alg, generator=gen())
    assert torch.equal(generated(out, ids, None, N), ref[:, P:])
    assert out.stats["network_calls"] == calls


# -- padding -------------------------------------------------------------------------------------
def _ragged(lengths: list[int], P: int, side: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    am = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        toks = torch.randint(1, V - 1, (n,), generator=g)
        sl = slice(P - n, P) if side == "left" else slice(0, n)
        ids[b, sl], am[b, sl] = toks, 1
    return ids, am


PAD_PRESETS = {
    "llada": (dict(preset="llada", steps=8, block_length=4), lambda m, ids: llada_generate(
        m, ids, max_new_tokens=8, steps=8, block_length=4, mask_id=MASK, generator=gen())),
    "dream": (dict(preset="dream", steps=4, alg="maskgit_plus"), lambda m, ids: dream_generate(
        m, ids, max_new_tokens=8, steps=4, mask_id=MASK, alg="maskgit_plus", generator=gen())),
}


@pytest.mark.parametrize("preset", sorted(PAD_PRESETS))
def test_left_padded_batch_equals_prompts_one_by_one(preset: str) -> None:
    kw, peer = PAD_PRESETS[preset]
    m = M.TinyLM(seed=60)
    lengths = [7, 3, 1, 5]
    ids, am = _ragged(lengths, 7, "left")
    out = generated(fd(m, ids, am, max_new_tokens=8, mask_id=MASK, **kw), ids, am, 8)
    for b, n in enumerate(lengths):
        alone = ids[b:b + 1, 7 - n:]
        ref, _ = peer(m, alone)
        assert torch.equal(out[b], ref[0, n:]), f"row {b} (prompt length {n})"
        solo = generated(fd(m, alone, max_new_tokens=8, mask_id=MASK, **kw), alone, None, 8)
        assert torch.equal(out[b], solo[0])


@pytest.mark.parametrize("preset", sorted(PAD_PRESETS))
def test_right_padded_equals_left_padded(preset: str) -> None:
    kw, _ = PAD_PRESETS[preset]
    m = M.TinyLM(seed=61)
    lengths = [2, 6, 4]
    left, am_l = _ragged(lengths, 6, "left", seed=9)
    right, am_r = _ragged(lengths, 6, "right", seed=9)
    a = generated(fd(m, left, am_l, max_new_tokens=8, mask_id=MASK, **kw), left, am_l, 8)
    out_r = fd(m, right, am_r, max_new_tokens=8, mask_id=MASK, **kw)
    b = generated(out_r, right, am_r, 8)
    assert torch.equal(a, b)
    # the right-padded output keeps each prompt at the start of its row
    for r, n in enumerate(lengths):
        assert torch.equal(out_r.sequences[r, :n], right[r, :n])


# -- in distribution -----------------------------------------------------------------------------
SV, SMASK = 6, 5  # small vocabulary: 5 tokens and [MASK]


def small_model(cls: type = M.TinyLM, **kw: Any) -> Any:
    """Scale 3: peaked enough that the order of decisions changes the joint law (the tests' power: e.g.
    Dream's alg_temp 0.5 vs 2 or MDLM's 4 vs 1 steps give p < 1e-3 with these sample sizes)."""
    return cls(vocab=SV, mask_id=SMASK, seed=70, scale=3.0, **kw)


def fd_samples(model: Any, ids: torch.Tensor, N: int, *, seeds: int = 10, per_seed: int = 200,
               mask_id: int = SMASK, **kw: Any) -> list[tuple]:
    res: list[tuple] = []
    for s in range(seeds):
        out = fd(model, ids.repeat(per_seed, 1), max_new_tokens=N, seed=s, mask_id=mask_id, **kw)
        res += outcomes(generated(out, ids, None, N), 0)
    return res


def peer_samples(fn: Callable[..., tuple[torch.Tensor, int]], model: Any, ids: torch.Tensor, N: int,
                 n: int = 2000, **kw: Any) -> list[tuple]:
    x, _ = fn(model, ids.repeat(n, 1), max_new_tokens=N, mask_id=SMASK, generator=gen(123), **kw)
    return outcomes(x, ids.shape[1])


SMALL_IDS = torch.tensor([[1, 2]])

DIST_CASES = {
    "llada-temperature": (dict(preset="llada", steps=3, temperature=0.5), llada_generate,
                          dict(steps=3, temperature=0.5)),
    "llada-random-greedy": (dict(preset="llada", steps=3, remasking="random"), llada_generate,
                            dict(steps=3, remasking="random")),
    "llada-random-temperature": (dict(preset="llada", steps=3, remasking="random", temperature=0.7),
                                 llada_generate, dict(steps=3, remasking="random", temperature=0.7)),
    "fast_dllm-threshold-temperature": (dict(preset="fast_dllm", steps=3, threshold=0.5, temperature=1.0),
                                        fast_dllm_generate, dict(steps=3, threshold=0.5, temperature=1.0)),
    "dream-origin-greedy": (dict(preset="dream", steps=3, alg="origin"), dream_generate,
                            dict(steps=3, alg="origin")),
    "dream-origin-temperature": (dict(preset="dream", steps=3, alg="origin", temperature=1.0), dream_generate,
                                 dict(steps=3, alg="origin", temperature=1.0)),
    "dream-maskgit-temperature": (dict(preset="dream", steps=3, alg="maskgit_plus", temperature=0.8),
                                  dream_generate, dict(steps=3, alg="maskgit_plus", temperature=0.8)),
    "dream-alg_temp": (dict(preset="dream", steps=3, alg="maskgit_plus", alg_temp=0.5), dream_generate,
                       dict(steps=3, alg="maskgit_plus", alg_temp=0.5)),
    "dream-entropy-alg_temp-temperature": (dict(preset="dream", steps=2, alg="entropy", alg_temp=0.3,
                                                temperature=1.0),
                                           dream_generate, dict(steps=2, alg="entropy", alg_temp=0.3,
                                                                temperature=1.0)),
    "mdlm": (dict(preset="mdlm", steps=4, temperature=1.0), mdlm_generate, dict(steps=4)),
}


@pytest.mark.parametrize("case", sorted(DIST_CASES))
def test_random_strategies_match_peer_in_distribution(case: str) -> None:
    fkw, peer, pkw = DIST_CASES[case]
    m = small_model(mask_bias=0.0 if case == "mdlm" else -20.0)
    a = fd_samples(m, SMALL_IDS, 3, **fkw)
    b = peer_samples(peer, m, SMALL_IDS, 3, **pkw)
    p = two_sample_p(a, b)
    assert p > P_ALPHA, f"{case}: p = {p:.2e}"


def test_duo_matches_peer_in_distribution() -> None:
    m = M.TinyLM(vocab=5, mask_id=4, seed=71, scale=3.0)
    a = fd_samples(m, SMALL_IDS, 2, preset="duo", steps=3, temperature=1.0, mask_id=4)
    x, _ = duo_generate(m, SMALL_IDS.repeat(2000, 1), max_new_tokens=2, steps=3, generator=gen(5))
    p = two_sample_p(a, outcomes(x, 2))
    assert p > P_ALPHA, f"p = {p:.2e}"


@pytest.mark.parametrize("cache", [None, "kv"])
def test_bd3lm_matches_peer_in_distribution(cache: str | None) -> None:
    m = M.BlockCausalLM(vocab=4, mask_id=3, seed=72, scale=3.0, block_size=2, mask_bias=0.0)
    a = fd_samples(m, SMALL_IDS, 4, preset="bd3lm", steps=4, block_length=2, cache=cache, temperature=1.0,
                   mask_id=3)
    x, _ = bd3lm_generate(m, SMALL_IDS.repeat(2000, 1), max_new_tokens=4, block_length=2, mask_id=3,
                          cache=cache, generator=gen(6))
    p = two_sample_p(a, outcomes(x, 2))
    assert p > P_ALPHA, f"p = {p:.2e}"


def test_network_calls_of_the_random_presets_match_peers() -> None:
    """MDLM's cache makes its call count random (a step that changed nothing reuses p_x0): same law as the
    peer's; DUO calls every step plus the noise removal; BD3-LM's first hitting one call per token."""
    m = small_model(mask_bias=0.0)
    a = [(fd(m, SMALL_IDS, max_new_tokens=3, steps=6, preset="mdlm", temperature=1.0, mask_id=SMASK,
             seed=s).stats["network_calls"],) for s in range(250)]
    g = gen(7)
    b = [(mdlm_generate(m, SMALL_IDS, max_new_tokens=3, steps=6, mask_id=SMASK, generator=g)[1],)
         for _ in range(250)]
    assert len(set(b)) > 1
    p = two_sample_p(a, b)
    assert p > P_ALPHA, f"mdlm network calls: p = {p:.2e}"
    m5 = M.TinyLM(vocab=5, mask_id=4, seed=71)
    out = fd(m5, SMALL_IDS, max_new_tokens=2, steps=3, preset="duo", temperature=1.0, mask_id=4)
    assert out.stats["network_calls"] == duo_generate(m5, SMALL_IDS, max_new_tokens=2, steps=3,
                                                      generator=gen())[1]
    mb = M.BlockCausalLM(vocab=4, mask_id=3, seed=72, block_size=2)
    for cache in (None, "kv"):
        out = fd(mb, SMALL_IDS, max_new_tokens=4, steps=4, block_length=2, preset="bd3lm", cache=cache,
                 temperature=1.0, mask_id=3)
        assert out.stats["network_calls"] == bd3lm_generate(mb, SMALL_IDS, max_new_tokens=4, block_length=2,
                                                            mask_id=3, cache=cache, generator=gen())[1]
