"""fastdiff.generate's caches on fastdiff's own models.

* On a block-causal SED model (BD3-LM layout) Fast-dLLM's prefix and dual caches are exact: the keys and
  values of earlier blocks depend on earlier blocks only, and later blocks are never attended to, so a
  cached run must give the uncached run's tokens exactly. This holds the cache plumbing (positions,
  windows, refresh at block starts) to an exact answer.
* On the bundled bidirectional model they are approximate; the disagreement with the uncached run is
  measured, reported, and bounded.
* The exact KV cache of BD3-LM (``cache="kv"``) equals recomputation.
"""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.models import SEDConfig, SEDDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 40, 39


def block_causal(block: int, seed: int = 0) -> SEDDenoiser:
    torch.manual_seed(seed)
    m = SEDDenoiser(SEDConfig(vocab_size=V, width=32, layers=2, heads=4, rel_freqs=8, time_conditioning="none",
                              block_size=block)).eval()
    with torch.no_grad():  # a peaked random model: decisions that depend on the logits, not on ties
        m.output_bias.normal_(0, 2.0)
    return m


@pytest.mark.parametrize("preset,kw", [("llada", {}), ("fast_dllm", dict(threshold=0.2)),
                                       ("llada", dict(temperature=0.8, seed=3))])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_caches_are_exact_on_a_block_causal_model(preset: str, kw: dict, cache: str) -> None:
    m = block_causal(8)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MASK, (3, 8), generator=g)
    args = dict(max_new_tokens=24, steps=24, block_length=8, preset=preset, mask_id=MASK, **kw)
    ref = fastdiff.generate(m, ids, **args)
    out = fastdiff.generate(m, ids, cache=cache, **args)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats["network_calls"] == ref.stats["network_calls"]


def test_bd3lm_kv_cache_equals_recomputation() -> None:
    m = block_causal(4)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, MASK, (2, 8), generator=g)
    for seed in range(3):
        a = fastdiff.generate(m, ids, max_new_tokens=12, steps=12, preset="bd3lm", mask_id=MASK, seed=seed)
        b = fastdiff.generate(m, ids, max_new_tokens=12, steps=12, preset="bd3lm", mask_id=MASK, seed=seed, cache="kv")
        assert torch.equal(a.sequences, b.sequences)
        assert a.stats["network_calls"] == b.stats["network_calls"] == 12
        assert not bool((a.sequences == MASK).any())


PROMPTS = [
    "Return a new list containing all items from the iterable in ascending order. A custom key function",
    "The with statement is used to wrap the execution of a block with methods defined by a context manager",
    "This module provides access to some variables used or maintained by the interpreter and to functions",
    "Raised when an operation or function is applied to an object of inappropriate type. The associated",
    "If the optional argument is given, the file is opened in that mode; otherwise it is opened for reading",
    "A dictionary maps hashable values to arbitrary objects. Mappings are mutable objects and there is",
    "The default encoding of the returned string is the one of the locale, unless the encoding argument",
    "Create a new thread that runs the target callable with the given arguments and keyword arguments in",
]


def _bundled_prompts(n: int, P: int) -> tuple:
    """The bundled model and ``n`` prompts of ``P`` tokens (Python-documentation prose, like its corpus)."""
    from fastdiff.pipeline import TextDiffusion

    td = TextDiffusion.load("discrete")
    prompts = [td.tokenizer.encode(text)[:P] for text in PROMPTS[:n]]
    assert all(len(p) == P for p in prompts)
    return td, torch.tensor(prompts)


@pytest.mark.parametrize("preset,kw", [("llada", {}), ("fast_dllm", dict(threshold=0.9))])
def test_the_approximate_caches_on_the_bundled_model(preset: str, kw: dict, record_property) -> None:
    """The bundled bidirectional model, 8 held-out prompts of 16 tokens, 48 new tokens in blocks of 16,
    greedy. Measured: see the printed fractions (one early divergence in a block changes the rest of it). The
    block's first step is the uncached full forward, so the tokens after step 1 always agree."""
    from fastdiff.generation import iterate

    td, ids = _bundled_prompts(8, 16)
    args = dict(max_new_tokens=48, steps=48, block_length=16, preset=preset, mask_id=td.mask_id, **kw)
    ref = fastdiff.generate(td.model, ids, **args)
    assert not bool((ref.sequences == td.mask_id).any())
    first = next(iterate(td.model, ids, **args)).tokens.clone()
    for cache in ("prefix", "dual"):
        out = fastdiff.generate(td.model, ids, cache=cache, **args)
        frac = float((out.sequences[:, 16:] != ref.sequences[:, 16:]).float().mean())
        record_property(f"{preset}-{cache}-fraction-differing", frac)
        print(f"{preset} {cache}: {frac:.3f} of the generated tokens differ from the uncached run")
        assert frac <= 0.35, (cache, frac)
        assert torch.equal(next(iterate(td.model, ids, cache=cache, **args)).tokens, first)


def test_the_shipped_block_causal_model_through_generate_and_the_pipeline() -> None:
    """fastdiff/assets/bd3 (BD3-LM fine-tune of the bundled model, blocks of 16): ``fastdiff.generate``'s
    bd3lm preset with the exact KV cache equals recomputation, and ``TextDiffusion`` decodes it on its block
    grid with the KV cache by default, the same tokens as without the cache."""
    from fastdiff.pipeline import TextDiffusion

    td = TextDiffusion.load("bd3")
    assert td.block_size == 16
    ids = torch.tensor([td.tokenizer.encode(PROMPTS[0])[:16]])
    args = dict(max_new_tokens=32, steps=32, preset="bd3lm", mask_id=td.mask_id, temperature=0.9, seed=5)
    a = fastdiff.generate(td.model, ids, **args)
    b = fastdiff.generate(td.model, ids, cache="kv", **args)
    assert torch.equal(a.sequences, b.sequences) and not bool((a.sequences == td.mask_id).any())
    kv = td.generate(2, steps=8, seed=3)
    plain = td.generate(2, steps=8, seed=3, kv_cache=False)
    assert kv.stats["network_calls"] == plain.stats["network_calls"] == 4 * 8
    assert torch.equal(kv.tokens, plain.tokens)
