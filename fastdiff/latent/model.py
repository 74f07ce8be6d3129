"""LD4LG (Lovelace et al. 2023, "Latent Diffusion for Language Generation"): Gaussian diffusion of the
compressed encoder states of a frozen encoder-decoder, decoded by its decoder.

:class:`LatentDiffusion` joins the pieces: the frozen :class:`~fastdiff.latent.plm.PLM`, the
:class:`~fastdiff.latent.autoencoder.LatentAutoencoder` (its encoder states <-> ``n_latents`` vectors of
``d_latent``), a continuous :class:`~fastdiff.models.sed.SEDDenoiser` over the latent vectors (each latent
is one "token" of width ``d_latent``; self-conditioning as in Chen et al. 2022, "Analog Bits"; a label
prefix whose null label gives classifier-free guidance, Ho & Salimans 2022), and
:class:`~fastdiff.continuous.GaussianDiffusion` for the process and its DDIM / DDPM steps.

The diffused variable is ``latents / scale``, where ``scale`` is the standard deviation of the training
latents (LD4LG normalises the latent space to unit variance); the compressor ends in a LayerNorm, so
``scale`` is close to 1.

A checkpoint is a directory: ``latent.json`` (:data:`FORMAT`, the configurations, the label names, the
PLM's location), ``autoencoder.safetensors``, ``denoiser.safetensors`` (absent after the autoencoder
stage alone) and, for a PLM trained here, ``plm/`` (a Hugging Face directory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from .. import schedules as _schedules
from ..continuous import GaussianDiffusion
from ..continuous import step_pairs
from ..errors import InputError, InputFileNotFoundError, InputTypeError
from ..models.sed import SEDConfig, SEDDenoiser
from .autoencoder import LatentAutoencoder
from .plm import PLM

__all__ = ["CONFIG_FILE", "FORMAT", "LatentDiffusion", "build_denoiser", "is_latent_checkpoint", "step_pairs"]

FORMAT = "fastdiff-latent/1"
CONFIG_FILE = "latent.json"
AE_FILE = "autoencoder.safetensors"
DENOISER_FILE = "denoiser.safetensors"


def is_latent_checkpoint(path: object) -> bool:
    """Whether ``path`` is a directory written by :meth:`LatentDiffusion.save` (False for anything else)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_denoiser(d_latent: int, num_labels: int = 0, *, width: int = 128, layers: int = 4, heads: int = 4,
                   dropout: float = 0.0, self_condition: bool = True) -> SEDDenoiser:
    """The SED denoiser over latent vectors: continuous inputs and outputs of width ``d_latent``
    (``vocab_size=1``: the token table of a continuous SED model is unused here)."""
    return SEDDenoiser(SEDConfig(vocab_size=1, kind="continuous", embed_dim=d_latent, width=width, layers=layers,
                                 heads=heads, dropout=dropout, output="embedding", self_condition=self_condition,
                                 num_labels=num_labels))


class LatentDiffusion:
    """A latent diffusion language model (see the module docstring).

    Parameters
    ----------
    plm : the frozen encoder-decoder.
    autoencoder : its compression (``d_model`` must be the PLM's).
    denoiser : the SED denoiser over the latents, or None (an autoencoder-only model: :meth:`reconstruct`
        works, :meth:`generate` does not).
    diffusion : the process (required with a denoiser).
    label_names : the denoiser's labels (``len == num_labels``).
    scale : the latents' standard deviation (see the module docstring).
    schedule : ``(name, T)`` of the schedule, recorded in checkpoints.
    """

    def __init__(self, plm: PLM, autoencoder: LatentAutoencoder, denoiser: SEDDenoiser | None = None,
                 diffusion: GaussianDiffusion | None = None, label_names: Sequence[str] = (), scale: float = 1.0,
                 schedule: tuple[str, int] | None = None) -> None:
        if not isinstance(plm, PLM):
            raise InputTypeError(f"plm: expected a PLM, got {type(plm).__name__}")
        if not isinstance(autoencoder, LatentAutoencoder):
            raise InputTypeError(f"autoencoder: expected a LatentAutoencoder, got {type(autoencoder).__name__}")
        if autoencoder.config["d_model"] != plm.d_model:
            raise InputError(f"autoencoder: built for d_model={autoencoder.config['d_model']}, the PLM's is "
                             f"{plm.d_model}")
        if denoiser is not None:
            if not isinstance(denoiser, SEDDenoiser) or denoiser.config.kind != "continuous":
                raise InputTypeError("denoiser: expected a continuous SEDDenoiser")
            if denoiser.config.embed_dim != autoencoder.config["d_latent"]:
                raise InputError(f"denoiser: its width {denoiser.config.embed_dim} is not d_latent = "
                                 f"{autoencoder.config['d_latent']}")
            if not isinstance(diffusion, GaussianDiffusion):
                raise InputTypeError("diffusion: expected a GaussianDiffusion with a denoiser")
            if len(label_names) != denoiser.config.num_labels:
                raise InputError(f"label_names: the denoiser has {denoiser.config.num_labels} labels, got "
                                 f"{len(label_names)} names")
        self.scale = _checks.real("scale", scale, 0.0, lo_open=True)
        self.plm, self.autoencoder, self.denoiser, self.diffusion = plm, autoencoder, denoiser, diffusion
        self.label_names = [str(n) for n in label_names]
        self.schedule = schedule or (("custom", diffusion.T) if diffusion is not None else None)
        self.plm_path: str | None = None
        self.extra: dict = {}

    @property
    def seq_len(self) -> int:
        return self.autoencoder.length

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def attach_denoiser(self, *, schedule: str = "cosine", T: int = 1000, parameterization: str = "x0",
                        label_names: Sequence[str] = (), scale: float | None = None, **denoiser_kw: Any) -> None:
        """Give an autoencoder-only model a fresh denoiser and process."""
        self.denoiser = build_denoiser(self.autoencoder.config["d_latent"], len(label_names), **denoiser_kw)
        self.diffusion = GaussianDiffusion(_schedules.get(schedule, T), parameterization)
        self.schedule = (schedule, T)
        self.label_names = [str(n) for n in label_names]
        if scale is not None:
            self.scale = _checks.real("scale", scale, 0.0, lo_open=True)

    # --- encoding / reconstruction -------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_latents, d_latent)`` latents of ``(B, seq_len)`` ids (not divided by ``scale``)."""
        self.autoencoder.eval()
        return self.autoencoder.encode(self.plm.encode(ids, mask), mask)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, num_beams: int = 1) -> torch.Tensor:
        """``(B, seq_len)`` ids the frozen decoder generates from the reconstructed states of ``latents``."""
        self.autoencoder.eval()
        return self.plm.generate(self.autoencoder.decode(latents), self.seq_len, num_beams=num_beams)

    def reconstruct(self, ids: torch.Tensor, mask: torch.Tensor | None = None, num_beams: int = 1) -> torch.Tensor:
        """The round trip ids -> latents -> ids."""
        return self.decode_latents(self.latents(ids, mask), num_beams)

    # --- labels ----------------------------------------------------------------------------------------
    def label_ids(self, labels: Sequence[str | int] | str | int, n: int) -> torch.Tensor:
        """``(n,)`` label indices from names or ints (one value is repeated)."""
        if not self.label_names:
            raise InputError("label: this model was trained without labels")
        if isinstance(labels, (str, int)):
            labels = [labels] * n
        out = []
        for v in list(labels):
            if isinstance(v, str) and v not in self.label_names:
                raise InputError(f"label: {v!r} is not one of {self.label_names}")
            v = self.label_names.index(v) if isinstance(v, str) else v
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(self.label_names):
                raise InputError(f"label: expected a name in {self.label_names} or an index below "
                                 f"{len(self.label_names)}, got {v!r}")
            out.append(v)
        if len(out) != n:
            raise InputError(f"label: expected {n} labels, got {len(out)}")
        return torch.tensor(out, dtype=torch.long)

    # --- the diffusion ---------------------------------------------------------------------------------
    def _need_denoiser(self) -> tuple[SEDDenoiser, GaussianDiffusion]:
        if self.denoiser is None or self.diffusion is None:
            raise InputError("checkpoint: this latent model has no denoiser yet (only the autoencoder stage was "
                             "trained); train the diffusion stage")
        return self.denoiser, self.diffusion

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, *, x_self_cond: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        """The denoiser's output; with labels and ``guidance`` ``w != 1``, classifier-free guidance
        ``out_null + w·(out_cond - out_null)`` (the null label is the denoiser's ``num_labels``)."""
        net, _ = self._need_denoiser()
        out = net(x_t, t, x_self_cond=x_self_cond, label=labels)
        if labels is not None and guidance != 1.0:
            out_null = net(x_t, t, x_self_cond=x_self_cond, label=None)
            out = out_null + guidance * (out - out_null)
        return out

    def loss(self, z0: torch.Tensor, labels: torch.Tensor | None = None, *, cond_drop: float = 0.1,
             self_cond_rate: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
        """The simple loss (:meth:`GaussianDiffusion.mse_loss`) of normalised latents ``z0`` (``latents /
        scale``), ``t`` uniform in ``1..T``. Self-conditioning: for a fraction ``self_cond_rate`` of the
        batches the denoiser first predicts x0 with no estimate (no gradient), and that estimate is its
        input for the loss. Classifier-free guidance's training: each row's label becomes the null label
        with probability ``cond_drop``.

        Draws from ``generator``, in order: ``t``, ``noise``, ``drop`` (B uniforms), ``use`` (1 uniform)."""
        net, diff = self._need_denoiser()
        cond_drop = _checks.real("cond_drop", cond_drop, 0.0, 1.0)
        self_cond_rate = _checks.real("self_cond_rate", self_cond_rate, 0.0, 1.0)
        B = z0.shape[0]
        g = generator
        t = torch.randint(1, diff.T + 1, (B,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        x_t = diff.q_sample(z0, t, noise)
        drop = torch.rand(B, generator=g) < cond_drop
        use_sc = bool(torch.rand(1, generator=g) < self_cond_rate)
        if labels is not None:
            labels = torch.where(drop, torch.full_like(labels, net.config.num_labels), labels)
        sc = None
        if net.config.self_condition:
            sc = torch.zeros_like(x_t)
            if use_sc:
                with torch.no_grad():
                    sc = diff.to_x0(net(x_t, t, x_self_cond=sc, label=labels), x_t, t).detach()
        out = net(x_t, t, x_self_cond=sc, label=labels)
        return diff.mse_loss(out, z0, x_t, t, noise)

    @torch.no_grad()
    def sample_latents(self, n: int, *, steps: int = 50, strategy: str = "ddim", eta: float = 0.0,
                       labels: Sequence[str | int] | str | int | None = None, guidance: float = 1.0,
                       seed: int = 0) -> torch.Tensor:
        """``(n, n_latents, d_latent)`` latents (times ``scale``): ``steps`` DDIM (``eta``) or DDPM steps
        from ``x_T ~ N(0, I)``, the previous x0 estimate fed back as the self-conditioning input."""
        net, diff = self._need_denoiser()
        n = _checks.positive_int("n", n)
        _checks.choice("strategy", strategy, ("ddim", "ddpm"))
        guidance = _checks.real("guidance", guidance, 0.0)
        eta = _checks.real("eta", eta, 0.0)
        grid = step_pairs(diff.T, steps)
        lab = None if labels is None else self.label_ids(labels, n)
        g = torch.Generator().manual_seed(int(seed))
        c = self.autoencoder.config
        x = torch.randn(n, c["n_latents"], c["d_latent"], generator=g)
        sc = torch.zeros_like(x) if net.config.self_condition else None
        net.eval()
        for t, s in grid:
            tt = torch.full((n,), t, dtype=torch.long)
            out = self.denoise(x, tt, x_self_cond=sc, labels=lab, guidance=guidance)
            if sc is not None:
                sc = diff.to_x0(out, x, tt)
            if strategy == "ddim":
                x = diff.ddim_step(out, x, t, s, eta=eta, generator=g)
            else:
                x = diff.ddpm_step(out, x, t, s, generator=g)
        return x * self.scale

    def generate(self, n: int, *, num_beams: int = 1, **kw: Any) -> list[str]:
        """``n`` texts: :meth:`sample_latents` (its options), decoded through the PLM's decoder."""
        ids = self.decode_latents(self.sample_latents(n, **kw), num_beams=num_beams)
        return self.plm.decode(ids)

    # --- checkpoints -------------------------------------------------------------------------------------
    def config(self) -> dict:
        d: dict[str, Any] = {"format": FORMAT, "autoencoder": dict(self.autoencoder.config), "scale": self.scale,
                             "label_names": list(self.label_names), "plm": self.plm_path}
        if self.denoiser is not None:
            d["denoiser"] = self.denoiser.config.to_dict()
            d["schedule"] = list(self.schedule)
            d["parameterization"] = self.diffusion.parameterization
        return d

    def save(self, path: str | os.PathLike, *, plm: str | os.PathLike | None = None, fp16: bool = False,
             **extra: Any) -> Path:
        """Write the checkpoint directory ``path``. ``plm``: where the PLM lives (stored as given; a
        relative path is relative to ``path``); None: the PLM is saved into ``path/plm``. ``fp16``: the
        weights in half precision (the shipped, weights-only form). ``extra``: more JSON entries."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if plm is None:
            self.plm.save(out / "plm", dtype=torch.float16 if fp16 else torch.float32)
            self.plm_path = "plm"
        else:
            self.plm_path = str(plm)

        def weights(m: torch.nn.Module) -> dict:
            return {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in
                    m.state_dict().items()}

        save_file(weights(self.autoencoder), str(out / AE_FILE))
        if self.denoiser is not None:
            save_file(weights(self.denoiser), str(out / DENOISER_FILE))
        else:
            (out / DENOISER_FILE).unlink(missing_ok=True)
        self.extra.update(extra)
        (out / CONFIG_FILE).write_text(json.dumps({**self.config(), **self.extra}, indent=1) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentDiffusion:
        """A model saved by :meth:`save`; InputError when ``path`` is not a latent checkpoint."""
        from safetensors.torch import load_file

        p = Path(path)
        if not p.is_dir():
            raise InputFileNotFoundError(f"checkpoint: no directory {str(path)!r}")
        if not is_latent_checkpoint(p):
            raise InputError(f"checkpoint: {str(path)!r} is not a latent-diffusion checkpoint ({FORMAT})")
        cfg = json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
        where = cfg.get("plm")
        if not isinstance(where, str):
            raise InputError(f"checkpoint: {str(path)!r} names no PLM")
        plm_dir = Path(where) if Path(where).is_absolute() else p / where
        plm = PLM.load(plm_dir)
        ae = LatentAutoencoder(**cfg["autoencoder"])
        ae.load_state_dict({k: v.float() for k, v in load_file(str(p / AE_FILE)).items()})
        ae.eval()
        model = cls(plm, ae, label_names=cfg.get("label_names", []) if "denoiser" in cfg else (),
                    scale=cfg.get("scale", 1.0))
        if "denoiser" in cfg:
            net = SEDDenoiser(SEDConfig.from_dict(cfg["denoiser"]))
            net.load_state_dict({k: v.float() for k, v in load_file(str(p / DENOISER_FILE)).items()})
            net.eval()
            name, T = cfg["schedule"]
            model.denoiser = net
            model.diffusion = GaussianDiffusion(_schedules.get(name, int(T)), cfg["parameterization"])
            model.schedule = (name, int(T))
            model.label_names = list(cfg.get("label_names", []))
        model.plm_path = where
        known = set(model.config()) | {"denoiser", "schedule", "parameterization"}
        model.extra = {k: v for k, v in cfg.items() if k not in known}
        return model
