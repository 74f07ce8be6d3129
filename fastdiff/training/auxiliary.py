"""The two scoring models that ship beside the diffusion checkpoints, and their training loop.

* a small causal LM (:class:`fastdiff.models.CausalLM`) for generative perplexity: the mean next-token
  NLL of generated text under an autoregressive model trained on the same corpus (the metric of MDLM,
  Sahoo et al. 2024, and SEDD, Lou et al. 2024, who use GPT-2 Large);
* a small classifier (:class:`fastdiff.models.TextClassifier`) for attribute accuracy: how often the
  classifier recovers the label a sample was generated for (Diffusion-LM's control metric, Li et al. 2022).

Both train with cross-entropy, AdamW, linear warm-up and cosine decay, gradient clipping; each writes a
JSONL log and a checkpoint (:func:`fastdiff.training.save_checkpoint`, ``process`` = ``{"family": "none"}``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .config import lr_factor

if TYPE_CHECKING:
    from ..data import TextTokenizer

#: a scorer's data: ``tokens (N, L)`` (causal LM) or ``(tokens, labels)`` (classifier)
ScorerData = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

__all__ = ["train_scorer"]

KINDS = ("causal_lm", "classifier")


def _loss(kind: str, model: nn.Module, batch: ScorerData, pad_id: int) -> torch.Tensor:
    if kind == "causal_lm":
        tokens = batch
        logits = model(tokens[:, :-1])
        target = tokens[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=pad_id)
    tokens, labels = batch
    return F.cross_entropy(model(tokens, attention_mask=tokens != pad_id).float(), labels)


@torch.no_grad()
def _valid(kind: str, model: nn.Module, data: ScorerData, pad_id: int, batch_size: int) -> dict:
    model.eval()
    total, n, correct = 0.0, 0, 0
    tensors = data if isinstance(data, tuple) else (data,)
    N = tensors[0].shape[0]
    for i in range(0, N, batch_size):
        batch = tuple(t[i:i + batch_size] for t in tensors)
        b = batch if kind == "classifier" else batch[0]
        total += float(_loss(kind, model, b, pad_id)) * batch[0].shape[0]
        n += batch[0].shape[0]
        if kind == "classifier":
            correct += int((model(b[0], attention_mask=b[0] != pad_id).argmax(-1) == b[1]).sum())
    model.train()
    out = {"valid_loss": total / max(1, n)}
    out["valid_ppl" if kind == "causal_lm" else "valid_acc"] = math.exp(out["valid_loss"]) if kind == "causal_lm" \
        else correct / max(1, n)
    return out


def train_scorer(kind: str, model: nn.Module, train: ScorerData, valid: ScorerData, *, out_dir: str | Path,
                 tokenizer: TextTokenizer, steps: int = 1000,
                 batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01, warmup: int = 100,
                 grad_clip: float = 1.0, seed: int = 0, log_every: int = 50, progress: bool = True,
                 extra_config: dict | None = None) -> Path:
    """Train ``model`` (a ``causal_lm`` or ``classifier``) and save it to ``out_dir``; returns the path.

    ``train``/``valid``: ``tokens (N, L)`` for the causal LM, ``(tokens, labels)`` for the classifier.
    The log ``train_log.jsonl`` gets one line per ``log_every`` steps (step, loss, lr, elapsed) and the
    validation figures at the end.
    """
    from ..data import Batches
    from .checkpoint import save_checkpoint

    _checks.choice("kind", kind, KINDS)
    _checks.positive_int("steps", steps)
    _checks.positive_int("batch_size", batch_size)
    _checks.positive_int("warmup", warmup, 0)
    _checks.positive_int("log_every", log_every)
    _checks.positive_int("seed", seed, 0)
    _checks.real("lr", lr, 0.0, lo_open=True)
    _checks.real("weight_decay", weight_decay, 0.0)
    _checks.real("grad_clip", grad_clip, 0.0, lo_open=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = train if isinstance(train, tuple) else (train,)
    batches = Batches(*tensors, batch_size=batch_size, seed=seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    pad_id = tokenizer.pad_id
    model.train()
    log_path = out_dir / "train_log.jsonl"
    t0 = time.perf_counter()
    bar = None
    from .logs import progress_enabled as _progress_enabled

    if _progress_enabled(progress):  # no bar off a terminal: its \r frames would pile up in a log
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train {kind}", unit="step")
    with open(log_path, "w") as log:
        run = 0.0
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, warmup_steps=warmup, max_steps=steps)
            batch = batches.next_batch()
            loss = _loss(kind, model, batch, pad_id)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            run += float(loss)
            if (step + 1) % log_every == 0:
                log.write(json.dumps({"step": step + 1, "loss": run / log_every, "lr": opt.param_groups[0]["lr"],
                                      "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")
                log.flush()
                run = 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
        final = _valid(kind, model, valid, pad_id, 256)
        final.update(step=steps, elapsed_s=round(time.perf_counter() - t0, 2))
        log.write(json.dumps(final) + "\n")
    if bar is not None:
        bar.close()
    train_cfg = {"kind": kind, "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                 "warmup": warmup, "grad_clip": grad_clip, "seed": seed, **(extra_config or {}), "final": final}
    return save_checkpoint(out_dir / "final", model.eval(), process={"family": "none"}, train=train_cfg,
                           tokenizer=tokenizer, step=steps)
