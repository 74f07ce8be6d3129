"""The layout of a checkpoint directory and reading it safely: file names, the manifest of checksums in
``config.json``, verified reads of every file, and finding a checkpoint in a run directory (see
:mod:`fastdiff.training.checkpoint` for the layout and the guarantees; it writes, this module reads)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, InputTypeError

FORMAT = "fastdiff-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"
PROCESS_FILE = "process.safetensors"
LATEST = "latest"
#: the files a checkpoint directory may hold (what a save writes)
CHECKPOINT_FILES = (CONFIG_FILE, MODEL_FILE, EMA_FILE, TOKENIZER_FILE, STATE_FILE, STATE_JSON, PROCESS_FILE)
#: names of the default checkpoints of a run directory
STEP_DIR = re.compile(r"step_(\d+)")
#: a temporary entry of a save (``<base>.tmp-<pid>``) or a replaced checkpoint set aside (``<base>.old-<pid>``)
STALE = re.compile(r"(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# --- names ---------------------------------------------------------------------------------------
def plain_name(name: object) -> bool:
    """Whether ``name`` is one plain path component (no separator, not ``.``/``..``, not absolute)."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        return False
    if "/" in name or "\\" in name or "\0" in name or (os.altsep and os.altsep in name):
        return False
    return Path(name).name == name and not Path(name).is_absolute() and not Path(name).drive


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def config_checksum(cfg: dict[str, Any]) -> str:
    """SHA-256 of config.json's content without its ``checksum`` entry (canonical JSON)."""
    return hashlib.sha256(_canonical({k: v for k, v in cfg.items() if k != "checksum"})).hexdigest()


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


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise InputError(f"{what}: tensor {k!r} holds {bad} non-finite value(s) (NaN or inf)")


def read_latest(run_dir: str | os.PathLike) -> str | None:
    """The name ``<run_dir>/latest`` holds (stripped), or None when there is no such file."""
    path = Path(run_dir) / LATEST
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"path: {path} is not a text file naming a checkpoint directory") from None


# --- reading -------------------------------------------------------------------------------------
def _step_dirs(run_dir: Path) -> list[Path]:
    """``step_<N>`` sub-directories, newest (largest N) first."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return []
    found = [(int(m.group(1)), p) for p in entries if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda x: (x[0], x[1].name), reverse=True)]


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint directory completely: config.json (format, version, entries, checksum) and every
    file its ``files`` entry records (size and SHA-256). Returns the config; raises as :func:`read_config`
    and ValueError "corrupted checkpoint ..." naming the file that does not match."""
    d = Path(path)
    cfg = _read_config_file(d / CONFIG_FILE)
    for name in cfg.get("files") or {}:
        _verify_file(d, cfg, name)
    return cfg


def newest_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The ``step_<N>`` sub-directory of ``run_dir`` with the largest N that passes
    :func:`verify_checkpoint` (None when there is none); damaged ones are skipped with a warning."""
    for p in _step_dirs(Path(run_dir)):
        if not (p / CONFIG_FILE).is_file():
            continue
        try:
            verify_checkpoint(p)
        except (OSError, ValueError, TypeError) as e:
            warnings.warn(f"skipping the damaged checkpoint {p}: {e}", stacklevel=2)
            continue
        return p
    return None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory: the checkpoint its ``latest`` file names, else (no
    ``latest``, or one naming no complete checkpoint) its newest complete, verified ``step_<N>``
    sub-directory. Reads only; a ``latest`` naming anything but a sub-directory is refused."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path: no checkpoint at {p}")
    if not p.is_dir():
        raise InputError(f"path: {p} is a file; a checkpoint is a directory with {CONFIG_FILE}")
    if (p / CONFIG_FILE).exists():
        return p
    name = read_latest(p)
    if name is not None:
        if not plain_name(name):
            raise InputError(f"path: {p / LATEST} names {name!r}, which is not a sub-directory of {p}; "
                             "latest must hold the name of one of the run's checkpoint directories")
        if (p / name / CONFIG_FILE).is_file():
            return p / name
        m = STALE.fullmatch(name)  # a replacement was renamed into place between two reads
        if m is not None and plain_name(m["base"]) and (p / m["base"] / CONFIG_FILE).is_file():
            return p / m["base"]
    found = newest_complete_checkpoint(p)
    if found is not None:
        if name is not None:
            warnings.warn(f"{p / LATEST} names {name!r}, which is not a complete checkpoint; using the newest "
                          f"complete one, {found}", stacklevel=2)
        return found
    if name is not None:
        raise FileNotFoundError(f"path: {p / LATEST} names {name!r}, which is not a checkpoint in {p}, and {p} "
                                "holds no other complete checkpoint")
    raise FileNotFoundError(f"path: {p} holds neither {CONFIG_FILE} nor a {LATEST} pointer nor a complete "
                            "step_<N> checkpoint")


def _corrupted(file: Path, e: BaseException) -> InputError:
    return InputError(f"corrupted checkpoint: cannot read {file} ({type(e).__name__}: {e})")


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"path: missing {file}")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupted(file, e) from None


def _bad(file: Path, what: str) -> InputError:
    return InputError(f"corrupted checkpoint: {file}: {what}")


def _check_entries(cfg: dict[str, Any], file: Path) -> None:
    """The types of config.json's entries (a wrong type is a damaged or foreign file, not a crash later)."""
    for key in ("arch", "model", "process", "step"):
        if key not in cfg:
            raise InputError(f"corrupted checkpoint: {file} lacks the {key!r} entry")
    if not isinstance(cfg["arch"], str) or not cfg["arch"]:
        raise _bad(file, f"'arch' must be a model architecture name, got {cfg['arch']!r}")
    for key in ("model", "process", "train", "export"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise _bad(file, f"{key!r} must be a JSON object, got {type(cfg[key]).__name__}")
    step = cfg["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _bad(file, f"'step' must be a non-negative integer, got {step!r}")
    tok = cfg.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise _bad(file, f"'tokenizer' must be null or a JSON object, got {type(tok).__name__}")
        if "file" in tok and not plain_name(tok["file"]):
            raise _bad(file, f"'tokenizer.file' must name a file inside the checkpoint directory, got {tok['file']!r}")
        if tok.get("fingerprint") is not None and not isinstance(tok["fingerprint"], str):
            raise _bad(file, f"'tokenizer.fingerprint' must be a string, got {tok['fingerprint']!r}")
    files = cfg.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise _bad(file, f"'files' must be a JSON object, got {type(files).__name__}")
        for name, entry in files.items():
            if not plain_name(name) or name == CONFIG_FILE:
                raise _bad(file, f"'files' names {name!r}, which is not a file of the checkpoint directory")
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and _SHA256.fullmatch(entry["sha256"]) and isinstance(entry.get("bytes"), int)
                    and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0):
                raise _bad(file, f"'files'[{name!r}] must be {{\"sha256\": <64 hex digits>, \"bytes\": <int>}}, "
                                 f"got {entry!r}")
    if "checksum" in cfg:
        want = cfg["checksum"]
        if not isinstance(want, str) or config_checksum(cfg) != want:
            raise InputError(f"corrupted checkpoint: {file} does not match its recorded checksum (the file was "
                             "damaged or edited; a deliberate edit must also delete the \"checksum\" entry)")


def _read_config_file(file: Path) -> dict[str, Any]:
    cfg = _read_json(file)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise InputError(f"path: {file} is not a fastdiff checkpoint (format {got!r}, expected {FORMAT!r})")
    version = cfg.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise InputError(f"path: {file} has checkpoint version {version!r}; this fastdiff reads versions 1..{VERSION}")
    _check_entries(cfg, file)
    return cfg


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint (or run) directory, with its format, version, entry types and
    checksum checked (the other files are verified when they are read)."""
    d = resolve_checkpoint_dir(path)
    return _read_config_file(d / CONFIG_FILE)


def _manifest(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    files = cfg.get("files") if cfg is not None else None
    return files if isinstance(files, dict) else None


def has_file(d: Path, cfg: dict[str, Any], name: str) -> bool:
    """Whether the checkpoint holds ``name``: per its ``files`` record when it has one, else on disk."""
    files = _manifest(cfg)
    return name in files if files is not None else (d / name).is_file()


def _expected(d: Path, cfg: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """config.json's record of ``name`` (None for a checkpoint written before records existed)."""
    file = d / name
    if not file.is_file():
        raise FileNotFoundError(f"path: missing {file}")
    files = _manifest(cfg)
    if files is None:
        return None
    entry = files.get(name)
    if entry is None:
        raise InputError(f"corrupted checkpoint: {file} is not one of the files {d / CONFIG_FILE} records")
    return entry


def _compare(d: Path, name: str, entry: dict[str, Any], size: int, digest: str) -> None:
    file = d / name
    if size != entry["bytes"]:
        raise InputError(f"corrupted checkpoint: {file} has {size} bytes, {d / CONFIG_FILE} records "
                         f"{entry['bytes']} (truncated or replaced)")
    if digest != entry["sha256"]:
        raise InputError(f"corrupted checkpoint: {file}: SHA-256 {digest[:16]}... does not match the "
                         f"{entry['sha256'][:16]}... recorded in {d / CONFIG_FILE} (damaged file)")


def _verified_bytes(d: Path, cfg: dict[str, Any] | None, name: str) -> bytes:
    """The bytes of ``d/name`` (a small file), checked against config.json's ``files`` record."""
    entry = _expected(d, cfg, name)
    data = (d / name).read_bytes()
    if entry is not None:
        _compare(d, name, entry, len(data), hashlib.sha256(data).hexdigest())
    return data


def _verify_file(d: Path, cfg: dict[str, Any] | None, name: str) -> None:
    """Check ``d/name`` (read in chunks: a large weights file) against config.json's ``files`` record."""
    entry = _expected(d, cfg, name)
    if entry is None:
        return
    h, size = hashlib.sha256(), 0
    with open(d / name, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    _compare(d, name, entry, size, h.hexdigest())


def load_tensors(file: Path, map_location: str | torch.device = "cpu", config: dict[str, Any] | None = None,
                 finite: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file; ValueError "corrupted checkpoint ... <file>" when it cannot be parsed, or (with
    ``config``, its checkpoint's config.json) when it does not match the recorded checksum. ``finite``:
    also refuse floating tensors holding NaN/inf (naming the file and the tensor)."""
    import safetensors.torch as st

    file = Path(file)
    _verify_file(file.parent, config, file.name)
    try:
        tensors = st.load_file(str(file), device=str(torch.device(map_location)))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types (and OSError)
        raise _corrupted(file, e) from None
    if finite:
        _check_finite(tensors, f"checkpoint: {file}")
    return tensors


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
    if not isinstance(info, dict):
        raise _bad(d / CONFIG_FILE, f"'tokenizer' must be null or a JSON object, got {type(info).__name__}")
    expected = info.get("fingerprint")
    if tokenizer is None:
        from ..data import TextTokenizer

        name = info.get("file", TOKENIZER_FILE)
        if not plain_name(name):
            raise _bad(d / CONFIG_FILE, f"'tokenizer.file' must name a file inside the checkpoint directory, "
                                        f"got {name!r}")
        file = d / name
        if not file.is_file():
            raise FileNotFoundError(f"path: missing {file} (config.json names a tokenizer)")
        try:
            _verify_file(d, cfg, name)
            damaged = None
        except InputError as e:  # reported below, unless the file is another vocabulary altogether
            damaged = e
        try:
            tokenizer = TextTokenizer.load(file)
        except ValueError as e:
            raise InputError(f"corrupted checkpoint: {file}: {e}") from None
        if damaged is not None and (expected is None or tokenizer.fingerprint() == expected):
            raise damaged
        source = str(file)
    else:
        source = "the given tokenizer"
    got = tokenizer.fingerprint()
    if expected is not None and got != expected:
        raise InputError(f"tokenizer: fingerprint mismatch: {source} has {got}, the checkpoint {d} was trained "
                         f"with {expected}")
    return tokenizer


def weights_file(d: Path, cfg: dict[str, Any], weights: str) -> Path:
    """The weights a load reads: the EMA file for ``weights="ema"`` when the checkpoint kept it, else the raw."""
    return d / EMA_FILE if weights == "ema" and has_file(d, cfg, EMA_FILE) else d / MODEL_FILE


def load_process_tensors(d: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint's process (``process.safetensors``, verified; ``{}`` when it has none)."""
    if not has_file(d, cfg, PROCESS_FILE):
        return {}
    return load_tensors(d / PROCESS_FILE, config=cfg, finite=True)
