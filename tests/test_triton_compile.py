"""Every Triton kernel variant compiles for a GPU, checked on a CPU machine: Triton's front end (AST to
TTIR) for every constexpr combination the launchers use, and the whole pipeline down to a cubin with
the bundled ptxas (sm_90) for the most involved variants. The interpreter runs Python semantics that
compiled Triton rejects (a loop carrying a constexpr, branches yielding different types), so this
catches what the interpreter tests cannot, without a GPU. Runs in a subprocess: the kernels must be
decorated without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="optional backend: triton is not installed (pip install 'fastdiff[triton]')")

CHECK = r'''
import importlib, sys
import triton, triton.language as tl
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from fastdiff import _backends

_backends._import_kernels()
ne, rl, po, sc = (importlib.import_module(f"fastdiff.kernels.{m}")
                  for m in ("nearest_embedding", "rounding_loss", "posterior", "sample_categorical"))
from fastdiff.ops.backends.triton import sample_categorical as scg  # the launcher's top-p tile constants
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
FULL = {"rl bwd bf16 bias=True", "posterior bf16 kind=1 sample=True", "sample fp32 topk=True topp=True"}
failures = []


def check(fn, types, consts, label):
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    try:
        if label in FULL:
            triton.compile(src, target=target, options={"num_warps": 4})
        else:
            options = backend.parse_options({"num_warps": 4})
            context = ir.context()
            ir.load_dialects(context)
            backend.load_dialects(context)
            src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                        context)
    except Exception as e:  # report every failing variant, not only the first
        failures.append(f"{label}: {type(e).__name__}: {str(e)[:2000]}")


P = lambda dt: "*" + dt  # noqa: E731
for dt, acc in (("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
    dot = dt != "fp64"
    blk = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64) if dot else dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=8)
    gemm = dict(N="i32", V="i32", D="i32", stride_xn="i32", stride_wv="i32")
    for cos in (False, True):
        types = dict(x_ptr=P(dt), w_ptr=P(dt), aux_ptr=P(acc), best_ptr=P(acc), second_ptr=P(acc), arg_ptr="*i64",
                     v_per_split="i32", n_splits="i32", **gemm)
        check(ne._nearest_embedding_fwd_kernel, types,
              dict(COSINE=cos, USE_DOT=dot, PRECISION="ieee", UPCAST=False, **blk), f"nearest {dt} cos={cos}")
    for hb in (False, True):
        types = dict(x_ptr=P(dt), w_ptr=P(dt), b_ptr=P(acc), tgt_ptr="*i64", m_ptr=P(acc), s_ptr=P(acc),
                     zt_ptr=P(acc), v_per_split="i32", n_splits="i32", **gemm)
        check(rl._rounding_loss_fwd_kernel, types, dict(HAS_BIAS=hb, USE_DOT=dot, PRECISION="ieee", UPCAST=False,
              **blk), f"rl fwd {dt} bias={hb}")
        types = dict(x_ptr=P(dt), w_ptr=P(dt), b_ptr=P(acc), tgt_ptr="*i64", lse_ptr=P(acc), g_ptr=P(acc),
                     dx_ptr=P(acc), dw_ptr=P(acc), db_ptr=P(acc), **gemm)
        check(rl._rounding_loss_bwd_kernel, types, dict(HAS_BIAS=hb, NEED_DX=True, NEED_DW=True, NEED_DB=hb,
              USE_DOT=dot, PRECISION="ieee", UPCAST=False, **blk), f"rl bwd {dt} bias={hb}")
for dt in ("bf16", "fp32", "fp64"):
    f64 = dt == "fp64"
    wdt = tl.float64 if f64 else tl.float32
    for kind in (0, 1, 2, 3):
        for sample in (False, True):
            types = dict(logits_ptr=P(dt), stride_l="i32", xt_ptr="*i64", t_ptr="*i64", s_ptr="*i64",
                         at_ptr="*fp64", as_ptr="*fp64", ab_ptr="*fp64", fact_ptr="*fp64", qbar_ptr="*fp64",
                         pair_ptr="*i64", probs_ptr=P("fp64" if f64 else "fp32"), tok_ptr="*i64", V="i32",
                         n_tab="i32", mask_id="i32", temperature_bits="i64", seed_lo="i64", seed_hi="i32", off_lo="i32",
                         off_hi="i32", row_lo="i64", row_hi="i32")
            check(po._posterior_fwd_kernel, types, dict(KIND=kind, SAMPLE=sample, WDT=wdt,
                  BLOCK=128 if kind == 3 else 4096, BLOCK_I=32), f"posterior {dt} kind={kind} sample={sample}")
    for greedy, topk, topp in ((True, False, False), (False, False, False), (False, True, False),
                               (False, False, True), (False, True, True)):
        types = dict(logits_ptr=P(dt), stride_l="i32", tok_ptr="*i64", V="i32", temperature_bits="i64",
                     top_k="i32", top_p_bits="i64", seed_lo="i64", seed_hi="i32", off_lo="i32", off_hi="i32",
                     row_lo="i64", row_hi="i32", stats_ptr="*i64", scratch_ptr="*fp64")
        check(sc._sample_categorical_fwd_kernel, types, dict(
              GREEDY=greedy, HAS_TOPK=topk, HAS_TOPP=topp, XDT=wdt, WDT=tl.float64 if (f64 or topp) else tl.float32,
              KEY=tl.int64 if f64 else tl.int32, SIGN_OFF=0x7FFFFFFFFFFFFFFF if f64 else 0x7FFFFFFF, BLOCK=4096,
              KSPLIT=scg.TOPP_SPLIT, SBLOCK=scg.TOPP_TILE, STATS=False, CAP=scg.TOPP_CAP,
              GBLOCK=scg.guess_tile(4096)),
              f"sample {dt} " + ("greedy" if greedy else f"topk={topk} topp={topp}"))
print("\n".join(failures) if failures else "ok")
sys.exit(1 if failures else 0)
'''


def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, every run
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.stdout + res.stderr)[-6000:]
