"""What fastdiff.sampling promises about its inputs and its model's outputs, beyond the output laws of
tests/test_sampling.py: nothing passed in or returned by the model is written to; every model output is
checked (named by step and t) on every backend; memory and positional capacity are checked before
anything is allocated; micro_batch makes a sample independent of the batch it is generated in; the
adapters, training mode, attention masks, dtype mixes and the progress bar behave as documented; and a
fuzz of bad options, each rejected with an error naming it, the same on every backend."""

from __future__ import annotations

import io
import math
import re
import sys

import pytest
import torch

from fastdiff import continuous, discrete, schedules
from fastdiff.errors import InputError, InputTypeError
from fastdiff.models import SEDDenoiser
from fastdiff.sampling import Denoiser, Sampler, as_denoiser, sample
from fastdiff.sampling import _memory

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 20, 19
BACKENDS = ("reference", "cpp")
DISCRETE = ("ancestral", "confidence", "threshold", "remask")


def _absorbing(T=50):
    return discrete.Absorbing(V, MASK, schedules.cosine(T))


def _gauss(T=50):
    return continuous.GaussianDiffusion(schedules.sqrt(T), parameterization="x0")


def _emb(D=4):
    return torch.randn(V, D, generator=torch.Generator().manual_seed(5))


def _logits_of(x: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Deterministic logits that depend on each row's tokens only (never on the batch)."""
    table = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(11 + salt))
    return table[x] + 0.1 * torch.cumsum(table[x].sum(-1, keepdim=True), 1)


class Stored:
    """Returns a tensor it keeps (one per input shape), the same object on every call, with the mask
    column finite (so the sampler must exclude it) and values that depend on nothing."""

    uses_time = False

    def __init__(self, width=V, continuous_=False):
        self.width, self.continuous = width, continuous_
        self.kept: dict = {}

    def __call__(self, x, t, **kw):
        shape = tuple(x.shape[:2]) + (self.width,)
        if shape not in self.kept:
            g = torch.Generator().manual_seed(len(self.kept) + 1)
            self.kept[shape] = torch.randn(shape, generator=g)
            self.kept[shape].snapshot = self.kept[shape].clone()
        return self.kept[shape]

    def unchanged(self) -> bool:
        return all(torch.equal(v, v.snapshot) for v in self.kept.values())


# ------------------------------------------------------------------------------------------------
# 1. nothing the caller passed in, or the model returned, is written to
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, kw", [
    ("confidence", {}),
    ("confidence", {"temperature": 0.0}),
    ("threshold", {}),
    ("remask", {"top_p": 0.9, "eta": 0.5}),
    ("ancestral", {"top_k": 5}),
    ("ancestral", {"cache": True}),
    ("ancestral", {"cache": True, "top_k": 5}),
    ("confidence", {"cond": {"y": torch.ones(3)}, "uncond": {"y": torch.zeros(3)}, "guidance_scale": 2.0}),
    ("ancestral", {"cond": {"y": torch.ones(3)}, "uncond": {"y": torch.zeros(3)}, "guidance_scale": 2.0}),
    ("ancestral", {"block_size": 2, "eos_id": 3, "pad_id": 0}),
    ("confidence", {"micro_batch": 2}),
])
def test_a_stored_model_output_is_never_written_to(strategy, kw):
    m = Stored()
    out = sample(m, _absorbing(), shape=(3, 6), steps=5, strategy=strategy, seed=2, **kw)
    assert m.unchanged(), "the sampler wrote into the tensor the model returned"
    assert not bool((out.tokens == MASK).any())


def test_a_stored_continuous_output_under_guidance_is_never_written_to():
    m = Stored(width=4, continuous_=True)
    sample(m, _gauss(), shape=(3, 6), steps=4, strategy="ddim", embedding=_emb(), cond={"y": torch.ones(3)},
           uncond={"y": torch.zeros(3)}, guidance_scale=3.0)
    assert m.unchanged()


@pytest.mark.parametrize("strategy, kw", [
    ("confidence", {}), ("threshold", {}), ("remask", {"top_p": 0.9}), ("ancestral", {"top_k": 3}),
    ("ancestral", {"cond": {"y": torch.ones(2)}, "uncond": {"y": torch.zeros(2)}, "guidance_scale": 2.0}),
])
def test_an_expanded_view_as_model_output_works(strategy, kw):
    """A model may return a broadcast view (no storage of its own to write to)."""
    row = torch.randn(V, generator=torch.Generator().manual_seed(3))

    def model(x, t, **c):
        return row.expand(x.shape[0], x.shape[1], V)

    out = sample(model, _absorbing(), shape=(2, 5), steps=4, strategy=strategy, seed=1, **kw)
    assert not bool((out.tokens == MASK).any())


def test_inputs_are_not_modified():
    fixed = torch.tensor([[True, False, False, False, False, True]] * 3)
    x_init = torch.tensor([[4, MASK, MASK, MASK, MASK, 7]] * 3)
    cond, uncond = {"y": torch.ones(3)}, {"y": torch.zeros(3)}
    lengths = torch.tensor([6, 4, 5])
    before = [t.clone() for t in (fixed, x_init, cond["y"], uncond["y"], lengths)]
    for strategy in DISCRETE:
        sample(lambda x, t, y: _logits_of(x), _absorbing(), shape=(3, 6), steps=4, strategy=strategy, fixed=fixed,
               x_init=x_init, cond=cond, uncond=uncond, guidance_scale=1.5, lengths=lengths, pad_id=0)
    after = (fixed, x_init, cond["y"], uncond["y"], lengths)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    emb = _emb()
    e0 = emb.clone()
    sample(lambda x, t: x * 0.5, _gauss(), shape=(3, 6), steps=3, strategy="ddim", embedding=emb, clamp="every")
    assert torch.equal(emb, e0)


# ------------------------------------------------------------------------------------------------
# 3. model outputs are checked, and errors name the model output, the step and t
# ------------------------------------------------------------------------------------------------
def _bad_at(call: int, value: float, width=V):
    state = {"n": 0}

    def model(x, t, **kw):
        state["n"] += 1
        out = _logits_of(x) if not x.is_floating_point() else x.clone()
        if state["n"] == call:
            out = out.clone()
            out[0, 0, 2] = value
        return out
    return model


@pytest.mark.parametrize("backend", BACKENDS + ("triton",))
@pytest.mark.parametrize("strategy, kw", [
    ("ancestral", {}), ("ancestral", {"top_p": 0.8}), ("remask", {"eta": 0.2}), ("confidence", {}),
    ("confidence", {"temperature": 0.0}), ("confidence", {"temperature": 0.0, "remasking": "random"}),
    ("threshold", {"temperature": 0.0}), ("ancestral", {"cond": {"y": torch.ones(2)}, "uncond": {"y": torch.zeros(2)},
                                                        "guidance_scale": 2.0}),
])
@pytest.mark.parametrize("value, what", [(math.nan, "contains NaN"), (math.inf, "+inf")])
def test_a_bad_model_output_is_named_with_its_step_and_t(backend, strategy, kw, value, what):
    p = _absorbing(T=40)
    model = _bad_at(3, value)
    with pytest.raises(InputError, match=rf"^model output at step 3 \(t=\d+\)( \(guided\))?: .*{re.escape(what)}"):
        sample(lambda x, t, **c: model(x, t), p, shape=(2, 4), steps=8, strategy=strategy, backend=backend, **kw)


def test_a_row_with_nothing_to_draw_is_named():
    """Every logit but the mask's at -inf: nothing left once SUBS excludes the mask."""
    def model(x, t):
        out = torch.full(x.shape + (V,), float("-inf"))
        out[..., MASK] = 0.0
        return out

    for strategy in ("confidence", "ancestral"):
        with pytest.raises(InputError, match=r"^model output at step 1 \(t=\d+\): .*-inf"):
            sample(model, _absorbing(), shape=(2, 4), steps=3, strategy=strategy, top_k=2)


@pytest.mark.parametrize("strategy", ["ddim", "ddpm"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_continuous_model_whose_x0_is_not_finite_is_named(strategy, value):
    with pytest.raises(InputError, match=r"^model output at step 2 \(t=\d+\): contains (NaN|infinity)"):
        sample(_bad_at(2, value, width=4), _gauss(), shape=(2, 5), steps=4, strategy=strategy, embedding=_emb())


def test_nan_weights_in_a_model_are_named_as_its_output():
    m = SEDDenoiser(vocab_size=V, width=16, layers=1, heads=2).eval()
    with torch.no_grad():
        m.blocks[0].ff[0].weight[0, 0] = float("nan")
    for backend in BACKENDS:
        with pytest.raises(InputError, match=r"^model output at step 1 \(t=50\): contains NaN"):
            sample(m, _absorbing(), shape=(2, 4), steps=2, backend=backend)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda x: x.shape[:2] + (V + 1,), InputError, r"shape \(2, 4, 21\) differs from the expected \(2, 4, 20\)"),
    ("int", InputTypeError, "expected a floating tensor, got a torch.int64 tensor"),
    ("meta", InputError, "on meta, the batch on cpu"),
    ("list", InputTypeError, "model"),
])
def test_a_model_output_of_the_wrong_shape_dtype_or_device_is_named(bad, exc, match):
    def model(x, t):
        if bad == "int":
            return torch.zeros(x.shape + (V,), dtype=torch.int64)
        if bad == "meta":
            return torch.zeros(x.shape + (V,), device="meta")
        if bad == "list":
            return [1, 2]
        return torch.zeros(bad(x))

    with pytest.raises(exc, match=match):
        sample(model, _absorbing(), shape=(2, 4), steps=2)


# ------------------------------------------------------------------------------------------------
# 4. memory and positional capacity, before anything is allocated
# ------------------------------------------------------------------------------------------------
class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        return _logits_of(x)


def test_a_batch_that_cannot_fit_is_rejected_with_the_figures(monkeypatch):
    m = Counting()
    monkeypatch.setattr(_memory, "available_bytes", lambda device=None: 1 << 20)  # 1 MiB free
    with pytest.raises(InputError, match=r"^shape: needs about .*MiB of memory \(network output \(64, 256, 20\) "
                                         r".*more than the 1.0 MiB available on cpu"):
        sample(m, _absorbing(), shape=(64, 256), steps=2)
    assert m.calls == 0
    with pytest.raises(InputError, match=r"^micro_batch: needs about"):
        sample(m, _absorbing(), shape=(2, 256), steps=2, micro_batch=4096)
    with pytest.raises(InputError, match="trajectory"):  # small batch, but 2000 steps of it kept
        monkeypatch.setattr(_memory, "available_bytes", lambda device=None: 200_000)
        sample(m, discrete.Absorbing(V, MASK, schedules.cosine(2000)), shape=(4, 4), steps=2000, trajectory=True)
    assert m.calls == 0


def test_a_length_whose_attention_cannot_fit_is_rejected_before_running():
    """The SED model reports its activations (CPU attention is (B, H, S, S)): a length of 10**5 needs
    about a terabyte, far beyond any machine this runs on; the error comes before any allocation."""
    m = SEDDenoiser(vocab_size=V, width=16, layers=1, heads=2).eval()
    assert m.forward_memory(4, 100_000) >= 2 * 4 * 2 * 100_000**2 * 4
    with pytest.raises(InputError, match=r"^shape: needs about .* (GiB|TiB) of memory .*model activations"):
        sample(m, _absorbing(), shape=(4, 100_000), steps=2)


def test_huge_shapes_are_rejected_not_allocated():
    for shape in [(10**12, 8), (2, 10**13)]:
        with pytest.raises(InputError, match=r"^shape: needs about"):
            sample(Counting(), _absorbing(), shape=shape, steps=2)


def test_a_length_beyond_the_positional_capacity_is_named():
    class Absolute(Counting):
        max_length = 16

    with pytest.raises(InputError, match=r"^shape: length 17 exceeds the model's positional capacity 16 "
                                         r"\(Absolute.max_length\)"):
        sample(Absolute(), _absorbing(), shape=(2, 17), steps=2)
    assert sample(Absolute(), _absorbing(), shape=(2, 16), steps=2).tokens.shape == (2, 16)

    class FakeHF:
        class config:
            vocab_size, max_position_embeddings, model_type, pad_token_id = V, 12, "roberta", 1

        def get_input_embeddings(self):
            return None

        def __call__(self, input_ids, **kw):
            return torch.zeros(input_ids.shape + (V,))

    with pytest.raises(InputError, match=r"capacity 10 \(config.max_position_embeddings\)"):
        sample(FakeHF(), _absorbing(), shape=(2, 11), steps=2)


def test_available_bytes_reads_the_host():
    got = _memory.available_bytes("cpu")
    assert got is not None and got > 0
    assert _memory.available_bytes("meta") is None


def test_sample_offset_past_the_random_stream_is_named():
    with pytest.raises(InputError, match="^sample_offset: "):
        sample(Counting(), _absorbing(), shape=(2, 8), steps=2, sample_offset=2**61)


# ------------------------------------------------------------------------------------------------
# 2. micro_batch: a sample's network output does not depend on its batch
# ------------------------------------------------------------------------------------------------
class ShapeDependent:
    """Logits with a perturbation that depends on the call's batch size and the row's position in it:
    a caricature of a GEMM whose rounding depends on the batch shape, strong enough to flip draws."""

    uses_time = False

    def __init__(self, continuous_=False):
        self.continuous = continuous_
        self.rows: list[int] = []

    def __call__(self, x, t, **kw):
        n = x.shape[0]
        self.rows.append(n)
        wob = 0.7 * torch.sin(torch.arange(n, dtype=torch.float32) * 1.3 + n)[:, None, None]
        if self.continuous:
            return torch.tanh(x * 0.7) + 0.3 * wob
        return _logits_of(x) + wob * torch.randn(V, generator=torch.Generator().manual_seed(n))


def _split(fn, sizes, total):
    parts, start = [], 0
    for b in sizes:
        parts.append(fn(b, start))
        start += b
    assert start == total
    return torch.cat(parts)


@pytest.mark.parametrize("strategy, kw", [
    ("ancestral", {}), ("remask", {"top_p": 0.9, "eta": 0.3}), ("confidence", {}), ("threshold", {}),
    ("ancestral", {"cache": True}), ("ancestral", {"block_size": 3, "eos_id": 5, "pad_id": 0}),
    ("confidence", {"cond": {"y": None}, "uncond": {"y": None}, "guidance_scale": 2.0}),
])
def test_micro_batch_makes_samples_independent_of_the_batch_size(strategy, kw):
    p = _absorbing()

    def run(m, b, start, micro):
        extra = dict(kw)
        if "cond" in extra:
            extra["cond"] = {"y": torch.arange(start, start + b, dtype=torch.float32)}
            extra["uncond"] = {"y": torch.zeros(b)}
        den = as_denoiser(lambda x, t, **c: m(x, t, **c), uses_time=False)
        return sample(den, p, shape=(b, 9), steps=6, strategy=strategy, seed=4, sample_offset=start,
                      micro_batch=micro, **extra).tokens

    m = ShapeDependent()
    whole = run(m, 7, 0, 4)
    for sizes in ([1] * 7, [3, 3, 1], [2, 5], [7]):
        m = ShapeDependent()
        assert torch.equal(_split(lambda b, s: run(m, b, s, 4), sizes, 7), whole), sizes
        halves = 2 if "guidance_scale" in kw else 1
        assert set(m.rows) == {4 * halves}, m.rows  # every call: exactly micro_batch rows per half
    # the statement it replaces: without micro_batch this network's samples depend on the batching
    m = ShapeDependent()
    plain = [_split(lambda b, s: run(m, b, s, None), sizes, 7) for sizes in ([1] * 7, [7])]
    assert not torch.equal(plain[0], plain[1])


def test_micro_batch_on_a_continuous_model_with_self_conditioning():
    diff = _gauss()
    emb = _emb()

    def run(m, b, start):
        return sample(lambda x, t, x_self_cond: m(x + x_self_cond, t), diff, shape=(b, 5), steps=5, strategy="ddpm",
                      seed=3, embedding=emb, self_condition=True, sample_offset=start, micro_batch=3)

    m = ShapeDependent(continuous_=True)
    whole = run(m, 5, 0)
    for sizes in ([1] * 5, [2, 3], [4, 1]):
        m = ShapeDependent(continuous_=True)
        part = [run(m, b, s) for b, s in zip(sizes, [sum(sizes[:i]) for i in range(len(sizes))])]
        assert torch.equal(torch.cat([o.tokens for o in part]), whole.tokens), sizes
        assert torch.equal(torch.cat([o.x for o in part]), whole.x), sizes
        assert set(m.rows) == {3}


def test_without_micro_batch_a_row_invariant_network_gives_the_same_samples_for_every_batching():
    """The exact statement without micro_batch: every draw is keyed by the sample's global index, so a
    network whose output for a row does not depend on its batch gives identical samples."""
    p = _absorbing()
    for strategy, kw in [("ancestral", {}), ("remask", {"top_p": 0.9, "eta": 0.3}), ("confidence", {}),
                         ("threshold", {})]:
        def run(b, start):
            return sample(lambda x, t: _logits_of(x), p, shape=(b, 9), steps=6, strategy=strategy, seed=4,
                          sample_offset=start, **kw).tokens

        whole = run(7, 0)
        for sizes in ([1] * 7, [3, 3, 1], [2, 5]):
            assert torch.equal(_split(run, sizes, 7), whole), (strategy, sizes)


def test_micro_batch_does_not_combine_with_the_kv_cache():
    with pytest.raises(InputError, match="^micro_batch: "):
        sample(Counting(), _absorbing(), shape=(2, 4), steps=2, block_size=2, kv_cache=True, micro_batch=2)


# ------------------------------------------------------------------------------------------------
# 5. adapters, train mode, masks, option/strategy mismatches, dtypes, the progress bar
# ------------------------------------------------------------------------------------------------
def test_pass_time_false_calls_a_model_without_a_step_argument():
    seen = []

    def mlm(x, **kw):
        seen.append(x.shape)
        return _logits_of(x)

    with pytest.raises(InputTypeError, match=r"^model: function takes no step argument t .*pass_time=False"):
        as_denoiser(mlm, uses_time=False)
    den = as_denoiser(mlm, uses_time=False, pass_time=False)
    out = sample(den, _absorbing(), shape=(2, 4), steps=3, cache=True)
    assert out.tokens.shape == (2, 4) and seen
    # uses_time=False alone keeps passing t (documented): a model may take it and ignore it
    got = []
    sample(as_denoiser(lambda x, t: got.append(t) or _logits_of(x), uses_time=False), _absorbing(),
           shape=(2, 4), steps=2, cache=True)
    assert got and got[0].shape == (2,)


def test_a_model_in_training_mode_samples_in_eval_mode_and_is_restored():
    torch.manual_seed(0)
    m = SEDDenoiser(vocab_size=V, width=16, layers=1, heads=2, dropout=0.5)
    m.eval()
    want = sample(m, _absorbing(), shape=(3, 6), steps=4, seed=1).tokens
    m.train()
    m.blocks[0].ff.eval()  # a submodule the user froze stays as it was
    a = sample(m, _absorbing(), shape=(3, 6), steps=4, seed=1).tokens
    b = sample(m, _absorbing(), shape=(3, 6), steps=4, seed=1).tokens
    assert torch.equal(a, want) and torch.equal(b, want)
    assert m.training and m.blocks[0].drop.training and not m.blocks[0].ff.training


def test_a_mask_id_the_model_disagrees_with_is_an_error():
    class WithMask(Counting):
        mask_id = 3

    with pytest.raises(InputError, match=r"^process: mask_id 19 differs from the model's mask token 3 "
                                         r"\(WithMask.mask_id\)"):
        sample(WithMask(), _absorbing(), shape=(2, 4), steps=2)

    class Agrees(Counting):
        mask_id = MASK

    sample(Agrees(), _absorbing(), shape=(2, 4), steps=2)


def test_an_attention_mask_in_cond_with_lengths_is_an_error():
    m = Counting()
    m.accepts_attention_mask = True
    with pytest.raises(InputError, match=r"^cond: keyword 'attention_mask' is set by the sampler"):
        sample(m, _absorbing(), shape=(2, 4), steps=2, lengths=torch.tensor([2, 4]), pad_id=0,
               cond={"attention_mask": torch.ones(2, 4, dtype=torch.bool)})
    # without lengths it is the caller's and reaches the model as given
    seen = []
    sample(lambda x, t, attention_mask: seen.append(attention_mask) or _logits_of(x), _absorbing(), shape=(2, 4),
           steps=2, cond={"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])})
    assert seen[0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_continuous_strategies_reject_temperature_and_honour_eos():
    with pytest.raises(InputError, match="^temperature: does not apply to the continuous strategies"):
        sample(lambda x, t: x, _gauss(), shape=(2, 4), steps=2, strategy="ddim", embedding=_emb(), temperature=0.7)
    emb = _emb()
    target = torch.tensor([[3, 1, 7, 1, 5, 2], [9, 2, 6, 5, 3, 4]])

    def oracle(x, t):
        return emb[target[:, : x.shape[1]]].to(x.dtype)

    for strategy in ("ddpm", "ddim"):
        out = sample(oracle, _gauss(), shape=(2, 6), steps=3, strategy=strategy, embedding=emb, eos_id=7, pad_id=0)
        assert out.tokens.tolist() == [[3, 1, 7, 0, 0, 0], [9, 2, 6, 5, 3, 4]]
        assert out.stats["stopped_at_eos"] == 1
    with pytest.raises(InputError, match=r"^eos_id: expected a token id in \[0, 20\)"):
        sample(oracle, _gauss(), shape=(2, 6), steps=3, strategy="ddim", embedding=emb, eos_id=20)


def test_mixed_precision_models_sample():
    """A bf16 body with fp32 embeddings (or the reverse) runs, discrete and continuous."""
    torch.manual_seed(0)
    d = SEDDenoiser(vocab_size=V, width=16, layers=1, heads=2, num_labels=2).eval().to(torch.bfloat16)
    d.token_embedding.float()
    out = sample(d, _absorbing(), shape=(2, 5), steps=3, cond={"label": torch.tensor([0, 1])})
    assert out.tokens.shape == (2, 5)
    d2 = SEDDenoiser(vocab_size=V, width=16, layers=1, heads=2).eval()
    d2.token_embedding.to(torch.bfloat16)
    assert sample(d2, _absorbing(), shape=(2, 5), steps=3, strategy="confidence").tokens.shape == (2, 5)
    c = SEDDenoiser(vocab_size=V, kind="continuous", embed_dim=4, width=16, layers=1, heads=2).eval()
    emb32 = c.embedding_table().detach().clone()
    c.to(torch.bfloat16)
    out = sample(c, _gauss(), shape=(2, 5), steps=3, strategy="ddim", embedding=emb32)
    assert out.x.dtype == torch.float32


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_is_drawn_on_a_terminal_only(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    sample(Counting(), _absorbing(), shape=(2, 4), steps=5, progress=True)
    assert log.getvalue() == "", "tqdm frames written to a non-terminal stream"
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    sample(Counting(), _absorbing(), shape=(2, 4), steps=5, progress=True)
    assert "fastdiff ancestral" in tty.getvalue()


def test_huge_steps_for_the_confidence_strategies_build_no_huge_schedule():
    out = sample(Counting(), _absorbing(), shape=(2, 6), steps=10**15, strategy="confidence")
    assert out.stats["steps"] == 6 and not bool((out.tokens == MASK).any())
    out = sample(Counting(), _absorbing(), shape=(2, 6), steps=2**62, strategy="threshold", tokens_per_step=10**30)
    assert not bool((out.tokens == MASK).any())


# ------------------------------------------------------------------------------------------------
# 6. a fuzz of bad options: a clear error naming the option, the same on every backend
# ------------------------------------------------------------------------------------------------
_meta = torch.zeros(2, 4, device="meta")
_sparse = torch.zeros(2, 4, dtype=torch.bool).to_sparse()
FUZZ = [
    # numbers
    (dict(temperature=math.nan), InputError, "temperature"), (dict(temperature=math.inf), InputError, "temperature"),
    (dict(temperature="1"), InputTypeError, "temperature"), (dict(temperature=True), InputTypeError, "temperature"),
    (dict(temperature=-0.5), InputError, "temperature"),
    (dict(guidance_scale=math.inf, cond={"y": torch.ones(2)}, uncond={"y": torch.zeros(2)}), InputError,
     "guidance_scale"),
    (dict(guidance_scale=math.nan), InputError, "guidance_scale"),
    (dict(strategy="remask", eta=math.inf), InputError, "eta"), (dict(strategy="remask", eta=-1.0), InputError, "eta"),
    (dict(strategy="remask", eta=2.0), InputError, "eta"),
    (dict(strategy="threshold", threshold=1.5), InputError, "threshold"),
    (dict(top_p=0.0), InputError, "top_p"), (dict(top_p=math.nan), InputError, "top_p"),
    (dict(top_k=0), InputError, "top_k"), (dict(top_k=2.5), InputTypeError, "top_k"),
    # ints
    (dict(steps=0), InputError, "steps"), (dict(steps=-2), InputError, "steps"),
    (dict(steps=2.0), InputTypeError, "steps"),
    (dict(strategy="confidence", steps=2**70), InputError, "steps"),
    (dict(block_size=0), InputError, "block_size"), (dict(strategy="confidence", tokens_per_step=0), InputError,
                                                     "tokens_per_step"),
    (dict(sample_offset=-1), InputError, "sample_offset"), (dict(sample_offset=1.0), InputTypeError, "sample_offset"),
    (dict(micro_batch=0), InputError, "micro_batch"), (dict(micro_batch="4"), InputTypeError, "micro_batch"),
    (dict(seed=-1), InputError, "seed"), (dict(seed=2**64), InputError, "seed"),
    (dict(seed=1.5), InputTypeError, "seed"),
    (dict(eos_id=-1), InputError, "eos_id"), (dict(eos_id=3.0), InputTypeError, "eos_id"),
    (dict(pad_id=V), InputError, "pad_id"),
    (dict(shape=(0, 4)), InputError, r"shape\[0\]"), (dict(shape=(2, -1)), InputError, r"shape\[1\]"),
    (dict(shape=(2, 4.0)), InputTypeError, r"shape\[1\]"), (dict(shape=(2, 4, 1)), InputError, "shape"),
    # flags and choices
    (dict(progress="yes"), InputTypeError, "progress"), (dict(trajectory=1), InputTypeError, "trajectory"),
    (dict(cache="true"), InputTypeError, "cache"), (dict(strategy=["ancestral"]), InputTypeError, "strategy"),
    (dict(block_context="all"), InputError, "block_context"), (dict(strategy="confidence", remasking="lowest"),
                                                               InputError, "remasking"),
    (dict(backend="gpu"), InputError, "backend"), (dict(backend=None), InputError, "backend"),
    (dict(device="nonsense"), InputError, "device"), (dict(device=3.5), InputTypeError, "device"),
    (dict(device="meta"), InputError, "device"),
    (dict(strategy="remask", remask_window=("a", 1)), InputError, "remask_window"),
    (dict(strategy="remask", remask_window=(0.8, 0.2)), InputError, "remask_window"),
    # options the strategy would ignore
    (dict(eta=0.5), InputError, "eta"), (dict(strategy="confidence", threshold=0.5), InputError, "threshold"),
    (dict(tokens_per_step=2), InputError, "tokens_per_step"), (dict(clamp="every"), InputError, "clamp"),
    (dict(self_condition=True), InputError, "self_condition"), (dict(embedding=torch.zeros(V, 4)), InputError,
                                                                "embedding"),
    # tensors: wrong types, shapes, devices, layouts
    (dict(fixed=torch.zeros(2, 4, dtype=torch.bool)), InputError, "fixed"),
    (dict(x_init=torch.zeros(2, 4, dtype=torch.int64)), InputError, "x_init"),
    (dict(fixed=torch.zeros(2, 4), x_init=torch.zeros(2, 4, dtype=torch.int64)), InputTypeError, "fixed"),
    (dict(fixed=torch.zeros(2, 4, dtype=torch.bool), x_init=torch.zeros(2, 4)), InputTypeError, "x_init"),
    (dict(fixed=torch.zeros(2, 5, dtype=torch.bool), x_init=torch.zeros(2, 5, dtype=torch.int64)), InputError, "fixed"),
    (dict(fixed=torch.ones(2, 4, dtype=torch.bool), x_init=torch.zeros(2, 3, dtype=torch.int64)), InputError, "x_init"),
    (dict(fixed=torch.ones(2, 4, dtype=torch.bool), x_init=torch.full((2, 4), V)), InputError, "x_init"),
    (dict(fixed=torch.ones(2, 4, dtype=torch.bool), x_init=torch.full((2, 4), MASK)), InputError, "x_init"),
    (dict(fixed=_meta.bool(), x_init=torch.zeros(2, 4, dtype=torch.int64)), InputError, "fixed"),
    (dict(fixed=_sparse, x_init=torch.zeros(2, 4, dtype=torch.int64)), InputError, "fixed"),
    (dict(fixed=[[True] * 4] * 2, x_init=torch.zeros(2, 4, dtype=torch.int64)), InputTypeError, "fixed"),
    (dict(lengths=torch.tensor([1, 9]), pad_id=0), InputError, "lengths"),
    (dict(lengths=torch.tensor([1.0, 2.0]), pad_id=0), InputTypeError, "lengths"),
    (dict(lengths=torch.tensor([1, 2, 3]), pad_id=0), InputError, "lengths"),
    (dict(lengths=torch.tensor([2, 2])), InputError, "pad_id"),
    (dict(lengths=torch.tensor([2, 2], device="meta"), pad_id=0), InputError, "lengths"),
    (dict(cond=[1]), InputTypeError, "cond"), (dict(cond={1: torch.ones(2)}), InputTypeError, "cond"),
    (dict(cond={"y": torch.ones(3)}), InputError, "cond"), (dict(cond={"y": torch.ones(())}), InputError, "cond"),
    (dict(cond={"y": torch.ones(2, device="meta")}), InputError, "cond"),
    (dict(cond={"y": torch.ones(2)}, uncond={"z": torch.ones(2)}, guidance_scale=2.0), InputError, "uncond"),
    (dict(cond={"y": torch.ones(2)}, guidance_scale=2.0), InputError, "uncond"),
    (dict(guidance_scale=2.0), InputError, "guidance_scale"),
    (dict(kv_cache=True), InputError, "kv_cache"), (dict(cuda_graph=True, device="cpu"), InputError, "cuda_graph"),
    (dict(wrong_option=1), InputTypeError, "wrong_option"),
]
CONT_FUZZ = [
    (dict(), InputError, "embedding"),
    (dict(embedding=torch.zeros(V, 4, dtype=torch.int64)), InputTypeError, "embedding"),
    (dict(embedding=torch.zeros(V)), InputError, "embedding"),
    (dict(embedding=torch.zeros(0, 4)), InputError, "embedding"),
    (dict(embedding=torch.full((V, 4), math.nan)), InputError, "embedding"),
    (dict(embedding=torch.zeros(V, 4, device="meta")), InputError, "embedding"),
    (dict(embedding=_emb(), top_k=3), InputError, "top_k"), (dict(embedding=_emb(), top_p=0.5), InputError, "top_p"),
    (dict(embedding=_emb(), temperature=2.0), InputError, "temperature"),
    (dict(embedding=_emb(), classifier_scale=3.0), InputError, "classifier_scale"),
    (dict(embedding=_emb(), classifier_grad=3), InputTypeError, "classifier_grad"),
    (dict(embedding=_emb(), self_cond_kwarg="prev"), InputError, "self_cond_kwarg"),
    (dict(embedding=_emb(), self_condition=True, self_cond_kwarg="not a name"), InputTypeError, "self_cond_kwarg"),
    (dict(embedding=_emb(), eos_id=V), InputError, "eos_id"), (dict(embedding=_emb(), clamp="always"), InputError,
                                                               "clamp"),
    (dict(embedding=_emb(), strategy="ancestral"), InputError, "strategy"),
    (dict(embedding=_emb(), steps=51), InputError, "steps"),
]


def _fuzz_ids(cases):
    return [f"{i}-{c[2]}" for i, c in enumerate(cases)]


@pytest.mark.parametrize("kwargs, exc, name", FUZZ, ids=_fuzz_ids(FUZZ))
def test_bad_options_name_themselves_identically_on_every_backend(kwargs, exc, name):
    messages = set()
    for backend in ("reference", "cpp", "triton"):
        args = dict(shape=(2, 4), steps=3, backend=backend)
        args.update(kwargs)
        m = Counting()
        with pytest.raises(exc) as info:
            sample(m, _absorbing(), **args)
        assert m.calls == 0, "the model ran before the option was checked"
        assert re.match(name, str(info.value)), str(info.value)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("kwargs, exc, name", CONT_FUZZ, ids=_fuzz_ids(CONT_FUZZ))
def test_bad_continuous_options_name_themselves(kwargs, exc, name):
    for backend in BACKENDS:
        args = dict(shape=(2, 4), steps=3, strategy="ddim", backend=backend)
        args.update(kwargs)
        with pytest.raises(exc, match=f"^{name}"):
            sample(lambda x, t: x, _gauss(), **args)


def test_a_model_on_another_device_than_the_batch_is_named():
    m = SEDDenoiser(vocab_size=V, width=16, layers=1, heads=2).eval().to("meta")
    with pytest.raises(InputError, match="^device: the batch is on cpu but the model's parameters are on meta"):
        sample(m, _absorbing(), shape=(2, 4), steps=2, device="cpu")


def test_overrides_are_checked_like_options():
    s = Sampler(_absorbing(), steps=3, strategy="confidence")
    with pytest.raises(InputError, match="^temperature"):
        s.sample(Counting(), shape=(2, 4), temperature=math.inf)
    with pytest.raises(InputTypeError, match="^temprature: unknown option"):
        s.sample(Counting(), shape=(2, 4), temprature=1.0)


def test_denoiser_flags_are_checked():
    with pytest.raises(InputTypeError, match="^pass_time"):
        Denoiser(lambda x, t: x, pass_time="no")
    with pytest.raises(InputTypeError, match="^time_kwarg"):
        Denoiser(lambda x, t: x, time_kwarg=3)
    with pytest.raises(InputTypeError, match="^uses_time"):
        as_denoiser(lambda x, t: x, uses_time="no")
