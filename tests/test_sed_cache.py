"""The KV caches of SEDDenoiser and its block-causal (BD3-LM) variant.

* Fast-dLLM's prefix / dual cache (``kv_forward`` / ``kv_window``): an unchanged window equals the full
  forward's slice; a changed window equals a float64 oracle built here from the model's weights — a full
  forward in which the positions outside the window keep the keys/values of the old tokens — and the
  cache is left as it was.
* Block-causal models (``block_size`` > 0): the forward against the same oracle with the block mask, the
  exact block KV cache (``new_cache`` / ``__call__(cache=, start=)`` / ``extend_cache``) against the
  uncached forward on the prefix, the sampler's ``kv_cache=True`` against ``kv_cache=False``.
* BD3-LM training: the two-stream loss against one forward per block on ``[clean prefix, noisy block]``
  with the MDLM / hybrid loss written out here.
* The shipped block-causal model (fastdiff/assets/bd3): it loads, and its kv-cached sampling equals its
  uncached sampling token for token.

Tolerances: fp32 model against fp32 model 1e-5 (different matmul shapes only); fp32 model against the
float64 oracle 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from fastdiff import discrete, schedules
from fastdiff.errors import InputError, InputTypeError
from fastdiff.models.sed import SEDDenoiser, timestep_embedding
from fastdiff.sampling import sample

V, W, H, F = 23, 32, 4, 4
MASK = 1
TOL = 1e-5  # model against model (fp32)
ORACLE_TOL = 1e-4  # fp32 model against the float64 oracle

pytestmark = pytest.mark.usefixtures("one_thread")


def model(time_conditioning: str = "adaln", num_labels: int = 0, block_size: int = 0, seed: int = 0) -> SEDDenoiser:
    """A tiny SED model with every parameter random (adaLN projections included, which start at zero)."""
    torch.manual_seed(seed)
    m = SEDDenoiser(vocab_size=V, width=W, layers=2, heads=H, rel_freqs=F, num_labels=num_labels,
                    time_conditioning=time_conditioning, block_size=block_size)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.25 if p.ndim > 1 else 0.1)
    return m.eval()


# --- the oracle: Transformer-XL attention written out in float64 --------------------------------------------
def _p(mod: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in mod.state_dict().items()}


def _layer_norm(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    if f"{name}.weight" in p:
        y = y * p[f"{name}.weight"] + p[f"{name}.bias"]
    return y


def oracle_layer(blk: torch.nn.Module, hq: torch.Tensor, hk: torch.Tensor, q_pos: torch.Tensor,
                 k_pos: torch.Tensor, allowed: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """One SED block (pre-LN, adaLN-Zero when ``c`` is given) for queries ``hq (B, n, W)`` against keys and
    values from ``hk (B, S, W)``: score(i, j) = (q_i+u)·k_j + (q_i+v)·W_r R_{p_i - p_j}, R_Δ = [sin Δω, cos Δω]
    (Dai et al. 2019 §3.3); ``allowed (B, n, S)`` bool."""
    p = _p(blk)
    d = W // H
    if c is not None:
        mods = torch.nn.functional.silu(c) @ p["ada.1.weight"].t() + p["ada.1.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = mods.chunk(6, -1)
    else:
        sh1 = sc1 = sh2 = sc2 = torch.zeros(1, W, dtype=torch.float64)
        g1 = g2 = torch.ones(1, W, dtype=torch.float64)
    xq = _layer_norm(hq, p, "norm1") * (1 + sc1[:, None]) + sh1[:, None]
    xk = _layer_norm(hk, p, "norm1") * (1 + sc1[:, None]) + sh1[:, None]
    wq, wk, wv = p["attn.qkv.weight"].chunk(3, 0)
    bq, bk, bv = p["attn.qkv.bias"].chunk(3, 0)
    B, n, S = hq.shape[0], hq.shape[1], hk.shape[1]
    q = (xq @ wq.t() + bq).view(B, n, H, d).transpose(1, 2)
    k = (xk @ wk.t() + bk).view(B, S, H, d).transpose(1, 2)
    v = (xk @ wv.t() + bv).view(B, S, H, d).transpose(1, 2)
    omega = 10000.0 ** (-torch.arange(F, dtype=torch.float64) / F)
    delta = (q_pos.double()[:, None] - k_pos.double()[None, :])[..., None] * omega
    R = torch.cat([delta.sin(), delta.cos()], -1)  # (n, S, 2F)
    WR = torch.einsum("hdf,ijf->hijd", p["attn.w_r"], R)
    score = torch.einsum("bhid,bhjd->bhij", q + p["attn.u"][:, None], k)
    score = (score + torch.einsum("bhid,hijd->bhij", q + p["attn.v"][:, None], WR)) / math.sqrt(d)
    score = score.masked_fill(~allowed[:, None], float("-inf"))
    o = (score.softmax(-1) @ v).transpose(1, 2).reshape(B, n, W)
    h = hq + g1[:, None] * (o @ p["attn.out.weight"].t() + p["attn.out.bias"])
    z = _layer_norm(h, p, "norm2") * (1 + sc2[:, None]) + sh2[:, None]
    z = torch.nn.functional.gelu(z @ p["ff.0.weight"].t() + p["ff.0.bias"]) @ p["ff.2.weight"].t() + p["ff.2.bias"]
    return h + g2[:, None] * z


class Oracle:
    """The model's embeddings, prefix, step conditioning and head, in float64 from its weights."""

    def __init__(self, m: SEDDenoiser, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None) -> None:
        self.m, self.label = m, label
        tc = m.config.time_conditioning
        temb = None
        if tc != "none":
            tm = _p(m.time_mlp)
            e = timestep_embedding(t, W).double()
            temb = torch.nn.functional.silu(e @ tm["0.weight"].t() + tm["0.bias"]) @ tm["2.weight"].t() + tm["2.bias"]
        self.add = temb if tc == "add" else None
        self.c = temb if tc == "adaln" else None
        self.P = 1 if label is not None else 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.m.token_embedding.weight.detach().double()[x] * math.sqrt(W)
        return h if self.add is None else h + self.add[:, None]

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.label is None:
            return h
        pre = self.m.label_embedding.weight.detach().double()[self.label][:, None]
        if self.add is not None:
            pre = pre + self.add[:, None]
        return torch.cat([pre, h], 1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        p = _p(self.m)
        y = _layer_norm(h, p, "norm")
        if self.c is not None:
            mods = torch.nn.functional.silu(self.c) @ p["final_ada.1.weight"].t() + p["final_ada.1.bias"]
            shift, scale = mods.chunk(2, -1)
            y = y * (1 + scale[:, None]) + shift[:, None]
        return y @ p["token_embedding.weight"].t() + p["output_bias"]

    def allowed(self, B: int, n_q: int, q_idx: torch.Tensor, S: int, key_mask: torch.Tensor | None,
                block_size: int = 0) -> torch.Tensor:
        """``(B, n_q, S)``: the query at sequence index ``q_idx`` may see key ``j``."""
        a = torch.ones(B, n_q, S, dtype=torch.bool)
        if key_mask is not None:
            a = a & key_mask[:, None, :]
        if block_size:
            grp = torch.cat([torch.full((self.P,), -1), torch.arange(S - self.P) // block_size])
            a = a & (grp[None, :] <= grp[q_idx][:, None])[None]
        return a

    def full(self, x: torch.Tensor, key_mask: torch.Tensor | None, block_size: int = 0) -> list[torch.Tensor]:
        """Every layer's input hidden states over the whole sequence, and the last layer's output."""
        h = self.sequence(x)
        B, S = h.shape[:2]
        pos = torch.arange(S)
        hs = [h]
        for blk in self.m.blocks:
            h = oracle_layer(blk, h, h, pos, pos, self.allowed(B, S, pos, S, key_mask, block_size), self.c)
            hs.append(h)
        return hs

    def stale_window(self, x_old: torch.Tensor, x_new: torch.Tensor, a: int, b: int,
                     key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of the window ``[a, b)`` holding ``x_new``'s tokens, where in every layer the keys/values of
        the positions outside the window come from the full forward over ``x_old`` (the stale cache)."""
        old = self.full(x_old, key_mask)
        P = self.P
        h = self.embed(x_new[:, a:b])
        B, n = h.shape[:2]
        S = old[0].shape[1]
        q_idx = torch.arange(P + a, P + b)
        for i, blk in enumerate(self.m.blocks):
            mixed = old[i].clone()
            mixed[:, P + a:P + b] = h  # inside the window: the window's own keys/values
            h = oracle_layer(blk, h, mixed, q_idx, torch.arange(S), self.allowed(B, n, q_idx, S, key_mask), self.c)
        return self.head(h)


def _key_mask(B: int, P: int, am: torch.Tensor | None) -> torch.Tensor | None:
    return None if am is None else torch.cat([torch.ones(B, P, dtype=torch.bool), am], 1)


def _pad_mask(B: int, L: int) -> torch.Tensor:
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, :3] = False  # left padding
    am[1, L - 2:] = False  # right padding
    return am


def _snapshot(cache) -> dict:
    return {f.name: (tuple(x.clone() for x in getattr(cache, f.name)) if isinstance(getattr(cache, f.name), tuple)
                     else getattr(cache, f.name).clone() if isinstance(getattr(cache, f.name), torch.Tensor)
                     else getattr(cache, f.name)) for f in dataclasses.fields(cache)}


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# --- Fast-dLLM prefix / dual cache ---------------------------------------------------------------------
# every time conditioning, both windows, with and without padding and label (not every product: time)
CASES = [("adaln", (5, 12), False, False), ("adaln", (4, 8), True, True), ("none", (5, 12), True, False),
         ("none", (4, 8), False, True), ("add", (5, 12), False, True), ("add", (4, 8), True, False),
         ("adaln", (0, 3), True, False), ("none", (9, 12), True, True)]
IDS = [f"{tc}-{a}:{b}-{'pad' if p else 'nopad'}-{'label' if lab else 'nolabel'}" for tc, (a, b), p, lab in CASES]


@pytest.mark.parametrize("tc, window, padded, labelled", CASES, ids=IDS)
def test_unchanged_window_equals_the_full_forward(tc: str, window: tuple[int, int], padded: bool,
                                                  labelled: bool) -> None:
    m = model(tc, num_labels=2 if labelled else 0)
    B, L = 3, 12
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, L), generator=g)
    t = torch.tensor([3, 500, 999])
    label = torch.tensor([0, 2, 1]) if labelled else None
    am = _pad_mask(B, L) if padded else None
    cond = {"label": label} if labelled else {}
    with torch.no_grad():
        full, cache = m.kv_forward(x, t, attention_mask=am, **cond)
        plain = m(x, t, attention_mask=am, **cond)
        a, b = window
        got = m.kv_window(x[:, a:b], t, cache=cache, start=a, attention_mask=am,
                          position_ids=torch.arange(L).expand(B, L), **cond)
    assert torch.allclose(full, plain, atol=TOL, rtol=0)
    assert got.shape == (B, b - a, V)
    assert torch.allclose(got, full[:, a:b], atol=TOL, rtol=0), (got - full[:, a:b]).abs().max()


@pytest.mark.parametrize("tc, window, padded, labelled", CASES, ids=IDS)
def test_changed_window_uses_the_stale_keys_outside(tc: str, window: tuple[int, int], padded: bool,
                                                    labelled: bool) -> None:
    m = model(tc, num_labels=2 if labelled else 0, seed=4)
    B, L = 3, 12
    g = torch.Generator().manual_seed(2)
    x_old = torch.randint(0, V, (B, L), generator=g)
    a, b = window
    x_new = x_old.clone()
    x_new[:, a:b] = torch.randint(0, V, (B, b - a), generator=g)
    t = torch.tensor([7, 250, 640])
    label = torch.tensor([2, 0, 1]) if labelled else None
    am = _pad_mask(B, L) if padded else None
    cond = {"label": label} if labelled else {}
    with torch.no_grad():
        _, cache = m.kv_forward(x_old, t, attention_mask=am, **cond)
        before = _snapshot(cache)
        got = m.kv_window(x_new[:, a:b], t, cache=cache, start=a, attention_mask=am, **cond)
    orc = Oracle(m, x_old, t, label)
    want = orc.stale_window(x_old, x_new, a, b, _key_mask(B, orc.P, am))
    assert torch.allclose(got.double(), want, atol=ORACLE_TOL, rtol=0), (got.double() - want).abs().max()
    # the oracle's full forward is the model's (so the stale-window oracle is built on the right model)
    full = orc.head(orc.full(x_new, _key_mask(B, orc.P, am))[-1][:, orc.P:])
    assert torch.allclose(m(x_new, t, attention_mask=am, **cond).double(), full, atol=ORACLE_TOL, rtol=0)
    # a stale cache is an approximation: the result differs from the fresh full forward
    assert not torch.allclose(got.double(), full[:, a:b], atol=1e-3)
    after = _snapshot(cache)
    assert all(_same(before[k], after[k]) for k in before), "kv_window modified the cache"


def test_kv_cache_argument_errors() -> None:
    m = model("none", num_labels=2)
    x = torch.randint(0, V, (2, 8))
    t = torch.tensor([1, 2])
    with torch.no_grad():
        _, cache = m.kv_forward(x, t, label=torch.tensor([0, 1]))
        with pytest.raises(InputError, match="start"):
            m.kv_window(x[:, 4:], t, cache=cache, start=5)
        with pytest.raises(InputError, match="label"):
            m.kv_window(x[:, 4:], t, cache=cache, start=4, label=torch.tensor([1, 1]))
        with pytest.raises(InputError, match="rows"):
            m.kv_window(x[:1, 4:], t[:1], cache=cache, start=4)
        with pytest.raises(InputTypeError, match="cache"):
            m.kv_window(x[:, 4:], t, cache=(cache.keys, cache.values), start=4)
        with pytest.raises(InputTypeError, match="block-causal"):
            m.new_cache(2)
    cont = SEDDenoiser(vocab_size=V, kind="continuous", width=W, layers=1, heads=H, rel_freqs=F)
    with pytest.raises(InputTypeError, match="discrete"):
        cont.kv_forward(torch.zeros(1, 4, 64), torch.tensor([1]))
    for bad in ({"time_conditioning": "adaln"}, {"kind": "continuous", "time_conditioning": "none"}):
        with pytest.raises(InputError, match="block_size"):
            SEDDenoiser(vocab_size=V, block_size=4, **bad)


# --- block-causal model and its exact block KV cache --------------------------------------------------
@pytest.mark.parametrize("labelled", [False, True])
def test_block_causal_forward_equals_the_masked_oracle(labelled: bool) -> None:
    bs = 4
    m = model("none", num_labels=2 if labelled else 0, block_size=bs, seed=5)
    B, L = 3, 11
    x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(3))
    t = torch.ones(B, dtype=torch.long)
    label = torch.tensor([1, 0, 2]) if labelled else None
    cond = {"label": label} if labelled else {}
    orc = Oracle(m, x, t, label)
    want = orc.head(orc.full(x, None, block_size=bs)[-1][:, orc.P:])
    with torch.no_grad():
        got = m(x, t, **cond)
        bidir = dataclasses.replace(m.config, block_size=0)
    assert torch.allclose(got.double(), want, atol=ORACLE_TOL, rtol=0)
    # the pattern matters: the bidirectional forward of the same weights differs
    m2 = SEDDenoiser(bidir)
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert not torch.allclose(m2.eval()(x, t, **cond), got, atol=1e-3)


@pytest.mark.parametrize("labelled", [False, True])
def test_block_kv_cache_equals_the_uncached_prefix_forward(labelled: bool) -> None:
    bs = 4
    m = model("none", num_labels=2 if labelled else 0, block_size=bs, seed=6)
    B, L = 3, 11  # the last block is shorter
    x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(4))
    t = torch.full((B,), 5)
    label = torch.tensor([2, 1, 0]) if labelled else None
    cond = {"label": label} if labelled else {}
    with torch.no_grad():
        cache = m.new_cache(B)
        for a in range(0, L, bs):
            b = min(a + bs, L)
            got = m(x[:, a:b], t, cache=cache, start=a, **cond)
            want = m(x[:, :b], t, **cond)[:, a:b]
            assert got.shape == (B, b - a, V)
            assert torch.allclose(got, want, atol=TOL, rtol=0), (a, (got - want).abs().max())
            before = _snapshot(cache)
            new = m.extend_cache(cache, x[:, a:b], a)
            assert all(_same(before[k], v) for k, v in _snapshot(cache).items()), "extend_cache modified its input"
            assert new.length == b and new.keys[0].shape[2] == new.prefix + b
            cache = new
        with pytest.raises(InputError, match="start"):
            m(x[:, :4], t, cache=cache, start=4, **cond)
        with pytest.raises(InputError, match="block_size"):
            m(torch.randint(0, V, (B, bs + 1)), t, cache=m.new_cache(B), start=0, **cond)
        if labelled:
            with pytest.raises(InputError, match="label"):
                m(x[:, 8:], t, cache=m.extend_cache(m.new_cache(B), x[:, :4], 0), start=4, label=label)


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_sampler_kv_cache_equals_uncached_sampling(strategy: str) -> None:
    bs = 4
    m = model("none", num_labels=2, block_size=bs, seed=7)
    p = discrete.Absorbing(V, MASK, schedules.cosine(40))
    kw = dict(shape=(3, 11), steps=6, seed=3, block_size=bs, strategy=strategy,
              cond={"label": torch.tensor([0, 1, 2])})
    a = sample(m, p, **kw)
    b = sample(m, p, kv_cache=True, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert not bool((a.tokens == MASK).any())


# --- BD3-LM training ------------------------------------------------------------------------------------
def test_bd3_loss_equals_one_forward_per_block() -> None:
    from fastdiff.training.config import TrainConfig
    from fastdiff.training.objectives import Objective

    bs, B, L = 4, 3, 10
    m = model("none", num_labels=2, block_size=bs, seed=8)
    process = discrete.Absorbing(V, MASK, schedules.mutual_info(50))
    lam = 0.05
    cfg = TrainConfig(task="attribute", label_names=["a", "b"], family="discrete", kind="absorbing", T=50,
                      model={"block_size": bs}, loss="hybrid", hybrid_lambda=lam, seq_len=L, cond_drop=0.0)
    obj = Objective.create(cfg, process, m, torch.device("cpu"), num_labels=2)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(2, V, (B, L), generator=g)
    batch = {"tokens": x0, "labels": torch.tensor([0, 1, 1])}
    draws = obj.draws(batch, (torch.Generator().manual_seed(6), torch.Generator().manual_seed(7)), train=True)
    with torch.no_grad():
        res = obj.loss(m, batch, torch.arange(B), draws, train=True)
    x_t = draws["x_t"]
    # the per-block steps: one per block, each drawn independently
    t_tok = draws["t_tokens"]
    for a in range(0, L, bs):
        assert bool((t_tok[:, a:a + bs] == t_tok[:, a:a + 1]).all())
    assert bool((x_t[x_t != MASK] == x0[x_t != MASK]).all())
    # naive: one forward per block on [clean blocks before it, its noisy block]
    logits = torch.empty(B, L, V)
    with torch.no_grad():
        for a in range(0, L, bs):
            b = min(a + bs, L)
            ctx = torch.cat([x0[:, :a], x_t[:, a:b]], 1)
            logits[:, a:b] = m(ctx, draws["t"], label=batch["labels"])[:, a:b]
    # the hybrid loss of an absorbing process written out (MDLM eq. 10 weight, SUBS: mask never predicted)
    ab = process.schedule.alpha_bar
    a_t, a_s = ab[t_tok], ab[t_tok - 1]
    lp = logits.double().clone()
    lp[..., MASK] = float("-inf")
    nll = -lp.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    per_tok = torch.where(x_t == MASK, (a_s - a_t) / (1 - a_t) * nll, torch.zeros_like(nll)) + lam * nll
    want = per_tok.mean(1)
    assert torch.allclose(res.per_sequence.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(res.terms["loss"].double(), want.mean(), atol=1e-5, rtol=1e-5)
    # the two streams matter: the block-causal forward on x_t alone gives other logits
    with torch.no_grad():
        assert not torch.allclose(m(x_t, draws["t"], label=batch["labels"]), logits, atol=1e-3)


def test_block_size_training_config_checks() -> None:
    from fastdiff.training.config import TrainConfig

    TrainConfig(model={"block_size": 16})
    for bad in ({"kind": "uniform"}, {"timestep_sampler": "loss-aware"}, {"task": "word_order"}):
        with pytest.raises(InputError, match="block_size"):
            TrainConfig(model={"block_size": 16}, **bad)


# --- the shipped block-causal model ------------------------------------------------------------------------
BD3 = Path(__file__).resolve().parents[1] / "fastdiff" / "assets" / "bd3"


def test_shipped_bd3_model_kv_sampling_equals_uncached() -> None:
    from fastdiff.training.checkpoint import load_checkpoint

    ck = load_checkpoint(BD3)
    m = ck.model
    bs = m.config.block_size
    assert bs > 0 and m.config.num_labels == 2
    kw = dict(shape=(2, 2 * bs), steps=8, seed=1, block_size=bs, temperature=0.9,
              cond={"label": torch.tensor([0, 1])})
    a = sample(m, ck.process, **kw)
    b = sample(m, ck.process, kv_cache=True, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert not bool((a.tokens == ck.process.mask_id).any())


def test_train_cli_fine_tunes_a_block_causal_model_from_a_checkpoint(tmp_path) -> None:
    """``fastdiff train --set model.block_size=4 --init-from CKPT``: the new run starts from the checkpoint's
    (EMA) weights and trains with the BD3-LM objective."""
    from fastdiff import cli
    from fastdiff.training import load_checkpoint
    from tests.conftest import tiny_corpus

    corpus = tiny_corpus(tmp_path / "corpus.txt", seed=2, words=["a", "class", "returns", "the", "value", "of"],
                         lines=20, words_per_line=16)
    base = ["--data", str(corpus), "--family", "discrete", "--task", "lm", "--seq-len", "8", "--batch-size", "2",
            "--width", "16", "--layers", "1", "--heads", "2", "--device", "cpu", "--no-progress", "--threads", "1"]
    assert cli.main(["train", *base, "--steps", "3", "--lr", "1e-2", "--seed", "0", "--out", str(tmp_path / "a")]) == 0
    src = load_checkpoint(tmp_path / "a")
    assert cli.main(["train", *base, "--steps", "1", "--lr", "1e-12", "--warmup", "0", "--log-every", "1", "--set", "model.block_size=4",
                     "--seed", "1", "--init-from", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    dst = load_checkpoint(tmp_path / "b", weights="raw")
    assert dst.model.config.block_size == 4
    for (name, a), (_, b) in zip(src.model.state_dict().items(), dst.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert log and all(math.isfinite(json.loads(line).get("loss", 0.0)) for line in log)
