#!/usr/bin/env bash
# Build the sdist of this checkout and install it the way a user would, into a fresh venv, with the C++
# extension compiled; then check the installed package (not the checkout): the extension loads and is
# what `auto` runs, the shipped files are there, the CLI's main job runs, and the op tests pass on the C++
# backend (tests/ops with FASTDIFF_TEST_BACKENDS=cpp).
#   scripts/check_sdist.sh [WORKDIR]      (default: a new temporary directory, removed at the end)
# Env: PYTHON (interpreter for the venv, default python3), FASTDIFF_TORCH (default torch==2.13.0).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
TORCH_SPEC=${FASTDIFF_TORCH:-torch==2.13.0}
PIP=(-m pip install -q --disable-pip-version-check)
if [ $# -ge 1 ]; then WORK="$1"; mkdir -p "$WORK"; else WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT; fi
say() { echo "== check_sdist: $*"; }

# 1. The sdist, from the files git knows (tracked, and new ones not ignored), in a scratch copy so the
#    checkout gets no build/ or egg-info.
say "sdist of $ROOT"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -I{} sh -c '[ -f "{}" ] && echo "{}"' \
  | tar -cf - -T -) | tar -xf - -C "$WORK/src"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" "${PIP[@]}" "$TORCH_SPEC"
"$VPY" "${PIP[@]}" "setuptools>=77" wheel
(cd "$WORK/src" && "$VPY" setup.py -q sdist -d "$WORK/dist" >/dev/null 2>&1)
SDIST=$(ls "$WORK"/dist/fastdiff-*.tar.gz)
say "built $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KiB)"

# 2. Install it into the fresh venv, compiling the extension against that venv's torch.
say "pip install --no-build-isolation $(basename "$SDIST")"
MAX_JOBS=${MAX_JOBS:-2} "$VPY" "${PIP[@]}" --no-build-isolation "$SDIST[test]"

# 3. Check the installed package from a directory with no fastdiff/ in it.
mkdir -p "$WORK/run" && cd "$WORK/run"
"$VPY" - <<'EOF'
import json, pathlib
import fastdiff, fastdiff._backends as b
pkg = pathlib.Path(fastdiff.__file__).parent
assert "site-packages" in str(pkg), f"fastdiff imported from {pkg}, not the installed package"
info = b.build_info()
assert info.get("cpp") is True, f"the sdist install did not build the C++ extension: {info}"
assert b.cpp().available, b.cpp().reason
assert b.auto_choice("cpu") == "cpp", b.summary("cpu")
import torch  # the C++ kernels are registered as torch.library ops when the extension loads
assert hasattr(torch.ops.fastdiff_cpp, "posterior"), "fastdiff_cpp::posterior is not registered"
missing = [p for p in ["assets/README.md", "assets/tokenizer.json", "assets/tokenizer.md", "_build_info.json",
                       *[f"assets/{m}/{f}" for m in ("discrete", "continuous", "causal_lm", "classifier")
                         for f in ("config.json", "model.safetensors", "tokenizer.json", "command.txt",
                                   "train_log.jsonl")],
                       *[f"assets/latent/{f}" for f in ("latent.json", "autoencoder.safetensors", "denoiser.safetensors",
                                                         "command.txt", "train_log.jsonl", "plm/config.json",
                                                         "plm/model.safetensors", "plm/fastdiff_tokenizer.json")]]
           if not (pkg / p).is_file()]
assert not missing, f"not installed: {missing}"
print("installed package ok:", pkg, json.dumps(info))
EOF
"$WORK/venv/bin/fastdiff" info
"$WORK/venv/bin/fastdiff" generate -n 2 --steps 4 --no-progress
"$WORK/venv/bin/fastdiff" generate -c latent -n 2 --steps 4
# The op tests on the C++ backend against the installed package (the tests ship in the sdist).
tar -xzf "$SDIST" -C "$WORK/run" --strip-components=1 --wildcards '*/tests/*'
FASTDIFF_TEST_BACKENDS=cpp "$VPY" -m pytest -q -p no:cacheprovider tests/ops -x
say "ok"
