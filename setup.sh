#!/usr/bin/env bash
# One command: create .venv, install the CPU torch wheel, Triton and fastdiff (building its C++ extension),
# then run the main job (fastdiff generate on the bundled model). Re-running is cheap: installed pieces are kept.
#   PYTHON=python3.11 ./setup.sh        pick the interpreter
#   FASTDIFF_SKIP_EXT=1 ./setup.sh      skip the C++/CUDA build (pure Python)
#   FASTDIFF_EXTRAS=test                extras to install (default: test)
#   FASTDIFF_TRITON=none ./setup.sh     skip Triton (default triton==3.8.0: the tests run its CPU interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${FASTDIFF_TORCH:-torch==2.13.0}
TRITON_SPEC=${FASTDIFF_TRITON:-triton==3.8.0}
EXTRAS=${FASTDIFF_EXTRAS:-test}
PIP=(-m pip install -q --disable-pip-version-check)

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# Pin torch first: an unpinned 'torch' requirement can pull a multi-GB CUDA build.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" "${PIP[@]}" "$TORCH_SPEC"
fi
"$VPY" "${PIP[@]}" "setuptools>=77" wheel
# Triton: the test suite runs the Triton kernels in its CPU interpreter (3.8.0: 3.6's breaks on numpy >= 2.4),
# so this command and CI run the same suite. Where no wheel exists the install goes on and says so.
if [ "$TRITON_SPEC" != none ] && ! "$VPY" -c "import triton" 2>/dev/null; then
  "$VPY" "${PIP[@]}" "$TRITON_SPEC" \
    || echo "setup.sh: WARNING: could not install $TRITON_SPEC here; the Triton tests will be skipped" >&2
fi
# --no-build-isolation: the extension must be built against the torch installed above.
"$VPY" "${PIP[@]}" --no-build-isolation -e ".[${EXTRAS}]"
# Say so when the kernels did not build (no working compiler): fastdiff then runs its PyTorch references.
"$VPY" -c "from fastdiff import _backends as b; c = b.cpp(); c.available or print('setup.sh: WARNING: no C++ kernels, fastdiff runs its PyTorch references: ' + c.reason)" >&2
echo "== fastdiff installed in $(pwd)/.venv; running the main job =="
.venv/bin/fastdiff
