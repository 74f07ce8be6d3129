"""Triton kernels for fastdiff's ops, installed as ``fastdiff.kernels``: the ``@triton.jit`` functions only,
one kernel family a file (``nearest_embedding``, ``rounding_loss``, ``posterior``, ``sample_categorical``;
shared jit helpers in ``_common``). Their launchers, ``torch.library`` custom ops and entry points live in
``fastdiff/ops/backends/triton/`` (``backend="triton"``). Importing this package imports nothing; a kernel
module needs ``triton`` but no GPU.
"""

if __name__ != "fastdiff.kernels":
    # A checkout's root on sys.path (``python -m pytest``, ``python -c``, a script run from there) makes this
    # directory importable as a top-level ``kernels``, a name other libraries import: transformers >= 5
    # depends on Hugging Face's ``kernels`` package and imports it with ``import transformers``. Two rules:
    # * the kernel files must not run a second time under another name (kernels/_common.py refuses to: every
    #   kernel would be compiled twice);
    # * the real ``kernels`` must not be shadowed: if another ``kernels`` is importable from the rest of
    #   sys.path, this module loads it in its own place (``import kernels`` returns what sys.modules holds
    #   when the import finishes), so a checkout behaves like any other directory. Otherwise this package
    #   stays empty (no ``__version__``: version probes see no usable install).
    def _load_the_real_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec(__name__, rest)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(__name__, None)
            raise

    __all__ = []
    if __name__ == "kernels":
        _load_the_real_kernels()
