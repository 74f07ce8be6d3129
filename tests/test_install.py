"""Installs keep their word: the sdist builds the extension in a fresh venv, a machine with no compiler
gets a pure-Python install that says so, pip's build isolation stops with the reason instead of
downgrading, and an extension built for another torch is refused with both versions named.

The builds run on a scratch copy of the checkout (the files git knows), never in the working tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from fastdiff import _backends, ops
from fastdiff.ops import _dispatch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.install


def _git_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the sdist's own files are what a checkout tracks)")
    dst = tmp_path_factory.mktemp("src")
    for f in _git_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        (dst / f).write_bytes((ROOT / f).read_bytes())
    return dst


def _env(**kw: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDIFF_")}
    env.update(kw)
    return env


def test_no_compiler_installs_pure_python_and_records_why(source_copy, tmp_path):
    """CC=/bin/false CXX=/bin/false with --no-build-isolation: a pure-Python wheel (no .so), whose build
    record names the compiler problem; the shipped files are all in it."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                        str(source_copy), "-w", str(tmp_path)], capture_output=True, text=True,
                       env=_env(CC="/bin/false", CXX="/bin/false"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = tmp_path.glob("fastdiff-*.whl")
    assert whl.name.endswith("-py3-none-any.whl"), whl.name
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        info = json.loads(z.read("fastdiff/_build_info.json"))
    assert not [n for n in names if n.endswith(".so")], "a binary in a no-compiler wheel"
    assert info["cpp"] is False and not info["cpp_skipped"]
    assert "compiler" in info["cpp_reason"] and "/bin/false" in info["cpp_reason"], info
    assert info["torch"] == torch.__version__
    # What the README and the code refer to ships in the wheel.
    for m in ("discrete", "continuous", "causal_lm", "classifier"):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "command.txt", "train_log.jsonl"):
            assert f"fastdiff/assets/{m}/{f}" in names, f"{m}/{f} missing"
    for f in ("latent.json", "autoencoder.safetensors", "denoiser.safetensors", "command.txt", "train_log.jsonl",
              "plm/config.json", "plm/generation_config.json", "plm/model.safetensors", "plm/fastdiff_tokenizer.json"):
        assert f"fastdiff/assets/latent/{f}" in names, f"latent/{f} missing"
    for f in ("fastdiff/assets/README.md", "fastdiff/assets/tokenizer.json", "fastdiff/assets/tokenizer.md",
              "fastdiff/kernels/posterior.py", "fastdiff/ops/backends/cpp/posterior.py",
              "fastdiff/ops/backends/cuda/posterior.py", "fastdiff/ops/backends/triton/posterior.py"):
        assert f in names, f"{f} missing"


def test_build_without_torch_stops_with_the_reason(source_copy, tmp_path):
    """What pip's default build isolation does (torch not importable at build time): the build fails and
    says how to get the kernels or a deliberate pure-Python install; it does not produce a pure wheel."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (test)')\n")
    r = subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path / "dist")],
                       cwd=source_copy, capture_output=True, text=True, env=_env(PYTHONPATH=str(fake)), timeout=600)
    assert r.returncode != 0
    assert "torch is not importable in the build environment" in r.stderr
    assert "--no-build-isolation" in r.stderr and "FASTDIFF_SKIP_EXT=1" in r.stderr
    assert not list(tmp_path.glob("dist/*.whl"))
    # With FASTDIFF_SKIP_EXT=1 the same build is a deliberate pure-Python wheel, recorded as such.
    r = subprocess.run([sys.executable, "setup.py", "-q", "bdist_wheel", "-d", str(tmp_path / "dist2")],
                       cwd=source_copy, capture_output=True, text=True,
                       env=_env(PYTHONPATH=str(fake), FASTDIFF_SKIP_EXT="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist2").glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        info = json.loads(z.read("fastdiff/_build_info.json"))
    assert info["cpp"] is False and info["cpp_skipped"] is True


def test_sdist_installs_into_a_fresh_venv_with_the_extension(tmp_path):
    """scripts/check_sdist.sh: sdist -> fresh venv -> pip install --no-build-isolation (compiles the C++
    module) -> the installed package's extension loads, auto runs it, the main job and the C++ op tests
    pass against the installed copy (minutes: one C++ build)."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_sdist.sh"), str(tmp_path / "w")], capture_output=True,
                       text=True, env=_env(PYTHON=sys.executable), timeout=3000)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert "installed package ok" in r.stdout and "check_sdist: ok" in r.stdout


# -------------------------------------------------------------------------------------------------
# Run time: what the build record makes of a broken or downgraded install (no build needed)
# -------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_backends(monkeypatch):
    """Clear the probes' caches around a test that fakes the build record."""
    def clear():
        for f in (_backends.build_info, _backends.cpp, _backends.cuda, _backends.triton):
            f.cache_clear()
        _backends._warned.clear()
    clear()
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    yield lambda info: monkeypatch.setattr(_backends, "build_info", lambda: info)
    monkeypatch.undo()
    clear()


def _ops_call(backend: str):
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    return ops.sample_categorical(logits, seed=1, backend=backend)


def test_extension_built_for_another_torch_is_refused_naming_both_versions(fresh_backends):
    fresh_backends({"torch": "1.0.0", "cpp": True, "cuda": False})
    be = _backends.cpp()
    assert not be.available and be.broken
    assert "torch 1.0.0" in be.reason and torch.__version__ in be.reason
    with pytest.raises(_dispatch.BackendUnavailableError, match="built for torch 1.0.0"):
        _ops_call("cpp")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = _ops_call("auto")
        b = _ops_call("auto")
    fall = [x for x in w if issubclass(x.category, _backends.BackendFallbackWarning)]
    assert len(fall) == 1 and "torch 1.0.0" in str(fall[0].message), [str(x.message) for x in w]
    assert torch.equal(a, ops.sample_categorical_ref(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)),
                                                     seed=1)) and torch.equal(a, b)
    assert _backends.auto_choice("cpu") == "reference"
    assert "built for torch 1.0.0" in _backends.summary("cpu")


def test_no_compiler_install_warns_at_run_time(fresh_backends):
    fresh_backends({"torch": torch.__version__, "cpp": False, "cpp_skipped": False,
                    "cpp_reason": "no C++ compiler found (CXX=/bin/false)"})
    be = _backends.cpp()
    assert not be.available and be.broken and "/bin/false" in be.reason
    with pytest.warns(_backends.BackendFallbackWarning, match="not built at install time"):
        _ops_call("auto")
    assert _backends.summary("cpu").startswith("reference (cpp: ")


def test_deliberate_pure_python_install_is_quiet(fresh_backends):
    fresh_backends({"torch": None, "cpp": False, "cpp_skipped": True, "cpp_reason": "FASTDIFF_SKIP_EXT=1 was set"})
    be = _backends.cpp()
    assert not be.available and not be.broken and "FASTDIFF_SKIP_EXT=1" in be.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error", _backends.BackendFallbackWarning)
        _ops_call("auto")


def test_this_install_records_what_it_built():
    """The checkout's own editable build wrote its record, and it matches what loads."""
    info = _backends.build_info()
    if not info:
        pytest.skip("this tree was never built with setup.py (no fastdiff/_build_info.json)")
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert _backends.cpp().available == bool(info["cpp"]), (_backends.cpp().reason, info)
