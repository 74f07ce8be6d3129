"""Latent diffusion for language generation (LD4LG, Lovelace et al. 2023): continuous diffusion of a
fixed number of latent vectors compressed from a frozen encoder-decoder's states, decoded by its decoder.

* :mod:`~fastdiff.latent.plm`: :class:`PLM` (a Hugging Face seq2seq model and its tokenizer, frozen),
  :func:`build_small_plm` / :func:`train_plm` (a small BART-style model trained here, for offline use).
* :mod:`~fastdiff.latent.autoencoder`: :class:`Compressor` (Perceiver resampler), :class:`Reconstructor`,
  :class:`LatentAutoencoder` (the reconstruction objective through the frozen decoder).
* :mod:`~fastdiff.latent.model`: :class:`LatentDiffusion` (the SED denoiser on the latents with
  :class:`fastdiff.continuous.GaussianDiffusion`; self-conditioning, classifier-free guidance; sampling to
  text; checkpoint directories).
* :mod:`~fastdiff.latent.train`: :class:`LatentConfig`, the stage loops, :func:`run_stages` (``fastdiff
  train --family latent``), :func:`reconstruction_scores`.

Sits with data / models / glyph (it uses :mod:`fastdiff.continuous`, :mod:`fastdiff.models.sed` and
:mod:`fastdiff.data`); ``transformers`` is imported only inside functions.
"""

from .autoencoder import Compressor, LatentAutoencoder, Reconstructor
from .model import FORMAT, LatentDiffusion, build_denoiser, is_latent_checkpoint, step_pairs
from .plm import PLM, build_small_plm, train_plm
from .train import (STAGES, LatentConfig, latent_data, latent_scale, reconstruction_scores, run_stages,
                    train_autoencoder, train_diffusion)

__all__ = ["FORMAT", "PLM", "STAGES", "Compressor", "LatentAutoencoder", "LatentConfig", "LatentDiffusion",
           "Reconstructor", "build_denoiser", "build_small_plm", "is_latent_checkpoint", "latent_data",
           "latent_scale", "reconstruction_scores", "run_stages", "step_pairs", "train_autoencoder", "train_diffusion",
           "train_plm"]
