"""Run ``fastdiff train`` under torchrun, with rank ``FASTDIFF_TEST_KILL_RANK`` killed by SIGKILL in the
middle of update ``FASTDIFF_TEST_KILL_STEP`` (after its forward and backward, before the optimizer step):
the failure a test of crash recovery needs. Used by tests/test_distributed.py only."""

import os
import signal
import sys

from fastdiff import cli
from fastdiff.training import Trainer

KILL_STEP = int(os.environ["FASTDIFF_TEST_KILL_STEP"])
KILL_RANK = int(os.environ.get("FASTDIFF_TEST_KILL_RANK", "1"))
_losses = Trainer._losses


def _losses_then_die(self, *args, **kwargs):
    out = _losses(self, *args, **kwargs)
    if self.rank == KILL_RANK and self.global_step == KILL_STEP and kwargs.get("train"):
        os.kill(os.getpid(), signal.SIGKILL)
    return out


Trainer._losses = _losses_then_die

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
