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
    # A checkout's root on sys.path (pytest, or a script run from there) makes this directory importable
    # as a top-level ``kernels``, a name other libraries probe: transformers imports ``kernels`` to look
    # for Hugging Face's package of that name. Running the op files a second time would register the
    # torch.library custom ops again under the same names, which frees the registrations fastdiff.kernels
    # holds (its ops then crash on use). Under any other name this package is therefore empty.
    __all__ = []
