"""What the command line prints: the generate header names the backend auto runs and the threads, info
shows the build record and auto's choice, --help shows defaults, bench prints rows as it measures them,
--threads is applied before any work, and no progress bar is drawn into a log."""

from __future__ import annotations

import argparse
import re
import sys

import pytest
import torch

from fastdiff import _backends, _threads, cli
from fastdiff.errors import InputError
from fastdiff.pipeline import TextDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_main_job_output_and_header_names_backend_and_threads(capsys) -> None:
    code, out, _ = run(capsys, "--steps", "2", "--no-progress")  # plain `fastdiff`
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 6, out  # header, 4 samples, tokens/s
    head = lines[0]
    assert head.startswith("fastdiff generate: discrete (") and "4 samples x 64 tokens, 2 steps, ancestral" in head
    assert f"backend auto: {_backends.summary('cpu')}, threads {torch.get_num_threads()}" in head, head
    assert [ln[:3] for ln in lines[1:5]] == ["[0]", "[1]", "[2]", "[3]"]
    assert re.match(r"256 tokens in [\d.]+ s: [\d,]+ tokens/s \(\d+ network calls\)$", lines[5]), lines[5]


def test_header_names_an_explicit_backend_and_threads(capsys) -> None:
    code, out, _ = run(capsys, "generate", "-n", "1", "--steps", "2", "--no-progress", "--backend", "reference",
                       "--threads", "1")
    assert code == 0 and ", backend reference, threads 1" in out.splitlines()[0]


@pytest.mark.parametrize("command", [
    ["generate", "-n", "1", "--steps", "2", "--no-progress"],
    ["eval", "--samples", "2", "--steps", "2"],
    ["bench", "--quick", "--no-sampler", "--repeat", "1"],
    ["demo", "--quick"],
])
def test_threads_are_configured_before_any_work(capsys, monkeypatch, command) -> None:
    from fastdiff.cli import bench as _bench
    from fastdiff.cli import demo as _demo

    calls: list = []

    def configure(n):
        calls.append(("configure", n))
        return 3

    def work(*a, **k):
        calls.append(("work",))
        raise InputError("stop here")

    monkeypatch.setattr(_threads, "configure", configure)
    monkeypatch.setattr(TextDiffusion, "load", classmethod(lambda cls, *a, **k: work()))
    monkeypatch.setattr(_bench, "run", work)
    monkeypatch.setattr(_demo, "run", work)
    code, _, err = run(capsys, *command, "--threads", "2")
    assert code == 2 and "stop here" in err
    assert calls == [("configure", 2), ("work",)]
    calls.clear()
    run(capsys, *command)  # no --threads: the automatic policy
    assert calls[0] == ("configure", None)


def test_no_progress_bar_into_a_log(capsys, monkeypatch) -> None:
    seen = []

    def fake(self, n, **kw):
        seen.append(kw["progress"])
        raise InputError("stop here")

    monkeypatch.setattr(TextDiffusion, "generate", fake)
    argv = ["generate", "-n", "1", "--steps", "2"]
    assert run(capsys, *argv)[0] == 2 and seen == [False]  # captured stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert run(capsys, *argv)[0] == 2 and seen == [False, True]
    assert run(capsys, *argv, "--no-progress")[0] == 2 and seen == [False, True, False]


def test_info_shows_build_record_and_auto_choice(capsys, monkeypatch) -> None:
    code, out, _ = run(capsys, "info")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("reference")
    assert f"auto on cpu: {_backends.summary('cpu')}" in lines
    assert any(ln.startswith("auto on cuda: ") for ln in lines) == torch.cuda.is_available()
    built = [ln for ln in lines if ln.startswith("built: ")]
    assert len(built) == 1
    info = _backends.build_info()
    if info.get("torch"):
        assert info["torch"] in built[0]
    monkeypatch.setattr(_backends, "build_info", lambda: {"torch": "9.9.9", "cpp": False, "cpp_reason": "no compiler",
                                                          "cuda": False, "cuda_reason": "nvcc was not found"})
    out = run(capsys, "info")[1]
    line = next(ln for ln in out.splitlines() if ln.startswith("built: "))
    assert "9.9.9" in line and "C++ extension not built (no compiler)" in line and "nvcc was not found" in line
    monkeypatch.setattr(_backends, "build_info", lambda: {})
    out = run(capsys, "info")[1]
    assert "no build record" in out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("name", ["generate", "eval", "train", "bench", "demo"])
def test_help_shows_every_default(name) -> None:
    sub = _subparsers(cli.build_parser())[name]
    text = " ".join(sub.format_help().split())
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.default is None or action.default is False or action.default == []:
            continue
        assert f"(default: {action.default})" in text or "default" in (action.help or ""), action.option_strings


@pytest.mark.parametrize("name,options", [
    ("generate", ["--batch-size", "--length", "--device", "--threads", "--strategy", "--top-k", "--top-p"]),
    ("eval", ["--batch-size", "--device", "--threads", "--data"]),
    ("bench", ["--device", "--threads"]),
    ("demo", ["--threads"]),
])
def test_help_says_what_an_unset_option_means(name, options) -> None:
    sub = _subparsers(cli.build_parser())[name]
    found = set()
    for action in sub._actions:
        if set(action.option_strings) & set(options):
            found |= set(action.option_strings) & set(options)
            assert "default" in (action.help or ""), action.option_strings
    assert found == set(options)


def test_bench_prints_each_row_as_it_is_measured(capsys, monkeypatch) -> None:
    from fastdiff.cli import bench as _bench

    printed_before: list[list[str]] = []

    def fake_timed(fn, repeat, device):
        printed_before.append(capsys.readouterr().out.splitlines())
        return 1e-3

    monkeypatch.setattr(_bench, "_timed", fake_timed)
    code, out, _ = run(capsys, "bench", "--quick", "--no-sampler", "--repeat", "2")
    assert code == 0
    backends = _bench.backends_for(torch.device("cpu"))
    n_ops = len(_bench.op_cases(torch.device("cpu"), True))
    assert len(printed_before) == n_ops * len(backends)
    first = printed_before[0]
    assert "7 ops" in first[0] and ", ".join(backends) in first[0] and "best of 2" in first[0]
    assert first[1].startswith("benchmark") and first[2].startswith("---")
    for k, lines in enumerate(printed_before[1:], 1):
        assert len(lines) == 1 and lines[0].split()[0] in ("nearest_embedding", "rounding_loss", "posterior_sample",
                                                           "sample_categorical"), (k, lines)
    assert len(out.splitlines()) == 1  # the last row


def test_bench_rows_and_json(capsys, tmp_path) -> None:
    import json

    path = tmp_path / "rows.json"
    code, out, _ = run(capsys, "bench", "--quick", "--no-sampler", "--repeat", "1", "--json", str(path))
    assert code == 0 and f"wrote {path}" in out
    rows = json.loads(path.read_text())
    assert {r["backend"] for r in rows} == set(__import__("fastdiff.cli.bench", fromlist=["x"]).backends_for(
        torch.device("cpu")))
    assert all(r["ms"] > 0 for r in rows) and sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
