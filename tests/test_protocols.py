"""The DiscreteProcess protocol: every process class satisfies it, and a minimal class of the user's that
satisfies it (no fastdiff base class) works with the reference ops, the sampler and the losses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fastdiff import continuous, ops, sampling
from fastdiff import discrete as D
from fastdiff import schedules as S
from fastdiff._protocols import DiscreteProcess as LowLevelProtocol

V, T = 7, 12


def _processes() -> dict[str, D.DiscreteProcess]:
    g = torch.Generator().manual_seed(0)
    return {
        "absorbing": D.Absorbing(V, 2, S.cosine(T)),
        "absorbing-spindle": D.Absorbing(V, 2, S.spindle(T, torch.linspace(0, 1, V, dtype=torch.float64))),
        "uniform": D.Uniform(V, S.cosine(T)),
        "gaussian-band": D.GaussianBand(V, S.cosine(T), bandwidth=2),
        "nearest-neighbor": D.NearestNeighbor(torch.randn(V, 3, generator=g), S.cosine(T), k=2),
        "dense": D.Dense(torch.softmax(torch.randn(V, V, generator=g), -1), T),
    }


@pytest.mark.parametrize("name", ["absorbing", "absorbing-spindle", "uniform", "gaussian-band", "nearest-neighbor", "dense"])
def test_every_process_class_satisfies_the_protocol(name):
    p = _processes()[name]
    assert isinstance(p, D.DiscreteProcess)
    assert D.DiscreteProcess is LowLevelProtocol  # re-exported from the low module
    assert isinstance(p, D.MatrixDiscreteProcess) == (p.kind == "matrix")
    assert (p.mask_id is not None) == (p.kind == "absorbing")
    assert (p.schedule is None) == (name == "dense")


def test_other_objects_do_not():
    assert not isinstance(continuous.GaussianDiffusion(S.cosine(T)), D.DiscreteProcess)
    assert not isinstance(object(), D.DiscreteProcess)

    class NoPosterior:
        kind, vocab_size, T, mask_id, schedule = "uniform", V, T, None, None

    assert not isinstance(NoPosterior(), D.DiscreteProcess)


def test_the_protocol_module_sits_below_the_ops():
    """fastdiff.ops may import it: it imports nothing of fastdiff (the layering's bottom)."""
    tree = ast.parse((Path(D.__file__).parent / "_protocols.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("fastdiff"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert all(not a.name.startswith("fastdiff") for a in node.names)


class ByHandUniform:
    """A user's process, written from the formulas alone (no fastdiff base class): uniform noise with
    ``Qbar_t = a_t I + (1 - a_t)/V``, its own kind name, so only the reference ops apply."""

    kind = "by-hand"
    mask_id = None

    def __init__(self, vocab_size: int, alpha_bar: torch.Tensor):
        self.vocab_size, self.T = vocab_size, alpha_bar.shape[0] - 1
        self.schedule = S.Schedule(alpha_bar.to(torch.float64), "by-hand")

    def _a(self, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device)
        a = self.schedule.alpha_bar.to(like.device)[t]
        return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))

    def x0_log_probs(self, logits, temperature=1.0):
        return torch.log_softmax(logits.double() / temperature, -1)

    def q_probs(self, x0, t, dtype=torch.float64):
        a = self._a(t, x0).to(dtype).unsqueeze(-1)
        return a * torch.nn.functional.one_hot(x0, self.vocab_size).to(dtype) + (1 - a) / self.vocab_size

    def q_sample(self, x0, t, generator=None):
        flat = self.q_probs(x0, t).reshape(-1, self.vocab_size)
        return torch.multinomial(flat, 1, generator=generator).reshape(x0.shape)

    def posterior_probs(self, x0_probs, x_t, t, s=None):
        t = torch.as_tensor(t)
        s = t - 1 if s is None else torch.as_tensor(s)
        a_t, a_s = self._a(t, x_t).unsqueeze(-1), self._a(s, x_t).unsqueeze(-1)
        r = a_t / a_s
        near = r * torch.nn.functional.one_hot(x_t, self.vocab_size) + (1 - r) / self.vocab_size  # Q_{t|s}[:, x_t]
        w = near * (a_s * x0_probs.double() + (1 - a_s) / self.vocab_size)
        return (w / w.sum(-1, keepdim=True)).to(x0_probs.dtype if x0_probs.dtype == torch.float64 else torch.float32)

    def prior_probs(self, shape=(), device=None):
        return torch.full(tuple(shape) + (self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64, device=device)


def _by_hand():
    sched = S.cosine(T)
    return ByHandUniform(V, sched.alpha_bar), D.Uniform(V, sched)


def test_a_minimal_user_class_works_with_the_reference_ops():
    mine, ref = _by_hand()
    assert isinstance(mine, D.DiscreteProcess) and not isinstance(mine, D.DiscreteProcessBase)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, V, generator=g, dtype=torch.float64)
    x_t = torch.randint(0, V, (3, 5), generator=g)
    t, s = torch.tensor([12, 7, 3]), torch.tensor([4, 1, 0])
    got = ops.categorical_posterior_ref(mine, logits, x_t, t, s)
    want = ops.categorical_posterior_ref(ref, logits, x_t, t, s)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.categorical_posterior(mine, logits, x_t, t, s, backend="reference"), want,
                               rtol=1e-12, atol=1e-12)
    a = ops.posterior_sample_ref(mine, logits, x_t, t, s, seed=3)
    b = ops.posterior_sample_ref(ref, logits, x_t, t, s, seed=3)
    assert torch.equal(a, b)


def test_a_minimal_user_class_works_with_the_sampler_and_the_losses():
    mine, ref = _by_hand()
    g = torch.Generator().manual_seed(2)
    table = torch.randn(V, V, generator=g)

    def model(x_t, t):
        return table[x_t]

    kw = {"shape": (2, 6), "steps": 4, "seed": 5, "backend": "reference"}
    assert torch.equal(sampling.sample(model, mine, **kw).tokens, sampling.sample(model, ref, **kw).tokens)
    x0 = torch.randint(0, V, (4, 6), generator=g)
    t = torch.tensor([1, 2, 6, 12])
    x_t = ref.q_sample(x0, t, generator=g)
    logits = torch.randn(4, 6, V, generator=g, dtype=torch.float64)
    for fn in (D.vlb_terms, D.kl_terms):
        torch.testing.assert_close(fn(mine, x0, x_t, t, logits), fn(ref, x0, x_t, t, logits), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(D.hybrid_loss(mine, x0, x_t, t, logits, reduction="sequence"),
                               D.hybrid_loss(ref, x0, x_t, t, logits, reduction="sequence"), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(D.prior_kl(mine, x0), D.prior_kl(ref, x0), rtol=1e-10, atol=1e-12)
