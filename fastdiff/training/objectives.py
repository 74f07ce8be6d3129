"""The loss of one batch, per process family: the random draws it needs, the model's forward, and the
objective, computed by the process's own maths (:func:`fastdiff.discrete.losses`,
:meth:`fastdiff.continuous.GaussianDiffusion.losses`) with the timestep sampler's importance weights.

Discrete (D3PM, Austin et al. 2021; MDLM, Sahoo et al. 2024): ``x_t = q_sample(x_0, t)``, the model
predicts x0 logits, the objective is the hybrid loss ``L_vlb + λ·CE`` (or MDLM's) averaged per sequence.
Continuous (Diffusion-LM, Li et al. 2022; SED, Strudel et al. 2022; Difformer, Gao et al. 2022):
``x_0 = E[w]`` with the embeddings learned jointly, objective MSE + ``lam_anchor·L_anchor`` per sequence
plus ``lam_round·L_round``; self-conditioning on half the steps (Chen et al. 2022). Labels are dropped to
the null label with probability ``cond_drop`` for classifier-free guidance (Ho & Salimans 2022).

A block-causal model (``model.block_size`` > 0) is trained with BD3-LM's objective (Arriola et al. 2025,
"Block Diffusion", §3.2): every block of ``block_size`` tokens gets its own step ``t_b``, the noisy
sequence is drawn block by block, and one forward over ``[x_t, x_0]`` (``model(x_t, t, clean=x_0)``: noisy
block ``b`` sees itself and the clean blocks before it) gives every block's x0 logits; the loss is the
same per-token objective on the noisy half with each token's own block step.

AR-Diffusion (Wu et al. 2023, §3.1; ``TrainConfig.ar_diffusion``, continuous family): each sequence draws a
sentence-level step ``n ~ U{0, ..., N + T}`` (``N`` = its length) and every position ``i`` its own step
``t_i = f(i, n)`` on the anchor-point line (:func:`fastdiff.continuous.ar_timesteps`); position ``i`` is
noised with ``alpha_bar[t_i]``, the model sees the ``(B, L)`` steps, and each position's loss is taken at
its own step. Positions at step 0 hold their clean embedding (``alpha_bar[0] = 1``) and keep their x0
term, which is why this needs the x0 parameterisation (eps is undefined there).

Each draw is made for the whole global batch (each rank keeps its rows), in a fixed order from the step's
generators (:mod:`fastdiff.training.rng`), so the losses do not depend on how the batch is split.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from .. import continuous, discrete, schedules, timesteps
from .config import TrainConfig
from .process import sync_schedule

if TYPE_CHECKING:
    from .._protocols import DiscreteProcess
    from ..continuous import GaussianDiffusion

__all__ = ["BatchLoss", "Objective", "autocast"]


class BatchLoss(NamedTuple):
    """The loss of some rows of a global batch.

    terms : ``"loss"`` (the objective to minimise, over these rows) and the logged diagnostics.
    per_sequence : ``(b,)``, detached: the weighted per-sequence loss, what the timestep sampler records.
    difficulty : ``(b,)``, detached: what an adaptive schedule fits to, a per-sequence loss that grows with
        the noise: the x0 cross-entropy for discrete models (the VLB terms are not monotone in t), the
        per-sequence loss itself for continuous ones (SeqDiffuSeq fits its training loss).
    t : ``(b,)``, the steps of these rows.
    """

    terms: dict[str, torch.Tensor]
    per_sequence: torch.Tensor
    difficulty: torch.Tensor
    t: torch.Tensor


def autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``amp="auto"`` on CUDA; nothing otherwise."""
    if config.amp == "auto" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Objective:
    """The per-batch loss of a run (``Objective.create(...)`` gives the family's), and what the losses feed
    back: the timestep ``sampler`` (its importance weights weight the loss; a loss-aware one records the
    per-sequence losses) and the process's ``adaptive`` schedule, when it has one.

    ``model`` is the bare model (the embeddings, the encoder and the self-conditioning pass use it);
    :meth:`loss` takes the module the training forward runs through (DDP) as ``net``.
    """

    def __init__(self, config: TrainConfig, process: DiscreteProcess | GaussianDiffusion, model: nn.Module,
                 device: torch.device, *, num_labels: int = 0, pad_id: int = 0, self_condition: bool = False) -> None:
        self.config, self.process, self.model, self.device = config, process, model, device
        self.num_labels, self.pad_id, self.self_condition = num_labels, pad_id, self_condition
        self.target = "tgt" if config.task == "word_order" else "tokens"
        self.sampler = timesteps.create(config.timestep_sampler, config.T)
        schedule = getattr(process, "schedule", None)
        self.adaptive = schedule if isinstance(schedule, schedules.AdaptiveSchedule) else None

    @staticmethod
    def create(config: TrainConfig, process: DiscreteProcess | GaussianDiffusion, model: nn.Module,
               device: torch.device, **kw: Any) -> Objective:
        cls = ContinuousObjective if config.family == "continuous" else DiscreteObjective
        return cls(config, process, model, device, **kw)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.config, self.device)

    # --- draws ---------------------------------------------------------------------------------------
    def draws(self, gbatch: dict[str, torch.Tensor], generators: tuple[torch.Generator, torch.Generator],
              train: bool) -> dict[str, Any]:
        """Every random draw of a step for the global batch ``gbatch``: ``t`` and importance weights ``w``
        (from the sampler; for evaluation uniform with weights 1), labels after condition dropout
        (training only), then the family's (:meth:`_family_draws`). ``generators``: (CPU, device)."""
        cpu_gen, gen = generators
        x0 = gbatch[self.target]
        G = x0.shape[0]
        if train:
            t, w = self.sampler.sample(G, generator=cpu_gen, device=self.device)
        else:
            t = torch.randint(1, self.config.T + 1, (G,), generator=cpu_gen).to(self.device)
            w = torch.ones(G, device=self.device)
        d: dict[str, Any] = {"t": t, "w": w}
        if self.config.task == "attribute":
            labels = gbatch["labels"]
            if train and self.config.cond_drop > 0:
                drop = torch.rand(labels.shape, generator=gen, device=labels.device) < self.config.cond_drop
                labels = torch.where(drop, torch.full_like(labels, self.num_labels), labels)
            d["labels"] = labels
        self._family_draws(d, x0, t, cpu_gen, gen)
        return d

    def _family_draws(self, d: dict[str, Any], x0: torch.Tensor, t: torch.Tensor, cpu_gen: torch.Generator,
                      gen: torch.Generator) -> None:
        raise NotImplementedError

    def record(self, t: torch.Tensor, per_sequence: torch.Tensor, difficulty: torch.Tensor | None, step: int) -> None:
        """Feed an update's losses back, for the global batch in its order (CPU): the timestep sampler's
        history, and the adaptive schedule's (``difficulty``), re-fitted every ``refit_every`` steps."""
        self.sampler.update(t, per_sequence)
        if self.adaptive is not None:
            self.adaptive.record(t, difficulty)
            if (step + 1) % self.config.refit_every == 0 and self.adaptive.refit():
                sync_schedule(self.process)

    # --- the condition -------------------------------------------------------------------------------
    def cond(self, batch: dict[str, torch.Tensor], draws: dict[str, Any], rows: torch.Tensor
             ) -> dict[str, torch.Tensor]:
        """The model's condition keywords for these rows: a label, the source tokens, or encoder memory."""
        cfg = self.config
        if cfg.task == "attribute":
            return {"label": draws["labels"][rows]}
        if cfg.task == "word_order":
            src = batch["src"]
            if cfg.conditioning == "concat":
                return {"cond_tokens": src}
            mask = src != self.pad_id
            with self.autocast():
                memory = self.model.encode(src, mask)
            return {"memory": memory, "memory_mask": mask}
        return {}

    # --- the loss ------------------------------------------------------------------------------------
    def loss(self, net: nn.Module, gbatch: dict[str, torch.Tensor], rows: torch.Tensor, draws: dict[str, Any],
             train: bool) -> BatchLoss:
        """The loss of the global-batch rows ``rows`` (``net``: the module to run the forward through)."""
        batch = {k: v[rows] for k, v in gbatch.items()}
        return self._loss(net, batch[self.target], draws["t"][rows], draws["w"][rows],
                          self.cond(batch, draws, rows), draws, rows, train)

    def _loss(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, w: torch.Tensor, cond: dict[str, torch.Tensor],
              draws: dict[str, Any], rows: torch.Tensor, train: bool) -> BatchLoss:
        raise NotImplementedError


def block_steps(t_blocks: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """``(B, L)``: every token's step, the step ``t_blocks[:, i // block_size]`` of its block."""
    return t_blocks.repeat_interleave(block_size, dim=1)[:, :length]


class DiscreteObjective(Objective):
    """``x_t ~ q(x_t | x_0)``; :func:`fastdiff.discrete.losses` of the x0 logits. With ``model.block_size``
    > 0, BD3-LM's per-block steps and two-stream forward (see the module docstring)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.block_size = int(self.config.model.get("block_size", 0) or 0)

    def _family_draws(self, d: dict[str, Any], x0: torch.Tensor, t: torch.Tensor, cpu_gen: torch.Generator,
                      gen: torch.Generator) -> None:
        if self.block_size:
            G, L = x0.shape
            nb = -(-L // self.block_size)
            tb = torch.randint(1, self.config.T + 1, (G, nb), generator=cpu_gen).to(self.device)
            d["t"] = tb[:, 0]  # what the (uniform) timestep sampler is shown; it ignores it
            d["t_tokens"] = block_steps(tb, self.block_size, L)
            d["x_t"] = self.process.q_sample(x0, d["t_tokens"], generator=gen)
            return
        d["x_t"] = self.process.q_sample(x0, t, generator=gen)

    def _loss(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, w: torch.Tensor, cond: dict[str, torch.Tensor],
              draws: dict[str, Any], rows: torch.Tensor, train: bool) -> BatchLoss:
        cfg = self.config
        x_t = draws["x_t"][rows]
        t_loss: torch.Tensor = t
        if self.block_size:
            t_loss = draws["t_tokens"][rows]
            cond = {**cond, "clean": x0}
        with self.autocast():
            logits = net(x_t, t, **cond)
        out = discrete.losses(self.process, x0, x_t, t_loss, logits.float(), objective=cfg.loss, lam=cfg.hybrid_lambda,
                              reduction="sequence", weights=w)
        per_seq, ce = out["per_sequence"].detach(), out["ce"].detach()
        terms = {"loss": out["loss"], cfg.loss: per_seq.mean(), "ce": ce.mean()}
        return BatchLoss(terms, per_seq, ce, t)


def ar_token_steps(length: int, T: int, n: torch.Tensor) -> torch.Tensor:
    """AR-Diffusion's training steps: ``(B, length)``, each row's positions at its sentence-level step
    ``n: (B,)`` (in ``[0, length + T]``) on the anchor-point line (:func:`fastdiff.continuous.ar_timesteps`)."""
    return continuous.ar_timesteps(length, T, n)


class ContinuousObjective(Objective):
    """Gaussian noise on the jointly learned embeddings; :meth:`GaussianDiffusion.losses` of the output.
    With ``config.ar_diffusion``, AR-Diffusion's per-position steps (see the module docstring)."""

    def _family_draws(self, d: dict[str, Any], x0: torch.Tensor, t: torch.Tensor, cpu_gen: torch.Generator,
                      gen: torch.Generator) -> None:
        if self.config.ar_diffusion:
            G, L = x0.shape
            n = torch.randint(0, L + self.config.T + 1, (G,), generator=cpu_gen)
            d["t"] = n.to(self.device)  # the sentence-level step (what BatchLoss.t reports)
            d["w"] = torch.ones(G, device=self.device)
            d["t_tokens"] = ar_token_steps(L, self.config.T, n).to(self.device)
        table = self.model.embedding_table()
        shape = (x0.shape[0], x0.shape[1], table.shape[1])
        d["noise"] = torch.randn(shape, generator=gen, device=self.device, dtype=table.dtype)
        if self.self_condition:
            d["coin"] = float(torch.rand((), generator=cpu_gen))  # drawn every step: a fixed RNG stream

    def _loss(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, w: torch.Tensor, cond: dict[str, torch.Tensor],
              draws: dict[str, Any], rows: torch.Tensor, train: bool) -> BatchLoss:
        cfg, process = self.config, self.process
        emb = self.model.embedding(x0)  # (b, L, D), learned jointly
        noise = draws["noise"][rows]
        t_out = t  # what BatchLoss reports: the sequence's step
        if cfg.ar_diffusion:  # AR-Diffusion: every position at its own step, (b, L)
            t = draws["t_tokens"][rows]
        x_t = process.q_sample(emb, t, noise=noise)
        # the loss's step: a position at step 0 (AR-Diffusion) is clean and keeps its x0 target, which the
        # x0 parameterisation computes at any step; the maths checks ask for t >= 1
        t_loss = t.clamp_min(1) if cfg.ar_diffusion else t
        extra: dict[str, torch.Tensor] = {}
        if self.self_condition:
            zeros = torch.zeros_like(x_t)
            extra["x_self_cond"] = zeros
            if train and draws["coin"] < cfg.self_condition_prob:  # Chen et al. 2022: estimate x0 once without grad
                with torch.no_grad(), self.autocast():
                    first = self.model(x_t, t, x_self_cond=zeros, **cond)
                extra["x_self_cond"] = process.to_x0(first.float(), x_t, t_loss).detach()
        with self.autocast():
            out = net(x_t, t, **extra, **cond)
        table = self.model.embedding_table().float()
        res = process.losses(out.float(), emb, x_t, t_loss, noise, tokens=x0, weight=table,
                             lam_round=cfg.lam_round if cfg.lam_round > 0 else None, lam_anchor=cfg.lam_anchor,
                             weights=w)
        per_seq = res["per_sequence"].detach()
        terms = {k: res[k].detach() for k in ("mse", "anchor", "round") if k in res}
        terms["loss"] = res["loss"]
        return BatchLoss(terms, per_seq, per_seq, t_out)
