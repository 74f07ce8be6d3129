"""Command line (console script ``fastdiff``; also ``python -m fastdiff`` and ``python -m fastdiff.cli``).

``fastdiff generate`` (the main job, also plain ``fastdiff``): text from the bundled model or a checkpoint.
``fastdiff train``: train a model (config file and/or flags; resumes). ``fastdiff eval``: generative
perplexity, distinct-n, attribute accuracy, BLEU. ``fastdiff bench``: ops and sampler, one table.
``fastdiff info``: backends, what the install was built with, what ``auto`` runs. ``fastdiff demo``: every
op timed on random weights (the pre-model main job).

One module per subcommand (:mod:`~fastdiff.cli.generate`, :mod:`~fastdiff.cli.eval`,
:mod:`~fastdiff.cli.train`, :mod:`~fastdiff.cli.bench`, :mod:`~fastdiff.cli.info`,
:mod:`~fastdiff.cli.demo`), each with ``add_arguments(parser)`` and the function that runs it; the helpers
they share (argument types, checks, output files, memory) are in :mod:`fastdiff.cli._common`, whose public
names this package re-exports.

Errors: a bad option, a bad path, a corrupted checkpoint or any other bad input (a
:class:`fastdiff.errors.FastdiffError`, an argparse error, an ``OSError`` about a path the user gave) ends
with one ``fastdiff: error: ...`` line and exit status 2; anything else is a bug of ours and ends with
its traceback. Numeric options are checked when the command line is parsed, output paths (``-o``,
``--json``) before any work, and the sizes of a generation against the memory there is before anything
is allocated. Output files are written to a temporary file in the same directory and renamed, so a
failed run leaves neither a partial file nor a temporary one. A closed pipe (``fastdiff info | head``)
ends quietly with status 141; Ctrl-C with status 130.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FastdiffError
from . import bench, demo, generate, info, train
from . import eval as eval_
from ._common import (
    BACKEND_CHOICES,
    EPIPE_STATUS,
    _about_user_path,
    _fail,
    _Help,
    _os_error_text,
    _Parser,
    _quiet_stdout,
    _user_paths,
    available_memory,
    check_writable,
    device_name,
    finite_float,
    non_negative_int,
    nonnegative_float,
    plan_batch,
    positive_int,
    probability,
    sample_bytes,
    seed_int,
    unit_interval,
    write_atomic,
)

__all__ = ["BACKEND_CHOICES", "EPIPE_STATUS", "available_memory", "build_parser", "check_writable", "device_name",
           "finite_float", "main", "non_negative_int", "nonnegative_float", "plan_batch", "positive_int",
           "probability", "sample_bytes", "seed_int", "unit_interval", "write_atomic"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fastdiff`` parser: one subparser per subcommand, each filled by its module's ``add_arguments``;
    ``args.func(args)`` runs the command and returns its exit status."""
    parser = _Parser(prog="fastdiff", formatter_class=_Help,
                     description="Kernel-backed text diffusion: generate, train, evaluate, benchmark. Without a "
                                 "command: fastdiff generate.")
    sub = parser.add_subparsers(dest="command")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    for name, module, run in (("generate", generate, generate.command), ("eval", eval_, eval_.command),
                              ("train", train, train.run), ("bench", bench, bench.command),
                              ("info", info, info.command), ("demo", demo, demo.command)):
        p = command(name, module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input, 130 interrupted, 141 closed pipe)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]
    args = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad option (2, its message already printed)
            sys.stdout.flush()
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EPIPE_STATUS
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130
    except FastdiffError as e:
        return _fail(str(e))
    except OSError as e:
        # ours, deliberately: an OSError raised with a message only (e.g. "checkpoint: ... does not exist");
        # the user's: one about a path they gave. Anything else (a file of the install, ...) is a bug.
        if (e.errno is None and e.filename is None) or (args is not None and _about_user_path(e, _user_paths(args))):
            return _fail(_os_error_text(e))
        raise
