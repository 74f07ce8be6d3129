"""``python -m fastdiff.cli``: the ``fastdiff`` command (as ``python -m fastdiff``)."""

import sys

from . import main

sys.exit(main())
