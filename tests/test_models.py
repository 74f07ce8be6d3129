"""fastdiff.models, beyond tests/test_sed.py: the flash-attn branch (through a stand-in kernel), the Transformer-XL
score against an all-pairs R_{i-j} tensor, translation invariance of whole models, every conditioning path of
the SED denoiser (continuous included), the sampler driving them (CFG, self-conditioning, variable lengths,
encoder-decoder memory), config JSON round trips, dropout/eval behaviour, argument errors, light imports."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastdiff import continuous, discrete, sampling, schedules
from fastdiff.models import CausalLM, SEDConfig, SEDDenoiser, TextClassifier, build_model
from fastdiff.models.attention import RelativeSelfAttention, attention, flash_attn_usable

ROOT = Path(__file__).resolve().parents[1]
attn_mod = importlib.import_module("fastdiff.models.attention")  # the package re-exports the function
HIGHER = ("training", "data", "pipeline", "cli")  # layers above (or beside) fastdiff.models


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str = "discrete", trained: bool = True, **kw) -> SEDDenoiser:
    """A small SED model. adaLN-Zero starts every block as the identity (no context mixing at all);
    ``trained`` (default) gives its zero-initialised projections random values, as training would, so
    the tests of context, labels and conditioning see a model that uses them."""
    torch.manual_seed(0)
    base = {"vocab_size": 50, "kind": kind, "width": 32, "layers": 2, "heads": 4, "embed_dim": 8, "rel_freqs": 4}
    base.update(kw)
    m = SEDDenoiser(SEDConfig(**base)).eval()
    if trained:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if {"ada", "final_ada"} & set(name.split(".")):
                    p.normal_(0.0, 0.3)
    return m


def all_pairs_reference(m: RelativeSelfAttention, x: torch.Tensor, mask: torch.Tensor | None,
                        causal: bool) -> torch.Tensor:
    """Transformer-XL (Dai et al. 2019 §3.3) in float64 with R_{i-j} = [sin((i-j)ω), cos((i-j)ω)] built as an
    (L, L, 2F) tensor and W_r R_{i-j} as (H, L, L, d): the O(L²) computation the extended q/k replaces."""
    B, L, W = x.shape
    H, d, F = m.heads, m.head_dim, m.rel_freqs
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    q, k, v = (x.double() @ p["qkv.weight"].t() + p["qkv.bias"]).view(B, L, 3, H, d).permute(2, 0, 3, 1, 4)
    omega = 10000.0 ** (-torch.arange(F, dtype=torch.float64) / F)
    pos = torch.arange(L, dtype=torch.float64)
    delta = (pos[:, None] - pos[None, :])[..., None] * omega  # (L, L, F)
    R = torch.cat([delta.sin(), delta.cos()], -1)  # (L, L, 2F)
    WR = torch.einsum("hdf,ijf->hijd", p["w_r"], R)
    S = torch.einsum("bhid,bhjd->bhij", q + p["u"][:, None], k) + torch.einsum("bhid,hijd->bhij", q + p["v"][:, None], WR)
    S = S / d**0.5
    if mask is not None:
        S = S.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        S = S.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    o = (S.softmax(-1) @ v).transpose(1, 2).reshape(B, L, W)
    return o @ p["out.weight"].t() + p["out.bias"]


def fake_flash_module(calls: list) -> types.ModuleType:
    """A stand-in for ``flash_attn``: ``flash_attn_func`` on (B, L, H, d) tensors, written out in float64."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append({"q": tuple(q.shape), "v": tuple(v.shape), "scale": softmax_scale, "causal": causal})
        assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attn takes one head dim for q, k and v"
        s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) * softmax_scale
        if causal:
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double()).to(q.dtype)

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func = flash_attn_func
    return mod


# --- attention ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 7, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_extended_qk_equals_the_all_pairs_score(L: int, causal: bool) -> None:
    torch.manual_seed(L + causal)
    m = RelativeSelfAttention(24, 3, rel_freqs=6, causal=causal, backend="sdpa").double()
    with torch.no_grad():
        m.u.normal_()
        m.v.normal_()
    x = torch.randn(3, L, 24, dtype=torch.float64)
    mask = torch.ones(3, L, dtype=torch.bool)
    mask[1, (L + 1) // 2:] = False  # right padding
    mask[2, : L // 3] = False  # left padding (causal rows with no real key are not compared)
    mask[2, -1] = True
    for msk in (None, mask):
        out, ref = m(x, msk), all_pairs_reference(m, x, msk, causal)
        keep = torch.isfinite(ref).all(-1)
        if msk is not None:
            keep &= msk
        torch.testing.assert_close(out[keep], ref[keep], atol=1e-10, rtol=1e-9)


def test_auto_backend_is_sdpa_without_flash_attn(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    q = torch.randn(1, 2, 5, 8)
    assert not flash_attn_usable(q, None)
    assert not flash_attn_usable(q.bfloat16(), None)
    with pytest.raises(RuntimeError, match="flash"):
        attention(q, q, q, scale=0.3, backend="flash")
    # importable but on CPU: still SDPA (flash needs CUDA fp16/bf16 and no padding mask)
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module(calls))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert not flash_attn_usable(q.to(dtype), None)
    out = attention(q, q, q, scale=0.3)
    assert calls == []
    torch.testing.assert_close(out, torch.softmax(0.3 * q @ q.transpose(-1, -2), -1) @ q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_branch_runs_the_exact_relative_score(monkeypatch, causal: bool) -> None:
    """Where flash-attn would run (pretended here: the usability check is patched), the extended q/k go to
    ``flash_attn_func`` in (B, L, H, d) layout with v padded to their head dim and ``softmax_scale`` =
    1/sqrt(d) of the *original* head dim; the result is the Transformer-XL attention."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_module(calls))
    monkeypatch.setattr(attn_mod, "flash_attn_usable", lambda q, key_padding_mask: key_padding_mask is None)
    torch.manual_seed(1)
    m = RelativeSelfAttention(32, 4, rel_freqs=5, causal=causal)
    with torch.no_grad():
        m.u.normal_()
        m.v.normal_()
    x = torch.randn(2, 9, 32)
    out = m(x)
    assert calls == [{"q": (2, 9, 4, 8 + 10), "v": (2, 9, 4, 8 + 10), "scale": 8**-0.5, "causal": causal}]
    torch.testing.assert_close(out.double(), all_pairs_reference(m, x, None, causal), atol=1e-5, rtol=1e-4)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    m(x, mask)  # a padding mask keeps SDPA
    assert len(calls) == 1


# --- SED denoiser ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_outputs_do_not_depend_on_absolute_offset(kind: str) -> None:
    """Relative positions: the same content at offset 0 or 5 inside padding gives the same outputs (a learned
    absolute position embedding would not); reversing the content does change them (order is seen)."""
    m = tiny(kind, self_condition=kind == "continuous")
    torch.manual_seed(2)
    L, n, off = 14, 6, 5
    if kind == "discrete":
        content = torch.randint(0, 50, (2, n))
        x_a, x_b = torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L, dtype=torch.long)
    else:
        content = torch.randn(2, n, 8)
        x_a, x_b = torch.zeros(2, L, 8), torch.zeros(2, L, 8)
    x_a[:, :n], x_b[:, off:off + n] = content, content
    mask_a, mask_b = torch.zeros(2, L, dtype=torch.bool), torch.zeros(2, L, dtype=torch.bool)
    mask_a[:, :n], mask_b[:, off:off + n] = True, True
    t = torch.tensor([3, 80])
    out_a = m(x_a, t, attention_mask=mask_a)[:, :n]
    out_b = m(x_b, t, attention_mask=mask_b)[:, off:off + n]
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    x_r = x_a.clone()
    x_r[:, :n] = content.flip(1)
    out_r = m(x_r, t, attention_mask=mask_a)[:, :n].flip(1)
    assert (out_r - out_a).abs().max() > 1e-3


def test_label_prefix_and_null_label() -> None:
    for kind in ("discrete", "continuous"):
        m = tiny(kind, num_labels=3)
        torch.manual_seed(3)
        x = torch.randint(0, 50, (2, 7)) if kind == "discrete" else torch.randn(2, 7, 8)
        t = torch.tensor([10, 10])
        outs = [m(x, t, label=torch.full((2,), y)) for y in range(4)]
        assert all(o.shape == ((2, 7, 50) if kind == "discrete" else (2, 7, 8)) for o in outs)
        for i in range(4):
            for j in range(i):
                assert (outs[i] - outs[j]).abs().max() > 1e-4, (kind, i, j)
        torch.testing.assert_close(m(x, t), outs[3])  # no label = the null label (CFG's unconditional pass)
        mixed = m(x, t, label=torch.tensor([0, 2]))  # per-row labels
        torch.testing.assert_close(mixed[0], outs[0][0])
        torch.testing.assert_close(mixed[1], outs[2][1])


def test_continuous_condition_tokens_and_embedding_gradients() -> None:
    m = tiny("continuous", self_condition=True).train()
    torch.manual_seed(4)
    tokens = torch.randint(3, 50, (2, 6))
    cond = torch.randint(3, 50, (2, 4))
    cond[1, 2:] = 0  # PAD
    x0 = m.embedding(tokens)
    x_t = x0 + 0.3 * torch.randn_like(x0)
    t = torch.tensor([5, 60])
    out = m(x_t, t, cond_tokens=cond)
    assert out.shape == (2, 6, 8)  # the 4 condition positions are not returned
    out.square().sum().backward()  # the loss sees the model output only
    g = m.embedding.embedding.weight.grad
    used = set(tokens.flatten().tolist()) | set(cond[cond != 0].tolist())
    assert all(g[i].abs().sum() > 0 for i in used)
    assert all(g[i].abs().sum() == 0 for i in set(range(50)) - used)
    m.eval()
    with torch.no_grad():
        base = m(x_t, t, cond_tokens=cond)
        other = cond.clone()
        other[1, 3] = 0
        other[1, 2:] = 0
        torch.testing.assert_close(m(x_t, t, cond_tokens=other), base)
        other[1, 1] = 7 if int(cond[1, 1]) != 7 else 8
        changed = m(x_t, t, cond_tokens=other)
        torch.testing.assert_close(changed[0], base[0])  # rows are independent
        assert (changed[1] - base[1]).abs().max() > 1e-4
        assert (m(x_t, t) - base).abs().max() > 1e-4


def test_dropout_only_in_train_mode() -> None:
    m = tiny(dropout=0.3)
    x, t = torch.randint(0, 50, (2, 8)), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t), m(x, t), atol=0, rtol=0)
        m.train()
        a, b = m(x, t), m(x, t)
        assert (a - b).abs().max() > 1e-4
        torch.manual_seed(9)
        c = m(x, t)
        torch.manual_seed(9)
        torch.testing.assert_close(m(x, t), c, atol=0, rtol=0)


@pytest.mark.parametrize("kw", [{"num_labels": 3}, {"kind": "continuous", "self_condition": True,
                                                    "embedding_layernorm": True},
                                {"cross_attention": True, "encoder_layers": 1}, {"tie_output": False},
                                {"kind": "continuous", "cross_attention": True}])
def test_json_config_round_trip_rebuilds_an_identical_model(kw: dict) -> None:
    m = tiny(**kw)
    cfg = json.loads(json.dumps(m.config_dict()))
    again = build_model(m.arch, cfg).eval()
    assert SEDConfig.from_dict(cfg) == m.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    again.load_state_dict(m.state_dict(), strict=True)
    x = torch.randint(0, 50, (2, 5)) if m.config.kind == "discrete" else torch.randn(2, 5, 8)
    extra = {}
    if m.config.cross_attention:
        src = torch.randint(0, 50, (2, 3))
        extra = {"memory": m.encode(src)}
    torch.testing.assert_close(again(x, torch.tensor([4, 4]), **extra), m(x, torch.tensor([4, 4]), **extra))


def test_scorer_configs_round_trip() -> None:
    for m in (CausalLM(40, width=16, layers=1, heads=2, max_len=16), TextClassifier(40, 3, width=16, heads=2)):
        cfg = json.loads(json.dumps(m.config_dict()))
        again = build_model(m.arch, cfg)
        assert again.config_dict() == m.config_dict()
        again.load_state_dict(m.state_dict(), strict=True)


def test_bad_inputs_raise_naming_the_argument() -> None:
    m = tiny(num_labels=2)
    x, t = torch.randint(0, 50, (2, 5)), torch.tensor([1, 2])
    cases = [
        (TypeError, "x_t", lambda: m(x.float(), t)),
        (TypeError, "x_t", lambda: m(x[0], t)),
        (TypeError, "x_t", lambda: m(x.tolist(), t)),
        (ValueError, "x_t", lambda: m(torch.full((2, 5), -1), t)),
        (ValueError, "x_t", lambda: m(torch.full((2, 5), 50), t)),
        (ValueError, "t:", lambda: m(x, torch.tensor([1]))),
        (ValueError, "t:", lambda: m(x, torch.tensor([1.0, 2.0]))),
        (ValueError, "label", lambda: m(x, t, label=torch.tensor([0, -1]))),
        (ValueError, "label", lambda: m(x, t, label=torch.tensor([0.0, 1.0]))),
        (ValueError, "label", lambda: m(x, t, label=torch.tensor([0]))),
        (ValueError, "attention_mask", lambda: m(x, t, attention_mask=torch.ones(2, 4, dtype=torch.bool))),
        (ValueError, "cond_tokens", lambda: m(x, t, cond_tokens=torch.ones(3, 4, dtype=torch.long))),
        (ValueError, "cond_tokens", lambda: m(x, t, cond_tokens=torch.full((2, 4), 99))),
        (ValueError, "memory", lambda: m(x, t, memory=torch.zeros(2, 3, 32))),
    ]
    c = tiny("continuous", self_condition=True)
    z = torch.randn(2, 5, 8)
    cases += [
        (ValueError, "x_t", lambda: c(z.long(), t)),
        (ValueError, "x_t", lambda: c(z[..., :7], t)),
        (ValueError, "x_self_cond", lambda: c(z, t, x_self_cond=z[:, :4])),
        (ValueError, "x_self_cond", lambda: tiny("continuous")(z, t, x_self_cond=z)),
        (TypeError, "embedding_table", lambda: m.embedding_table()),
    ]
    ed = tiny(cross_attention=True, encoder_layers=1)
    src = torch.randint(0, 50, (2, 3))
    cases += [
        (ValueError, "memory_mask", lambda: ed(x, t, memory=ed.encode(src), memory_mask=torch.ones(2, 4, dtype=bool))),
        (ValueError, "src_mask", lambda: ed.encode(src, torch.ones(2, 2, dtype=torch.bool))),
        (TypeError, "src_tokens", lambda: ed.encode(src.float())),
    ]
    cases += [
        (ValueError, "kind", lambda: SEDConfig(vocab_size=5, kind="image")),
        (ValueError, "self_condition", lambda: SEDConfig(vocab_size=5, self_condition=True)),
        (ValueError, "output", lambda: SEDConfig(vocab_size=5, output="embedding")),
        (TypeError, "vocab_size", lambda: SEDConfig(vocab_size=5.0)),
        (ValueError, "dropout", lambda: SEDConfig(vocab_size=5, dropout=1.0)),
        (ValueError, "attention", lambda: SEDConfig(vocab_size=5, attention="xformers")),
        (TypeError, "config", lambda: build_model("sed", [("vocab_size", 5)])),
        (TypeError, "tokens", lambda: CausalLM(10, width=8, heads=2)(torch.zeros(2, 3))),
        (ValueError, "width", lambda: CausalLM(10, width=10, heads=4)),
        (ValueError, "heads", lambda: TextClassifier(10, 2, width=8, heads=0)),
        (ValueError, "pad_id", lambda: TextClassifier(10, 2, width=8, heads=2, pad_id=-1)),
        (ValueError, "attention_mask", lambda: TextClassifier(10, 2, width=8, heads=2)(
            torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.bool))),
    ]
    for i, (exc, name, fn) in enumerate(cases):
        with pytest.raises(exc, match=name):
            fn()
            pytest.fail(f"case {i} ({name}) did not raise")


def test_bfloat16_autocast_forward_stays_close() -> None:
    m = tiny(num_labels=2)
    x, t = torch.randint(0, 50, (2, 9)), torch.tensor([7, 70])
    ref = m(x, t, label=torch.tensor([0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x, t, label=torch.tensor([0, 1]))
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


# --- the sampler on SED models -----------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Wraps a model, keeping the keyword arguments of every call (the sampler reads the wrapped flags)."""

    def __init__(self, inner: SEDDenoiser):
        super().__init__()
        self.inner, self.calls = inner, []
        self.uses_time, self.accepts_attention_mask = inner.uses_time, inner.accepts_attention_mask

    def forward(self, x_t, t, **kw):
        self.calls.append({"x_t": x_t.clone(), "t": t.clone(), **{k: v.clone() for k, v in kw.items()}})
        return self.inner(x_t, t, **kw)


def test_discrete_ancestral_sampling_with_guidance() -> None:
    m = tiny(num_labels=2)
    proc = discrete.Absorbing(50, mask_id=1, schedule=schedules.mutual_info(100))
    y = torch.tensor([0, 1, 1])
    kw = {"shape": (3, 12), "steps": 10, "strategy": "ancestral", "cond": {"label": y},
          "uncond": {"label": torch.full((3,), 2)}, "guidance_scale": 3.0}
    rec = Recorder(m)
    a = sampling.sample(rec, proc, seed=5, **kw)
    b = sampling.sample(m, proc, seed=5, **kw)
    assert a.tokens.shape == (3, 12) and a.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens) and not (a.tokens == 1).any()
    assert not torch.equal(a.tokens, sampling.sample(m, proc, seed=6, **kw).tokens)
    assert not torch.equal(a.tokens, sampling.sample(m, proc, seed=5, **{**kw, "guidance_scale": 0.0}).tokens)
    labels = torch.cat([c["label"] for c in rec.calls]).view(len(rec.calls), -1)
    assert {tuple(r.tolist()) for r in labels} == {(0, 1, 1, 2, 2, 2)}  # cond and null label in one batch
    lengths = torch.tensor([4, 12, 7])
    rec2 = Recorder(m)
    v = sampling.sample(rec2, proc, seed=5, **{**kw, "lengths": lengths, "pad_id": 0})
    real = torch.arange(12)[None] < lengths[:, None]
    assert (v.tokens[~real] == 0).all() and not (v.tokens[real] == 1).any()
    assert all(torch.equal(c["attention_mask"], torch.cat([real, real])) for c in rec2.calls)


def test_continuous_ddim_sampling_with_self_conditioning() -> None:
    m = tiny("continuous", self_condition=True)
    proc = continuous.GaussianDiffusion(schedules.sqrt(100), parameterization="x0")
    emb = m.embedding_table().detach()
    rec = Recorder(m)
    kw = {"shape": (2, 7), "steps": 6, "strategy": "ddim", "embedding": emb, "self_condition": True}
    a = sampling.sample(rec, proc, seed=1, **kw)
    b = sampling.sample(m, proc, seed=1, **kw)
    assert a.tokens.shape == (2, 7) and a.x.shape == (2, 7, 8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.x, b.x)
    assert len(rec.calls) == 6
    # from the second call on, the model gets its own previous x0 estimate
    for prev, call in zip(rec.calls, rec.calls[1:]):
        assert "x_self_cond" in call and call["x_self_cond"].shape == (2, 7, 8)
        torch.testing.assert_close(call["x_self_cond"], m(prev["x_t"], prev["t"], x_self_cond=prev.get("x_self_cond")))
    snapped = torch.cdist(a.x.reshape(-1, 8), emb).argmin(-1).view(2, 7)
    assert torch.equal(snapped, a.tokens)


def test_encoder_decoder_memory_is_computed_once() -> None:
    m = tiny(cross_attention=True, encoder_layers=1)
    proc = discrete.Absorbing(50, mask_id=1, schedule=schedules.mutual_info(100))
    src = torch.randint(3, 50, (2, 5))
    src[0, 3:] = 0
    smask = src != 0
    runs = []
    hook = m.encoder[0].register_forward_hook(lambda *a: runs.append(1))
    memory = m.encode(src, smask)
    kw = {"shape": (2, 8), "steps": 5, "seed": 2}
    once = sampling.sample(m, proc, cond={"memory": memory, "memory_mask": smask}, **kw)
    assert len(runs) == 1

    def encode_every_call(x_t, t, **c):
        return m(x_t, t, memory=m.encode(src, smask), memory_mask=smask, **c)

    every = sampling.sample(encode_every_call, proc, **kw)
    hook.remove()
    assert len(runs) == 1 + 5
    assert torch.equal(once.tokens, every.tokens)


# --- scorers -----------------------------------------------------------------------------------------------


def test_causal_lm_logits_at_i_see_only_tokens_up_to_i() -> None:
    torch.manual_seed(0)
    lm = CausalLM(30, width=16, layers=2, heads=2, max_len=16).eval()
    x = torch.randint(0, 30, (2, 10))
    base = lm(x)
    assert base.shape == (2, 10, 30)
    for j in (0, 4, 9):
        y = x.clone()
        y[:, j] = (y[:, j] + 7) % 30
        out = lm(y)
        torch.testing.assert_close(out[:, :j], base[:, :j])
        assert (out[:, j:] - base[:, j:]).abs().max() > 1e-4


def test_classifier_ignores_padding_and_its_position() -> None:
    torch.manual_seed(0)
    clf = TextClassifier(30, 3, width=16, layers=2, heads=2, pad_id=0).eval()
    content = torch.randint(1, 30, (2, 5))
    a = torch.zeros(2, 9, dtype=torch.long)
    a[:, :5] = content
    b = torch.full((2, 9), 11)
    b[:, 3:8] = content
    mb = torch.zeros(2, 9, dtype=torch.bool)
    mb[:, 3:8] = True
    ref = clf(a)  # PAD ids masked by default
    assert ref.shape == (2, 3)
    torch.testing.assert_close(clf(b, attention_mask=mb), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clf(a, attention_mask=a != 0), ref)
    assert (clf(b) - ref).abs().max() > 1e-4  # without the mask the filler tokens count


# --- packaging ---------------------------------------------------------------------------------------------


def test_models_import_nothing_heavy_and_respect_the_layers() -> None:
    code = ("import sys, fastdiff.models\n"
            "print(sorted(m for m in ('transformers', 'flash_attn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for path in sorted((ROOT / "fastdiff" / "models").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: heavy imports live inside functions
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert not name.startswith(("transformers", "flash_attn", "tokenizers")), (path.name, name)
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = ["fastdiff." + node.module] if node.level >= 2 else [node.module]
            for mod in mods:  # the layer order in the docs
                parts = mod.split(".")
                assert not (parts[0] == "fastdiff" and len(parts) > 1 and parts[1] in HIGHER), (path.name, mod)


# --- embeddings from a local Hugging Face model ------------------------------------------------------------


class WordTokenizer:
    """Duck-typed tokenizer (``vocab_size``, ``decode``): specials decode to "", the rest to their string."""

    def __init__(self, words: list[str]):
        self.words = ["[PAD]", "[MASK]", "[SEP]", "[UNK]", *words]
        self.vocab_size = len(self.words)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids if i >= 4)


def test_pca_rows_are_the_principal_components_of_the_pretrained_rows(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fastdiff.models.pretrained import init_embeddings_from_pretrained

    hf_words = [f"w{i:02d}" for i in range(40)]
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(reversed(hf_words))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        tmp_path)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    table = transformers.BertModel.from_pretrained(tmp_path).get_input_embeddings().weight.detach().double()

    ours = WordTokenizer(["w05", "w17", "w05 w30", "w39", "w00", "w22 w23 w24"])
    pieces = {4: ["w05"], 5: ["w17"], 6: ["w05", "w30"], 7: ["w39"], 8: ["w00"], 9: ["w22", "w23", "w24"]}
    weight = torch.randn(ours.vocab_size, 3) * 0.05
    before = weight.clone()
    found = init_embeddings_from_pretrained(weight, ours, tmp_path, proj="pca")
    assert found.tolist() == [False] * 4 + [True] * 6
    torch.testing.assert_close(weight[:4], before[:4])  # specials keep their init
    # top-3 principal directions by an eigendecomposition of the covariance, signs aligned column by column
    mean = table.mean(0)
    evals, evecs = torch.linalg.eigh((table - mean).t() @ (table - mean))
    U = evecs[:, evals.argsort(descending=True)[:3]]
    want = torch.stack([table[[vocab[w] for w in pieces[i]]].mean(0) for i in range(4, 10)])
    expect = (want - mean) @ U
    got = weight[4:].double()
    expect = expect * torch.sign((got * expect).sum(0))
    scale = (got * expect).sum() / (expect * expect).sum()
    torch.testing.assert_close(got, scale * expect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(float(got.std()), float(before.std()), atol=1e-4, rtol=1e-3)  # rescaled to the init

    with pytest.raises(FileNotFoundError, match="hf_dir"):
        init_embeddings_from_pretrained(weight, ours, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="hf_dir"):
        init_embeddings_from_pretrained(weight, ours, tmp_path / "empty")
    with pytest.raises(ValueError, match="embedding"):
        init_embeddings_from_pretrained(torch.zeros(5, 3), ours, tmp_path)


def test_forward_reads_nothing_on_the_host_while_a_cuda_graph_is_captured(monkeypatch) -> None:
    """The sampler's ``cuda_graph=True`` captures the forward: no ``.item()``/``int()``/``bool()`` of a tensor
    may run then (simulated here: capture reported on, host reads raise); the outputs stay the same."""
    cases = []
    for kind in ("discrete", "continuous"):
        m = tiny(kind, num_labels=2, self_condition=kind == "continuous", embedding_layernorm=True)
        x = torch.randint(0, 50, (2, 6)) if kind == "discrete" else torch.randn(2, 6, 8)
        kw = {"label": torch.tensor([1, 2]), "cond_tokens": torch.tensor([[5, 6, 0], [7, 0, 0]]),
              "attention_mask": torch.tensor([[True] * 6, [True] * 4 + [False] * 2])}
        if kind == "continuous":
            kw["x_self_cond"] = torch.randn(2, 6, 8)
        cases.append((m, x, kw, m(x, torch.tensor([3, 9]), **kw)))

    def host_read(*a, **k):
        raise RuntimeError("host read during capture")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for name in ("__int__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    outs = [m(x, torch.tensor([3, 9]), **kw) for m, x, kw, _ in cases]
    monkeypatch.undo()
    for out, (*_, ref) in zip(outs, cases):
        torch.testing.assert_close(out, ref)


# --- moved from tests/test_sed.py (unit checks of the position term and the conditioning paths) ---
def test_position_scores_depend_only_on_offset() -> None:
    """With the same query and key at every position the score matrix is Toeplitz (a function of i - j):
    what relative positions promise and an absolute position embedding breaks."""
    torch.manual_seed(0)
    m = RelativeSelfAttention(16, 2, rel_freqs=4)
    with torch.no_grad():
        m.v.normal_()
    L = 9
    q = torch.randn(1, 2, 1, 8).expand(1, 2, L, 8)
    k = torch.randn(1, 2, 1, 8).expand(1, 2, L, 8)
    qx, kx = m.extended_qk(q, k)
    S = qx @ kx.transpose(-1, -2)
    for off in range(-L + 1, L):
        diag = torch.diagonal(S, offset=off, dim1=-2, dim2=-1)
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.diagonal(S, 1, -2, -1)[..., 0], torch.diagonal(S, 3, -2, -1)[..., 0])


def test_discrete_sed_shapes_labels_and_condition_prefix() -> None:
    m = tiny(num_labels=2)
    x = torch.randint(0, 50, (3, 11))
    t = torch.tensor([1, 500, 999])
    out = m(x, t)
    assert out.shape == (3, 11, 50) and torch.isfinite(out).all()
    torch.testing.assert_close(m(x, t, label=torch.full((3,), 2)), out)  # default = the null label
    assert not torch.allclose(m(x, t, label=torch.zeros(3, dtype=torch.long)), out)
    assert not torch.allclose(m(x, t + 1), out)  # the step is an input
    cond = torch.randint(3, 50, (3, 5))
    cond[:, 3:] = 0  # PAD: masked out of attention
    with_cond = m(x, t, cond_tokens=cond)
    assert with_cond.shape == (3, 11, 50)  # condition positions are not returned
    assert not torch.allclose(with_cond, out)
    other = cond.clone()
    other[:, 3:] = 0
    other[0, 4] = 0
    torch.testing.assert_close(m(x, t, cond_tokens=other), with_cond)
    changed = cond.clone()
    changed[:, 0] = (changed[:, 0] + 1 - 3) % 47 + 3
    assert not torch.allclose(m(x, t, cond_tokens=changed), with_cond)


def test_attention_mask_hides_padded_positions() -> None:
    m = tiny()
    x = torch.randint(0, 50, (2, 8))
    am = torch.ones(2, 8, dtype=torch.bool)
    am[:, 6:] = False
    out = m(x, torch.tensor([5, 5]), attention_mask=am)
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 50
    torch.testing.assert_close(m(y, torch.tensor([5, 5]), attention_mask=am)[:, :6], out[:, :6])


def test_encoder_decoder_encodes_once() -> None:
    m = tiny(cross_attention=True, encoder_layers=1)
    src = torch.randint(3, 50, (2, 6))
    src[1, 4:] = 0
    smask = src != 0
    x = torch.randint(0, 50, (2, 7))
    t = torch.tensor([10, 900])
    memory = m.encode(src, smask)
    assert memory.shape == (2, 6, 32)
    out = m(x, t, memory=memory, memory_mask=smask)
    assert out.shape == (2, 7, 50)
    src2 = src.clone()
    src2[1, 5] = 7  # a padded source position: no effect
    torch.testing.assert_close(m(x, t, memory=m.encode(src2, smask), memory_mask=smask), out)
    src3 = src.clone()
    src3[0, 0] = (src3[0, 0] + 1 - 3) % 47 + 3
    assert not torch.allclose(m(x, t, memory=m.encode(src3, smask), memory_mask=smask)[0], out[0])
    with pytest.raises(ValueError, match="memory"):
        m(x, t)
    with pytest.raises(TypeError, match="encode"):
        tiny().encode(src)


def test_continuous_sed_self_conditioning_and_embedding_gradient() -> None:
    m = tiny("continuous", self_condition=True, embedding_layernorm=True).train()
    tokens = torch.randint(0, 50, (2, 9))
    x0 = m.embedding(tokens)
    x_t = x0 + 0.5 * torch.randn_like(x0)
    t = torch.tensor([100, 700])
    out = m(x_t, t)
    assert out.shape == (2, 9, 8)
    torch.testing.assert_close(m(x_t, t, x_self_cond=torch.zeros_like(x_t)), out)
    assert not torch.allclose(m(x_t, t, x_self_cond=torch.randn_like(x_t)), out)
    table = m.embedding_table()
    assert table.shape == (50, 8)
    torch.testing.assert_close(table.mean(-1), torch.zeros(50), atol=1e-5, rtol=0)  # LayerNorm applied
    (out.square().sum() + x0.sum()).backward()
    assert m.embedding.embedding.weight.grad is not None and m.embedding.embedding.weight.grad.abs().sum() > 0


# --- input scales and time conditioning (the unigram plateau of the first bundled model) ----------------------
def test_adaln_blocks_start_as_the_identity_so_the_step_cannot_drown_the_tokens() -> None:
    """adaLN-Zero (DiT): every block's shift/scale/gate projection starts at zero, so an untrained model is
    the identity through its blocks, whatever the step: the output is the final LayerNorm of the scaled
    token embedding, projected on the tied embedding."""
    m = tiny(trained=False)
    assert m.uses_time and m.config.time_conditioning == "adaln"
    x = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        h = m.token_embedding(x) * 32**0.5
        expect = torch.nn.functional.layer_norm(h, (32,)) @ m.token_embedding.weight.t() + m.output_bias
        for t in (1, 500, 999):
            torch.testing.assert_close(m(x, torch.full((3,), t)), expect, atol=1e-5, rtol=1e-5)


def test_adaln_step_changes_the_output_once_the_projections_are_trained() -> None:
    m = tiny()
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert (m(x, torch.tensor([1, 1])) - m(x, torch.tensor([900, 900]))).abs().max() > 1e-2


def test_token_embeddings_enter_with_unit_components() -> None:
    """Vaswani et al.: embeddings initialised at std width**-0.5 and multiplied by sqrt(width): unit-scale
    components, the scale of the N(0, 1) label prefix (before: 1/sqrt(width) of it)."""
    torch.manual_seed(0)
    m = SEDDenoiser(vocab_size=4000, width=256, layers=1, heads=4, num_labels=2)
    seen = {}
    m.blocks[0].norm1.register_forward_hook(lambda mod, args, out: seen.setdefault("h", args[0]))
    with torch.no_grad():
        m(torch.arange(4000).view(10, 400), torch.full((10,), 5), label=torch.zeros(10, dtype=torch.long))
    tokens, label = seen["h"][:, 1:], seen["h"][:, 0]
    assert 0.9 < float(tokens.std()) < 1.1
    assert 0.5 < float(tokens.std() / label.std()) < 2.0


def test_time_conditioning_none_ignores_the_step_and_allows_the_cache() -> None:
    m = tiny(time_conditioning="none")
    assert not m.uses_time and m.time_mlp is None
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(x, torch.tensor([1, 3])), m(x, torch.tensor([999, 500])), atol=0, rtol=0)
    proc = discrete.Absorbing(50, mask_id=1, schedule=schedules.mutual_info(100))
    kw = dict(shape=(3, 10), steps=100, seed=4)
    cached = sampling.sample(m, proc, cache=True, **kw)
    plain = sampling.sample(m, proc, **kw)
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.stats["network_calls"] < plain.stats["network_calls"]
    with pytest.raises(ValueError, match="cache"):
        sampling.sample(tiny(), proc, cache=True, **kw)


def test_legacy_add_layout_is_the_old_formula() -> None:
    """time_conditioning='add', embed_scale=False is the layout of checkpoints written before these fields:
    the step's MLP output added to every position (label prefix included), unscaled embeddings."""
    m = tiny(time_conditioning="add", embed_scale=False, num_labels=2)
    x, t = torch.randint(0, 50, (2, 7)), torch.tensor([4, 60])
    label = torch.tensor([0, 2])
    from fastdiff.models.sed import timestep_embedding

    with torch.no_grad():
        seq = torch.cat([m.label_embedding(label)[:, None], m.token_embedding(x)], 1)
        seq = seq + m.time_mlp(timestep_embedding(t, 32))[:, None]
        for blk in m.blocks:
            seq = blk(seq)
        expect = m.norm(seq[:, 1:]) @ m.token_embedding.weight.t() + m.output_bias
        torch.testing.assert_close(m(x, t, label=label), expect, atol=1e-6, rtol=1e-6)


def test_saved_configs_without_the_new_fields_load_as_the_old_layout() -> None:
    old = {k: v for k, v in tiny(num_labels=2).config_dict().items() if k not in ("time_conditioning", "embed_scale")}
    assert SEDConfig.from_dict(old, saved=True).time_conditioning == "add"
    assert SEDConfig.from_dict(old, saved=True).embed_scale is False
    assert SEDConfig.from_dict(old).time_conditioning == "adaln"  # a new config takes today's defaults
    legacy = build_model("sed", old, saved=True)
    assert {"time_mlp.0.weight", "norm.weight"} <= set(legacy.state_dict())
    assert not any("ada" in k for k in legacy.state_dict())
    full = tiny().config_dict()
    assert build_model("sed", full, saved=True).config == SEDConfig.from_dict(full)
    with pytest.raises(ValueError, match="time_conditioning"):
        SEDConfig(vocab_size=5, time_conditioning="film")
    with pytest.raises(TypeError, match="embed_scale"):
        SEDConfig(vocab_size=5, embed_scale=1)
