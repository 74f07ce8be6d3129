"""The Hugging Face adapters of :mod:`fastdiff.models.hf` on tiny randomly initialised Llama and Qwen2 models
(no download), with the eager and the SDPA attention.

Independent oracle: a forward written here from the Llama / Qwen2 equations (RMSNorm, rotary embedding with
the rotate-half convention, grouped-query attention with a full softmax over the visible keys, SwiGLU MLP),
in float64 on a copy of the weights, reading only the weight tensors of the model. Its window mode builds
the cache semantics of the contract layer by layer: the keys and values of every position come from a full
run over the original tokens, those of the window's positions are replaced by the window's own (placed at
their positions, not appended as the adapter does).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # protection only: CI installs it with the test extra

from fastdiff.errors import InputError, InputTypeError  # noqa: E402
from fastdiff.models import (DreamAdapter, HFBidirectional, HFMaskedLMAdapter, unwrap_logits)  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 97, 96
B, L = 2, 11
ATOL = 1e-5  # float32 adapter against the float64 oracle (measured max 3.5e-6; logits of size ~1-10)
ARCHS = ("llama", "qwen2")
IMPLS = ("eager", "sdpa")


def _model(arch: str, impl: str) -> torch.nn.Module:
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl,
              initializer_range=0.2)  # 10x the default: the context moves the logits visibly
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
        with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    return model.eval()


_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def model_for(arch: str, impl: str) -> torch.nn.Module:
    if (arch, impl) not in _MODELS:
        _MODELS[arch, impl] = _model(arch, impl)
    return _MODELS[arch, impl]


# --- the oracle --------------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, q, D) rotated at positions pos (B, q): pairs (j, j + D/2) turned by pos * theta^(-2j/D)."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None, :, None] * inv  # (B, 1, q, D/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def oracle(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, key_ok: torch.Tensor,
           base: list | None = None, own: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, list]:
    """Logits (B, q, V) float64 of the query tokens ``ids (B, q)`` at positions ``pos``; keys visible where
    ``key_ok (B, L)``. ``base=None``: the queries are the whole sequence and their own keys. Else ``base`` is
    every layer's (K, V) over L from a full run, and ``own = (i0, lo, hi)``: queries ``i0:`` sit at
    positions ``[lo, hi)`` and their new keys / values replace the base's there. Returns (logits, [(K, V)])."""
    cfg = model.config
    m = model.model
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    theta = cfg.rope_parameters["rope_theta"]
    Bq, q = ids.shape
    h = m.embed_tokens.weight.double()[ids]
    kvs = []
    for li, layer in enumerate(m.layers):
        at = layer.self_attn
        x = _rms(h, layer.input_layernorm.weight.double(), cfg.rms_norm_eps)

        def proj(lin: torch.nn.Linear, heads: int) -> torch.Tensor:
            bias = None if lin.bias is None else lin.bias.double()
            return F.linear(x, lin.weight.double(), bias).view(Bq, q, heads, D).transpose(1, 2)

        qs = _rope(proj(at.q_proj, H), pos, theta)
        ks = _rope(proj(at.k_proj, Hkv), pos, theta)
        vs = proj(at.v_proj, Hkv)
        if base is None:
            K, Vv = ks, vs
        else:
            i0, lo, hi = own
            K, Vv = base[li][0].clone(), base[li][1].clone()
            K[:, :, lo:hi], Vv[:, :, lo:hi] = ks[:, :, i0:], vs[:, :, i0:]
        kvs.append((K, Vv))
        K, Vv = K.repeat_interleave(H // Hkv, dim=1), Vv.repeat_interleave(H // Hkv, dim=1)
        scores = qs @ K.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
        att = torch.softmax(scores, -1) @ Vv  # (B, H, q, D)
        h = h + F.linear(att.transpose(1, 2).reshape(Bq, q, H * D), at.o_proj.weight.double())
        x = _rms(h, layer.post_attention_layernorm.weight.double(), cfg.rms_norm_eps)
        mlp = layer.mlp
        gate = F.linear(x, mlp.gate_proj.weight.double())
        up = F.linear(x, mlp.up_proj.weight.double())
        h = h + F.linear(gate * torch.sigmoid(gate) * up, mlp.down_proj.weight.double())
    h = _rms(h, m.norm.weight.double(), cfg.rms_norm_eps)
    return F.linear(h, model.lm_head.weight.double()), kvs


def realign(raw: torch.Tensor) -> torch.Tensor:
    """Dream's shift written out: out[:, 0] = raw[:, 0], out[:, i] = raw[:, i - 1]."""
    out = raw.clone()
    for i in range(1, raw.shape[1]):
        out[:, i] = raw[:, i - 1]
    return out


def _tokens(seed: int, shape: tuple[int, int] = (B, L)) -> torch.Tensor:
    return torch.randint(0, MASK, shape, generator=torch.Generator().manual_seed(seed))


def _left_padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0: 4 pads then 7 tokens; row 1: 11 tokens. (ids, attention_mask, position_ids)."""
    ids = _tokens(1)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :4] = 0
    ids[0, :4] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _close(out: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= atol, f"max |out - ref| = {err:.3g} > {atol}"


# --- bidirectional ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_a_hand_written_bidirectional_forward(arch: str, impl: str) -> None:
    model = model_for(arch, impl)
    ad = HFBidirectional(model, mask_id=MASK)
    x = _tokens(0)
    with torch.no_grad():
        out = ad(x)
        ref, _ = oracle(model, x, torch.arange(L).expand(B, L), torch.ones(B, L, dtype=torch.bool))
        assert out.shape == (B, L, V) and out.dtype == torch.float32
        _close(out, ref)
        ids, mask, pos = _left_padded()  # padding keys hidden, positions from the caller
        ref, _ = oracle(model, ids, pos, mask.bool())
        out = ad(ids, attention_mask=mask, position_ids=pos)
        _close(out[mask.bool()], ref[mask.bool()])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_later_token_moves_an_earlier_position(arch: str, impl: str) -> None:
    model = model_for(arch, impl)
    ad = HFBidirectional(model, mask_id=MASK)
    x = _tokens(2)
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % MASK
    with torch.no_grad():
        moved = (ad(x)[:, 0] - ad(y)[:, 0]).abs().max().item()
        causal = (model(x).logits[:, 0] - model(y).logits[:, 0]).abs().max().item()
    assert moved > 1e-2, moved
    assert causal == 0.0, causal  # the plain model stays causal: the adapter changed nothing in it


def test_the_users_model_is_left_as_it_was() -> None:
    model = model_for("llama", "sdpa")
    before = (model.training, getattr(model.config, "is_causal", None), model.config._attn_implementation,
              {k: v.clone() for k, v in model.state_dict().items()})
    ad = HFBidirectional(model, mask_id=MASK)
    with torch.no_grad():
        ad(_tokens(3))
        ad.kv_forward(_tokens(3))
    assert (model.training, getattr(model.config, "is_causal", None), model.config._attn_implementation) == before[:3]
    assert all(torch.equal(v, before[3][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_gives_the_prompt_alone_logits(arch: str, impl: str) -> None:
    model = model_for(arch, impl)
    ad = HFBidirectional(model, mask_id=MASK)
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        alone = ad(ids[:1, 4:])
        padded = ad(ids, attention_mask=mask, position_ids=pos)
        derived = ad(ids, attention_mask=mask)  # position_ids default: cumsum(mask) - 1
        row1 = ad(ids[1:])
    _close(padded[0, 4:], alone[0], 1e-5)
    _close(derived, padded, 1e-6)
    _close(padded[1], row1[0], 1e-5)


# --- shifted (Dream) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_dream_adapter_realigns_the_raw_logits(arch: str) -> None:
    model = model_for(arch, "sdpa")
    dream, plain = DreamAdapter(model, mask_id=MASK), HFBidirectional(model, mask_id=MASK)
    assert dream.shifted_logits is False and plain.shifted_logits is False
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        raw = plain(ids, attention_mask=mask, position_ids=pos)
        out = dream(ids, attention_mask=mask, position_ids=pos)
        ref, _ = oracle(model, ids, pos, mask.bool())
    assert torch.equal(out, realign(raw))
    _close(out[mask.bool()], realign(ref)[mask.bool()])
    with pytest.raises(InputError, match="shifted"):
        DreamAdapter(model, mask_id=MASK, shifted=False)


# --- the cache protocol -------------------------------------------------------------------------------------
WINDOWS = {"prefix": (6, L), "dual": (3, 7), "first": (0, 4)}


def _snapshot(cache: object) -> list[torch.Tensor]:
    return [t.clone() for kv in cache.layers for t in kv] + [cache.tokens.clone()]


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "dream"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_window_with_the_cached_tokens_is_kv_forwards_slice(arch: str, impl: str, shifted: bool) -> None:
    ad = HFBidirectional(model_for(arch, impl), mask_id=MASK, shifted=shifted)
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        full, cache = ad.kv_forward(ids, torch.zeros(B, dtype=torch.long), attention_mask=mask, position_ids=pos)
        _close(full, ad(ids, attention_mask=mask, position_ids=pos), 1e-6)
        snap = _snapshot(cache)
        for name, (s, e) in WINDOWS.items():
            win = ad.kv_window(ids[:, s:e], torch.zeros(B, dtype=torch.long), cache=cache, start=s,
                               attention_mask=mask, position_ids=pos)
            assert win.shape == (B, e - s, V), name
            _close(win[mask[:, s:e].bool()], full[:, s:e][mask[:, s:e].bool()], 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(cache), snap)), "kv_window modified the cache"


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "dream"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_window_with_new_tokens_follows_the_cache_semantics(arch: str, impl: str, shifted: bool) -> None:
    """New tokens in the window: in every layer the window's queries see the cached keys / values (from
    the original tokens) outside the window and the window's own new ones inside it."""
    model = model_for(arch, impl)
    ad = HFBidirectional(model, mask_id=MASK, shifted=shifted)
    ids, mask, pos = _left_padded()
    key_ok = mask.bool()
    with torch.no_grad():
        _, cache = ad.kv_forward(ids, attention_mask=mask, position_ids=pos)
        _, base = oracle(model, ids, pos, key_ok)
        for name, (s, e) in WINDOWS.items():
            new = ids.clone()
            new[:, s:e] = _tokens(10 + s, (B, e - s))
            new[0, s:e] = torch.where(key_ok[0, s:e], new[0, s:e], ids[0, s:e])  # pads stay pads
            win = ad.kv_window(new[:, s:e], cache=cache, start=s, attention_mask=mask, position_ids=pos)
            q0 = s - 1 if shifted and s > 0 else s  # a shifted model's token s is predicted at s - 1
            ref, _ = oracle(model, new[:, q0:e], pos[:, q0:e], key_ok, base=base, own=(s - q0, s, e))
            if shifted:
                ref = ref[:, :-1] if s > 0 else realign(ref)
            ok = key_ok[:, s:e]
            _close(win[ok], ref[ok], ATOL)
            # the oracle tells the cache semantics apart from the two wrong answers
            stale = ad.kv_forward(ids, attention_mask=mask, position_ids=pos)[0][:, s:e]
            fresh = ad(new, attention_mask=mask, position_ids=pos)[:, s:e]
            assert (ref[ok] - stale[ok].double()).abs().max() > 1e-3, name
            assert (ref[ok] - fresh[ok].double()).abs().max() > 1e-3, name


def test_kv_window_checks_its_arguments() -> None:
    ad = HFBidirectional(model_for("llama", "eager"), mask_id=MASK)
    x = _tokens(4)
    with torch.no_grad():
        _, cache = ad.kv_forward(x)
        with pytest.raises(InputError, match="start"):
            ad.kv_window(x[:, :4], cache=cache, start=L - 2)
        with pytest.raises(InputTypeError, match="cache"):
            ad.kv_window(x[:, :4], cache=None, start=0)
        with pytest.raises(InputError, match="cond"):
            ad.kv_forward(x, labels=x)


# --- outputs of other shapes --------------------------------------------------------------------------------
def test_unwrap_logits_takes_tensors_tuples_dicts_and_model_outputs() -> None:
    t = torch.randn(2, 3, 5)
    assert unwrap_logits(t) is t
    assert unwrap_logits((t, None)) is t
    assert unwrap_logits({"logits": t, "cache": None}) is t
    assert unwrap_logits(transformers.modeling_outputs.MaskedLMOutput(logits=t)) is t
    assert unwrap_logits(SimpleNamespace(logits=t)) is t
    with pytest.raises(InputTypeError, match="model"):
        unwrap_logits({"scores": t})


class _DictLM(torch.nn.Module):
    """A causal LM whose forward returns a plain dict (as some remote code does)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: object = None, use_cache: bool = False) -> dict:
        out = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache)
        return {"logits": out.logits, "cache": out.cache}


def test_a_dict_returning_model_goes_through_the_same_adapter() -> None:
    model = model_for("qwen2", "eager")
    plain, wrapped = HFBidirectional(model, mask_id=MASK), HFBidirectional(_DictLM(model), mask_id=MASK)
    x = _tokens(5)
    with torch.no_grad():
        assert torch.equal(wrapped(x), plain(x))
        _, cache = wrapped.kv_forward(x)
        _close(wrapped.kv_window(x[:, 2:5], cache=cache, start=2), plain(x)[:, 2:5], 1e-5)


def _masked_lm(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64, pad_token_id=0, mask_token_id=MASK)
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
        return transformers.BertForMaskedLM(cfg).eval()
    cfg = transformers.ModernBertConfig(bos_token_id=1, cls_token_id=1, sep_token_id=2, eos_token_id=2, **kw)
    return transformers.ModernBertForMaskedLM(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_masked_lm_adapter_unwraps_a_masked_lm_output(kind: str) -> None:
    mlm = _masked_lm(kind)
    ad = HFMaskedLMAdapter(mlm)  # mask_id from config.mask_token_id
    assert (ad.mask_id, ad.vocab_size, ad.shifted_logits) == (MASK, V, False)
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        ref = mlm(input_ids=ids, attention_mask=mask)
        assert isinstance(ref, transformers.modeling_outputs.MaskedLMOutput)
        assert torch.equal(ad(ids, attention_mask=mask), ref.logits)
        shifted = HFMaskedLMAdapter(mlm, shifted=True)(ids, attention_mask=mask)
        if kind == "bert":  # BERT takes position_ids: they reach it
            assert torch.equal(ad(ids, attention_mask=mask, position_ids=pos),
                               mlm(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
    assert torch.equal(shifted, realign(ref.logits))


# --- mask_id and tokenizer ----------------------------------------------------------------------------------
def _tokenizer(n_words: int) -> object:
    """A word-level tokenizer: [PAD] 0, [UNK] 1, [MASK] 2, then n_words words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{f"w{i}": 3 + i for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", pad_token="[PAD]",
                                                unk_token="[UNK]")


def test_mask_id_resolution_and_its_errors() -> None:
    model = model_for("llama", "eager")
    small, big = _tokenizer(20), _tokenizer(V)  # 23 and V + 3 tokens
    ad = HFBidirectional(model, tokenizer=small)
    assert (ad.mask_id, ad.vocab_size) == (2, V)
    assert HFBidirectional(model, mask_id=2, tokenizer=small).mask_id == 2
    assert HFBidirectional(model, mask_id=MASK).mask_id == MASK
    with pytest.raises(InputError, match="mask_id"):  # nothing to take it from
        HFBidirectional(model)
    for bad in (V, -1, 10**6):
        with pytest.raises(InputError, match="mask_id"):
            HFBidirectional(model, mask_id=bad)
    with pytest.raises(InputTypeError, match="mask_id"):
        HFBidirectional(model, mask_id=2.0)
    with pytest.raises(InputError, match="mask_id.*tokenizer"):
        HFBidirectional(model, mask_id=5, tokenizer=small)
    with pytest.raises(InputError, match="tokenizer"):
        HFBidirectional(model, tokenizer=big)
    with pytest.raises(InputError, match="mask_id"):
        HFMaskedLMAdapter(model, mask_id=V)
    cfg_copy = copy.deepcopy(model)
    cfg_copy.config.mask_token_id = 7
    assert DreamAdapter(cfg_copy).mask_id == 7


def test_flash_attention_and_non_modules_are_refused() -> None:
    class Flash(torch.nn.Module):
        config = SimpleNamespace(_attn_implementation="flash_attention_2", vocab_size=V)

    with pytest.raises(InputError, match="model.*set_attn_implementation"):
        HFBidirectional(Flash(), mask_id=0)
    with pytest.raises(InputTypeError, match="model"):
        HFBidirectional(lambda x: x, mask_id=0)
    ad = HFBidirectional(model_for("llama", "eager"), mask_id=MASK)
    with pytest.raises(InputTypeError, match="input_ids"):
        ad(torch.zeros(B, L))
    with pytest.raises(InputError, match="attention_mask"):
        ad(_tokens(0), attention_mask=torch.ones(B, L + 1))


# --- logits_to_keep: the LM head on the positions a step reads -------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shifted", [False, True])
def test_logits_to_keep_equals_the_slice_of_the_full_logits(arch: str, shifted: bool) -> None:
    ad = HFBidirectional(model_for(arch, "sdpa"), mask_id=MASK, shifted=shifted)
    ids, am, _ = _left_padded()
    keep = torch.tensor([0, 2, 3, 7])
    with torch.no_grad():
        full = ad(ids, am)
        _close(ad(ids, am, logits_to_keep=keep), full[:, keep])
        logits, cache = ad.kv_forward(ids, attention_mask=am)
        kept, _ = ad.kv_forward(ids, attention_mask=am, logits_to_keep=keep)
        _close(kept, logits[:, keep])
        for a, b in WINDOWS.values():
            win = ad.kv_window(ids[:, a:b], cache=cache, start=a, attention_mask=am)
            sub = torch.arange(a, b)[::2]
            _close(ad.kv_window(ids[:, a:b], cache=cache, start=a, attention_mask=am, logits_to_keep=sub),
                   win[:, (sub - a)])
    with pytest.raises(InputError, match="^logits_to_keep: positions must lie in the window"):
        ad.kv_window(ids[:, 3:7], cache=cache, start=3, logits_to_keep=torch.tensor([2]))
    with pytest.raises(InputTypeError, match="^logits_to_keep: "):
        ad(ids, logits_to_keep=torch.tensor([0.5]))


@pytest.mark.parametrize("kw", [dict(preset="llada", block_length=4), dict(preset="llada", cfg_scale=1.0),
                                dict(preset="fast_dllm", threshold=0.3, block_length=4, cache="prefix"),
                                dict(preset="fast_dllm", factor=1.0, block_length=4, cache="dual"),
                                dict(preset="dream", alg="entropy")])
def test_generate_through_logits_to_keep_gives_the_full_logits_tokens(kw: dict) -> None:
    """fastdiff.generate asks an adapter for the logits of the positions a step reads only; a wrapper that
    hides logits_to_keep (so every position is computed and sliced by generate) gives the same tokens."""
    import fastdiff

    ad = (DreamAdapter if kw["preset"] == "dream" else HFBidirectional)(model_for("llama", "sdpa"), mask_id=MASK)
    ids, am, _ = _left_padded()

    class Hidden(torch.nn.Module):
        shifted_logits = False  # the adapter inside realigns (Dream)

        def __init__(self) -> None:
            super().__init__()
            self.inner = ad

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
            return self.inner(input_ids, attention_mask, position_ids)

        def kv_forward(self, x: torch.Tensor, t: object = None, **kw: object) -> tuple:
            return self.inner.kv_forward(x, t, **kw)

        def kv_window(self, x: torch.Tensor, t: object = None, **kw: object) -> torch.Tensor:
            return self.inner.kv_window(x, t, **kw)

    args = dict(max_new_tokens=8, steps=8, mask_id=MASK, **kw)
    a = fastdiff.generate(ad, ids, am, **args)
    b = fastdiff.generate(Hidden(), ids, am, **args)
    assert torch.equal(a.sequences, b.sequences)
