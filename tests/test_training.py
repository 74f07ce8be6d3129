"""fastdiff.training: TrainConfig, the Trainer's losses and randomness, EMA, lr schedule, exact resume."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from fastdiff import continuous, discrete, schedules
from fastdiff.continuous import TokenEmbedding
from fastdiff.training import EMA, TrainConfig, Trainer, lr_factor

V, L = 64, 16


pytestmark = pytest.mark.usefixtures("one_thread")


# --- tiny models -------------------------------------------------------------------------------------
class SpyDiscrete(nn.Module):
    """x0 logits from token + step (+ label) embeddings and a sequence mean; records every call."""

    arch = "spy"

    def __init__(self, num_labels: int = 0, width: int = 16):
        super().__init__()
        self.num_labels = num_labels
        self.emb = nn.Embedding(V, width)
        self.temb = nn.Embedding(1001, width)
        self.lab = nn.Embedding(num_labels + 1, width) if num_labels else None
        self.out = nn.Linear(width, V)
        self.calls: list[dict] = []

    def config_dict(self) -> dict:
        return {"vocab_size": V, "num_labels": self.num_labels}

    def forward(self, x_t, t, label=None, cond_tokens=None):
        self.calls.append({"x_t": x_t.clone(), "t": t.clone(), "label": None if label is None else label.clone(),
                           "cond_tokens": cond_tokens})
        h = self.emb(x_t) + self.temb(t)[:, None]
        h = h + h.mean(1, keepdim=True)
        if label is not None:
            h = h + self.lab(label)[:, None]
        logits = self.out(torch.tanh(h))
        self.calls[-1]["out"] = logits.detach().clone()
        return logits


class SpyContinuous(nn.Module):
    """Predicts x0 from [x_t, x_self_cond] per position; records what it was given."""

    arch = "spy"

    def __init__(self, dim: int = 8, width: int = 16, self_condition: bool = True):
        super().__init__()
        self.self_condition = self_condition
        self.embedding = TokenEmbedding(V, dim)
        self.inp = nn.Linear(2 * dim, width)
        self.temb = nn.Embedding(1001, width)
        self.out = nn.Linear(width, dim)
        self.calls: list[dict] = []

    def embedding_table(self) -> torch.Tensor:
        return self.embedding.table()

    def config_dict(self) -> dict:
        return {"vocab_size": V, "self_condition": self.self_condition}

    def forward(self, x_t, t, x_self_cond=None):
        sc = torch.zeros_like(x_t) if x_self_cond is None else x_self_cond
        out = self.out(torch.tanh(self.inp(torch.cat([x_t, sc], -1)) + self.temb(t)[:, None]))
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.clone(), "grad": torch.is_grad_enabled(),
                           "sc": None if x_self_cond is None else x_self_cond.detach().clone(),
                           "sc_requires_grad": x_self_cond is not None and x_self_cond.requires_grad,
                           "out": out.detach().clone()})
        return out


def _need_models() -> None:
    models = pytest.importorskip("fastdiff.models")
    if not hasattr(models, "build_model"):
        pytest.skip("fastdiff.models has no build_model yet")


def pattern_tokens(n: int = 128, seed: int = 0) -> torch.Tensor:
    """Learnable sequences: a random start in [4, 20) counting up by one."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(4, 20, (n, 1), generator=g)
    return start + torch.arange(L)


def config(tmp_path, **kw) -> TrainConfig:
    base = {"T": 50, "batch_size": 8, "max_steps": 10, "warmup_steps": 2, "lr": 3e-3, "device": "cpu", "log_every": 2,
                "ckpt_every": 0, "out_dir": str(tmp_path / "run"), "ema_decay": 0.9}
    base.update(kw)
    return TrainConfig(**base)


# --- TrainConfig ---------------------------------------------------------------------------------------
def test_config_json_round_trip(tmp_path):
    cfg = TrainConfig(task="word_order", conditioning="cross", family="continuous", schedule="adaptive",
                      schedule_kw={"base": "sqrt"}, model={"width": 32}, lam_anchor=0.5, betas=(0.8, 0.95),
                      label_names=["a", "b"], timestep_sampler="loss-aware", amp="off")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    cfg.save(tmp_path / "c.json")
    back = TrainConfig.load(tmp_path / "c.json")
    assert back == cfg and back.betas == (0.8, 0.95)
    assert TrainConfig(family="continuous").schedule == "sqrt" and TrainConfig().schedule == "mutual_info"


@pytest.mark.parametrize("field,value", [
    ("task", "translate"), ("conditioning", "add"), ("cond_drop", 1.5), ("family", "gaussian"), ("kind", "band"),
    ("schedule", "nope"), ("T", 0), ("timestep_sampler", "importance"), ("loss", "kl"), ("hybrid_lambda", -1.0),
    ("parameterization", "v"), ("lam_round", -0.1), ("self_condition_prob", 2.0), ("lr", 0.0), ("betas", (0.9,)),
    ("warmup_steps", -1), ("lr_schedule", "linear"), ("grad_clip", -1.0), ("ema_decay", 1.0), ("amp", "fp16"),
    ("batch_size", 0), ("max_steps", 0), ("log_every", 0), ("ckpt_every", -1), ("refit_every", 0),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_config_rejects_unknown_fields_and_mdlm_on_uniform():
    with pytest.raises(ValueError, match="unknown TrainConfig fields.*'colour'"):
        TrainConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="mdlm", kind="uniform")


# --- lr schedule and EMA -------------------------------------------------------------------------------
def test_lr_factor_hand_values():
    f = [lr_factor(s, warmup_steps=4, max_steps=12) for s in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[12] == pytest.approx(0.0, abs=1e-15)
    assert f[8] == pytest.approx(0.5)  # half way through the cosine
    assert f[6] == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(10, warmup_steps=4, max_steps=12, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * (1 + math.cos(0.75 * math.pi)) / 2)
    assert [lr_factor(s, warmup_steps=2, max_steps=5, schedule="constant") for s in range(5)] == [0.5, 1, 1, 1, 1]
    assert lr_factor(0, warmup_steps=0, max_steps=5) == 1.0


def test_trainer_uses_warmup_lr(tmp_path):
    tr = Trainer(config(tmp_path, warmup_steps=4, max_steps=8, lr=1e-2), {"tokens": pattern_tokens()},
                 model=SpyDiscrete())
    lrs = [tr.step()["lr"] for _ in range(6)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[5] == pytest.approx(1e-2 * (1 + math.cos(math.pi / 4)) / 2)
    assert all(g["lr"] == lrs[-1] for g in tr.optimizer.param_groups)


def test_ema_known_sequence():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    expected = []
    for value, want in [(1.0, 0.5), (2.0, 1.25), (-1.0, 0.125), (0.0, 0.0625)]:  # e <- e/2 + value/2 by hand
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        expected.append(want)
        assert ema.shadow["weight"].item() == want
    ema.copy_to(model)
    assert model.weight.item() == expected[-1]


def test_trainer_ema_follows_parameters(tmp_path):
    model = SpyDiscrete()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(config(tmp_path, ema_decay=0.75), {"tokens": pattern_tokens()}, model=model)
    after = []
    for _ in range(3):
        tr.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    d = 0.75
    for n, e0 in start.items():  # e3 = d^3 e0 + (1-d)(d^2 p1 + d p2 + p3)
        want = d**3 * e0 + (1 - d) * (d**2 * after[0][n] + d * after[1][n] + after[2][n])
        torch.testing.assert_close(tr.ema.shadow[n], want, rtol=1e-5, atol=1e-6)


# --- losses --------------------------------------------------------------------------------------------
def test_discrete_loss_is_the_hybrid_loss(tmp_path):
    model = SpyDiscrete()
    tr = Trainer(config(tmp_path, hybrid_lambda=0.05), {"tokens": pattern_tokens()}, model=model)
    with torch.no_grad():
        ref_params = {n: p.clone() for n, p in model.named_parameters()}
    m = tr.step()
    call = model.calls[-1]
    x0 = _last_batch(tr)
    process = discrete.Absorbing(V, 1, schedules.mutual_info(50))
    # x_t only masks: every unmasked position equals the data
    assert bool(((call["x_t"] == 1) | (call["x_t"] == x0)).all())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ref_params[n])
        logits = model(call["x_t"], call["t"])
    want = discrete.hybrid_loss(process, x0, call["x_t"], call["t"], logits, lam=0.05)
    assert m["loss"] == pytest.approx(float(want), rel=1e-5)


def _last_batch(tr: Trainer, key: str = "tokens") -> torch.Tensor:
    """The rows of ``key`` the trainer's last step used (an independent Batches at the previous position)."""
    from fastdiff.data import Batches

    b = Batches(*tr.train_data.values(), batch_size=tr.config.batch_size, seed=tr.config.seed)
    st = tr.batches.state_dict()
    return tr.train_data[key][b.indices(st["epoch"], st["position"] - 1)]


def test_continuous_loss_matches_gaussian_diffusion_losses(tmp_path):
    model = SpyContinuous(self_condition=False)
    tr = Trainer(config(tmp_path, family="continuous", lam_anchor=0.3, lam_round=0.7), {"tokens": pattern_tokens()},
                 model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = tr.step()
    call = model.calls[-1]
    x0_tok = _last_batch(tr)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
        emb = model.embedding(x0_tok)
        out = model(call["x_t"], call["t"])
        diff = continuous.GaussianDiffusion(schedules.sqrt(50))
        ab = diff.alpha_bar[call["t"]].float()[:, None, None]
        noise = (call["x_t"] - ab.sqrt() * emb) / (1 - ab).sqrt()
        want = diff.losses(out, emb, call["x_t"], call["t"], noise, tokens=x0_tok, weight=model.embedding_table(),
                           lam_round=0.7, lam_anchor=0.3)
    assert m["loss"] == pytest.approx(float(want["loss"]), rel=1e-4)
    assert m["mse"] == pytest.approx(float(want["mse"]), rel=1e-4)
    assert m["round"] == pytest.approx(float(want["round"]), rel=1e-4)
    assert m["anchor"] == pytest.approx(float(want["anchor"]), rel=1e-4)


def test_self_conditioning_on_about_half_the_steps(tmp_path):
    model = SpyContinuous(self_condition=True)
    tr = Trainer(config(tmp_path, family="continuous", max_steps=200), {"tokens": pattern_tokens()}, model=model)
    steps, with_sc = 80, 0
    for _ in range(steps):
        model.calls.clear()
        tr.step()
        last = model.calls[-1]
        assert last["grad"] and not last["sc_requires_grad"]
        if len(model.calls) == 2:  # a no-grad pass with zeros, then the estimate x0 = its output
            first = model.calls[0]
            assert not first["grad"] and first["sc"] is not None and not first["sc"].any()
            assert torch.equal(last["sc"], first["out"]) and last["sc"].abs().sum() > 0
            with_sc += 1
        else:
            assert len(model.calls) == 1 and not last["sc"].any()
    assert 0.3 * steps <= with_sc <= 0.7 * steps  # p = 0.5: 5.4 standard deviations either side


def test_cfg_label_dropout_rate(tmp_path):
    model = SpyDiscrete(num_labels=3)
    tokens = pattern_tokens(256)
    labels = tokens[:, 0] % 3  # recoverable from the data, to check the labels that were kept
    tr = Trainer(config(tmp_path, task="attribute", cond_drop=0.25, batch_size=32, max_steps=100),
                 {"tokens": tokens, "labels": labels}, model=model)
    dropped = total = 0
    for _ in range(40):
        tr.step()
        call = model.calls[-1]
        x0 = _last_batch(tr)
        lab = call["label"]
        null = lab == 3
        assert torch.equal(lab[~null], (x0[:, 0] % 3)[~null])
        dropped += int(null.sum())
        total += lab.numel()
    assert abs(dropped / total - 0.25) < 0.05  # 1280 draws: sd 0.012


# --- training lowers the loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["discrete", "continuous"])
def test_tiny_training_lowers_the_loss(tmp_path, family):
    _need_models()
    model_cfg = {"vocab_size": V, "width": 32, "layers": 1, "heads": 2}
    if family == "continuous":
        model_cfg["embed_dim"] = 16
    cfg = config(tmp_path, family=family, max_steps=60, warmup_steps=5, lr=3e-3, batch_size=16, model=model_cfg)
    tr = Trainer(cfg, {"tokens": pattern_tokens(256)})
    assert tr.model.__class__.__name__ == "SEDDenoiser"
    key = "ce" if family == "discrete" else "loss"
    losses = [tr.step()[key] for _ in range(60)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


# --- tasks -------------------------------------------------------------------------------------------------
def test_word_order_concat_passes_the_source(tmp_path):
    model = SpyDiscrete()
    src, tgt = pattern_tokens(64, 1)[:, :8], pattern_tokens(64, 2)
    tr = Trainer(config(tmp_path, task="word_order"), {"src": src, "tgt": tgt}, model=model)
    tr.step()
    call = model.calls[-1]
    assert call["cond_tokens"].shape == (8, 8)
    assert tr.config.src_len == 8 and tr.config.seq_len == L
    assert torch.equal(call["cond_tokens"], _last_batch(tr, "src"))  # the same rows as the target
    x_t, tgt_rows = call["x_t"], _last_batch(tr, "tgt")
    assert bool(((x_t == 1) | (x_t == tgt_rows)).all()) and bool((x_t == tgt_rows).any())


@pytest.mark.parametrize("conditioning", ["concat", "cross"])
@pytest.mark.parametrize("family", ["discrete", "continuous"])
def test_word_order_with_sed(tmp_path, conditioning, family):
    _need_models()
    model_cfg = {"vocab_size": V, "width": 32, "layers": 1, "heads": 2, "encoder_layers": 1}
    if family == "continuous":
        model_cfg["embed_dim"] = 8
    src, tgt = pattern_tokens(32, 1)[:, :6], pattern_tokens(32, 2)
    cfg = config(tmp_path, task="word_order", conditioning=conditioning, family=family, model=model_cfg)
    tr = Trainer(cfg, {"src": src, "tgt": tgt}, valid_data={"src": src[:8], "tgt": tgt[:8]})
    assert bool(tr.model_config.get("cross_attention")) == (conditioning == "cross")
    m = [tr.step() for _ in range(3)]
    assert all(math.isfinite(x["loss"]) for x in m)
    assert math.isfinite(tr.evaluate()["valid_loss"])


def test_data_checks(tmp_path):
    with pytest.raises(ValueError, match="train_data.*'labels'"):
        Trainer(config(tmp_path, task="attribute"), {"tokens": pattern_tokens()}, model=SpyDiscrete(2))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        Trainer(config(tmp_path), {"tokens": pattern_tokens() + 60}, model=SpyDiscrete())
    with pytest.raises(ValueError, match="labels.*must lie"):
        Trainer(config(tmp_path, task="attribute"), {"tokens": pattern_tokens(), "labels": torch.full((128,), 5)},
                model=SpyDiscrete(2))


# --- evaluation, fit, logs -------------------------------------------------------------------------------
def test_evaluate_is_fixed_and_leaves_training_alone(tmp_path):
    data, valid = {"tokens": pattern_tokens()}, {"tokens": pattern_tokens(24, 5)}
    a = Trainer(config(tmp_path, eval_batches=2), data, valid, model=_seeded(SpyDiscrete))
    b = Trainer(config(tmp_path, eval_batches=2), data, valid, model=_seeded(SpyDiscrete))
    e1, e2 = a.evaluate(), a.evaluate()
    assert e1 == e2 and set(e1) >= {"valid_loss", "valid_ce"}
    ma, mb = a.step(), b.step()
    ma.pop("time_s"), mb.pop("time_s")
    assert ma == mb


def _seeded(cls, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(**kw)


def test_fit_writes_log_and_checkpoints(tmp_path):
    from fastdiff.training import read_config, resolve_checkpoint_dir

    cfg = config(tmp_path, max_steps=6, log_every=2, ckpt_every=3, keep_checkpoints=1, eval_every=3)
    tr = Trainer(cfg, {"tokens": pattern_tokens()}, {"tokens": pattern_tokens(16, 3)},
                 model=_seeded(SpyDiscrete))
    records = tr.fit(progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert lines == records
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    assert set(train_lines[0]) >= {"step", "loss", "hybrid", "ce", "lr", "grad_norm", "tokens_per_s", "elapsed"}
    assert [r["step"] for r in lines if "valid_loss" in r] == [3, 6]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["step_00000006"]  # keep_checkpoints=1
    assert resolve_checkpoint_dir(run).name == "step_00000006" and read_config(run)["step"] == 6


# --- exact resume --------------------------------------------------------------------------------------------
def _snapshot(tr: Trainer) -> dict:
    opt = tr.optimizer.state_dict()
    return {"params": {n: p.detach().clone() for n, p in tr.model.named_parameters()},
            "opt_state": {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()},
            "opt_groups": opt["param_groups"], "ema": {k: v.clone() for k, v in tr.ema.shadow.items()},
            "data": tr.batches.state_dict(), "step": tr.global_step}


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["data"] == b["data"] and a["opt_groups"] == b["opt_groups"]
    for name in ("params", "ema"):
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}[{k}] differs"
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for i in a["opt_state"]:
        for k in a["opt_state"][i]:
            assert torch.equal(a["opt_state"][i][k], b["opt_state"][i][k]), f"optimizer state {i}.{k} differs"


def _loss_fields(path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "elapsed")}
            for x in path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["discrete", "continuous"])
def test_resume_is_bit_exact(tmp_path, family):
    kw = {"family": family, "max_steps": 9, "log_every": 2, "ema_decay": 0.8, "timestep_sampler": "loss-aware",
              "schedule": "adaptive", "refit_every": 2, "T": 4, "warmup_steps": 3}
    if family == "continuous":
        kw.update(lam_anchor=0.2, schedule_kw={"base": "cosine"})
    else:
        kw.update(schedule_kw={"base": "mutual_info"})
    make = SpyDiscrete if family == "discrete" else SpyContinuous
    data = {"tokens": pattern_tokens(40)}  # 5 batches an epoch: the run crosses an epoch
    straight = Trainer(config(tmp_path / "a", **kw), data, model=_seeded(make))
    losses_a = [straight.step() for _ in range(9)]
    straight.fit(progress=False)  # already at max_steps: only the final save
    part = Trainer(config(tmp_path / "b", **kw), data, model=_seeded(make))
    losses_b = [part.step() for _ in range(5)]
    saved = part.save()
    resumed = Trainer.resume(saved, data, model=make())
    assert resumed.global_step == 5
    losses_b += [resumed.step() for _ in range(4)]
    drop = ("time_s",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in losses_a] == \
        [{k: v for k, v in m.items() if k not in drop} for m in losses_b]
    _assert_same(_snapshot(straight), _snapshot(resumed))
    # the loss-aware history and the adaptive schedule came back, and both did something
    assert torch.equal(straight.sampler._losses, resumed.sampler._losses)
    assert torch.equal(straight.sampler._count, resumed.sampler._count) and straight.sampler.warmed_up
    assert torch.equal(straight.adaptive.alpha_bar, resumed.adaptive.alpha_bar)
    torch.testing.assert_close(straight.adaptive.loss, resumed.adaptive.loss, rtol=0, atol=0, equal_nan=True)
    base = schedules.get(kw["schedule_kw"]["base"], 4).alpha_bar
    assert not torch.equal(straight.adaptive.alpha_bar, base)
    if family == "continuous":
        assert torch.equal(resumed.process.alpha_bar, resumed.adaptive.alpha_bar)


def test_resume_via_fit_gives_the_same_log(tmp_path):
    kw = {"max_steps": 8, "log_every": 3, "ckpt_every": 5, "ema_decay": 0.5}
    data = {"tokens": pattern_tokens(40)}
    a = Trainer(config(tmp_path / "a", **kw), data, model=_seeded(SpyDiscrete))
    a.fit(progress=False)
    b = Trainer(config(tmp_path / "b", **kw), data, model=_seeded(SpyDiscrete))
    b.fit(progress=False, steps=5)  # steps 1..5; the log window holds steps 4, 5 at the save
    with open(tmp_path / "b" / "run" / "train_log.jsonl", "a") as f:  # a line from a run that died later
        f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")
    r = Trainer.resume(tmp_path / "b" / "run", data, model=SpyDiscrete())
    assert r.global_step == 5
    r.fit(progress=False)
    la, lb = _loss_fields(tmp_path / "a" / "run" / "train_log.jsonl"), _loss_fields(tmp_path / "b" / "run" / "train_log.jsonl")
    assert [x["step"] for x in la] == [3, 6] and la == lb
    _assert_same(_snapshot(a), _snapshot(r))


def test_resume_rejects_structural_overrides(tmp_path):
    tr = Trainer(config(tmp_path), {"tokens": pattern_tokens()}, model=SpyDiscrete())
    tr.step()
    path = tr.save()
    with pytest.raises(ValueError, match="lr"):
        Trainer.resume(path, {"tokens": pattern_tokens()}, model=SpyDiscrete(), lr=1.0)
    assert dataclasses.replace(tr.config).lr == tr.config.lr


def test_text_to_text_training_learns_to_use_the_source(tmp_path):
    """A tiny concatenation-conditioned model learns to copy its source (unseen sequences, decoded in one step
    from all-[MASK]): fails if the condition does not reach the denoiser or the loss ignores it."""
    from fastdiff.data import default_tokenizer

    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(4, 40, (1024, 6), generator=g)
    cfg = TrainConfig(family="discrete", task="word_order", conditioning="concat", max_steps=150, batch_size=32, lr=2e-3,
                      warmup_steps=20, model={"width": 32, "layers": 2, "heads": 2}, log_every=50, ckpt_every=0,
                      ema_decay=0.0, out_dir=str(tmp_path / "copy"))
    tr = Trainer(cfg, {"src": tgt.clone(), "tgt": tgt}, tokenizer=default_tokenizer())
    tr.fit(progress=False)
    m = tr.model.eval()
    new = torch.randint(4, 40, (256, 6), generator=g)
    with torch.no_grad():
        pred = m(torch.full((256, 6), 1), torch.full((256,), cfg.T), cond_tokens=new).argmax(-1)
    assert float((pred == new).float().mean()) > 0.9


# --- run directories: resume into the directory given, fresh runs never mix into another run ----------------
DATA40 = {"tokens": pattern_tokens(40)}


def _fit_run(tmp_path, name: str = "a", **kw) -> tuple[Trainer, "Path"]:
    cfg = config(tmp_path / name, **{"max_steps": 4, "log_every": 1, "ckpt_every": 2, **kw})
    tr = Trainer(cfg, DATA40, model=_seeded(SpyDiscrete))
    tr.fit(progress=False)
    return tr, tmp_path / name / "run"


def _tree(root) -> dict:
    """Every entry under ``root``: file bytes, or None for a directory (a byte-for-byte snapshot)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _steps(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_resume_of_a_copied_run_writes_into_the_copy(tmp_path):
    import shutil

    from fastdiff.training import resolve_checkpoint_dir

    _, a = _fit_run(tmp_path)
    b = tmp_path / "b"
    shutil.copytree(a, b)  # cp -r runA runB: the checkpoints inside still record out_dir=runA
    before = _tree(a)
    r = Trainer.resume(b, DATA40, model=SpyDiscrete(), max_steps=6)
    assert r.config.out_dir == str(b)
    r.fit(progress=False)
    assert _tree(a) == before  # the original run is untouched, byte for byte
    assert _steps(b) == [1, 2, 3, 4, 5, 6] and resolve_checkpoint_dir(b).name == "step_00000006"
    # a checkpoint directory resumes into the run directory that holds it
    r = Trainer.resume(b / "step_00000004", DATA40, model=SpyDiscrete(), max_steps=6)
    assert r.config.out_dir == str(b) and r.global_step == 4
    assert _tree(a) == before


def test_resume_into_another_directory_copies_the_log_and_reads_the_source_only(tmp_path):
    _, a = _fit_run(tmp_path)
    before = _tree(a)
    c = tmp_path / "c"
    r = Trainer.resume(a, DATA40, model=SpyDiscrete(), max_steps=6, out_dir=str(c))
    r.fit(progress=False)
    assert _tree(a) == before
    assert _steps(c) == [1, 2, 3, 4, 5, 6]
    assert (c / "train_log.jsonl").read_text().splitlines()[:4] == (a / "train_log.jsonl").read_text().splitlines()
    # c holds a run now: resuming into it again is refused; overwrite=True replaces it
    with pytest.raises(ValueError, match="already holds a training run"):
        Trainer.resume(a, DATA40, model=SpyDiscrete(), out_dir=str(c))
    with pytest.raises(ValueError, match="overwrite"):
        Trainer.resume(a, DATA40, model=SpyDiscrete(), overwrite=True)  # into itself: nothing to replace
    r = Trainer.resume(a, DATA40, model=SpyDiscrete(), out_dir=str(c), overwrite=True)
    assert _steps(c) == [1, 2, 3, 4] and sorted(p.name for p in c.iterdir()) == ["train_log.jsonl"]
    assert _tree(a) == before


def test_a_fresh_run_refuses_a_directory_that_holds_a_run(tmp_path):
    _, a = _fit_run(tmp_path)
    before = _tree(a)
    fresh = Trainer(config(tmp_path / "a", max_steps=4, log_every=1, ckpt_every=2), DATA40, model=_seeded(SpyDiscrete))
    with pytest.raises(ValueError, match="already holds a training run.*overwrite"):
        fresh.fit(progress=False)
    with pytest.raises(ValueError, match="already holds a training run"):
        fresh.save()
    assert _tree(a) == before
    (a / "notes.txt").write_text("mine")
    again = Trainer(config(tmp_path / "a", max_steps=3, log_every=1, ckpt_every=0), DATA40,
                    model=_seeded(SpyDiscrete), overwrite=True)
    again.fit(progress=False)
    assert _steps(a) == [1, 2, 3]  # not 1..4 then 1..3
    assert sorted(p.name for p in a.iterdir()) == ["latest", "notes.txt", "step_00000003", "train_log.jsonl"]


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    _, a = _fit_run(tmp_path)
    log = a / "train_log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"step": 5, "loss": 1.2')  # a write killed half way
    r = Trainer.resume(a, DATA40, model=SpyDiscrete(), max_steps=6)
    r.fit(progress=False)
    assert _steps(a) == [1, 2, 3, 4, 5, 6]
    lines = log.read_text().splitlines()
    lines[1] = "{not json"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train_log.jsonl: line 2 is not JSON"):
        Trainer.resume(a, DATA40, model=SpyDiscrete(), max_steps=6)


def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path):
    _, a = _fit_run(tmp_path)
    ck = a / "step_00000004"
    inode, files = ck.stat().st_ino, _tree(ck)
    r = Trainer.resume(a, DATA40, model=SpyDiscrete())
    assert r.fit(progress=False) == []
    assert ck.stat().st_ino == inode and _tree(ck) == files
    with pytest.raises(ValueError, match="max_steps: 3 is below the step"):
        Trainer.resume(a, DATA40, model=SpyDiscrete(), max_steps=3)


def test_the_progress_bar_is_drawn_only_on_a_terminal(tmp_path, capfd, monkeypatch):
    import io
    import sys

    tr = Trainer(config(tmp_path, max_steps=3, log_every=1), DATA40, model=SpyDiscrete())
    tr.fit(progress=True)  # stderr is a pipe here, as in `fastdiff train ... 2> log`
    err = capfd.readouterr().err
    assert "\r" not in err and "train" not in err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    tr = Trainer(config(tmp_path / "tty", max_steps=3, log_every=1), DATA40, model=SpyDiscrete())
    tr.fit(progress=True)
    assert "\r" in term.getvalue() and "train" in term.getvalue()  # the bar is there on a terminal


def test_config_lengths_must_match_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"seq_len: the config says 8 but train_data\['tokens'\] holds sequences of 16"):
        Trainer(config(tmp_path, seq_len=8), DATA40, model=SpyDiscrete())
    assert Trainer(config(tmp_path, seq_len=L), DATA40, model=SpyDiscrete()).config.seq_len == L


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_device_names_are_checked(tmp_path, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    with pytest.raises(ValueError, match="device"):
        Trainer(config(tmp_path, device=device), DATA40, model=SpyDiscrete())


@pytest.mark.parametrize("kw,match", [({"lr": 0.0}, "lr"), ({"log_every": 0}, "log_every"),
                                      ({"batch_size": 0}, "batch_size"), ({"warmup": -1}, "warmup"),
                                      ({"grad_clip": 0.0}, "grad_clip")])
def test_train_scorer_checks_its_arguments(tmp_path, kw, match):
    from fastdiff.data import default_tokenizer
    from fastdiff.training.auxiliary import train_scorer

    with pytest.raises(ValueError, match=match):
        train_scorer("causal_lm", None, pattern_tokens(8), pattern_tokens(4), out_dir=tmp_path / "s",
                     tokenizer=default_tokenizer(), steps=2, **kw)
    assert not (tmp_path / "s").exists()


def test_resume_refuses_other_data(tmp_path):
    _, a = _fit_run(tmp_path)
    fewer = {"tokens": pattern_tokens(32)}
    with pytest.raises(ValueError, match="trained on 40 sequences, this data has 32") as info:
        Trainer.resume(a, fewer, model=SpyDiscrete())
    assert "corrupted" not in str(info.value)
    other = {"tokens": pattern_tokens(40, seed=5)}  # as many sequences, other ones
    with pytest.raises(ValueError, match="differs from the data the run"):
        Trainer.resume(a, other, model=SpyDiscrete())
    assert Trainer.resume(a, {"tokens": pattern_tokens(40)}, model=SpyDiscrete()).global_step == 4


# --- keep_best ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema_decay", [0.0, 0.6])
def test_keep_best_holds_the_checkpoint_of_the_lowest_validation_loss(tmp_path, ema_decay, monkeypatch):
    from fastdiff.training import read_config
    from fastdiff.training.checkpoint import load_tensors

    cfg = config(tmp_path, max_steps=12, eval_every=2, keep_best=True, ckpt_every=2, keep_checkpoints=0,
                 ema_decay=ema_decay)
    data, valid = {"tokens": pattern_tokens()}, {"tokens": pattern_tokens(16, 3)}
    tr = Trainer(cfg, data, valid, model=_seeded(SpyDiscrete))
    real = tr.evaluate()
    assert real["valid_loss"] > 0  # the real validation runs; the scripted losses below go up and down
    scripted = iter([5.0, 3.0, 4.0, 2.5, 2.5, 2.7])
    seen = []

    def evaluate(weights="raw"):
        assert weights == ("ema" if ema_decay else "raw") or weights == "raw"
        if weights == "raw":
            seen.append(tr.global_step)
            return {"valid_loss": next(scripted)}
        return {"valid_ema_loss": [5.0, 3.0, 4.0, 2.5, 2.5, 2.7][len(seen) - 1]}

    monkeypatch.setattr(tr, "evaluate", evaluate)
    tr.fit(progress=False)
    assert seen == [2, 4, 6, 8, 10, 12]
    run = tmp_path / "run"
    assert read_config(run / "best")["step"] == 8  # the first of the equal minima
    assert tr.best == {"step": 8, "valid_loss": 2.5}
    # best/ holds that step's weights (raw and EMA), and pruning never touches it
    for name in ("model.safetensors",) + (("ema.safetensors",) if ema_decay else ()):
        a, b = load_tensors(run / "best" / name), load_tensors(run / "step_00000008" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a resume keeps the record, so a later evaluation must beat 2.5 to replace best/
    resumed = Trainer.resume(run, data, valid, model=SpyDiscrete())
    assert resumed.best == tr.best
    # the log holds the validation losses the choice was made on
    logged = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    key = "valid_ema_loss" if ema_decay else "valid_loss"
    assert [r[key] for r in logged if key in r] == [5.0, 3.0, 4.0, 2.5, 2.5, 2.7]


def test_evaluate_ema_weights_and_back(tmp_path):
    tr = Trainer(config(tmp_path, ema_decay=0.5), {"tokens": pattern_tokens()}, {"tokens": pattern_tokens(16, 3)},
                 model=_seeded(SpyDiscrete))
    for _ in range(3):
        tr.step()
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    ema = tr.evaluate("ema")
    raw = tr.evaluate()
    assert set(ema) == {k.replace("valid_", "valid_ema_") for k in raw} and ema["valid_ema_loss"] != raw["valid_loss"]
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    tr.ema.copy_to(tr.model)
    assert tr.evaluate()["valid_loss"] == ema["valid_ema_loss"]


def test_keep_best_needs_validation(tmp_path):
    with pytest.raises(ValueError, match="keep_best"):
        config(tmp_path, keep_best=True)
    with pytest.raises(TypeError, match="keep_best"):
        config(tmp_path, keep_best=1, eval_every=2)
