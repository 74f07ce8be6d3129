"""The op tests (tests/ops, reference and C++ backends) and the fuzz harness under AddressSanitizer
(``scripts/asan.sh``): an ASan build of ``fastdiff._C`` in a scratch copy of the tree, so an out-of-bounds read
or write in a kernel fails the suite even where it would not crash (the outside pass's rounding_loss write past
a buffer returned garbage before it segfaulted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "asan.sh"


def _libasan() -> str:
    if shutil.which("gcc") is None:
        return ""
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else ""


@pytest.mark.install
@pytest.mark.skipif(not SCRIPT.is_file(), reason="scripts/asan.sh is not in this tree (an installed copy)")
@pytest.mark.skipif(not _libasan(), reason="gcc's AddressSanitizer runtime (libasan.so) is not installed")
def test_cpp_kernels_are_clean_under_address_sanitizer():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTDIFF_", "TRITON_"))}
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, (r.stdout[-5000:], r.stderr[-5000:])
