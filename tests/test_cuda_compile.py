"""The CUDA sources compile, on any machine with nvcc (CI has no GPU and a CPU-only torch).

* every kernel translation unit ``csrc/cuda/*.cu`` (device and host launcher code) with ``nvcc -c`` for
  sm_80, warnings and ptxas spill warnings as errors;
* ``csrc/cuda/philox.cuh`` compiled by nvcc into a host program whose draws must equal
  :mod:`fastdiff.random` bit for bit;
* the torch binding ``csrc/cuda/binding.cpp``: a syntax-only pass of the host compiler against the
  installed torch headers (a CPU wheel lacks one generated CUDA header, supplied here as a stub).

All compiles run concurrently. Without nvcc the module is skipped with the reason; any compile error
fails the test with the compiler's output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fastdiff import random as R

ROOT = Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"
ARCH = os.environ.get("FASTDIFF_CUDA_CHECK_ARCH", "sm_80")
# One kernel family a file, as csrc/*.cpp and kernels/*.py.
KERNEL_UNITS = ["nearest_embedding.cu", "rounding_loss.cu", "posterior.cu", "sample_categorical.cu",
                "select_tokens.cu"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME): "
                                                      "the CUDA kernels cannot be compile-checked here")

PHILOX_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "philox.cuh"
int main(int argc, char** argv) {
  for (int i = 1; i + 2 < argc; i += 3) {
    const unsigned long long seed = std::strtoull(argv[i], nullptr, 10);
    const unsigned long long offset = std::strtoull(argv[i + 1], nullptr, 10);
    const unsigned long long row = std::strtoull(argv[i + 2], nullptr, 10);
    const fastdiff::Philox4 w = fastdiff::philox4x32_10(seed, (unsigned)row, (unsigned)(row >> 32),
                                                        (unsigned)offset, (unsigned)(offset >> 32));
    std::printf("%u %u %u %u %a\n", w.w[0], w.w[1], w.w[2], w.w[3], fastdiff::row_uniform(seed, offset, row));
  }
  return 0;
}
"""

PHILOX_CASES = [(0, 0, 0), (1234, 77, 5), (2**64 - 1, 2**64 - 1, 2**40 + 3), (2**33 + 7, 0, 2**32 - 1),
                (987654321, 2**35, 123456789012), (42, 3, 2**63 + 5), (7, 0, 2**64 - 1)]


def _cuda_include() -> Path:
    """The toolkit's include folder (nvcc may be a wrapper script: ask it where its TOP is)."""
    tops = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(NVCC).resolve().parent.parent)]
    dry = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    tops += [line.split("TOP=", 1)[1].strip() for line in (dry.stdout + dry.stderr).splitlines() if "TOP=" in line]
    for top in filter(None, tops):
        for inc in (Path(top) / "include", Path(top) / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_runtime.h").is_file():
                return inc
    raise AssertionError(f"cuda_runtime.h not found under any of {tops}")


def _cxx_std() -> str:
    import torch.utils.cpp_extension as ce

    return "-std=c++20" if "c++20" in Path(ce.__file__).read_text() else "-std=c++17"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[int, str, float]]:
    """Start every compile at once; ``name -> (returncode, output, seconds)``."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    jobs: dict[str, list[str]] = {}
    for src in sorted(CUDA_SRC.glob("*.cu")):
        jobs[src.name] = [NVCC, "-std=c++17", f"-arch={ARCH}", "-O3", "-c", str(src), "-o", str(tmp / (src.stem + ".o")),
                          "-I", str(CUDA_SRC), "-Werror", "all-warnings", "-Xptxas", "-warn-spills,-Werror"]
    (tmp / "philox_main.cu").write_text(PHILOX_MAIN)
    jobs["philox"] = [NVCC, "-std=c++17", "-O2", str(tmp / "philox_main.cu"), "-o", str(tmp / "philox_main"),
                      "-I", str(CUDA_SRC)]
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx:
        stub = tmp / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        tinc = Path(torch.__file__).parent / "include"
        # The stub goes last, so a full CUDA torch install's own header wins.
        jobs["binding.cpp"] = [cxx, "-fsyntax-only", _cxx_std(), "-DTORCH_EXTENSION_NAME=_C_cuda",
                               "-I", str(CUDA_SRC), "-I", str(tinc), "-I", str(tinc / "torch" / "csrc" / "api" / "include"),
                               "-I", sysconfig.get_paths()["include"], "-I", str(_cuda_include()),
                               "-idirafter", str(tmp / "stub"), str(CUDA_SRC / "binding.cpp")]
    def run(cmd: list[str]) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        return res.returncode, res.stdout, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    results["_tmp"] = (0, str(tmp), 0.0)
    print("compile times: " + ", ".join(f"{k} {v[2]:.1f}s" for k, v in results.items() if k != "_tmp"))
    return results


def _assert_ok(compiled, name: str) -> None:
    assert name in compiled, f"{name}: not compiled"
    rc, out, _ = compiled[name]
    assert rc == 0, f"{name} failed to compile:\n{out}"


def test_sources_exist():
    names = {p.name for p in CUDA_SRC.glob("*.cu")}
    assert set(KERNEL_UNITS) <= names, names
    setup_py = (ROOT / "setup.py").read_text()  # what setup.py's CUDA build compiles
    assert '"csrc", "cuda", "*.cu"' in setup_py and '"binding.cpp"' in setup_py
    assert (CUDA_SRC / "binding.cpp").is_file()


@pytest.mark.parametrize("name", KERNEL_UNITS)
def test_kernel_translation_unit_compiles(compiled, name):
    _assert_ok(compiled, name)


def test_every_translation_unit_was_compiled(compiled):
    for src in CUDA_SRC.glob("*.cu"):
        _assert_ok(compiled, src.name)


def test_binding_compiles_against_torch_headers(compiled):
    if "binding.cpp" not in compiled:
        pytest.skip("no host C++ compiler (c++/g++) found for the binding's syntax check")
    _assert_ok(compiled, "binding.cpp")


def test_cuda_philox_matches_reference_bit_for_bit(compiled):
    _assert_ok(compiled, "philox")
    exe = Path(compiled["_tmp"][1]) / "philox_main"
    args = [str(v) for case in PHILOX_CASES for v in case]
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
    for (seed, offset, row), line in zip(PHILOX_CASES, out):
        *words, u = line.split()
        mask = 0xFFFFFFFF
        ref = R.philox4x32(seed, torch.tensor([row & mask]), row >> 32, offset & mask, offset >> 32)
        assert [int(w) for w in words] == [int(r.item()) for r in ref], (seed, offset, row)
        want = R.row_uniforms(seed, offset, 1, start=row)  # rows past 2**63: no int64 tensor holds them
        assert float.fromhex(u) == float(want[0]), (seed, offset, row, u, float(want[0]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
