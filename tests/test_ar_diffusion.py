"""AR-Diffusion (Wu et al. 2023) on fastdiff's own models (issue 17, row 3): the SED denoiser with one step per
position (per-position adaLN), the token-level training objective, and ``fastdiff train --ar-diffusion`` ->
``fastdiff generate --strategy ar``. Hand computations re-implement the paper's formulas and DiT's adaLN; the
sampling maths (ar_timesteps, ar_step_pairs, ar_ddim_step, strategy "ar") is tested in test_methods_17.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import cli, continuous, schedules
from fastdiff.errors import InputError
from fastdiff.models.sed import SEDDenoiser, timestep_embedding
from fastdiff.training import TrainConfig
from fastdiff.training.objectives import Objective
from tests.conftest import tiny_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

V = 12


def _model(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> SEDDenoiser:
    """A tiny SED with every parameter drawn (the zero-initialised adaLN projections included), in eval mode."""
    torch.manual_seed(seed)
    base = dict(vocab_size=V, width=16, layers=2, heads=2, rel_freqs=4)
    base.update(kw)
    m = SEDDenoiser(**base).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.ndim > 1 else 0.1))
    return m


def _inputs(m: SEDDenoiser, B: int, L: int, seed: int = 3) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    c = m.config
    if c.kind == "continuous":
        x = torch.randn(B, L, c.embed_dim, generator=g, dtype=m.input_proj.weight.dtype)
    else:
        x = torch.randint(0, V, (B, L), generator=g)
    kw: dict = {}
    if c.num_labels:
        kw["label"] = torch.arange(B) % (c.num_labels + 1)
    else:
        kw["cond_tokens"] = torch.randint(1, V, (B, 3), generator=g)
    return x, kw


# --- the model: per-position steps --------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(kind="continuous", embed_dim=4, num_labels=2, self_condition=True),
    dict(kind="continuous", embed_dim=4, num_labels=2, time_conditioning="add"),
    dict(kind="discrete"),  # condition tokens as the prefix
    dict(kind="discrete", time_conditioning="none"),
])
def test_a_constant_per_position_step_is_the_sequence_step(kw):
    """``t: (B, L)`` holding each row's step at every position gives the ``(B,)`` forward (the prefix takes
    the first position's step). Different code paths (a per-position broadcast, the adaLN projection of
    ``(B, S, W)`` rows instead of ``(B, W)``): equal up to float32 rounding, atol 1e-5."""
    m = _model(**kw)
    B, L = 3, 5
    x, cond = _inputs(m, B, L)
    t = torch.tensor([1, 40, 999])
    with torch.no_grad():
        want = m(x, t, **cond)
        got = m(x, t[:, None].expand(B, L), **cond)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _hand_forward(m: SEDDenoiser, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """A one-layer continuous adaLN SED with a label prefix, written out from the formulas: each target
    position's step embedding from its own step (the (B,) step embedding of that column), the label position
    at the first position's step; DiT's adaLN-Zero block ``h + g1·attn(LN(h)(1+sc1)+sh1)``, then
    ``+ g2·ff(LN(h)(1+sc2)+sh2)``, every shift/scale/gate per position; the final LN modulated per position."""
    W = m.config.width
    B, L = t.shape
    temb = torch.stack([m.time_mlp(timestep_embedding(t[:, j], W).to(x.dtype)) for j in range(L)], 1)  # (B, L, W)
    c = torch.cat([temb[:, :1], temb], 1)  # the label position at the first step
    h = torch.cat([m.label_embedding(label)[:, None], m.input_proj(x)], 1)
    blk = m.blocks[0]
    lin = blk.ada[1]
    mod = F.silu(c) @ lin.weight.t() + lin.bias  # (B, 1 + L, 6W)
    sh1, sc1, g1, sh2, sc2, g2 = (mod[..., k * W:(k + 1) * W] for k in range(6))
    a = blk.attn(F.layer_norm(h, (W,)) * (1 + sc1) + sh1, None)
    h = h + g1 * a
    h = h + g2 * blk.ff(F.layer_norm(h, (W,)) * (1 + sc2) + sh2)
    fin = F.silu(temb) @ m.final_ada[1].weight.t() + m.final_ada[1].bias
    out = F.layer_norm(h[:, 1:], (W,)) * (1 + fin[..., W:]) + fin[..., :W]
    return m.output_proj(out)


def test_per_position_adaln_matches_a_hand_computation():
    """Non-constant ``(B, L)`` steps through a one-layer adaLN model against :func:`_hand_forward` (float64)."""
    m = _model(dtype=torch.float64, kind="continuous", embed_dim=4, num_labels=2, layers=1)
    B, L = 2, 6
    x, cond = _inputs(m, B, L)
    t = torch.tensor([[0, 0, 3, 17, 250, 999], [5, 5, 5, 6, 800, 1000]])
    with torch.no_grad():
        got = m(x, t, **cond)
        want = _hand_forward(m, x, t, cond["label"])
        # and the per-position step matters: the (B,) forward at the first step differs
        other = m(x, t[:, 0], **cond)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, other, atol=1e-3)


def test_per_position_steps_are_checked():
    m = _model(kind="discrete")
    x, cond = _inputs(m, 2, 5)
    with pytest.raises(InputError, match=r"^t: expected \(2,\) or \(2, 5\) integer steps"):
        m(x, torch.zeros(2, 4, dtype=torch.long), **cond)
    with pytest.raises(InputError, match="^t: expected"):
        m(x, torch.zeros(2, 5), **cond)
    _, cache = m.kv_forward(x, torch.tensor([3, 4]), **cond)
    with pytest.raises(InputError, match=r"^t: expected \(2,\) integer steps"):  # the KV window: per sequence only
        m.kv_window(x[:, 1:3], torch.zeros(2, 2, dtype=torch.long), cache=cache, start=1, **cond)


# --- training: token-level steps ---------------------------------------------------------------------
def _anchor_steps(N: int, T: int, n: int) -> list[int]:
    """The paper's anchor-point schedule (Wu et al. 2023, Eq. 6-7), plain Python: the line through the start
    point ``(clip(N - n, 0, N), clip(n - N, 0, T))`` and the anchor ``(2N, T)``, at positions ``1..N``,
    clipped to ``[0, T]`` and rounded half up."""
    n_s, t_s = min(max(N - n, 0), N), min(max(n - N, 0), T)
    return [math.floor(min(max((T - t_s) / (2 * N - n_s) * (i - n_s) + t_s, 0), T) + 0.5) for i in range(1, N + 1)]


class _Spy(nn.Module):
    """Runs the wrapped model and keeps what it was called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[dict] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.clone()})
        return self.model(x_t, t, **kw)


def _objective(T: int = 20, **kw) -> tuple[Objective, SEDDenoiser, continuous.GaussianDiffusion]:
    cfg = TrainConfig(family="continuous", ar_diffusion=True, T=T, device="cpu", **kw)
    model = _model(kind="continuous", embed_dim=4, layers=1)
    model.train(False)
    process = continuous.GaussianDiffusion(schedules.sqrt(T), parameterization="x0")
    return Objective.create(cfg, process, model, torch.device("cpu")), model, process


def test_token_level_training_loss_matches_a_hand_computation():
    """Each sequence's positions at their anchor-point steps from its sentence-level step n; position i
    noised with its own alpha_bar; the model called with the (B, L) steps; the loss per position at its
    own step: ``mean_b mean_i (|out_bi - x0_bi|²/D + λ_a·CE(out_bi·Eᵀ, w_bi)) + λ_r·mean CE(x0·Eᵀ, w)``."""
    T, lam_a, lam_r = 20, 0.5, 0.7
    obj, model, process = _objective(T, lam_anchor=lam_a, lam_round=lam_r)
    B, N = 4, 6
    tokens = torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(5))
    gbatch = {"tokens": tokens}
    draws = obj.draws(gbatch, (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)), train=True)
    n = draws["t"]
    assert n.shape == (B,) and bool(((n >= 0) & (n <= N + T)).all())
    steps = torch.tensor([_anchor_steps(N, T, int(v)) for v in n])
    assert torch.equal(draws["t_tokens"], steps)
    spy = _Spy(model)
    out = obj.loss(spy, gbatch, torch.arange(B), draws, train=True)
    assert torch.equal(spy.calls[0]["t"], steps)
    with torch.no_grad():
        emb = model.embedding(tokens)
        ab = process.alpha_bar
        noise = draws["noise"]
        x_t = torch.empty_like(emb)
        for b in range(B):
            for i in range(N):
                a = float(ab[steps[b, i]])
                x_t[b, i] = math.sqrt(a) * emb[b, i] + math.sqrt(1 - a) * noise[b, i]
        torch.testing.assert_close(spy.calls[0]["x_t"], x_t, rtol=1e-6, atol=1e-6)
        pred = model(x_t, steps)
        E = model.embedding_table()
        mse = ((pred - emb) ** 2).mean(-1)
        anchor = F.cross_entropy((pred @ E.t()).reshape(-1, V), tokens.reshape(-1), reduction="none").view(B, N)
        rnd = F.cross_entropy((emb @ E.t()).reshape(-1, V), tokens.reshape(-1))
        per_seq = (mse + lam_a * anchor).mean(-1)
        want = per_seq.mean() + lam_r * rnd
    torch.testing.assert_close(out.per_sequence, per_seq, rtol=1e-5, atol=1e-5)
    assert float(out.terms["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    assert torch.equal(out.t, n)


def test_sentence_level_steps_are_uniform_over_0_to_n_plus_t():
    """n ~ U{0, ..., N + T}: every value drawn, about equally often (400 draws of 8 values: each count in
    [20, 85], a binomial(400, 1/8) outside that with probability < 1e-6 each); n = 0 is all clean and
    n = N + T all at T."""
    obj, _, _ = _objective(T=4)
    N = 4
    gbatch = {"tokens": torch.zeros(400, N, dtype=torch.long)}
    d = obj.draws(gbatch, (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)), train=False)
    counts = torch.bincount(d["t"], minlength=N + 4 + 1)
    assert counts.numel() == N + 5 and bool(((counts >= 20) & (counts <= 85)).all()), counts
    assert bool((d["t_tokens"][d["t"] == 0] == 0).all())
    assert bool((d["t_tokens"][d["t"] == N + 4] == 4).all())


@pytest.mark.parametrize("kw, match", [
    (dict(family="discrete"), "^ar_diffusion: AR-Diffusion's token-level steps are for family='continuous'"),
    (dict(family="continuous", parameterization="eps"), "^ar_diffusion: needs parameterization='x0'"),
    (dict(family="continuous", timestep_sampler="loss-aware"), "^ar_diffusion: AR-Diffusion draws"),
])
def test_ar_diffusion_config_is_checked(kw, match):
    with pytest.raises(InputError, match=match):
        TrainConfig(ar_diffusion=True, **kw)
    with pytest.raises(TypeError, match="^ar_diffusion: expected True or False"):
        TrainConfig(family="continuous", ar_diffusion=1)


# --- the command line: train --ar-diffusion, generate --strategy ar ---------------------------------
def test_cli_train_ar_diffusion_then_generate_with_strategy_ar(tmp_path, capsys, monkeypatch):
    corpus = tiny_corpus(tmp_path / "c.txt", seed=1, words=["a", "the", "value", "list", "is", "of"], lines=30,
                         words_per_line=12)
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--family", "continuous", "--ar-diffusion", "--task", "lm",
            "--seq-len", "8", "--batch-size", "2", "--width", "16", "--layers", "1", "--heads", "2", "--embed-dim",
            "8", "--steps", "2", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu", "--no-progress",
            "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    assert json.loads((out / "train_config.json").read_text())["ar_diffusion"] is True
    seen: list[tuple[int, ...]] = []
    real = SEDDenoiser.forward

    def spy(self: SEDDenoiser, x_t: torch.Tensor, t: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(torch.as_tensor(t).shape))
        return real(self, x_t, t, **kw)

    monkeypatch.setattr(SEDDenoiser, "forward", spy)
    capsys.readouterr()
    assert cli.main(["generate", "-c", str(out), "--strategy", "ar", "--steps", "5", "--num-samples", "2",
                     "--length", "8", "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.strip()
    assert seen == [(2, 8)] * 5  # every call with one step per position
    assert Path(out).is_dir()
