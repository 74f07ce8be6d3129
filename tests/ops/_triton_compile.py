"""Compile a Triton kernel for a GPU without one (tests of kernels whose GPU build the interpreter never does).

The tests run the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set before they are imported), so
the compiler's front end (types of loop-carried values, constexpr branches) and its register allocation are never
exercised here. :func:`compile_sm90` runs, in a fresh interpreter without ``TRITON_INTERPRET``, Triton's full
pipeline for an sm_90 target (TTIR, TTGIR, LLVM IR, PTX) and ``ptxas -v`` on the PTX, and returns, per
configuration, ``ptxas``'s spill-store bytes and register count (or the error text).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
module, kernel, configs = json.loads(sys.argv[1])
fn = getattr(importlib.import_module("fastdiff.kernels." + module), kernel)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = []
for types, consts, num_warps in configs:
    consts = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v for k, v in consts.items()}
    sig = dict(types)
    sig.update({k: "constexpr" for k in consts})
    try:
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ck.asm["ptx"])
        r = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
        spill = re.search(r"(\d+) bytes spill stores", r.stderr)
        regs = re.search(r"Used (\d+) registers", r.stderr)
        out.append({"spill": int(spill.group(1)) if spill else None, "regs": int(regs.group(1)) if regs else None,
                    "error": None if r.returncode == 0 else r.stderr[-2000:]})
    except Exception as e:  # the compiler's message is the test's failure text
        out.append({"spill": None, "regs": None, "error": f"{type(e).__name__}: {str(e)[-2000:]}"})
print(json.dumps(out))
"""


def ptxas_available() -> bool:
    """Whether the installed Triton ships the ptxas it compiles with (the NVIDIA backend)."""
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def compile_sm90(module: str, kernel: str, configs: list[tuple[dict, dict, int]]) -> list[dict]:
    """``configs``: ``(argument types, constexpr values, num_warps)`` each; a dtype constexpr as the string
    ``"tl.float32"``. Returns ``{"spill", "regs", "error"}`` per configuration."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([module, kernel, configs])], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
