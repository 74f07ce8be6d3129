"""The decoders that run through ops.select_tokens give the tokens (and scores) of their gathered
multi-pass path, which stays in the code for processors / filtering / the factor rule: each setting runs
twice, once with the fused step switched off (``_llada_fusable`` / ``_dream_fusable`` /
``sampling._discrete._fusable`` patched to False), and the outputs are compared."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastdiff
from fastdiff.generation import _loops
from fastdiff.sampling import _discrete, sample
from tests.peers import models as M
from tests.test_sampler_contract import _absorbing

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 50, 49
SV = 20  # the sampling tests' vocabulary (tests/test_sampler_contract.py's absorbing process)
_TABLE = torch.randn(SV + 1, SV, generator=torch.Generator().manual_seed(11))
_POS = torch.randn(64, SV, generator=torch.Generator().manual_seed(12))


def _logits_of(x: torch.Tensor) -> torch.Tensor:
    """Logits of each row's tokens plus a per-position random vector: no two positions' distributions are
    shifts of each other, so their confidences are not equal up to rounding (where the fused kernels,
    accumulating in float64, and the float32 torch passes may order such near-ties differently)."""
    return _TABLE[x] + _POS[: x.shape[1]]


def _both(monkeypatch, run, *names):
    fused = run()
    with monkeypatch.context() as mp:
        for mod, name in names:
            mp.setattr(mod, name, lambda *a, **k: False)
        gathered = run()
    return fused, gathered


GEN = [
    dict(preset="llada", steps=8, block_length=4),
    dict(preset="llada", steps=8, block_length=4, temperature=0.8),
    dict(preset="llada", steps=8, block_length=8, temperature=1.0, remasking="random"),
    dict(preset="llada", steps=8, block_length=4, remasking="random"),
    dict(preset="fast_dllm", steps=8, block_length=4, threshold=0.3),
    dict(preset="fast_dllm", steps=8, block_length=4, threshold=0.2, temperature=0.7, cache="prefix"),
    dict(preset="llada", steps=8, block_length=4, suppress_mask=True, temperature=0.5),
    dict(preset="dream", steps=4, alg="maskgit_plus"),
    dict(preset="dream", steps=4, alg="topk_margin", temperature=0.6),
    dict(preset="dream", steps=4, alg="entropy", temperature=1.2),
    dict(preset="dream", steps=4, alg="maskgit_plus", temperature=0.9, alg_temp=0.5),
]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("kw", GEN, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_generation_fused_equals_gathered(monkeypatch, backend, kw):
    m = (M.CachedLM if "cache" in kw else M.TinyLM)(seed=3)
    ids = torch.randint(V - 1, (3, 5), generator=torch.Generator().manual_seed(1))

    def run():
        return fastdiff.generate(m, ids, max_new_tokens=8, mask_id=MASK, seed=4, output_scores=True,
                                 backend=backend, **kw)

    a, b = _both(monkeypatch, run, (_loops, "_llada_fusable"), (_loops, "_dream_fusable"))
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6, equal_nan=True)


_STRATS = [("confidence", {}), ("confidence", {"temperature": 0.0}), ("confidence", {"remasking": "random"}),
           ("confidence", {"temperature": 0.0, "remasking": "random"}),
           ("threshold", {"temperature": 0.0, "threshold": 0.4}), ("threshold", {"threshold": 0.3})]
_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                             reason="optional backend: triton is not installed")


@pytest.mark.parametrize("backend, strategy, kw", [
    *[(b, s, kw) for b in ("reference", "cpp") for s, kw in _STRATS],
    *[pytest.param("triton", s, kw, marks=_TRITON) for s, kw in (_STRATS[0], _STRATS[4])],  # interpreted: two
])
def test_sampling_fused_equals_gathered(monkeypatch, backend, strategy, kw):
    p = _absorbing(T=40)

    def run():
        return sample(lambda x, t: _logits_of(x), p, shape=(3, 8), steps=6, strategy=strategy, seed=2,
                      backend=backend, **kw).tokens

    a, b = _both(monkeypatch, run, (_discrete, "_fusable"))
    assert torch.equal(a, b)
