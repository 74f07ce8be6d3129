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

Per-position steps (AR-Diffusion, Wu et al. 2023): the ordinary forward also takes ``t: (B, L)``, one step
per target position; each position is then modulated (adaLN) or shifted (``"add"``) by its own step's
embedding, and the condition prefix (label, condition tokens) by the first position's, so a constant
``(B, L)`` t is the ``(B,)`` forward. The KV-cache calls take ``(B,)`` steps only.

KV caches: Fast-dLLM's prefix / dual cache (Wu et al. 2025, "Fast-dLLM") through :meth:`SEDDenoiser.kv_forward`
and :meth:`SEDDenoiser.kv_window`, and a block-causal variant (``block_size`` > 0; Arriola et al. 2025,
"Block Diffusion", BD3-LM) with an exact block KV cache and BD3-LM's vectorised training forward. The
relative positions make both cheap: a window's queries are scored at their absolute positions against
the cached keys at theirs.
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

__all__ = ["Block", "SEDConfig", "SEDDenoiser", "SEDKVCache", "modulate", "timestep_embedding"]


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

    ``block_size`` > 0 makes the model block-causal (BD3-LM, Arriola et al. 2025, "Block Diffusion"):
    token ``i`` attends to token ``j`` iff ``j // block_size <= i // block_size`` (the label prefix is seen
    by all and sees only itself), which gives the exact KV cache of :meth:`SEDDenoiser.new_cache`. It needs
    a discrete model with ``time_conditioning="none"`` (the cached clean blocks carry no step; MDLM §3.5)
    and no cross-attention. 0 (default): bidirectional.
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
    block_size: int = 0

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
        _checks.positive_int("block_size", self.block_size, 0)
        if self.block_size:
            if self.kind != "discrete":
                raise InputError("block_size: a block-causal (BD3-LM) SED model must be discrete")
            if self.time_conditioning != "none":
                raise InputError("block_size: a block-causal model needs time_conditioning='none' (its cached "
                                 f"clean blocks carry no step), got {self.time_conditioning!r}")
            if self.cross_attention:
                raise InputError("block_size: a block-causal model cannot have cross_attention=True")

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
    """Sinusoidal embedding of the diffusion step (Vaswani et al. 2017 / DDPM): ``(...) -> (..., dim)``
    (``(B,)`` per sequence, or ``(B, L)`` per position)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[..., None] * freqs
    emb = torch.cat([ang.sin(), ang.cos()], -1)
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))


def _per_seq(v: torch.Tensor) -> torch.Tensor:
    """A modulation ``(B, W)`` (per sequence) as ``(B, 1, W)``; one ``(B, S, W)`` (per position) as it is."""
    return v[:, None] if v.ndim == 2 else v


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT): ``h * (1 + scale) + shift`` over ``h: (B, S, W)``, with per-sequence ``shift, scale: (B, W)``
    or per-position ones ``(B, S, W)`` (AR-Diffusion's token-level steps)."""
    return h * (1 + _per_seq(scale)) + _per_seq(shift)


class Block(nn.Module):
    """Pre-LN block: relative self-attention, optional cross-attention, GELU feed-forward.

    ``adaln=True``: the step embedding ``c: (B, W)`` modulates the self-attention and feed-forward
    branches (DiT's adaLN-Zero: shift and scale after each norm, a gate on each residual branch, from one
    zero-initialised projection, so the block starts as the identity). ``c: (B, S, W)``, one per position
    of ``h: (B, S, W)``, modulates each position with its own step (AR-Diffusion).
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
                memory_mask: torch.Tensor | None = None, c: torch.Tensor | None = None, *,
                attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                context: tuple[torch.Tensor, torch.Tensor, int] | None = None, return_kv: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``h: (B, S, W)``; ``mask: (B, Sk)`` key padding. ``attn_mask``, ``positions``, ``context`` and
        ``return_kv`` go to the self-attention (:meth:`RelativeSelfAttention.forward`): a block-causal
        pattern, explicit positions, cached keys/values around ``h``, and ``h``'s own keys/values back."""
        kw = dict(attn_mask=attn_mask, positions=positions, context=context, return_kv=return_kv)
        if self.ada is not None:
            if c is None:
                raise InputError("c: this adaLN block needs the step embedding c=(B, width) or (B, S, width)")
            sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).to(h.dtype).chunk(6, -1)
            a = self.attn(modulate(self.norm1(h), sh1, sc1), mask, **kw)
        else:
            a = self.attn(self.norm1(h), mask, **kw)
        a, kv = a if return_kv else (a, None)
        h = h + (_per_seq(g1) * self.drop(a) if self.ada is not None else self.drop(a))
        if self.cross is not None:
            if memory is None:
                raise InputError("memory: this encoder-decoder model needs memory= (from model.encode(src))")
            h = h + self.drop(self.cross(self.norm_x(h), memory, memory_mask))
        if self.ada is not None:
            h = h + _per_seq(g2) * self.drop(self.ff(modulate(self.norm2(h), sh2, sc2)))
        else:
            h = h + self.drop(self.ff(self.norm2(h)))
        return (h, kv) if return_kv else h


@dataclass
class SEDKVCache:
    """Keys and values of every layer of an :class:`SEDDenoiser`, for its KV caches.

    keys, values : per layer ``(B, heads, S, head_dim)`` (keys without their position features) over the
        ``S = prefix + length`` positions: the condition prefix (label, condition tokens), then the tokens.
    prefix : the number of prefix positions; length : the number of token positions.
    prefix_mask : ``(B, prefix)`` bool (True = a real key) when the prefix holds condition tokens with
        padding, else None.
    label, cond_tokens : the condition the prefix was built from (checked against a later call's).
    batch_size : the rows.

    :meth:`SEDDenoiser.kv_forward` builds one over a whole sequence (Fast-dLLM's prefix / dual cache);
    :meth:`SEDDenoiser.new_cache` an empty one that :meth:`SEDDenoiser.extend_cache` grows block by block
    (BD3-LM). Neither :meth:`SEDDenoiser.kv_window` nor :meth:`SEDDenoiser.extend_cache` modifies a cache;
    the one exception is an empty block cache, whose prefix the first block call fills in (see
    :meth:`SEDDenoiser.new_cache`).
    """

    keys: tuple[torch.Tensor, ...] | None
    values: tuple[torch.Tensor, ...] | None
    prefix: int
    length: int
    batch_size: int
    prefix_mask: torch.Tensor | None = None
    label: torch.Tensor | None = None
    cond_tokens: torch.Tensor | None = None


class SEDDenoiser(nn.Module):
    """SED denoiser; see the module docstring. ``SEDDenoiser(SEDConfig(...))`` or ``SEDDenoiser(**fields)``.

    ``forward(x_t, t, *, x_self_cond=None, label=None, cond_tokens=None, memory=None, memory_mask=None,
    attention_mask=None)`` -> ``(B, L, V)`` logits or ``(B, L, D)``; a :mod:`fastdiff.sampling` denoiser as is.

    KV caches (discrete models): :meth:`kv_forward` / :meth:`kv_window`, Fast-dLLM's prefix and dual cache
    (Wu et al. 2025; approximate for a bidirectional model: the cached keys go stale); with
    ``block_size`` > 0 (BD3-LM) the exact block cache :meth:`new_cache` / ``forward(x_block, t, cache=,
    start=)`` / :meth:`extend_cache` (``sample(..., kv_cache=True)``) and the two-stream training forward
    ``forward(x_t, t, clean=x_0)``.
    """

    arch = "sed"
    uses_time = True
    accepts_attention_mask = True  # the sampler passes attention_mask= for variable lengths
    fresh_output = True  # each forward returns a new tensor, kept nowhere: the sampler may write into it

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

    # --- forward pieces ---------------------------------------------------------------------------
    def _embed_tokens(self, x_t: torch.Tensor, x_self_cond: torch.Tensor | None) -> torch.Tensor:
        """``(B, L, W)``: the input embeddings of ``x_t`` (ids, or vectors for continuous models)."""
        c = self.config
        if c.kind == "discrete":
            x_t = self._tokens("x_t", x_t)
            return (self.token_embedding(x_t) * self.embed_scale).to(self._body_dtype())
        _checks.tensor("x_t", x_t)
        if x_t.ndim != 3 or x_t.shape[-1] != c.embed_dim or not x_t.is_floating_point():
            raise InputError(f"x_t: expected (B, L, {c.embed_dim}) float vectors, got {tuple(x_t.shape)} {x_t.dtype}")
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
        return self.input_proj(inp.to(self.input_proj.weight.dtype)).to(self._body_dtype())

    def _step_embedding(self, t: torch.Tensor, B: int, h: torch.Tensor, L: int | None = None) -> torch.Tensor | None:
        """The step embedding ``(B, W)`` (None for ``time_conditioning="none"``), ``t`` checked. With ``L``
        (the ordinary forward) ``t`` may also be ``(B, L)``, one step per position (AR-Diffusion), and the
        embedding is then ``(B, L, W)``."""
        t = torch.as_tensor(t, device=h.device)
        if t.ndim == 0:
            t = t.expand(B)
        if (t.shape != (B,) and (L is None or t.shape != (B, L))) or t.is_floating_point():
            want = f"({B},)" if L is None else f"({B},) or ({B}, {L})"
            raise InputError(f"t: expected {want} integer steps, got {tuple(t.shape)} {t.dtype}")
        if self.time_mlp is None:
            return None
        return self.time_mlp(timestep_embedding(t, self.config.width).to(self.time_mlp[0].weight.dtype)).to(h.dtype)

    def _label(self, label: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor | None:
        """``label`` checked (the null label when None), or None for a model without labels."""
        c = self.config
        if self.label_embedding is None:
            if label is not None:
                raise InputError("label: this model was built with num_labels=0")
            return None
        if label is None:
            return torch.full((B,), c.num_labels, dtype=torch.long, device=device)
        label = torch.as_tensor(label, device=device)
        if label.shape != (B,) or label.is_floating_point() or (
                not _capturing() and (int(label.min()) < 0 or int(label.max()) > c.num_labels)):
            raise InputError(f"label: expected ({B},) ints in [0, {c.num_labels}] ({c.num_labels} = no label)")
        return label

    def _prefix(self, label: torch.Tensor | None, cond_tokens: torch.Tensor | None, B: int, h: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(prefix (B, P, W) or None, prefix key mask (B, P) or None, label, cond_tokens)``: the label
        vector and the embedded condition tokens that precede the target positions."""
        c = self.config
        label = self._label(label, B, h.device)
        parts: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        if label is not None:
            parts.append(self.label_embedding(label)[:, None].to(h.dtype))
            masks.append(None)
        if cond_tokens is not None:
            cond_tokens = self._tokens("cond_tokens", cond_tokens)
            if cond_tokens.shape[0] != B:
                raise InputError(f"cond_tokens: expected {B} rows, got {cond_tokens.shape[0]}")
            parts.append(self._embed_condition(cond_tokens) + self.cond_segment.to(h.dtype))
            masks.append(cond_tokens != c.pad_id)
        if not parts:
            return None, None, label, cond_tokens
        pmask = None
        if any(m is not None for m in masks):
            pmask = torch.cat([torch.ones(B, p.shape[1], dtype=torch.bool, device=h.device) if m is None else m
                               for p, m in zip(parts, masks)], 1)
        return torch.cat(parts, 1), pmask, label, cond_tokens

    def _memory(self, memory: torch.Tensor | None, memory_mask: torch.Tensor | None) -> torch.Tensor | None:
        c = self.config
        if c.cross_attention and memory is None:
            raise InputError("memory: this encoder-decoder model needs memory=model.encode(src)")
        if memory is not None and not c.cross_attention:
            raise InputError("memory: this model has no cross-attention (cross_attention=False)")
        return self._mask("memory_mask", memory_mask, memory.shape[:2]) if memory is not None else None

    @staticmethod
    def _key_mask(B: int, P: int, pmask: torch.Tensor | None, attention_mask: torch.Tensor | None, L: int,
                  device: torch.device) -> torch.Tensor | None:
        """The ``(B, P + L)`` key padding mask of prefix and tokens, None when nothing is masked."""
        if pmask is None and attention_mask is None:
            return None
        return torch.cat([torch.ones(B, P, dtype=torch.bool, device=device) if pmask is None else pmask,
                          torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None
                          else attention_mask], 1)

    def _groups(self, P: int, positions: torch.Tensor) -> torch.Tensor:
        """The block of each sequence entry: -1 for the ``P`` prefix entries, ``i // block_size`` for the
        token at position ``i`` (``positions``)."""
        pre = torch.full((P,), -1, dtype=torch.long, device=positions.device)
        return torch.cat([pre, torch.div(positions, self.config.block_size, rounding_mode="floor")])

    def _head(self, out: torch.Tensor, ada: torch.Tensor | None) -> torch.Tensor:
        """The final norm (adaLN-modulated) and the output projection of the target positions."""
        out = self.norm(out)
        if self.final_ada is not None:
            out = modulate(out, *self.final_ada(ada).to(out.dtype).chunk(2, -1))
        if self.config.output == "logits":  # in the projection's dtype (the tied embedding's, when tied)
            w = self.token_embedding.weight if self.output_proj is None else self.output_proj.weight
            return out.to(w.dtype) @ w.t() + self.output_bias.to(w.dtype)
        return self.output_proj(out.to(self.output_proj.weight.dtype))

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, x_self_cond: torch.Tensor | None = None,
                label: torch.Tensor | None = None, cond_tokens: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, clean: torch.Tensor | None = None,
                cache: SEDKVCache | None = None, start: int | None = None) -> torch.Tensor:
        """The model's output on ``x_t`` (see the class docstring). Block-causal models (``block_size`` > 0)
        also take ``clean=x_0`` (BD3-LM's vectorised training forward, :meth:`_bd3_forward`) or
        ``cache=, start=`` (one block given the cached earlier ones: the KV protocol of
        :class:`fastdiff.sampling.BlockCausalDenoiser`, :meth:`new_cache`)."""
        if cache is not None or start is not None:
            if clean is not None or x_self_cond is not None or cond_tokens is not None or memory is not None:
                raise InputError("cache: the block KV cache takes only x_t, t and label")
            if attention_mask is not None:
                raise InputError("attention_mask: the block KV cache does not take a padding mask")
            return self._block_call(x_t, t, cache, start, label)
        if clean is not None:
            return self._bd3_forward(x_t, t, clean, label=label, attention_mask=attention_mask,
                                     cond_tokens=cond_tokens)
        out, _ = self._full(x_t, t, x_self_cond=x_self_cond, label=label, cond_tokens=cond_tokens, memory=memory,
                            memory_mask=memory_mask, attention_mask=attention_mask)
        return out

    def _full(self, x_t: torch.Tensor, t: torch.Tensor, *, x_self_cond: torch.Tensor | None = None,
              label: torch.Tensor | None = None, cond_tokens: torch.Tensor | None = None,
              memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, keep: bool = False) -> tuple[torch.Tensor, SEDKVCache | None]:
        """The ordinary forward; ``keep=True`` also returns every layer's keys and values."""
        c = self.config
        h = self._embed_tokens(x_t, x_self_cond)
        B, L = h.shape[:2]
        temb = self._step_embedding(t, B, h, L)
        prefix, pmask, label, cond_tokens = self._prefix(label, cond_tokens, B, h)
        mm = self._memory(memory, memory_mask)
        if attention_mask is not None:
            attention_mask = self._mask("attention_mask", attention_mask, (B, L))
        seq = h if prefix is None else torch.cat([prefix, h], 1)
        P = seq.shape[1] - L
        if temb is not None and temb.ndim == 3 and P:
            # per-position steps: the prefix positions (label, condition tokens) take the sequence's first
            # step, so a constant (B, L) t gives the (B,) forward, and the prefix's modulation moves with
            # the left end of the sentence, the part AR-Diffusion denoises first
            temb = torch.cat([temb[:, :1].expand(B, P, temb.shape[2]), temb], 1)
        if c.time_conditioning == "add":
            seq = seq + _per_seq(temb)
        ada = temb if c.time_conditioning == "adaln" else None
        mask = self._key_mask(B, P, pmask, attention_mask, L, h.device)
        attn_mask = None
        if c.block_size:
            g = self._groups(P, torch.arange(L, device=h.device))
            attn_mask = (g[None, :] <= g[:, None])[None]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for blk in self.blocks:
            if keep:
                seq, (k, v) = blk(seq, mask, memory, mm, ada, attn_mask=attn_mask, return_kv=True)
                keys.append(k), values.append(v)
            else:
                seq = blk(seq, mask, memory, mm, ada, attn_mask=attn_mask)
        out = self._head(seq[:, P:], ada if ada is None or ada.ndim == 2 else ada[:, P:])
        if not keep:
            return out, None
        return out, SEDKVCache(tuple(keys), tuple(values), P, L, B, pmask, label, cond_tokens)

    # --- BD3-LM: block-causal training forward ----------------------------------------------------
    def _bd3_forward(self, x_t: torch.Tensor, t: torch.Tensor, clean: torch.Tensor, *,
                     label: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     cond_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """BD3-LM's vectorised training forward (Arriola et al. 2025, §3.2): the noisy ``x_t`` and the clean
        ``clean`` (both ``(B, L)``, the tokens at the same positions ``0..L-1``) in one sequence
        ``[prefix, x_t, clean]``; noisy block ``b`` attends to itself and to the clean blocks before
        ``b``, a clean block to the clean blocks up to itself, everything to the prefix. Returns the
        logits of the noisy half ``(B, L, V)``: for every block those of the block-causal model on
        ``[clean blocks < b, noisy block b]``, so the blocks' losses are one forward."""
        c = self.config
        if not c.block_size:
            raise InputError("clean: the two-stream (BD3-LM) forward needs a block-causal model (block_size > 0)")
        if cond_tokens is not None:
            raise InputError("cond_tokens: a block-causal model takes only a label as its condition")
        h = self._embed_tokens(x_t, None)
        B, L = h.shape[:2]
        clean = self._tokens("clean", clean)
        if clean.shape != (B, L):
            raise InputError(f"clean: expected shape {(B, L)} like x_t, got {tuple(clean.shape)}")
        self._step_embedding(t, B, h)  # checked; a block-causal model has no step input
        h0 = self._embed_tokens(clean, None)
        prefix, _, _, _ = self._prefix(label, None, B, h)
        if attention_mask is not None:
            attention_mask = self._mask("attention_mask", attention_mask, (B, L))
        seq = torch.cat([h, h0], 1) if prefix is None else torch.cat([prefix, h, h0], 1)
        P = seq.shape[1] - 2 * L
        pos = torch.arange(L, device=h.device)
        positions = torch.cat([torch.arange(P, device=h.device), P + pos, P + pos])
        g = self._groups(P, torch.cat([pos, pos]))  # the block of each entry, -1 for the prefix
        kind = torch.cat([torch.zeros(P, dtype=torch.long), torch.ones(L, dtype=torch.long),
                          torch.full((L,), 2, dtype=torch.long)]).to(h.device)  # 0 prefix, 1 noisy, 2 clean
        qg, kg, qk, kk = g[:, None], g[None, :], kind[:, None], kind[None, :]
        allowed = (kk == 0) | ((qk == 1) & (kk == 1) & (kg == qg)) | ((qk == 1) & (kk == 2) & (kg < qg)) \
            | ((qk == 2) & (kk == 2) & (kg <= qg))
        mask = None
        if attention_mask is not None:
            mask = torch.cat([torch.ones(B, P, dtype=torch.bool, device=h.device), attention_mask, attention_mask], 1)
        for blk in self.blocks:
            seq = blk(seq, mask, attn_mask=allowed[None], positions=positions)
        return self._head(seq[:, P:P + L], None)

    # --- Fast-dLLM prefix / dual cache (approximate for bidirectional models) -----------------------
    def kv_forward(self, x: torch.Tensor, t: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, **cond: Any) -> tuple[torch.Tensor, SEDKVCache]:
        """One full forward over ``x: (B, L)`` token ids: ``(logits (B, L, V), cache)``, the cache holding
        every layer's keys and values at every position (condition prefix included) — Fast-dLLM's
        prefix / dual cache (Wu et al. 2025), see :meth:`kv_window`.

        ``t: (B,)`` int64 (ignored by a ``time_conditioning="none"`` model); ``attention_mask: (B, L)`` bool,
        True = a real token; ``position_ids`` is accepted and ignored (the model's positions are
        Transformer-XL relative ones: a token's position is its column); ``cond``: ``label=``,
        ``cond_tokens=``, ``memory=`` / ``memory_mask=`` as for :meth:`forward`. Discrete models only."""
        if self.config.kind != "discrete":
            raise InputTypeError("kv_forward: the KV cache is for discrete SED models (token ids)")
        if "x_self_cond" in cond or "clean" in cond or "cache" in cond:
            raise InputError(f"cond: kv_forward takes label, cond_tokens, memory, memory_mask; got {sorted(cond)}")
        return self._full(x, t, attention_mask=attention_mask, keep=True, **cond)

    def kv_window(self, x_win: torch.Tensor, t: torch.Tensor, *, cache: SEDKVCache, start: int,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  label: torch.Tensor | None = None, cond_tokens: torch.Tensor | None = None,
                  memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, n, V)`` of the tokens ``x_win: (B, n)`` placed at positions ``[start, start + n)``
        of the sequence ``cache`` was built from (:meth:`kv_forward`). In every layer the queries are the
        window's, at their absolute positions; the keys/values are the cache's outside the window
        (prefix included) and the window's own, computed now, inside it. The cache is not modified.

        With the window's tokens unchanged this equals ``kv_forward(x)[0][:, start:start + n]`` (up to
        float rounding); with changed tokens it is Fast-dLLM's approximation (the rest of the sequence
        keeps its stale keys/values). ``attention_mask: (B, L)`` over the whole length; ``position_ids``
        accepted and ignored (relative positions); ``t`` as for :meth:`kv_forward` (an adaLN model
        modulates the window with it); ``label`` / ``cond_tokens``, when given, must be those the cache
        was built with (its prefix holds them); ``memory`` must be given again to a cross-attention model.
        A block-causal model applies its block pattern to the window's queries."""
        c = self.config
        if not isinstance(cache, SEDKVCache) or cache.keys is None:
            raise InputTypeError(f"cache: expected the cache kv_forward returned, got {type(cache).__name__}")
        if len(cache.keys) != len(self.blocks):
            raise InputError(f"cache: holds {len(cache.keys)} layers, the model has {len(self.blocks)}")
        h = self._embed_tokens(x_win, None)
        B, n = h.shape[:2]
        L, P = cache.length, cache.prefix
        if B != cache.batch_size:
            raise InputError(f"x_win: {B} rows, the cache holds {cache.batch_size}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + n > L:
            raise InputError(f"start: expected an int with 0 <= start and start + {n} <= {L} (the cache's length), "
                             f"got {start!r}")
        temb = self._step_embedding(t, B, h)
        lab = self._label(label, B, h.device) if label is not None else None
        if not _capturing():
            if lab is not None and not torch.equal(lab, cache.label):
                raise InputError("label: differs from the label the cache was built with")
            if cond_tokens is not None and (cache.cond_tokens is None or cond_tokens.shape != cache.cond_tokens.shape
                                            or not torch.equal(cond_tokens.to(cache.cond_tokens.device),
                                                               cache.cond_tokens)):
                raise InputError("cond_tokens: differ from the condition tokens the cache was built with")
        mm = self._memory(memory, memory_mask)
        if attention_mask is not None:
            attention_mask = self._mask("attention_mask", attention_mask, (B, L))
        if c.time_conditioning == "add":
            h = h + temb[:, None]
        ada = temb if c.time_conditioning == "adaln" else None
        mask = self._key_mask(B, P, cache.prefix_mask, attention_mask, L, h.device)
        attn_mask = None
        if c.block_size:
            kg = self._groups(P, torch.arange(L, device=h.device))
            qg = kg[P + start:P + start + n]
            attn_mask = (kg[None, :] <= qg[:, None])[None]
        for blk, k, v in zip(self.blocks, cache.keys, cache.values):
            h = blk(h, mask, memory, mm, ada, attn_mask=attn_mask, context=(k, v, P + start))
        return self._head(h, ada)

    # --- BD3-LM: exact block KV cache -------------------------------------------------------------
    @property
    def block_size(self) -> int:
        """The block of a block-causal model (0: bidirectional)."""
        return self.config.block_size

    def new_cache(self, batch_size: int) -> SEDKVCache:
        """An empty KV cache of a block-causal model (``block_size`` > 0) for ``batch_size`` rows: the
        exact KV protocol of :class:`fastdiff.sampling.BlockCausalDenoiser` (``sample(..., kv_cache=True)``).

        ``model(x_block, t, cache=cache, start=a, label=...)`` gives the logits of the block at
        ``[a, a + n)`` (``a`` a multiple of ``block_size``, ``n <= block_size``) given the cached blocks
        before it; :meth:`extend_cache` appends a finished block. The label prefix is filled in by the first
        block call on the empty cache (``extend_cache`` receives no condition; a cache extended before any
        call holds the null label), and a later call with another label is refused."""
        if not self.config.block_size:
            raise InputTypeError("new_cache: the block KV cache needs a block-causal model (block_size > 0); "
                                 "use kv_forward / kv_window for a bidirectional one")
        B = _checks.positive_int("batch_size", batch_size)
        return SEDKVCache(None, None, 0, 0, B)

    def _check_block(self, x_block: torch.Tensor, cache: SEDKVCache, start: int) -> torch.Tensor:
        bs = self.config.block_size
        if not bs:
            raise InputTypeError("cache: the block KV cache needs a block-causal model (block_size > 0)")
        if not isinstance(cache, SEDKVCache):
            raise InputTypeError(f"cache: expected the cache new_cache() returned, got {type(cache).__name__}")
        x_block = self._tokens("x_block", x_block)
        B, n = x_block.shape
        if B != cache.batch_size:
            raise InputError(f"x_block: {B} rows, the cache holds {cache.batch_size}")
        if isinstance(start, bool) or not isinstance(start, int) or start != cache.length or start % bs:
            raise InputError(f"start: expected the cache's length {cache.length} (a multiple of block_size={bs}), "
                             f"got {start!r}")
        if not 0 < n <= bs:
            raise InputError(f"x_block: expected 1 to {bs} (block_size) tokens, got {n}")
        return x_block

    def _fill_prefix(self, cache: SEDKVCache, label: torch.Tensor | None, device: torch.device) -> None:
        """Give an empty block cache its prefix: the label's keys and values (the prefix attends to
        itself only, so they depend on the label alone)."""
        if cache.keys is not None:
            return
        B = cache.batch_size
        h = torch.zeros(B, 0, self.config.width, device=device, dtype=self._body_dtype())
        prefix, _, lab, _ = self._prefix(label, None, B, h)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        if prefix is None:  # no label: empty keys and values
            c = self.config
            empty = h.new_zeros(B, c.heads, 0, c.width // c.heads)
            keys, values = [empty] * len(self.blocks), [empty] * len(self.blocks)
        else:
            seq = prefix
            for blk in self.blocks:
                seq, (k, v) = blk(seq, return_kv=True)
                keys.append(k), values.append(v)
        P = 0 if prefix is None else prefix.shape[1]
        cache.keys, cache.values, cache.prefix, cache.label = tuple(keys), tuple(values), P, lab

    def _run_block(self, x_block: torch.Tensor, cache: SEDKVCache, keep: bool
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The block through every layer, its queries attending to the cache and to itself."""
        h = self._embed_tokens(x_block, None)
        at = cache.prefix + cache.length
        kvs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for blk, k, v in zip(self.blocks, cache.keys, cache.values):
            if keep:
                h, kv = blk(h, context=(k, v, at), return_kv=True)
                kvs.append(kv)
            else:
                h = blk(h, context=(k, v, at))
        return h, kvs

    def _block_call(self, x_block: torch.Tensor, t: torch.Tensor, cache: SEDKVCache | None, start: int | None,
                    label: torch.Tensor | None) -> torch.Tensor:
        if cache is None or start is None:
            raise InputError("cache: the block KV call needs both cache= and start=")
        x_block = self._check_block(x_block, cache, start)
        B = x_block.shape[0]
        self._step_embedding(t, B, self.token_embedding.weight)  # checked; no step input
        if cache.keys is None:
            self._fill_prefix(cache, label, x_block.device)
        elif label is not None and not _capturing():
            if cache.label is None or not torch.equal(self._label(label, B, x_block.device), cache.label):
                raise InputError("label: differs from the label this cache's prefix was built with")
        h, _ = self._run_block(x_block, cache, keep=False)
        return self._head(h, None)

    def extend_cache(self, cache: SEDKVCache, x_block: torch.Tensor, start: int) -> SEDKVCache:
        """A new cache: ``cache`` with the finished (clean) block ``x_block: (B, n)`` at ``[start, start + n)``
        appended (``start`` = the cache's length). ``cache`` itself is left as it is (an empty one gets the
        null label's prefix in the new cache only)."""
        x_block = self._check_block(x_block, cache, start)
        if cache.keys is None:
            cache = dataclasses.replace(cache)
            self._fill_prefix(cache, None, x_block.device)
        _, kvs = self._run_block(x_block, cache, keep=True)
        keys = tuple(torch.cat([k, nk.to(k.dtype)], 2) for k, (nk, _) in zip(cache.keys, kvs))
        values = tuple(torch.cat([v, nv.to(v.dtype)], 2) for v, (_, nv) in zip(cache.values, kvs))
        return dataclasses.replace(cache, keys=keys, values=values, length=cache.length + x_block.shape[1])
