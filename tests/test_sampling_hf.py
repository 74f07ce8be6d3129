"""The sampler driving a Hugging Face masked LM: a tiny randomly initialised ``BertForMaskedLM`` (no download)
used as an absorbing-diffusion denoiser through :func:`fastdiff.sampling.as_denoiser` / ``HFMaskedLM``.

Independent checks: the adapter against a direct ``model(input_ids=...)`` call; greedy LLaDA / Fast-dLLM
decoding against loops written here on the model's own logits; the one-step ancestral draw against the
model's softmax by a chi-square test; the ``attention_mask``, ``input_ids`` and time keyword that reached the
model, seen by a forward hook.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")  # protection only: CI installs it with the test extra

from fastdiff import discrete, schedules  # noqa: E402
from fastdiff.sampling import Denoiser, HFMaskedLM, as_denoiser, sample  # noqa: E402

V, MASK, PAD = 64, 63, 0
T = 96  # absorbing with schedules.mutual_info: alpha_bar = 1 - t/T; steps 8 and 48 divide it exactly
B, L = 4, 12
BACKEND = "reference"  # the adapter is under test here, not the kernels (which may be mid-rebuild)
STRATEGIES = ("ancestral", "confidence", "threshold", "remask")


def _config():
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   initializer_range=0.2)  # 10x BERT's: the context moves the logits


def _init(model):
    """Seeded weights plus an output bias with some spread and a large mask logit (softmax mass about
    0.99), so that a sampler ignoring SUBS (no mass on the mask) would leave masks behind."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bias = model.cls.predictions.decoder.bias
        bias.copy_(torch.randn(V, generator=g))
        bias[MASK] = 8.0
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return _init(transformers.BertForMaskedLM(_config()))


@pytest.fixture(scope="module")
def process():
    return discrete.Absorbing(V, MASK, schedules.mutual_info(T))


class Recorder:
    """Forward pre-hook with kwargs: what the model received on each call."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _logits(bert, x, attention_mask=None):
    kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(torch.int64)}
    with torch.no_grad():
        return bert(input_ids=x, **kw).logits


def _prompt(seed: int = 3):
    """Fixed positions (about a third) and the non-mask tokens they hold."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(B, L, generator=g) < 0.35
    x_init = torch.randint(1, MASK, (B, L), generator=g)
    return fixed, x_init


# ------------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------------
def test_adapter_is_the_models_logits(bert):
    den = as_denoiser(bert)
    assert isinstance(den, HFMaskedLM)
    assert den.uses_time is False and den.accepts_attention_mask is True
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 11), generator=g)
    x[:, ::3] = MASK
    want = _logits(bert, x)
    with torch.no_grad():
        for t in (0, 5, T):  # a masked LM ignores the step
            got = den(x, torch.full((3,), t, dtype=torch.int64))
            assert got.dtype == want.dtype and torch.equal(got, want)
        am = torch.arange(11)[None, :] < torch.tensor([11, 4, 7])[:, None]
        got = den(x, torch.zeros(3, dtype=torch.int64), attention_mask=am)
    want_am = _logits(bert, x, am)
    assert torch.equal(got, want_am)
    assert not torch.equal(want_am, want)  # the mask changes the output, so the comparison above means something


# ------------------------------------------------------------------------------------------------------
# Every discrete strategy: shape, dtype, no mask left, fixed positions untouched, seeds
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_contract(bert, process, strategy):
    fixed, x_init = _prompt()
    kw = dict(shape=(B, L), steps=8, strategy=strategy, fixed=fixed, x_init=x_init, backend=BACKEND)
    if strategy == "remask":
        kw["eta"] = 0.5
    with Recorder(bert) as rec:
        out = sample(bert, process, seed=11, **kw)
    tok = out.tokens
    assert tok.shape == (B, L) and tok.dtype == torch.int64
    assert int(tok.min()) >= 0 and int(tok.max()) < V
    assert not bool((tok == MASK).any()), f"{strategy}: {int((tok == MASK).sum())} masks left"
    assert torch.equal(tok[fixed], x_init[fixed])
    # The fixed positions were never noised: the model saw the prompt tokens on every call.
    assert rec.calls and len(rec.calls) == out.stats["network_calls"]
    for c in rec.calls:
        assert torch.equal(c["input_ids"][fixed], x_init[fixed])
    assert sum(c["input_ids"].shape[0] for c in rec.calls) == out.stats["sequences_evaluated"]

    again = sample(bert, process, seed=11, **kw).tokens
    other = sample(bert, process, seed=12, **kw).tokens
    assert torch.equal(again, tok)
    assert not torch.equal(other, tok)


# ------------------------------------------------------------------------------------------------------
# Greedy LLaDA / Fast-dLLM against loops written here
# ------------------------------------------------------------------------------------------------------
def _num_transfer(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's get_num_transfer_tokens: n // steps per step, the remainder on the first steps."""
    out = torch.zeros(n_masked.shape[0], steps, dtype=torch.int64)
    for i, n in enumerate(n_masked.tolist()):
        for k in range(steps):
            out[i, k] = n // steps + (1 if k < n % steps else 0)
    return out


def _greedy_loop(bert, x, steps, *, attention_mask=None, threshold=None):
    """LLaDA ``generate`` at temperature 0 with low-confidence remasking (``threshold=None``), or
    Fast-dLLM threshold decoding; SUBS: the mask is never predicted and confidences are softmax
    probabilities over the other tokens. Row by row, in float64."""
    x = x.clone()
    masked0 = x == MASK
    if attention_mask is not None:
        masked0 &= attention_mask
    schedule = _num_transfer(masked0.sum(1), steps)
    for k in range(steps):
        logits = _logits(bert, x, attention_mask).to(torch.float64)
        logits[..., MASK] = -math.inf
        p = torch.softmax(logits, -1)
        conf, x0 = p.max(-1)
        for i in range(x.shape[0]):
            idx = [j for j in range(x.shape[1]) if bool(masked0[i, j]) and int(x[i, j]) == MASK]
            if not idx:
                continue
            idx.sort(key=lambda j: -float(conf[i, j]))
            if threshold is None:
                n = int(schedule[i, k])
            else:
                above = sum(1 for j in idx if float(conf[i, j]) > threshold)
                n = max(above, math.ceil(len(idx) / (steps - k)), 1)
            for j in idx[:n]:
                x[i, j] = x0[i, j]
    return x


def _start(fixed, x_init, lengths=None):
    x = torch.where(fixed, x_init, torch.full_like(x_init, MASK))
    if lengths is not None:
        x = torch.where(torch.arange(L)[None, :] < lengths[:, None], x, torch.full_like(x, PAD))
    return x


def test_confidence_greedy_is_llada(bert, process):
    fixed, x_init = _prompt()
    out = sample(bert, process, shape=(B, L), steps=5, strategy="confidence", temperature=0.0,
                 fixed=fixed, x_init=x_init, backend=BACKEND)
    want = _greedy_loop(bert, _start(fixed, x_init), 5)
    assert torch.equal(out.tokens, want)
    assert out.stats["network_calls"] == 5


def test_threshold_greedy_is_fast_dllm(bert, process):
    x = _start(torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.int64))
    probs = torch.softmax(_logits(bert, x).double().index_fill(-1, torch.tensor([MASK]), -math.inf), -1)
    c = probs.max(-1).values[0].sort().values  # the rows are identical (all mask)
    assert c[5] - c[4] > 1e-4
    thr = float(c[4] + c[5]) / 2  # 7 of 12 predictions pass at the first step, none within 1e-4 of it
    out = sample(bert, process, shape=(B, L), steps=6, strategy="threshold", temperature=0.0,
                 threshold=thr, backend=BACKEND)
    want = _greedy_loop(bert, x, 6, threshold=thr)
    assert torch.equal(out.tokens, want)
    assert out.stats["network_calls"] <= 6


# ------------------------------------------------------------------------------------------------------
# Ancestral: one step from all-mask draws from the model's softmax (SUBS)
# ------------------------------------------------------------------------------------------------------
def test_one_step_ancestral_draws_model_softmax(bert, process):
    stats = pytest.importorskip("scipy.stats")
    n, Ls = 4000, 3
    out = sample(bert, process, shape=(n, Ls), steps=1, strategy="ancestral", seed=5, backend=BACKEND)
    x = torch.full((1, Ls), MASK)
    logits = _logits(bert, x)[0].to(torch.float64)
    logits[:, MASK] = -math.inf
    p = torch.softmax(logits, -1)  # (Ls, V)
    chi2, dof = 0.0, 0
    for j in range(Ls):
        counts = torch.bincount(out.tokens[:, j], minlength=V).to(torch.float64)
        assert counts[MASK] == 0
        expected = n * p[j]
        keep = expected > 0
        chi2 += float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        dof += int(keep.sum()) - 1
    assert stats.chi2.sf(chi2, dof) > 1e-6, f"chi2 {chi2:.1f} with {dof} dof"


# ------------------------------------------------------------------------------------------------------
# MDLM cache: a masked LM ignores t, so unchanged sequences are skipped with identical results
# ------------------------------------------------------------------------------------------------------
def test_cache_same_tokens_fewer_evaluations(bert, process):
    steps = 48
    kw = dict(shape=(B, L), steps=steps, strategy="ancestral", seed=21, backend=BACKEND)
    plain = sample(bert, process, trajectory=True, **kw)
    with Recorder(bert) as rec:
        cached = sample(bert, process, cache=True, **kw)
    assert torch.equal(cached.tokens, plain.tokens)
    assert plain.stats["sequences_evaluated"] == B * steps
    # MDLM: step k + 1 evaluates the rows whose input changed at step k (all rows at the first step) ...
    states = [torch.full((B, L), MASK)] + plain.trajectory[:-1]  # the input of each step
    changed = [B] + [int((states[k] != states[k - 1]).any(1).sum()) for k in range(1, steps)]
    # ... except that when more than half the rows changed the whole batch is evaluated (cheaper than
    # copying most rows into the kept logits).
    changed = [B if 2 * n > B else n for n in changed]
    assert [c["input_ids"].shape[0] for c in rec.calls] == [n for n in changed if n]
    assert cached.stats["sequences_evaluated"] == sum(changed) < B * steps
    assert cached.stats["network_calls"] == sum(1 for n in changed if n)


# ------------------------------------------------------------------------------------------------------
# Variable lengths: attention_mask reaches the model, padding holds pad_id
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lengths_pass_attention_mask(bert, process, strategy):
    lengths = torch.tensor([L, 5, 1, 9])
    real = torch.arange(L)[None, :] < lengths[:, None]
    with Recorder(bert) as rec:
        out = sample(bert, process, shape=(B, L), steps=4, strategy=strategy, lengths=lengths, pad_id=PAD,
                     seed=2, backend=BACKEND)
    assert rec.calls
    for c in rec.calls:
        am = c.get("attention_mask")
        assert am is not None, "attention_mask did not reach the model"
        assert am.shape == (B, L) and torch.equal(am.bool(), real)
        assert bool((c["input_ids"][~real] == PAD).all())
    assert bool((out.tokens[~real] == PAD).all())
    assert not bool((out.tokens[real] == MASK).any())


def test_lengths_greedy_uses_the_mask(bert, process):
    lengths = torch.tensor([L, 5, 1, 9])
    real = torch.arange(L)[None, :] < lengths[:, None]
    fixed, x_init = _prompt(seed=4)
    fixed &= real
    out = sample(bert, process, shape=(B, L), steps=4, strategy="confidence", temperature=0.0, lengths=lengths,
                 pad_id=PAD, fixed=fixed, x_init=x_init, backend=BACKEND)
    want = _greedy_loop(bert, _start(fixed, x_init, lengths), 4, attention_mask=real)
    assert torch.equal(out.tokens, want)
    unmasked = _greedy_loop(bert, _start(fixed, x_init, lengths), 4)
    assert not torch.equal(unmasked, want)  # the mask matters for this model, so the check can fail


# ------------------------------------------------------------------------------------------------------
# Models that take the step as a keyword
# ------------------------------------------------------------------------------------------------------
def test_time_kwarg_callable(bert, process):
    seen = []

    def fn(x, *, timestep):
        seen.append(timestep.clone())
        return _logits(bert, x)

    den = as_denoiser(fn, time_kwarg="timestep")
    assert isinstance(den, Denoiser) and den.uses_time
    out = sample(den, process, shape=(B, L), steps=8, strategy="ancestral", seed=3, backend=BACKEND)
    assert len(seen) == out.stats["network_calls"] == 8
    grid = [T - 12 * k for k in range(8)]  # 96, 84, ..., 12: t of each step T/8 apart
    for t, want in zip(seen, grid):
        assert t.dtype == torch.int64 and t.shape == (B,)
        assert bool((t == want).all()), f"got {t.tolist()}, expected {want}"
    with pytest.raises(ValueError, match="cache"):
        sample(den, process, shape=(B, L), steps=8, cache=True, backend=BACKEND)


class TimedBert(transformers.BertForMaskedLM):
    """A BERT fine-tuned with a step input: adds a step embedding to the word embeddings' output."""

    def __init__(self, config):
        super().__init__(config)
        self.step_emb = torch.nn.Embedding(T + 1, config.hidden_size)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids=None, attention_mask=None, timestep=None, **kwargs):
        self.seen.append(timestep)
        emb = self.get_input_embeddings()(input_ids) + self.step_emb(timestep)[:, None]
        return super().forward(inputs_embeds=emb, attention_mask=attention_mask, **kwargs)


def test_time_kwarg_hf(process):
    torch.manual_seed(1)
    model = _init(TimedBert(_config()))
    den = as_denoiser(model, time_kwarg="timestep")
    assert isinstance(den, HFMaskedLM) and den.uses_time
    x = torch.full((B, L), MASK)
    with torch.no_grad():
        a = den(x, torch.full((B,), 5))
        b = den(x, torch.full((B,), 60))
    assert not torch.equal(a, b)  # the step reached the model and changes its output
    model.seen.clear()
    out = sample(den, process, shape=(B, L), steps=8, strategy="confidence", seed=0, backend=BACKEND)
    assert len(model.seen) == out.stats["network_calls"] > 0
    for t in model.seen:
        assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.shape == (B,)
        assert bool((t == t[0]).all()) and 1 <= int(t[0]) <= T
    assert [int(t[0]) for t in model.seen] == sorted((int(t[0]) for t in model.seen), reverse=True)
    with pytest.raises(ValueError, match="cache"):
        sample(den, process, shape=(B, L), steps=8, cache=True, backend=BACKEND)


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_micro_batch_with_lengths_is_independent_of_the_batching(bert, process, strategy):
    """With micro_batch, every call is micro_batch rows (attention masks and all sliced along) and each
    sequence sits at the row its global index gives it: the same samples for every split of the batch."""
    lengths = torch.tensor([12, 5, 9, 3, 12])
    calls = []
    hook = bert.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape[0]),
                                          with_kwargs=True)
    try:
        def run(lo, hi):
            return sample(bert, process, shape=(hi - lo, L), steps=8, strategy=strategy, seed=6, backend=BACKEND,
                          lengths=lengths[lo:hi], pad_id=PAD, sample_offset=lo, micro_batch=2,
                          cache=strategy == "ancestral").tokens

        whole = run(0, 5)
        for cuts in ([0, 1, 2, 3, 4, 5], [0, 3, 5], [0, 2, 5]):
            got = torch.cat([run(a, b) for a, b in zip(cuts[:-1], cuts[1:])])
            assert torch.equal(got, whole), cuts
    finally:
        hook.remove()
    assert set(calls) == {2}
    assert bool((whole[1, 5:] == PAD).all()) and bool((whole[3, 3:] == PAD).all())
