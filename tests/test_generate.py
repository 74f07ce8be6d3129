"""fastdiff.generate: its arguments, padding, streaming, seeds, processors, EOS, scores and exact laws.

The token-for-token comparisons with each family's own loop are in tests/test_generate_peers.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff.errors import InputError, InputTypeError
from fastdiff.generation import GenerationStep, iterate

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 12, 11


class Bidir(nn.Module):
    """A tiny bidirectional LM in the LM calling convention (learned positions, a padding mask)."""

    def __init__(self, vocab: int = V, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, width, generator=g))
        self.pos = nn.Parameter(torch.randn(64, width, generator=g) * 0.5)
        self.wq = nn.Parameter(torch.randn(width, width, generator=g) / width**0.5)
        self.wk = nn.Parameter(torch.randn(width, width, generator=g) / width**0.5)
        self.out = nn.Parameter(torch.randn(width, vocab, generator=g) * 2 / width**0.5)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        h = self.emb[input_ids] + self.pos[position_ids]
        s = (h @ self.wq) @ (h @ self.wk).transpose(1, 2)
        if attention_mask is not None:
            s = s.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        h = h + torch.softmax(s, -1) @ h
        return h @ self.out


@pytest.fixture
def model() -> Bidir:
    return Bidir()


PROMPT = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def gen(model: nn.Module, ids: torch.Tensor = PROMPT, am: torch.Tensor | None = None, **kw: object):
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("steps", 6)
    kw.setdefault("mask_id", MASK)
    return fastdiff.generate(model, ids, am, **kw)


# --- arguments -------------------------------------------------------------------------------------------
BAD = [
    (dict(preset="gpt"), InputError, "preset"),
    (dict(max_new_tokens=0), InputError, "max_new_tokens"),
    (dict(steps=0), InputError, "steps"),
    (dict(steps=5, block_length=3), InputError, "steps"),
    (dict(block_length=4), InputError, "block_length"),
    (dict(threshold=0.9), InputError, "threshold"),
    (dict(preset="fast_dllm", threshold=0.9, factor=1.0), InputError, "factor"),
    (dict(preset="fast_dllm", threshold=1.5), InputError, "threshold"),
    (dict(cache="prefix"), InputError, "cache"),
    (dict(cache="kv"), InputError, "cache"),
    (dict(alg="entropy"), InputError, "alg"),
    (dict(preset="dream", alg="greedy"), InputError, "alg"),
    (dict(preset="dream", cfg_scale=1.0), InputError, "cfg_scale"),
    (dict(temperature=-1.0), InputError, "temperature"),
    (dict(temperature=float("nan")), InputError, "temperature"),
    (dict(preset="mdlm", temperature=0.0), InputError, "temperature"),
    (dict(remasking="high"), InputError, "remasking"),
    (dict(top_p=0.0), InputError, "top_p"),
    (dict(top_k=0), InputError, "top_k"),
    (dict(mask_id=None), InputError, "mask_id"),
    (dict(mask_id=V), InputError, "mask_id"),
    (dict(eos_token_id=-1), InputError, "eos_token_id"),
    (dict(logits_processor=3), InputTypeError, "logits_processor"),
    (dict(callback=3), InputTypeError, "callback"),
    (dict(seed=-1), InputError, "seed"),
    (dict(preset="bd3lm"), InputError, "block_length"),
    (dict(preset="duo", mask_id=None), InputError, "vocab_size"),
]


@pytest.mark.parametrize("kw,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_argument_is_a_clear_error_before_any_network_call(model: Bidir, kw: dict, exc: type, name: str) -> None:
    if name == "mask_id" and kw.get("mask_id") == V:
        model.config = type("C", (), {"vocab_size": V})()
    with pytest.raises(exc, match=f"^{name}: "):
        gen(model, **kw)
    assert model.calls == 0


def test_bad_prompts_are_clear_errors(model: Bidir) -> None:
    with pytest.raises(InputError, match="^input_ids: .*batch dimension"):
        gen(model, PROMPT[0])
    with pytest.raises(InputTypeError, match="^input_ids: "):
        gen(model, PROMPT.float())
    with pytest.raises(InputError, match="^attention_mask: expected shape"):
        gen(model, PROMPT, torch.ones(2, 3))
    with pytest.raises(InputError, match="^attention_mask: each row"):
        gen(model, PROMPT, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(InputError, match="^attention_mask: expected 0/1"):
        gen(model, PROMPT, torch.full((2, 4), 2))
    model.config = type("C", (), {"vocab_size": V})()
    with pytest.raises(InputError, match=r"^input_ids: token ids must lie in \[0, 12\)"):
        gen(model, PROMPT + 20)
    assert model.calls == 0


def test_model_outputs_are_checked(model: Bidir) -> None:
    with pytest.raises(InputError, match="model output at call 1: expected"):
        gen(lambda input_ids: torch.zeros(2, 3, V))
    with pytest.raises(InputTypeError, match="model output at call 1"):
        gen(lambda input_ids: "logits")
    with pytest.raises(InputError, match="NaN"):
        gen(lambda input_ids: torch.full((*input_ids.shape, V), float("nan")))
    with pytest.raises(InputError, match=r"\+inf"):
        gen(lambda input_ids: torch.full((*input_ids.shape, V), float("inf")))


def test_dict_and_model_output_forms_unwrap(model: Bidir) -> None:
    from transformers.modeling_outputs import MaskedLMOutput

    ref = gen(model).sequences
    assert torch.equal(gen(lambda input_ids: {"logits": model(input_ids)}).sequences, ref)
    assert torch.equal(gen(lambda input_ids: MaskedLMOutput(logits=model(input_ids))).sequences, ref)
    assert torch.equal(gen(lambda input_ids: (model(input_ids), None)).sequences, ref)


def test_nothing_passed_in_is_modified(model: Bidir) -> None:
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    ids0, am0 = ids.clone(), am.clone()
    kept = []

    def returns_kept(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = model(input_ids, attention_mask, position_ids)
        kept.append((out, out.clone()))
        return out

    gen(returns_kept, ids, am, cfg_scale=1.0, temperature=0.7)
    gen(returns_kept, ids, am, preset="dream", alg="entropy")
    assert torch.equal(ids, ids0) and torch.equal(am, am0)
    assert all(torch.equal(a, b) for a, b in kept)


# --- padding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,kw", [("llada", dict(block_length=3)), ("fast_dllm", dict(threshold=0.5)),
                                       ("dream", dict(alg="maskgit_plus"))])
def test_a_left_padded_batch_equals_its_prompts_run_one_by_one(model: Bidir, preset: str, kw: dict) -> None:
    prompts = [[3, 4], [5, 6, 7, 8], [9]]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = gen(model, ids, am, preset=preset, **kw)
    for i, p in enumerate(prompts):
        alone = gen(model, torch.tensor([p]), preset=preset, **kw)
        assert torch.equal(out.sequences[i, P:], alone.sequences[0, len(p):]), (i, preset)
    assert out.lengths.tolist() == [len(p) + 6 for p in prompts]


def test_right_padding_gives_the_left_padded_tokens_back_right_padded(model: Bidir) -> None:
    prompts = [[3, 4], [5, 6, 7, 8]]
    left = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    right = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]])
    am_l = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    am_r = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    a = gen(model, left, am_l, block_length=2, pad_token_id=0)
    b = gen(model, right, am_r, block_length=2, pad_token_id=0)
    for i, p in enumerate(prompts):
        n = len(p)
        assert b.sequences[i, :n].tolist() == p
        assert torch.equal(b.sequences[i, n:n + 6], a.sequences[i, 4:])
        assert bool((b.sequences[i, n + 6:] == 0).all())
    assert torch.equal(a.lengths, b.lengths)


# --- streaming, seeds, processors, EOS, scores ----------------------------------------------------------
def test_iterate_and_callback_see_every_step_and_end_at_the_result(model: Bidir) -> None:
    seen: list[GenerationStep] = []
    out = gen(model, block_length=3, temperature=0.8, seed=5, callback=lambda s: seen.append(
        GenerationStep(s.tokens.clone(), s.revealed.clone(), s.step, s.block, s.network_calls)))
    steps = [GenerationStep(s.tokens.clone(), s.revealed.clone(), s.step, s.block, s.network_calls)
             for s in iterate(model, PROMPT, max_new_tokens=6, steps=6, mask_id=MASK, block_length=3,
                              temperature=0.8, seed=5)]
    assert len(seen) == len(steps) == out.stats["steps"] == 6
    assert [s.block for s in steps] == [0, 0, 0, 1, 1, 1]
    prev = torch.cat([PROMPT, torch.full((2, 6), MASK)], 1)
    for s, c in zip(steps, seen):
        assert torch.equal(s.tokens, c.tokens)
        changed = s.tokens != prev
        assert torch.equal(changed, s.revealed & (s.tokens != MASK))  # revealed = what changed this step
        prev = s.tokens
    assert torch.equal(steps[-1].tokens, out.sequences)


def test_seeds_int_and_generator(model: Bidir) -> None:
    a = gen(model, temperature=1.0, seed=3).sequences
    assert torch.equal(a, gen(model, temperature=1.0, seed=3).sequences)
    assert not all(torch.equal(a, gen(model, temperature=1.0, seed=s).sequences) for s in range(4, 8))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(gen(model, temperature=1.0, seed=g1).sequences, gen(model, temperature=1.0, seed=g2).sequences)


def test_a_logits_processor_equals_the_same_change_inside_the_model(model: Bidir) -> None:
    """An HF-style processor banning token 4 acts as a model whose logit for 4 is -inf (an independent
    route to the same distribution), and token 4 is never generated."""
    calls = []

    def ban(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        calls.append((input_ids.shape, scores.shape))
        s = scores.clone()
        s[:, 4] = float("-inf")
        return s

    def banned(input_ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids).clone()
        out[..., 4] = float("-inf")
        return out

    for kw in (dict(), dict(temperature=0.9, seed=2), dict(preset="dream", alg="entropy", temperature=0.5)):
        a = gen(model, logits_processor=[ban], **kw)
        b = gen(banned, **kw)
        if kw.get("preset") != "dream":  # llada's confidence reads the processed logits too
            assert torch.equal(a.sequences, b.sequences), kw
        assert not bool((a.sequences[:, 4:] == 4).any())
    ids_shape, score_shape = calls[0]
    assert ids_shape[1] == 10 and score_shape[1] == V and ids_shape[0] == score_shape[0]


def test_eos_ends_a_row_and_pads_after_it(model: Bidir) -> None:
    free = gen(model, block_length=3).sequences
    eos = int(free[0, 5])  # a token row 0 generates at its 2nd position
    out = gen(model, block_length=3, eos_token_id=eos, pad_token_id=0)
    for r in range(2):
        g = free[r, 4:].tolist()
        if eos in g:
            k = g.index(eos)
            assert out.sequences[r, 4:].tolist() == g[:k + 1] + [0] * (5 - k)
            assert bool(out.finished[r]) and int(out.lengths[r]) == 4 + k + 1
        else:
            assert out.sequences[r, 4:].tolist() == g and not bool(out.finished[r])


def test_scores_are_the_confidence_at_which_each_token_was_decided(model: Bidir) -> None:
    """Greedy LLaDA with one token per step: the score of each generated token is its softmax probability
    under the logits of the step that decided it (recomputed here from the model)."""
    out = gen(model, PROMPT[:1], output_scores=True)
    torch.set_grad_enabled(False)
    x = torch.cat([PROMPT[:1], torch.full((1, 6), MASK)], 1)
    for _ in range(6):
        p = torch.softmax(model(x).double(), -1)[0]
        masked = (x[0] == MASK).nonzero().squeeze(1)
        conf, tok = p[masked].max(-1)
        j = int(conf.argmax())
        pos = int(masked[j])
        x[0, pos] = tok[j]
        assert math.isclose(float(out.scores[0, pos - 4]), float(conf[j]), rel_tol=1e-5)
    torch.set_grad_enabled(True)
    assert torch.equal(out.sequences, x)


# --- exact laws ------------------------------------------------------------------------------------------
def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value; outcomes expected fewer than 5 times are pooled into one bin."""
    from scipy.stats import chisquare

    probs = probs.detach().double()
    probs = probs / probs.sum()
    n = int(counts.sum())
    assert int(counts[probs == 0].sum()) == 0
    small = probs * n < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([probs[~small] * n, (probs[small] * n).sum().reshape(1)])
    if float(exp[-1]) == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_llada_at_a_temperature_draws_from_the_tempered_softmax(model: Bidir) -> None:
    T = 0.7
    ids = PROMPT[:1]
    logits = model(torch.cat([ids, torch.full((1, 1), MASK)], 1))[0, -1].double()
    probs = torch.softmax(logits / T, -1)
    n = 1000
    toks = torch.tensor([int(gen(model, ids, max_new_tokens=1, steps=1, temperature=T, seed=s).sequences[0, -1])
                         for s in range(n)])
    assert _chi2_p(torch.bincount(toks, minlength=V), probs) > 1e-3


def test_random_remasking_decides_a_uniform_position(model: Bidir) -> None:
    """LLaDA remasking='random', 3 new tokens, 3 steps: the first step decides one of the 3 masked
    positions uniformly at random."""
    n = 1000
    firsts = []
    for s in range(n):
        st = next(iterate(model, PROMPT[:1], max_new_tokens=3, steps=3, mask_id=MASK, remasking="random", seed=s))
        firsts.append(int(st.revealed[0, 4:].nonzero()[0, 0]))
    assert _chi2_p(torch.bincount(torch.tensor(firsts), minlength=3), torch.full((3,), 1 / 3)) > 1e-3


def test_mdlm_first_step_is_the_absorbing_posterior(model: Bidir) -> None:
    """MDLM, 2 steps, eps: after the first step a masked position is still masked with probability
    move_s / move_t = 1/2 and otherwise holds a token drawn from softmax(logits) without the mask column."""
    ids = PROMPT[:1]
    eps = 1e-3
    x = torch.cat([ids, torch.full((1, 1), MASK)], 1)
    lg = model(x)[0, -1].double().clone()
    lg[MASK] = float("-inf")
    t, s = 1.0, 1.0 - (1 - eps) / 2
    stay = s / t
    probs = torch.softmax(lg, -1) * (1 - stay)
    probs[MASK] = stay
    n = 1000
    toks = [int(next(iterate(model, ids, max_new_tokens=1, steps=2, mask_id=MASK, preset="mdlm", eps=eps,
                             seed=k)).tokens[0, -1]) for k in range(n)]
    assert _chi2_p(torch.bincount(torch.tensor(toks), minlength=V), probs) > 1e-3


# --- streaming in the sampler and the CLI -----------------------------------------------------------------
def _sampler_setup() -> tuple:
    from fastdiff.discrete import Absorbing
    from fastdiff.sampling import Sampler
    from fastdiff.schedules import cosine
    from fastdiff.testing import TinyDenoiser

    torch.manual_seed(0)
    return Sampler(Absorbing(V, MASK, cosine(100)), steps=6), TinyDenoiser(V)


def test_sampler_iterate_yields_every_step_and_returns_the_sample() -> None:
    sampler, net = _sampler_setup()
    ref = sampler.sample(net, shape=(2, 8), seed=4)
    it = sampler.iterate(net, shape=(2, 8), seed=4)
    steps = []
    while True:
        try:
            steps.append(next(it))
        except StopIteration as stop:
            out = stop.value
            break
    assert [s.step for s in steps] == list(range(1, 7))
    assert torch.equal(steps[-1].tokens, ref.tokens) and torch.equal(out.tokens, ref.tokens)
    assert (steps[0].tokens == MASK).sum() > (steps[-1].tokens == MASK).sum()  # kept steps are copies
    seen = []
    again = sampler.sample(net, shape=(2, 8), seed=4, callback=lambda s: seen.append(s.tokens.clone()))
    assert all(torch.equal(a, b.tokens) for a, b in zip(seen, steps)) and torch.equal(again.tokens, ref.tokens)


def test_sampler_iterate_stops_early_and_reraises_in_the_caller() -> None:
    import threading

    sampler, net = _sampler_setup()
    before = threading.active_count()
    it = sampler.iterate(net, shape=(2, 8), seed=4)
    next(it)
    it.close()  # leaving the loop stops the worker
    assert threading.active_count() == before

    def nan_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full((*x.shape, V), float("nan"))

    with pytest.raises(InputError, match="NaN"):
        list(sampler.iterate(nan_model, shape=(2, 8)))
    with pytest.raises(InputTypeError, match="^callback: "):
        sampler.sample(net, shape=(2, 8), callback=5)


def test_guidance_with_uncond_equal_to_cond_is_an_error() -> None:
    from fastdiff.discrete import Absorbing
    from fastdiff.sampling import sample
    from fastdiff.schedules import cosine

    def net(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, V)

    y = torch.zeros(2, dtype=torch.long)
    cond = {"label": y}
    for uncond in (cond, {"label": y}):
        with pytest.raises(InputError, match="^uncond: is cond itself"):
            sample(net, Absorbing(V, MASK, cosine(100)), shape=(2, 4), steps=2, guidance_scale=2.0, cond=cond,
                   uncond=uncond)
    # a batch whose condition equals the null one (distinct tensors) is legitimate
    sample(net, Absorbing(V, MASK, cosine(100)), shape=(2, 4), steps=2, guidance_scale=2.0, cond=cond,
           uncond={"label": y.clone()})


def test_cli_stream_shows_sample_zero_step_by_step(capsys) -> None:
    from fastdiff import cli

    assert cli.main(["generate", "-n", "2", "--steps", "5", "--stream", "--quiet", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [int(ln.split(":")[0].split()[1]) for ln in steps] == [1, 2, 3, 4, 5]
    masked = [ln.count(" _") for ln in steps]
    assert masked[0] > masked[-1] and masked == sorted(masked, reverse=True)  # (the text may hold a '_' too)
    final = next(ln for ln in lines if ln.startswith("[0] "))
    assert steps[-1].split(": ", 1)[1] == final[4:]


def test_hugging_face_logits_processors_work_as_given(model: Bidir) -> None:
    """transformers' own processors run on fastdiff's (rows, V) scores: a repetition penalty that forbids
    every token already in the row (penalty -> inf) leaves no generated token equal to a token before it."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

    out = gen(model, logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1e9)]))
    for row in out.sequences.tolist():
        prompt, new = row[:4], row[4:]
        seen = set(prompt)
        for tok in new:  # decided in some order; none repeats the prompt, none repeats another new token
            assert tok not in prompt
        assert len(set(new)) == len(new)
        assert not seen & set(new)
    # top-1 filtering before the draw leaves nothing random: every seed gives the same tokens
    top1 = [gen(model, temperature=1.0, seed=s, logits_processor=LogitsProcessorList([TopKLogitsWarper(1)])).sequences
            for s in range(4)]
    assert all(torch.equal(t, top1[0]) for t in top1)
    assert not all(torch.equal(gen(model, temperature=1.0, seed=s).sequences, top1[0]) for s in range(4))
