"""Scale-out on torch.distributed: sharded generation and DDP training, launched for real by ``torchrun``
with 2 CPU processes on gloo (what a multi-GPU node does with NCCL), compared with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdiff import distributed
from fastdiff.training import resolve_checkpoint_dir

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


# ---------------------------------------------------------------------------------------------------------
# in-process: the sharding rule and the global-index keying
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_range_covers_every_item_once_in_order(n, world) -> None:
    ranges = [distributed.shard_range(n, r, world) for r in range(world)]
    items = [i for a, b in ranges for i in range(a, b)]
    assert items == list(range(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        distributed.shard_range(4, 0, 0)
    with pytest.raises(ValueError, match="n"):
        distributed.shard_range(-1, 0, 1)
    with pytest.raises(TypeError, match="rank"):
        distributed.shard_range(4, 0.5, 2)


def test_outside_torchrun_the_world_is_one_process(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.init("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize("strategy", ["ancestral", "remask", "confidence"])
def test_samples_do_not_depend_on_batching_or_shards(disc, strategy) -> None:
    kw = {"length": 12, "steps": 6, "seed": 11, "strategy": strategy}
    if strategy == "remask":
        kw["eta"] = 0.3
    whole = disc.generate(5, batch_size=5, **kw)
    for bs in (1, 2, 3):
        assert torch.equal(disc.generate(5, batch_size=bs, **kw).tokens, whole.tokens), bs
    parts = [disc.generate(5, shard=(r, 2), **kw) for r in range(2)]
    assert [p.start for p in parts] == [0, 3]
    assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
    assert [t for p in parts for t in p.texts] == whole.texts
    # and the keying is by index: sample 1 is not sample 0 drawn again
    assert not torch.equal(whole.tokens[0], whole.tokens[1])


def test_top_k_and_continuous_samples_do_not_depend_on_batching(disc, cont) -> None:
    kw = {"length": 10, "steps": 5, "seed": 4, "top_k": 20}
    assert torch.equal(disc.generate(4, batch_size=4, **kw).tokens, disc.generate(4, batch_size=1, **kw).tokens)
    kw = {"length": 10, "steps": 5, "seed": 4}
    a = cont.generate(4, batch_size=4, **kw).tokens
    b = torch.cat([cont.generate(4, shard=(r, 3), **kw).tokens for r in range(3)])
    assert torch.equal(a, b)


def test_a_sample_offset_that_is_ignored_would_be_caught(disc) -> None:
    """Two one-sample shards at different offsets differ: the offset reaches the draws."""
    a = disc.generate(2, length=12, steps=6, seed=3, shard=(0, 2)).tokens
    b = disc.generate(2, length=12, steps=6, seed=3, shard=(1, 2)).tokens
    assert not torch.equal(a, b)


def test_generate_rejects_a_bad_shard(disc) -> None:
    with pytest.raises(ValueError, match="rank"):
        disc.generate(2, steps=2, shard=(2, 2))
    with pytest.raises(TypeError, match="shard"):
        disc.generate(2, steps=2, shard=3)


# ---------------------------------------------------------------------------------------------------------
# real torchrun launches (2 processes, gloo)
# ---------------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(nproc: int, *args: str, module: str | None = "fastdiff", check: bool = True
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", module, *args] if module else list(args)
    res = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def _fastdiff(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastdiff", *args]
    res = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_torchrun_generate_two_ranks_equals_one_process(tmp_path) -> None:
    gen = ["generate", "-n", "7", "--length", "16", "--steps", "8", "--seed", "9", "--no-progress", "--device", "cpu"]
    one = tmp_path / "one.jsonl"
    two = tmp_path / "two.jsonl"
    _fastdiff(*gen, "-o", str(one))  # one batch of 7
    res = _torchrun(2, *gen, "-o", str(two))  # ranks take samples 0-3 and 4-6
    a, b = _jsonl(one), _jsonl(two)
    assert [r["index"] for r in b] == list(range(7))  # one file, gathered in global order
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert "on 2 ranks" in res.stdout
    assert res.stdout.count("wrote 7 samples") == 1  # rank 0 alone writes and prints


def _train_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus), "--seq-len", "16", "--width", "32", "--layers", "1", "--heads", "2",
            "--log-every", "1", "--no-progress", "--device", "cpu", "--out", str(out), "--set", "warmup_steps=2",
            "--set", "timestep_sampler=\"loss-aware\"", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    words = ["the", "a", "of", "to", "and", "in", "is", "for", "on", "with", "as", "by", "this", "that",
             "function", "returns", "value", "list", "string", "object", "module", "class", "method"]
    lines = []
    for _ in range(300):
        n = int(torch.randint(8, 30, (1,), generator=g))
        lines.append(" ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g)))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(lines) + "\n")
    return path


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _jsonl(run / "train_log.jsonl") if "loss" in r}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint_dir(run) / "model.safetensors"))


def _assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() and la
    for s in la:
        assert abs(la[s] - lb[s]) <= tol * max(1.0, abs(la[s])), (s, la[s], lb[s])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=tol, msg=k)


def test_torchrun_training_two_ranks_equals_one_rank_with_the_doubled_batch(tmp_path, corpus) -> None:
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    _fastdiff(*_train_args(one, corpus, "--steps", "6", "--batch-size", "8"))
    res = _torchrun(2, *_train_args(two, corpus, "--steps", "6", "--batch-size", "4"))
    assert "2 processes (gloo, ddp) x 4 x 1 = global batch 8" in res.stdout
    _assert_same_run(one, two)
    # one process with two micro-batches of 4 is the same update again
    _fastdiff(*_train_args(accum, corpus, "--steps", "6", "--batch-size", "4", "--grad-accum", "2"))
    _assert_same_run(one, accum)
    # rank 0 alone logs: one line per step
    assert [r["step"] for r in _jsonl(two / "train_log.jsonl")] == list(range(1, 7))


def test_torchrun_training_diverges_from_a_different_global_batch(tmp_path, corpus) -> None:
    """The comparison above can fail: 2 ranks x 4 is not 1 rank x 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    _fastdiff(*_train_args(one, corpus, "--steps", "3", "--batch-size", "4"))
    _torchrun(2, *_train_args(two, corpus, "--steps", "3", "--batch-size", "4"))
    with pytest.raises(AssertionError):
        _assert_same_run(one, two)


def test_killed_rank_resumes_from_the_last_complete_checkpoint_on_another_world_size(tmp_path, corpus) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ("--steps", "8", "--ckpt-every", "3")
    _torchrun(2, *_train_args(ref, corpus, *common, "--batch-size", "4"))
    # rank 1 dies (SIGKILL) in the middle of update 5 (global_step 4 -> 5): after its backward, before the
    # optimizer step; torchrun then stops rank 0
    os.environ["FASTDIFF_TEST_KILL_STEP"] = "4"
    try:
        res = _torchrun(2, str(ROOT / "tests" / "_dist_kill_train.py"),
                        *_train_args(run, corpus, *common, "--batch-size", "4"), module=None, check=False)
    finally:
        del os.environ["FASTDIFF_TEST_KILL_STEP"]
    assert res.returncode != 0
    assert resolve_checkpoint_dir(run).name == "step_00000003"  # the last complete one
    assert not (run / "step_00000005").exists()
    # resume on ONE process: the global batch of 8 is kept (batch 8 per process), the run goes on
    res = _fastdiff("train", "--resume", str(run), "--data", str(corpus), "--no-progress")
    assert "resumed" in res.stdout and "at step 3 of 8" in res.stdout
    steps = [r["step"] for r in _jsonl(run / "train_log.jsonl")]
    assert steps == list(range(1, 9))  # nothing lost, nothing logged twice
    _assert_same_run(ref, run)
    # and back on two processes (4 sequences each) from the final checkpoint, for two more steps
    res = _torchrun(2, "train", "--resume", str(run), "--data", str(corpus), "--steps", "10", "--no-progress")
    assert "on 2 processes, 4 sequences per micro-batch" in res.stdout
    assert [r["step"] for r in _jsonl(run / "train_log.jsonl")] == list(range(1, 11))


def test_resume_rejects_a_world_that_does_not_divide_the_global_batch(tmp_path, corpus) -> None:
    run = tmp_path / "run"
    _fastdiff(*_train_args(run, corpus, "--steps", "2", "--batch-size", "3", "--ckpt-every", "1"))
    res = _torchrun(2, "train", "--resume", str(run), "--data", str(corpus), "--steps", "3", "--no-progress",
                    check=False)
    assert res.returncode != 0
    assert "global batch of 3" in res.stdout + res.stderr


def test_torchrun_fsdp_equals_one_rank_and_resumes_from_a_checkpoint(tmp_path, corpus) -> None:
    """FSDP2 (sharded blocks) on 2 ranks, continuous family (embeddings used outside the forward)."""
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    common = ("--family", "continuous", "--steps", "4", "--ckpt-every", "2")
    _fastdiff(*_train_args(one, corpus, *common, "--batch-size", "8"))
    res = _torchrun(2, *_train_args(fsdp, corpus, *common, "--batch-size", "4", "--parallel", "fsdp"))
    assert "(gloo, fsdp)" in res.stdout
    _assert_same_run(one, fsdp)
    # resume the sharded run from its step-2 checkpoint (gathered full state, re-sharded on load)
    _torchrun(2, "train", "--resume", str(fsdp / "step_00000002"), "--data", str(corpus), "--no-progress")
    assert [r["step"] for r in _jsonl(fsdp / "train_log.jsonl")] == [1, 2, 3, 4]
    _assert_same_run(one, fsdp)


def test_eight_way_shards_and_empty_shards_give_the_same_samples(disc) -> None:
    kw = {"length": 10, "steps": 4, "seed": 21}
    for n in (5, 13):  # 5 samples over 8 ranks: three ranks get none
        whole = disc.generate(n, **kw).tokens
        parts = [disc.generate(n, shard=(r, 8), **kw) for r in range(8)]
        assert sum(p.tokens.shape[0] == 0 for p in parts) == (3 if n == 5 else 0)
        assert torch.equal(torch.cat([p.tokens for p in parts]), whole)


def test_torchrun_eight_ranks_on_five_samples(tmp_path) -> None:
    """More ranks than samples: the idle ranks still take part in the gather; one file, in order."""
    gen = ["generate", "-n", "5", "--length", "12", "--steps", "4", "--seed", "2", "--no-progress", "--device", "cpu"]
    one, eight = tmp_path / "one.jsonl", tmp_path / "eight.jsonl"
    _fastdiff(*gen, "-o", str(one))
    _torchrun(8, *gen, "-o", str(eight))
    assert [r["tokens"] for r in _jsonl(one)] == [r["tokens"] for r in _jsonl(eight)]
