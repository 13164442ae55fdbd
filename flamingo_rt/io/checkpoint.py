"""Safetensors checkpoints for any ``nn.Module`` (or plain state dict).

Layout of a checkpoint folder (Hugging Face compatible)::

    config.json                              model configuration (optional)
    model.safetensors                        all tensors, when they fit in one shard
    model-00001-of-00003.safetensors ...     or shards of at most ``max_shard_bytes`` each
    model.safetensors.index.json             {"metadata": {"total_size": N, ...},
                                              "weight_map": {tensor name: shard file}}

Guarantees:

* Every file is written atomically: into a temporary file in the same folder, flushed,
  ``fsync``-ed, then ``os.replace``-d over its final name; the folder is ``fsync``-ed after.
  All weight files of one save are fully written before any file of the previous save is
  touched, so an interrupted save leaves either the previous checkpoint or the new one
  loadable (the only window in which neither is, is the handful of renames in between; the
  loader then raises :class:`CheckpointError` instead of mixing the two saves).
* Tensors that are the same memory (tied weights, e.g. ``lm_head.weight is
  embed_tokens.weight``) are stored once; the other names are recorded as aliases (in the
  ``__metadata__`` of the safetensors file and in the index) and restored on load as the
  *same* tensor object. Tensors that merely overlap (different views of one storage) are
  stored as independent copies.
* Non-contiguous tensors, tensors on any device and any dtype safetensors knows
  (float64/32/16, bfloat16, float8, int8..64, uint8..64, bool, complex64) round trip bitwise.
* Reading never unpickles anything and never memory-maps: the header is parsed and checked
  by this module (lengths, offsets, dtypes, shapes) before any tensor is read, and every
  problem -- a file cut short, a garbage header, an index naming a missing shard -- raises
  :class:`CheckpointError` naming the file and what is wrong.
* A later save into the same folder removes the shards, index or single file of an earlier
  save that it does not overwrite, so stale files cannot leak into a load.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_state_dict",
    "load_checkpoint",
    "load_metadata",
    "save_config",
    "load_config",
    "atomic_write_bytes",
    "SINGLE_FILE",
    "INDEX_FILE",
    "CONFIG_FILE",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")

# Keys of our own in the safetensors ``__metadata__`` / index ``metadata``.
_ALIASES_KEY = "flamingo_rt.aliases"
_SAVE_ID_KEY = "flamingo_rt.save_id"
_RESERVED_PREFIX = "flamingo_rt."

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors reference reader uses
_LIST_LIMIT = 10  # names shown per category in mismatch messages


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupted, or does not match the model.

    Attributes (empty when not applicable):
        path: the file or folder concerned, or None.
        missing_keys: names the model has and the checkpoint lacks.
        unexpected_keys: names the checkpoint has and the model lacks.
        mismatched_shapes: ``{name: (expected shape, received shape)}``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Optional[PathLike] = None,
        missing_keys: Optional[List[str]] = None,
        unexpected_keys: Optional[List[str]] = None,
        mismatched_shapes: Optional[Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]] = None,
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.missing_keys = list(missing_keys or [])
        self.unexpected_keys = list(unexpected_keys or [])
        self.mismatched_shapes = dict(mismatched_shapes or {})


# --------------------------------------------------------------------------------------
# dtypes

_DTYPE_TO_ST: Dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _tname, _st in (
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", "F8_E8M0"),
):
    if hasattr(torch, _tname):
        _DTYPE_TO_ST[getattr(torch, _tname)] = _st
_ST_TO_DTYPE: Dict[str, torch.dtype] = {v: k for k, v in _DTYPE_TO_ST.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ST_ITEMSIZE: Dict[str, int] = {st: _itemsize(dt) for dt, st in _DTYPE_TO_ST.items()}


# --------------------------------------------------------------------------------------
# atomic files


def _umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 elsewhere."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(folder: Path, final_name: str, write_fn: Callable[[BinaryIO], None]) -> Path:
    """Write a complete, fsync-ed temporary file next to ``final_name``; return its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _atomic_write(path: Path, write_fn: Callable[[BinaryIO], None]) -> None:
    tmp = _write_temp(path.parent, path.name, write_fn)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Creates the parent folder if needed. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(data))
    return path


# --------------------------------------------------------------------------------------
# configs


def _config_to_dict(config: Any) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict") and callable(config.to_dict):
        d = config.to_dict()
        if not isinstance(d, Mapping):
            raise TypeError(f"config.to_dict() must return a dict, got {type(d).__name__}")
        return dict(d)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    raise TypeError(
        f"expected config as a dict, a dataclass or an object with to_dict(), "
        f"got {type(config).__name__}"
    )


def _config_bytes(config: Any) -> bytes:
    d = _config_to_dict(config)
    try:
        text = json.dumps(d, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"config is not JSON-serializable: {e}") from e
    return (text + "\n").encode("utf-8")


def save_config(folder: PathLike, config: Any) -> Path:
    """Write ``config`` (a dict, dataclass or object with ``to_dict()``) as
    ``folder/config.json``, atomically. Creates the folder. Returns the path written."""
    folder = Path(folder)
    data = _config_bytes(config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    _atomic_write(path, lambda f: f.write(data))
    return path


def load_config(folder: PathLike) -> Dict[str, Any]:
    """Read ``folder/config.json`` (or the JSON file ``folder`` itself) as a dict.

    Raises:
        CheckpointError: the file is missing, unreadable or not a JSON object.
    """
    path = Path(folder)
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = (f"{folder}: no such model folder or config file" if not Path(folder).exists()
                 else f"{path}: no such config file")
        raise CheckpointError(f"{where} (expected a model folder written by save_pretrained, with "
                              f"{CONFIG_FILE})", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config: {e}", path=path) from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: config is not valid JSON: {e}", path=path) from None
    if not isinstance(d, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object in the config, got {type(d).__name__}", path=path
        )
    return d


# --------------------------------------------------------------------------------------
# writing


def _alias_key(t: torch.Tensor) -> Optional[tuple]:
    """Hashable identity of a tensor's memory; None for tensors that cannot alias."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (str(t.device), t.dtype, tuple(t.shape), t.stride(), t.data_ptr())


def _find_aliases(tensors: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """``{alias: canonical}`` for names whose tensor is the same memory as an earlier name."""
    first: Dict[tuple, str] = {}
    aliases: Dict[str, str] = {}
    for name, t in tensors.items():
        key = _alias_key(t)
        if key is None:
            continue
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _as_state_dict(model_or_state_dict: Any) -> Dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        sd = model_or_state_dict.state_dict(keep_vars=True)
    elif isinstance(model_or_state_dict, Mapping):
        sd = model_or_state_dict
    else:
        raise TypeError(
            f"expected an nn.Module or a mapping of name -> tensor, "
            f"got {type(model_or_state_dict).__name__}"
        )
    out: Dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"state dict keys must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"state dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                f"safetensors stores tensors only"
            )
        if t.layout != torch.strided:
            raise TypeError(f"tensor {name!r} has layout {t.layout}; only dense tensors are saved")
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        if t.dtype not in _DTYPE_TO_ST:
            raise TypeError(
                f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store; "
                f"supported: {sorted(str(d) for d in _DTYPE_TO_ST)}"
            )
        out[name] = t.detach()
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shard_plan(names: List[str], tensors: Mapping[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = []
    cur: List[str] = []
    cur_bytes = 0
    for name in names:
        n = _nbytes(tensors[name])
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _tensor_writer(names: List[str], tensors: Mapping[str, torch.Tensor], metadata: Dict[str, str]):
    """A function that writes one safetensors file holding ``names`` to a binary file."""
    # Largest element size first (then by name), so every tensor's data is aligned to its
    # element size for readers that memory-map the file.
    order = sorted(names, key=lambda n: (-tensors[n].element_size(), n))
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        n = _nbytes(t)
        header[name] = {
            "dtype": _DTYPE_TO_ST[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # data section starts 8-byte aligned

    def write(f: BinaryIO) -> None:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for name in order:
            t = tensors[name]
            if t.numel() == 0:
                continue
            t = t.to("cpu").contiguous()  # one tensor at a time: bounded extra memory
            n = _nbytes(t)
            buf = (ctypes.c_char * n).from_address(t.data_ptr())
            view = memoryview(buf).cast("B")
            chunk = 1 << 26
            for start in range(0, n, chunk):
                f.write(view[start:start + chunk])
            del view, buf, t

    return write


def _clean_metadata(metadata: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata keys must be strings, got {k!r}")
        if k.startswith(_RESERVED_PREFIX) or k in ("format", "total_size"):
            raise ValueError(f"metadata key {k!r} is reserved")
        out[k] = v if isinstance(v, str) else json.dumps(v)
    return out


def save_checkpoint(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    folder: PathLike,
    *,
    config: Optional[Any] = None,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: Optional[Mapping[str, Any]] = None,
) -> List[Path]:
    """Save a module's state dict (or a state dict) as safetensors into ``folder``.

    Args:
        model_or_state_dict: an ``nn.Module`` (its ``state_dict()``: parameters and
            persistent buffers) or a mapping ``name -> Tensor`` (any device, any layout
            strides, dtypes as in the module docstring).
        folder: the checkpoint folder; created if needed.
        config: written as ``config.json`` (dict, dataclass, or object with
            ``to_dict()``). Defaults to ``model.config.to_dict()`` when the model has one.
        max_shard_bytes: when the stored tensors total more than this, they are split over
            ``model-0000i-of-0000N.safetensors`` files of at most this size each (a
            single larger tensor gets a shard of its own) plus
            ``model.safetensors.index.json``; otherwise one ``model.safetensors``.
        metadata: extra ``str -> str`` entries for the safetensors ``__metadata__`` of every
            file (and the index); non-string values are JSON-encoded.

    Returns:
        The files written: weight files, then the index (if sharded), then config.json.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"expected max_shard_bytes a positive int, got {max_shard_bytes!r}")
    if config is None and isinstance(model_or_state_dict, nn.Module):
        cfg = getattr(model_or_state_dict, "config", None)
        if cfg is not None and callable(getattr(cfg, "to_dict", None)):
            config = cfg
    config_data = _config_bytes(config) if config is not None else None
    user_meta = _clean_metadata(metadata)

    tensors = _as_state_dict(model_or_state_dict)
    aliases = _find_aliases(tensors)
    stored = {n: t for n, t in tensors.items() if n not in aliases}
    names = list(stored)
    total_size = sum(_nbytes(t) for t in stored.values())

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex

    if total_size > max_shard_bytes:
        groups = _shard_plan(names, stored, max_shard_bytes)
    else:
        groups = [names]
    sharded = len(groups) > 1
    if sharded:
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    else:
        files = [SINGLE_FILE]
    where = {n: files[i] for i, group in enumerate(groups) for n in group}

    # Phase 1: every weight file fully written (and fsync-ed) under a temporary name.
    temps: List[Tuple[Path, Path]] = []
    try:
        for fname, group in zip(files, groups):
            in_group = set(group)
            meta = {"format": "pt", **user_meta, _SAVE_ID_KEY: save_id}
            local_aliases = {a: c for a, c in aliases.items() if c in in_group}
            if local_aliases:
                meta[_ALIASES_KEY] = json.dumps(local_aliases)
            writer = _tensor_writer(group, stored, meta)
            temps.append((_write_temp(folder, fname, writer), folder / fname))
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise

    # Phase 2: retire the old entry point, move the new files in, write the new entry point.
    index_path = folder / INDEX_FILE
    written: List[Path] = []
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(index_path)
        _fsync_dir(folder)
        for tmp, final in temps:
            os.replace(tmp, final)
            written.append(final)
        temps = []
        _fsync_dir(folder)
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    if sharded:
        index = {
            "metadata": {
                **user_meta,
                "total_size": total_size,
                "format": "pt",
                _SAVE_ID_KEY: save_id,
                _ALIASES_KEY: aliases,
            },
            "weight_map": {n: where[n] for n in names},
        }
        data = (json.dumps(index, indent=2) + "\n").encode("utf-8")
        _atomic_write(index_path, lambda f: f.write(data))
        written.append(index_path)

    # Remove what an earlier save left that this one did not overwrite.
    keep = set(files)
    stale = [p for p in folder.iterdir() if _SHARD_RE.match(p.name) and p.name not in keep]
    if sharded and (folder / SINGLE_FILE).exists():
        stale.append(folder / SINGLE_FILE)
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    if stale:
        _fsync_dir(folder)

    if config_data is not None:
        cpath = folder / CONFIG_FILE
        _atomic_write(cpath, lambda f: f.write(config_data))
        written.append(cpath)
    return written


# --------------------------------------------------------------------------------------
# reading


def _fmt_shape(shape) -> str:
    shape = tuple(shape)
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class _Header:
    """The checked header of one safetensors file."""

    def __init__(self, path: Path, data_start: int, entries: Dict[str, dict], metadata: Dict[str, str]):
        self.path = path
        self.data_start = data_start
        self.entries = entries  # name -> {"dtype": torch.dtype, "shape": tuple, "begin": int, "end": int}
        self.metadata = metadata


def _read_header(path: Path) -> _Header:
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}", path=path)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise fail(
                    f"file is {size} bytes, too short to hold a safetensors header "
                    f"(file truncated, or not a safetensors file)"
                )
            hlen = int.from_bytes(head, "little")
            if hlen > _MAX_HEADER_BYTES:
                raise fail(
                    f"corrupted header: the length field says the header is {hlen} bytes "
                    f"(more than the {_MAX_HEADER_BYTES} allowed; not a safetensors file?)"
                )
            if 8 + hlen > size:
                raise fail(
                    f"file truncated: the header is {hlen} bytes but only {size - 8} bytes "
                    f"follow the length field (file is {size} bytes)"
                )
            raw = f.read(hlen)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file", path=path) from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file", path=path) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e}", path=path) from None
    if len(raw) != hlen:
        raise fail(f"file truncated while reading the {hlen}-byte header (got {len(raw)} bytes)")

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"corrupted header: not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail(f"corrupted header: expected a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail("corrupted header: __metadata__ must map strings to strings")

    data_size = size - 8 - hlen
    entries: Dict[str, dict] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise fail(
                f"corrupted header: entry {name!r} must be an object with dtype, shape and "
                f"data_offsets, got {str(e)[:200]}"
            )
        st = e["dtype"]
        if st not in _ST_TO_DTYPE:
            raise fail(
                f"tensor {name!r} has dtype {st!r}, which is not supported "
                f"(known: {sorted(_ST_TO_DTYPE)})"
            )
        shape = e["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise fail(f"corrupted header: tensor {name!r} has invalid shape {shape!r}")
        offs = e["data_offsets"]
        if (
            not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
            or offs[1] < offs[0]
        ):
            raise fail(f"corrupted header: tensor {name!r} has invalid data_offsets {offs!r}")
        expected = math.prod(shape) * _ST_ITEMSIZE[st]
        if offs[1] - offs[0] != expected:
            raise fail(
                f"corrupted header: tensor {name!r} ({st}, shape {_fmt_shape(shape)}) needs "
                f"{expected} bytes but its data_offsets {offs} span {offs[1] - offs[0]}"
            )
        entries[name] = {
            "dtype": _ST_TO_DTYPE[st], "shape": tuple(shape), "begin": offs[0], "end": offs[1]
        }

    # The tensors must tile the data section exactly: no gaps, no overlaps, nothing missing.
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1]["begin"], kv[1]["end"])):
        if e["begin"] != pos:
            what = "overlaps the previous tensor" if e["begin"] < pos else "leaves a gap before it"
            raise fail(f"corrupted header: tensor {name!r} starts at data byte {e['begin']}, {what} (expected {pos})")
        pos = e["end"]
    if pos > data_size:
        last = max(entries, key=lambda n: entries[n]["end"])
        raise fail(
            f"file truncated: tensor {last!r} ends at data byte {pos} but the file holds only "
            f"{data_size} bytes of tensor data (file is {size} bytes; cut short?)"
        )
    if pos < data_size:
        raise fail(
            f"corrupted file: {data_size - pos} unexpected trailing bytes after the last tensor "
            f"(tensor data ends at byte {pos} of {data_size})"
        )
    return _Header(path, 8 + hlen, entries, metadata)


def _read_tensors(
    hdr: _Header, names: List[str], device: Union[str, torch.device], dtype: Optional[torch.dtype]
) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    try:
        with open(hdr.path, "rb") as f:
            for name in sorted(names, key=lambda n: hdr.entries[n]["begin"]):
                e = hdr.entries[name]
                n = e["end"] - e["begin"]
                if n == 0:
                    t = torch.empty(e["shape"], dtype=e["dtype"])
                else:
                    buf = torch.empty(n, dtype=torch.uint8)
                    f.seek(hdr.data_start + e["begin"])
                    view = memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")
                    got = 0
                    while got < n:
                        r = f.readinto(view[got:])
                        if not r:
                            raise CheckpointError(
                                f"{hdr.path}: file truncated while reading tensor {name!r} "
                                f"(got {got} of {n} bytes)",
                                path=hdr.path,
                            )
                        got += r
                    del view
                    t = buf.view(e["dtype"]).reshape(e["shape"])
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[name] = t.to(device)
    except OSError as err:
        raise CheckpointError(f"{hdr.path}: cannot read file: {err}", path=hdr.path) from None
    return out


def _parse_aliases(raw: Any, source: Path) -> Dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: corrupted alias record ({e})", path=source) from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise CheckpointError(f"{source}: corrupted alias record: expected a name -> name map", path=source)
    return raw


def _apply_aliases(sd: Dict[str, torch.Tensor], aliases: Dict[str, str], source: Path) -> None:
    for alias, canonical in aliases.items():
        if alias in sd:
            raise CheckpointError(
                f"{source}: {alias!r} is recorded both as a stored tensor and as an alias of "
                f"{canonical!r}", path=source,
            )
        if canonical not in sd:
            raise CheckpointError(
                f"{source}: alias {alias!r} refers to {canonical!r}, which the checkpoint does "
                f"not contain", path=source,
            )
    for alias, canonical in aliases.items():
        sd[alias] = sd[canonical]


def _resolve(folder_or_file: PathLike) -> Tuple[str, Path]:
    """("file", path) or ("index", path) for what should be loaded."""
    p = Path(folder_or_file)
    if p.is_file():
        if p.name.endswith(".index.json"):
            return "index", p
        return "file", p
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or folder", path=p)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a regular file or folder", path=p)
    if (p / INDEX_FILE).is_file():
        return "index", p / INDEX_FILE
    if (p / SINGLE_FILE).is_file():
        return "file", p / SINGLE_FILE
    candidates = sorted(q.name for q in p.glob("*.safetensors") if q.is_file() and not q.name.startswith("."))
    plain = [c for c in candidates if not _SHARD_RE.match(c)]
    if len(plain) == 1 and len(candidates) == 1:
        return "file", p / plain[0]
    present = sorted(q.name for q in p.iterdir() if not q.name.startswith("."))
    shown = ", ".join(present[:_LIST_LIMIT]) + (f", ... ({len(present)} in all)" if len(present) > _LIST_LIMIT else "")
    hint = ""
    if any(_SHARD_RE.match(c) for c in candidates):
        hint = (f"; it has shard files but no {INDEX_FILE} (was a save interrupted, or the "
                f"index deleted?)")
    elif len(candidates) > 1:
        hint = "; it has several .safetensors files, pass the one to load"
    raise CheckpointError(
        f"{p}: no checkpoint found: expected {SINGLE_FILE} or {INDEX_FILE} "
        f"(folder holds: {shown or 'nothing'}){hint}",
        path=p,
    )


def _safe_shard_name(name: Any, index_path: Path) -> str:
    if (
        not isinstance(name, str) or not name or name in (".", "..")
        or "/" in name or "\\" in name or os.sep in name
    ):
        raise CheckpointError(
            f"{index_path}: invalid shard file name {name!r} in weight_map "
            f"(expected a plain file name in the same folder)",
            path=index_path,
        )
    return name


def _load_index(index_path: Path, device, dtype) -> Dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: cannot read index: {e}", path=index_path) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: index is not valid JSON ({e})", path=index_path) from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(
            f"{index_path}: corrupted index: expected an object with a 'weight_map' object",
            path=index_path,
        )
    meta = index.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{index_path}: corrupted index: 'metadata' must be an object", path=index_path)
    weight_map: Dict[str, str] = {}
    for k, v in index["weight_map"].items():
        weight_map[k] = _safe_shard_name(v, index_path)

    folder = index_path.parent
    by_file: Dict[str, List[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    missing_files = [f for f in by_file if not (folder / f).is_file()]
    if missing_files:
        shown = ", ".join(missing_files[:_LIST_LIMIT])
        more = f" (and {len(missing_files) - _LIST_LIMIT} more)" if len(missing_files) > _LIST_LIMIT else ""
        raise CheckpointError(
            f"{index_path}: the index names {len(missing_files)} shard file(s) that do not exist "
            f"in {folder}: {shown}{more}",
            path=index_path,
        )

    index_save_id = meta.get(_SAVE_ID_KEY)
    aliases = _parse_aliases(meta.get(_ALIASES_KEY), index_path)
    sd: Dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        hdr = _read_header(folder / fname)
        absent = [n for n in names if n not in hdr.entries]
        if absent:
            shown = ", ".join(repr(n) for n in absent[:_LIST_LIMIT])
            raise CheckpointError(
                f"{index_path}: the index places {len(absent)} tensor(s) in {fname}, which does "
                f"not contain them: {shown}" + (" ..." if len(absent) > _LIST_LIMIT else ""),
                path=hdr.path,
            )
        shard_id = hdr.metadata.get(_SAVE_ID_KEY)
        if index_save_id is not None and shard_id is not None and shard_id != index_save_id:
            raise CheckpointError(
                f"{hdr.path}: shard belongs to a different save than {index_path.name} "
                f"(save id {shard_id} vs {index_save_id}); a save into this folder was "
                f"interrupted, or files from another checkpoint were copied in",
                path=hdr.path,
            )
        for a, c in _parse_aliases(hdr.metadata.get(_ALIASES_KEY), hdr.path).items():
            aliases.setdefault(a, c)
        sd.update(_read_tensors(hdr, names, device, dtype))
    _apply_aliases(sd, aliases, index_path)
    return sd


def load_state_dict(
    folder_or_file: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any safetensors checkpoint).

    Args:
        folder_or_file: a ``.safetensors`` file, an ``*.index.json`` file, or a folder
            holding ``model.safetensors.index.json`` (preferred) or ``model.safetensors``.
        device: where the tensors go.
        dtype: if given, floating-point tensors are cast to it; others keep their dtype.

    Returns:
        ``{name: Tensor}``, with tied names (aliases) restored as the same tensor object.

    Raises:
        CheckpointError: nothing to load, or a file is truncated, corrupted or missing.
    """
    kind, path = _resolve(folder_or_file)
    if kind == "index":
        return _load_index(path, device, dtype)
    hdr = _read_header(path)
    sd = _read_tensors(hdr, list(hdr.entries), device, dtype)
    _apply_aliases(sd, _parse_aliases(hdr.metadata.get(_ALIASES_KEY), path), path)
    return sd


def load_metadata(folder_or_file: PathLike) -> Dict[str, str]:
    """The ``__metadata__`` of a checkpoint's file (of its first shard, when sharded),
    without the entries this module keeps for itself. Reads headers only."""
    kind, path = _resolve(folder_or_file)
    if kind == "index":
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            first = _safe_shard_name(next(iter(index["weight_map"].values())), path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError, StopIteration) as e:
            raise CheckpointError(f"{path}: corrupted index ({type(e).__name__}: {e})", path=path) from None
        path = path.parent / first
    meta = _read_header(path).metadata
    return {k: v for k, v in meta.items() if not k.startswith(_RESERVED_PREFIX)}


# --------------------------------------------------------------------------------------
# loading into a module


def _listing(names: List[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    if len(names) > _LIST_LIMIT:
        shown += f", ... and {len(names) - _LIST_LIMIT} more"
    return shown


def _mismatch_message(
    source: Path, model: nn.Module, missing: List[str], unexpected: List[str],
    mis_shaped: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]],
) -> str:
    def plural(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    lines = [f"checkpoint {source} does not match {type(model).__name__}:"]
    if missing:
        lines.append(f"  {plural(len(missing), 'missing key')} (in the model, not in the checkpoint): "
                     f"{_listing(missing)}")
    if unexpected:
        lines.append(f"  {plural(len(unexpected), 'unexpected key')} (in the checkpoint, not in the "
                     f"model): {_listing(unexpected)}")
    if mis_shaped:
        items = [f"{k}: model expects {_fmt_shape(a)}, checkpoint has {_fmt_shape(b)}"
                 for k, (a, b) in mis_shaped.items()]
        lines.append(f"  {plural(len(items), 'mis-shaped key')}:")
        lines.extend(f"    {s}" for s in items[:_LIST_LIMIT])
        if len(items) > _LIST_LIMIT:
            lines.append(f"    ... and {len(items) - _LIST_LIMIT} more")
    return "\n".join(lines)


def load_checkpoint(
    model: nn.Module,
    folder: PathLike,
    *,
    strict: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Load a checkpoint into ``model`` in place and return it.

    Args:
        model: the module to fill; its parameters/buffers are copied into (ties between its
            parameters are preserved).
        folder: anything :func:`load_state_dict` accepts.
        strict: if True, any missing or unexpected key is an error. Mis-shaped keys are an
            error either way. A key the checkpoint lacks is not "missing" when the model ties
            it to a key the checkpoint has (e.g. ``lm_head.weight`` tied to the embedding).
        device: if given, the model is moved there first.
        dtype: if given, the model's floating-point parameters/buffers are cast to it first.

    Raises:
        CheckpointError: the checkpoint cannot be read, or does not match the model; the
            message lists missing, unexpected and mis-shaped keys (expected vs received).
    """
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    sd = load_state_dict(folder, device="cpu" if device is None else device, dtype=dtype)
    source = Path(folder)

    expected = model.state_dict(keep_vars=True)
    present = set(sd)
    # Names tied in the model count as present when any of their group is in the checkpoint.
    groups: Dict[tuple, List[str]] = {}
    for name, t in expected.items():
        if isinstance(t, torch.Tensor):
            key = _alias_key(t)
            if key is not None:
                groups.setdefault(key, []).append(name)
    covered = set()
    for names in groups.values():
        if any(n in present for n in names):
            covered.update(names)

    missing = [k for k in expected if k not in present and k not in covered]
    unexpected = [k for k in sd if k not in expected]
    mis_shaped = {
        k: (tuple(expected[k].shape), tuple(sd[k].shape))
        for k in sd
        if k in expected and isinstance(expected[k], torch.Tensor) and expected[k].shape != sd[k].shape
    }
    if mis_shaped or (strict and (missing or unexpected)):
        raise CheckpointError(
            _mismatch_message(source, model, missing if strict else [], unexpected if strict else [],
                              mis_shaped),
            path=source, missing_keys=missing, unexpected_keys=unexpected,
            mismatched_shapes=mis_shaped,
        )
    if missing or unexpected:
        logger.info("loading %s non-strictly: %d missing keys, %d unexpected keys ignored",
                    source, len(missing), len(unexpected))

    to_load = {k: v for k, v in sd.items() if k in expected}
    try:
        with torch.no_grad():
            model.load_state_dict(to_load, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {source}: loading into {type(model).__name__} failed: {e}",
                              path=source) from None
    return model
