"""Checkpoints: one directory per checkpoint, written atomically, verified when loaded.

Layout of ``<dir>/``::

    config.json        {"format": "fastdiff-checkpoint", "version": 1, "arch", "model": {...},
                        "process": {...}, "train": {...}, "tokenizer": {"file", "fingerprint"} | null, "step",
                        "files": {name: {"sha256", "bytes"}}, "checksum"}
    model.safetensors  the raw weights
    ema.safetensors    the EMA weights (when kept)
    tokenizer.json     a copy of the tokenizer (when there is one)
    process.safetensors the tensors the process is built from (a NearestNeighbor's embeddings, a Dense Q;
                       float64, exact), when it has any: config.json's ``process.tensors`` names them
    state.safetensors  resume state: optimizer moments, sampler history, adaptive-schedule losses ...
    state.json         resume state: step, data position, optimizer hyper-parameters, log accumulators ...

**Integrity.** ``files`` records the SHA-256 and size of every other file of the checkpoint and
``checksum`` the SHA-256 of config.json's own content (its canonical JSON without the ``checksum``
entry); both are verified whenever a file is read, so a flipped bit or a truncated file is refused
with an error naming the file. Checkpoints written before these entries existed (the bundled ones in
``fastdiff/assets``) load without the check. Weights holding NaN or inf are refused at save and at load
(naming the file and the tensor). No name read from a checkpoint (``latest``, the tokenizer's ``file``,
the ``files`` entries) may leave its directory: a name is one plain path component.

**Atomic writes.** A save writes everything into ``<dir>.tmp-<pid>`` (files fsynced, config.json
last) and then installs it: a new ``<dir>`` by one rename; an existing one by an atomic exchange of the
two directories (Linux ``renameat2(RENAME_EXCHANGE)``) after which the old contents are removed, so at
every instant ``<dir>`` is a complete checkpoint. Where the file system cannot exchange, a run
directory's ``latest`` is first pointed at the finished temporary directory, the old ``<dir>`` moved
aside, the new one renamed in and ``latest`` pointed back: ``latest`` names a complete checkpoint at
every instant (a reader that finds ``latest`` naming a ``<dir>.tmp-<pid>`` that has just been renamed
uses ``<dir>``). An existing ``<dir>`` is only ever replaced when it is empty or a checkpoint directory
(``config.json`` inside), never another directory. A run directory's ``latest`` file names its newest
checkpoint and is replaced atomically too.

**Leftovers.** A save killed half way leaves ``<name>.tmp-<pid>`` / ``<name>.old-<pid>`` entries; the next
save into the same directory, and a resume into it, remove those of processes that no longer run
(:func:`remove_stale_temporaries`), after completing an interrupted replacement ``latest`` points into.

**Finding a checkpoint.** :func:`resolve_checkpoint_dir` takes a checkpoint directory, or a run directory:
its ``latest`` (when that names a complete checkpoint), else its newest complete and verified
``step_<N>`` sub-directory. :func:`export_checkpoint` writes a small weights-only copy (fp16 by default).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# the layout's names are this module's API too (checkpoint.CONFIG_FILE, checkpoint.load_tensors, ...)
from .layout import (  # noqa: F401
    FORMAT, VERSION, CONFIG_FILE, MODEL_FILE, EMA_FILE, TOKENIZER_FILE, STATE_FILE, STATE_JSON, PROCESS_FILE,
    LATEST, CHECKPOINT_FILES, STEP_DIR, STALE, _SHA256, plain_name, _canonical, config_checksum,
    tensors_for_file, _check_finite, read_latest, _step_dirs, verify_checkpoint, newest_complete_checkpoint,
    resolve_checkpoint_dir, _corrupted, _read_json, _bad, _check_entries, _read_config_file, read_config,
    _manifest, has_file, _expected, _compare, _verified_bytes, _verify_file, load_tensors, _upcast,
    load_state_dict_checked, load_tokenizer, weights_file, load_process_tensors,
)
from .process import build_process
from ..errors import InputError, InputTypeError

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "export_checkpoint",
    "load_checkpoint",
    "load_process_tensors",
    "newest_complete_checkpoint",
    "read_config",
    "remove_stale_temporaries",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "verify_checkpoint",
    "write_latest",
]



def _test_point(name: str) -> None:
    """Called at the named points of a save (``written``, ``exchanged``, ``redirected``, ``moved-aside``,
    ``moved-in``, ``installed``, ``file:<name>``); does nothing. Crash tests replace it to kill the
    process at an exact point."""


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
def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` (fsynced); its manifest entry."""
    _test_point(f"file:{path.name}")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    import safetensors.torch as st

    return st.save(tensors_for_file(tensors))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    return _write_bytes(path, _tensor_bytes(tensors))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")


def _write_json(obj: Any, path: Path) -> dict[str, Any]:
    return _write_bytes(path, _json_bytes(obj))


def _save_tokenizer(tokenizer: Any, path: Path) -> dict[str, Any]:
    _test_point(f"file:{path.name}")
    tokenizer.save(path)
    with open(path, "rb") as f:  # hashed from what is on disk, fsynced
        data = f.read()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_latest(run_dir: str | os.PathLike, checkpoint_name: str) -> Path:
    """Point ``<run_dir>/latest`` at ``checkpoint_name`` (a sub-directory name), atomically."""
    if not plain_name(checkpoint_name):
        raise InputError(f"checkpoint_name: expected the name of a sub-directory of {run_dir}, got {checkpoint_name!r}")
    path = Path(run_dir) / LATEST
    _replace_file(path, checkpoint_name + "\n")
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # no cheap, harmless liveness probe: keep the entry
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _looks_like_ours(entry: Path, base: str) -> bool:
    """A leftover of a save: a directory of checkpoint files (possibly partial), or a ``latest`` /
    log file being replaced. Anything else with a similar name is left alone."""
    if entry.is_dir() and not entry.is_symlink():
        try:
            return all(p.name in CHECKPOINT_FILES and p.is_file() for p in entry.iterdir())
        except OSError:
            return False
    return base in (LATEST, "train_log.jsonl") and entry.is_file()


def _repair_latest(run_dir: Path) -> None:
    """Finish a replacement that a killed save left half done: ``latest`` naming ``<base>.tmp-<pid>``
    of a dead process is pointed back at ``<base>`` (renaming the staged directory there first if
    ``<base>`` is missing)."""
    try:
        name = read_latest(run_dir)
    except InputError:
        return
    m = STALE.fullmatch(name or "")
    if m is None or m["kind"] != "tmp" or _pid_alive(int(m["pid"])) or not plain_name(m["base"]):
        return
    staged, base = run_dir / name, run_dir / m["base"]
    if (staged / CONFIG_FILE).is_file() and not base.exists():
        os.replace(staged, base)
    if (base / CONFIG_FILE).is_file():
        write_latest(run_dir, base.name)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the ``<name>.tmp-<pid>`` / ``<name>.old-<pid>`` leftovers of saves killed half way in
    ``directory`` (only those of processes that no longer run, and only checkpoint-like entries); a
    replacement that ``latest`` points into is completed first. Returns what was removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    _repair_latest(d)
    removed = []
    for entry in sorted(d.iterdir()):
        m = STALE.fullmatch(entry.name)
        if m is None or _pid_alive(int(m["pid"])) or not _looks_like_ours(entry, m["base"]):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


_RENAMEAT2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    the file system cannot."""
    global _RENAMEAT2
    if not sys.platform.startswith("linux"):
        return False
    if _RENAMEAT2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _RENAMEAT2 = fn
        except (AttributeError, OSError):
            _RENAMEAT2 = False
    if not _RENAMEAT2:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def ensure_directory_target(path: str | os.PathLike, what: str) -> Path:
    """Check that ``path`` can be a directory: it is one, or it does not exist and its nearest existing
    ancestor is a writable directory. InputError naming ``what`` (the user's argument) otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what}: {p} is a file, not a directory")
    anc = p
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise InputError(f"{what}: cannot create {p}: {anc} is a file, not a directory")
    target = p if p.exists() else anc
    if target.exists() and not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"{what}: cannot write to {p}: {target} is not writable")
    return p


def check_replaceable(dst: str | os.PathLike, what: str = "path") -> Path:
    """A checkpoint may be written at ``dst`` only where nothing else would be lost: ``dst`` does not
    exist, is an empty directory, or is a checkpoint directory (``config.json`` inside)."""
    dst = ensure_directory_target(dst, what)
    if dst.is_dir() and not (dst / CONFIG_FILE).is_file():
        try:
            extra = sorted(p.name for p in dst.iterdir())
        except OSError as e:
            raise InputError(f"{what}: cannot read {dst} ({e.strerror})") from None
        if extra:
            shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
            raise InputError(f"{what}: {dst} is a directory that is not a checkpoint (it holds {shown}); "
                             "a checkpoint replaces only an empty directory or another checkpoint")
    return dst


def atomic_directory(dst: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and install the finished directory at ``dst`` (see the module docstring):
    atomically at every instant; an existing ``dst`` must be empty or a checkpoint directory.

    On an exception the temporary directory is removed and ``dst`` (old contents, if any) is untouched.
    """
    dst = check_replaceable(dst)
    parent = dst.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent)
    pid = os.getpid()
    tmp = parent / f"{dst.name}.tmp-{pid}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _test_point("written")
    if not dst.exists():
        os.replace(tmp, dst)
    elif _exchange(tmp, dst):  # tmp now holds the old checkpoint
        _test_point("exchanged")
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        try:
            redirect = read_latest(parent) == dst.name
        except InputError:  # a `latest` that is not ours (not text): nothing to redirect
            redirect = False
        if redirect:
            write_latest(parent, tmp.name)
            _test_point("redirected")
        old = parent / f"{dst.name}.old-{pid}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        _test_point("moved-aside")
        os.replace(tmp, dst)
        _test_point("moved-in")
        if redirect:
            write_latest(parent, dst.name)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)
    return dst


def _model_identity(model: nn.Module) -> tuple[str, dict]:
    arch = getattr(model, "arch", None)
    config_dict = getattr(model, "config_dict", None)
    if not isinstance(arch, str) or not callable(config_dict):
        raise InputTypeError(f"model: a checkpoint needs a fastdiff model (with .arch and .config_dict()), "
                        f"got {type(model).__name__}")
    return arch, dict(config_dict())


def _finish_config(config: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    config = dict(config)
    config.pop("checksum", None)
    config["files"] = dict(sorted(files.items()))
    config["checksum"] = config_checksum(config)
    return config


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, process: dict[str, Any],
                    process_tensors: dict[str, torch.Tensor] | None = None, train: dict[str, Any] | None = None,
                    tokenizer: Any = None, step: int = 0,
                    ema: dict[str, torch.Tensor] | None = None, state: dict[str, Any] | None = None,
                    state_tensors: dict[str, torch.Tensor] | None = None, update_latest: bool = False) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring).

    Parameters
    ----------
    model : a fastdiff model (``model.arch``, ``model.config_dict()``, e.g. from
        :func:`fastdiff.models.build_model`); its ``state_dict()`` goes to ``model.safetensors``.
    process : the process config (:func:`fastdiff.training.build_process`'s input).
    process_tensors : the tensors the process is built from (``process.safetensors``; omitted when empty).
    train : the training config (``TrainConfig.to_dict()``), stored for reference and resuming.
    tokenizer : a :class:`fastdiff.data.TextTokenizer` (copied as ``tokenizer.json``, fingerprint recorded).
    ema : EMA weights with the keys of ``model.state_dict()`` (``ema.safetensors``).
    state, state_tensors : resume state (``state.json``, ``state.safetensors``); omitted when None.
    update_latest : also point ``<parent>/latest`` at this checkpoint.

    ``path`` must not exist, or be an empty directory or a checkpoint (which is replaced). Weights or
    EMA weights holding NaN/inf are refused (InputError naming the tensor): they could not be loaded.
    """
    arch, model_cfg = _model_identity(model)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"step: expected a non-negative int, got {step!r}")
    weights = model.state_dict()
    _check_finite(weights, "model")
    if ema is not None:
        _check_finite(ema, "ema")
    if process_tensors:
        _check_finite(process_tensors, "process_tensors")
    config = {"format": FORMAT, "version": VERSION, "arch": arch, "model": model_cfg, "process": dict(process),
              "train": dict(train or {}), "tokenizer": None, "step": step}
    if tokenizer is not None:
        config["tokenizer"] = {"file": TOKENIZER_FILE, "fingerprint": tokenizer.fingerprint()}

    def write(tmp: Path) -> None:
        files = {MODEL_FILE: _save_tensors(weights, tmp / MODEL_FILE)}
        if ema is not None:
            files[EMA_FILE] = _save_tensors(ema, tmp / EMA_FILE)
        if tokenizer is not None:
            files[TOKENIZER_FILE] = _save_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        if process_tensors:
            files[PROCESS_FILE] = _save_tensors(process_tensors, tmp / PROCESS_FILE)
        if state_tensors is not None:
            files[STATE_FILE] = _save_tensors(state_tensors, tmp / STATE_FILE)
        if state is not None:
            files[STATE_JSON] = _write_json(state, tmp / STATE_JSON)
        _write_json(_finish_config(config, files), tmp / CONFIG_FILE)  # last: a directory with config.json is complete

    out = atomic_directory(path, write)
    if update_latest:
        _test_point("installed")
        write_latest(out.parent, out.name)
    return out


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", weights: str = "ema",
                    tokenizer: Any = None, model: nn.Module | None = None) -> Checkpoint:
    """Load a checkpoint directory (or a run directory's ``latest``) for inference.

    Parameters
    ----------
    weights : "ema" (the EMA weights when the checkpoint kept them, else the raw ones) or "raw".
    tokenizer : check this tokenizer against the checkpoint's fingerprint and use it instead of the copy.
    model : load the weights into this module (a custom model) instead of ``build_model(arch, config)``.

    Raises FileNotFoundError for a missing path or file, ValueError for a corrupted file (unparsable
    safetensors / JSON, a file whose SHA-256 does not match config.json's record, an entry of the wrong
    type), weights holding NaN/inf (naming the file and the tensor), a wrong format or version, a
    tokenizer fingerprint mismatch, or weights that do not fit the model. fp16/bf16 weights (an exported
    checkpoint) are upcast to float32.
    """
    if weights not in ("ema", "raw"):
        raise InputError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    d = resolve_checkpoint_dir(path)
    cfg = read_config(d)
    tok = load_tokenizer(d, cfg, tokenizer)
    file = weights_file(d, cfg, weights)
    tensors = _upcast(load_tensors(file, map_location, cfg, finite=True))
    if model is None:
        from ..models import build_model

        try:
            model = build_model(cfg["arch"], cfg["model"], saved=True)
        except (TypeError, ValueError) as e:
            raise InputError(f"checkpoint: {d / CONFIG_FILE}: cannot build the model: {e}") from None
    model.to(torch.device(map_location))
    load_state_dict_checked(model, tensors, file)
    model.eval()
    try:
        process = build_process(cfg["process"], load_process_tensors(d, cfg))
    except (TypeError, ValueError) as e:
        raise InputError(f"checkpoint: {d / CONFIG_FILE}: bad process config: {e}") from None
    return Checkpoint(model=model, config=cfg, tokenizer=tok, process=process, step=int(cfg["step"]), path=d)


def load_resume_state(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state.json, state.safetensors)`` of a checkpoint written by a Trainer (both verified)."""
    d = resolve_checkpoint_dir(path)
    cfg = read_config(d)
    if not has_file(d, cfg, STATE_JSON):
        raise InputError(f"path: {d} has no {STATE_JSON}: a weights-only (exported) checkpoint cannot be resumed")
    data = _verified_bytes(d, cfg, STATE_JSON)
    try:
        state = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupted(d / STATE_JSON, e) from None
    if not isinstance(state, dict):
        raise _bad(d / STATE_JSON, f"expected a JSON object, got {type(state).__name__}")
    tensors = load_tensors(d / STATE_FILE, map_location, cfg) if has_file(d, cfg, STATE_FILE) else {}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    _check_finite(optim, f"checkpoint: {d / STATE_FILE}")  # optimizer moments: NaN would poison the run
    return state, tensors


GENERATION_KEYS = {"temperature": (0.0, 1e30), "top_p": (0.0, 1.0), "steps": (1, 2**62)}


def check_generation(name: str, gen: object) -> dict:
    """A checkpoint's recommended sampling settings (``config.json``'s ``"generation"``, like a Hugging Face
    ``generation_config.json``): a dict of ``temperature`` (> 0), ``top_p`` in (0, 1], ``steps`` (>= 1)."""
    if not isinstance(gen, dict):
        raise InputTypeError(f"{name}: expected a dict of sampling defaults, got {type(gen).__name__}")
    unknown = sorted(set(gen) - set(GENERATION_KEYS))
    if unknown:
        raise InputError(f"{name}: unknown sampling defaults {unknown}; expected some of {sorted(GENERATION_KEYS)}")
    for key, v in gen.items():
        lo, hi = GENERATION_KEYS[key]
        integral = key == "steps"
        if isinstance(v, bool) or not isinstance(v, int if integral else (int, float)) \
                or not (lo < v <= hi if not integral else lo <= v <= hi) or v != v:
            raise InputError(f"{name}: {key} must be {'an integer' if integral else 'a number'} in "
                             f"{'[' if integral else '('}{lo}, {hi}], got {v!r}")
    return dict(gen)


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.float16,
                      weights: str = "ema", generation: dict | None = None) -> Path:
    """A small weights-only copy of ``src`` for shipping: one ``model.safetensors`` in ``dtype`` (floating
    tensors only), ``config.json`` (with an ``"export"`` entry and its own checksums) and
    ``tokenizer.json``; no optimizer or resume state. :func:`load_checkpoint` reads it (upcasting to
    float32). ``dst`` must not exist, or be an empty directory or a checkpoint (which is replaced).
    ``generation``: sampling defaults stored with it (:func:`check_generation`), which
    :class:`fastdiff.pipeline.TextDiffusion` uses where the caller sets nothing."""
    if weights not in ("ema", "raw"):
        raise InputError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    if generation is not None:
        generation = check_generation("generation", generation)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    d = resolve_checkpoint_dir(src)
    dst = Path(dst)
    if dst.exists() and os.path.samefile(dst, d):
        raise InputError(f"dst: {dst} is the checkpoint being exported ({d}); export to another directory")
    cfg = read_config(d)
    tok = load_tokenizer(d, cfg)
    process_tensors = load_process_tensors(d, cfg)  # kept exactly (float64)
    file = weights_file(d, cfg, weights)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in load_tensors(file, config=cfg, finite=True).items()}
    _check_finite(tensors, f"dtype: {dtype} cannot hold the weights of {file}")  # fp16 overflow
    cfg = {k: v for k, v in cfg.items() if k not in ("files", "checksum")}
    if tok is not None:
        cfg["tokenizer"] = dict(cfg["tokenizer"], file=TOKENIZER_FILE)
    cfg["export"] = {"dtype": str(dtype).removeprefix("torch."), "weights": file.stem.split(".")[0],
                     "from_step": cfg["step"]}
    if generation is not None:
        cfg["generation"] = generation

    def write(tmp: Path) -> None:
        files = {MODEL_FILE: _save_tensors(tensors, tmp / MODEL_FILE)}
        if tok is not None:
            files[TOKENIZER_FILE] = _save_tokenizer(tok, tmp / TOKENIZER_FILE)
        if process_tensors:
            files[PROCESS_FILE] = _save_tensors(process_tensors, tmp / PROCESS_FILE)
        _write_json(_finish_config(cfg, files), tmp / CONFIG_FILE)

    return atomic_directory(dst, write)
