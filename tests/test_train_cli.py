"""``fastdiff train`` on the command line: paths and values checked before any work (one-line errors),
run-directory semantics (fresh runs never mix into a run, --resume writes where it is told), config
files, --help defaults, --threads."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from fastdiff import cli
from fastdiff.cli import train as _train_cli
from fastdiff.training import load_checkpoint, resolve_checkpoint_dir
from tests.conftest import tiny_corpus

MODEL = ["--family", "discrete", "--task", "lm", "--seq-len", "8", "--batch-size", "2", "--width", "16",
         "--layers", "1", "--heads", "2", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu",
         "--no-progress", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", seed=2,
                       words=["a", "class", "returns", "the", "value", "of", "string", "list", "module", "is", "object"], lines=40, words_per_line=16)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, corpus) -> Path:
    a = tmp_path_factory.mktemp("runs") / "A"
    assert cli.main(["train", "--data", str(corpus), *MODEL, "--steps", "4", "--out", str(a)]) == 0
    return a


def train(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fastdiff: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as reading the corpus."""
    def docs(args):
        raise AssertionError("training work started before the arguments were checked")

    monkeypatch.setattr(_train_cli, "_docs", docs)


# --- checked before any work -------------------------------------------------------------------------------
def test_paths_under_a_file_are_one_line_errors(capsys, tmp_path, corpus, run_a, no_work):
    f = tmp_path / "file"
    f.write_text("not a directory")
    base = ["--data", str(corpus), *MODEL, "--steps", "2"]
    for argv, flag in [(["--out", str(f / "x")], "--out"), (["--out", str(f)], "--out"),
                       (["--out", str(tmp_path / "ok"), "--export", str(f / "x")], "--export"),
                       (["--out", str(tmp_path / "ok"), "--export", str(f)], "--export"),
                       (["--out", str(tmp_path / "ok"), "--export", str(tmp_path / "ok")], "--export")]:
        code, _, err = train(capsys, *base, *argv)
        _one_line_error(code, err, flag, str(f) if flag in argv and str(f) in " ".join(argv) else "")
    resume = ["--resume", str(run_a), "--data", str(corpus), "--no-progress"]
    code, _, err = train(capsys, *resume, "--out", str(f / "x"))
    _one_line_error(code, err, "--out", str(f))
    code, _, err = train(capsys, *resume, "--export", str(f / "x"))
    _one_line_error(code, err, "--export", str(f))
    code, _, err = train(capsys, *resume, "--export", str(run_a))  # would replace the run itself
    _one_line_error(code, err, "--export")
    code, _, err = train(capsys, *resume, "--export", str(run_a / "step_00000004"))  # one of its checkpoints
    _one_line_error(code, err, "--export", "inside")
    assert not (tmp_path / "ok").exists()


@pytest.mark.parametrize("argv,flag", [
    (["--seq-len", "0"], "--seq-len"), (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--src-len", "0"], "--src-len"), (["--T", "0"], "--T"), (["--warmup", "-1"], "--warmup"),
    (["--log-every", "0"], "--log-every"), (["--ckpt-every", "-2"], "--ckpt-every"), (["--width", "0"], "--width"),
    (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--ema-decay", "1"], "--ema-decay"), (["--cond-drop", "1.5"], "--cond-drop"),
    (["--lam-anchor", "-1"], "--lam-anchor"), (["--threads", "0"], "--threads"),
    (["--train-tokenizer", "0"], "--train-tokenizer"), (["--set", "seq_len=0"], "seq_len"),
    (["--device", "bogus"], "--device"), (["--set", "batch_size=\"x\""], "batch_size"),
])
def test_zero_negative_and_non_finite_values_are_errors(capsys, tmp_path, corpus, no_work, argv, flag):
    out = tmp_path / "run"
    code, _, err = train(capsys, "--data", str(corpus), *MODEL, "--out", str(out), *argv)
    _one_line_error(code, err, flag)
    assert not out.exists()


def test_help_shows_the_defaults_and_the_run_directory_rules():
    parser = argparse.ArgumentParser(prog="fastdiff train")
    _train_cli.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for needle in ["--steps STEPS max_steps: train until this step (default: 1000)",
                   "--seq-len SEQ_LEN tokens per training sequence (default: 64)",
                   "--batch-size BATCH_SIZE sequences per micro-batch on each process (default: 32)",
                   "--out OUT", "(default: runs/fastdiff;", "--threads N", "--overwrite",
                   "refuses a DIR that already holds a run", "never in the directory recorded inside the checkpoint"]:
        assert needle in text, needle
    for action in parser._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            assert "default" in (action.help or ""), action.option_strings
    # the description keeps its line breaks under the command line's own formatter
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    assert "\n  * --resume D continues" in sub.format_help()


def test_threads_applies_before_any_work(capsys, tmp_path, corpus, monkeypatch):
    from fastdiff import _threads

    calls = []
    monkeypatch.setattr(_threads, "configure", lambda n: calls.append(n) or 1)

    def docs(args):
        calls.append("docs")
        raise KeyboardInterrupt

    monkeypatch.setattr(_train_cli, "_docs", docs)
    cli.main(["train", "--data", str(corpus), *MODEL, "--threads", "3", "--out", str(tmp_path / "r")])
    assert calls == [3, "docs"]


# --- config files --------------------------------------------------------------------------------------------
def test_a_config_file_may_be_a_checkpoint_config_with_its_sections_checked(capsys, tmp_path, corpus, run_a):
    src = resolve_checkpoint_dir(run_a) / "config.json"
    cfg = json.loads(src.read_text())
    bad = tmp_path / "bad.json"
    for section, value in [("train", "x"), ("train", [1])]:
        bad.write_text(json.dumps(dict(cfg, **{section: value})))
        code, _, err = train(capsys, "--config", str(bad), "--data", str(corpus), "--out", str(tmp_path / "r"))
        _one_line_error(code, err, "--config", "train")
    for text in ["[1, 2]", '{"model": "x"}', '{"colour": 1}', '{"seq_len": "8"}', "{not json"]:
        bad.write_text(text)
        code, _, err = train(capsys, "--config", str(bad), "--data", str(corpus), "--out", str(tmp_path / "r"))
        _one_line_error(code, err, str(bad))
    # a checkpoint's config.json: its train section is the configuration (its out_dir overridden by --out)
    out = tmp_path / "again"
    code, _, _ = train(capsys, "--config", str(src), "--data", str(corpus), "--steps", "1", "--no-progress",
                       "--threads", "1", "--out", str(out))
    assert code == 0
    again = json.loads((out / "train_config.json").read_text())
    assert again["seq_len"] == 8 and again["model"]["width"] == 16 and again["out_dir"] == str(out)
    assert not (tmp_path / "r").exists()


def test_resuming_a_checkpoint_whose_sections_have_the_wrong_type(capsys, tmp_path, corpus, run_a):
    for section, value in [("train", "x"), ("model", 3), ("tokenizer", "x"), ("process", "x")]:
        b = tmp_path / f"B-{section}"
        shutil.copytree(run_a, b)
        cfg_file = resolve_checkpoint_dir(b) / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg[section] = value
        cfg_file.write_text(json.dumps(cfg))
        code, _, err = train(capsys, "--resume", str(b), "--data", str(corpus), "--no-progress")
        _one_line_error(code, err, "config.json", section)


# --- run directories -------------------------------------------------------------------------------------------
def test_a_fresh_run_into_an_existing_run_is_refused_and_overwrite_replaces_it(capsys, tmp_path, corpus, run_a):
    d = tmp_path / "D"
    shutil.copytree(run_a, d)
    before = _tree(d)
    base = ["--data", str(corpus), *MODEL, "--steps", "3", "--out", str(d)]
    code, _, err = train(capsys, *base)
    _one_line_error(code, err, "--out", "already holds a training run", "--resume", "--overwrite")
    assert _tree(d) == before
    code, _, err = train(capsys, "--scorer", "causal_lm", *base)
    _one_line_error(code, err, "already holds a training run")
    (d / "notes.txt").write_text("mine")
    code, _, _ = train(capsys, *base, "--overwrite")
    assert code == 0 and _steps(d) == [1, 2, 3]  # not 1..4 then 1..3
    assert sorted(p.name for p in d.iterdir()) == ["command.txt", "latest", "notes.txt", "step_00000002",
                                                   "step_00000003", "train_config.json", "train_log.jsonl"]
    assert len((d / "command.txt").read_text().splitlines()) == 1


def test_resume_writes_into_the_directory_given(capsys, tmp_path, corpus, run_a):
    before = _tree(run_a)
    b = tmp_path / "B"
    shutil.copytree(run_a, b)  # cp -r A B: its checkpoints still record A as their run directory
    code, out, _ = train(capsys, "--resume", str(b), "--out", str(b), "--data", str(corpus), "--steps", "6",
                         "--no-progress", "--threads", "1")
    assert code == 0 and "at step 4 of 6" in out
    assert _tree(run_a) == before
    assert _steps(b) == [1, 2, 3, 4, 5, 6] and resolve_checkpoint_dir(b).name == "step_00000006"
    assert len((b / "command.txt").read_text().splitlines()) == 2  # the fresh command, then the resume
    # --resume alone goes on in the directory given, a checkpoint directory in the run that holds it
    code, _, _ = train(capsys, "--resume", str(b / "step_00000006"), "--data", str(corpus), "--steps", "7",
                       "--no-progress", "--threads", "1")
    assert code == 0 and _steps(b) == [1, 2, 3, 4, 5, 6, 7] and _tree(run_a) == before
    # --out elsewhere: a continuation there, the source only read
    c = tmp_path / "C"
    code, out, _ = train(capsys, "--resume", str(run_a), "--out", str(c), "--data", str(corpus), "--steps", "6",
                         "--no-progress", "--threads", "1")
    assert code == 0 and "left as it is" in out and _tree(run_a) == before
    assert _steps(c) == [1, 2, 3, 4, 5, 6] and load_checkpoint(c).step == 6
    assert json.loads((c / "train_config.json").read_text())["out_dir"] == str(c)
    code, _, err = train(capsys, "--resume", str(run_a), "--out", str(c), "--data", str(corpus), "--no-progress")
    _one_line_error(code, err, "already holds a training run")
    code, _, err = train(capsys, "--resume", str(b), "--overwrite", "--data", str(corpus), "--no-progress")
    _one_line_error(code, err, "--overwrite")
    code, _, err = train(capsys, "--resume", str(run_a), "--steps", "3", "--data", str(corpus), "--no-progress")
    _one_line_error(code, err, "--steps", "below")
    assert _tree(run_a) == before


@pytest.mark.parametrize("argv", [["--lr", "1"], ["--width", "8"], ["--seed", "3"], ["--batch-size", "4"],
                                  ["--set", "lr=1"], ["--config", "x.json"], ["--tokenizer", "t.json"],
                                  ["--scorer", "classifier"]])
def test_resume_refuses_the_flags_it_would_ignore(capsys, tmp_path, corpus, run_a, no_work, argv):
    before = _tree(run_a)
    code, _, err = train(capsys, "--resume", str(run_a), "--data", str(corpus), "--no-progress", *argv)
    _one_line_error(code, err, argv[0] if argv[0] != "--set" else "lr")
    assert _tree(run_a) == before


def test_resume_of_a_run_without_latest(capsys, tmp_path, corpus, run_a):
    b = tmp_path / "B"
    shutil.copytree(run_a, b)
    (b / "latest").unlink()
    code, out, _ = train(capsys, "--resume", str(b), "--data", str(corpus), "--steps", "5", "--no-progress",
                         "--threads", "1")
    assert code == 0 and "step_00000004 at step 4 of 5" in out and _steps(b) == [1, 2, 3, 4, 5]
