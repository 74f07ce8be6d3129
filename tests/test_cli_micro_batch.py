"""``fastdiff generate --micro-batch M``: the outside pass's case (``--seed 7 -n 4 --strategy remask
--top-p 0.9 --length 32 --steps 16``, where ``--batch-size 1`` and ``4`` differed in 8 of 32 tokens of
sample 3) gives the same tokens for every batch size once the network's call shape is fixed."""

from __future__ import annotations

import json

import pytest

from fastdiff import cli

pytestmark = pytest.mark.usefixtures("one_thread")
CASE = ["generate", "--seed", "7", "-n", "4", "--strategy", "remask", "--top-p", "0.9", "--length", "32",
        "--steps", "16", "--no-progress", "--quiet"]


def _tokens(tmp_path, *extra: str) -> list[list[int]]:
    out = tmp_path / f"s{'_'.join(extra)}.jsonl"
    assert cli.main([*CASE, *extra, "-o", str(out)]) == 0
    return [json.loads(line)["tokens"] for line in out.read_text().splitlines()]


def test_micro_batch_makes_samples_independent_of_batch_size(tmp_path):
    ref = _tokens(tmp_path, "--batch-size", "4", "--micro-batch", "4")
    for b in ("1", "3"):
        assert _tokens(tmp_path, "--batch-size", b, "--micro-batch", "4") == ref, b
    # One row per network call is a different (fixed) shape: still independent of the batch size.
    one = _tokens(tmp_path, "--batch-size", "2", "--micro-batch", "1")
    assert one == _tokens(tmp_path, "--batch-size", "4", "--micro-batch", "1")


def test_micro_batch_is_checked(capsys):
    assert cli.main([*CASE, "--micro-batch", "0"]) == 2
    assert "--micro-batch" in capsys.readouterr().err
