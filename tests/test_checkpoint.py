"""fastdiff.training checkpoints: round trips, clear errors, atomic writes, export, build_process."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch as st
import torch

from fastdiff import continuous, discrete, schedules
from fastdiff.training import (
    TrainConfig,
    Trainer,
    build_process,
    export_checkpoint,
    load_checkpoint,
    resolve_checkpoint_dir,
    save_checkpoint,
)

L = 12
WORDS = [f"w{i}" for i in range(70)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from fastdiff.data import TextTokenizer

    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, 70, 7)]
    return TextTokenizer.train(texts, vocab_size=48, kind="word", min_frequency=1)


@pytest.fixture(scope="module")
def other_tokenizer():
    from fastdiff.data import TextTokenizer

    return TextTokenizer.train([" ".join(f"v{i}" for i in range(60))], vocab_size=48, kind="word", min_frequency=1)


def _data(V: int, n: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V - 4, (n, 1), generator=g) + torch.arange(L)) % (V - 4) + 4


def _need_models() -> None:
    models = pytest.importorskip("fastdiff.models")
    if not hasattr(models, "build_model"):
        pytest.skip("fastdiff.models has no build_model yet")


def _trainer(tmp_path, tokenizer, family="discrete", task="attribute", dropout=0.0, **kw) -> Trainer:
    _need_models()
    model = {"width": 32, "layers": 1, "heads": 2, "dropout": dropout}
    if family == "continuous":
        model["embed_dim"] = 8
    cfg = TrainConfig(task=task, family=family, T=20, batch_size=8, max_steps=20, warmup_steps=1, lr=1e-3,
                      device="cpu", ckpt_every=0, out_dir=str(tmp_path / "run"), ema_decay=0.5, model=model,
                      label_names=["even", "odd"] if task == "attribute" else [], **kw)
    tokens = _data(tokenizer.vocab_size)
    data = {"tokens": tokens, "labels": tokens[:, 0] % 2} if task == "attribute" else {"tokens": tokens}
    return Trainer(cfg, data, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A discrete attribute run after 3 steps, saved: (trainer, path)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    tr = _trainer(tmp, tokenizer)
    for _ in range(3):
        tr.step()
    return tr, tr.save()


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


# --- build_process -------------------------------------------------------------------------------------
def test_build_process_matches_the_constructors():
    p = build_process({"family": "discrete", "kind": "absorbing", "schedule": "cosine", "T": 30, "vocab_size": 9,
                       "mask_id": 1})
    assert isinstance(p, discrete.Absorbing) and p.mask_id == 1 and p.vocab_size == 9
    assert torch.equal(p.schedule.alpha_bar, schedules.cosine(30).alpha_bar)
    u = build_process({"family": "discrete", "kind": "uniform", "schedule": "linear", "T": 200, "vocab_size": 5,
                       "schedule_kw": {"beta_end": 0.1}})
    assert isinstance(u, discrete.Uniform)
    assert torch.equal(u.schedule.alpha_bar, schedules.linear(200, beta_end=0.1).alpha_bar)
    g = build_process({"family": "continuous", "schedule": "sqrt", "T": 40, "parameterization": "eps"})
    assert isinstance(g, continuous.GaussianDiffusion) and g.parameterization == "eps"
    assert torch.equal(g.alpha_bar, schedules.sqrt(40).alpha_bar)
    fitted = [1.0, 0.9, 0.5, 0.1]
    a = build_process({"family": "continuous", "schedule": "adaptive", "T": 3, "alpha_bar": fitted})
    assert a.alpha_bar.tolist() == fitted and a.schedule.alpha_bar.tolist() == fitted
    assert build_process({"family": "none"}) is None


@pytest.mark.parametrize("cfg,match", [
    ({"family": "gaussian", "schedule": "sqrt", "T": 5}, "process.family"),
    ({"family": "continuous", "schedule": "nope", "T": 5}, "process.schedule"),
    ({"family": "continuous", "schedule": "sqrt", "T": 5, "colour": 1}, "unknown process keys"),
    ({"family": "discrete", "schedule": "sqrt", "T": 5}, "process.vocab_size"),
    ({"family": "continuous", "schedule": "sqrt", "T": 2, "alpha_bar": [1.0, 0.5]}, "process.alpha_bar"),
])
def test_build_process_errors(cfg, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_process(cfg)


# --- round trips ---------------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(saved, tokenizer):
    tr, path = saved
    raw = load_checkpoint(path, weights="raw")
    ema = load_checkpoint(path)  # default: the EMA weights
    for name, want in tr.model.state_dict().items():
        got = raw.model.state_dict()[name]
        assert got.dtype == want.dtype and torch.equal(got, want), name
    for name, want in tr.ema.state_dict(tr.model).items():
        assert torch.equal(ema.model.state_dict()[name], want), name
    assert not raw.model.training and not ema.model.training
    assert raw.step == 3 and raw.config["step"] == 3
    assert raw.config["train"] == tr.config.to_dict() and TrainConfig.from_dict(raw.config["train"]) == tr.config
    assert raw.config["model"] == tr.model.config_dict() and raw.config["arch"] == "sed"
    assert raw.config["train"]["label_names"] == ["even", "odd"] and raw.config["train"]["seq_len"] == L
    assert raw.tokenizer.fingerprint() == tokenizer.fingerprint()
    assert isinstance(raw.process, discrete.Absorbing)
    assert torch.equal(raw.process.schedule.alpha_bar, tr.process.schedule.alpha_bar)
    x = _data(tokenizer.vocab_size, 4)
    t = torch.tensor([1, 5, 10, 20])
    lab = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        tr.model.eval()
        assert torch.equal(raw.model(x, t, label=lab), tr.model(x, t, label=lab))


def test_continuous_round_trip_with_adaptive_schedule(tmp_path, tokenizer):
    tr = _trainer(tmp_path, tokenizer, family="continuous", task="lm", schedule="adaptive", refit_every=2,
                  schedule_kw={"base": "cosine"})
    for _ in range(6):
        tr.step()
    path = tr.save(tmp_path / "c")
    ck = load_checkpoint(path, weights="raw")
    assert isinstance(ck.process, continuous.GaussianDiffusion) and ck.config["model"]["kind"] == "continuous"
    assert torch.equal(ck.process.alpha_bar, tr.process.alpha_bar)  # the fitted schedule, not the base one
    for name, want in tr.model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[name], want), name
    assert torch.equal(ck.model.embedding_table(), tr.model.embedding_table())


def test_resume_of_a_built_model_is_bit_exact(tmp_path, tokenizer):
    # dropout: the model's own randomness must also be replayed (the step's seeded global RNG)
    a = _trainer(tmp_path / "a", tokenizer, timestep_sampler="loss-aware", dropout=0.3)
    ma = [a.step()["loss"] for _ in range(4)]
    b = _trainer(tmp_path / "b", tokenizer, timestep_sampler="loss-aware", dropout=0.3)
    mb = [b.step()["loss"] for _ in range(2)]
    b.save()
    tokens = b.train_data
    r = Trainer.resume(tmp_path / "b" / "run", tokens)  # run directory: follows `latest`
    mb += [r.step()["loss"] for _ in range(2)]
    assert ma == mb
    for (n, p), (_, q) in zip(a.model.named_parameters(), r.model.named_parameters()):
        assert torch.equal(p, q), n
    assert r.tokenizer.fingerprint() == tokenizer.fingerprint()


def test_latest_pointer(tmp_path, tokenizer):
    tr = _trainer(tmp_path, tokenizer)
    tr.step()
    first = tr.save()
    tr.step()
    second = tr.save()
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == second.name and first.name != second.name
    assert resolve_checkpoint_dir(run) == second and load_checkpoint(run).step == 2
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_scorer_checkpoint_without_a_process(tmp_path, saved):
    tr, _ = saved
    path = save_checkpoint(tmp_path / "s", tr.model, process={"family": "none"}, train={"kind": "x"})
    ck = load_checkpoint(path)
    assert ck.process is None and ck.tokenizer is None and ck.config["train"] == {"kind": "x"}


# --- errors --------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("file", ["model.safetensors", "ema.safetensors"])
def test_corrupted_safetensors(tmp_path, saved, file, damage):
    path = _copy(saved[1], tmp_path)
    target = path / file
    data = target.read_bytes()
    target.write_bytes(b"\x00\x01not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    weights = "raw" if file == "model.safetensors" else "ema"
    with pytest.raises(ValueError, match=f"corrupted checkpoint.*{file}"):
        load_checkpoint(path, weights=weights)


def test_corrupted_json(tmp_path, saved):
    path = _copy(saved[1], tmp_path)
    (path / "config.json").write_text('{"format": "fastdiff-checkpoint", "vers')
    with pytest.raises(ValueError, match="corrupted checkpoint.*config.json"):
        load_checkpoint(path)


def test_corrupted_resume_state(tmp_path, saved):
    path = _copy(saved[1], tmp_path)
    (path / "state.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="corrupted checkpoint.*state.json"):
        Trainer.resume(path, saved[0].train_data)


@pytest.mark.parametrize("key,value,match", [
    ("format", "pytorch-lightning", "not a fastdiff checkpoint"),
    ("version", 99, "version 99"),
])
def test_wrong_format_or_version(tmp_path, saved, key, value, match):
    path = _copy(saved[1], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)


def test_tokenizer_fingerprint_mismatch(tmp_path, saved, tokenizer, other_tokenizer):
    path = saved[1]
    with pytest.raises(ValueError, match=f"{other_tokenizer.fingerprint()}.*{tokenizer.fingerprint()}"):
        load_checkpoint(path, tokenizer=other_tokenizer)
    copy = _copy(path, tmp_path)
    other_tokenizer.save(copy / "tokenizer.json")  # the copy beside the weights swapped for another vocabulary
    with pytest.raises(ValueError, match="fingerprint mismatch.*tokenizer.json"):
        load_checkpoint(copy)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        Trainer.resume(path, saved[0].train_data, tokenizer=other_tokenizer)


def test_missing_and_unexpected_weights(tmp_path, saved):
    path = _copy(saved[1], tmp_path)
    tensors = st.load_file(str(path / "model.safetensors"))
    name = min(tensors)
    tensors["extra.weight"] = tensors.pop(name)
    st.save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"missing weights \['{name}'\].*unexpected weights \['extra.weight'\]"):
        load_checkpoint(path, weights="raw")


# --- atomic writes ---------------------------------------------------------------------------------------
def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, saved, monkeypatch):
    tr, _ = saved
    path = tmp_path / "ck"
    tr.save(path)
    before = {k: v.clone() for k, v in load_checkpoint(path, weights="raw").model.state_dict().items()}
    real = st.save_file
    calls = []

    def crash(tensors, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:  # model.safetensors written, then the crash
            raise OSError("disk full (simulated)")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", crash)
    with torch.no_grad():
        next(tr.model.parameters()).add_(1.0)
    try:
        with pytest.raises(OSError, match="simulated"):
            tr.save(path)
        calls.clear()
        with pytest.raises(OSError, match="simulated"):
            tr.save(tmp_path / "new")
    finally:
        with torch.no_grad():
            next(tr.model.parameters()).sub_(1.0)
    monkeypatch.undo()
    after = load_checkpoint(path, weights="raw").model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no half directory, no temporary left


def test_replacing_a_checkpoint(tmp_path, tokenizer):
    tr = _trainer(tmp_path, tokenizer)
    path = tr.save(tmp_path / "ck")
    tr.step()
    tr.save(path)
    assert load_checkpoint(path).step == 1 and sorted(os.listdir(tmp_path)) == ["ck"]


# --- export ----------------------------------------------------------------------------------------------
def _size(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def test_export_is_small_and_loadable(tmp_path, saved):
    tr, path = saved
    out = export_checkpoint(path, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert _size(out) < 0.3 * _size(path)  # no optimizer moments, no raw copy, half precision
    assert all(v.dtype == torch.float16 for v in st.load_file(str(out / "model.safetensors")).values()
               if v.is_floating_point())
    ck = load_checkpoint(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["export"] == {"dtype": "float16", "weights": "ema", "from_step": 3}
    for name, want in tr.ema.state_dict(tr.model).items():
        got = ck.model.state_dict()[name]
        assert got.dtype == torch.float32 and torch.equal(got, want.half().float()), name
    with pytest.raises(ValueError, match="cannot be resumed"):
        Trainer.resume(out, tr.train_data)
    raw = export_checkpoint(path, tmp_path / "raw", dtype=torch.bfloat16, weights="raw")
    first = next(iter(tr.model.state_dict()))
    assert torch.equal(load_checkpoint(raw).model.state_dict()[first],
                       tr.model.state_dict()[first].bfloat16().float())
