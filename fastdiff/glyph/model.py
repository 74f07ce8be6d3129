"""GlyphDiffusion (Li et al. 2023): Gaussian diffusion of glyph images, sampled, then read back as text.

:class:`GlyphDiffusion` joins the pieces: the layout and font (:mod:`fastdiff.glyph.render`), the U-Net
(:mod:`fastdiff.glyph.unet`), :class:`fastdiff.continuous.GaussianDiffusion` for the process and its
DDPM / DDIM steps, and the recogniser (:mod:`fastdiff.glyph.recognise`).

The diffused variable is ``x_0 = scale · (2·img - 1)``: ink ``+scale``, background ``-scale``. A glyph
cell spreads one character over 48 pixels, so a character stays readable under much more noise than a
single value would; scaling the input down (``scale < 1``) moves the noise levels at which characters are
still undecided into the middle of the schedule (the input scaling of Chen 2023, "On the Importance of
Noise Scheduling for Diffusion Models").

``snap`` (sampling): each step's x0 estimate is replaced by the rendering of its recognised text, i.e.
projected onto the nearest glyph per cell: the image analogue of Diffusion-LM's clamping trick (Li et al.
2022), which snaps x0 estimates to the nearest word embedding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .. import _checks
from .. import schedules as _schedules
from ..continuous import GaussianDiffusion
from ..continuous import step_pairs as step_grid
from ..errors import InputError, InputFileNotFoundError, InputTypeError
from .recognise import recognise, recognise_ids
from .render import Layout, render, render_ids
from .unet import SOURCE_PAD, GlyphUNet

__all__ = ["FORMAT", "GlyphDiffusion", "is_glyph_checkpoint", "step_grid"]

FORMAT = "fastdiff-glyph/1"


def is_glyph_checkpoint(path: object) -> bool:
    """Whether ``path`` names a file saved by :meth:`GlyphDiffusion.save` (False for directories, bundled
    model names and anything unreadable)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file: not ours
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


class GlyphDiffusion:
    """A glyph-image diffusion model: training loss, sampling to text, save / load.

    Parameters
    ----------
    net : the :class:`~fastdiff.glyph.unet.GlyphUNet` (its layout is the model's).
    diffusion : the :class:`~fastdiff.continuous.GaussianDiffusion` process.
    scale : ``x_0 = scale·(2·img - 1)``.
    label_names : names of the labels the net was built for (``len == net.num_labels``).
    schedule : ``(name, T)`` of the schedule, recorded in checkpoints (:func:`fastdiff.schedules.get`).
    """

    def __init__(self, net: GlyphUNet, diffusion: GaussianDiffusion, scale: float = 0.5,
                 label_names: Sequence[str] = (), schedule: tuple[str, int] | None = None) -> None:
        if not isinstance(net, GlyphUNet):
            raise InputTypeError(f"net: expected a GlyphUNet, got {type(net).__name__}")
        if not isinstance(diffusion, GaussianDiffusion):
            raise InputTypeError(f"diffusion: expected a GaussianDiffusion, got {type(diffusion).__name__}")
        self.scale = _checks.real("scale", scale, 0.0)
        if self.scale <= 0:
            raise InputError(f"scale: expected > 0, got {scale}")
        self.label_names = [str(n) for n in label_names]
        if len(self.label_names) != net.num_labels:
            raise InputError(f"label_names: the net has {net.num_labels} labels, got {len(self.label_names)} names")
        self.net, self.diffusion, self.layout = net, diffusion, net.layout
        self.schedule = schedule or ("custom", diffusion.T)

    @classmethod
    def build(cls, layout: Layout | None = None, *, schedule: str = "cosine", T: int = 1000,
              parameterization: str = "x0", scale: float = 0.5, label_names: Sequence[str] = (),
              source_len: int = 0, **net_kw: int) -> GlyphDiffusion:
        """A fresh model: ``schedules.get(schedule, T)``, a :class:`GlyphUNet` with ``net_kw``."""
        net = GlyphUNet(layout, num_labels=len(label_names), source_len=source_len, **net_kw)
        diff = GaussianDiffusion(_schedules.get(schedule, T), parameterization)
        return cls(net, diff, scale, label_names, (schedule, T))

    # --- data ----------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], overflow: str = "truncate") -> torch.Tensor:
        """``(N, H, W)`` diffusion-scale images of ``texts``: ``scale·(2·render - 1)``."""
        return self.scale * (2.0 * render(list(texts), self.layout, overflow) - 1.0)

    def decode(self, x: torch.Tensor, strip: bool = True) -> list[str]:
        """The recognised texts of diffusion-scale images ``x: (N, H, W)``."""
        return recognise(self._to_img(x), strip=strip)

    def _to_img(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.scale + 1.0) / 2.0

    def source_ids(self, sources: Sequence[str]) -> torch.Tensor:
        """``(N, source_len)`` glyph indices of source texts (truncated; padding = the net's pad index)."""
        if not self.net.source_len:
            raise InputError("source: this model was built without a source (source_len=0)")
        if isinstance(sources, str) or not isinstance(sources, Sequence):
            raise InputTypeError(f"source: expected a list of str, got {type(sources).__name__}")
        n = self.net.source_len
        ids = Layout(cols=n, rows=1).cell_ids(list(sources), overflow="truncate").reshape(len(sources), n)
        lengths = torch.tensor([min(len(s), n) for s in sources])
        ids[torch.arange(n)[None] >= lengths[:, None]] = SOURCE_PAD
        return ids

    def label_ids(self, labels: Sequence[str | int] | torch.Tensor, n: int) -> torch.Tensor:
        """``(n,)`` label indices from names or ints (one value is repeated)."""
        if not self.label_names:
            raise InputError("label: this model was trained without labels")
        if isinstance(labels, (str, int)):
            labels = [labels] * n
        out = []
        for v in (labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)):
            if isinstance(v, str):
                if v not in self.label_names:
                    raise InputError(f"label: {v!r} is not one of {self.label_names}")
                v = self.label_names.index(v)
            if not isinstance(v, int) or not 0 <= v < len(self.label_names):
                raise InputError(f"label: expected a name in {self.label_names} or an index below "
                                 f"{len(self.label_names)}, got {v!r}")
            out.append(v)
        if len(out) != n:
            raise InputError(f"label: expected {n} labels, got {len(out)}")
        return torch.tensor(out, dtype=torch.long)

    # --- training --------------------------------------------------------------------------------------
    def loss(self, x0: torch.Tensor, *, labels: torch.Tensor | None = None, source: torch.Tensor | None = None,
             cond_drop: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
        """The simple loss (:meth:`GaussianDiffusion.mse_loss`, target = the parameterisation) of a batch of
        diffusion-scale images ``x0: (B, H, W)``, ``t`` uniform in ``1..T``; with probability
        ``cond_drop`` a row's label / source is replaced by "none" (classifier-free guidance's training).

        Draws from ``generator``, in this order: ``t = randint(1, T + 1, (B,))``, ``noise = randn(x0.shape)``,
        ``drop = rand(B) < cond_drop``."""
        B = x0.shape[0]
        g = generator
        t = torch.randint(1, self.diffusion.T + 1, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.diffusion.q_sample(x0, t, noise)
        drop = torch.rand(B, generator=g) < cond_drop
        if labels is not None:
            labels = torch.where(drop, torch.full_like(labels, self.net.num_labels), labels)
        if source is not None:
            source = torch.where(drop[:, None], torch.full_like(source, SOURCE_PAD), source)
        out = self.net(x_t, t, labels=labels, source=source)
        return self.diffusion.mse_loss(out, x0, x_t, t, noise)

    # --- sampling --------------------------------------------------------------------------------------
    def snap(self, x0: torch.Tensor) -> torch.Tensor:
        """Project diffusion-scale images onto the font: every cell becomes its nearest glyph."""
        img = render_ids(recognise_ids(self._to_img(x0)), x0.dtype)
        return self.scale * (2.0 * img - 1.0)

    @torch.no_grad()
    def sample_images(self, n: int, *, steps: int = 50, strategy: str = "ddim", eta: float = 0.0,
                      labels: Sequence[str | int] | torch.Tensor | str | int | None = None,
                      source: Sequence[str] | None = None, guidance: float = 1.0, snap: bool = False,
                      seed: int = 0) -> torch.Tensor:
        """``(n, H, W)`` diffusion-scale images: ``steps`` DDIM (``eta``) or DDPM steps from ``x_T ~ N(0, I)``.

        ``guidance`` ``w``: classifier-free guidance, ``out = out_none + w·(out_cond - out_none)`` (1: the
        conditional model alone). ``snap``: see the module docstring.
        """
        n = _checks.positive_int("n", n)
        _checks.choice("strategy", strategy, ("ddim", "ddpm"))
        guidance = _checks.real("guidance", guidance, 0.0)
        grid = step_grid(self.diffusion.T, steps)
        lab = None if labels is None else self.label_ids(labels, n)
        src = None if source is None else self.source_ids(source)
        if src is not None and src.shape[0] != n:
            raise InputError(f"source: expected {n} texts, got {src.shape[0]}")
        g = torch.Generator().manual_seed(int(seed))
        H, W = self.layout.shape
        x = torch.randn(n, H, W, generator=g)
        conditional = lab is not None or src is not None
        self.net.eval()
        for t, s in grid:
            tt = torch.full((n,), t, dtype=torch.long)
            out = self.net(x, tt, labels=lab, source=src)
            if conditional and guidance != 1.0:
                out_none = self.net(x, tt)
                out = out_none + guidance * (out - out_none)
            hook = self.snap if snap else None
            if strategy == "ddim":
                x = self.diffusion.ddim_step(out, x, t, s, eta=eta, generator=g, denoised_fn=hook)
            else:
                x = self.diffusion.ddpm_step(out, x, t, s, generator=g, denoised_fn=hook)
        return x

    def generate(self, n: int, **kw: object) -> list[str]:
        """Sample ``n`` images (:meth:`sample_images`'s options) and read them back as text."""
        return self.decode(self.sample_images(n, **kw))

    # --- checkpoints -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": FORMAT, "net": dict(self.net.config), "scale": self.scale,
                "label_names": list(self.label_names), "schedule": list(self.schedule),
                "parameterization": self.diffusion.parameterization, "state_dict": self.net.state_dict()}

    def save(self, path: str | os.PathLike, **extra: object) -> None:
        """Write a checkpoint (``torch.save`` of :meth:`state` plus ``extra`` entries, e.g. the step)."""
        torch.save({**self.state(), **extra}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GlyphDiffusion:
        """A model saved by :meth:`save`; InputError when the file is not a glyph checkpoint."""
        if not os.path.isfile(path):
            raise InputFileNotFoundError(f"checkpoint: no file {str(path)!r}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise InputError(f"checkpoint: {str(path)!r} is not a glyph-diffusion checkpoint ({FORMAT})")
        cfg = dict(ckpt["net"])
        layout = Layout(cols=cfg.pop("cols"), rows=cfg.pop("rows"))
        num_labels = cfg.pop("num_labels")
        names = ckpt["label_names"]
        if len(names) != num_labels:
            raise InputError(f"checkpoint: {num_labels} labels but {len(names)} names")
        name, T = ckpt["schedule"]
        model = cls.build(layout, schedule=name, T=int(T), parameterization=ckpt["parameterization"],
                          scale=ckpt["scale"], label_names=names, **cfg)
        model.net.load_state_dict(ckpt["state_dict"])
        model.net.eval()
        model.extra = {k: v for k, v in ckpt.items() if k not in model.state()}
        return model
