#!/usr/bin/env bash
# One command: create .venv, install the CPU torch wheel and fastdiff (building any extension),
# then run the main job (fastdiff generate on the bundled model). Re-running is cheap: installed pieces are kept.
#   PYTHON=python3.11 ./setup.sh        pick the interpreter
#   FASTDIFF_SKIP_EXT=1 ./setup.sh      skip the C++/CUDA build (pure Python)
#   FASTDIFF_EXTRAS=test,triton         extras to install (default: test)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${FASTDIFF_TORCH:-torch==2.13.0}
EXTRAS=${FASTDIFF_EXTRAS:-test}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# Pin torch first: an unpinned 'torch' requirement can pull a multi-GB CUDA build.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
"$VPY" -m pip install -q --disable-pip-version-check "setuptools>=77" wheel
# --no-build-isolation: the extension must be built against the torch installed above.
"$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[${EXTRAS}]"
echo "== fastdiff installed in $(pwd)/.venv; running the main job =="
.venv/bin/fastdiff
