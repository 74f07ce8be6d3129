"""A small U-Net for glyph images, conditioned on a timestep, an optional label and an optional source text.

The network follows the DDPM U-Net (Ho et al. 2020) in miniature: residual blocks of GroupNorm, SiLU and
3x3 convolutions, the timestep's sinusoidal embedding added inside every block, skip connections from the
down path to the up path, and self-attention at the bottom. Glyph images have a known geometry
(:mod:`fastdiff.glyph.render`: fixed-width ``8 x 6`` cells), so the U-Net has two resolutions: the pixels,
and the character grid reached by one convolution whose kernel and stride are the cell (and left again by
the matching transposed convolution). At the grid every position is one character, and the residual blocks
and attention there model the text; the pixel level draws the strokes.

Conditioning:

* ``labels`` (attribute-to-text): a learned embedding added to the timestep embedding; index
  ``num_labels`` is the "no label" embedding, used for classifier-free guidance (Ho & Salimans 2022).
* ``source`` (text-to-text, as GlyphDiffusion, Li et al. 2023, conditions on the source text): the source's
  glyph indices (:meth:`fastdiff.glyph.render.Layout.cell_ids`, flattened) are embedded with positions,
  encoded by a small transformer encoder, and injected by cross-attention at the grid level. A missing
  source is the all-padding sequence (index ``len(CHARSET)``), the "no source" of guidance.

Input and output: ``(B, H, W)`` images (the diffusion model's ``2·img - 1`` scale), ``t: (B,)`` int steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..errors import InputError, InputTypeError
from .render import CELL_H, CELL_W, CHARSET, Layout

__all__ = ["GlyphUNet", "timestep_embedding"]

#: the padding index of a source (one past the glyphs)
SOURCE_PAD = len(CHARSET)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``(B, dim)`` sinusoidal embedding of the steps ``t: (B,)`` (Vaswani et al. 2017; DDPM's choice)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + the embedding's projection, GroupNorm-SiLU-conv, plus a (1x1) skip."""

    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(e))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class GridAttention(nn.Module):
    """Pre-norm multi-head attention over the grid positions; ``context`` given: cross-attention to it."""

    def __init__(self, ch: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True, kdim=context_dim, vdim=context_dim)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_pad: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.norm(x).reshape(B, C, H * W).transpose(1, 2)
        kv = q if context is None else context
        h = self.attn(q, kv, kv, key_padding_mask=context_pad, need_weights=False)[0]
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class GlyphUNet(nn.Module):
    """The denoiser: ``forward(x (B, H, W), t (B,), labels=None, source=None) -> (B, H, W)``.

    Parameters
    ----------
    layout : the image grid (:class:`~fastdiff.glyph.render.Layout`); fixes ``H, W``.
    base : channels at the pixel level.
    width : channels at the character-grid level.
    depth : residual blocks (each followed by self-attention) at the grid level on each side of the middle.
    heads : attention heads at the grid level.
    num_labels : 0 for no label conditioning.
    source_len : 0 for no source conditioning, else the source's length in characters.
    """

    def __init__(self, layout: Layout | None = None, base: int = 16, width: int = 128, depth: int = 2,
                 heads: int = 4, num_labels: int = 0, source_len: int = 0) -> None:
        super().__init__()
        layout = Layout() if layout is None else layout
        if not isinstance(layout, Layout):
            raise InputTypeError(f"layout: expected a Layout, got {type(layout).__name__}")
        base = _checks.positive_int("base", base)
        width = _checks.positive_int("width", width)
        depth = _checks.positive_int("depth", depth)
        heads = _checks.positive_int("heads", heads)
        if width % heads:
            raise InputError(f"heads: must divide width ({width}), got {heads}")
        num_labels = _checks.positive_int("num_labels", num_labels, 0)
        source_len = _checks.positive_int("source_len", source_len, 0)
        self.config = {"cols": layout.cols, "rows": layout.rows, "base": base, "width": width, "depth": depth,
                       "heads": heads, "num_labels": num_labels, "source_len": source_len}
        self.layout, self.num_labels, self.source_len = layout, num_labels, source_len
        emb = 4 * base
        self.emb_dim = emb
        self.time = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_labels + 1, emb) if num_labels else None
        self.inp = nn.Conv2d(1, base, 3, padding=1)
        self.down_px = ResBlock(base, base, emb)
        self.to_grid = nn.Conv2d(base, width, (CELL_H, CELL_W), stride=(CELL_H, CELL_W))
        self.down = nn.ModuleList(ResBlock(width, width, emb) for _ in range(depth))
        self.down_attn = nn.ModuleList(GridAttention(width, heads) for _ in range(depth))
        self.mid = ResBlock(width, width, emb)
        self.up = nn.ModuleList(ResBlock(2 * width, width, emb) for _ in range(depth))
        self.up_attn = nn.ModuleList(GridAttention(width, heads) for _ in range(depth))
        self.from_grid = nn.ConvTranspose2d(width, base, (CELL_H, CELL_W), stride=(CELL_H, CELL_W))
        self.up_px = ResBlock(2 * base, base, emb)
        self.out_norm = _norm(base)
        self.out = nn.Conv2d(base, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if source_len:
            self.src_embed = nn.Embedding(SOURCE_PAD + 1, width)
            self.src_pos = nn.Parameter(torch.randn(source_len, width) * 0.02)
            self.src_encoder = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                                          norm_first=True)
            self.cross = GridAttention(width, heads, context_dim=width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        x = _checks.floating("x", x)
        H, W = self.layout.shape
        if x.ndim != 3 or tuple(x.shape[1:]) != (H, W):
            raise InputError(f"x: expected (B, {H}, {W}) images, got {tuple(x.shape)}")
        B = x.shape[0]
        t = _checks.integer("t", t)
        if t.shape != (B,):
            raise InputError(f"t: expected ({B},) steps, got {tuple(t.shape)}")
        e = self.time(timestep_embedding(t, self.time[0].in_features))
        if labels is not None:
            if self.label is None:
                raise InputError("labels: this model was built without labels (num_labels=0)")
            labels = _checks.integer("labels", labels)
            if labels.shape != (B,) or int(labels.min()) < 0 or int(labels.max()) > self.num_labels:
                raise InputError(f"labels: expected ({B},) ints in [0, {self.num_labels}] ({self.num_labels}: none)")
            e = e + self.label(labels)
        elif self.label is not None:
            e = e + self.label.weight[self.num_labels]
        context = pad = None
        if source is not None and not self.source_len:
            raise InputError("source: this model was built without a source (source_len=0)")
        if self.source_len:
            if source is None:
                source = torch.full((B, self.source_len), SOURCE_PAD, dtype=torch.long, device=x.device)
            source = _checks.integer("source", source)
            if source.shape != (B, self.source_len) or int(source.min()) < 0 or int(source.max()) > SOURCE_PAD:
                raise InputError(f"source: expected ({B}, {self.source_len}) glyph indices in [0, {SOURCE_PAD}]")
            pad = source == SOURCE_PAD
            context = self.src_encoder(self.src_embed(source) + self.src_pos)
            # a row with no source attends to its padding (all-masked attention would give NaN)
            pad = pad & ~pad.all(-1, keepdim=True)
        h0 = self.down_px(self.inp(x[:, None]), e)
        h = self.to_grid(h0)
        skips = []
        for block, attn in zip(self.down, self.down_attn):
            h = attn(block(h, e))
            skips.append(h)
        h = self.mid(h, e)
        if context is not None:
            h = self.cross(h, context, pad)
        for block, attn in zip(self.up, self.up_attn):
            h = attn(block(torch.cat([h, skips.pop()], 1), e))
        h = self.up_px(torch.cat([self.from_grid(h), h0], 1), e)
        return self.out(F.silu(self.out_norm(h)))[:, 0]
