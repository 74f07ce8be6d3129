"""Kill-anywhere training: ``fastdiff train --resume`` SIGKILLed in the middle of a step, of writing a
checkpoint and of replacing one (with and without an atomic directory exchange), in a copy of a run and
into another directory. After every kill: the copied source run is unchanged byte for byte, and load,
generate and resume all work, the resumed run ending with the weights and log of a run never killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdiff import cli
from fastdiff.pipeline import TextDiffusion
from fastdiff.training import load_checkpoint, resolve_checkpoint_dir
from fastdiff.training.checkpoint import STALE
from tests.conftest import tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "_resume_kill_train.py"
MODEL = ["--family", "discrete", "--task", "lm", "--seq-len", "8", "--batch-size", "2", "--width", "16",
         "--layers", "1", "--heads", "2", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu",
         "--set", "warmup_steps=1"]
FAST = ["--no-progress", "--threads", "1"]  # one thread everywhere: bit-identical floats across processes

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _train(*argv: str) -> None:
    code = cli.main(["train", *argv, *FAST])
    assert code == 0


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", seed=1,
                       words=["the", "list", "returns", "a", "value", "of", "module", "string", "object", "is", "for", "class"], lines=60, words_per_line=20)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict:
    """A: 4 steps (checkpoints step_2, step_4, latest -> step_4); ref: A resumed to 6, never killed."""
    root = tmp_path_factory.mktemp("runs")
    a = root / "A"
    _train("--data", str(corpus), *MODEL, "--steps", "4", "--out", str(a))
    ref = root / "ref"
    shutil.copytree(a, ref)
    _train("--resume", str(ref), "--data", str(corpus), "--steps", "6")
    return {"A": a, "ref": ref, "weights": load_file(str(resolve_checkpoint_dir(ref) / "model.safetensors")),
            "losses": _losses(ref)}


def _killed(argv: list[str], point: str, exchange: bool = True) -> None:
    env = dict(os.environ, FASTDIFF_TEST_KILL=point, FASTDIFF_TEST_NO_EXCHANGE="0" if exchange else "1")
    res = subprocess.run([sys.executable, str(KILLER), "train", *argv, *FAST], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stdout[-2000:], res.stderr[-3000:])


def _check_recovers(run: Path, runs: dict, corpus: Path) -> None:
    """Load, generate and resume a killed run; the resumed run ends as the run that was never killed."""
    ck = load_checkpoint(run)
    assert ck.step in (2, 4, 6)
    gen = TextDiffusion.load(run, device="cpu").generate(2, steps=2, seed=0)
    assert len(gen.texts) == 2 and gen.tokens.shape[0] == 2
    _train("--resume", str(run), "--data", str(corpus), "--steps", "6")
    assert _steps(run) == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing logged twice
    assert _losses(run) == runs["losses"]
    final = resolve_checkpoint_dir(run)
    assert final.name == "step_00000006"
    got = load_file(str(final / "model.safetensors"))
    assert got.keys() == runs["weights"].keys()
    for k, v in runs["weights"].items():
        assert torch.equal(got[k], v), k
    assert not [p.name for p in run.iterdir() if STALE.fullmatch(p.name)]  # leftovers cleaned


# (resume argv relative to the copy B, kill point, atomic exchange available)
SCENARIOS = {
    "mid-step": (["--resume", "{B}"], "step:4", True),
    "writing-weights": (["--resume", "{B}"], "file:model.safetensors", True),
    "before-latest": (["--resume", "{B}"], "installed", True),
    # resuming step_2 (same max_steps: the same steps 3 and 4) re-saves step_4, the checkpoint `latest` names
    "re-save-written": (["--resume", "{B}/step_00000002", "--steps", "4"], "written", True),
    "re-save-exchanged": (["--resume", "{B}/step_00000002", "--steps", "4"], "exchanged", True),
    "re-save-redirected": (["--resume", "{B}/step_00000002", "--steps", "4"], "redirected", False),
    "re-save-moved-aside": (["--resume", "{B}/step_00000002", "--steps", "4"], "moved-aside", False),
    "re-save-moved-in": (["--resume", "{B}/step_00000002", "--steps", "4"], "moved-in", False),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kill_during_resume_of_a_copy(tmp_path, runs, corpus, name):
    argv, point, exchange = SCENARIOS[name]
    a, b = runs["A"], tmp_path / "B"
    shutil.copytree(a, b)  # cp -r A B: the checkpoints in B still record A as their run directory
    before = _tree(a)
    steps = [] if "--steps" in argv else ["--steps", "6"]
    _killed([x.format(B=b) for x in argv] + ["--out", str(b), "--data", str(corpus), *steps], point, exchange)
    assert _tree(a) == before  # the source of the copy is untouched, byte for byte
    _check_recovers(b, runs, corpus)
    assert _tree(a) == before


def test_kill_during_resume_into_another_directory(tmp_path, runs, corpus):
    a, c = runs["A"], tmp_path / "C"
    before = _tree(a)
    _killed(["--resume", str(a), "--out", str(c), "--data", str(corpus), "--steps", "6"], "installed")
    assert _tree(a) == before
    assert not (c / "latest").exists() and (c / "step_00000006").is_dir()  # killed before `latest` was written
    _check_recovers(c, runs, corpus)
    # killed before its first checkpoint: the new directory holds only a log, which a resume into it
    # does not silently replace; --overwrite does
    d = tmp_path / "D"
    _killed(["--resume", str(a), "--out", str(d), "--data", str(corpus), "--steps", "6"], "step:4")
    assert _tree(a) == before
    assert cli.main(["train", "--resume", str(a), "--out", str(d), "--data", str(corpus), "--steps", "6", *FAST]) == 2
    _train("--resume", str(a), "--out", str(d), "--overwrite", "--data", str(corpus), "--steps", "6")
    assert _steps(d) == [1, 2, 3, 4, 5, 6] and _losses(d) == runs["losses"]
    assert _tree(a) == before
