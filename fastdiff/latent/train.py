"""Training of a :class:`~fastdiff.latent.model.LatentDiffusion` model, in LD4LG's stages:

1. ``plm`` (only without a pretrained encoder-decoder): a small BART-style model trained here on the corpus
   (:func:`~fastdiff.latent.plm.train_plm`: ``plm_steps`` of token masking, then ``plm_copy_steps`` of plain
   copying, mask rate 0), then frozen;
2. ``ae``: the compressor and reconstructor on the frozen PLM (:func:`train_autoencoder`);
3. ``diffusion``: the SED denoiser on the normalised latents of the training chunks, computed once with
   the frozen PLM and autoencoder (:func:`train_diffusion`).

:class:`LatentConfig` holds every hyper-parameter; :func:`run_stages` runs the chosen stages into a
checkpoint directory (what ``fastdiff train --family latent`` calls). :func:`reconstruction_scores` gives
the autoencoder's round-trip exact match and token accuracy on held-out chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from ..errors import InputError, InputTypeError
from .autoencoder import LatentAutoencoder
from .model import LatentDiffusion, is_latent_checkpoint
from .plm import PLM, build_small_plm, fit, train_plm

__all__ = ["STAGES", "LatentConfig", "latent_data", "latent_scale", "reconstruction_scores", "run_stages",
           "train_autoencoder", "train_diffusion"]

#: the stages of :func:`run_stages`; "all" = plm (without --plm), ae, diffusion
STAGES = ("plm", "ae", "diffusion", "all")
#: the warm-up steps of stage plm's copy phase (``LatentConfig.plm_copy_steps``)
PLM_COPY_WARMUP = 50


@dataclasses.dataclass
class LatentConfig:
    """Hyper-parameters of the three stages (``fastdiff train --family latent --set KEY=VALUE``)."""

    seq_len: int = 64
    task: str = "attribute"
    balance: bool = False
    seed: int = 0
    batch_size: int = 32
    warmup: int = 100
    # the small PLM (stage plm)
    plm_width: int = 128
    plm_layers: int = 2
    plm_heads: int = 4
    plm_steps: int = 3000
    plm_lr: float = 1e-3
    plm_mask_rate: float = 0.15
    # then the copy phase: mask rate 0 (the decoder reproduces its input), lr plm_copy_lr, warm-up
    # PLM_COPY_WARMUP, seed + 1; 0 steps skips it. 1149 and 2e-3: the bundled checkpoint's PLM
    # (fastdiff/assets/latent/command.txt), so the command line runs its recipe.
    plm_copy_steps: int = 1149
    plm_copy_lr: float = 2e-3
    # the autoencoder (stage ae)
    n_latents: int = 16
    d_latent: int = 64
    ae_width: int = 128
    ae_layers: int = 2
    ae_heads: int = 4
    ae_steps: int = 3000
    ae_lr: float = 5e-4
    ae_noise: float = 0.1
    # the diffusion (stage diffusion)
    width: int = 128
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0
    diffusion_steps: int = 4000
    lr: float = 5e-4
    schedule: str = "cosine"
    T: int = 1000
    parameterization: str = "x0"
    cond_drop: float = 0.1
    self_condition: bool = True
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                _checks.positive_int(f.name, v, 0 if f.name in ("seed", "warmup", "plm_copy_steps") else 1)
            elif f.type in ("float", float):
                _checks.real(f.name, v, 0.0, lo_open=f.name.endswith("lr"))
            elif f.type in ("bool", bool) and not isinstance(v, bool):
                raise InputTypeError(f"{f.name}: expected true or false, got {v!r}")
        _checks.choice("task", self.task, ("attribute", "lm"))
        _checks.choice("parameterization", self.parameterization, ("x0", "eps"))
        for name in ("cond_drop", "plm_mask_rate"):
            _checks.real(name, getattr(self, name), 0.0, 1.0, hi_open=name == "plm_mask_rate")
        _checks.real("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        for w, h in (("plm_width", "plm_heads"), ("ae_width", "ae_heads"), ("width", "heads")):
            if getattr(self, w) % getattr(self, h):
                raise InputError(f"{w}: {getattr(self, w)} is not divisible by {h}={getattr(self, h)}")

    @classmethod
    def from_dict(cls, d: dict) -> LatentConfig:
        return cls(**_checks.config_fields("config", cls, d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def latent_data(docs: Sequence[Any], plm: PLM, length: int, task: str = "attribute", split: str = "train",
                balance: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(tokens (N, length), labels (N,) or None, label names)`` of the corpus under the PLM's tokenizer:
    :func:`fastdiff.data.attribute_chunks` (task "attribute") or :func:`fastdiff.data.lm_chunks` ("lm")."""
    from ..data import ATTRIBUTES, attribute_chunks, lm_chunks

    _checks.choice("task", task, ("attribute", "lm"))
    if task == "lm":
        return lm_chunks(docs, plm.tokenizer, length, split), None, []
    names = sorted({d.source for d in docs})
    if set(names) == set(ATTRIBUTES):
        names = list(ATTRIBUTES)
    toks, labels = attribute_chunks(docs, plm.tokenizer, length, split, balance=balance or split != "train",
                                    attributes=tuple(names))
    return toks, labels, names


def _emitter(out: Path | None, print_fn: Callable[[str], None]) -> Callable[[dict], None]:
    """A log row printed, and appended to ``out/train_log.jsonl`` when ``out`` is given."""
    def emit(row: dict) -> None:
        print_fn(json.dumps(row))
        if out is not None:
            with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    return emit


def _schedule(opt: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine to 10%."""
    def f(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def train_autoencoder(model: LatentDiffusion, tokens: torch.Tensor, *, steps: int, batch_size: int = 32,
                      lr: float = 5e-4, warmup: int = 100, noise: float = 0.1, seed: int = 0,
                      max_seconds: float | None = None, log_every: int = 50, out: Path | None = None,
                      print_fn: Callable[[str], None] = print) -> list[dict]:
    """AdamW on :meth:`LatentAutoencoder.loss` (the PLM stays frozen). Returns the log rows."""
    steps = _checks.positive_int("steps", steps)
    batch_size = _checks.positive_int("batch_size", batch_size)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] != model.seq_len:
        raise InputError(f"tokens: expected (N, {model.seq_len}) token ids")
    ae, plm = model.autoencoder, model.plm
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    sched = _schedule(opt, warmup, steps)
    pad = plm.tokenizer.pad_id
    ae.train()

    def batch_loss() -> torch.Tensor:
        x = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=g)]
        return ae.loss(plm, x, x != pad, noise=noise, generator=g)

    rows = fit(list(ae.parameters()), batch_loss, opt, sched, steps=steps, stage="ae", max_seconds=max_seconds,
               log_every=log_every, emit=_emitter(out, print_fn))
    ae.eval()
    return rows


@torch.no_grad()
def _all_latents(model: LatentDiffusion, tokens: torch.Tensor, batch: int = 256) -> torch.Tensor:
    pad = model.plm.tokenizer.pad_id
    return torch.cat([model.latents(tokens[i:i + batch], tokens[i:i + batch] != pad)
                      for i in range(0, tokens.shape[0], batch)])


def latent_scale(model: LatentDiffusion, tokens: torch.Tensor) -> float:
    """The standard deviation of the latents of ``tokens`` (every entry pooled)."""
    return float(_all_latents(model, tokens).std())


def train_diffusion(model: LatentDiffusion, tokens: torch.Tensor, labels: torch.Tensor | None = None, *,
                    steps: int, batch_size: int = 32, lr: float = 5e-4, warmup: int = 100, cond_drop: float = 0.1,
                    ema_decay: float = 0.999, seed: int = 0, max_seconds: float | None = None,
                    log_every: int = 50, out: Path | None = None,
                    print_fn: Callable[[str], None] = print) -> list[dict]:
    """AdamW on :meth:`LatentDiffusion.loss` over the normalised latents of ``tokens`` (computed once);
    the denoiser ends with its EMA weights (``ema_decay`` 0: the last weights). Returns the log rows."""
    steps = _checks.positive_int("steps", steps)
    batch_size = _checks.positive_int("batch_size", batch_size)
    net, _ = model._need_denoiser()
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != tokens.shape[:1]):
        raise InputError(f"labels: expected a ({tokens.shape[0]},) tensor")
    z = _all_latents(model, tokens) / model.scale
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = _schedule(opt, warmup, steps)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()} if ema_decay else None
    net.train()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, z.shape[0], (batch_size,), generator=g)
        return model.loss(z[idx], None if labels is None else labels[idx], cond_drop=cond_drop, generator=g)

    @torch.no_grad()
    def update_ema() -> None:
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(ema_decay).add_(v, alpha=1 - ema_decay)
            else:
                ema[k].copy_(v)

    rows = fit(list(net.parameters()), batch_loss, opt, sched, steps=steps, stage="diffusion",
               max_seconds=max_seconds, log_every=log_every, emit=_emitter(out, print_fn),
               after_step=update_ema if ema is not None else None)
    if ema is not None:
        net.load_state_dict(ema)
    net.eval()
    return rows


@torch.no_grad()
def reconstruction_scores(model: LatentDiffusion, tokens: torch.Tensor, num_beams: int = 1, batch: int = 64
                          ) -> dict:
    """The autoencoder's round trip on ``(N, seq_len)`` chunks: ``exact_match`` (rows reproduced exactly)
    and ``token_accuracy`` (positions reproduced), against the input ids."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] != model.seq_len:
        raise InputError(f"tokens: expected (N, {model.seq_len}) token ids")
    pad = model.plm.tokenizer.pad_id
    out = torch.cat([model.reconstruct(tokens[i:i + batch], tokens[i:i + batch] != pad, num_beams)
                     for i in range(0, tokens.shape[0], batch)])
    real = tokens != pad
    same = (out == tokens) | ~real
    return {"rows": int(tokens.shape[0]), "exact_match": float(same.all(1).float().mean()),
            "token_accuracy": float(((out == tokens) & real).sum() / real.sum())}


def run_stages(cfg: LatentConfig, out: str | Path, *, stage: str = "all", docs: Sequence[Any] | None = None,
               plm: str | Path | None = None, tokenizer: Any = None, steps: int | None = None,
               max_seconds: float | None = None, log_every: int = 50, fp16: bool = False,
               print_fn: Callable[[str], None] = print) -> LatentDiffusion:
    """Run ``stage`` ("plm", "ae", "diffusion" or "all") of ``cfg`` into the checkpoint directory ``out``.

    * "plm": a small encoder-decoder over ``tokenizer`` (default: the bundled one) trained on ``docs``
      (``plm_steps`` of token masking, then ``plm_copy_steps`` of copying, logged as stage "plm-copy"),
      saved into ``out/plm`` with a fresh autoencoder (so ``out`` is already a loadable checkpoint).
    * "ae": needs ``plm`` (a Hugging Face directory, recorded by its absolute path) or ``out`` holding a
      checkpoint (its PLM); trains the autoencoder, records the latents' scale.
    * "diffusion": needs ``out`` holding a checkpoint with a trained autoencoder; trains a fresh denoiser.
    * "all": plm (unless ``plm`` is given), ae, diffusion.

    ``steps`` replaces the chosen stage's step count (not with "all"; for "plm", the masking phase's);
    ``max_seconds`` caps each stage's wall time (each of the two PLM phases on its own). Returns the model
    as saved.
    """
    from ..data import default_tokenizer, python_docs

    if not isinstance(cfg, LatentConfig):
        raise InputTypeError(f"cfg: expected a LatentConfig, got {type(cfg).__name__}")
    _checks.choice("stage", stage, STAGES)
    if steps is not None:
        if stage == "all":
            raise InputError("steps: give each stage's steps (plm_steps, ae_steps, diffusion_steps) with stage all")
        _checks.positive_int("steps", steps)
    out = Path(out)
    stages = ["plm", "ae", "diffusion"] if stage == "all" else [stage]
    if stage == "all" and plm is not None:
        stages.remove("plm")
    if "plm" in stages and plm is not None:
        raise InputError("plm: stage plm trains a new encoder-decoder; drop --plm (or choose stage ae)")
    model: LatentDiffusion | None = None
    plm_where: str | None = None
    if stages[0] == "ae" and plm is not None:
        p = PLM.load(plm)
        plm_where = str(Path(plm).resolve())
        ae = LatentAutoencoder(p.d_model, cfg.seq_len, cfg.n_latents, cfg.d_latent, cfg.ae_width, cfg.ae_layers,
                               cfg.ae_heads)
        model = LatentDiffusion(p, ae)
    elif stages[0] != "plm":
        if not is_latent_checkpoint(out):
            raise InputError(f"stage: {stages[0]} continues the checkpoint in --out, and {str(out)!r} holds none "
                             f"(run stage {'plm' if stages[0] == 'ae' else 'ae'} first, or give --plm)")
        model = LatentDiffusion.load(out)
        plm_where = model.plm_path if model.plm_path != "plm" else None
        if model.seq_len != cfg.seq_len:
            raise InputError(f"seq_len: the checkpoint in {str(out)!r} has seq_len {model.seq_len}, got {cfg.seq_len}")
        if stages[0] == "diffusion" and not model.extra.get("ae_trained"):
            raise InputError(f"stage: the autoencoder of {str(out)!r} is untrained; run stage ae first")
    docs = list(docs) if docs is not None else python_docs()  # after the checks: reading the corpus takes a while
    out.mkdir(parents=True, exist_ok=True)
    (out / "latent_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n", encoding="utf-8")
    for st in stages:
        n = steps if steps is not None else getattr(cfg, f"{st}_steps")
        if st == "plm":
            tok = tokenizer if tokenizer is not None else default_tokenizer()
            torch.manual_seed(cfg.seed)
            p = build_small_plm(tok, length=cfg.seq_len, width=cfg.plm_width, layers=cfg.plm_layers,
                                heads=cfg.plm_heads)
            tokens, _, _ = latent_data(docs, p, cfg.seq_len, "lm", "train")
            print_fn(f"stage plm: {sum(q.numel() for q in p.model.parameters()) / 1e6:.2f} M parameters, "
                     f"{tokens.shape[0]} chunks of {cfg.seq_len} tokens, {n} steps")
            rows = train_plm(p, tokens, steps=n, batch_size=cfg.batch_size, lr=cfg.plm_lr, warmup=cfg.warmup,
                             mask_rate=cfg.plm_mask_rate, seed=cfg.seed, max_seconds=max_seconds,
                             log_every=log_every, print_fn=print_fn)
            with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            copy_steps = 0
            if cfg.plm_copy_steps:
                print_fn(f"stage plm, copy phase: {cfg.plm_copy_steps} steps, mask rate 0, lr {cfg.plm_copy_lr:g}")
                copy = train_plm(p, tokens, steps=cfg.plm_copy_steps, batch_size=cfg.batch_size, lr=cfg.plm_copy_lr,
                                 warmup=PLM_COPY_WARMUP, mask_rate=0.0, seed=cfg.seed + 1, max_seconds=max_seconds,
                                 log_every=log_every, print_fn=print_fn, stage="plm-copy")
                with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in copy)
                copy_steps = copy[-1]["step"]
            torch.manual_seed(cfg.seed + 1)
            ae = LatentAutoencoder(p.d_model, cfg.seq_len, cfg.n_latents, cfg.d_latent, cfg.ae_width,
                                   cfg.ae_layers, cfg.ae_heads)
            model = LatentDiffusion(p, ae)
            model.save(out, fp16=fp16, plm_steps=rows[-1]["step"], plm_copy_steps=copy_steps, ae_trained=False)
        elif st == "ae":
            assert model is not None
            tokens, _, _ = latent_data(docs, model.plm, cfg.seq_len, cfg.task, "train", cfg.balance)
            torch.manual_seed(cfg.seed + 1)
            model.autoencoder = LatentAutoencoder(model.plm.d_model, cfg.seq_len, cfg.n_latents, cfg.d_latent,
                                                  cfg.ae_width, cfg.ae_layers, cfg.ae_heads)
            model.denoiser = model.diffusion = None
            model.label_names = []
            print_fn(f"stage ae: {sum(q.numel() for q in model.autoencoder.parameters()) / 1e6:.2f} M parameters, "
                     f"{tokens.shape[0]} chunks -> {cfg.n_latents} x {cfg.d_latent} latents, {n} steps")
            rows = train_autoencoder(model, tokens, steps=n, batch_size=cfg.batch_size, lr=cfg.ae_lr,
                                     warmup=cfg.warmup, noise=cfg.ae_noise, seed=cfg.seed, max_seconds=max_seconds,
                                     log_every=log_every, out=out, print_fn=print_fn)
            model.scale = latent_scale(model, tokens[:1024])
            model.save(out, plm=plm_where, fp16=fp16, ae_steps=rows[-1]["step"], ae_trained=True)
        else:
            assert model is not None
            tokens, labels, names = latent_data(docs, model.plm, cfg.seq_len, cfg.task, "train", cfg.balance)
            torch.manual_seed(cfg.seed + 2)
            model.attach_denoiser(schedule=cfg.schedule, T=cfg.T, parameterization=cfg.parameterization,
                                  label_names=names, width=cfg.width, layers=cfg.layers, heads=cfg.heads,
                                  dropout=cfg.dropout, self_condition=cfg.self_condition)
            print_fn(f"stage diffusion: {sum(q.numel() for q in model.denoiser.parameters()) / 1e6:.2f} M "
                     f"parameters, {tokens.shape[0]} chunks, labels {names or 'none'}, {n} steps")
            rows = train_diffusion(model, tokens, labels, steps=n, batch_size=cfg.batch_size, lr=cfg.lr,
                                   warmup=cfg.warmup, cond_drop=cfg.cond_drop, ema_decay=cfg.ema_decay,
                                   seed=cfg.seed, max_seconds=max_seconds, log_every=log_every, out=out,
                                   print_fn=print_fn)
            model.save(out, plm=plm_where, fp16=fp16, diffusion_steps=rows[-1]["step"])
    assert model is not None
    return model
