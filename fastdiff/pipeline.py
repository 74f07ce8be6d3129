"""Text in, text out: a trained checkpoint, its tokenizer and process, and :mod:`fastdiff.sampling`.

``TextDiffusion.load("discrete")`` (or ``"continuous"``, or a checkpoint directory) gives an object whose
:meth:`~TextDiffusion.generate` returns decoded strings with the sampler's statistics. It is what
``fastdiff generate`` runs; the bundled checkpoints live in ``fastdiff/assets/`` (see
``fastdiff/assets/README.md`` for how each was trained).

Templates (prompts and infilling): a string in which ``[MASK]`` stands for one token to generate and
``[MASK*n]`` for ``n`` of them; every other token is fixed (never noised, never changed). A template
shorter than ``length`` is padded with generated positions at the end, so ``"The for statement"`` is a
prompt and ``"The [MASK*3] statement is used to [MASK*6] ."`` is infilling.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _checks, sampling
from .sampling import _memory as _sampling_memory
from . import distributed as _distributed
from .continuous import GaussianDiffusion
from .errors import InputError, InputTypeError

if TYPE_CHECKING:
    from .data import TextTokenizer
    from .training.checkpoint import Checkpoint

__all__ = ["BUNDLED", "Generation", "TextDiffusion", "bundled_path", "render", "resolve_checkpoint"]

ASSETS = Path(__file__).resolve().parent / "assets"
#: name -> directory of the checkpoints that ship inside the package
BUNDLED = {
    "discrete": "discrete",
    "bd3": "bd3",
    "continuous": "continuous",
    "causal_lm": "causal_lm",
    "classifier": "classifier",
    "latent": "latent",  # LD4LG (fastdiff.latent): loaded by LatentDiffusion.load, not TextDiffusion
}
_MASK_RUN = re.compile(r"\[MASK(?:\*(\d+))?\]")
#: sampler options that TextDiffusion.generate sets per batch (a user's value could not be right for every
#: batch, or would be silently replaced)
_SET_BY_GENERATE = frozenset({"shape", "steps", "strategy", "seed", "temperature", "top_k", "top_p", "backend",
                              "device", "progress", "trajectory", "sample_offset", "micro_batch", "cond", "uncond",
                              "guidance_scale", "x_init", "fixed", "lengths"})


def bundled_path(name: str) -> Path:
    """Directory of a bundled checkpoint (``discrete``, ``bd3``, ``continuous``, ``causal_lm``, ``classifier``,
    ``latent``)."""
    if name not in BUNDLED:
        raise InputError(f"checkpoint: unknown bundled checkpoint {name!r}; bundled: {sorted(BUNDLED)}")
    path = ASSETS / BUNDLED[name]
    if not ((path / "config.json").is_file() or (path / "latent.json").is_file()):
        raise FileNotFoundError(f"checkpoint: the bundled checkpoint {name!r} is missing from {path} "
                                "(a source checkout without assets? reinstall fastdiff)")
    return path


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A bundled name or a checkpoint directory (or a training run's directory with a ``latest`` file)."""
    if isinstance(name_or_path, str) and name_or_path in BUNDLED:
        return bundled_path(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} does not exist (bundled names: {sorted(BUNDLED)})")
    return path


@dataclass
class Generation:
    """``texts``: one string per sample; ``tokens: (N, L)``; ``stats``: summed over batches
    (``tokens_per_s`` = generated tokens / sampling time; across ranks the time is the slowest rank's);
    ``trajectory``: for each step, the rendered text of every sample (``[MASK]`` shown as ``_``), when
    asked for; ``start``: the global index of the first sample (non-zero only for a ``shard``)."""

    texts: list[str]
    tokens: torch.Tensor
    stats: dict
    trajectory: list[list[str]] | None = None
    labels: list[str | None] = field(default_factory=list)
    start: int = 0


def render(tokens: torch.Tensor | list[int], tokenizer: TextTokenizer, mask_id: int | None = None,
           mask: str = "_") -> str:
    """Decode ``tokens`` (1-D) with every ``mask_id`` position shown as ``mask``: each run of real tokens
    is decoded on its own (whitespace collapsed to single spaces), so a half-denoised sequence reads as one
    line of text with gaps."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    if mask_id is None:
        return tokenizer.decode(ids)
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if i == mask_id:
            if run:
                parts.append(" ".join(tokenizer.decode(run).split()))
                run = []
            parts.append(mask)
        else:
            run.append(i)
    if run:
        parts.append(" ".join(tokenizer.decode(run).split()))
    return " ".join(p for p in parts if p)


class TextDiffusion:
    """A loaded checkpoint ready to generate text.

    Parameters
    ----------
    checkpoint : a :class:`fastdiff.training.Checkpoint` (``load_checkpoint``'s result).
    device : where to run (default: the checkpoint's, i.e. CPU).
    backend : ops backend for the sampler (``"auto"``, ``"reference"``, ``"cpp"``, ``"triton"``, ``"cuda"``).
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device | None = None, backend: str = "auto"
                 ) -> None:
        self.checkpoint = checkpoint
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = checkpoint.model.to(self.device).eval()
        self.tokenizer = checkpoint.tokenizer
        if self.tokenizer is None:
            raise InputError("checkpoint: has no tokenizer.json; text generation needs one")
        proc = checkpoint.process
        self.process = proc.to(self.device) if hasattr(proc, "to") and self.device.type != "cpu" else proc
        self.backend = backend
        self.config = checkpoint.config
        self.continuous = isinstance(self.process, GaussianDiffusion)
        train = self.config.get("train", {})
        model_cfg = self.config.get("model", {})
        self.task = train.get("task", "lm")
        self.num_labels = int(model_cfg.get("num_labels", 0) or 0)
        self.label_names: list[str] = list(train.get("label_names") or [str(i) for i in range(self.num_labels)])
        self.seq_len = int(train.get("seq_len", 64))
        from .training.checkpoint import check_generation

        try:
            #: the checkpoint's recommended sampling settings (``config.json``'s ``"generation"``), used where
            #: :meth:`generate`'s caller sets nothing
            self.generation_defaults: dict = check_generation("generation", self.config.get("generation", {}))
        except (InputError, InputTypeError) as e:
            raise InputError(f"checkpoint: config.json: {e}") from None
        self.mask_id = getattr(self.tokenizer, "mask_id", 1)
        proc_mask = getattr(self.process, "mask_id", None)
        if not self.continuous and getattr(self.process, "kind", None) == "absorbing" and proc_mask != self.mask_id:
            raise InputError(f"checkpoint: the process's mask_id {proc_mask} differs from the tokenizer's [MASK] id "
                             f"{self.mask_id}; templates, prompts and trajectories would put the wrong token in "
                             "the masked positions (fix config.json's process.mask_id)")

    @classmethod
    def load(cls, name_or_path: str | Path = "discrete", device: str | torch.device | None = None,
             backend: str = "auto", weights: str = "ema") -> TextDiffusion:
        """Load a bundled checkpoint by name or a checkpoint directory (not a latent-diffusion one: InputError
        naming :meth:`fastdiff.latent.LatentDiffusion.load`)."""
        from .latent import is_latent_checkpoint
        from .training import load_checkpoint

        path = resolve_checkpoint(name_or_path)
        if is_latent_checkpoint(path):
            raise InputError(f"checkpoint: {str(name_or_path)!r} is a latent-diffusion (LD4LG) checkpoint; load it "
                             "with fastdiff.latent.LatentDiffusion.load(fastdiff.pipeline.resolve_checkpoint("
                             f"{str(name_or_path)!r})) (fastdiff generate -c {name_or_path} does)")
        return cls(load_checkpoint(path, weights=weights), device=device, backend=backend)

    # --- inputs -------------------------------------------------------------------------------------
    def _label_id(self, label: str | int | None) -> int:
        if label is None:
            return self.num_labels  # the null label (unconditional), trained by condition dropout
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise InputTypeError(f"label: expected a label name or index, got {type(label).__name__}")
        if self.num_labels == 0:
            raise InputError("label: this checkpoint was not trained with labels")
        if isinstance(label, str) and not label.isdigit():
            if label not in self.label_names:
                raise InputError(f"label: {label!r} is not one of {self.label_names}")
            return self.label_names.index(label)
        idx = int(label)
        if not 0 <= idx < self.num_labels:
            raise InputError(f"label: expected 0..{self.num_labels - 1} or one of {self.label_names}, got {label!r}")
        return idx

    def parse_template(self, template: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_init (L,), fixed (L,) bool)`` from a template (see the module docstring)."""
        if not isinstance(template, str):
            raise InputTypeError(f"template: expected a string, got {type(template).__name__}")
        ids: list[int] = []
        fixed: list[bool] = []
        pos = 0
        for m in _MASK_RUN.finditer(template):
            text = template[pos:m.start()]
            if text.strip():
                piece = self.tokenizer.encode(text.strip() if not ids else " " + text.strip())
                ids += piece
                fixed += [True] * len(piece)
            n = int(m.group(1) or 1)
            if n < 1:
                raise InputError(f"template: [MASK*{n}] needs n >= 1")
            ids += [self.mask_id] * n
            fixed += [False] * n
            pos = m.end()
        text = template[pos:]
        if text.strip():
            piece = self.tokenizer.encode(text.strip() if not ids else " " + text.strip())
            ids += piece
            fixed += [True] * len(piece)
        if len(ids) > length:
            raise InputError(f"template: {len(ids)} tokens do not fit in length={length}")
        if not any(fixed):
            raise InputError("template: has no fixed text (only [MASK] runs); drop it for free generation")
        pad = length - len(ids)
        return (torch.tensor(ids + [self.mask_id] * pad, dtype=torch.long),
                torch.tensor(fixed + [False] * pad, dtype=torch.bool))

    # --- generation ---------------------------------------------------------------------------------
    def default_strategy(self) -> str:
        return "ddim" if self.continuous else "ancestral"

    def generate(self, num_samples: int = 4, *, length: int | None = None, steps: int | None = None,
                 strategy: str | None = None, seed: int = 0, batch_size: int | None = None,
                 label: str | int | None = None, guidance: float = 1.0, template: str | None = None,
                 source: str | list[str] | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, trajectory: bool = False, progress: bool = False,
                 shard: tuple[int, int] | None = None, distributed: bool = True, micro_batch: int | None = None,
                 stream: Callable[[int, int, list[str]], None] | None = None, **options: Any) -> Generation:
        """Generate ``num_samples`` texts.

        ``label``: an attribute name/index for label-conditioned checkpoints (default: the null label,
        i.e. unconditional); ``guidance``: classifier-free guidance scale ``s`` in
        ``uncond + s·(cond - uncond)`` (1 = plain conditional; > 1 needs a label); ``template``: prompt /
        infilling (module docstring); ``source``: the input text(s) of a text-to-text checkpoint;
        ``temperature``, ``top_p``, ``steps``: None (the default) takes the checkpoint's recommended value
        (:attr:`generation_defaults`, e.g. the bundled discrete model's ``temperature`` 0.8) or else the
        sampler's (1.0, none, 64); ``stats`` records what was used.
        ``stream``: called after every step as ``stream(step, first, texts)`` with the rendered text of the
        batch's samples ``first ..`` (``[MASK]`` shown as ``_``), for showing tokens as they are revealed
        (``fastdiff generate --stream``).
        ``options``: any other :func:`fastdiff.sampling.sample` option (e.g. ``eta``, ``clamp``,
        ``threshold``, ``block_size``, ``cache``: on by default where :meth:`auto_cache` says it changes
        nothing but the number of network calls); the per-batch ones that generate sets itself (``cond``,
        ``x_init``, ``sample_offset``, ...) are rejected there.

        Randomness is keyed by ``seed`` and each sample's global index ``0 .. num_samples-1`` (the sampler's
        ``sample_offset``), so every random draw of a sample is the same whatever ``batch_size`` or the
        number of processes. The tokens are then the same too exactly when the network returns the same
        logits for a sample whatever batch it is in; the network's rounding may depend on the batch shape
        (the bundled discrete model's logits differ by ~1e-5 between a batch of 4 and a batch of 1 on a CPU,
        which flips a top-p set or a draw now and then). ``micro_batch=m`` guarantees it: the network is
        always called on ``m`` rows, sample ``g`` in row ``g mod m`` (see :func:`fastdiff.sampling.sample`),
        so with the same ``m`` the samples are bit-identical for every ``batch_size`` and rank split (on the
        same device, backend, thread count and library versions). ``micro_batch=None`` (the default) calls
        the network on each batch as it is. Measured on this project's quiet 2-core CPU (one thread, bundled
        discrete model, 64 tokens, 64 steps, ``fastdiff generate -n N --threads 1 [--micro-batch M]``):
        4 samples 299 tokens/s unset, 270 with ``micro_batch=1``, 137 with 8 (the call pads 4 rows to 8);
        64 samples 230 unset, 232 with 1, 264 with 8 (smaller logits stay in cache). On a GPU, small micro-batches leave it idle.

        Under ``torchrun`` (a :mod:`torch.distributed` group initialised, e.g. by
        :func:`fastdiff.distributed.init`) and ``distributed=True``, every rank generates its contiguous
        slice (:func:`fastdiff.distributed.shard_range`) and the slices are gathered in rank order: every
        rank returns all ``num_samples`` samples in global order, the same as one process would.
        ``shard=(rank, world_size)`` generates only that slice, without any communication
        (``Generation.start`` is its first global index).

        The memory the outputs (and trajectories) of all ``num_samples`` samples, and the largest batch's
        network outputs and activations, need is checked against what the device has free before
        anything is generated (``InputError`` naming ``num_samples`` or ``length`` / ``batch_size``).
        """
        n = _checks.positive_int("num_samples", num_samples)
        L = _checks.positive_int("length", length if length is not None else self.seq_len)
        defaults = self.generation_defaults if not self.continuous else {}
        steps = _checks.positive_int("steps", steps if steps is not None else defaults.get("steps", 64))
        if temperature is None:
            temperature = defaults.get("temperature", 1.0)
        if top_p is None:
            top_p = defaults.get("top_p")
        if steps > sampling._options.MAX_STEPS:
            raise InputError(f"steps: at most 2**62, got {steps}")
        bs = _checks.positive_int("batch_size", batch_size if batch_size is not None else min(n, 64))
        if micro_batch is not None:
            _checks.positive_int("micro_batch", micro_batch)
        for name, v in (("trajectory", trajectory), ("progress", progress), ("distributed", distributed)):
            if not isinstance(v, bool):
                raise InputTypeError(f"{name}: expected True or False, got {type(v).__name__}")
        if strategy is not None and not isinstance(strategy, str):
            raise InputTypeError(f"strategy: expected a strategy name, got {type(strategy).__name__}")
        if stream is not None and not callable(stream):
            raise InputTypeError(f"stream: expected a callable, got {type(stream).__name__}")
        if "callback" in options:
            raise InputError("callback: TextDiffusion.generate sets the sampler's callback itself; use stream=")
        strategy = strategy or self.default_strategy()
        guidance = _checks.real("guidance", guidance)
        if not math.isfinite(guidance):
            raise InputError(f"guidance: must be finite, got {guidance}")
        owned = sorted(set(options) & _SET_BY_GENERATE)
        if owned:
            raise InputTypeError(f"options: {owned} are set by generate itself, per batch (use template= for "
                                 "fixed tokens, label= / guidance= / source= for conditions, and generate's own "
                                 "arguments for the rest)")
        lab = self._label_id(label) if self.num_labels else None
        if label is not None and not self.num_labels:
            raise InputError("label: this checkpoint was not trained with labels")
        if guidance != 1.0 and (lab is None or lab == self.num_labels):
            raise InputError("guidance: classifier-free guidance needs --label on a label-conditioned checkpoint")
        sources = None
        if self.task == "word_order":
            if source is None:
                raise InputError("source: this text-to-text checkpoint needs source text(s)")
            sources = [source] * n if isinstance(source, str) else source
            if not isinstance(sources, (list, tuple)) or not all(isinstance(x, str) for x in sources):
                raise InputTypeError("source: expected a string or a list of strings")
            sources = list(sources)
            if len(sources) != n:
                raise InputError(f"source: got {len(sources)} texts for num_samples={n}")
        elif source is not None:
            raise InputError("source: only text-to-text checkpoints take a source")
        cap = _sampling_memory.positional_capacity(self.model)
        if cap is not None and L > cap[0]:
            raise InputError(f"length: {L} exceeds the model's positional capacity {cap[0]} ({cap[1]})")
        r, w, gather = self._shard(shard, distributed)
        lo, hi = _distributed.shard_range(n, r, w)
        self._check_memory(n, hi - lo, L, steps, trajectory, options.get("block_size"))
        x_init = fixed = None
        if template is not None:
            x_init, fixed = self.parse_template(template, L)
        block = self.block_size
        if block and "block_size" not in options:  # a block-causal (BD3-LM) model decodes on its block grid,
            options = {**options, "block_size": block}  # with its exact KV cache where the run allows it
            if "kv_cache" not in options and guidance == 1.0 and micro_batch is None and "cache" not in options:
                options["kv_cache"] = True
        if "cache" not in options and not options.get("kv_cache") and self.auto_cache(strategy):
            options = {**options, "cache": True}

        texts: list[str] = []
        toks: list[torch.Tensor] = [torch.empty(0, L, dtype=torch.long)]
        traj: list[list[str]] | None = [] if trajectory else None
        total = {"network_calls": 0, "time_s": 0.0, "steps": 0}
        for start in range(lo, hi, bs):
            B = min(bs, hi - start)
            opts = dict(options)
            opts.update(temperature=temperature, top_k=top_k, top_p=top_p, backend=self.backend,
                        device=self.device, progress=progress, trajectory=trajectory, sample_offset=start,
                        micro_batch=micro_batch)
            cond, uncond = self._conditions(B, lab, sources[start:start + B] if sources else None)
            if cond:
                opts["cond"] = cond
            if guidance != 1.0:
                opts["guidance_scale"] = guidance
                opts["uncond"] = uncond
            if stream is not None:
                opts["callback"] = self._streamer(stream, start)
            if x_init is not None:
                opts["x_init"] = x_init.expand(B, L).to(self.device)
                opts["fixed"] = fixed.expand(B, L).to(self.device)
            if self.continuous:
                opts.setdefault("embedding", self.model.embedding_table().detach())
                opts.setdefault("self_condition", bool(self.config.get("model", {}).get("self_condition")))
                for k in ("top_k", "top_p"):
                    if opts.get(k) is None:
                        opts.pop(k)
                if opts.get("temperature") == 1.0:
                    opts.pop("temperature")
            try:
                with torch.inference_mode():
                    out = sampling.sample(self.model, self.process, shape=(B, L), steps=steps, strategy=strategy,
                                          seed=seed, **opts)
            except InputError as e:  # the sampler's (B, L) is this call's batch_size and length
                msg = str(e)
                if msg.startswith("shape: "):
                    raise InputError("batch_size / length: " + msg[len("shape: "):]) from e
                raise
            toks.append(out.tokens.cpu())
            texts += [self.decode(row) for row in out.tokens.cpu()]
            for k in total:
                total[k] += out.stats.get(k, 0)
            if traj is not None and out.trajectory is not None:
                for i, step_tokens in enumerate(out.trajectory):
                    rows = [render(r, self.tokenizer, None if self.continuous else self.mask_id)
                            for r in step_tokens.cpu()]
                    if len(traj) <= i:
                        traj.append([])
                    traj[i] += rows
        tokens = torch.cat(toks)
        total["ranks"] = 1
        if gather:  # every rank's slice, in rank order = global sample order
            parts = _distributed.all_gather_objects((texts, tokens, traj, total))
            texts = [t for p in parts for t in p[0]]
            tokens = torch.cat([p[1] for p in parts])
            if traj is not None:
                steps_seen = max(len(p[2]) for p in parts)
                traj = [[row for p in parts if i < len(p[2]) for row in p[2][i]] for i in range(steps_seen)]
            total = {"network_calls": sum(p[3]["network_calls"] for p in parts),
                     "steps": sum(p[3]["steps"] for p in parts),
                     "time_s": max(p[3]["time_s"] for p in parts),  # the ranks run side by side
                     "ranks": len(parts)}
            lo = 0
        total["tokens_per_s"] = tokens.numel() / total["time_s"] if total["time_s"] > 0 else float("inf")
        total["strategy"], total["steps_per_sample"], total["length"] = strategy, steps, L
        total["temperature"], total["top_p"] = temperature, top_p
        name = None if lab is None or lab == self.num_labels else self.label_names[lab]
        return Generation(texts=texts, tokens=tokens, stats=total, trajectory=traj, labels=[name] * len(texts),
                          start=lo)

    @property
    def block_size(self) -> int:
        """The block size of a block-causal (BD3-LM) model, 0 for a bidirectional one. :meth:`generate`
        decodes such a model block by block on its grid with the exact KV cache (``kv_cache=True``) unless
        told otherwise."""
        cfg = getattr(self.model, "config", None)
        return int(getattr(cfg, "block_size", 0) or 0)

    def auto_cache(self, strategy: str) -> bool:
        """Whether :meth:`generate` turns on the sampler's ``cache`` (MDLM's caching sampler) by itself: for
        the ancestral strategy of a discrete model whose output does not depend on the step (``uses_time``
        False, e.g. an absorbing model trained without a step input). A step that unmasks nothing leaves
        the network's input, and so its output, unchanged: the cache skips that call, and the samples are
        the same tokens as without it. ``generate(..., cache=False)`` turns it off."""
        return (strategy == "ancestral" and not self.continuous
                and not getattr(self.model, "uses_time", True))

    def _streamer(self, stream: Callable[[int, int, list[str]], None], first: int) -> Callable[[object], None]:
        mask = None if self.continuous else self.mask_id

        def callback(step: object) -> None:
            stream(step.step, first, [render(r, self.tokenizer, mask) for r in step.tokens.cpu()])

        return callback

    def _check_memory(self, n: int, mine: int, L: int, steps: int, trajectory: bool, block_size: int | None) -> None:
        """What all the samples' outputs will hold (tokens, texts, trajectories), against free host memory.
        ``mine`` of the ``n`` samples are generated here; all ``n`` are gathered."""
        parts = {f"tokens ({n}, {L}) int64, twice while joined": 2 * n * L * 8,
                 "decoded texts (about 8 bytes a token)": n * L * 8}
        if trajectory:
            bsz = block_size if isinstance(block_size, int) and block_size > 0 else L
            parts["trajectory (rendered text of every step)"] = -(-L // bsz) * steps * max(n, mine) * L * 8
        _sampling_memory.check_fits("num_samples", parts, torch.device("cpu"),
                                    "generate fewer samples per call (or in shards) or a shorter length")

    @staticmethod
    def _shard(shard: tuple[int, int] | None, distributed: bool) -> tuple[int, int, bool]:
        """``(rank, world_size, gather)`` for :meth:`generate`."""
        if shard is not None:
            if not isinstance(shard, (tuple, list)) or len(shard) != 2:
                raise InputTypeError(f"shard: expected (rank, world_size), got {shard!r}")
            r, w = shard
            _distributed.shard_range(0, r, w)  # checks rank and world_size
            return int(r), int(w), False
        if not isinstance(distributed, bool):
            raise InputTypeError(f"distributed: expected a bool, got {type(distributed).__name__}")
        ctx = _distributed.context()
        if distributed and ctx.distributed:
            return ctx.rank, ctx.world_size, True
        return 0, 1, False

    def _conditions(self, B: int, lab: int | None, sources: list[str] | None) -> tuple[dict, dict]:
        cond: dict = {}
        uncond: dict = {}
        if lab is not None:
            cond["label"] = torch.full((B,), lab, dtype=torch.long, device=self.device)
            uncond["label"] = torch.full((B,), self.num_labels, dtype=torch.long, device=self.device)
        if sources is not None:
            train = self.config.get("train", {})
            src_len = int(train.get("src_len", 32))
            from .data import datasets

            src = datasets.pad(self.tokenizer.encode_batch(sources), src_len, self.tokenizer.pad_id).to(self.device)
            if train.get("conditioning", "concat") == "cross":
                mask = src != self.tokenizer.pad_id
                with torch.inference_mode():
                    cond["memory"] = self.model.encode(src, mask)
                cond["memory_mask"] = mask
            else:
                cond["cond_tokens"] = src
        return cond, uncond

    def decode(self, tokens: torch.Tensor) -> str:
        """Text of one generated row (special tokens dropped)."""
        return self.tokenizer.decode(tokens.tolist())

    def describe(self) -> dict:
        """What this checkpoint is, for ``fastdiff generate`` and ``fastdiff eval`` headers."""
        m = self.config.get("model", {})
        params = sum(p.numel() for p in self.model.parameters())
        return {"family": "continuous" if self.continuous else "discrete", "task": self.task,
                "process": self.config.get("process", {}), "params": params, "vocab_size": m.get("vocab_size"),
                "labels": self.label_names if self.num_labels else [], "step": self.checkpoint.step}

