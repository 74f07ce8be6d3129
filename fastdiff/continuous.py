"""Continuous (embedding) diffusion: Diffusion-LM (Li et al. 2022), SED, CDCD, Difformer.

Tokens become embeddings ``x_0 = E[w]``; ``x_t = sqrt(a_t)·x_0 + sqrt(1 - a_t)·ε`` with ``a_t = alpha_bar_t``.
The network outputs ε, x_0 or the posterior mean (``parameterization``), converted by :meth:`to_x0`.
The skip posterior from ``t`` to any ``s < t`` (``r = a_t / a_s``)::

    mean = sqrt(a_s)(1 - r)/(1 - a_t) · x_0 + sqrt(r)(1 - a_s)/(1 - a_t) · x_t
    var  = (1 - a_s)/(1 - a_t) · (1 - r)

Shapes: ``x: (..., D)``; a step ``t`` is an int or an integer tensor whose shape is a leading part of
``x.shape[:-1]`` (one step per sequence: ``t: (B,)`` for ``x: (B, L, D)``). Coefficients are taken in
float64 and applied in ``x``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from . import _checks
from . import ops as _ops
from ._protocols import Step
from ._reduce import check_reduction, check_weights, reduce, weighted_mean
from .schedules import Schedule
from .errors import InputError, InputTypeError

__all__ = [
    "GaussianDiffusion",
    "TokenEmbedding",
    "clamp_hook",
    "rounding_loss",
    "anchor_loss",
    "step_pairs",
    "ar_timesteps",
    "ar_step_pairs",
    "ar_ddim_step",
]

PARAMETERIZATIONS = ("eps", "x0", "mean")
Denoise = Callable[[torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor], torch.Tensor]
Grad = Callable[[torch.Tensor, object], torch.Tensor]


class GaussianDiffusion:
    """Gaussian diffusion over embeddings with a skip posterior, DDPM/DDIM steps and text losses.

    Parameters
    ----------
    schedule : a ``(T+1,)`` schedule with ``alpha_bar[t] > 0`` for every ``t``.
    parameterization : what the network outputs: "x0" (Diffusion-LM's choice for text), "eps" or
        "mean" (the posterior mean for ``s = t - 1``; known to converge poorly for text).
    model_var : reverse-step variance, "fixed_small" (the posterior variance β̃) or "fixed_large" (β).
    """

    def __init__(self, schedule: Schedule, parameterization: str = "x0", model_var: str = "fixed_small") -> None:
        if not isinstance(schedule, Schedule):
            raise InputTypeError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
        if schedule.per_token:
            raise InputError("schedule: Gaussian diffusion needs a (T+1,) schedule")
        if bool((schedule.alpha_bar <= 0).any()):
            raise InputError("schedule: alpha_bar must stay > 0 for Gaussian diffusion (x0 = (x_t - ...)/sqrt(a_t))")
        self.schedule = schedule
        self.T = schedule.T
        self.parameterization = _checks.choice("parameterization", parameterization, PARAMETERIZATIONS)
        self.model_var = _checks.choice("model_var", model_var, ("fixed_small", "fixed_large"))
        self.alpha_bar = schedule.alpha_bar

    def __repr__(self) -> str:
        return f"GaussianDiffusion({self.schedule!r}, parameterization={self.parameterization!r})"

    # --- helpers -----------------------------------------------------------------------------------
    def _x(self, name: str, x: torch.Tensor) -> torch.Tensor:
        _checks.floating(name, x)
        if x.ndim < 1:
            raise InputError(f"{name}: expected (..., D), got a scalar")
        return x

    def _coef(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``values[t]`` broadcast against ``x: (..., D)`` (t aligned to the leading dims)."""
        v = values.to(x.device)[t]
        v = _checks.expand_leading("t", v, x.shape[:-1]).unsqueeze(-1)
        return v.to(x.dtype)

    def _steps(self, t: Step, x: torch.Tensor, lo: int = 1, name: str = "t") -> torch.Tensor:
        tt = _checks.steps(name, t, self.T, lo, x.device)
        _checks.expand_leading(name, tt, x.shape[:-1])  # shape check
        return tt

    def _pair(self, t: Step, s: Step | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tt, ss = _checks.step_pair(t, s, self.T, x.device)
        _checks.expand_leading("t", tt, x.shape[:-1])
        _checks.expand_leading("s", ss, x.shape[:-1])
        return tt, ss

    # --- forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: Step, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_t = sqrt(a_t)·x0 + sqrt(1 - a_t)·noise`` (``noise`` drawn when not given)."""
        x0 = self._x("x0", x0)
        tt = self._steps(t, x0, lo=0)
        if noise is None:
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        elif noise.shape != x0.shape:
            raise InputError(f"noise: expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        ab = self.alpha_bar
        return self._coef(ab.sqrt(), tt, x0) * x0 + self._coef((1 - ab).sqrt(), tt, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(..., D)`` and variance (broadcastable, ``(..., 1)``) of ``q(x_s | x_t, x_0)``."""
        x0 = self._x("x0", x0)
        x_t = self._x("x_t", x_t)
        if x0.shape != x_t.shape:
            raise InputError(f"x0: expected shape {tuple(x_t.shape)} (as x_t), got {tuple(x0.shape)}")
        tt, ss = self._pair(t, s, x_t)
        c0, ct, var = self._posterior_coefs(tt, ss, x_t)
        return c0 * x0 + ct * x_t, var

    def _posterior_coefs(self, tt: torch.Tensor, ss: torch.Tensor, x: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar.to(x.device)
        a_t = _checks.expand_leading("t", ab[tt], x.shape[:-1]).unsqueeze(-1)
        a_s = _checks.expand_leading("s", ab[ss], x.shape[:-1]).unsqueeze(-1)
        r = a_t / a_s
        c0 = a_s.sqrt() * (1 - r) / (1 - a_t)
        ct = r.sqrt() * (1 - a_s) / (1 - a_t)
        var = (1 - a_s) / (1 - a_t) * (1 - r)
        return c0.to(x.dtype), ct.to(x.dtype), var.to(x.dtype)

    # --- parameterisations -------------------------------------------------------------------------
    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: Step) -> torch.Tensor:
        """The network's x0 estimate from its output under ``self.parameterization``.

        eps: ``x0 = (x_t - sqrt(1 - a_t)·ε)/sqrt(a_t)``; mean (for ``s = t-1``): ``x0 = (μ - c_t·x_t)/c_0``.
        """
        model_output = self._x("model_output", model_output)
        x_t = self._x("x_t", x_t)
        if model_output.shape != x_t.shape:
            raise InputError(f"model_output: expected shape {tuple(x_t.shape)}, got {tuple(model_output.shape)}")
        tt = self._steps(t, x_t)
        if self.parameterization == "x0":
            return model_output
        ab = self.alpha_bar
        if self.parameterization == "eps":
            return (x_t - self._coef((1 - ab).sqrt(), tt, x_t) * model_output) / self._coef(ab.sqrt(), tt, x_t)
        c0, ct, _ = self._posterior_coefs(tt, tt - 1, x_t)
        return (model_output - ct * x_t) / c0

    def to_eps(self, x0: torch.Tensor, x_t: torch.Tensor, t: Step) -> torch.Tensor:
        """``ε = (x_t - sqrt(a_t)·x0)/sqrt(1 - a_t)``."""
        tt = self._steps(t, x_t)
        ab = self.alpha_bar
        return (x_t - self._coef(ab.sqrt(), tt, x_t) * x0) / self._coef((1 - ab).sqrt(), tt, x_t)

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None,
                        denoised_fn: Denoise | None = None
                        ) -> dict[str, torch.Tensor]:
        """Reverse step ``p(x_s | x_t)``: dict with ``x0`` (after ``denoised_fn``, e.g. clamping),
        ``eps``, ``mean`` and ``var``."""
        x_t = self._x("x_t", x_t)
        tt, ss = self._pair(t, s, x_t)
        x0 = self._denoise(self.to_x0(model_output, x_t, tt), x_t, denoised_fn)
        c0, ct, var = self._posterior_coefs(tt, ss, x_t)
        if self.model_var == "fixed_large":
            ab = self.alpha_bar.to(x_t.device)
            a_t = _checks.expand_leading("t", ab[tt], x_t.shape[:-1]).unsqueeze(-1)
            a_s = _checks.expand_leading("s", ab[ss], x_t.shape[:-1]).unsqueeze(-1)
            var = (1 - a_t / a_s).to(x_t.dtype)
        return {"x0": x0, "eps": self.to_eps(x0, x_t, tt), "mean": c0 * x0 + ct * x_t, "var": var}

    @staticmethod
    def _denoise(x0: torch.Tensor, x_t: torch.Tensor, denoised_fn: Denoise | None) -> torch.Tensor:
        if denoised_fn is None:
            return x0
        out = denoised_fn(x0)
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            raise InputError("denoised_fn: must return a tensor of the same shape as x_t")
        return out

    # --- samplers ----------------------------------------------------------------------------------
    def ddpm_step(self, model_output: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None, *,
                  noise: torch.Tensor | Noise | None = None,
                  generator: torch.Generator | None = None, denoised_fn: Denoise | None = None,
                  classifier_grad: Grad | None = None, classifier_scale: float = 1.0) -> torch.Tensor:
        """Ancestral step ``x_s ~ N(mean, var)`` (no noise where ``s = 0``).

        The hooks (of both steps; :mod:`fastdiff.sampling` uses them all):

        denoised_fn : ``f(x0) -> x0``, the x0 estimate's last change before the step uses it (e.g.
            :func:`clamp_hook`); it may keep its input (a self-conditioning estimate).
        classifier_grad : ``g(x_t, t) -> ∇_{x_t} log p(y | x_t)`` of ``x_t``'s shape (``t`` as given here;
            enable autograd inside ``g`` if it needs it), times ``classifier_scale``. Here the mean moves
            to ``mean + classifier_scale·var·g`` (Dhariwal & Nichol 2021, Alg. 1).
        noise : a tensor like ``x_t``; or a callable ``noise(x_t) -> tensor``, called only when the step
            adds noise (some row has a variance > 0), so a counter-based stream draws exactly the noise
            used; None draws ``torch.randn(..., generator=generator)``.
        """
        out = self.p_mean_variance(model_output, x_t, t, s, denoised_fn)
        mean = out["mean"]
        if classifier_grad is not None:
            mean = mean + classifier_scale * out["var"] * self._classifier_grad(classifier_grad, x_t, t)
        ss = _checks.step_pair(t, s, self.T, x_t.device)[1]
        last = _checks.expand_leading("s", ss == 0, x_t.shape[:-1]).unsqueeze(-1)
        if callable(noise) and bool(last.all()):
            return mean
        noise = self._noise(noise, x_t, generator)
        # As improved-diffusion's p_sample: the step to s = 0 returns the mean (for fixed_large the
        # skip variance 1 - a_t/a_0 is not 0 there).
        return torch.where(last, mean, mean + out["var"].sqrt() * noise)

    def ddim_step(self, model_output: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None, *,
                  eta: float = 0.0,
                  noise: torch.Tensor | Noise | None = None, generator: torch.Generator | None = None,
                  denoised_fn: Denoise | None = None, classifier_grad: Grad | None = None,
                  classifier_scale: float = 1.0) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12) from ``t`` to ``s``:

        ``x_s = sqrt(a_s)·x0 + sqrt(1 - a_s - σ²)·ε + σ·z``, ``σ = η·sqrt((1 - a_s)/(1 - a_t))·sqrt(1 - a_t/a_s)``.
        ``eta = 0`` is deterministic; ``eta = 1`` is the DDPM posterior step.

        Hooks as :meth:`ddpm_step`'s. Classifier guidance (Dhariwal & Nichol 2021, Alg. 2) moves ε to
        ``ε' = ε - sqrt(1 - a_t)·classifier_scale·g``, and ``denoised_fn`` receives the x0 that ``ε'`` implies.
        """
        eta = _checks.real("eta", eta, 0.0)
        x_t = self._x("x_t", x_t)
        tt, ss = self._pair(t, s, x_t)
        ab = self.alpha_bar.to(x_t.device)
        a_t = _checks.expand_leading("t", ab[tt], x_t.shape[:-1]).unsqueeze(-1)
        a_s = _checks.expand_leading("s", ab[ss], x_t.shape[:-1]).unsqueeze(-1)
        x0 = self.to_x0(model_output, x_t, tt)
        if classifier_grad is not None:
            grad = self._classifier_grad(classifier_grad, x_t, t)
            sd = (1 - a_t).sqrt()
            eps = self.to_eps(x0, x_t, tt) - (sd * classifier_scale).to(x_t.dtype) * grad
            x0 = (x_t - sd.to(x_t.dtype) * eps) / a_t.sqrt().to(x_t.dtype)
        x0 = self._denoise(x0, x_t, denoised_fn)
        eps = self.to_eps(x0, x_t, tt)
        sigma2 = (eta**2) * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        dir_coef = (1 - a_s - sigma2).clamp_min(0).sqrt()
        out = a_s.sqrt().to(x_t.dtype) * x0 + dir_coef.to(x_t.dtype) * eps
        if eta > 0 and not (callable(noise) and not bool((sigma2 > 0).any())):
            out = out + sigma2.sqrt().to(x_t.dtype) * self._noise(noise, x_t, generator)
        return out

    @staticmethod
    def _classifier_grad(classifier_grad: Grad, x_t: torch.Tensor, t: Step) -> torch.Tensor:
        g = classifier_grad(x_t, t)
        if not isinstance(g, torch.Tensor) or g.shape != x_t.shape:
            raise InputError(f"classifier_grad: must return a tensor of shape {tuple(x_t.shape)}")
        return g

    @staticmethod
    def _noise(noise: torch.Tensor | Noise | None, x_t: torch.Tensor, generator: torch.Generator | None
               ) -> torch.Tensor:
        if noise is None:
            return torch.randn(x_t.shape, dtype=x_t.dtype, device=x_t.device, generator=generator)
        if callable(noise):
            noise = noise(x_t)
        if not isinstance(noise, torch.Tensor) or noise.shape != x_t.shape:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise InputError(f"noise: expected shape {tuple(x_t.shape)}, got {got}")
        return noise

    # --- losses ------------------------------------------------------------------------------------
    def mse_loss(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: Step,
                 noise: torch.Tensor, target: str | None = None,
                 reduction: str = "mean") -> torch.Tensor:
        """Simple loss ``|target - output|²`` averaged over D: per token ``(...)`` for "none".

        ``target`` defaults to ``self.parameterization``; with a different one the output is converted
        first (e.g. an eps-model trained with an x0 MSE).
        """
        check_reduction(reduction)
        x_t = self._x("x_t", x_t)
        for name, v in (("model_output", model_output), ("x0", x0), ("noise", noise)):
            self._x(name, v)
            if v.shape != x_t.shape:
                raise InputError(f"{name}: expected shape {tuple(x_t.shape)} (as x_t), got {tuple(v.shape)}")
        tt = self._steps(t, x_t)
        target = self.parameterization if target is None else _checks.choice("target", target, PARAMETERIZATIONS)
        if target == self.parameterization:
            pred = model_output
        elif target == "x0":
            pred = self.to_x0(model_output, x_t, tt)
        elif target == "eps":
            pred = self.to_eps(self.to_x0(model_output, x_t, tt), x_t, tt)
        else:
            c0, ct, _ = self._posterior_coefs(tt, tt - 1, x_t)
            pred = c0 * self.to_x0(model_output, x_t, tt) + ct * x_t
        if target == "x0":
            truth = x0
        elif target == "eps":
            truth = noise
        else:
            truth = self.q_posterior_mean_variance(x0, x_t, tt)[0]
        per_token = ((pred - truth) ** 2).mean(-1)
        return reduce(per_token, reduction)

    def vlb_terms(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: Step) -> torch.Tensor:
        """Per token (summed over D), in nats: ``KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t))`` for ``t >= 2``;
        for ``t = 1`` the Gaussian NLL ``-log N(x_0; mean, var)`` with the variance of step 2 (the
        posterior variance at ``t = 1`` is 0; improved-diffusion's clipping)."""
        x_t = self._x("x_t", x_t)
        tt = _checks.expand_leading("t", self._steps(t, x_t), x_t.shape[:-1])
        p = self.p_mean_variance(model_output, x_t, tt)
        q_mean, q_var = self.q_posterior_mean_variance(x0, x_t, tt)
        p_var = p["var"]
        if self.T >= 2:  # both variances use beta~_2 at t = 1 (improved-diffusion)
            c = self._posterior_coefs(torch.full_like(tt, 2), torch.ones_like(tt), x_t)[2]
            p_var = torch.where((tt == 1).unsqueeze(-1), c, p_var)
        p_var = p_var.clamp_min(1e-20)
        kl = 0.5 * (torch.log(p_var) - torch.log(q_var.clamp_min(1e-20)) + (q_var + (q_mean - p["mean"]) ** 2) / p_var - 1)
        nll = 0.5 * (math.log(2 * math.pi) + torch.log(p_var) + (x0 - p["mean"]) ** 2 / p_var)
        return torch.where((tt == 1).unsqueeze(-1), nll, kl).sum(-1)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """``KL(q(x_T | x_0) ‖ N(0, I))`` per token (summed over D)."""
        x0 = self._x("x0", x0)
        a = float(self.alpha_bar[-1])
        mean2 = a * x0**2
        var = 1 - a
        return (0.5 * (-math.log(var) + var + mean2 - 1)).sum(-1)

    def losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: Step,
               noise: torch.Tensor, *, tokens: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, lam_round: float | None = 1.0, lam_anchor: float = 0.0,
               reduction: str = "mean", weights: torch.Tensor | None = None, backend: str = "auto"
               ) -> dict[str, torch.Tensor]:
        """Diffusion-LM's end-to-end objective and Difformer's anchor loss, as a dict of tensors.

        ``mse`` (:meth:`mse_loss`); with ``tokens`` and the embedding ``weight``: ``round`` = ``L_round``
        on ``x0`` (Diffusion-LM; ``lam_round=None`` leaves it out) and, when ``lam_anchor`` is set,
        ``anchor`` = ``L_round`` on the network's x0 estimate (Difformer); each reduced by ``reduction``:
        "mean" | "sum" over every token, "none" (per token) or "sequence" (the mean over each sequence's
        tokens: ``(B,)`` for ``x0: (B, L, D)``). ``loss = mse + lam_round·round + lam_anchor·anchor``.

        ``weights``: importance weights, one per sequence (``x0.shape[:-2]``, e.g. a timestep sampler's,
        :mod:`fastdiff.timesteps`). ``loss`` is then the scalar
        ``mean_b(weights_b · (mse_b + lam_anchor·anchor_b)) + lam_round·round`` (``_b``: means over the
        tokens of sequence ``b``; ``L_round`` of ``x0`` does not depend on ``t`` and is not weighted), and
        ``per_sequence`` holds the weighted part ``mse_b + lam_anchor·anchor_b``: what a loss-aware
        timestep sampler records.
        """
        check_reduction(reduction)
        mse = self.mse_loss(model_output, x0, x_t, t, noise, reduction="none")
        out = {"mse": reduce(mse, reduction)}
        if weights is not None:
            check_weights(weights, mse.shape)
        anchor = round_mean = None
        if tokens is not None:
            if weight is None:
                raise InputError("weight: the embedding matrix is needed with tokens")
            if lam_anchor:
                x0_hat = self.to_x0(model_output, x_t, t)
                if reduction == "mean" and weights is None:  # the fused op's own mean
                    out["anchor"] = anchor_loss(x0_hat, weight, tokens, backend=backend)
                else:
                    anchor = anchor_loss(x0_hat, weight, tokens, reduction="none", backend=backend)
                    out["anchor"] = reduce(anchor, reduction)
            if lam_round is not None:
                if reduction == "mean":
                    out["round"] = round_mean = rounding_loss(x0, weight, tokens, backend=backend)
                else:
                    per_token = rounding_loss(x0, weight, tokens, reduction="none", backend=backend)
                    out["round"], round_mean = reduce(per_token, reduction), per_token.mean()
        if weights is None:
            loss = out["mse"]
            if "round" in out:
                loss = loss + lam_round * out["round"]
            if "anchor" in out:
                loss = loss + lam_anchor * out["anchor"]
        else:
            per_seq = reduce(mse, "sequence")
            if anchor is not None:
                per_seq = per_seq + lam_anchor * reduce(anchor, "sequence")
            loss = weighted_mean(per_seq, weights)
            if round_mean is not None:
                loss = loss + lam_round * round_mean
            out["per_sequence"] = per_seq
        out["loss"] = loss
        return out


def rounding_loss(x0: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
                  reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Diffusion-LM's ``L_round = -log p(w | x_0)``, ``p = softmax(x_0 · Eᵀ + b)`` over the vocabulary.

    ``x0: (..., D)``, ``weight: (V, D)``, ``tokens: (...)``; through the fused op
    :func:`fastdiff.ops.rounding_loss` (no ``N × V`` logits kept on a kernel backend).
    """
    return _ops.rounding_loss(x0, weight, tokens, bias=bias, reduction=reduction, backend=backend)


def anchor_loss(x0_pred: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
                reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Difformer's anchor loss (Gao et al. 2022): ``L_round`` on the network's own x0 estimate, which
    keeps jointly learned embeddings from collapsing together."""
    return _ops.rounding_loss(x0_pred, weight, tokens, bias=bias, reduction=reduction, backend=backend)


def clamp_hook(weight: torch.Tensor, metric: str = "l2", backend: str = "auto") -> Denoise:
    """The clamping trick (Diffusion-LM §4.2) as a ``denoised_fn``: snap each x0 vector to its nearest
    row of ``weight`` (via :func:`fastdiff.ops.nearest_embedding`)."""
    _checks.floating("weight", weight)

    def snap(x0: torch.Tensor) -> torch.Tensor:
        return _ops.nearest_embedding(x0, weight.to(x0.dtype), metric=metric, backend=backend)[1]

    return snap


class TokenEmbedding(nn.Module):
    """Learned token embeddings with the optional embedding LayerNorm (rare words' larger norms would
    otherwise see a smaller effective noise level).

    ``forward(tokens) -> (..., D)``; :meth:`table` is the ``(V, D)`` matrix the noisy vectors live
    among, LayerNorm applied — the one to round and clamp against.
    """

    def __init__(self, vocab_size: int, dim: int, layernorm: bool = False, init_std: float | None = None) -> None:
        super().__init__()
        _checks.positive_int("vocab_size", vocab_size)
        _checks.positive_int("dim", dim)
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embedding.weight, std=init_std if init_std is not None else dim**-0.5)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if layernorm else None

    def table(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.norm(w) if self.norm is not None else w

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _checks.token_ids("tokens", tokens, self.embedding.num_embeddings)
        x = self.embedding(tokens)
        return self.norm(x) if self.norm is not None else x


# --- AR-Diffusion (Wu et al. 2023): position-dependent timesteps ------------------------------------
def step_pairs(T: int, steps: int) -> list[tuple[int, int]]:
    """``steps`` (t, s) pairs from ``T`` down to 0, evenly spaced and rounded (duplicates dropped): the grid
    the image / latent diffusion loops of :mod:`fastdiff.glyph` and :mod:`fastdiff.latent` walk."""
    T = _checks.positive_int("T", T)
    steps = _checks.positive_int("steps", steps)
    if steps > T:
        raise InputError(f"steps: at most T = {T}, got {steps}")
    ts = sorted({round(T * k / steps) for k in range(steps + 1)}, reverse=True)
    return list(zip(ts[:-1], ts[1:]))


def ar_timesteps(length: int, T: int, t: int | torch.Tensor, anchor: tuple[float, float] | None = None
                 ) -> torch.Tensor:
    """AR-Diffusion's token-level timesteps (Wu et al. 2023, §3.1): ``(..., length)`` int64 steps of the
    positions ``n = 1 .. N`` (``N = length``) at the sentence-level timestep ``t ∈ [0, N + T]`` (an int
    or an integer tensor ``(...)``).

    In the plane (position ``n``, step), every position's step lies on the line through the anchor point
    ``(n_e, t_e)`` (default ``(2N, T)``, the paper's) and the start point
    ``(n_s, t_s) = (clip(N - t, 0, N), clip(t - N, 0, T))``:
    ``f(n, t) = clip((t_e - t_s)/(n_e - n_s)·(n - n_s) + t_s, 0, T)``, rounded half up to an integer step.
    ``t = 0`` puts every position at step 0, ``t = N + T`` every position at ``T``; in between, the left
    positions are less noisy than the right ones (they reach 0 sooner), and ``f`` never decreases in ``n``
    or in ``t``."""
    N = _checks.positive_int("length", length)
    T = _checks.positive_int("T", T)
    tt = _checks.steps("t", t, N + T, 0, t.device if isinstance(t, torch.Tensor) else None)
    if anchor is None:
        n_e, t_e = 2.0 * N, float(T)
    else:
        if not (isinstance(anchor, (tuple, list)) and len(anchor) == 2):
            raise InputTypeError(f"anchor: expected (n_e, t_e), got {anchor!r}")
        n_e, t_e = (float(_checks.real("anchor", v)) for v in anchor)
        if not n_e > N:
            raise InputError(f"anchor: n_e must exceed the length N = {N} (the line must not be vertical), got {n_e}")
    tf = tt.to(torch.float64)[..., None]
    n_s = (N - tf).clamp(0, N)
    t_s = (tf - N).clamp(0, T)
    n = torch.arange(1, N + 1, dtype=torch.float64, device=tt.device)
    f = ((t_e - t_s) / (n_e - n_s) * (n - n_s) + t_s).clamp(0, T)
    return torch.floor(f + 0.5).long()


def ar_step_pairs(length: int, T: int, steps: int, anchor: tuple[float, float] | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AR-Diffusion's sampling with step skipping (Wu et al. 2023, §3.2): ``steps`` sentence-level
    timesteps evenly spaced from ``N + T`` down to 0 (rounded, never repeated), each giving every position
    its step by :func:`ar_timesteps`. Returns the transitions ``(t_tok, s_tok)`` ``(N,)`` int64 each, with
    ``s_tok <= t_tok``; a position with ``s_tok == t_tok`` does not move in that transition."""
    N = _checks.positive_int("length", length)
    K = _checks.positive_int("steps", steps)
    if K > N + T:
        raise InputError(f"steps: at most N + T = {N + T} sentence-level transitions, got {K}")
    grid = torch.linspace(N + T, 0, K + 1, dtype=torch.float64).round().long().tolist()
    pts = [grid[0]] + [g for prev, g in zip(grid, grid[1:]) if g < prev]
    f = ar_timesteps(N, T, torch.tensor(pts), anchor)
    return [(f[i], f[i + 1]) for i in range(len(pts) - 1)]


def ar_ddim_step(diff: GaussianDiffusion, model_output: torch.Tensor, x_t: torch.Tensor, t_tok: torch.Tensor,
                 s_tok: torch.Tensor, *, eta: float = 0.0, noise: torch.Tensor | Noise | None = None,
                 generator: torch.Generator | None = None, denoised_fn: Denoise | None = None) -> torch.Tensor:
    """One AR-Diffusion transition: every position ``n`` with ``s_tok[n] < t_tok[n]`` takes the DDIM skip
    step (:meth:`GaussianDiffusion.ddim_step`, ``eta``) from its own ``t_tok[n]`` to ``s_tok[n]``; the
    others (not started, or already at 0) keep ``x_t``. ``t_tok, s_tok``: ``(L,)`` or ``(B, L)`` int steps for
    ``x_t: (B, L, D)``."""
    x_t = diff._x("x_t", x_t)
    if x_t.ndim != 3:
        raise InputError(f"x_t: expected (B, L, D), got {tuple(x_t.shape)}")
    tt = _checks.steps("t_tok", t_tok, diff.T, 0, x_t.device)
    ss = _checks.steps("s_tok", s_tok, diff.T, 0, x_t.device)
    B, L = x_t.shape[:2]
    for name, v in (("t_tok", tt), ("s_tok", ss)):
        if tuple(v.shape) not in ((L,), (B, L)):
            raise InputError(f"{name}: expected shape ({L},) or ({B}, {L}), got {tuple(v.shape)}")
    tt, ss = tt.expand(B, L), ss.expand(B, L)
    if bool((ss > tt).any()):
        raise InputError("s_tok: a position's step must not increase (s_tok <= t_tok)")
    moving = ss < tt
    t_eff = torch.where(moving, tt, tt.clamp_min(1))  # stationary positions: any valid pair, result unused
    s_eff = torch.where(moving, ss, t_eff - 1)
    out = diff.ddim_step(model_output, x_t, t_eff, s_eff, eta=eta, noise=noise, generator=generator,
                         denoised_fn=denoised_fn)
    return torch.where(moving.unsqueeze(-1), out, x_t)
