"""fastdiff.training checkpoints: round trips, clear errors, atomic writes, export, build_process."""

from __future__ import annotations

import json
import os
import shutil

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
    ({"family": "continuous", "schedule": "sqrt", "T": 5, "schedule_kw": {"colour": 1}}, "process.schedule_kw"),
])
def test_build_process_errors(cfg, match):
    from fastdiff.errors import FastdiffError

    with pytest.raises((ValueError, TypeError), match=match) as info:
        build_process(cfg)
    assert isinstance(info.value, FastdiffError)  # the CLI's one-line error, not a traceback


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


def _unsign(path):
    """Make ``path`` a checkpoint as written before config.json recorded checksums (files may be edited)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("files"), cfg.pop("checksum")
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_and_unexpected_weights(tmp_path, saved):
    path = _copy(saved[1], tmp_path)
    _unsign(path)
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
    calls = []

    def crashing(real):
        def crash(tensors, *a, **k):
            calls.append(1)
            if len(calls) == 2:  # model.safetensors written, then the crash
                raise OSError("disk full (simulated)")
            return real(tensors, *a, **k)
        return crash

    monkeypatch.setattr(st, "save", crashing(st.save))  # whichever of the two a save uses
    monkeypatch.setattr(st, "save_file", crashing(st.save_file))
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


# --- integrity: checksums, finite weights, names that stay inside ---------------------------------------
def _flip(file, offset=-50):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def test_every_file_is_recorded_with_its_sha256(saved):
    import hashlib

    path = saved[1]
    cfg = json.loads((path / "config.json").read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "config.json")
    assert sorted(cfg["files"]) == on_disk
    for name, entry in cfg["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@pytest.mark.parametrize("file,readers", [
    ("model.safetensors", ("raw", "resume")), ("ema.safetensors", ("ema", "resume")),
    ("tokenizer.json", ("raw", "ema", "resume")), ("state.safetensors", ("resume",)), ("state.json", ("resume",)),
    ("config.json", ("raw", "ema", "resume")),
])
def test_a_flipped_bit_is_refused_naming_the_file(tmp_path, saved, file, readers):
    path = _copy(saved[1], tmp_path)
    # the last bytes: tensor data (not the header) of a safetensors file, the tail of a JSON file
    _flip(path / file, -3 if file.endswith(".json") else -50)
    for reader in readers:
        with pytest.raises(ValueError, match=f"corrupted checkpoint.*{file}"):
            if reader == "resume":
                Trainer.resume(path, saved[0].train_data, out_dir=str(tmp_path / "elsewhere"))
            else:
                load_checkpoint(path, weights=reader)
    assert not (tmp_path / "elsewhere").exists()


def test_checkpoints_without_checksums_still_load(tmp_path, saved):
    from fastdiff.pipeline import bundled_path

    path = _copy(saved[1], tmp_path)
    _unsign(path)
    assert load_checkpoint(path).step == 3
    assert Trainer.resume(path, saved[0].train_data, out_dir=str(tmp_path / "r")).global_step == 3
    # three of the bundled models were shipped before checksums existed; the discrete one carries them
    legacy = []
    for name in ("discrete", "continuous", "causal_lm", "classifier"):
        d = bundled_path(name)
        if "files" not in json.loads((d / "config.json").read_text()):
            legacy.append(name)
        load_checkpoint(d)
    assert legacy == ["continuous", "causal_lm", "classifier"]


def test_an_export_records_its_own_checksums(tmp_path, saved):
    out = export_checkpoint(saved[1], tmp_path / "small")
    cfg = json.loads((out / "config.json").read_text())
    assert sorted(cfg["files"]) == ["model.safetensors", "tokenizer.json"]
    _flip(out / "model.safetensors")
    with pytest.raises(ValueError, match="corrupted checkpoint.*model.safetensors"):
        load_checkpoint(out)


def _write_nan(path, file="model.safetensors"):
    tensors = st.load_file(str(path / file))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    st.save_file(tensors, str(path / file))
    return name


@pytest.mark.parametrize("file,weights", [("model.safetensors", "raw"), ("ema.safetensors", "ema")])
def test_non_finite_weights_are_refused_at_load(tmp_path, saved, file, weights):
    path = _copy(saved[1], tmp_path)
    _unsign(path)  # a checkpoint without checksums: only the finite check can catch it
    name = _write_nan(path, file)
    with pytest.raises(ValueError, match=rf"{file}.*{name}.*non-finite"):
        load_checkpoint(path, weights=weights)
    with pytest.raises(ValueError, match=rf"{file}.*{name}.*non-finite"):
        Trainer.resume(path, saved[0].train_data, out_dir=str(tmp_path / "r"))


def test_non_finite_weights_are_refused_at_save(tmp_path, saved):
    tr, _ = saved
    p = next(tr.model.parameters())
    keep = p.detach().clone()
    with torch.no_grad():
        p.view(-1)[0] = float("inf")
    try:
        with pytest.raises(ValueError, match="model: tensor .* non-finite"):
            save_checkpoint(tmp_path / "bad", tr.model, process=tr._process_for_saving())
    finally:
        with torch.no_grad():
            p.copy_(keep)
    assert not (tmp_path / "bad").exists()


def test_latest_may_only_name_a_sub_directory(tmp_path, saved):
    run = tmp_path / "run"
    run.mkdir()
    outside = _copy(saved[1], tmp_path)  # a complete checkpoint next to the run, not in it
    for name in ["../copy", str(outside), "a/../../copy", ".."]:
        (run / "latest").write_text(name + "\n")
        with pytest.raises(ValueError, match="latest names"):
            resolve_checkpoint_dir(run)
        with pytest.raises(ValueError, match="latest names"):
            load_checkpoint(run)


@pytest.mark.parametrize("value", ["../tokenizer.json", "/etc/hostname", "sub/tokenizer.json"])
def test_the_tokenizer_file_must_lie_in_the_checkpoint(tmp_path, saved, value):
    path = _copy(saved[1], tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    cfg["tokenizer"]["file"] = value
    cfg.pop("checksum")  # a deliberate edit: the names are still checked
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer.file"):
        load_checkpoint(path)


@pytest.mark.parametrize("key,value", [("train", "x"), ("tokenizer", "x"), ("model", 3), ("process", []),
                                       ("step", -1), ("step", True), ("files", {"../x": {}}), ("arch", "")])
def test_config_entries_of_the_wrong_type_are_refused(tmp_path, saved, key, value):
    path = _copy(saved[1], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"corrupted checkpoint.*config.json.*{key}"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=f"corrupted checkpoint.*config.json.*{key}"):
        Trainer.resume(path, saved[0].train_data, out_dir=str(tmp_path / "r"))


def test_an_edited_config_is_refused_unless_its_checksum_is_removed(tmp_path, saved):
    path = _copy(saved[1], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json does not match its recorded checksum"):
        load_checkpoint(path)
    cfg.pop("checksum")
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(path).config["model"]["dropout"] == 0.5


# --- finding the newest complete checkpoint ------------------------------------------------------------
def _run_with_steps(tmp_path, tokenizer, steps=(1, 2, 3)):
    tr = _trainer(tmp_path, tokenizer, keep_checkpoints=0)
    for _ in range(max(steps)):
        tr.step()
        if tr.global_step in steps:
            tr.save()
    return tr, tmp_path / "run"


def test_a_run_without_latest_resumes_its_newest_complete_checkpoint(tmp_path, tokenizer):
    tr, run = _run_with_steps(tmp_path, tokenizer)
    (run / "latest").unlink()
    newest = run / "step_00000003"
    shutil.copytree(newest, run / "step_00000004")  # damaged: a bit flipped in its weights
    _flip(run / "step_00000004" / "model.safetensors")
    (run / "step_00000005").mkdir()  # incomplete: no config.json
    (run / "step_00000005" / "model.safetensors").write_bytes(b"partial")
    shutil.copytree(newest, run / "step_00000009.tmp-1")  # a temporary directory is never a candidate
    with pytest.warns(UserWarning, match="step_00000004"):
        assert resolve_checkpoint_dir(run) == newest
    with pytest.warns(UserWarning):
        r = Trainer.resume(run, tr.train_data)
    assert r.global_step == 3
    shutil.rmtree(run / "step_00000004")
    (run / "latest").write_text("step_00000007\n")  # names nothing: the newest complete one again
    with pytest.warns(UserWarning, match="latest names 'step_00000007'"):
        assert load_checkpoint(run).step == 3


# --- atomic replacement ----------------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False])
def test_a_re_save_keeps_latest_complete_at_every_instant(tmp_path, tokenizer, monkeypatch, exchange):
    """Between any two file-system operations of a re-save of the checkpoint ``latest`` names, the run
    directory (and so generate, load and resume) resolves to a complete checkpoint."""
    from fastdiff.training import checkpoint as ckpt

    tr, run = _run_with_steps(tmp_path, tokenizer, steps=(2,))
    before = resolve_checkpoint_dir(run)
    checks = []

    def check(what):
        d = resolve_checkpoint_dir(run)
        assert (d / "config.json").is_file(), what
        assert load_checkpoint(run).step == 2, what
        checks.append(what)

    real_replace, real_exchange = os.replace, getattr(ckpt, "_exchange", None)

    def replace(a, b):
        real_replace(a, b)
        check(f"replace {a} -> {b}")

    monkeypatch.setattr(os, "replace", replace)
    if exchange:
        def swap(a, b):
            ok = real_exchange(a, b)
            check(f"exchange {a} {b}")
            return ok

        monkeypatch.setattr(ckpt, "_exchange", swap, raising=False)
    else:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False, raising=False)
    with torch.no_grad():
        next(tr.model.parameters()).add_(1.0)  # the re-save writes other weights
    tr.save()
    monkeypatch.undo()
    assert checks and resolve_checkpoint_dir(run) == before
    assert torch.equal(load_checkpoint(run, weights="raw").model.state_dict()[next(iter(tr.model.state_dict()))],
                       next(iter(tr.model.state_dict().values())))
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step_00000002"]


def test_a_checkpoint_replaces_only_an_empty_or_checkpoint_directory(tmp_path, saved):
    tr, path = saved
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a checkpoint"):
        tr.save(precious)
    with pytest.raises(ValueError, match="not a checkpoint"):
        export_checkpoint(path, precious)
    assert (precious / "notes.txt").read_text() == "keep me" and sorted(os.listdir(precious)) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert load_checkpoint(tr.save(tmp_path / "empty")).step == 3
    assert load_checkpoint(export_checkpoint(path, tmp_path / "empty")).step == 3  # a checkpoint: replaced


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path, tokenizer):
    tr, run = _run_with_steps(tmp_path, tokenizer, steps=(1,))
    dead = _dead_pid()
    stale = [run / f"step_00000002.tmp-{dead}", run / f"step_00000001.old-{dead}", run / f"latest.tmp-{dead}",
             run / f"step_00000003.tmp-{dead}"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    shutil.copytree(run / "step_00000001", stale[1])
    stale[2].write_text("step_00000002\n")
    stale[3].mkdir()  # killed right after creating it
    kept = [run / f"notes.tmp-{dead}", run / f"step_00000004.tmp-{os.getpid()}"]  # not ours / a live process's
    kept[0].mkdir()
    (kept[0] / "mine.txt").write_text("x")
    kept[1].mkdir()
    tr.step()
    tr.save()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert resolve_checkpoint_dir(run).name == "step_00000002"


def test_an_export_never_replaces_its_own_source(tmp_path, saved):
    path = _copy(saved[1], tmp_path)
    before = sorted(os.listdir(path))
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_checkpoint(path, path)
    assert sorted(os.listdir(path)) == before and "state.json" in before


def test_verify_checkpoint_checks_every_file(tmp_path, saved):
    from fastdiff.training import verify_checkpoint

    path = _copy(saved[1], tmp_path)
    assert verify_checkpoint(path)["step"] == 3
    _flip(path / "state.safetensors")
    with pytest.raises(ValueError, match="state.safetensors"):
        verify_checkpoint(path)
