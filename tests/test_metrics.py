"""fastdiff.metrics against hand-computed values and independent brute-force implementations."""

from __future__ import annotations

import importlib.util
import math
import random
from fractions import Fraction

import pytest
import torch

from fastdiff.metrics import attribute_accuracy, bleu, distinct_n, generative_perplexity

# ---------------------------------------------------------------------------------------------- BLEU


def brute_bleu(hyps: list[str], refs: list[list[str]], max_n: int = 4, smooth: bool = False) -> float:
    """Papineni et al. 2002 written out naively: n-grams as joined strings, clipping by list.count, exact
    fractions, geometric mean as a product root."""
    num = [0] * (max_n + 1)
    den = [0] * (max_n + 1)
    c = r = 0
    for hyp, rs in zip(hyps, refs):
        h = hyp.split()
        rr = [x.split() for x in rs]
        c += len(h)
        # closest reference length, the shortest among equally close ones
        best = None
        for ref in sorted(rr, key=len):
            if best is None or abs(len(ref) - len(h)) < abs(best - len(h)):
                best = len(ref)
        r += best
        for n in range(1, max_n + 1):
            grams = ["\x00".join(h[i:i + n]) for i in range(len(h) - n + 1)]
            ref_grams = [["\x00".join(ref[i:i + n]) for i in range(len(ref) - n + 1)] for ref in rr]
            for g in sorted(set(grams)):
                num[n] += min(grams.count(g), max(rg.count(g) for rg in ref_grams))
            den[n] += len(grams)
    if c == 0:
        return 0.0
    prod = Fraction(1)
    for n in range(1, max_n + 1):
        a, b = (num[n] + 1, den[n] + 1) if smooth and n > 1 else (num[n], den[n])
        if a == 0:
            return 0.0
        prod *= Fraction(a, b)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return 100 * bp * float(prod) ** (1 / max_n)


# Papineni et al. 2002, section 2.1, example 1 (final periods dropped: the paper counts words only)
CAND1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
CAND2 = "It is to insure the troops forever hearing the activity guidebook that party direct"
REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party",
    "It is the practical guide for the army always to heed the directions of the party",
]


def test_bleu_papineni_modified_precisions():
    # the paper: candidate 1 has modified unigram precision 17/18 and bigram precision 10/17; candidate 2
    # 8/14 and 1/13. Candidate 1 has 18 words and a reference of 18 words (BP = 1).
    assert bleu([CAND1], [REFS], max_n=1) == pytest.approx(100 * 17 / 18, rel=1e-12)
    assert bleu([CAND1], [REFS], max_n=2) == pytest.approx(100 * math.sqrt(17 / 18 * 10 / 17), rel=1e-12)
    # candidate 2: 14 words, closest reference 16 words -> BP = exp(1 - 16/14)
    bp = math.exp(1 - 16 / 14)
    assert bleu([CAND2], [REFS], max_n=1) == pytest.approx(100 * bp * 8 / 14, rel=1e-12)
    assert bleu([CAND2], [REFS], max_n=2) == pytest.approx(100 * bp * math.sqrt(8 / 14 * 1 / 13), rel=1e-12)


def test_bleu_papineni_clipping_example():
    # "the the the the the the the": modified unigram precision 2/7 (the paper's example 2); 7 words and a
    # 7-word reference, so BP = 1.
    refs = ["the cat is on the mat", "there is a cat on the mat"]
    assert bleu(["the the the the the the the"], [refs], max_n=1) == pytest.approx(100 * 2 / 7, rel=1e-12)


def test_bleu_identical_is_100_and_disjoint_is_0():
    hyps = ["a b c d e", "the quick brown fox jumps over"]
    assert bleu(hyps, hyps) == pytest.approx(100.0, rel=1e-12)
    assert bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0, rel=1e-12)
    assert bleu(["x y z w"], ["a b c d"]) == 0.0
    assert bleu([""], ["a b c d"]) == 0.0


def test_bleu_brevity_penalty():
    # unigram precision 1, c = 4, r = 8: BP = exp(1 - 8/4) = e^-1
    assert bleu(["a b c d"], ["a b c d e f g h"], max_n=1) == pytest.approx(100 / math.e, rel=1e-12)
    # longer hypotheses are not penalised by BP (only by precision): c = 6 > r = 4, p1 = 4/6
    assert bleu(["a b c d x y"], ["a b c d"], max_n=1) == pytest.approx(100 * 4 / 6, rel=1e-12)
    # ties in closeness pick the shorter reference: c = 5, refs of 4 and 6 -> r = 4 -> BP = 1
    assert bleu(["a b c d e"], [["a b c d", "a b c d e f"]], max_n=1) == pytest.approx(100.0, rel=1e-12)
    # the corpus BP uses summed lengths, not a mean of sentence penalties: c = 2 + 6 = 8, r = 4 + 6 = 10
    got = bleu(["a b", "c d e f g h"], ["a b x y", "c d e f g h"], max_n=1)
    assert got == pytest.approx(100 * math.exp(1 - 10 / 8), rel=1e-12)


def test_bleu_pools_counts_over_the_corpus():
    # sentence 1: 4 words, all 4 bigrams... pooled: p_n = sum of matches / sum of totals
    hyps = ["a b c d", "e f g h"]
    refs = ["a b c d", "e x g y"]
    # unigrams: 4 + 2 of 8; bigrams: 3 + 0 of 6; lengths equal -> BP = 1
    assert bleu(hyps, refs, max_n=2) == pytest.approx(100 * math.sqrt(6 / 8 * 3 / 6), rel=1e-12)


def test_bleu_smoothing():
    # no 3-gram or 4-gram match: plain BLEU is 0, BLEU+1 adds one to n >= 2 counts
    hyp, ref = "a b x c d", "a b y c d"
    assert bleu([hyp], [ref]) == 0.0
    # unigrams 4/5 (x unmatched); bigrams (2+1)/(4+1); trigrams (0+1)/(3+1); 4-grams (0+1)/(2+1); BP = 1
    expected = 100 * (4 / 5 * 3 / 5 * 1 / 4 * 1 / 3) ** 0.25
    assert bleu([hyp], [ref], smooth=True) == pytest.approx(expected, rel=1e-12)


def test_bleu_matches_brute_force_on_random_corpora():
    rng = random.Random(1234)
    words = ["a", "b", "c", "d", "e", "f"]
    for trial in range(60):
        n_sent = rng.randint(1, 5)
        hyps, refs = [], []
        for _ in range(n_sent):
            hyps.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))))
            refs.append([" ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
                         for _ in range(rng.randint(1, 3))])
        for max_n in (1, 2, 4):
            for smooth in (False, True):
                want = brute_bleu(hyps, refs, max_n, smooth)
                got = bleu(hyps, refs, max_n=max_n, smooth=smooth)
                assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (trial, hyps, refs, max_n, smooth)


@pytest.mark.skipif(importlib.util.find_spec("sacrebleu") is None, reason="sacrebleu not installed")
def test_bleu_matches_sacrebleu():  # pragma: no cover - only where sacrebleu is installed
    import sacrebleu

    hyps = [CAND1, CAND2, "the the the the the the the"]
    refs = [REFS[0], REFS[1], "the cat is on the mat"]
    want = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", smooth_method="none").score
    assert bleu(hyps, refs) == pytest.approx(want, rel=1e-9)


def test_bleu_bad_inputs():
    with pytest.raises(ValueError, match="hypotheses"):
        bleu([], [])
    with pytest.raises(ValueError, match="references"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="hypotheses"):
        bleu("a b", ["a b"])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        bleu(["a"], [[]])
    with pytest.raises(ValueError, match="max_n"):
        bleu(["a"], ["a"], max_n=0)


# ---------------------------------------------------------------------------------------------- distinct-n


def test_distinct_n_known_values():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # {a, b, c} of 7 tokens
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # {ab, ba, bc} of ab ba ab | ab bc
    assert distinct_n(texts, 3) == 1.0  # aba bab | abc: all distinct
    assert distinct_n(["a a a a", "a a a"], 3) == pytest.approx(1 / 3)  # aaa aaa | aaa
    ids = [[1, 2, 1, 2], [1, 2, 3]]
    assert distinct_n(ids, 2) == pytest.approx(3 / 5)
    assert distinct_n([torch.tensor([5, 5, 5, 5])], 1) == pytest.approx(1 / 4)
    assert distinct_n(torch.tensor([[1, 2, 1, 2], [1, 2, 1, 3]]), 2) == 0.5  # rows: 12 21 12 | 12 21 13
    with pytest.raises(ValueError, match="texts"):
        distinct_n(torch.ones(2, 2, 2, dtype=torch.long), 1)
    assert distinct_n(["a", "b"], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n"):
        distinct_n(texts, 0)
    with pytest.raises(ValueError, match="texts"):
        distinct_n([], 1)


def test_distinct_n_does_not_cross_texts():
    # "a b" + "b a": within texts the bigrams are (a b), (b a) -> 2 distinct of 2; crossing would add (b b)
    assert distinct_n(["a b", "b a"], 2) == 1.0
    assert distinct_n(["a b", "a b"], 2) == 0.5


# ---------------------------------------------------------------------------------------------- perplexity


class TrueTokenLM(torch.nn.Module):
    """A fake causal LM that gives probability ``p`` to the true next token (cheating: it reads it) and
    spreads ``1 - p`` uniformly over the other V - 1 tokens; probability ``p_pad`` when the next is PAD."""

    def __init__(self, V: int, p: float, p_pad: float | None = None, pad_id: int = 0) -> None:
        super().__init__()
        self.V, self.p, self.p_pad, self.pad_id = V, p, p_pad, pad_id
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert not self.training
        B, L = x.shape
        nxt = torch.cat([x[:, 1:], x[:, :1]], dim=1)  # the last position's prediction is never used
        p = torch.full((B, L), self.p, dtype=torch.float64)
        if self.p_pad is not None:
            p[nxt == self.pad_id] = self.p_pad
        probs = ((1 - p) / (self.V - 1)).unsqueeze(-1).expand(B, L, self.V).clone()
        probs.scatter_(-1, nxt.unsqueeze(-1), p.unsqueeze(-1))
        return probs.log().float() + 3.0  # any constant shift: logits, not log-probabilities


def test_perplexity_uniform_logits_is_V():
    V = 37
    tokens = torch.randint(0, V, (5, 11), generator=torch.Generator().manual_seed(0))
    ppl = generative_perplexity(lambda x: torch.zeros(*x.shape, V), tokens)
    assert ppl == pytest.approx(V, rel=1e-9)


def test_perplexity_true_token_probability():
    V, p = 50, 0.3
    tokens = torch.randint(4, V, (7, 9), generator=torch.Generator().manual_seed(1))
    lm = TrueTokenLM(V, p)
    lm.train()
    assert generative_perplexity(lm, tokens, batch_size=3) == pytest.approx(1 / p, rel=1e-5)
    assert lm.training  # mode restored
    assert lm.calls == 3  # ceil(7 / 3) batches


def test_perplexity_excludes_pad_targets():
    V, p, q = 20, 0.5, 0.01
    tokens = torch.randint(4, V, (4, 10), generator=torch.Generator().manual_seed(2))
    tokens[0, 6:] = 0
    tokens[2, 3:] = 0
    lm = TrueTokenLM(V, p, p_pad=q, pad_id=0)
    assert generative_perplexity(lm, tokens, pad_id=0) == pytest.approx(1 / p, rel=1e-5)
    # without pad_id the padded targets count: 4 + 7 = 11 of the 36 predicted tokens have probability q
    n_pad, n = 11, 4 * 9
    want = math.exp(-((n - n_pad) * math.log(p) + n_pad * math.log(q)) / n)
    assert generative_perplexity(lm, tokens) == pytest.approx(want, rel=1e-5)


def test_perplexity_bad_inputs():
    with pytest.raises(ValueError, match="tokens"):
        generative_perplexity(lambda x: torch.zeros(*x.shape, 3), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens"):
        generative_perplexity(lambda x: torch.zeros(*x.shape, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tokens"):  # only padding
        generative_perplexity(lambda x: torch.zeros(*x.shape, 3), torch.zeros(2, 4, dtype=torch.long), pad_id=0)
    with pytest.raises(ValueError, match="lm"):
        generative_perplexity(lambda x: torch.zeros(x.shape[0], 3), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):  # id 5 outside the LM's 3-token vocabulary
        generative_perplexity(lambda x: torch.zeros(*x.shape, 3), torch.full((2, 4), 5))


# ---------------------------------------------------------------------------------------------- accuracy


def test_attribute_accuracy_fake_classifier():
    # the classifier predicts label = first token mod 2
    def clf(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0] % 2, 2).float()

    tokens = torch.tensor([[4, 1], [5, 1], [6, 1], [7, 1], [8, 1]])
    labels = torch.tensor([0, 1, 1, 1, 0])  # right on rows 0, 1, 3, 4
    assert attribute_accuracy(clf, tokens, labels) == pytest.approx(4 / 5)
    assert attribute_accuracy(clf, tokens, labels, batch_size=2) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="labels"):
        attribute_accuracy(clf, tokens, labels[:3])
    with pytest.raises(ValueError, match="classifier"):
        attribute_accuracy(lambda x: x[:, 0], tokens, labels)
