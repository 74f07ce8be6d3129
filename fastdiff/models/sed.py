"""The SED denoiser (Strudel et al. 2022, "Self-conditioned Embedding Diffusion for Text Generation").

A pre-LayerNorm transformer encoder with Transformer-XL relative positions
(:class:`~fastdiff.models.attention.RelativeSelfAttention`). Inputs are scaled so that content dominates
(Vaswani et al. 2017: token embeddings initialised at std ``width**-0.5`` and multiplied by
``sqrt(width)``, so each component has unit scale, like the label prefix's). The diffusion step goes
through a sinusoidal embedding and a dense SiLU MLP, and reaches the network as ``time_conditioning``
says:

* ``"adaln"`` (default): adaptive LayerNorm as in DiT (Peebles & Xie 2023, adaLN-Zero) and MDLM's DDiT:
  each block's two norms get a per-sequence shift and scale and each residual branch a gate, all from
  the step embedding through zero-initialised projections, so at initialisation every block is the
  identity and the step can never drown the tokens;
* ``"none"``: the step is not an input. For absorbing (masked) diffusion the x0 posterior does not need
  it (Sahoo et al. 2024, MDLM §3.5: the masked positions carry the noise level), and a time-independent
  model lets the sampler skip network calls when nothing changed (``cache=True``);
* ``"add"``: the step embedding is added to every input position (the original layout; checkpoints
  whose config predates ``time_conditioning`` load as this, with unscaled embeddings,
  ``embed_scale=False``). Measured on the bundled corpus, this layout stays at the unigram solution:
  the step vector is larger than the token embeddings and attention never leaves uniform.

Inputs:

* discrete processes: ``x_t: (B, L)`` token ids (mask included) through a token embedding; the output is
  x0 logits ``(B, L, V)`` (projection tied to the input embedding by default);
* continuous processes: ``x_t: (B, L, D)`` noisy embeddings, concatenated on the feature axis with the
  self-conditioning estimate ``x_self_cond`` (Chen et al. 2022; zeros when absent) and projected to the
  width; the output is in embedding space ``(B, L, D)`` (x0 or eps, as the process is parameterised). The
  model owns its jointly learned embeddings (``model.embedding``, a
  :class:`fastdiff.continuous.TokenEmbedding`, optional embedding LayerNorm).

Conditioning by concatenation: ``label: (B,)`` becomes one prefix vector (``num_labels`` is the null label
that classifier-free guidance training drops to, Ho & Salimans 2022), ``cond_tokens: (B, Lc)`` are embedded
clean and prepended (frozen concatenation for text-to-text; PAD positions are masked out); only the ``L``
target positions are returned. With ``cross_attention=True`` (encoder–decoder), :meth:`SEDDenoiser.encode`
runs a source encoder once and every layer cross-attends to its ``memory``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import _checks
from ..continuous import TokenEmbedding
from .attention import CrossAttention, RelativeSelfAttention
from ..errors import InputError, InputTypeError

__all__ = ["Block", "SEDConfig", "SEDDenoiser", "modulate", "timestep_embedding"]


@dataclass
class SEDConfig:
    """Hyper-parameters of :class:`SEDDenoiser` (JSON round trip with :meth:`to_dict` / :meth:`from_dict`).

    ``kind`` "discrete" (``x_t`` token ids) or "continuous" (``x_t`` vectors of ``embed_dim``); ``output``
    defaults to "logits" (discrete) / "embedding" (continuous). ``rel_freqs`` = F, the number of sinusoid
    frequencies of the Transformer-XL position vector ``R_Δ`` (2F entries; each head's q/k get 2F extra
    dims, so the default 32 adds 64). ``num_labels`` > 0 adds a label prefix with ``num_labels`` as the
    null label; ``cross_attention`` adds a source encoder of ``encoder_layers`` blocks; ``pad_id`` marks the
    ``cond_tokens`` positions masked out of attention; ``attention`` picks the kernel ("auto", "sdpa",
    "flash"). ``time_conditioning`` is "adaln" (default), "none" or "add" (see the module docstring);
    ``embed_scale`` multiplies the token embeddings (discrete inputs, condition tokens, the encoder's
    source) by ``sqrt(width)``. A saved config without these two keys (a checkpoint written before they
    existed: ``from_dict(d, saved=True)``) loads as ``time_conditioning="add", embed_scale=False``, the
    layout it was trained with.
    """

    vocab_size: int
    kind: str = "discrete"
    embed_dim: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.0
    output: str = ""
    self_condition: bool = False
    embedding_layernorm: bool = False
    num_labels: int = 0
    cross_attention: bool = False
    encoder_layers: int = 2
    tie_output: bool = True
    rel_freqs: int = 32
    pad_id: int = 0
    attention: str = "auto"
    time_conditioning: str = "adaln"
    embed_scale: bool = True

    #: what a config dict that lacks a field meant when it was written (the layout before the field existed)
    LEGACY = {"time_conditioning": "add", "embed_scale": False}

    def __post_init__(self) -> None:
        _checks.positive_int("vocab_size", self.vocab_size)
        _checks.choice("kind", self.kind, ("discrete", "continuous"))
        if not self.output:
            self.output = "logits" if self.kind == "discrete" else "embedding"
        _checks.choice("output", self.output, ("logits", "embedding"))
        if self.kind == "discrete" and self.output != "logits":
            raise InputError("output: a discrete SED model outputs logits")
        for name in ("embed_dim", "width", "layers", "heads", "ff_mult", "rel_freqs"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("num_labels", "encoder_layers", "pad_id"):
            _checks.positive_int(name, getattr(self, name), 0)
        if self.width % self.heads:
            raise InputError(f"width: {self.width} is not divisible by heads={self.heads}")
        _checks.real("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _checks.choice("attention", self.attention, ("auto", "sdpa", "flash"))
        _checks.choice("time_conditioning", self.time_conditioning, ("adaln", "none", "add"))
        if not isinstance(self.embed_scale, bool):
            raise InputTypeError(f"embed_scale: expected True or False, got {self.embed_scale!r}")
        if self.self_condition and self.kind != "continuous":
            raise InputError("self_condition: only continuous SED models take an x0 estimate as input")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, saved: bool = False) -> SEDConfig:
        """The config of ``d`` (field names as keys). ``saved=True``: ``d`` is a checkpoint's complete
        config, and a field it lacks takes the value that layout had before the field existed
        (:attr:`LEGACY`) instead of today's default."""
        fields = _checks.config_fields("config", cls, d)
        return cls(**({**cls.LEGACY, **fields} if saved else fields))


def _capturing() -> bool:
    """True while a CUDA graph is being captured (the sampler's ``cuda_graph=True``): value checks, which read
    tensors on the host, are skipped then; shapes and dtypes are still checked."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the diffusion step (Vaswani et al. 2017 / DDPM): ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    emb = torch.cat([ang.sin(), ang.cos()], -1)
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT): ``h * (1 + scale) + shift`` with per-sequence ``shift, scale: (B, W)`` over ``h: (B, S, W)``."""
    return h * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-LN block: relative self-attention, optional cross-attention, GELU feed-forward.

    ``adaln=True``: the step embedding ``c: (B, W)`` modulates the self-attention and feed-forward
    branches (DiT's adaLN-Zero: shift and scale after each norm, a gate on each residual branch, from one
    zero-initialised projection, so the block starts as the identity).
    """

    def __init__(self, width: int, heads: int, ff_mult: int, dropout: float, rel_freqs: int, cross: bool,
                 causal: bool = False, backend: str = "auto", adaln: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not adaln)
        self.attn = RelativeSelfAttention(width, heads, rel_freqs, causal=causal, backend=backend)
        self.cross = CrossAttention(width, heads, backend=backend) if cross else None
        self.norm_x = nn.LayerNorm(width) if cross else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not adaln)
        self.ff = nn.Sequential(nn.Linear(width, ff_mult * width), nn.GELU(), nn.Linear(ff_mult * width, width))
        self.drop = nn.Dropout(dropout)
        self.ada = None
        if adaln:
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.ada is not None:
            if c is None:
                raise InputError("c: this adaLN block needs the step embedding c=(B, width)")
            sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).to(h.dtype).chunk(6, -1)
            h = h + g1[:, None] * self.drop(self.attn(modulate(self.norm1(h), sh1, sc1), mask))
        else:
            h = h + self.drop(self.attn(self.norm1(h), mask))
        if self.cross is not None:
            if memory is None:
                raise InputError("memory: this encoder-decoder model needs memory= (from model.encode(src))")
            h = h + self.drop(self.cross(self.norm_x(h), memory, memory_mask))
        if self.ada is not None:
            return h + g2[:, None] * self.drop(self.ff(modulate(self.norm2(h), sh2, sc2)))
        return h + self.drop(self.ff(self.norm2(h)))


class SEDDenoiser(nn.Module):
    """SED denoiser; see the module docstring. ``SEDDenoiser(SEDConfig(...))`` or ``SEDDenoiser(**fields)``.

    ``forward(x_t, t, *, x_self_cond=None, label=None, cond_tokens=None, memory=None, memory_mask=None,
    attention_mask=None)`` -> ``(B, L, V)`` logits or ``(B, L, D)``; a :mod:`fastdiff.sampling` denoiser as is.
    """

    arch = "sed"
    uses_time = True
    accepts_attention_mask = True  # the sampler passes attention_mask= for variable lengths

    def __init__(self, config: SEDConfig | dict | None = None, **kw: Any):
        super().__init__()
        if config is None:
            config = SEDConfig(**kw)
        elif isinstance(config, dict):
            config = SEDConfig.from_dict({**config, **kw})
        elif kw:
            config = dataclasses.replace(config, **kw)
        if not isinstance(config, SEDConfig):
            raise InputTypeError(f"config: expected an SEDConfig or a dict, got {type(config).__name__}")
        self.config = c = config
        W, V = c.width, c.vocab_size
        # the sampler reads this: a model without a step input allows the MDLM cache (cache=True)
        self.uses_time = c.time_conditioning != "none"
        self.embed_scale = math.sqrt(W) if c.embed_scale else 1.0
        if c.kind == "discrete":
            self.token_embedding = nn.Embedding(V, W)
            nn.init.normal_(self.token_embedding.weight, std=W**-0.5)
            self.embedding = None
            self.input_proj = None
        else:
            self.embedding = TokenEmbedding(V, c.embed_dim, layernorm=c.embedding_layernorm)
            self.input_proj = nn.Linear(c.embed_dim * (2 if c.self_condition else 1), W)
            # condition tokens go through the diffusion embedding and the input projection (DiffuSeq's frozen
            # concatenation); an encoder-decoder model's source encoder has its own token embedding
            self.token_embedding = nn.Embedding(V, W) if c.cross_attention else None
        self.time_mlp = None
        if c.time_conditioning != "none":
            self.time_mlp = nn.Sequential(nn.Linear(W, 4 * W), nn.SiLU(), nn.Linear(4 * W, W))
        adaln = c.time_conditioning == "adaln"
        self.label_embedding = nn.Embedding(c.num_labels + 1, W) if c.num_labels else None
        self.cond_segment = nn.Parameter(torch.zeros(W))  # marks clean condition positions
        self.blocks = nn.ModuleList(Block(W, c.heads, c.ff_mult, c.dropout, c.rel_freqs, c.cross_attention,
                                          backend=c.attention, adaln=adaln) for _ in range(c.layers))
        if c.cross_attention:
            self.encoder = nn.ModuleList(Block(W, c.heads, c.ff_mult, c.dropout, c.rel_freqs, False,
                                               backend=c.attention) for _ in range(c.encoder_layers))
            self.encoder_norm = nn.LayerNorm(W)
        self.norm = nn.LayerNorm(W, elementwise_affine=not adaln)
        self.final_ada = None
        if adaln:  # DiT's final layer: shift and scale of the last norm, zero-initialised
            self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
            nn.init.zeros_(self.final_ada[1].weight)
            nn.init.zeros_(self.final_ada[1].bias)
        if c.output == "logits":
            self.output_proj = None if c.tie_output else nn.Linear(W, V, bias=False)
            self.output_bias = nn.Parameter(torch.zeros(V))
        else:
            self.output_proj = nn.Linear(W, c.embed_dim)

    # --- helpers --------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _body_dtype(self) -> torch.dtype:
        """The dtype the transformer blocks compute in (their parameters'): embeddings, the label prefix and
        the step embedding are cast to it, so a model whose embeddings were kept in another precision (a
        bf16 body with fp32 embeddings, or the reverse) runs instead of failing in the first matmul."""
        return self.blocks[0].ff[0].weight.dtype

    def forward_memory(self, batch_size: int, length: int) -> int:
        """Bytes one forward on ``(batch_size, length)`` inputs needs at its peak besides the parameters and
        the output: a lower-bound estimate for :mod:`fastdiff.sampling`'s memory check. The hidden states,
        the ``qkv`` and feed-forward activations of one block, and on the CPU the attention scores, which
        PyTorch's CPU attention materialises as ``(batch, heads, S, S)`` here (the query/key head dim,
        widened by the position features, differs from the value head dim); on CUDA the fused kernels do
        not, and only the linear terms are counted."""
        c = self.config
        item = torch.finfo(self._body_dtype()).bits // 8
        S = int(length) + (1 if self.label_embedding is not None else 0)
        B, W = int(batch_size), c.width
        linear = B * S * W * (c.ff_mult + 6) * item
        quadratic = 0
        if self.blocks[0].ff[0].weight.device.type == "cpu":
            quadratic = 2 * B * c.heads * S * S * item
        return linear + quadratic

    def embedding_table(self) -> torch.Tensor:
        """``(V, D)``: the embeddings continuous diffusion runs among (LayerNorm applied) — what to round
        and clamp against."""
        if self.embedding is None:
            raise InputTypeError("embedding_table: a discrete SED model has no diffusion embedding table")
        return self.embedding.table()

    def _tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        _checks.tensor(name, x)
        if x.dtype != torch.long or x.ndim != 2:
            raise InputTypeError(f"{name}: expected (B, L) int64 token ids, got {tuple(x.shape)} {x.dtype}")
        if not _capturing():
            _checks.token_ids(name, x, self.config.vocab_size)
        return x

    def encode(self, src_tokens: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the source encoder once: ``(B, Ls)`` ids -> ``memory (B, Ls, width)``."""
        if not self.config.cross_attention:
            raise InputTypeError("encode: this model has no encoder (cross_attention=False); use cond_tokens=")
        src = self._tokens("src_tokens", src_tokens)
        mask = self._mask("src_mask", src_mask, src.shape)
        h = (self.token_embedding(src) * self.embed_scale).to(self.encoder_norm.weight.dtype)
        for blk in self.encoder:
            h = blk(h, mask)
        return self.encoder_norm(h)

    def _embed_condition(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.kind == "discrete":
            return (self.token_embedding(tokens) * self.embed_scale).to(self._body_dtype())
        e = torch.nn.functional.embedding(tokens, self.embedding.table()) if _capturing() else self.embedding(tokens)
        if self.config.self_condition:
            e = torch.cat([e, torch.zeros_like(e)], -1)
        return self.input_proj(e.to(self.input_proj.weight.dtype)).to(self._body_dtype())

    @staticmethod
    def _mask(name: str, mask: torch.Tensor | None, shape) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
            raise InputError(f"{name}: expected a {tuple(shape)} bool tensor (True = real token)")
        return mask.to(torch.bool)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, x_self_cond: torch.Tensor | None = None,
                label: torch.Tensor | None = None, cond_tokens: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if c.kind == "discrete":
            x_t = self._tokens("x_t", x_t)
            B, L = x_t.shape
            h = (self.token_embedding(x_t) * self.embed_scale).to(self._body_dtype())
        else:
            _checks.tensor("x_t", x_t)
            if x_t.ndim != 3 or x_t.shape[-1] != c.embed_dim or not x_t.is_floating_point():
                raise InputError(f"x_t: expected (B, L, {c.embed_dim}) float vectors, got {tuple(x_t.shape)} {x_t.dtype}")
            B, L = x_t.shape[:2]
            if c.self_condition:
                if x_self_cond is None:
                    x_self_cond = torch.zeros_like(x_t)
                elif x_self_cond.shape != x_t.shape:
                    raise InputError(f"x_self_cond: expected shape {tuple(x_t.shape)}, got {tuple(x_self_cond.shape)}")
                inp = torch.cat([x_t, x_self_cond.to(x_t.dtype)], -1)
            elif x_self_cond is not None:
                raise InputError("x_self_cond: this model was built without self_condition")
            else:
                inp = x_t
            h = self.input_proj(inp.to(self.input_proj.weight.dtype)).to(self._body_dtype())
        t = torch.as_tensor(t, device=h.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,) or t.is_floating_point():
            raise InputError(f"t: expected ({B},) integer steps, got {tuple(t.shape)} {t.dtype}")
        temb = None
        if self.time_mlp is not None:
            temb = self.time_mlp(timestep_embedding(t, c.width).to(self.time_mlp[0].weight.dtype)).to(h.dtype)
        prefix: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        if self.label_embedding is not None:
            if label is None:
                label = torch.full((B,), c.num_labels, dtype=torch.long, device=h.device)
            label = torch.as_tensor(label, device=h.device)
            if label.shape != (B,) or label.is_floating_point() or (
                    not _capturing() and (int(label.min()) < 0 or int(label.max()) > c.num_labels)):
                raise InputError(f"label: expected ({B},) ints in [0, {c.num_labels}] ({c.num_labels} = no label)")
            prefix.append(self.label_embedding(label)[:, None].to(h.dtype))
            masks.append(None)
        elif label is not None:
            raise InputError("label: this model was built with num_labels=0")
        if cond_tokens is not None:
            cond_tokens = self._tokens("cond_tokens", cond_tokens)
            if cond_tokens.shape[0] != B:
                raise InputError(f"cond_tokens: expected {B} rows, got {cond_tokens.shape[0]}")
            prefix.append(self._embed_condition(cond_tokens) + self.cond_segment.to(h.dtype))
            masks.append(cond_tokens != c.pad_id)
        if c.cross_attention and memory is None:
            raise InputError("memory: this encoder-decoder model needs memory=model.encode(src)")
        if memory is not None and not c.cross_attention:
            raise InputError("memory: this model has no cross-attention (cross_attention=False)")
        if attention_mask is not None:
            attention_mask = self._mask("attention_mask", attention_mask, (B, L))
        seq = torch.cat([*prefix, h], 1)
        if c.time_conditioning == "add":
            seq = seq + temb[:, None]
        ada = temb if c.time_conditioning == "adaln" else None
        P = seq.shape[1] - L
        mask = None
        if attention_mask is not None or any(m is not None for m in masks):
            parts = [torch.ones(B, p.shape[1], dtype=torch.bool, device=h.device) if m is None else m
                     for p, m in zip(prefix, masks)]
            parts.append(attention_mask if attention_mask is not None
                         else torch.ones(B, L, dtype=torch.bool, device=h.device))
            mask = torch.cat(parts, 1)
        mm = self._mask("memory_mask", memory_mask, memory.shape[:2]) if memory is not None else None
        for blk in self.blocks:
            seq = blk(seq, mask, memory, mm, ada)
        out = self.norm(seq[:, P:])
        if self.final_ada is not None:
            out = modulate(out, *self.final_ada(ada).to(out.dtype).chunk(2, -1))
        if c.output == "logits":  # in the projection's dtype (the tied embedding's, when tied)
            w = self.token_embedding.weight if self.output_proj is None else self.output_proj.weight
            return out.to(w.dtype) @ w.t() + self.output_bias.to(w.dtype)
        return self.output_proj(out.to(self.output_proj.weight.dtype))
