"""fastdiff.evaluation.model_fit and what ``fastdiff eval`` reports with it: the x0 cross-entropy and accuracy at
corrupted positions against the corpus unigram, the NELBO bound, and the warning for a model that ignores its
context. Oracles: a context-free model (its exact NELBO is its cross-entropy on the data, because absorbing
diffusion's VLB terms sum to the x0 NLL when the prediction does not depend on x_t), and a model that knows the
data (cross-entropy ~0, accuracy 1)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastdiff import continuous, discrete, evaluation, schedules
from fastdiff.cli import main
from fastdiff.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 12, 1


class ContextFree(nn.Module):
    """x0 logits = the same log-probabilities at every position, whatever x_t and t."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = nn.Parameter(logp.float(), requires_grad=False)

    def forward(self, x_t, t, **cond):
        return self.logp.expand(*x_t.shape, -1).clone()


class Knows(nn.Module):
    """x0 logits that put (almost) all mass on the one sequence of the data set."""

    def __init__(self, seq: torch.Tensor):
        super().__init__()
        self.register_buffer("seq", seq)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, **cond):
        logits = torch.full((*x_t.shape, V), -30.0)
        return logits.scatter(-1, self.seq.expand(x_t.shape[0], -1)[..., None], 30.0)


def data(rows: int = 64, L: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.0, 0.0] + [2.0 ** -k for k in range(V - 2)])
    return torch.multinomial(probs / probs.sum(), rows * L, replacement=True, generator=g).view(rows, L)


def test_a_context_free_model_is_flagged_and_its_nelbo_is_its_cross_entropy() -> None:
    proc = discrete.Absorbing(V, mask_id=MASK, schedule=schedules.mutual_info(200))
    x0 = data()
    uni = evaluation.unigram_log_probs(x0, V, exclude=(0, MASK))
    fit = evaluation.model_fit(ContextFree(uni), proc, x0, unigram=uni, nelbo_samples=16, batch_size=16)
    assert fit["no_better_than_unigram"] is True
    for rate, r in fit["rates"].items():
        assert r["positions"] > 0 and abs(r["ce"] - r["unigram_ce"]) < 1e-5, (rate, r)
    exact = float(-uni[x0].mean())  # sum over t of the absorbing VLB terms of a context-free model
    assert abs(fit["nelbo"] - exact) < 0.03 * exact, (fit["nelbo"], exact)
    assert fit["ppl_bound"] == pytest.approx(torch.tensor(fit["nelbo"]).exp().item())
    # rate 1.0 masks everything (alpha_bar(T) = 0); rate 0.5 about half
    assert fit["rates"][1.0]["positions"] == x0.numel()
    assert 0.4 < fit["rates"][0.5]["positions"] / x0.numel() < 0.6


def test_a_model_that_knows_the_data_is_not_flagged() -> None:
    proc = discrete.Absorbing(V, mask_id=MASK, schedule=schedules.mutual_info(100))
    seq = data(1)[0]
    x0 = seq.expand(32, -1).clone()
    uni = evaluation.unigram_log_probs(data(), V, exclude=(0, MASK))
    fit = evaluation.model_fit(Knows(seq), proc, x0, unigram=uni, nelbo_samples=4)
    assert fit["no_better_than_unigram"] is False
    for r in fit["rates"].values():
        assert r["ce"] < 1e-6 and r["accuracy"] == 1.0 and r["unigram_ce"] > 1.0
    assert 0 <= fit["nelbo"] < 1e-6


def test_uniform_process_positions_are_the_changed_ones() -> None:
    proc = discrete.Uniform(V, schedule=schedules.cosine(100))
    x0 = data()
    uni = evaluation.unigram_log_probs(x0, V, exclude=(0, MASK))
    fit = evaluation.model_fit(ContextFree(uni), proc, x0, unigram=uni, rates=(0.5,), nelbo_samples=2)
    r = fit["rates"][0.5]
    # a uniform kernel changes a token with probability (1 - alpha_bar)(1 - 1/V)
    assert 0.35 < r["positions"] / x0.numel() < 0.55
    assert abs(r["ce"] - r["unigram_ce"]) < 1e-5 and fit["nelbo"] > 0


def test_continuous_model_gets_figures_but_no_verdict() -> None:
    D = 6
    g = torch.Generator().manual_seed(3)
    table = torch.randn(V, D, generator=g) * 3

    class Oracle(nn.Module):  # x0 parameterisation: returns the clean embeddings it was handed in cond
        def __init__(self):
            super().__init__()
            self.embedding = lambda x: table[x]
            self.dummy = nn.Parameter(torch.zeros(()))
            self.x0 = None

        def forward(self, x_t, t, **cond):
            return self.x0

    proc = continuous.GaussianDiffusion(schedules.sqrt(100))
    x0 = data(8)
    m = Oracle()
    m.x0 = table[x0]
    fit = evaluation.model_fit(m, proc, x0, unigram=evaluation.unigram_log_probs(x0, V), embedding_table=table,
                               batch_size=8)
    assert fit["family"] == "continuous" and "no_better_than_unigram" not in fit and "nelbo" not in fit
    for r in fit["rates"].values():
        assert r["accuracy"] == 1.0 and r["positions"] == x0.numel()
    with pytest.raises(ValueError, match="embedding_table"):
        evaluation.model_fit(m, proc, x0)


def test_bad_arguments() -> None:
    proc = discrete.Absorbing(V, mask_id=MASK, schedule=schedules.mutual_info(10))
    m = ContextFree(torch.zeros(V))
    with pytest.raises(ValueError, match="tokens"):
        evaluation.model_fit(m, proc, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        evaluation.model_fit(m, proc, data(2), batch_size=0)


def test_eval_warns_about_a_model_that_ignores_its_context(capsys, tmp_path) -> None:
    """An untrained model is no better than the unigram: `fastdiff eval` says so (stderr), and writes the
    figures to its JSON."""
    from fastdiff.data import default_tokenizer, lm_chunks, python_docs

    tok = default_tokenizer()
    train = lm_chunks(python_docs(), tok, 16, "train")[:64]
    cfg = TrainConfig(family="discrete", task="lm", seq_len=16, batch_size=4, max_steps=1, lr=1e-6, ema_decay=0.0,
                      model={"width": 16, "layers": 1, "heads": 2}, out_dir=str(tmp_path / "run"), log_every=1)
    Trainer(cfg, {"tokens": train}, tokenizer=tok).fit(progress=False)
    out = tmp_path / "fit.json"
    code = main(["eval", "-c", str(tmp_path / "run"), "--samples", "2", "--steps", "2", "--lm", "none",
                 "--fit-rows", "16", "--json", str(out), "--no-progress"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "NELBO" in text and "unigram" in text and "no better than the corpus unigram" in err
    fit = json.loads(out.read_text())["fit"]
    assert fit["rows"] == 16 and fit["no_better_than_unigram"] is True and fit["ppl_bound"] > 100
    code = main(["eval", "-c", str(tmp_path / "run"), "--samples", "2", "--steps", "2", "--lm", "none",
                 "--fit-rows", "0", "--no-progress"])
    text, err = capsys.readouterr()
    assert code == 0 and "NELBO" not in text and "unigram" not in err


def test_generate_caches_network_calls_of_a_step_free_model(tmp_path, capsys) -> None:
    """An absorbing run builds a step-free model (no time input); generate() then turns MDLM's cache on by
    itself: the same tokens with fewer network calls. A model with a step input keeps every call."""
    from fastdiff.data import default_tokenizer, lm_chunks, python_docs
    from fastdiff.pipeline import TextDiffusion

    tok = default_tokenizer()
    train = lm_chunks(python_docs(), tok, 16, "train")[:64]
    for name, model in (("free", {}), ("timed", {"time_conditioning": "adaln"})):
        cfg = TrainConfig(family="discrete", task="lm", seq_len=16, batch_size=4, max_steps=2, lr=1e-3,
                          ema_decay=0.0, model={"width": 16, "layers": 1, "heads": 2, **model},
                          out_dir=str(tmp_path / name), log_every=1)
        Trainer(cfg, {"tokens": train}, tokenizer=tok).fit(progress=False)
    free, timed = TextDiffusion.load(tmp_path / "free"), TextDiffusion.load(tmp_path / "timed")
    assert free.auto_cache("ancestral") and not free.auto_cache("confidence") and not timed.auto_cache("ancestral")
    a = free.generate(3, steps=200, seed=5)
    b = free.generate(3, steps=200, seed=5, cache=False)
    assert a.texts == b.texts and torch.equal(a.tokens, b.tokens)
    assert b.stats["network_calls"] == 200 and a.stats["network_calls"] <= 3 * 16 + 1
    assert timed.generate(2, steps=50, seed=5).stats["network_calls"] == 50
    code = main(["generate", "-c", str(tmp_path / "free"), "-n", "2", "--steps", "100", "--no-cache",
                 "--no-progress"])
    assert code == 0 and "(100 network calls)" in capsys.readouterr().out


def test_a_process_without_a_schedule_gets_its_rates_from_its_matrices() -> None:
    """A Dense process (user matrices, no schedule): the rate is P(x_t != x_0) under Qbar_t."""
    T = 6
    beta = torch.linspace(0.05, 0.6, T, dtype=torch.float64)
    Q = torch.stack([(1 - b) * torch.eye(V, dtype=torch.float64) + b / V for b in beta])
    proc = discrete.Dense(Q)
    x0 = data()
    uni = evaluation.unigram_log_probs(x0, V, exclude=(0, MASK))
    fit = evaluation.model_fit(ContextFree(uni), proc, x0, unigram=uni, rates=(0.15, 0.9), nelbo_samples=2)
    qbar = torch.eye(V, dtype=torch.float64)
    changed = []
    for t in range(T):
        qbar = qbar @ Q[t]
        changed.append(1 - qbar.diagonal().mean().item())
    for rate, r in fit["rates"].items():
        expect = 1 + min(range(T), key=lambda i: abs(changed[i] - rate))
        assert r["t"] == expect and abs(r["ce"] - r["unigram_ce"]) < 1e-5


def test_a_checkpoints_sampling_defaults_apply_where_the_caller_sets_nothing(tmp_path, capsys) -> None:
    """config.json's "generation" (like generation_config.json): generate() and the CLI use it for what the
    caller leaves unset, say so in the header and stats, and refuse a malformed one naming config.json."""
    from fastdiff.data import default_tokenizer, lm_chunks, python_docs
    from fastdiff.pipeline import TextDiffusion
    from fastdiff.training import export_checkpoint

    tok = default_tokenizer()
    train = lm_chunks(python_docs(), tok, 16, "train")[:64]
    cfg = TrainConfig(family="discrete", task="lm", seq_len=16, batch_size=4, max_steps=2, lr=1e-3, ema_decay=0.0,
                      model={"width": 16, "layers": 1, "heads": 2}, out_dir=str(tmp_path / "run"), log_every=1)
    Trainer(cfg, {"tokens": train}, tokenizer=tok).fit(progress=False)
    export_checkpoint(tmp_path / "run", tmp_path / "exp", generation={"temperature": 0.5, "steps": 12})
    td, plain = TextDiffusion.load(tmp_path / "exp"), TextDiffusion.load(tmp_path / "run")
    assert td.generation_defaults == {"temperature": 0.5, "steps": 12} and plain.generation_defaults == {}
    a = td.generate(2, seed=3)
    assert a.stats["temperature"] == 0.5 and a.stats["steps_per_sample"] == 12
    assert torch.equal(a.tokens, td.generate(2, seed=3, temperature=0.5, steps=12).tokens)
    assert td.generate(2, seed=3, temperature=1.0).stats["temperature"] == 1.0  # the caller's value wins
    assert plain.generate(2, seed=3).stats["temperature"] == 1.0
    assert main(["generate", "-c", str(tmp_path / "exp"), "-n", "1", "--no-progress"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "12 steps" in head and "temperature 0.5" in head and "recommended by the checkpoint: steps 12, temperature 0.5" in head
    for bad, err in (({"temperature": 0}, ValueError), ({"tau": 1}, ValueError), ({"steps": 2.5}, ValueError),
                     ([1], TypeError)):
        with pytest.raises(err, match="generation"):
            export_checkpoint(tmp_path / "run", tmp_path / "bad", generation=bad)
    cfg_file = tmp_path / "exp" / "config.json"
    d = json.loads(cfg_file.read_text())
    d["generation"] = {"temperature": -1}
    from fastdiff.training.checkpoint import _finish_config

    files = d.pop("files")
    d.pop("checksum", None)
    cfg_file.write_text(json.dumps(_finish_config(d, files)))
    with pytest.raises(ValueError, match="config.json: generation: temperature"):
        TextDiffusion.load(tmp_path / "exp")
