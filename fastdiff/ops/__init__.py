"""The kernel-backed hot paths. Each op has a pure-PyTorch reference ``<op>_ref`` and a public
``<op>(..., backend="auto")``.

``backend`` is one of "auto", "reference", "cpp", "triton", "cuda". "auto" picks the fastest available
for the tensors' device and silently falls back to the reference; an explicit backend that cannot run
raises :class:`BackendUnavailableError` with the reason and the install command. The environment
variable ``FASTDIFF_BACKEND`` replaces "auto" (and counts as explicit). Ops take processes by duck
typing and import nothing above :mod:`fastdiff.random`, so the process modules can use them.

Randomness is counter-based: ``(seed, offset)`` fixes every draw, keyed by the row's global index
(``row_offset`` of the sampling ops numbers a call's first row; see :mod:`fastdiff.random`).

Layout: ``fastdiff/ops/<op>.py`` holds the public op, its reference, its checks and what every backend shares
(``rounding_loss``'s one autograd Function, the posterior lowering of :mod:`._plan`); each kernel backend's
glue is ``fastdiff/ops/backends/<backend>/<kernel>.py``, found by name (:mod:`.backends`). The kernels are
``torch.library`` ops with fake kernels, so ``torch.compile(fullgraph=True)`` traces every public op on a
kernel backend (its value checks then run as graph asserts with the same messages, raised as RuntimeError);
``FASTDIFF_CUSTOM_OP=0`` calls the kernels directly instead (a few microseconds less per call).
"""

from ._dispatch import BACKENDS, BackendUnavailableError, explain
from .categorical_posterior import categorical_posterior, categorical_posterior_ref
from .nearest_embedding import nearest_embedding, nearest_embedding_ref
from .posterior_sample import posterior_sample, posterior_sample_ref
from .rounding_loss import rounding_loss, rounding_loss_ref
from .sample_categorical import filter_weights, sample_categorical, sample_categorical_ref
from .select_tokens import select_tokens, select_tokens_ref

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "explain",
    "nearest_embedding",
    "nearest_embedding_ref",
    "rounding_loss",
    "rounding_loss_ref",
    "categorical_posterior",
    "categorical_posterior_ref",
    "posterior_sample",
    "posterior_sample_ref",
    "sample_categorical",
    "sample_categorical_ref",
    "filter_weights",
    "select_tokens",
    "select_tokens_ref",
]
