"""The strategy table (fastdiff.sampling.strategies): the option docs generated from it cannot drift from
the code, adding a strategy is one entry plus its step, the batch state (_Run) is changed only by its own
methods, and the continuous strategies step through GaussianDiffusion's own maths (its hooks included)."""

from __future__ import annotations

import ast
import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch

import fastdiff.sampling as S
from fastdiff import continuous, discrete, schedules
from fastdiff.errors import InputError, InputTypeError
from fastdiff.sampling import Options, Sampler, Strategy, sample, strategies
from fastdiff.sampling import _options

V, MASK = 20, 19
FIELDS = [f.name for f in dataclasses.fields(Options)]


def _absorbing(T=50):
    return discrete.Absorbing(V, MASK, schedules.cosine(T))


def _logits(x, t, **kw):
    table = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(11))
    return table[x]


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def test_the_public_strategy_names_come_from_the_table():
    assert S.STRATEGIES == ("ancestral", "confidence", "threshold", "remask", "ar_ancestral", "ddpm", "ddim", "ar")
    assert S.STRATEGIES == tuple(strategies.TABLE)
    assert S.DISCRETE_STRATEGIES == tuple(n for n, s in strategies.TABLE.items() if s.family == "discrete")
    assert S.CONTINUOUS_STRATEGIES == tuple(n for n, s in strategies.TABLE.items() if s.family == "continuous")


@pytest.mark.parametrize("name", list(strategies.TABLE))
def test_every_entry_is_complete(name):
    s = strategies.TABLE[name]
    assert s.name == name and s.family in strategies.FAMILIES
    assert callable(s.step) and callable(s.loop)
    assert s.label and s.paper and s.summary.endswith(".")
    assert set(s.options) <= set(FIELDS), set(s.options) - set(FIELDS)
    assert len(set(s.options)) == len(s.options)


def test_the_strategy_options_are_exactly_what_each_strategy_may_change():
    """An option listed by a strategy is accepted at a non-default value there; listed by others only,
    it is rejected naming itself (or by an earlier, more specific rule that also names it)."""
    probe = {"temperature": 0.5, "top_k": 3, "top_p": 0.5, "cache": True, "tokens_per_step": 2,
             "remasking": "random", "threshold": 0.5, "eta": 0.5, "remask_schedule": "cap",
             "remask_window": (0.1, 0.9), "clamp": "every", "metric": "cosine", "self_condition": True,
             "self_cond_kwarg": "prev", "classifier_grad": lambda x, t: x, "classifier_scale": 2.0,
             "embedding": torch.randn(V, 4, generator=torch.Generator().manual_seed(0))}
    assert set(probe) == set(_options.STRATEGY_OPTIONS)
    emb = probe["embedding"]
    for name, spec in strategies.TABLE.items():
        cont = spec.family == "continuous"
        process = continuous.GaussianDiffusion(schedules.sqrt(50)) if cont else _absorbing()
        base = {"embedding": emb} if cont else {}
        for opt, value in probe.items():
            kw = dict(base, **{opt: value})
            if opt == "self_cond_kwarg":
                kw["self_condition"] = True
            if opt == "classifier_scale":
                kw["classifier_grad"] = probe["classifier_grad"]
            if opt in spec.options:
                Sampler(process, steps=3, strategy=name, **kw)
            else:
                with pytest.raises(InputError, match=f"^{opt}|^self_condition|^classifier_grad"):
                    Sampler(process, steps=3, strategy=name, **kw)


def test_a_new_strategy_is_one_table_entry_and_its_step(monkeypatch):
    """A toy discrete strategy (fill every masked position with the argmax in one step), registered by
    one entry: it samples, its options are checked from the entry, and the docs list it."""
    def greedy_block(run, x, a, b, logits, bar):
        lr, _ = logits(x, run.process.T)
        new = lr.index_fill(-1, torch.tensor([MASK]), float("-inf")).argmax(-1)
        x[:, a:b] = torch.where(run.fixed[:, a:b], run.values[:, a:b], new)
        run.after_step(x, bar)

    toy = Strategy("greedy", "discrete", "toy", "one-step argmax (a test)", "Fill every mask at once.",
                   greedy_block, options=("temperature",), walks_grid=False, needs_absorbing=True, greedy=True)
    monkeypatch.setitem(strategies.TABLE, "greedy", toy)
    out = sample(_logits, _absorbing(), shape=(2, 5), steps=4, strategy="greedy", temperature=0.0)
    x0 = torch.full((2, 5), MASK)
    assert torch.equal(out.tokens, _logits(x0, None)[..., :MASK].argmax(-1))
    assert out.stats["steps"] == 1 and out.stats["network_calls"] == 1
    with pytest.raises(InputError, match=r"^eta: applies to strategy 'remask' / 'ddim' / 'ar' only, not 'greedy'"):
        sample(_logits, _absorbing(), shape=(2, 5), steps=4, strategy="greedy", eta=0.5)
    with pytest.raises(InputError, match=r"^top_k: applies to strategy .* only, not 'greedy'"):
        sample(_logits, _absorbing(), shape=(2, 5), steps=4, strategy="greedy", top_k=2)
    with pytest.raises(InputError, match=r"needs an absorbing"):
        sample(_logits, discrete.Uniform(V, schedules.cosine(50)), shape=(2, 5), steps=4, strategy="greedy")
    assert "'greedy' : discrete, one-step argmax (a test)" in _options.strategies_doc()
    assert "only 'confidence', 'threshold' and 'greedy' accept" in " ".join(_options.options_doc().split())


def test_an_entry_with_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family"):
        Strategy("x", "hybrid", "x", "x", "x.", lambda *a: None)


# ------------------------------------------------------------------------------------------------
# documentation, generated from the table and OPTION_DOCS
# ------------------------------------------------------------------------------------------------
def test_every_option_field_is_documented_and_nothing_else():
    assert list(_options.OPTION_DOCS) == FIELDS
    assert "extra" not in FIELDS


def _entries(doc: str, section: str) -> dict[str, list[str]]:
    """``{name: [body lines]}`` of a numpy-style section of ``doc``."""
    lines = doc.split(f"\n{section}\n{'-' * len(section)}\n", 1)[1].split("\n")
    out, name = {}, None
    for line in lines:
        if line and not line.startswith(" "):
            if not re.match(r"^'?\w+'? : ", line):
                break
            name = line.split(" : ")[0].strip("'")
            out[name] = [line]
        elif name is not None and line.strip():
            out[name].append(line.strip())
    return out


@pytest.mark.parametrize("where, section", [(S.sample, "Options"), (Options, "Parameters"), (Sampler, "Options")])
def test_the_docstrings_document_every_option_with_its_default_and_strategies(where, section):
    entries = _entries(where.__doc__, section)
    assert list(entries) == FIELDS
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    for name, lines in entries.items():
        assert lines[0].endswith(f", default {defaults[name]!r}"), lines[0]
        body = " ".join(lines[1:])
        listed = re.match(r"Strategies: (.*?)\. ", body).group(1)
        readers = tuple(n for n, s in strategies.TABLE.items() if name in s.options) or tuple(strategies.TABLE)
        if listed == "all":
            assert readers == tuple(strategies.TABLE), name
        else:
            assert tuple(re.sub(r"^\w+ \((.*)\)$", r"\1", listed).split(", ")) == readers, (name, listed)
        assert len(body) > 40, name


def test_sample_documents_every_strategy_with_its_options():
    entries = _entries(S.sample.__doc__, "Strategies")
    assert list(entries) == list(strategies.TABLE)
    for name, lines in entries.items():
        spec = strategies.TABLE[name]
        body = " ".join(lines[1:])
        assert lines[0] == f"'{name}' : {spec.family}, {spec.paper}"
        own = re.search(r"Options it reads besides the common ones: (.*)\.$", body).group(1)
        assert tuple(own.split(", ")) == spec.options


# ------------------------------------------------------------------------------------------------
# Options.extra: removed, still accepted (deprecated) by the Options constructor
# ------------------------------------------------------------------------------------------------
def test_options_extra_is_deprecated_and_sample_never_took_it():
    with pytest.warns(DeprecationWarning, match="extra"):
        o = Options(extra={"a": 1})
    assert dict(o.extra) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o2 = dataclasses.replace(Options(), temperature=2.0)
        Options().replace(eta=0.5)
    assert o2.temperature == 2.0
    with pytest.raises(InputTypeError, match=r"^extra: unknown option\(s\) of sample"):
        sample(_logits, _absorbing(), shape=(2, 4), steps=2, extra={})


# ------------------------------------------------------------------------------------------------
# the batch state is the run's own
# ------------------------------------------------------------------------------------------------
def test_no_module_writes_the_run_state_or_reads_its_private_fields():
    root = Path(S.__file__).parent
    found = []
    for path in sorted(root.glob("*.py")):
        if path.name == "_engine.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "run":
                        found.append(f"{path.name}:{node.lineno}: writes run.{sub.attr}")
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "run"
                    and node.attr.startswith("_")):
                found.append(f"{path.name}:{node.lineno}: reads run.{node.attr}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("_")):
                found.append(f"{path.name}:{node.lineno}: getattr(..., {node.args[1].value!r})")
    assert not found, found


def test_run_state_is_read_only_from_outside():
    from fastdiff.sampling._engine import _Run

    for name in ("fixed", "values", "prompt", "finished", "kv", "trajectory", "attention_mask"):
        assert isinstance(getattr(_Run, name), property) and getattr(_Run, name).fset is None, name


# ------------------------------------------------------------------------------------------------
# the continuous strategies step through GaussianDiffusion's maths
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddpm", "ddim"])
def test_continuous_strategies_call_the_process_step(monkeypatch, strategy):
    diff = continuous.GaussianDiffusion(schedules.sqrt(30))
    calls = []
    real = getattr(continuous.GaussianDiffusion, f"{strategy}_step")

    def spy(self, *a, **kw):
        calls.append(a[2:4])
        return real(self, *a, **kw)

    monkeypatch.setattr(continuous.GaussianDiffusion, f"{strategy}_step", spy)
    emb = torch.randn(V, 4, generator=torch.Generator().manual_seed(1))
    sample(lambda x, t: 0.5 * x, diff, shape=(2, 3), steps=3, strategy=strategy, embedding=emb)
    assert calls == [(30, 20), (20, 10), (10, 0)]


def test_the_cli_lists_every_strategy_of_the_table() -> None:
    """The CLI's --strategy help (kept free of the sampler's imports so --help stays light) and fastdiff
    bench's sampler plan must name exactly the strategies of the table, family by family."""
    import argparse

    from fastdiff.cli import _common, bench

    p = argparse.ArgumentParser()
    _common._add_sampling(p)
    help_text = next(a.help for a in p._actions if "--strategy" in a.option_strings)
    for fam in ("discrete", "continuous"):
        names = [n for n, s in strategies.TABLE.items() if s.family == fam]
        assert f"{' | '.join(names)} ({fam})" in help_text, (fam, help_text)
        assert bench._SAMPLER_PLANS[fam] == tuple(names)
