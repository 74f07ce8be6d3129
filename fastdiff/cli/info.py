"""``fastdiff info``: the kernel backends (and why one is unavailable), what the install was built with,
and what ``backend="auto"`` runs on each device."""

from __future__ import annotations

import argparse

HELP = "backends (and why not), what the install was built with, what auto runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``info`` takes no options."""


def command(args: argparse.Namespace) -> int:
    """Run ``fastdiff info``; returns the exit status."""
    import torch

    from .. import __version__, _backends

    for name, be in _backends.available().items():
        print(f"{name:<10} {'available' if be.available else 'unavailable: ' + be.reason}")
    print(f"fastdiff {__version__}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print("built: " + _build_text(_backends.build_info()))
    print(f"auto on cpu: {_backends.summary('cpu')}")
    if torch.cuda.is_available():
        print(f"auto on cuda: {_backends.summary('cuda')}")
    return 0


def _build_text(info: dict) -> str:
    """setup.py's record of the build (``_backends.build_info()``) as one line."""
    if not info:
        return ("no build record (fastdiff/_build_info.json is missing: a source tree that setup.py / pip did not "
                "build)")
    parts = [f"against torch {info['torch']}" if info.get("torch") else "torch version not recorded"]
    for key, what in (("cpp", "C++ extension"), ("cuda", "CUDA extension")):
        if key in info:
            reason = info.get(f"{key}_reason")
            if info[key]:
                parts.append(f"{what} built")
            elif info.get(f"{key}_skipped"):
                parts.append(f"{what} skipped on purpose" + (f" ({reason})" if reason else ""))
            else:
                parts.append(f"{what} not built" + (f" ({reason})" if reason else ""))
    known = {"torch", "cpp", "cuda", "cpp_reason", "cuda_reason", "cpp_skipped", "cuda_skipped"}
    parts += [f"{k} {v}" for k, v in sorted(info.items()) if k not in known]
    return ", ".join(parts)
