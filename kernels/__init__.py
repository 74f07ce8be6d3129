"""Triton kernels for fastdiff's ops, installed as ``fastdiff.kernels``.

Each op file holds its kernels, launcher (``_<op>_fwd``), ``torch.library`` custom op and the entry point
named after the op, which :mod:`fastdiff.ops._dispatch` looks up (``backend="triton"``). The entry
points receive arguments already checked by the public op. Kernels run on CUDA tensors, or on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported).
Importing this package needs ``triton`` but no GPU.
"""

if __name__ == "fastdiff.kernels":
    from .nearest_embedding import nearest_embedding
    from .posterior import categorical_posterior, posterior_sample
    from .rounding_loss import rounding_loss
    from .sample_categorical import sample_categorical

    __all__ = ["nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample",
               "sample_categorical"]
else:
    # A checkout's root on sys.path (``python -m pytest``, ``python -c``, a script run from there) makes this
    # directory importable as a top-level ``kernels``, a name other libraries import: transformers >= 5
    # depends on Hugging Face's ``kernels`` package and imports it with ``import transformers``. Two rules:
    # * the op files must not run a second time under another name: that would register the
    #   torch.library custom ops again, which frees the registrations fastdiff.kernels holds (its ops then
    #   crash on use);
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
