"""Every discrete process kind can be trained, checkpointed, resumed and sampled: D3PM's matrix processes
(GaussianBand, NearestNeighbor, Dense) through ``TrainConfig.kind`` / ``fastdiff train --kind``, their
parameters as JSON and their tensors (a NearestNeighbor's embeddings, a Dense Q) in the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from torch import nn

from fastdiff import cli, discrete
from fastdiff.training import TrainConfig, Trainer, build_process, export_checkpoint, load_checkpoint
from fastdiff.training import process as tp
from tests.test_training import SpyDiscrete, _assert_same, _last_batch, _snapshot, pattern_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

MATRIX_KINDS = ("gaussian_band", "nearest_neighbor", "dense")
L = 8


@pytest.fixture(scope="module")
def tokenizer():
    from fastdiff.data import TextTokenizer

    words = [f"w{i}" for i in range(30)]
    return TextTokenizer.train([" ".join(words[i:] + words[:i]) for i in range(0, 30, 3)], vocab_size=40,
                               kind="word", min_frequency=1)


def _q(V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(V, V, generator=g, dtype=torch.float64), -1)


def _process_kw(kind: str, V: int, tmp_path: Path, embeddings: bool = False) -> dict:
    if kind == "gaussian_band":
        return {"bandwidth": 3}
    if kind == "dense":
        st.save_file({"Q": _q(V)}, str(tmp_path / "q.safetensors"))
        return {"Q": str(tmp_path / "q.safetensors")}
    kw = {"k": 3, "rate": 2.0}
    if embeddings:  # a model without token_embedding: the graph of a file's embeddings
        st.save_file({"embeddings": torch.randn(V, 4, generator=torch.Generator().manual_seed(1))},
                     str(tmp_path / "emb.safetensors"))
        kw["embeddings"] = str(tmp_path / "emb.safetensors")
    return kw


def _data(V: int, n: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": (torch.randint(0, V - 4, (n, 1), generator=g) + torch.arange(L)) % (V - 4) + 4}


def _config(tmp_path, kind: str, V: int, name: str, **kw) -> TrainConfig:
    base = dict(kind=kind, process_kw=_process_kw(kind, V, tmp_path), T=10, batch_size=8, max_steps=6, warmup_steps=1,
                lr=1e-3, device="cpu", ckpt_every=0, log_every=1, ema_decay=0.5, timestep_sampler="loss-aware",
                model={"width": 16, "layers": 1, "heads": 2}, out_dir=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kind", MATRIX_KINDS)
def test_a_matrix_process_trains_saves_resumes_bit_exactly_and_generates(tmp_path, tokenizer, kind):
    from fastdiff.pipeline import TextDiffusion

    V = tokenizer.vocab_size
    data = _data(V)
    straight = Trainer(_config(tmp_path, kind, V, "a"), data, tokenizer=tokenizer)
    assert type(straight.process).__name__ == {"gaussian_band": "GaussianBand", "nearest_neighbor": "NearestNeighbor",
                                               "dense": "Dense"}[kind]
    losses_a = [straight.step() for _ in range(6)]
    part = Trainer(_config(tmp_path, kind, V, "b"), data, tokenizer=tokenizer)
    losses_b = [part.step() for _ in range(3)]
    saved = part.save()
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["process"]["kind"] == kind
    has_tensors = kind != "gaussian_band"
    assert (saved / "process.safetensors").is_file() == has_tensors
    assert ("process.safetensors" in cfg["files"]) == has_tensors  # checksummed like the other files
    if kind == "dense":  # the copy is the checkpoint's: the source file may go away
        Path(part.config.process_kw["Q"]).unlink()
    resumed = Trainer.resume(saved, data)
    assert resumed.global_step == 3
    losses_b += [resumed.step() for _ in range(3)]
    drop = ("time_s",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in losses_a] == \
        [{k: v for k, v in m.items() if k not in drop} for m in losses_b]
    _assert_same(_snapshot(straight), _snapshot(resumed))
    # the loaded process is the trained one
    ck = load_checkpoint(saved)
    assert type(ck.process) is type(straight.process) and ck.process.vocab_size == V
    for t in (1, 4, 10):
        assert torch.equal(ck.process.qbar(t), straight.process.qbar(t))
    assert torch.equal(ck.process.transition(3, 7), straight.process.transition(3, 7))
    # and it generates
    td = TextDiffusion.load(saved)
    a, b = td.generate(3, length=L, steps=5, seed=4), td.generate(3, length=L, steps=5, seed=4)
    assert a.tokens.shape == (3, L) and torch.equal(a.tokens, b.tokens)
    assert int(a.tokens.min()) >= 0 and int(a.tokens.max()) < V and all(isinstance(s, str) for s in a.texts)


@pytest.mark.parametrize("kind", MATRIX_KINDS)
def test_the_loss_of_a_matrix_process_is_the_d3pm_hybrid_loss(tmp_path, kind):
    V = 64  # SpyDiscrete's
    model = SpyDiscrete()
    kw = _process_kw(kind, V, tmp_path, embeddings=True)
    cfg = TrainConfig(kind=kind, process_kw=kw, T=10, hybrid_lambda=0.05, batch_size=8, max_steps=4, warmup_steps=1,
                      lr=1e-3, device="cpu", ckpt_every=0, out_dir=str(tmp_path / "run"))
    tr = Trainer(cfg, {"tokens": pattern_tokens()}, model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = tr.step()
    call = model.calls[-1]
    x0 = _last_batch(tr)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
        logits = model(call["x_t"], call["t"])
    process = build_process(tr.process_config, tr.process_tensors)
    want = discrete.hybrid_loss(process, x0, call["x_t"], call["t"], logits, lam=0.05)
    assert m["loss"] == pytest.approx(float(want), rel=1e-5)
    # the dense KL terms: kl_terms against the process's own posteriors, not a closed form
    vlb = discrete.vlb_terms(process, x0, call["x_t"], call["t"], logits)
    ce = discrete.x0_nll(process, x0, logits)
    assert m["hybrid"] == pytest.approx(float((vlb + 0.05 * ce).mean()), rel=1e-5)
    assert m["ce"] == pytest.approx(float(ce.mean()), rel=1e-5)


def test_process_tensors_are_verified_and_exported_exactly(tmp_path, tokenizer):
    V = tokenizer.vocab_size
    tr = Trainer(_config(tmp_path, "nearest_neighbor", V, "run"), _data(V), tokenizer=tokenizer)
    tr.step()
    path = tr.save()
    emb = st.load_file(str(path / "process.safetensors"))["embeddings"]
    assert emb.dtype == torch.float64 and torch.equal(emb, tr.process_tensors["embeddings"])
    assert torch.equal(emb, tr.model.token_embedding.weight.detach().double()) is False  # the initial ones, kept
    out = export_checkpoint(path, tmp_path / "export")
    assert (out / "process.safetensors").read_bytes() == (path / "process.safetensors").read_bytes()
    assert torch.equal(load_checkpoint(out).process.qbar(10), tr.process.qbar(10))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in path.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    data = bytearray((damaged / "process.safetensors").read_bytes())
    data[-3] ^= 0x10
    (damaged / "process.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted checkpoint.*process.safetensors"):
        load_checkpoint(damaged)
    with pytest.raises(ValueError, match="corrupted checkpoint.*process.safetensors"):
        Trainer.resume(damaged, _data(V), out_dir=str(tmp_path / "r"))


def test_nearest_neighbor_graph_of_the_initial_model_embeddings(tmp_path, tokenizer):
    V = tokenizer.vocab_size
    tr = Trainer(_config(tmp_path, "nearest_neighbor", V, "run"), _data(V), tokenizer=tokenizer)
    start = tr.model.token_embedding.weight.detach().double().clone()
    assert torch.equal(tr.process_tensors["embeddings"], start)
    want = discrete.NearestNeighbor(start, tr.process.schedule, k=3, rate=2.0)
    assert torch.equal(want.qbar(5), tr.process.qbar(5))


class _Wide(nn.Module):
    arch = "spy"

    def __init__(self, V: int):
        super().__init__()
        self.V, self.lin = V, nn.Linear(1, 1)

    def config_dict(self):
        return {"vocab_size": self.V}


@pytest.mark.parametrize("kw,err,match", [
    ({"kind": "dense", "process_kw": {"bandwidth": 2}}, ValueError, "process_kw: unknown parameters"),
    ({"kind": "gaussian_band", "process_kw": {"k": 2}}, ValueError, "process_kw"),
    ({"kind": "gaussian_band", "schedule": "adaptive"}, ValueError, "schedule: 'adaptive'"),
    ({"kind": "uniform", "schedule": "spindle"}, ValueError, "schedule: 'spindle'"),
    ({"kind": "nearest_neighbor", "process_kw": []}, TypeError, "process_kw"),
])
def test_config_errors_name_the_field(kw, err, match):
    with pytest.raises(err, match=match):
        TrainConfig(**kw)


def test_training_errors_name_the_field(tmp_path):
    data = {"tokens": pattern_tokens()}
    base = dict(T=10, device="cpu", out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="process_kw.Q: .*safetensors"):
        Trainer(TrainConfig(kind="dense", **base), data, model=SpyDiscrete())
    with pytest.raises(FileNotFoundError, match="process_kw.Q"):
        Trainer(TrainConfig(kind="dense", process_kw={"Q": str(tmp_path / "none.safetensors")}, **base), data,
                model=SpyDiscrete())
    st.save_file({"Q": _q(5)}, str(tmp_path / "q5.safetensors"))
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(TrainConfig(kind="dense", process_kw={"Q": str(tmp_path / "q5.safetensors")}, **base), data,
                model=SpyDiscrete())
    with pytest.raises(ValueError, match="process_kw.embeddings: 'model'"):
        Trainer(TrainConfig(kind="nearest_neighbor", **base), data, model=SpyDiscrete())  # no token_embedding
    big = dict(base, T=1000)
    with pytest.raises(ValueError, match=r"kind: a gaussian_band process .* GiB"):
        Trainer(TrainConfig(kind="gaussian_band", **big), {"tokens": torch.zeros(4, 3, dtype=torch.long)},
                model=_Wide(4096))
    cfg = tp.process_config("discrete", schedule="cosine", T=10, vocab_size=64, kind="nearest_neighbor",
                            tensors=["embeddings"])
    with pytest.raises(ValueError, match="process.tensors"):
        build_process(cfg)
    with pytest.raises(ValueError, match="process.tensors"):
        build_process(dict(cfg, tensors=[]), {"embeddings": torch.randn(64, 3)})


def test_a_registered_kind_trains_and_loads_without_changes_elsewhere(tmp_path, tokenizer):
    """A new process needs its class and one registration: the trainer, checkpoints, the CLI's --kind and
    loading find it by name."""
    from fastdiff.pipeline import TextDiffusion

    kind = tp.Kind("lazy_uniform", lambda schedule, V, mask_id, params, tensors: discrete.Dense(
        torch.full((V, V), params["stay"] / V, dtype=torch.float64) + (1 - params["stay"]) * torch.eye(V), schedule.T),
        params={"stay": 0.5}, matrix=True)
    tp.register_kind(kind)
    try:
        V = tokenizer.vocab_size
        cfg = TrainConfig(kind="lazy_uniform", process_kw={"stay": 0.25}, T=6, batch_size=8, max_steps=2,
                          warmup_steps=1, device="cpu", ckpt_every=0, out_dir=str(tmp_path / "run"),
                          model={"width": 16, "layers": 1, "heads": 2})
        tr = Trainer(cfg, _data(V), tokenizer=tokenizer)
        tr.fit(progress=False)
        ck = load_checkpoint(tmp_path / "run")
        assert torch.equal(ck.process.Q, tr.process.Q)
        assert TextDiffusion.load(tmp_path / "run").generate(2, length=L, steps=3).tokens.shape == (2, L)
    finally:
        tp._REGISTRY.pop("lazy_uniform")


# --- the command line ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from tests.conftest import tiny_corpus

    words = [f"w{i}" for i in range(20)]
    return tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", seed=3, words=words, lines=40,
                       words_per_line=16)


@pytest.mark.parametrize("kind", MATRIX_KINDS)
def test_fastdiff_train_kind(tmp_path, corpus, tokenizer, kind, capsys):
    tok_file = tmp_path / "tokenizer.json"
    tokenizer.save(tok_file)
    run = tmp_path / "run"
    kw = _process_kw(kind, tokenizer.vocab_size, tmp_path)
    args = ["train", "--data", str(corpus), "--tokenizer", str(tok_file), "--kind", kind, "--T", "10",
            "--seq-len", "8", "--batch-size", "4", "--width", "16", "--layers", "1", "--heads", "2",
            "--steps", "3", "--ckpt-every", "2", "--log-every", "1", "--device", "cpu", "--no-progress",
            "--threads", "1", "--out", str(run), "--set", f"process_kw={json.dumps(kw)}"]
    assert cli.main(args) == 0
    assert json.loads((run / "train_config.json").read_text())["kind"] == kind
    assert cli.main(["train", "--resume", str(run), "--data", str(corpus), "--steps", "4", "--no-progress",
                     "--threads", "1"]) == 0
    assert [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    out = tmp_path / "samples.jsonl"
    assert cli.main(["generate", "-c", str(run), "-n", "2", "--length", "8", "--steps", "4", "--no-progress",
                     "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
