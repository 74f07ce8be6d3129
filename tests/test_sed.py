"""fastdiff.models: Transformer-XL attention against the naive O(L²) formula, the SED denoiser's
conditioning paths, the scoring models, and the sampler driving a real SED model."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import continuous, discrete, sampling, schedules
from fastdiff.models import CausalLM, SEDConfig, SEDDenoiser, TextClassifier, build_model
from fastdiff.models.attention import RelativeSelfAttention, attention, flash_attn_usable


def naive_relative_attention(m: RelativeSelfAttention, x: torch.Tensor, mask: torch.Tensor | None,
                             causal: bool) -> torch.Tensor:
    """Dai et al. 2019 eq. in §3.3, term by term, with R_{i-j} built for every pair (float64)."""
    B, L, W = x.shape
    H, d, F = m.heads, m.head_dim, m.rel_freqs
    x = x.double()
    wq = {k: v.double() for k, v in m.state_dict().items()}
    qkv = x @ wq["qkv.weight"].t() + wq["qkv.bias"]
    q, k, v = qkv.view(B, L, 3, H, d).permute(2, 0, 3, 1, 4)
    freqs = torch.tensor([10000.0 ** (-f / F) for f in range(F)], dtype=torch.float64)
    S = torch.empty(B, H, L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            R = torch.cat([torch.sin((i - j) * freqs), torch.cos((i - j) * freqs)])
            r = torch.einsum("hdf,f->hd", wq["w_r"], R)
            S[:, :, i, j] = ((q[:, :, i] + wq["u"]) * k[:, :, j]).sum(-1) + ((q[:, :, i] + wq["v"]) * r).sum(-1)
    S = S / math.sqrt(d)
    if mask is not None:
        S = S.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        S = S.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    o = (S.softmax(-1) @ v).transpose(1, 2).reshape(B, L, W)
    return o @ wq["out.weight"].t() + wq["out.bias"]


@pytest.mark.parametrize("L", [1, 7, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_relative_attention_matches_transformer_xl(L: int, causal: bool) -> None:
    torch.manual_seed(L)
    m = RelativeSelfAttention(24, 3, rel_freqs=5, causal=causal)
    with torch.no_grad():
        m.u.normal_()
        m.v.normal_()
    x = torch.randn(2, L, 24)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, L // 2 + 1:] = False
    for msk in (None, mask):
        out = m(x, msk)
        ref = naive_relative_attention(m, x, msk, causal)
        rows = msk if msk is not None else torch.ones(2, L, dtype=torch.bool)
        torch.testing.assert_close(out[rows].double(), ref[rows], atol=2e-5, rtol=1e-4)


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


def test_attention_backend_choice_on_cpu() -> None:
    q = torch.randn(1, 2, 5, 8)
    assert not flash_attn_usable(q, None)
    with pytest.raises(RuntimeError, match="flash"):
        attention(q, q, q, scale=0.3, backend="flash")
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, scale=0.3, backend="xformers")
    ref = torch.softmax(0.3 * q @ q.transpose(-1, -2), -1) @ q
    torch.testing.assert_close(attention(q, q, q, scale=0.3), ref, atol=1e-6, rtol=1e-5)


def tiny(kind: str = "discrete", **kw) -> SEDDenoiser:
    torch.manual_seed(0)
    base = {"vocab_size": 50, "kind": kind, "width": 32, "layers": 2, "heads": 4, "embed_dim": 8, "rel_freqs": 4}
    base.update(kw)
    return SEDDenoiser(SEDConfig(**base)).eval()


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


def test_config_round_trip_rebuilds_the_same_model() -> None:
    for m in (tiny(num_labels=3), tiny("continuous", self_condition=True), tiny(cross_attention=True)):
        again = build_model(m.arch, m.config_dict())
        again.load_state_dict(m.state_dict(), strict=True)
        assert again.config_dict() == m.config_dict()
    for m in (CausalLM(40, width=16, layers=1, heads=2, max_len=16), TextClassifier(40, 2, width=16, heads=2)):
        again = build_model(m.arch, m.config_dict())
        again.load_state_dict(m.state_dict(), strict=True)


def test_bad_inputs_name_the_argument() -> None:
    m = tiny(num_labels=2)
    x = torch.randint(0, 50, (2, 5))
    t = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="x_t"):
        m(x.float(), t)
    with pytest.raises(ValueError, match="x_t"):
        m(torch.full((2, 5), 50), t)
    with pytest.raises(ValueError, match="t:"):
        m(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="label"):
        m(x, t, label=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="label"):
        tiny()(x, t, label=torch.tensor([0, 1]))
    c = tiny("continuous", self_condition=True)
    with pytest.raises(ValueError, match="x_self_cond"):
        c(torch.randn(2, 5, 8), t, x_self_cond=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="x_t"):
        c(torch.randn(2, 5, 9), t)
    with pytest.raises(ValueError, match="unknown"):
        build_model("sed", {"vocab_size": 5, "depth": 3})
    with pytest.raises(ValueError, match="arch"):
        build_model("gpt", {})
    with pytest.raises(ValueError, match="width"):
        SEDConfig(vocab_size=5, width=30, heads=4)


def test_sampler_runs_sed_models_deterministically() -> None:
    m = tiny(num_labels=2)
    proc = discrete.Absorbing(50, 1, schedules.mutual_info(100))
    kw = {"shape": (3, 10), "steps": 8, "cond": {"label": torch.tensor([0, 1, 0])},
          "uncond": {"label": torch.full((3,), 2)}, "guidance_scale": 2.0}
    a = sampling.sample(m, proc, seed=3, **kw)
    b = sampling.sample(m, proc, seed=3, **kw)
    assert torch.equal(a.tokens, b.tokens) and not (a.tokens == 1).any()
    assert a.stats["network_calls"] == 8
    c = tiny("continuous", self_condition=True)
    diff = continuous.GaussianDiffusion(schedules.sqrt(100), parameterization="x0")
    emb = c.embedding_table().detach()
    o1 = sampling.sample(c, diff, shape=(2, 6), steps=5, strategy="ddim", embedding=emb, self_condition=True, seed=1)
    o2 = sampling.sample(c, diff, shape=(2, 6), steps=5, strategy="ddim", embedding=emb, self_condition=True, seed=1)
    assert torch.equal(o1.tokens, o2.tokens) and o1.tokens.shape == (2, 6)
    snapped = torch.cdist(o1.x.reshape(-1, 8), emb).argmin(-1).view(2, 6)
    assert torch.equal(snapped, o1.tokens)


def test_causal_lm_is_causal_and_classifier_ignores_padding() -> None:
    torch.manual_seed(0)
    lm = CausalLM(30, width=16, layers=2, heads=2, max_len=16).eval()
    x = torch.randint(0, 30, (2, 9))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 30
    a, b = lm(x), lm(y)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    clf = TextClassifier(30, 3, width=16, heads=2, pad_id=0).eval()
    toks = torch.randint(1, 30, (2, 8))
    toks[:, 6:] = 0
    padded_other = toks.clone()
    padded_other[:, 6:] = 5
    mask = toks != 0
    torch.testing.assert_close(clf(toks), clf(padded_other, attention_mask=mask))
    assert clf(toks).shape == (2, 3)
