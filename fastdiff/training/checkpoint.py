"""Checkpoints: one directory per checkpoint, written atomically, loaded with clear errors.

Layout of ``<dir>/``::

    config.json        {"format": "fastdiff-checkpoint", "version": 1, "arch", "model": {...},
                        "process": {...}, "train": {...}, "tokenizer": {"file", "fingerprint"} | null, "step"}
    model.safetensors  the raw weights
    ema.safetensors    the EMA weights (when kept)
    tokenizer.json     a copy of the tokenizer (when there is one)
    state.safetensors  resume state: optimizer moments, sampler history, adaptive-schedule losses ...
    state.json         resume state: step, data position, optimizer hyper-parameters, log accumulators ...

A save writes everything into ``<dir>.tmp-<pid>`` and then renames it onto ``<dir>`` (an existing
``<dir>`` is first renamed aside and removed afterwards), so a crash never leaves a half-written
checkpoint under the final name. A run directory's ``latest`` file names its newest checkpoint and is
replaced atomically too. :func:`export_checkpoint` writes a small weights-only copy (fp16 by default).
"""

from __future__ import annotations

from ..errors import InputError, InputTypeError

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .process import build_process

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "export_checkpoint",
    "load_checkpoint",
    "read_config",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "write_latest",
]

FORMAT = "fastdiff-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``model`` (in eval mode), the full ``config`` dict (config.json), the
    ``tokenizer`` (:class:`fastdiff.data.TextTokenizer` or None), the diffusion ``process`` (built by
    :func:`fastdiff.training.build_process`), the training ``step`` and the directory ``path``."""

    model: nn.Module
    config: dict[str, Any]
    tokenizer: Any
    process: Any
    step: int
    path: Path | None = None


# --- writing -------------------------------------------------------------------------------------
def tensors_for_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; storage shared between entries (tied weights) is copied, as
    safetensors refuses shared tensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise InputTypeError(f"tensors[{k!r}]: expected a tensor, got {type(v).__name__}")
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.device.index or 0) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.to("cpu").contiguous()
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    import safetensors.torch as st

    st.save_file(tensors_for_file(tensors), str(path))


def _write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=1, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_latest(run_dir: str | os.PathLike, checkpoint_name: str) -> Path:
    """Point ``<run_dir>/latest`` at ``checkpoint_name`` (a sub-directory name), atomically."""
    path = Path(run_dir) / LATEST
    _replace_file(path, checkpoint_name + "\n")
    return path


def atomic_directory(dst: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and move the finished directory onto ``dst``.

    On an exception the temporary directory is removed and ``dst`` (old contents, if any) is untouched.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def _model_identity(model: nn.Module) -> tuple[str, dict]:
    arch = getattr(model, "arch", None)
    config_dict = getattr(model, "config_dict", None)
    if not isinstance(arch, str) or not callable(config_dict):
        raise InputTypeError(f"model: a checkpoint needs a fastdiff model (with .arch and .config_dict()), "
                        f"got {type(model).__name__}")
    return arch, dict(config_dict())


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, process: dict[str, Any],
                    train: dict[str, Any] | None = None, tokenizer: Any = None, step: int = 0,
                    ema: dict[str, torch.Tensor] | None = None, state: dict[str, Any] | None = None,
                    state_tensors: dict[str, torch.Tensor] | None = None, update_latest: bool = False) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring).

    Parameters
    ----------
    model : a fastdiff model (``model.arch``, ``model.config_dict()``, e.g. from
        :func:`fastdiff.models.build_model`); its ``state_dict()`` goes to ``model.safetensors``.
    process : the process config (:func:`fastdiff.training.build_process`'s input).
    train : the training config (``TrainConfig.to_dict()``), stored for reference and resuming.
    tokenizer : a :class:`fastdiff.data.TextTokenizer` (copied as ``tokenizer.json``, fingerprint recorded).
    ema : EMA weights with the keys of ``model.state_dict()`` (``ema.safetensors``).
    state, state_tensors : resume state (``state.json``, ``state.safetensors``); omitted when None.
    update_latest : also point ``<parent>/latest`` at this checkpoint.
    """
    arch, model_cfg = _model_identity(model)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"step: expected a non-negative int, got {step!r}")
    config = {"format": FORMAT, "version": VERSION, "arch": arch, "model": model_cfg, "process": dict(process),
              "train": dict(train or {}), "tokenizer": None, "step": step}
    if tokenizer is not None:
        config["tokenizer"] = {"file": TOKENIZER_FILE, "fingerprint": tokenizer.fingerprint()}

    def write(tmp: Path) -> None:
        _save_tensors(model.state_dict(), tmp / MODEL_FILE)
        if ema is not None:
            _save_tensors(ema, tmp / EMA_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        if state_tensors is not None:
            _save_tensors(state_tensors, tmp / STATE_FILE)
        if state is not None:
            _write_json(state, tmp / STATE_JSON)
        _write_json(config, tmp / CONFIG_FILE)  # last: a directory with config.json is complete

    out = atomic_directory(path, write)
    if update_latest:
        write_latest(out.parent, out.name)
    return out


# --- reading -------------------------------------------------------------------------------------
def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` file names one."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: no checkpoint at {p}")
    if not p.is_dir():
        raise InputError(f"path: {p} is a file; a checkpoint is a directory with {CONFIG_FILE}")
    if (p / CONFIG_FILE).exists():
        return p
    if (p / LATEST).exists():
        name = (p / LATEST).read_text(encoding="utf-8").strip()
        target = p / name
        if not name or not (target / CONFIG_FILE).exists():
            raise FileNotFoundError(f"path: {p / LATEST} names {name!r}, which is not a checkpoint in {p}")
        return target
    raise FileNotFoundError(f"path: {p} holds neither {CONFIG_FILE} nor a {LATEST} pointer")


def _corrupted(file: Path, e: BaseException) -> ValueError:
    return ValueError(f"corrupted checkpoint: cannot read {file} ({type(e).__name__}: {e})")


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"path: missing {file}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupted(file, e) from None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint (or run) directory, with its format and version checked."""
    d = resolve_checkpoint_dir(path)
    file = d / CONFIG_FILE
    cfg = _read_json(file)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise InputError(f"path: {file} is not a fastdiff checkpoint (format {got!r}, expected {FORMAT!r})")
    version = cfg.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise InputError(f"path: {file} has checkpoint version {version!r}; this fastdiff reads versions 1..{VERSION}")
    for key in ("arch", "model", "process", "step"):
        if key not in cfg:
            raise InputError(f"corrupted checkpoint: {file} lacks the {key!r} entry")
    return cfg


def load_tensors(file: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file; ValueError "corrupted checkpoint ... <file>" when it cannot be parsed."""
    import safetensors.torch as st

    if not file.is_file():
        raise FileNotFoundError(f"path: missing {file}")
    try:
        return st.load_file(str(file), device=str(torch.device(map_location)))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types (and OSError)
        raise _corrupted(file, e) from None


def _upcast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in tensors.items()}


def load_state_dict_checked(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """``model.load_state_dict`` with ValueErrors listing missing / unexpected / mis-shaped weights."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(f"checkpoint: {file} does not match the model: missing weights {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected weights {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise InputError(f"checkpoint: {file}: weight {k!r} has shape {tuple(v.shape)}, "
                             f"the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=True)


def load_tokenizer(d: Path, cfg: dict[str, Any], tokenizer: Any = None) -> Any:
    """The checkpoint's tokenizer (or the given one), its fingerprint checked against config.json."""
    info = cfg.get("tokenizer")
    if info is None:
        return tokenizer
    expected = info.get("fingerprint") if isinstance(info, dict) else None
    if tokenizer is None:
        from ..data import TextTokenizer

        file = d / (info.get("file") or TOKENIZER_FILE)
        if not file.is_file():
            raise FileNotFoundError(f"path: missing {file} (config.json names a tokenizer)")
        try:
            tokenizer = TextTokenizer.load(file)
        except ValueError as e:
            raise InputError(f"corrupted checkpoint: {file}: {e}") from None
        source = str(file)
    else:
        source = "the given tokenizer"
    got = tokenizer.fingerprint()
    if expected is not None and got != expected:
        raise InputError(f"tokenizer: fingerprint mismatch: {source} has {got}, the checkpoint {d} was trained "
                         f"with {expected}")
    return tokenizer


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", weights: str = "ema",
                    tokenizer: Any = None, model: nn.Module | None = None) -> Checkpoint:
    """Load a checkpoint directory (or a run directory's ``latest``) for inference.

    Parameters
    ----------
    weights : "ema" (the EMA weights when the checkpoint kept them, else the raw ones) or "raw".
    tokenizer : check this tokenizer against the checkpoint's fingerprint and use it instead of the copy.
    model : load the weights into this module (a custom model) instead of ``build_model(arch, config)``.

    Raises FileNotFoundError for a missing path or file, ValueError for a corrupted file (unparsable
    safetensors / JSON), a wrong format or version, a tokenizer fingerprint mismatch, or weights that do
    not fit the model. fp16/bf16 weights (an exported checkpoint) are upcast to float32.
    """
    if weights not in ("ema", "raw"):
        raise InputError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    d = resolve_checkpoint_dir(path)
    cfg = read_config(d)
    tok = load_tokenizer(d, cfg, tokenizer)
    file = d / EMA_FILE if weights == "ema" and (d / EMA_FILE).is_file() else d / MODEL_FILE
    tensors = _upcast(load_tensors(file, map_location))
    if model is None:
        from ..models import build_model

        try:
            model = build_model(cfg["arch"], cfg["model"])
        except (TypeError, ValueError) as e:
            raise InputError(f"checkpoint: {d / CONFIG_FILE}: cannot build the model: {e}") from None
    model.to(torch.device(map_location))
    load_state_dict_checked(model, tensors, file)
    model.eval()
    try:
        process = build_process(cfg["process"])
    except (TypeError, ValueError) as e:
        raise InputError(f"checkpoint: {d / CONFIG_FILE}: bad process config: {e}") from None
    return Checkpoint(model=model, config=cfg, tokenizer=tok, process=process, step=int(cfg["step"]), path=d)


def load_resume_state(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state.json, state.safetensors)`` of a checkpoint written by a Trainer."""
    d = resolve_checkpoint_dir(path)
    if not (d / STATE_JSON).is_file():
        raise InputError(f"path: {d} has no {STATE_JSON}: a weights-only (exported) checkpoint cannot be resumed")
    state = _read_json(d / STATE_JSON)
    tensors = load_tensors(d / STATE_FILE, map_location) if (d / STATE_FILE).is_file() else {}
    return state, tensors


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.float16,
                      weights: str = "ema") -> Path:
    """A small weights-only copy of ``src`` for shipping: one ``model.safetensors`` in ``dtype`` (floating
    tensors only), ``config.json`` (with an ``"export"`` entry) and ``tokenizer.json``; no optimizer or
    resume state. :func:`load_checkpoint` reads it (upcasting to float32)."""
    if weights not in ("ema", "raw"):
        raise InputError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    d = resolve_checkpoint_dir(src)
    cfg = read_config(d)
    tok = load_tokenizer(d, cfg)
    file = d / EMA_FILE if weights == "ema" and (d / EMA_FILE).is_file() else d / MODEL_FILE
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_tensors(file).items()}
    cfg = dict(cfg)
    cfg["export"] = {"dtype": str(dtype).removeprefix("torch."), "weights": file.stem.split(".")[0],
                     "from_step": cfg["step"]}

    def write(tmp: Path) -> None:
        _save_tensors(tensors, tmp / MODEL_FILE)
        if tok is not None:
            tok.save(tmp / TOKENIZER_FILE)
        _write_json(cfg, tmp / CONFIG_FILE)

    return atomic_directory(dst, write)
