"""The parts a :class:`~fastdiff.training.Trainer` is built from, checked against its config: the
training data, the model (built from ``config.arch`` or given) and the optimizer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import _checks
from .config import DATA_KEYS, TrainConfig, lr_factor
from ..errors import InputError, InputTypeError

__all__ = ["batch_tokens", "build_model", "build_optimizer", "check_data", "check_model", "check_vocab", "data_lengths",
           "num_labels", "on_device", "set_lr", "valid_batches"]


def check_data(name: str, data: object, task: str) -> dict[str, torch.Tensor]:
    """``data`` as a dict of int64 tensors with exactly the task's keys (:data:`DATA_KEYS`)."""
    if not isinstance(data, dict):
        raise InputTypeError(f"{name}: expected a dict of tensors, got {type(data).__name__}")
    keys = DATA_KEYS[task]
    if set(data) != set(keys):
        raise InputError(f"{name}: task {task!r} takes the keys {list(keys)}, got {sorted(data)}")
    out = {}
    for k in keys:
        v = _checks.integer(f"{name}[{k!r}]", data[k])
        if v.ndim != (1 if k == "labels" else 2):
            raise InputError(f"{name}[{k!r}]: expected {'(N,)' if k == 'labels' else '(N, L)'}, got {tuple(v.shape)}")
        if v.shape[0] != data[keys[0]].shape[0]:
            raise InputError(f"{name}[{k!r}]: {v.shape[0]} rows, expected {data[keys[0]].shape[0]}")
        out[k] = v.long()
    return out


def _data_length(field: str, value: int, data: torch.Tensor, key: str) -> int:
    """``config.<field>``: 0 takes the data's length; any other value must be the data's."""
    length = int(data.shape[1])
    if value and value != length:
        raise InputError(f"{field}: the config says {value} but train_data[{key!r}] holds sequences of {length}")
    return length


def data_lengths(config: TrainConfig, data: dict[str, torch.Tensor]) -> dict[str, int]:
    """``seq_len`` (and ``src_len`` for word_order) of the data, checked against the config's."""
    key = "tgt" if config.task == "word_order" else "tokens"
    out = {"seq_len": _data_length("seq_len", config.seq_len, data[key], key)}
    if config.task == "word_order":
        out["src_len"] = _data_length("src_len", config.src_len, data["src"], "src")
    return out


def on_device(keys: Any, vals: Any, device: torch.device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """A :class:`fastdiff.data.Batches` batch (a tensor or a tuple) as a dict of the data's ``keys``."""
    vals = vals if isinstance(vals, tuple) else (vals,)
    return {k: v.to(device, non_blocking=non_blocking) for k, v in zip(keys, vals)}


def valid_batches(data: dict[str, torch.Tensor], batch_size: int, count: int, device: torch.device
                  ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """The first ``count`` batches of ``data`` (at most ``batch_size`` rows each), in order: ``(i, batch)``."""
    from ..data import Batches

    n = next(iter(data.values())).shape[0]
    batches = Batches(*data.values(), batch_size=min(batch_size, n), shuffle=False)
    for i in range(min(count, len(batches))):
        yield i, on_device(data, batches.next_batch(), device)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens in a batch (``tokens`` or ``tgt``)."""
    x = batch.get("tokens", batch.get("tgt"))
    return int(x.numel()) if x is not None else 0


# --- the model -------------------------------------------------------------------------------------------
def model_config(config: TrainConfig, tokenizer: Any, train_data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """SED config from ``config.model`` plus what the task and family imply (checked for conflicts)."""
    mc = dict(config.model)
    if tokenizer is not None and mc.setdefault("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise InputError(f"model: vocab_size={mc['vocab_size']} but the tokenizer has {tokenizer.vocab_size}")
    family = config.family
    implied: dict[str, Any] = {"kind": family, "output": "logits" if family == "discrete" else "embedding"}
    if family == "continuous":
        implied["embedding_layernorm"] = config.embedding_layernorm
        mc.setdefault("self_condition", True)  # SED trains with self-conditioning
    elif config.kind == "absorbing":
        # MDLM: the x0 posterior of masked diffusion does not need the step (the masks carry it), and a
        # step-free model lets the sampler cache network calls (cache=True)
        mc.setdefault("time_conditioning", "none")
    if config.task == "attribute":
        implied["num_labels"] = len(config.label_names) or int(train_data["labels"].max()) + 1
    if config.task == "word_order" and config.conditioning == "cross":
        implied["cross_attention"] = True
    for k, v in implied.items():
        if mc.setdefault(k, v) != v:
            raise InputError(f"model: {k}={mc[k]!r} conflicts with the training config ({k}={v!r} implied)")
    return mc


def build_model(config: TrainConfig, tokenizer: Any, train_data: dict[str, torch.Tensor]) -> nn.Module:
    """``build_model(config.arch, ...)`` with the weights drawn from ``config.seed`` (the global RNG is
    left as it was)."""
    from ..models import build_model as build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build(config.arch, model_config(config, tokenizer, train_data))


def check_model(model: nn.Module, config: TrainConfig, tokenizer: Any, datasets: dict[str, dict[str, torch.Tensor]]
                ) -> tuple[dict[str, Any], int, int]:
    """``(model config, vocabulary size, number of labels)`` of ``model``, checked against the config, the
    tokenizer and the data (``datasets``: name -> data, the training data first)."""
    model_cfg = dict(model.config_dict()) if hasattr(model, "config_dict") else dict(config.model)
    V = check_vocab(model_cfg, tokenizer, datasets)
    labels = num_labels(config, model_cfg, next(iter(datasets.values())))
    if config.family == "continuous" and not callable(getattr(model, "embedding_table", None)):
        raise InputTypeError("model: continuous training needs model.embedding and model.embedding_table()")
    return model_cfg, V, labels


def check_vocab(model_cfg: dict[str, Any], tokenizer: Any, datasets: dict[str, dict[str, torch.Tensor]]) -> int:
    """The vocabulary size (the model's, else the tokenizer's); the tokenizer and every token id in
    ``datasets`` (name -> data) must fit it."""
    V = model_cfg.get("vocab_size")
    if V is None and tokenizer is not None:
        V = tokenizer.vocab_size
    if V is None:
        raise InputError("model: vocab_size unknown: give config.model['vocab_size'] or a tokenizer")
    V = int(V)
    if tokenizer is not None and tokenizer.vocab_size != V:
        raise InputError(f"tokenizer: has {tokenizer.vocab_size} ids but the model's vocab_size is {V}")
    for name, data in datasets.items():
        for k in ("tokens", "tgt", "src"):
            if k in data and data[k].numel() and not 0 <= int(data[k].min()) <= int(data[k].max()) < V:
                raise InputError(f"{name}[{k!r}]: token ids must lie in [0, {V})")
    return V


def num_labels(config: TrainConfig, model_cfg: dict[str, Any], train_data: dict[str, torch.Tensor]) -> int:
    """The model's number of labels; the attribute task needs >= 1 and labels within them."""
    n = int(model_cfg.get("num_labels", 0) or 0)
    if config.task == "attribute":
        if n < 1:
            raise InputError("model: the attribute task needs num_labels >= 1")
        labels = train_data["labels"]
        if int(labels.min()) < 0 or int(labels.max()) >= n:
            raise InputError(f"train_data['labels']: must lie in [0, {n})")
    return n


# --- the optimizer ---------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with weight decay on the matrices (not on embeddings, norms and biases); also the parameter
    names in the optimizer's index order (the checkpoint keys its state by index)."""
    decay, no_decay = [], []
    names: tuple[list[str], list[str]] = ([], [])
    for n, p in model.named_parameters():
        if p.requires_grad:
            k = 0 if p.ndim >= 2 and "embed" not in n.lower() else 1
            (decay, no_decay)[k].append(p)
            names[k].append(n)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)
    return optimizer, names[0] + names[1]


def set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> float:
    """Set the learning rate of the update at 0-based ``step`` (:func:`lr_factor`); returns it."""
    lr = config.lr * lr_factor(step, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                               schedule=config.lr_schedule, min_ratio=config.min_lr_ratio)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr
