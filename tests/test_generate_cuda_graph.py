"""``fastdiff.generate(..., cuda_graph=True)``: each preset's steps (forward + fused selection or posterior
kernel) replayed as CUDA graphs (:mod:`fastdiff.generation._graph`).

On CPU: the device-independent plumbing, run through generate's own loops with a stand-in capture (the
outputs of one run of the body are the static outputs; a "replay" re-runs the body and writes its results
into them, what a graph replay does to its static tensors) and stand-in ops (the C++ ``select_tokens`` with
``(seed, offset)`` read from the counter buffer, the rows' value status computed beside it; the C++
posterior kernel with its counters read from the buffer). Every step's sequence must equal the eager run's
exactly: LLaDA / Fast-dLLM (no cache, prefix and dual cache; cfg_scale; greedy and sampled; top-k,
threshold, random remasking; padding; scores), Dream (its four algs, alg_temp, suppress_mask, a Hugging
Face model), MDLM / DUO (MDLM's cache reusing the graph's logits) and BD3-LM (with and without its KV
cache). Breaking any per-step refresh (sequence, time, count, counters, uniforms, Dream origin's p, MDLM's
schedule) must break that equality; the scope errors, the capture error and the value check; the dense
selection against select_tokens' reference.

On a GPU (``gpu`` marker): the real capture against eager for every preset, and the device-counter kernel
against select_tokens' CUDA op.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import ops
from fastdiff.errors import InputError, InputTypeError
from fastdiff.generation import _graph
from fastdiff.generation._graph import GenerateGraphs, select_dense
from fastdiff.models import SEDConfig, SEDDenoiser
from fastdiff.ops.backends.cpp import posterior as cpp_posterior
from fastdiff.ops.select_tokens import MODE_THRESHOLD, MODE_TOP_K, RULES, _select
from tests.test_generate import Bidir

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 24, 23


def LMBidir(seed: int = 0) -> Bidir:  # noqa: N802
    """test_generate's tiny bidirectional LM in the LM calling convention (time-free; padding mask and
    positions), on this file's vocabulary."""
    return Bidir(vocab=V, seed=seed)


def sed(seed: int = 0) -> SEDDenoiser:
    """A bidirectional, time-conditioned SED model (Fast-dLLM's caches are approximate on it, and its
    logits depend on the step: a stale time buffer shows)."""
    m = SEDDenoiser(SEDConfig(vocab_size=V, width=32, layers=2, heads=4, rel_freqs=8)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random (the zero-initialised output and modulation layers too)
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (4 if p.ndim == 2 else 1) / p.shape[-1] ** 0.5)
    return m


def fake_capture(body):
    """A stand-in for a CUDA graph: one run's outputs are the static outputs; a replay re-runs the body and
    writes its results into them."""
    outs = body()

    def replay() -> None:
        for static, new in zip(outs, body()):
            static.copy_(new)

    return replay, outs


def row_status(logits: torch.Tensor, exclude: int) -> torch.Tensor:
    """Each row's value status as the CUDA kernel reports it (4 NaN, 3 +inf, 2 every logit -inf, else 0)."""
    z = logits.double().clone()
    if exclude >= 0:
        z[..., exclude] = float("-inf")
    st = torch.zeros(logits.shape[:2], dtype=torch.int32)
    st = torch.where((z == float("-inf")).all(-1), 2, st)
    st = torch.where(torch.isposinf(z).any(-1), 3, st)
    return torch.where(torch.isnan(z).any(-1), 4, st).to(torch.int32)


def cpu_op(logits, cand, counter_rows, k, uniform, seed_offset, rule, temperature, threshold, mode, exclude):
    """The stand-in op: the C++ select_tokens with (seed, offset) read from the counter buffer."""
    status = torch.where(cand, row_status(logits, exclude), 0).to(torch.int32)
    if bool(status.any()):
        B, W = cand.shape
        return (torch.zeros(B, W, dtype=torch.int64), torch.full((B, W), float("-inf")),
                torch.zeros(B, W, dtype=torch.bool), status)
    seed, offset = [v % 2**64 for v in seed_offset.tolist()]
    tokens, conf, chosen = ops.select_tokens(
        logits, cand, confidence=RULES[rule], temperature=temperature, seed=seed, offset=offset,
        counter_rows=counter_rows, k=k if mode == MODE_TOP_K else None,
        threshold=threshold if mode == MODE_THRESHOLD else None, exclude=None if exclude < 0 else exclude,
        uniform=uniform, backend="cpp")
    return tokens, conf, chosen, status


def cpu_posterior_op(plan, counters):
    """The stand-in posterior op: the C++ posterior kernel with (seed, offset, row_offset) read from the
    counter buffer (nothing drawn from bad logits: the check after the replay raises, as on CUDA)."""
    if not bool(torch.isfinite(plan.logits.amax(-1)).all()) or bool(torch.isnan(plan.logits).any()):
        return torch.zeros_like(plan.x_t)
    seed, offset, row0 = [v % 2**64 for v in counters.tolist()]
    return cpp_posterior.posterior(*plan.args(sample=True, seed=seed, offset=offset, row_offset=row0))


KIT = (fake_capture, cpu_op, cpu_posterior_op)


def run_steps(model: nn.Module, ids: torch.Tensor, graph: bool, **kw: object) -> tuple:
    """Every step's sequence and revealed positions, and the output."""
    seen = []
    kw = dict(dict(max_new_tokens=16, steps=16, block_length=8, mask_id=MASK, backend="cpp"), **kw)
    if graph:
        kw.update(cuda_graph=True, _graph_kit=KIT)
    out = fastdiff.generate(model, ids, callback=lambda s: seen.append((s.tokens.clone(), s.revealed.clone())),
                            **kw)
    return seen, out


def assert_same_run(a: tuple, b: tuple) -> None:
    (steps_a, out_a), (steps_b, out_b) = a, b
    assert len(steps_a) == len(steps_b)
    for i, ((ta, ra), (tb, rb)) in enumerate(zip(steps_a, steps_b)):
        assert torch.equal(ra, rb), f"step {i + 1}: other positions decided"
        assert torch.equal(ta, tb), f"step {i + 1}: other tokens"
    assert torch.equal(out_a.sequences, out_b.sequences)
    assert out_a.stats["network_calls"] == out_b.stats["network_calls"]
    assert out_a.stats["sequences_evaluated"] == out_b.stats["sequences_evaluated"]
    if out_a.scores is not None:
        assert torch.equal(torch.nan_to_num(out_a.scores, -1.0), torch.nan_to_num(out_b.scores, -1.0))


PROMPTS = torch.randint(0, MASK, (3, 6), generator=torch.Generator().manual_seed(1))

CASES = {
    "llada-greedy": dict(),
    "llada-sampled": dict(temperature=0.9, seed=5),
    "llada-uneven-k": dict(steps=6, block_length=8),  # k = 3, 3, 2 per block
    "llada-random-remasking": dict(remasking="random", seed=2),
    "llada-random-sampled": dict(remasking="random", temperature=0.7, seed=3),
    "fast_dllm-threshold": dict(preset="fast_dllm", threshold=0.3),
    "fast_dllm-threshold-sampled": dict(preset="fast_dllm", threshold=0.25, temperature=0.8, seed=9),
    "scores-eos": dict(output_scores=True, eos_token_id=3, pad_token_id=0),
    "llada-cfg-greedy": dict(cfg_scale=1.5),
    "llada-cfg-sampled": dict(cfg_scale=0.7, temperature=0.8, seed=6, output_scores=True),
    "llada-cfg-random-remasking": dict(cfg_scale=2.0, remasking="random", temperature=0.5, seed=8),
    "llada-cfg-uneven-k": dict(cfg_scale=1.0, steps=6, block_length=8, temperature=0.6, seed=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graph_plumbing_gives_the_eager_steps_without_cache(case: str) -> None:
    kw = CASES[case]
    assert_same_run(run_steps(LMBidir(), PROMPTS, True, **kw), run_steps(LMBidir(), PROMPTS, False, **kw))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("case", ["llada-greedy", "llada-sampled", "llada-uneven-k", "llada-random-sampled",
                                  "fast_dllm-threshold", "fast_dllm-threshold-sampled", "scores-eos"])
def test_graph_plumbing_gives_the_eager_steps_with_a_cache(case: str, cache: str) -> None:
    kw = dict(CASES[case], cache=cache)
    m = sed()
    graphed = run_steps(m, PROMPTS, True, **kw)
    eager = run_steps(m, PROMPTS, False, **kw)
    assert_same_run(graphed, eager)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_the_approximate_cache_changes_the_tokens_of_the_test_model(cache: str) -> None:
    """On this bidirectional model a cached run differs from the uncached one, so the equality above
    holds the graphs to the cache's (approximate) keys and values, refreshed at each block start."""
    m = sed()
    cached = run_steps(m, PROMPTS, False, cache=cache)[1].sequences
    assert not torch.equal(cached, run_steps(m, PROMPTS, False)[1].sequences)


DREAM = dict(preset="dream", block_length=None, steps=8)
DREAM_CASES = {
    "maskgit-greedy": dict(alg="maskgit_plus"),
    "maskgit-sampled": dict(alg="maskgit_plus", temperature=0.8, seed=3),
    "margin-sampled": dict(alg="topk_margin", temperature=1.1, seed=4, top_p=1.0),
    "entropy-greedy": dict(alg="entropy", steps=5),
    "entropy-sampled-scores": dict(alg="entropy", temperature=0.6, seed=2, output_scores=True),
    "alg_temp-greedy": dict(alg="maskgit_plus", alg_temp=0.5, seed=7),
    "alg_temp-sampled": dict(alg="topk_margin", alg_temp=0.3, temperature=0.9, seed=1, output_scores=True),
    "suppress-mask": dict(alg="maskgit_plus", temperature=0.7, seed=9, suppress_mask=True),
    "origin-greedy": dict(alg="origin"),
    "origin-sampled": dict(alg="origin", temperature=0.9, seed=5, output_scores=True),
    "origin-sampled-suppress-mask": dict(alg="origin", temperature=1.2, seed=6, suppress_mask=True, top_p=1.0),
}


@pytest.mark.parametrize("case", list(DREAM_CASES))
@pytest.mark.parametrize("model", ["lm", "sed"])
def test_graph_plumbing_gives_the_eager_steps_of_dream(case: str, model: str) -> None:
    """Dream's confidence algs (shifted logits, its per-step count, Gumbel-top-k with alg_temp) through
    the graphs; the time-conditioned model shows a stale time input."""
    kw = dict(DREAM, **DREAM_CASES[case])
    m = LMBidir() if model == "lm" else sed()
    graphed = run_steps(m, PROMPTS, True, **kw)
    assert graphed[1].stats["cuda_graph"]["replays"] == len(graphed[0])
    # Dream's window is the whole generated region: one capture for the run, however the masked span shrinks
    assert graphed[1].stats["cuda_graph"]["captures"] == 1
    assert_same_run(graphed, run_steps(m, PROMPTS, False, **kw))


def test_dream_with_padding_and_a_hugging_face_model_through_the_graphs() -> None:
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 8, 7]])
    am = (torch.arange(6)[None, :] >= torch.tensor([2, 0, 3])[:, None]).long()
    for m in (LMBidir(), tiny_llama()):  # the Llama adapter takes logits_to_keep: the window's logits only
        for kw in (dict(alg="entropy", temperature=0.7, seed=5), dict(alg="maskgit_plus", alg_temp=0.4, seed=2),
                   dict(alg="origin", temperature=0.8, seed=3)):
            kw = dict(DREAM, attention_mask=am, **kw)
            assert_same_run(run_steps(m, ids, True, **kw), run_steps(m, ids, False, **kw))


def test_the_dream_options_change_the_tokens_of_the_test_model() -> None:
    """alg_temp, the temperature and the alg each change the tokens here, so the equalities above hold the
    graphs to each of them."""
    m = LMBidir()
    base = run_steps(m, PROMPTS, False, **DREAM, alg="maskgit_plus")[1].sequences
    for kw in (dict(alg_temp=0.5, seed=7), dict(temperature=0.8, seed=3), dict(alg="entropy"), dict(alg="origin")):
        assert not torch.equal(run_steps(m, PROMPTS, False, **{**DREAM, "alg": "maskgit_plus", **kw})[1].sequences,
                               base), kw


class SigmaLM(Bidir):
    """test_generate's LM conditioned on MDLM's noise level (the ``sigma`` keyword): the logits scaled by
    ``1 + sigma / 2``, so a stale time input shows."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, sigma: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(input_ids, attention_mask, position_ids)
        return out * (1 + sigma[:, None, None] / 2)


MDLM = dict(preset="mdlm", block_length=None, temperature=1.0, steps=12)
MDLM_CASES = {
    "mdlm": dict(),
    "mdlm-tempered-seed": dict(temperature=0.7, seed=11),
    "mdlm-no-noise-removal": dict(noise_removal=False, seed=3),
    "mdlm-eps": dict(eps=0.2, steps=6, seed=5, suppress_mask=True),
    "duo": dict(preset="duo", mask_id=None, vocab_size=V, seed=2),
    "duo-tempered": dict(preset="duo", mask_id=None, vocab_size=V, temperature=0.8, seed=4, noise_removal=False),
}


@pytest.mark.parametrize("case", list(MDLM_CASES))
@pytest.mark.parametrize("model", ["lm", "sigma", "sed"])
def test_graph_plumbing_gives_the_eager_steps_of_mdlm_and_duo(case: str, model: str) -> None:
    """MDLM / DUO's ancestral steps: forward + posterior kernel per graph, the step's schedule and counters
    refreshed; the time-free LM reuses its last logits (MDLM's cache: no network call) between them."""
    kw = dict(MDLM, **MDLM_CASES[case])
    m = LMBidir() if model == "lm" else SigmaLM(vocab=V) if model == "sigma" else sed()
    graphed = run_steps(m, PROMPTS, True, **kw)
    eager = run_steps(m, PROMPTS, False, **kw)
    assert_same_run(graphed, eager)
    calls = graphed[1].stats["network_calls"] - (kw.get("noise_removal", True))  # the final argmax call is eager
    assert graphed[1].stats["cuda_graph"] == {"captures": 1, "replays": calls}


def test_mdlm_cache_reuses_the_graphs_logits() -> None:
    """The time-free model: MDLM's cache skips the network on a step whose input did not change; the steps
    that follow read the logits of the graph's last replay (equal to eager, fewer replays than steps)."""
    kw = dict(MDLM, steps=40, max_new_tokens=8)
    graphed = run_steps(LMBidir(), PROMPTS, True, **kw)
    assert_same_run(graphed, run_steps(LMBidir(), PROMPTS, False, **kw))
    assert graphed[1].stats["cuda_graph"]["replays"] < 40


def test_mdlm_with_padding_through_the_graphs() -> None:
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 8, 7]])
    am = (torch.arange(6)[None, :] >= torch.tensor([2, 0, 3])[:, None]).long()
    for m in (SigmaLM(vocab=V), tiny_llama()):
        for kw in (dict(MDLM, seed=1), dict(MDLM, preset="duo", mask_id=None, vocab_size=V, seed=6)):
            if isinstance(m, Bidir) or kw["preset"] == "mdlm":
                assert_same_run(run_steps(m, ids, True, attention_mask=am, **kw),
                                run_steps(m, ids, False, attention_mask=am, **kw))


def test_the_sigma_input_changes_the_tokens_of_the_test_model() -> None:
    """SigmaLM's tokens depend on its time input, so the stale-time case below can fail."""
    class Fixed(SigmaLM):
        def forward(self, input_ids, attention_mask=None, position_ids=None, sigma=None):
            return super().forward(input_ids, attention_mask, position_ids, torch.ones_like(sigma))

    kw = dict(MDLM, seed=1)
    assert not torch.equal(run_steps(SigmaLM(vocab=V), PROMPTS, False, **kw)[1].sequences,
                           run_steps(Fixed(vocab=V), PROMPTS, False, **kw)[1].sequences)


def _stale_prepare_mdlm(skip: str):
    real = GenerateGraphs._prepare_mdlm

    def prepare(self, t, alpha_bar):
        saved = {"x": self.x.clone(), "t": self.t.clone(), "alpha_bar": self.alpha_bar.clone()}
        real(self, t, alpha_bar)
        if skip == "offset":
            self.counters[1] = 0
        else:
            getattr(self, skip).copy_(saved[skip])

    return prepare


@pytest.mark.parametrize("skip,kw", [
    ("x", dict(MDLM)),
    ("t", dict(MDLM)),
    ("alpha_bar", dict(MDLM)),
    ("offset", dict(MDLM)),
    ("x", dict(MDLM, preset="duo", mask_id=None, vocab_size=V)),
    ("alpha_bar", dict(MDLM, preset="duo", mask_id=None, vocab_size=V)),
])
def test_a_stale_static_input_of_mdlm_breaks_the_equality(monkeypatch, skip: str, kw: dict) -> None:
    model = SigmaLM(vocab=V)
    eager = run_steps(model, PROMPTS, False, **kw)
    assert_same_run(run_steps(model, PROMPTS, True, **kw), eager)
    monkeypatch.setattr(GenerateGraphs, "_prepare_mdlm", _stale_prepare_mdlm(skip))
    with pytest.raises(AssertionError):
        assert_same_run(run_steps(model, PROMPTS, True, **kw), eager)


@pytest.mark.parametrize("bad,msg", [(float("nan"), "contains NaN"), (float("inf"), r"contains \+inf"),
                                     (float("-inf"), "every logit")])
def test_bad_logits_of_mdlm_raise_the_eager_error_after_a_replay(bad: float, msg: str) -> None:
    class Bad(SigmaLM):
        def forward(self, input_ids, attention_mask=None, position_ids=None, sigma=None):
            out = super().forward(input_ids, attention_mask, position_ids, sigma)
            col = torch.arange(V) == 2 if bad > 0 or bad != bad else torch.ones(V, dtype=torch.bool)
            return torch.where((input_ids == MASK)[..., None] & col, bad, out)

    kw = dict(MDLM, max_new_tokens=8, steps=8, mask_id=MASK, backend="cpp")
    with pytest.raises(InputError, match=f"x0_logits: .*{msg}") as eager:
        fastdiff.generate(Bad(vocab=V), PROMPTS, **kw)
    with pytest.raises(InputError, match=f"x0_logits: .*{msg}") as graphed:
        fastdiff.generate(Bad(vocab=V), PROMPTS, cuda_graph=True, _graph_kit=KIT, **kw)
    assert str(graphed.value) == str(eager.value)


def block_causal(seed: int = 3):
    """The peers' tiny block-causal LM (block_size 4) with BD3-LM's exact KV protocol; its cached block call
    reads the time input (logits scaled by ``1 + t / 500``), so a stale time input shows."""
    from tests.peers.models import BlockCausalLM

    class Timed(BlockCausalLM):
        def forward(self, input_ids, t=None, **kw):
            out = super().forward(input_ids, t, **kw)
            return out if t is None else out * (1 + t[:, None, None] / 500)

    return Timed(vocab=V, mask_id=MASK, seed=seed, block_size=4, mask_bias=0.0)


def sed_block_causal(seed: int = 0) -> SEDDenoiser:
    """A block-causal SED model (block_size 4; no time input, as SED's block-causal models) with its exact
    KV cache."""
    m = SEDDenoiser(SEDConfig(vocab_size=V, width=32, layers=2, heads=4, rel_freqs=8, block_size=4,
                              time_conditioning="none")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (4 if p.ndim == 2 else 1) / p.shape[-1] ** 0.5)
    return m


BD3 = dict(preset="bd3lm", block_length=4, temperature=1.0, steps=8)
BD3_CASES = {
    "sampled": dict(seed=3),
    "tempered": dict(temperature=0.6, seed=8),
    "greedy": dict(temperature=0.0, seed=2),
    "kv": dict(cache="kv", seed=3),
    "kv-greedy": dict(cache="kv", temperature=0.0, seed=5),
    "kv-scores-eos": dict(cache="kv", seed=4, output_scores=True, eos_token_id=3, pad_token_id=0),
}


@pytest.mark.parametrize("case", list(BD3_CASES))
@pytest.mark.parametrize("model", ["lm", "sed"])
def test_graph_plumbing_gives_the_eager_steps_of_bd3lm(case: str, model: str) -> None:
    """BD3-LM's first-hitting steps, block by block (a prompt of 6: the first block holds prompt tokens),
    with and without the exact KV cache: one graph per block, replayed for its steps."""
    kw = dict(BD3, **BD3_CASES[case])
    m = block_causal() if model == "lm" else sed_block_causal()
    graphed = run_steps(m, PROMPTS, True, **kw)
    assert_same_run(graphed, run_steps(m, PROMPTS, False, **kw))
    assert graphed[1].stats["cuda_graph"]["captures"] == 5  # blocks [4, 8) ... [20, 24)
    assert graphed[1].stats["cuda_graph"]["replays"] == len(graphed[0])


@pytest.mark.parametrize("cache", [None, "kv"])
def test_the_seed_and_temperature_change_the_bd3lm_tokens_of_the_test_model(cache: str | None) -> None:
    """The seed and the temperature change the block-causal LM's tokens, so the equalities above hold the
    graphs to the draw and the pick."""
    m = block_causal()
    base = run_steps(m, PROMPTS, False, **BD3, seed=3, cache=cache)[1].sequences
    for kw in (dict(seed=4), dict(seed=3, temperature=0.3)):
        assert not torch.equal(run_steps(m, PROMPTS, False, **{**BD3, "cache": cache, **kw})[1].sequences, base), kw


def test_guidance_changes_the_tokens_of_the_test_models() -> None:
    """cfg_scale changes the tokens of both test models (greedy and sampled), so the equalities of the
    guided cases hold the graphs to the guidance arithmetic, not to an unguided step."""
    for model in (LMBidir(), sed()):
        for kw in (dict(), dict(temperature=0.8, seed=6)):
            plain = run_steps(model, PROMPTS, False, **kw)[1].sequences
            assert not torch.equal(run_steps(model, PROMPTS, False, cfg_scale=1.5, **kw)[1].sequences, plain)


def test_guidance_through_the_graphs_calls_the_network_on_both_batches() -> None:
    steps, out = run_steps(sed(), PROMPTS, True, cfg_scale=1.5, temperature=0.5, seed=1)
    assert out.stats["sequences_evaluated"] == 2 * PROMPTS.shape[0] * out.stats["network_calls"]
    assert out.stats["cuda_graph"]["replays"] == len(steps)
    assert_same_run((steps, out), run_steps(sed(), PROMPTS, False, cfg_scale=1.5, temperature=0.5, seed=1))


def test_padding_and_time_conditioning_through_the_graphs() -> None:
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 8, 7]])
    am = (torch.arange(6)[None, :] >= torch.tensor([2, 0, 3])[:, None]).long()
    for model, kw in ((LMBidir(), dict(temperature=0.6, seed=4)), (sed(), dict(cache="prefix")),
                      (LMBidir(), dict(cfg_scale=1.2, temperature=0.6, seed=4)), (sed(), dict(cfg_scale=0.8))):
        graphed = run_steps(model, ids, True, attention_mask=am, **kw)
        assert_same_run(graphed, run_steps(model, ids, False, attention_mask=am, **kw))


def tiny_llama(vocab: int = V):
    """A tiny Hugging Face Llama behind fastdiff's bidirectional adapter (its kv_forward / kv_window, its
    logits_to_keep, a frozen dataclass cache)."""
    transformers = pytest.importorskip("transformers")
    from fastdiff.models import HFBidirectional

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa", initializer_range=0.2)
    return HFBidirectional(transformers.LlamaForCausalLM(cfg).eval(), mask_id=MASK)


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_a_hugging_face_model_through_the_graphs(cache: str | None) -> None:
    m = tiny_llama()
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 8, 7]])
    am = (torch.arange(6)[None, :] >= torch.tensor([2, 0, 3])[:, None]).long()
    kw = dict(attention_mask=am, cache=cache, temperature=0.5, seed=7, preset="fast_dllm", threshold=0.2)
    assert_same_run(run_steps(m, ids, True, **kw), run_steps(m, ids, False, **kw))


def test_graphs_are_captured_once_per_static_shape_and_replayed() -> None:
    steps, out = run_steps(sed(), PROMPTS, True, cache="dual")
    # two blocks: each a first-step graph (kv_forward) and a window graph, every step a replay
    assert out.stats["cuda_graph"] == {"captures": 4, "replays": len(steps)}
    steps, out = run_steps(LMBidir(), PROMPTS, True)
    assert out.stats["cuda_graph"] == {"captures": 2, "replays": len(steps)}


def test_a_replaced_parameter_is_captured_anew() -> None:
    """A callback that replaces a weight tensor between steps (not in place): the next step captures a graph
    reading the new storage, so the tokens stay the eager run's (same callback)."""
    def swap(model: Bidir):
        def cb(step) -> None:
            if step.step == 3:
                model.out = nn.Parameter(model.out.detach() * -1.0)
        return cb

    runs = []
    for graph in (True, False):
        m = LMBidir()
        kw = dict(max_new_tokens=8, steps=8, mask_id=MASK, backend="cpp")
        if graph:
            kw.update(cuda_graph=True, _graph_kit=KIT)
        runs.append(fastdiff.generate(m, PROMPTS, callback=swap(m), **kw))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].stats["cuda_graph"]["captures"] == 2


def test_graphs_beyond_the_bound_are_released_and_recaptured(monkeypatch) -> None:
    monkeypatch.setattr(_graph, "MAX_GRAPHS", 1)
    kw = dict(max_new_tokens=16, steps=16, block_length=4, cache="prefix")
    assert_same_run(run_steps(sed(), PROMPTS, True, **kw), run_steps(sed(), PROMPTS, False, **kw))


# ---- the equality above fails when a per-step input is not refreshed before a replay --------------------
def _stale_prepare(skip: str):
    real = GenerateGraphs._prepare

    def prepare(self, t, k, c0, entry, p=None):
        saved = {"x": self.x.clone(), "t": self.t.clone(), "k": self.k.clone(), "p": self.p.clone(),
                 "seed_offset": self.seed_offset.clone(),
                 "uniform": None if entry["uniform"] is None else entry["uniform"].clone()}
        real(self, t, k, c0, entry, p)
        if skip == "offset":  # the counters of the capture (offset 0) rather than the step's
            self.seed_offset[1] = 0
        elif saved[skip] is not None:
            (entry["uniform"] if skip == "uniform" else getattr(self, skip)).copy_(saved[skip])

    return prepare


@pytest.mark.parametrize("skip,kw", [
    ("x", dict()),
    ("x", dict(cache="dual")),
    ("t", dict(cache="prefix")),
    ("k", dict(steps=6, block_length=8)),
    ("offset", dict(temperature=0.9, seed=5)),
    ("uniform", dict(remasking="random", seed=2)),
    ("x", dict(cfg_scale=1.5)),  # both halves of the guided batch come from the static sequence
    ("t", dict(cfg_scale=1.5)),  # the 2B-row time input of the guided call
    ("offset", dict(cfg_scale=1.5, temperature=0.9, seed=5)),
    ("x", dict(DREAM, alg="maskgit_plus")),
    ("t", dict(DREAM, alg="entropy")),
    ("k", dict(DREAM, alg="topk_margin")),
    ("k", dict(DREAM, alg="maskgit_plus", alg_temp=0.5)),  # Gumbel-top-k's count
    ("offset", dict(DREAM, alg="maskgit_plus", temperature=0.9, seed=5)),
    ("uniform", dict(DREAM, alg="maskgit_plus", alg_temp=0.5, seed=2)),
    ("uniform", dict(DREAM, alg="origin")),  # origin's coins
    ("p", dict(DREAM, alg="origin")),  # origin's probability of deciding, 1 - s/t
    ("offset", dict(DREAM, alg="origin", temperature=0.9, seed=5)),
    ("x", dict(BD3, seed=1)),
    ("x", dict(BD3, seed=1, cache="kv")),
    ("t", dict(BD3, seed=1, cache="kv")),
    ("offset", dict(BD3, seed=1)),
    ("uniform", dict(BD3, seed=1, temperature=0.0)),  # the pick of one position per row
])
def test_a_stale_static_input_breaks_the_equality(monkeypatch, skip: str, kw: dict) -> None:
    model = sed() if skip == "t" else LMBidir() if "cache" not in kw else sed()
    if kw.get("preset") == "bd3lm":
        model = block_causal()
    eager = run_steps(model, PROMPTS, False, **kw)
    assert_same_run(run_steps(model, PROMPTS, True, **kw), eager)
    monkeypatch.setattr(GenerateGraphs, "_prepare", _stale_prepare(skip))
    with pytest.raises(AssertionError):
        assert_same_run(run_steps(model, PROMPTS, True, **kw), eager)


# ---- scope, errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,why", [
    (dict(preset="dream", block_length=None, alg="entropy", top_p=0.9), "top_p"),
    (dict(preset="dream", block_length=None, alg="entropy", top_k=4), "top_k"),
    (dict(preset="dream", block_length=None, alg="entropy", logits_processor=lambda ids, s: s), "logits_processor"),
    (dict(preset="mdlm", block_length=None, temperature=1.0, top_k=3), "top_k"),
    (dict(preset="bd3lm", block_length=4, temperature=1.0, top_p=0.5), "top_p"),
    (dict(top_k=3), "top_k"),
    (dict(top_p=0.9), "top_p"),
    (dict(preset="fast_dllm", factor=1.0), "factor"),
    (dict(logits_processor=lambda ids, s: s), "logits_processor"),
])
def test_out_of_scope_runs_are_refused_before_any_network_call(kw: dict, why: str) -> None:
    m = LMBidir()
    for kit in (KIT, None):  # the same decision whatever the device half would say
        with pytest.raises(InputError, match=f"cuda_graph: .*{why}"):
            fastdiff.generate(m, PROMPTS, max_new_tokens=8, steps=8, mask_id=MASK, cuda_graph=True, _graph_kit=kit,
                              **{"block_length": 8, **kw})
    assert m.calls == 0


def test_device_half_of_the_decision() -> None:
    m = LMBidir()
    with pytest.raises(InputError, match="cuda_graph: CUDA graphs need a CUDA device; input_ids are on cpu"):
        fastdiff.generate(m, PROMPTS, max_new_tokens=8, steps=8, mask_id=MASK, cuda_graph=True)
    with pytest.raises(InputTypeError, match="cuda_graph: expected True or False"):
        fastdiff.generate(m, PROMPTS, max_new_tokens=8, steps=8, mask_id=MASK, cuda_graph=1)
    assert m.calls == 0
    o = type("O", (), {"backend": "cpp"})()
    with pytest.raises(InputError, match="cuda_graph: backend 'cpp' is not the CUDA select_tokens kernel"):
        _graph.check_device(o, torch.device("cuda", 0))
    o.backend = "triton"
    with pytest.raises(InputError, match="cuda_graph: backend 'triton'"):
        _graph.check_device(o, torch.device("cuda", 0))


def test_a_body_that_cannot_be_captured_raises_naming_cuda_graph() -> None:
    def failing(body):
        body()
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(InputError, match="cuda_graph: the step could not be captured"):
        fastdiff.generate(LMBidir(), PROMPTS, max_new_tokens=8, steps=8, mask_id=MASK, backend="cpp",
                          cuda_graph=True, _graph_kit=(failing, cpu_op))


@pytest.mark.parametrize("bad,msg", [(float("nan"), "contain NaN"), (float("inf"), r"contain \+inf"),
                                     (float("-inf"), "every logit at -inf")])
@pytest.mark.parametrize("case", [None, "dual", "bd3lm", "dream"])
def test_bad_logits_raise_the_eager_error_after_a_replay(bad: float, msg: str, case: str | None) -> None:
    class Bad(Bidir):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            out = super().forward(input_ids, attention_mask, position_ids)
            return torch.where(input_ids[..., None] == MASK, torch.full_like(out, bad), out) if bad < 0 else \
                torch.where((input_ids == MASK)[..., None] & (torch.arange(V) == 2), bad, out)

        def kv_forward(self, x, t, **kw):
            return self.forward(x, **kw), None

        def kv_window(self, x_win, t, *, cache, start, **kw):
            return self.forward(x_win)

    kw = dict(max_new_tokens=8, steps=8, mask_id=MASK, backend="cpp")
    if case == "dual":
        kw.update(cache="dual")
    elif case == "bd3lm":
        kw.update(preset="bd3lm", block_length=4, temperature=1.0)
    elif case == "dream":
        kw.update(preset="dream", alg="entropy")
    with pytest.raises(InputError, match=f"model output: .*{msg}") as eager:
        fastdiff.generate(Bad(vocab=V), PROMPTS, **kw)
    with pytest.raises(InputError, match=f"model output: .*{msg}") as graphed:
        fastdiff.generate(Bad(vocab=V), PROMPTS, cuda_graph=True, _graph_kit=KIT, **kw)
    assert str(graphed.value) == str(eager.value)


@pytest.mark.parametrize("mode", ["top_k", "threshold"])
def test_dense_selection_equals_the_reference_selection(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        B, W = 4, 9
        key = torch.randint(0, 4, (B, W), generator=g).double() / 4  # many ties
        cand = torch.rand(B, W, generator=g) < 0.6
        cand[0] = False  # a row without candidates
        tok = torch.randint(0, V, (B, W), generator=g)
        k = torch.randint(0, 5, (B,), generator=g)
        status = torch.zeros(B, W, dtype=torch.int32)
        want_key = torch.where(cand, key, float("-inf"))
        if mode == "top_k":
            want = _select(want_key, cand, k, None)
            got = select_dense(tok, key, status, cand, k, None, 0.0, MODE_TOP_K)
        else:
            want = _select(want_key, cand, None, 0.5)
            got = select_dense(tok, key, status, cand, None, None, 0.5, MODE_THRESHOLD)
        assert torch.equal(got[2], want), trial
        assert torch.equal(got[0], torch.where(cand, tok, 0))
        assert torch.equal(got[1], torch.where(cand, key.float(), float("-inf")))


# ------------------------------------------------------------------------------------------------
# on a GPU
# ------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _replays_eager_on_gpu(m: torch.nn.Module, ids: torch.Tensor, am: torch.Tensor | None, args: dict,
                          count: str = "network_calls") -> tuple[object, int]:
    """Runs ``generate`` eagerly and with ``cuda_graph=True``; asserts every step's tokens, the sequences, the
    ``count`` statistic and any scores equal. Returns the graphed output and its number of steps."""
    eager_steps, graphed_steps = [], []
    pos = (ids,) if am is None else (ids, am)
    eager = fastdiff.generate(m, *pos, callback=lambda s: eager_steps.append(s.tokens.clone()), **args)
    graphed = fastdiff.generate(m, *pos, cuda_graph=True, callback=lambda s: graphed_steps.append(s.tokens.clone()),
                                **args)
    assert len(eager_steps) == len(graphed_steps)
    for a, b in zip(eager_steps, graphed_steps):
        assert torch.equal(a, b)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert graphed.stats[count] == eager.stats[count]
    if eager.scores is not None:
        assert torch.equal(torch.nan_to_num(graphed.scores, -1.0), torch.nan_to_num(eager.scores, -1.0))
    return graphed, len(graphed_steps)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, seed=3), dict(preset="fast_dllm", threshold=0.3),
                                dict(remasking="random", temperature=0.5, seed=1)],
                         ids=["greedy", "sampled", "threshold", "random"])
def test_cuda_graph_generation_replays_the_eager_tokens_on_gpu(cache: str | None, kw: dict) -> None:
    m = sed().cuda()
    ids = PROMPTS.cuda()
    args = dict(max_new_tokens=32, steps=32, block_length=8, mask_id=MASK, cache=cache, **kw)
    graphed, steps = _replays_eager_on_gpu(m, ids, None, args)
    assert graphed.stats["cuda_graph"]["replays"] == steps


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache", [None, "dual"])
def test_cuda_graph_generation_of_a_hugging_face_model_on_gpu(cache: str | None) -> None:
    m = tiny_llama().cuda()
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]).cuda()
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).cuda()
    args = dict(max_new_tokens=16, steps=16, block_length=8, cache=cache, temperature=0.7, seed=2)
    eager = fastdiff.generate(m, ids, am, **args)
    graphed = fastdiff.generate(m, ids, am, cuda_graph=True, **args)
    assert torch.equal(graphed.sequences, eager.sequences)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_generation_with_an_lm_and_padding_on_gpu() -> None:
    m = LMBidir().cuda()
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]).cuda()
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).cuda()
    args = dict(max_new_tokens=16, steps=8, block_length=8, mask_id=MASK, temperature=0.7, seed=2,
                output_scores=True)
    eager = fastdiff.generate(m, ids, am, **args)
    graphed = fastdiff.generate(m, ids, am, cuda_graph=True, **args)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert torch.equal(torch.nan_to_num(graphed.scores, -1.0), torch.nan_to_num(eager.scores, -1.0))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["sed", "lm"])
@pytest.mark.parametrize("kw", [dict(cfg_scale=1.5), dict(cfg_scale=0.7, temperature=0.8, seed=3, output_scores=True),
                                dict(cfg_scale=2.0, remasking="random", temperature=0.5, seed=1)],
                         ids=["greedy", "sampled", "random"])
def test_cuda_graph_generation_with_guidance_replays_the_eager_tokens_on_gpu(model: str, kw: dict) -> None:
    m = (sed() if model == "sed" else LMBidir()).cuda()
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]).cuda()
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).cuda()
    args = dict(max_new_tokens=16, steps=12, block_length=8, mask_id=MASK, **kw)
    _replays_eager_on_gpu(m, ids, am, args, "sequences_evaluated")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["sed", "lm", "llama"])
@pytest.mark.parametrize("kw", [dict(alg="maskgit_plus"), dict(alg="topk_margin", temperature=0.8, seed=3),
                                dict(alg="entropy", temperature=0.6, seed=2, output_scores=True),
                                dict(alg="maskgit_plus", alg_temp=0.5, temperature=0.9, seed=1),
                                dict(alg="origin"), dict(alg="origin", temperature=0.9, seed=4)],
                         ids=["maskgit-greedy", "margin-sampled", "entropy-sampled", "alg_temp", "origin-greedy",
                              "origin-sampled"])
def test_cuda_graph_generation_of_dream_replays_the_eager_tokens_on_gpu(model: str, kw: dict) -> None:
    m = (sed() if model == "sed" else LMBidir() if model == "lm" else tiny_llama()).cuda()
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]).cuda()
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).cuda()
    args = dict(preset="dream", max_new_tokens=16, steps=8, mask_id=MASK, **kw)
    _replays_eager_on_gpu(m, ids, am, args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["sed", "sigma", "lm"])
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, seed=3, noise_removal=False),
                                dict(preset="duo", mask_id=None, vocab_size=V, seed=2)], ids=["mdlm", "mdlm-t", "duo"])
def test_cuda_graph_generation_of_mdlm_replays_the_eager_tokens_on_gpu(model: str, kw: dict) -> None:
    m = (sed() if model == "sed" else SigmaLM(vocab=V) if model == "sigma" else LMBidir()).cuda()
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]).cuda()
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).cuda()
    args = dict(dict(preset="mdlm", max_new_tokens=16, steps=20, mask_id=MASK, temperature=1.0), **kw)
    _replays_eager_on_gpu(m, ids, am, args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cache", [None, "kv"])
@pytest.mark.parametrize("kw", [dict(temperature=1.0, seed=3), dict(temperature=0.0, seed=1),
                                dict(temperature=0.7, seed=5, eos_token_id=3, pad_token_id=0)],
                         ids=["sampled", "greedy", "eos"])
def test_cuda_graph_generation_of_bd3lm_replays_the_eager_tokens_on_gpu(cache: str | None, kw: dict) -> None:
    m = sed_block_causal().cuda()
    ids = PROMPTS.cuda()
    args = dict(preset="bd3lm", max_new_tokens=16, steps=16, block_length=4, mask_id=MASK, cache=cache, **kw)
    _replays_eager_on_gpu(m, ids, None, args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rule", ["llada", "prob", "margin", "entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_select_rows_counters_equals_select_tokens_on_gpu(rule: str, dtype: torch.dtype) -> None:
    from fastdiff.generation._select import rank_counters
    from fastdiff.ops._plan import int64_bits
    from fastdiff.ops.select_tokens import RULE_CODES

    g = torch.Generator().manual_seed(0)
    B, W = 4, 40
    logits = (torch.randn(B, W, 300, generator=g) * 3).to(dtype).cuda()
    cand = (torch.rand(B, W, generator=g) < 0.5).cuda()
    k = torch.tensor([0, 3, 50, 7]).cuda()
    rows = rank_counters(cand, 64)
    for temperature, seed, offset in ((0.0, 0, 0), (0.8, 2**64 - 1, 5), (1.3, 123, 2**63 + 1)):
        want = ops.select_tokens(logits, cand, confidence=rule, temperature=temperature, seed=seed, offset=offset,
                                 counter_rows=rows, k=k, exclude=299, backend="cuda")
        so = torch.tensor([int64_bits(seed), int64_bits(offset)], device="cuda")
        got = _graph.cuda_select(logits, cand, rows if temperature > 0 else None, k, None, so, RULE_CODES[rule],
                                 temperature, 0.0, MODE_TOP_K, 299)
        for a, b in zip(got[:3], want):
            assert torch.equal(a, b)
        assert int(got[3].max()) == 0
