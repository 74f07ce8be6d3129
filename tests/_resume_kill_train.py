"""Run ``fastdiff train ARGS`` and kill this process with SIGKILL at an exact point, for crash tests.

``FASTDIFF_TEST_KILL="<point>@<n>"`` (``@<n>`` optional, default 1) kills at the n-th time ``point`` is
reached:

* a point of a checkpoint save (:func:`fastdiff.training.checkpoint._test_point`): ``file:<name>``
  (before writing that file into the temporary directory), ``written`` (the temporary directory is
  complete), ``exchanged`` (a re-save swapped it with the old checkpoint), ``redirected`` /
  ``moved-aside`` / ``moved-in`` (a re-save without an atomic exchange), ``installed`` (the new
  directory is in place, ``latest`` not yet updated);
* ``step:<k>``: during the update that takes the run from step k to k + 1 (after its forward and
  backward, before the optimizer step).

``FASTDIFF_TEST_NO_EXCHANGE=1`` makes the file system look like one without ``RENAME_EXCHANGE``.
Used by tests/test_resume_kill.py only.
"""

import os
import signal
import sys

from fastdiff import cli
from fastdiff.training import Trainer
from fastdiff.training import checkpoint as ckpt

POINT, _, NTH = os.environ["FASTDIFF_TEST_KILL"].partition("@")
NTH = int(NTH or 1)
_seen = {"n": 0}


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _reached(name: str) -> None:
    if name == POINT:
        _seen["n"] += 1
        if _seen["n"] == NTH:
            _die()


ckpt._test_point = _reached
if os.environ.get("FASTDIFF_TEST_NO_EXCHANGE") == "1":
    ckpt._exchange = lambda a, b: False

if POINT.startswith("step:"):
    _losses = Trainer._losses
    KILL_STEP = int(POINT.split(":", 1)[1])

    def _losses_then_die(self, *args, **kwargs):
        out = _losses(self, *args, **kwargs)
        if self.global_step == KILL_STEP and kwargs.get("train"):
            _die()
        return out

    Trainer._losses = _losses_then_die

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
