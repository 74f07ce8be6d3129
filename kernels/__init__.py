"""Triton kernels for fastdiff's ops, installed as ``fastdiff.kernels``.

Each op file holds its kernels, launcher (``_<op>_fwd``), ``torch.library`` custom op and the entry point
named after the op, which :mod:`fastdiff.ops._dispatch` looks up (``backend="triton"``). The entry
points receive arguments already checked by the public op. Kernels run on CUDA tensors, or on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported).
Importing this package needs ``triton`` but no GPU.
"""

from .nearest_embedding import nearest_embedding
from .posterior import categorical_posterior, posterior_sample
from .rounding_loss import rounding_loss
from .sample_categorical import sample_categorical

__all__ = ["nearest_embedding", "rounding_loss", "categorical_posterior", "posterior_sample",
           "sample_categorical"]
