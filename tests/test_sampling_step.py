"""The sampling step as one unit (issue 16): a model's ``fresh_output`` declaration (the sampler writes into
the output instead of copying it; the tokens are those of the copying path, which tests/test_sampling.py
holds to exact distributions) and the bundled SED model's claim to it."""

from __future__ import annotations

import pytest
import torch

from fastdiff import discrete, schedules
from fastdiff.errors import InputTypeError
from fastdiff.sampling import Denoiser, as_denoiser, sample

V, MASK = 24, 23


class Model:
    """Deterministic logits that depend on the input (and on ``label`` when given); ``fresh`` says whether it
    declares ``fresh_output``; ``shared`` returns one kept tensor (an expanded view) every call instead."""

    uses_time = False

    def __init__(self, fresh: bool, shared: bool = False) -> None:
        self.fresh_output = fresh
        self.shared = shared
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(V + 2, V, generator=g)
        self.kept = torch.randn(1, 1, V, generator=g)
        self.returned: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.shared:
            out = self.kept.expand(x_t.shape[0], x_t.shape[1], V)
        else:
            out = self.table[x_t] + 0.1 * torch.cumsum(self.table[x_t].sum(-1, keepdim=True), 1)
            if label is not None:
                out = out + label.to(out.dtype)[:, None, None] * self.table[V + 1]
        self.returned.append(out)
        return out


def _process() -> discrete.Absorbing:
    return discrete.Absorbing(V, MASK, schedules.cosine(100))


CASES = [
    dict(strategy="ancestral"),
    dict(strategy="ancestral", cache=True),
    dict(strategy="ancestral", top_k=5),
    dict(strategy="confidence"),
    dict(strategy="confidence", temperature=0.0),
    dict(strategy="threshold", threshold=0.5),
    dict(strategy="confidence", block_size=4, cache=False),
    dict(strategy="remask", eta=0.3),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fresh_output_gives_the_tokens_of_the_copying_path(kw: dict) -> None:
    p = _process()
    args = dict(shape=(5, 12), steps=6, seed=7, **kw)
    a = sample(Model(fresh=False), p, **args)
    b = sample(Model(fresh=True), p, **args)
    assert torch.equal(a.tokens, b.tokens)


def test_fresh_output_under_guidance_and_micro_batch() -> None:
    p = _process()
    label = torch.tensor([0, 1, 0, 1])
    null = torch.full((4,), 2)
    for extra in (dict(), dict(micro_batch=4), dict(micro_batch=3)):
        args = dict(shape=(4, 10), steps=5, seed=3, strategy="confidence", cond={"label": label},
                    uncond={"label": null}, guidance_scale=2.5, **extra)
        a = sample(Model(fresh=False), p, **args)
        b = sample(Model(fresh=True), p, **args)
        assert torch.equal(a.tokens, b.tokens), extra


def test_a_declared_fresh_output_is_written_in_place_an_undeclared_one_never() -> None:
    p = _process()
    # the two-stage ancestral draw (top-k) sets the mask column to -inf itself; the confidence strategies no
    # longer do (ops.select_tokens excludes the column as it reads)
    args = dict(shape=(3, 8), steps=4, seed=1, strategy="ancestral", top_k=5)
    fresh = Model(fresh=True)
    sample(fresh, p, **args)
    # the mask column set to -inf in the model's own tensor: no (B, L, V) copy was made
    assert all(bool(torch.isneginf(out[..., MASK]).all()) for out in fresh.returned)
    kept = Model(fresh=False)
    sample(kept, p, **args)
    assert not any(bool(torch.isneginf(out[..., MASK]).any()) for out in kept.returned)
    # declared fresh but an expanded view of a kept tensor: not contiguous, so never written to
    view = Model(fresh=True, shared=True)
    before = view.kept.clone()
    sample(view, p, **args)
    assert torch.equal(view.kept, before)


def test_fresh_output_is_read_from_the_model_and_checked() -> None:
    assert as_denoiser(Model(fresh=True)).fresh_output is True
    assert as_denoiser(Model(fresh=False)).fresh_output is False
    assert as_denoiser(lambda x, t: x).fresh_output is False
    with pytest.raises(InputTypeError, match="fresh_output"):
        Denoiser(lambda x, t: x, fresh_output="yes")


def test_the_bundled_sed_model_returns_a_fresh_tensor_every_call() -> None:
    """What SEDDenoiser's ``fresh_output = True`` claims: each call's output is a new, contiguous tensor
    sharing storage with nothing the model holds (no parameter, no buffer) nor with an earlier output."""
    from fastdiff.pipeline import TextDiffusion

    td = TextDiffusion.load("discrete", device="cpu")
    m = td.model
    assert as_denoiser(m).fresh_output is True
    x = torch.full((2, 8), td.process.mask_id, dtype=torch.int64)
    t = torch.full((2,), 500)
    with torch.inference_mode():
        a, b = m(x, t), m(x, t)
    held = {q.untyped_storage().data_ptr() for q in list(m.parameters()) + list(m.buffers())}
    for out in (a, b):
        assert out.is_contiguous() and out.untyped_storage().data_ptr() not in held
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert torch.equal(a, b)
