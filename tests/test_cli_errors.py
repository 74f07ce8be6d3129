"""The command line's errors: bad input ends with one ``fastdiff: error:`` line and status 2, before any
work (options at parse time, output paths and sizes before anything runs or is allocated); bugs of ours keep
their traceback; a closed pipe ends quietly."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import _backends, cli, sampling
from fastdiff.errors import InputError
from fastdiff.pipeline import TextDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = ["generate", "-n", "1", "--steps", "2", "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error: "), err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any model load, sampler call, benchmark or demo fails the test: the error must come first."""
    def boom(*a, **k):
        raise AssertionError("the work started before the input was checked")

    from fastdiff.cli import bench as _bench
    from fastdiff.cli import demo as _demo

    monkeypatch.setattr(TextDiffusion, "load", classmethod(lambda cls, *a, **k: boom()))
    monkeypatch.setattr(sampling, "sample", boom)
    monkeypatch.setattr(_bench, "run", boom)
    monkeypatch.setattr(_demo, "run", boom)


@pytest.fixture
def no_sampling(monkeypatch):
    """The model may load, but nothing may be sampled (nothing allocated for the batch)."""
    def boom(*a, **k):
        raise AssertionError("the sampler ran (and allocated) before the sizes were checked")

    monkeypatch.setattr(sampling, "sample", boom)


# --- options: checked at parse time, before a model is loaded --------------------------------------------
@pytest.mark.parametrize("argv,flag", [
    (["generate", "--length", "0"], "--length"),
    (["generate", "--length", "-5"], "--length"),
    (["generate", "--length", "abc"], "--length"),
    (["generate", "-n", "0"], "--num-samples"),
    (["generate", "--steps", "0"], "--steps"),
    (["generate", "--batch-size", "0"], "--batch-size"),
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--temperature", "-1"], "--temperature"),
    (["generate", "--top-p", "0"], "--top-p"),
    (["generate", "--top-p", "1.5"], "--top-p"),
    (["generate", "--top-p", "nan"], "--top-p"),
    (["generate", "--top-k", "0"], "--top-k"),
    (["generate", "--guidance", "inf"], "--guidance"),
    (["generate", "--guidance", "nan"], "--guidance"),
    (["generate", "--eta", "-1"], "--eta"),
    (["generate", "--eta", "nan"], "--eta"),
    (["generate", "--threshold", "2"], "--threshold"),
    (["generate", "--block-size", "0"], "--block-size"),
    (["generate", "--seed", "-1"], "--seed"),
    (["generate", "--seed", str(2**64)], "--seed"),
    (["generate", "--device", "bogus"], "--device"),
    (["generate", "--device", "meta"], "--device"),
    (["generate", "--backend", "bogus"], "--backend"),
    (["generate", "--threads", "0"], "--threads"),
    (["generate", "--prompt", "a", "--template", "b [MASK]"], "--template"),
    (["-n", "0"], "--num-samples"),  # plain `fastdiff` is generate
    (["eval", "--samples", "0"], "--samples"),
    (["eval", "--device", "meta"], "--device"),
    (["bench", "--repeat", "0"], "--repeat"),
    (["bench", "--repeat", "-1"], "--repeat"),
    (["bench", "--device", "bogus"], "--device"),
    (["bench", "--threads", "-2"], "--threads"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--threads", "0"], "--threads"),
])
def test_bad_options_fail_at_parse_time(capsys, no_work, argv, flag) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert flag in one_error_line(err)


def test_argparse_errors_return_2_in_process(capsys) -> None:
    code, _, err = run(capsys, "generate", "--no-such-option")
    assert code == 2 and "--no-such-option" in one_error_line(err)
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "frobnicate" in one_error_line(err)
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0 and "--num-samples" in out


# --- devices and backends --------------------------------------------------------------------------------
def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("argv", [
    [*GEN, "--device", "cuda"],
    [*GEN, "--device", "cuda:7"],
    ["eval", "--samples", "2", "--steps", "2", "--device", "cuda"],
    ["bench", "--quick", "--no-sampler", "--repeat", "1", "--device", "cuda"],
])
def test_missing_cuda_device_is_one_line(capsys, monkeypatch, no_work, argv) -> None:
    _no_cuda(monkeypatch)
    code, _, err = run(capsys, *argv)
    assert code == 2
    line = one_error_line(err)
    assert "--device" in line and "cuda" in line


def test_cuda_index_past_the_visible_devices(capsys, monkeypatch, no_work) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, _, err = run(capsys, *GEN, "--device", "cuda:7")
    assert code == 2 and "cuda:7" in one_error_line(err) and "cuda:1" in err


def _unavailable(monkeypatch, *names: str) -> None:
    real = _backends.get

    def fake(name: str):
        if name in names:
            return _backends.Backend(name, None, f"test: {name} is switched off")
        return real(name)

    monkeypatch.setattr(_backends, "get", fake)


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpp"])
def test_unavailable_backend_is_one_line_before_loading(capsys, monkeypatch, no_work, backend) -> None:
    _unavailable(monkeypatch, backend)
    code, _, err = run(capsys, *GEN, "--backend", backend)
    assert code == 2
    line = one_error_line(err)
    assert "--backend" in line and f"test: {backend} is switched off" in line


def test_unavailable_backend_from_the_environment(capsys, monkeypatch, no_work) -> None:
    _unavailable(monkeypatch, "cuda")
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    code, _, err = run(capsys, *GEN)
    assert code == 2 and "FASTDIFF_BACKEND" in one_error_line(err)
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    code, _, err = run(capsys, *GEN)
    assert code == 2 and "FASTDIFF_BACKEND" in one_error_line(err)


def test_cpp_backend_on_a_cuda_device(capsys, monkeypatch, no_work) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run(capsys, *GEN, "--backend", "cpp", "--device", "cuda:0")
    assert code == 2 and "--backend" in one_error_line(err)


# --- sizes: checked against memory before anything is allocated -------------------------------------------
def test_huge_length_fails_before_allocating(capsys, no_sampling) -> None:
    code, _, err = run(capsys, *GEN, "--length", "100000")
    assert code == 2
    line = one_error_line(err)
    assert "--length" in line and "memory" in line


def test_huge_num_samples_fails_fast(capsys, no_sampling) -> None:
    code, _, err = run(capsys, "generate", "-n", str(10**12), "--steps", "2", "--no-progress")
    assert code == 2
    line = one_error_line(err)
    assert "--num-samples" in line and "memory" in line


def test_length_against_a_small_memory(capsys, monkeypatch, no_sampling) -> None:
    monkeypatch.setattr(cli._common, "available_memory", lambda device: 2 * 10**9)
    code, _, err = run(capsys, *GEN, "--length", "8192")
    assert code == 2 and "--length" in one_error_line(err)


def test_default_batch_shrinks_to_fit_and_a_given_one_is_checked(capsys, monkeypatch) -> None:
    seen = {}

    def fake_generate(self, n, **kw):
        seen["batch_size"] = kw["batch_size"]
        raise InputError("stop here")

    monkeypatch.setattr(TextDiffusion, "generate", fake_generate)
    td = TextDiffusion.load("discrete")
    per = cli.sample_bytes(td, 64)
    monkeypatch.setattr(cli._common, "available_memory", lambda device: int(3.5 * per / 0.8) + 64 * 8 * 24)
    code, _, err = run(capsys, "generate", "-n", "8", "--steps", "2", "--no-progress")
    assert code == 2 and "stop here" in err and seen["batch_size"] == 3
    seen.clear()
    code, _, err = run(capsys, "generate", "-n", "8", "--batch-size", "8", "--steps", "2", "--no-progress")
    assert code == 2 and "--batch-size" in one_error_line(err) and "at most 3" in err and not seen


def test_plan_batch_keeps_an_ample_batch(monkeypatch) -> None:
    td = TextDiffusion.load("discrete")
    big = lambda device: 10**12  # noqa: E731
    assert cli.plan_batch(td, "cpu", num_samples=4, length=64, batch_size=None, steps=8, memory=big) == 4
    assert cli.plan_batch(td, "cpu", num_samples=100, length=64, batch_size=None, steps=8, memory=big) == 64
    assert cli.plan_batch(td, "cpu", num_samples=5, length=64, batch_size=2, steps=8, memory=big) == 2
    with pytest.raises(InputError, match="--length"):
        cli.plan_batch(td, "cpu", num_samples=1, length=10**6, batch_size=None, steps=8, memory=big)


# --- output paths: checked before the work, written atomically --------------------------------------------
def _bad_outputs(tmp_path: Path) -> dict[str, str]:
    f = tmp_path / "a_file"
    f.write_text("x")
    d = tmp_path / "a_dir"
    d.mkdir()
    out = {"under a file": str(f / "out.json"), "a directory": str(d), "deep under a file": str(f / "x" / "y.json")}
    if sys.platform.startswith("linux"):
        out["under /proc"] = "/proc/fastdiff-no-such/x.json"
    return out


@pytest.mark.parametrize("where", ["under a file", "a directory", "deep under a file", "under /proc"])
@pytest.mark.parametrize("argv,flag", [
    ([*GEN, "-o"], "--output"),
    (["eval", "--samples", "2", "--steps", "2", "--json"], "--json"),
    (["bench", "--quick", "--no-sampler", "--repeat", "1", "--json"], "--json"),
    (["demo", "--quick", "--json"], "--json"),
])
def test_unwritable_output_fails_before_the_work(capsys, tmp_path, no_work, where, argv, flag) -> None:
    paths = _bad_outputs(tmp_path)
    if where not in paths:
        pytest.skip("needs Linux's /proc")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run(capsys, *argv, paths[where])
    assert code == 2
    line = one_error_line(err)
    assert flag in line and paths[where] in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, no X.tmp


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_output_in_sys_fails_before_the_work(capsys, no_work) -> None:
    code, _, err = run(capsys, *GEN, "-o", "/sys/fastdiff-x.jsonl")
    assert code == 2 and "/sys/fastdiff-x.jsonl" in one_error_line(err)
    assert not Path("/sys/fastdiff-x.jsonl.tmp").exists()


def test_output_parent_directories_are_created(capsys, tmp_path) -> None:
    out = tmp_path / "new" / "deeper" / "s.jsonl"
    code, text, _ = run(capsys, *GEN, "-o", str(out))
    assert code == 0 and out.is_file() and len(out.read_text().splitlines()) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.jsonl"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(capsys, monkeypatch, tmp_path) -> None:
    out = tmp_path / "samples.jsonl"
    out.write_text("old\n")
    real = cli.generate._jsonl_row
    calls = []

    def full_disk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(cli.generate, "_jsonl_row", full_disk)
    code, _, err = run(capsys, "generate", "-n", "2", "--steps", "2", "--no-progress", "-o", str(out))
    assert code == 2
    line = one_error_line(err)
    assert "--output" in line and str(out) in line and "No space left" in line
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]


def test_interrupted_write_leaves_no_temporary(capsys, monkeypatch, tmp_path) -> None:
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.generate, "_jsonl_row", interrupt)
    code, _, err = run(capsys, *GEN, "-o", str(tmp_path / "s.jsonl"))
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_with_an_ordinary_file(tmp_path) -> None:
    p = tmp_path / "x.json"
    cli.write_atomic(p, "--json", lambda f: f.write("1"))
    cli.write_atomic(p, "--json", lambda f: f.write("2"))
    umask = os.umask(0)
    os.umask(umask)
    assert p.read_text() == "2" and (p.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


# --- what is an error line, what is a traceback -------------------------------------------------------------
@pytest.mark.parametrize("exc", [TypeError("a bug of ours"), ValueError("a bug of ours"), KeyError("bug"),
                                 PermissionError(errno.EACCES, "Permission denied", "/usr/lib/internal.so")])
def test_our_bugs_keep_their_traceback(capsys, monkeypatch, exc) -> None:
    def buggy(self, *a, **k):
        raise exc

    monkeypatch.setattr(TextDiffusion, "generate", buggy)
    with pytest.raises(type(exc)):
        cli.main(GEN)


def test_input_errors_and_user_path_os_errors_are_one_line(capsys, monkeypatch, tmp_path) -> None:
    def bad_input(self, *a, **k):
        raise InputError("label: not one of them")

    monkeypatch.setattr(TextDiffusion, "generate", bad_input)
    code, _, err = run(capsys, *GEN)
    assert code == 2 and one_error_line(err) == "fastdiff: error: label: not one of them"

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    denied = ckpt / "model.safetensors"

    def unreadable(cls, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(denied))

    monkeypatch.setattr(TextDiffusion, "load", classmethod(unreadable))
    code, _, err = run(capsys, *GEN, "-c", str(ckpt))
    assert code == 2 and str(denied) in one_error_line(err) and "Permission denied" in err

    def above(cls, *a, **k):  # a directory above the user's path is not the user's path
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(TextDiffusion, "load", classmethod(above))
    with pytest.raises(PermissionError):
        cli.main([*GEN, "-c", str(ckpt)])


def test_evaluation_models_are_not_generators(capsys) -> None:
    code, _, err = run(capsys, *GEN, "-c", "causal_lm")
    assert code == 2 and "not a diffusion checkpoint" in one_error_line(err)


def test_eval_rejects_options_it_would_ignore(capsys, no_work) -> None:
    code, _, err = run(capsys, "eval", "--label", "reference")
    assert code == 2 and "--label" in one_error_line(err)
    code, _, err = run(capsys, "eval", "--length", "32")
    assert code == 2 and "--length" in one_error_line(err)


def test_bench_checks_repeat_as_a_library_call() -> None:
    from fastdiff.cli import bench as _bench

    with pytest.raises(InputError, match="^repeat"):
        _bench.run(repeat=0, sampler=False, print_fn=lambda s: None)


def test_evaluate_checks_samples(monkeypatch) -> None:
    from fastdiff import evaluation

    td = TextDiffusion.load("discrete")
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(InputError, match="^samples"):
        evaluation.evaluate(td, samples=0, print_fn=lambda s: None)


# --- processes: exit status, pipes ----------------------------------------------------------------------------
def _fastdiff() -> list[str]:
    script = Path(sys.executable).with_name("fastdiff")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fastdiff"]


def _closed_stdout(argv: list[str], buffered: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen([*_fastdiff(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader went away, as `| head -0` does
    err = p.stderr.read().decode()
    return subprocess.CompletedProcess(argv, p.wait(timeout=300), "", err)


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("argv", [["info"], ["generate", "-n", "4", "--steps", "2", "--no-progress"]])
def test_closed_pipe_ends_quietly(argv, buffered) -> None:
    res = _closed_stdout(argv, buffered)
    assert res.returncode == 141, res.stderr[-2000:]  # 128 + SIGPIPE, as a shell reports it
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr[-2000:]


def test_head_of_a_pipe() -> None:
    cmd = " ".join(_fastdiff()) + " generate -n 4 --steps 2 --no-progress | head -1"
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert res.stdout.startswith("fastdiff generate: ") and len(res.stdout.splitlines()) == 1
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr[-2000:]


def test_process_exit_status_of_a_bad_input() -> None:
    res = subprocess.run([*_fastdiff(), "generate", "--length", "0"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "fastdiff: error: argument --length: must be an integer >= 1, got '0' (see: fastdiff generate --help)"]
