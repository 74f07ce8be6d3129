#!/usr/bin/env bash
# AddressSanitizer check of the C++ CPU kernels (csrc/README.md): builds an ASan copy of fastdiff._C in a
# scratch copy of the working tree (the working tree's in-place module is never touched), runs the op tests
# (tests/ops, on the reference and C++ backends) and the cross-backend fuzz test against it with the ASan
# runtime preloaded, and fails on any ASan report as well as on any test failure.
#
#   scripts/asan.sh                 # from anywhere in the checkout; exit status 0 = clean
#
# Environment:
#   PYTHON               the interpreter with torch (default: the checkout's .venv/bin/python, else python3)
#   FASTDIFF_ASAN_DIR    the scratch directory (default: a new mktemp -d; removed afterwards unless kept)
#   FASTDIFF_ASAN_KEEP=1 keep the scratch directory (the build and any report) for inspection
#   FASTDIFF_ASAN_TESTS  the test files to run (default below)
#   FASTDIFF_FUZZ_EXAMPLES, FASTDIFF_FUZZ_BACKENDS: passed to tests/test_fuzz.py (default here: 1000 examples on
#                        reference,cpp — Triton's interpreter runs no C++ of ours and would only cost time)
#   FASTDIFF_TEST_BACKENDS: the backends of tests/ops (default here: reference,cpp, for the same reason)
#
# Notes: detect_leaks=0 (CPython and torch keep allocations alive at exit by design); libstdc++ is preloaded
# beside libasan because the python binary does not link it and ASan's __cxa_throw interceptor (hit when a
# kernel raises a ValueError) must find it at start-up; reports go to log_path files, since pytest captures
# stderr. The copy is built with FASTDIFF_NO_CLONES (one instruction-set variant of the hot loops instead of
# three: the same source, a third of the compile time).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
TESTS="${FASTDIFF_ASAN_TESTS:-tests/ops tests/test_fuzz.py}"

LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so)"
if [[ "$LIBASAN" != /* || ! -e "$LIBASAN" ]]; then
  echo "asan.sh: libasan.so not found (gcc -print-file-name=libasan.so gave '$LIBASAN'): install gcc's ASan runtime" >&2
  exit 2
fi

SCRATCH="${FASTDIFF_ASAN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-asan.XXXXXX")}"
mkdir -p "$SCRATCH"
cleanup() { if [[ "${FASTDIFF_ASAN_KEEP:-0}" != 1 ]]; then rm -rf "$SCRATCH"; fi; }
trap cleanup EXIT
start=$(date +%s)

# 1. the working tree as it is (tracked and untracked files that git does not ignore), without its builds
cd "$ROOT"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [[ -e "$f" && ! -d "$f" ]] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$SCRATCH"
rm -f "$SCRATCH"/fastdiff/_C*.so "$SCRATCH"/fastdiff/_C_cuda*.so
# An editable install maps fastdiff.kernels to the working tree's kernels/: point the copy at its own.
ln -sfn ../kernels "$SCRATCH/fastdiff/kernels"

# 2. the instrumented module
cd "$SCRATCH"
echo "asan.sh: building an ASan fastdiff._C in $SCRATCH"
if ! FASTDIFF_SANITIZE=address FASTDIFF_BUILD_CUDA=0 MAX_JOBS=2 CPPFLAGS="${CPPFLAGS:-} -DFASTDIFF_NO_CLONES" \
    "$PY" setup.py build_ext --inplace -j 2 >"$SCRATCH/build.log" 2>&1; then
  tail -n 60 "$SCRATCH/build.log" >&2
  echo "asan.sh: the ASan build failed (log: $SCRATCH/build.log)" >&2
  FASTDIFF_ASAN_KEEP=1
  exit 1
fi
SO=$(ls "$SCRATCH"/fastdiff/_C*.so)
if ! nm -D "$SO" | grep __asan_report >/dev/null; then  # (not grep -q: with pipefail, nm's SIGPIPE would fail it)
  echo "asan.sh: $SO is not instrumented (no __asan_report symbols)" >&2
  exit 1
fi
built=$(date +%s)

# 3. the tests, against the copy (PYTHONPATH first, so neither the editable install nor the working tree is used)
REPORT="$SCRATCH/asan-report"
set +e
PYTHONPATH="$SCRATCH" \
ASAN_OPTIONS="detect_leaks=0:log_path=$REPORT:halt_on_error=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
LD_PRELOAD="$LIBASAN $LIBSTDCXX" \
FASTDIFF_FUZZ_BACKENDS="${FASTDIFF_FUZZ_BACKENDS:-reference,cpp}" \
  "$PY" -c "import torch, fastdiff, fastdiff._C as c, sys; sys.exit(0 if c.__file__.startswith('$SCRATCH') else 3)"
where=$?
if [[ $where != 0 ]]; then
  echo "asan.sh: the copy's fastdiff._C was not the one imported (rc $where)" >&2
  exit 1
fi
PYTHONPATH="$SCRATCH" \
ASAN_OPTIONS="detect_leaks=0:log_path=$REPORT:halt_on_error=1:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
LD_PRELOAD="$LIBASAN $LIBSTDCXX" \
FASTDIFF_FUZZ_EXAMPLES="${FASTDIFF_FUZZ_EXAMPLES:-1000}" FASTDIFF_FUZZ_BACKENDS="${FASTDIFF_FUZZ_BACKENDS:-reference,cpp}" \
FASTDIFF_TEST_BACKENDS="${FASTDIFF_TEST_BACKENDS:-reference,cpp}" \
  "$PY" -m pytest $TESTS -q -p no:cacheprovider
rc=$?
set -e
done_at=$(date +%s)

if ls "$REPORT".* >/dev/null 2>&1; then
  for f in "$REPORT".*; do echo "=== $f"; cat "$f"; done >&2
  echo "asan.sh: AddressSanitizer reported errors (above)" >&2
  FASTDIFF_ASAN_KEEP=1
  exit 1
fi
if [[ $rc != 0 ]]; then
  echo "asan.sh: the tests failed under ASan (pytest rc $rc)" >&2
  exit "$rc"
fi
echo "asan.sh: clean (no ASan report): build $((built - start)) s, tests $((done_at - built)) s"
