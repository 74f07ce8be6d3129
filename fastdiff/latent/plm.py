"""The frozen pretrained encoder-decoder of latent diffusion (LD4LG, Lovelace et al. 2023).

:class:`PLM` wraps a Hugging Face seq2seq model (``BartForConditionalGeneration``,
``T5ForConditionalGeneration``, ... from a local directory, or built in memory) with its tokenizer:

* :meth:`PLM.encode`: token ids and their mask -> the encoder states ``(B, L, d_model)``;
* :meth:`PLM.reconstruction_loss`: the decoder's teacher-forced cross-entropy of target ids given (any)
  encoder states, the autoencoder's objective in LD4LG;
* :meth:`PLM.generate`: decoding from given encoder states (greedy or beam search, as Hugging Face's
  ``generate`` does), exactly ``length`` new tokens.

The tokenizer is the project's (:class:`fastdiff.data.TextTokenizer`, saved in the directory as
``fastdiff_tokenizer.json``) when the directory has one, else the directory's own (``AutoTokenizer``).
For offline use, :func:`build_small_plm` makes a small BART-style model over the project tokenizer and
:func:`train_plm` trains it on the bundled corpus (BART's token-masking objective: the decoder
reconstructs the original chunk from a corrupted one, so it learns both to copy from the encoder states
and to model the language).

``transformers`` is imported only inside functions (it is the optional ``hf`` / ``test`` extra).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from ..errors import InputError, InputFileNotFoundError, InputTypeError

__all__ = ["PLM", "TOKENIZER_FILE", "build_small_plm", "train_plm"]

#: the project tokenizer inside a PLM directory (its presence selects :class:`fastdiff.data.TextTokenizer`)
TOKENIZER_FILE = "fastdiff_tokenizer.json"


class _HFCodec:
    """A Hugging Face tokenizer with the few members of :class:`fastdiff.data.TextTokenizer` used here."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.sep_id = int(sep if sep is not None else self.pad_id)
        self.vocab_size = len(tok)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._tok.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def decode_batch(self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special: bool = True) -> list[str]:
        return [self.decode(r, skip_special) for r in batch]


def _encoder_output(states: torch.Tensor) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=states)


class PLM:
    """A frozen seq2seq model and its tokenizer (see the module docstring).

    Parameters
    ----------
    model : a Hugging Face encoder-decoder (``get_encoder()``, ``forward(encoder_outputs=, labels=)``,
        ``generate(encoder_outputs=)``); put in eval mode, its parameters frozen.
    tokenizer : a :class:`fastdiff.data.TextTokenizer` or a Hugging Face tokenizer.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_encoder"):
            raise InputTypeError(f"model: expected a Hugging Face encoder-decoder, got {type(model).__name__}")
        from ..data import TextTokenizer

        self.tokenizer = tokenizer if isinstance(tokenizer, TextTokenizer) else _HFCodec(tokenizer)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        self.d_model = int(getattr(cfg, "d_model", None) or cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)

    # --- files -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> PLM:
        """The model of a local Hugging Face directory (``AutoModelForSeq2SeqLM``) and its tokenizer."""
        p = Path(path)
        if not (p / "config.json").is_file():
            raise InputFileNotFoundError(f"plm: {str(path)!r} is not a Hugging Face model directory (no config.json)")
        try:
            from transformers import AutoModelForSeq2SeqLM
        except ImportError as e:  # the optional hf extra; the bundled latent checkpoint needs it too
            raise InputError(f"plm: loading the encoder-decoder in {str(path)!r} needs transformers: "
                             "pip install 'fastdiff[hf]'") from e

        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(str(p))
        except ValueError as e:  # not an encoder-decoder architecture
            raise InputError(f"plm: {str(path)!r} is not a seq2seq (encoder-decoder) model: {e}") from None
        if (p / TOKENIZER_FILE).is_file():
            from ..data import TextTokenizer

            tok = TextTokenizer.load(p / TOKENIZER_FILE)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p))
        return cls(model.float(), tok)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        """``save_pretrained`` (weights in ``dtype``) plus the tokenizer."""
        from ..data import TextTokenizer

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if dtype != torch.float32:
            import copy

            copy.deepcopy(self.model).to(dtype).save_pretrained(str(p))
        else:
            self.model.save_pretrained(str(p))
        if isinstance(self.tokenizer, TextTokenizer):
            self.tokenizer.save(p / TOKENIZER_FILE)
        else:
            self.tokenizer._tok.save_pretrained(str(p))

    # --- the encoder -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ids(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = _checks.token_ids("ids", ids, self.vocab_size)
        if ids.ndim != 2:
            raise InputError(f"ids: expected (B, L) token ids, got shape {tuple(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise InputError(f"mask: expected a {tuple(ids.shape)} bool tensor (True = real token)")
        return ids, mask.to(torch.bool)

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, d_model)`` encoder states of ``ids`` (``mask``: True = real token; default all)."""
        ids, mask = self._ids(ids, mask)
        return self.model.get_encoder()(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def _states(self, states: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(states, torch.Tensor) or states.ndim != 3 or states.shape[-1] != self.d_model:
            got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise InputError(f"states: expected (B, L, {self.d_model}) encoder states, got {got}")
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        elif not isinstance(mask, torch.Tensor) or mask.shape != states.shape[:2]:
            raise InputError(f"mask: expected a {tuple(states.shape[:2])} bool tensor (True = real state)")
        return states, mask.to(torch.bool)

    # --- the decoder -------------------------------------------------------------------------------
    def logits(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, V)`` teacher-forced decoder logits of ``targets`` (``(B, T)`` ids) given ``states``
        (gradients flow to ``states``, not to the frozen model)."""
        states, mask = self._states(states, mask)
        targets = _checks.token_ids("targets", targets, self.vocab_size)
        labels = targets.masked_fill(targets == self.tokenizer.pad_id, -100)
        out = self.model(encoder_outputs=_encoder_output(states), attention_mask=mask.long(), labels=labels)
        return out.logits

    def reconstruction_loss(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """Mean cross-entropy of the non-pad ``targets`` under :meth:`logits`."""
        logits = self.logits(states, targets, mask)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                 ignore_index=self.tokenizer.pad_id)

    @torch.no_grad()
    def generate(self, states: torch.Tensor, length: int, mask: torch.Tensor | None = None, num_beams: int = 1
                 ) -> torch.Tensor:
        """``(B, length)`` token ids decoded from ``states`` (greedy, or beam search with ``num_beams``),
        exactly ``length`` tokens (end-of-sequence suppressed, as the training chunks have none)."""
        states, mask = self._states(states, mask)
        length = _checks.positive_int("length", length)
        num_beams = _checks.positive_int("num_beams", num_beams)
        out = self.model.generate(encoder_outputs=_encoder_output(states), attention_mask=mask.long(),
                                  max_new_tokens=length, min_new_tokens=length, num_beams=num_beams,
                                  do_sample=False, eos_token_id=None, forced_eos_token_id=None,
                                  forced_bos_token_id=None)
        return out[:, -length:]

    # --- text --------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``, each ``(N, length)``: ``texts`` truncated / right-padded."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InputTypeError(f"texts: expected a list of str, got {type(texts).__name__}")
        length = _checks.positive_int("length", length)
        pad = self.tokenizer.pad_id
        ids = torch.full((len(texts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.bool)
        for i, row in enumerate(self.tokenizer.encode_batch(list(texts))):
            row = row[:length]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return ids, mask

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.decode_batch(ids.tolist())


def build_small_plm(tokenizer: Any, *, length: int, width: int = 128, layers: int = 2, heads: int = 4,
                    ff_mult: int = 4, dropout: float = 0.1) -> PLM:
    """A fresh BART-style encoder-decoder (``layers`` + ``layers``) over the project ``tokenizer``
    (decoder start = ``[MASK]``, pad = ``[PAD]``; no end-of-sequence: chunks are of fixed length)."""
    from transformers import BartConfig, BartForConditionalGeneration

    from ..data import TextTokenizer

    if not isinstance(tokenizer, TextTokenizer):
        raise InputTypeError(f"tokenizer: expected a fastdiff TextTokenizer, got {type(tokenizer).__name__}")
    for name, v in (("length", length), ("width", width), ("layers", layers), ("heads", heads), ("ff_mult", ff_mult)):
        _checks.positive_int(name, v)
    if width % heads:
        raise InputError(f"width: {width} is not divisible by heads={heads}")
    _checks.real("dropout", dropout, 0.0, 1.0, hi_open=True)
    cfg = BartConfig(vocab_size=tokenizer.vocab_size, d_model=width, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ff_mult * width,
                     decoder_ffn_dim=ff_mult * width, max_position_embeddings=length + 2, dropout=dropout,
                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=tokenizer.pad_id,
                     bos_token_id=tokenizer.mask_id, eos_token_id=tokenizer.sep_id,
                     decoder_start_token_id=tokenizer.mask_id, forced_eos_token_id=None, scale_embedding=True)
    return PLM(BartForConditionalGeneration(cfg), tokenizer)


def fit(params: list[torch.nn.Parameter], batch_loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler, *, steps: int, stage: str, max_seconds: float | None,
        log_every: int, emit: Callable[[dict], None], after_step: Callable[[], None] | None = None) -> list[dict]:
    """The training loop of every latent stage: ``batch_loss()`` (it draws its own batch), gradients clipped
    to norm 1, ``opt`` and ``sched`` stepped, then ``after_step()`` (an EMA update); the mean loss logged every
    ``log_every`` steps and at the end as ``{"stage", "step", "loss", "seconds"}`` (``emit(row)`` for each);
    stops after ``steps`` steps or ``max_seconds``. Returns the log rows."""
    rows: list[dict] = []
    start, running, count = time.perf_counter(), 0.0, 0
    for step in range(1, steps + 1):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        running, count = running + loss.item(), count + 1
        elapsed = time.perf_counter() - start
        done = step == steps or (max_seconds is not None and elapsed >= max_seconds)
        if step % log_every == 0 or done:
            rows.append({"stage": stage, "step": step, "loss": running / count, "seconds": round(elapsed, 1)})
            emit(rows[-1])
            running, count = 0.0, 0
        if done:
            break
    return rows


def train_plm(plm: PLM, tokens: torch.Tensor, *, steps: int, batch_size: int = 32, lr: float = 1e-3,
              warmup: int = 100, mask_rate: float = 0.15, seed: int = 0, max_seconds: float | None = None,
              log_every: int = 50, print_fn: Callable[[str], None] = print, stage: str = "plm") -> list[dict]:
    """Train ``plm`` (unfrozen for the duration) on ``(N, L)`` chunks ``tokens``: BART's token masking
    (each token replaced by ``[MASK]`` with probability ``mask_rate``), the decoder reconstructing the
    original chunk; the learning rate warms up linearly over ``warmup`` steps, then stays at ``lr``.
    Returns the log rows (``stage``: their "stage" entry); ``plm`` is frozen and in eval mode again
    afterwards."""
    steps = _checks.positive_int("steps", steps)
    batch_size = _checks.positive_int("batch_size", batch_size)
    mask_rate = _checks.real("mask_rate", mask_rate, 0.0, 1.0, hi_open=True)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0:
        raise InputError("tokens: expected a non-empty (N, L) tensor of token ids")
    model = plm.model
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, warmup)))
    mask_id = getattr(plm.tokenizer, "mask_id", plm.tokenizer.pad_id)

    def batch_loss() -> torch.Tensor:
        x = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=g)]
        noisy = x.masked_fill(torch.rand(x.shape, generator=g) < mask_rate, mask_id)
        labels = x.masked_fill(x == plm.tokenizer.pad_id, -100)
        return model(input_ids=noisy, attention_mask=(x != plm.tokenizer.pad_id).long(), labels=labels).loss

    rows = fit(list(model.parameters()), batch_loss, opt, sched, steps=steps, stage=stage, max_seconds=max_seconds,
               log_every=log_every, emit=lambda row: print_fn(json.dumps(row)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return rows
