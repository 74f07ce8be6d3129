#!/usr/bin/env bash
# Build, test and benchmark every GPU path of fastdiff in one command, on a machine with an NVIDIA GPU.
#
#   bash scripts/gpu.sh                 # from the repository root (or anywhere: it cd's there)
#
# Needs: nvcc, a CUDA build of torch, pytest, pytest-benchmark, scipy, hypothesis (and triton for the
# Triton paths) already installed: nothing is downloaded, so it runs on machines without internet.
# Steps:
#   1. report the machine (GPU, driver, torch / CUDA / Triton versions);
#   2. build the extensions in place (fastdiff._C and fastdiff._C_cuda) with FASTDIFF_BUILD_CUDA=1
#      for this GPU's architecture (override with FASTDIFF_CUDA_ARCHS="80;90");
#   3. run the GPU tests: pytest tests -k "cuda or triton or dispatch or custom_op" (FASTDIFF_GPU_ALL_TESTS=1: all tests);
#   4. the models on the GPU: fastdiff generate on the bundled checkpoints with every backend, a short bf16
#      training run and its resume, and the fastdiff bench table (benchmarks/results/<gpu-name>-bench.json);
#   5. scale-out: scripts/scaleout_bench.py over all GPUs with NCCL (benchmarks/results/<gpu-name>-scaleout.json)
#      when there are two or more, else a one-process torchrun launch and the gloo tests;
#   6. run the benchmarks on the GPU: pytest benchmarks --benchmark-only, saved as
#      benchmarks/results/<gpu-name>.json, with everything this script prints in benchmarks/results/<gpu-name>.txt.
# Environment: PYTHON (default python3), FASTDIFF_BENCH_SMALL=1 (benchmarks at 1/8 size),
# FASTDIFF_GPU_OUT=DIR (also copy the .json and .txt there), MAX_JOBS (parallel compiles, default nproc).
# Exit status: non-zero if the build, the tests or the benchmarks failed (later steps still run after a
# test failure, so one run on a borrowed GPU yields as much as it can).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: needs a CUDA build of torch that sees a GPU ($PY: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1))" >&2
  exit 2
fi
GPU_NAME="$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")"
RESULTS="$ROOT/benchmarks/results"
mkdir -p "$RESULTS"
LOG="$RESULTS/$GPU_NAME.txt"
JSON="$RESULTS/$GPU_NAME.json"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S) UTC)"; }

step "machine"
git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
nvcc --version | tail -2
"$PY" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {p.name}, sm_{p.major}{p.minor}, "
      f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the Triton paths will be skipped by the tests and benchmarks)")
PY

step "build (FASTDIFF_BUILD_CUDA=1, in place)"
ARCH="$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}{b}')")"
export FASTDIFF_CUDA_ARCHS="${FASTDIFF_CUDA_ARCHS:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
t0=$(date +%s)
if FASTDIFF_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace; then
  echo "build: ok in $(( $(date +%s) - t0 )) s (archs $FASTDIFF_CUDA_ARCHS)"
else
  # setup.py builds the C++ module too; if that part broke, still build the CUDA module alone, so the
  # GPU paths get tested, and report the failure in the exit status.
  echo "build: setup.py FAILED after $(( $(date +%s) - t0 )) s; building fastdiff._C_cuda alone"
  status=1
  "$PY" - <<'PY' || { echo "build: the CUDA module failed to build"; exit 3; }
import glob, os, shutil, sysconfig
from torch.utils.cpp_extension import load
archs = [a for a in os.environ["FASTDIFF_CUDA_ARCHS"].replace(",", ";").split(";") if a]
os.makedirs("build/cuda_only", exist_ok=True)
mod = load("_C_cuda", sources=sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/binding.cpp"],
           extra_include_paths=[os.path.abspath("csrc/cuda")], extra_cflags=["-O3"],
           extra_cuda_cflags=["-O3", *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]],
           build_directory="build/cuda_only", verbose=True)
dst = os.path.join("fastdiff", "_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
shutil.copy(mod.__file__, dst)
print("built", dst)
PY
fi
"$PY" - <<'PY' || status=1
import fastdiff
for name, be in fastdiff.available_backends().items():
    print(f"backend {name:9s}: {'ok' if be.available else 'unavailable: ' + be.reason}")
assert fastdiff.available_backends()["cuda"].available, "the CUDA backend did not load after the build"
PY

step "GPU tests"
if [ "${FASTDIFF_GPU_ALL_TESTS:-0}" = "1" ]; then sel=(); else sel=(-k "cuda or triton or dispatch or custom_op"); fi
"$PY" -m pytest tests "${sel[@]}" -q -ra -p no:cacheprovider || { echo "tests: FAILED"; status=1; }

step "models on the GPU: generate (bundled, every backend), a short bf16 training run with resume, bench table"
for be in auto cuda triton reference; do
  "$PY" -m fastdiff.cli generate --device cuda --backend "$be" -n 64 --steps 64 --no-progress --quiet \
    | tail -1 | sed "s/^/generate backend=$be: /" || { echo "generate ($be): FAILED"; status=1; }
done
"$PY" -m fastdiff.cli generate -c continuous --device cuda -n 64 --steps 64 --no-progress --quiet | tail -1 \
  || { echo "generate continuous: FAILED"; status=1; }
TMPRUN="$(mktemp -d)"
"$PY" -m fastdiff.cli train --device cuda --family continuous --task attribute --steps 40 --ckpt-every 20 \
  --log-every 10 --out "$TMPRUN/run" --no-progress \
  && "$PY" -m fastdiff.cli train --resume "$TMPRUN/run" --steps 60 --no-progress \
  || { echo "train (cuda, bf16 autocast): FAILED"; status=1; }
rm -rf "$TMPRUN"
"$PY" -m fastdiff.cli bench --device cuda --json "$RESULTS/$GPU_NAME-bench.json" || { echo "bench: FAILED"; status=1; }

step "scale-out: torchrun over the GPUs (NCCL), 1 vs N processes"
NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if [ "$NGPU" -ge 2 ]; then
  "$PY" scripts/scaleout_bench.py --device cuda --nproc "$NGPU" --samples 1024 --global-batch 64 \
    --json "$RESULTS/$GPU_NAME-scaleout.json" || { echo "scale-out: FAILED"; status=1; }
else
  # NCCL takes one GPU per process: with a single GPU, run the launch path with one process (no group)
  # and the gloo scale-out tests on the CPU.
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m fastdiff generate --device cuda -n 64 \
    --no-progress --quiet | tail -1 || { echo "torchrun generate: FAILED"; status=1; }
  "$PY" -m pytest tests/test_distributed.py -q -p no:cacheprovider || { echo "scale-out tests: FAILED"; status=1; }
fi

step "benchmarks"
"$PY" -m pytest benchmarks --benchmark-only --benchmark-json "$JSON" -q -p no:cacheprovider \
  --benchmark-columns=min,median,max,rounds --benchmark-sort=name || { echo "benchmarks: FAILED"; status=1; }

step "done: status $status; log $LOG, benchmarks $JSON"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete once tee has exited
if [ -n "${FASTDIFF_GPU_OUT:-}" ]; then
  mkdir -p "$FASTDIFF_GPU_OUT" && cp -f "$LOG" "$JSON" "$FASTDIFF_GPU_OUT"/ 2>/dev/null
fi
exit $status
