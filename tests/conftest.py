"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (its standard library, tl.zeros and friends,
# is decorated then). Other imports (transformers pulls in torch's Triton kernels) may import it before
# the Triton tests' fixtures run, so on a machine without a GPU set it before anything else: the Triton
# kernels then run in the CPU interpreter wherever a test asks for backend="triton".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is as fast, and two OpenMP threads that
    fight other processes spin (x10-30). Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def disc():
    """The bundled discrete model (one load per test module)."""
    from fastdiff.pipeline import TextDiffusion

    return TextDiffusion.load("discrete")


@pytest.fixture(scope="module")
def cont():
    """The bundled continuous model (one load per test module)."""
    from fastdiff.pipeline import TextDiffusion

    return TextDiffusion.load("continuous")


def tiny_corpus(path, *, seed: int, words: list[str], lines: int, words_per_line: int):
    """A text file of ``lines`` paragraphs of random ``words`` (for tiny training runs); returns ``path``."""
    g = torch.Generator().manual_seed(seed)
    text = [" ".join(words[int(i)] for i in torch.randint(len(words), (words_per_line,), generator=g))
            for _ in range(lines)]
    path.write_text("\n\n".join(text) + "\n")
    return path


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 baseline: torch.Tensor | None = None, name: str = "out") -> None:
    """Assert ``|out - ref| <= atol + rtol·|ref|``, printing the worst mismatches.

    With ``baseline`` (a same-dtype PyTorch computation of the same thing), the rule is
    flash-attention's: ``max|out - ref| <= 2·max|baseline - ref| + atol``.
    """
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    assert out64.shape == ref64.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    err = (out64 - ref64).abs()
    if baseline is not None:
        base_err = (baseline.detach().to(torch.float64) - ref64).abs().max().item() if err.numel() else 0.0
        worst = err.max().item() if err.numel() else 0.0
        assert worst <= 2 * base_err + atol, f"{name}: max err {worst:.3e} > 2·baseline {base_err:.3e} + {atol:.1e}"
        return
    bad = err > atol + rtol * ref64.abs()
    if bool(bad.any()):
        idx = torch.nonzero(bad)[:5]
        lines = [f"  at {tuple(i.tolist())}: out={out64[tuple(i)].item():.6g} ref={ref64[tuple(i)].item():.6g}"
                 for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(max err {err.max().item():.3e}):\n" + "\n".join(lines))
