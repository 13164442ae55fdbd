"""Training checkpoints: trainable weights, optimizer, scheduler, RNG states, data
positions and the step, written atomically; exact resume.

Layout (``<out_dir>/checkpoints``)::

    step-00000100/
        trainable.safetensors   the trainable parameters (row-restricted ones: only their rows)
        state.pt                optimizer, scheduler, RNG states, data positions, step, rows
    latest                      the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, every file fsync-ed, then the folder is
renamed into place and ``latest`` is replaced atomically, so a run killed at any moment
leaves the previous checkpoint loadable. Older checkpoints beyond ``keep`` are removed
only after the new one is in place.
"""
from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...io.checkpoint import CheckpointError, atomic_write_bytes, load_state_dict, save_checkpoint

__all__ = ["save_train_state", "load_train_state", "latest_checkpoint", "trainable_state", "rng_state",
           "set_rng_state"]


def rng_state() -> Dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in s["python"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def trainable_state(model: nn.Module, rows: Dict[str, List[int]]) -> Dict[str, torch.Tensor]:
    """{name: tensor} of the trainable parameters; for a name in ``rows`` only those rows
    (stored as ``name + ":rows"``). Tied parameters appear once."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        t = p.detach()
        if name in rows:
            out[name + ":rows"] = t[rows[name]].clone()
        else:
            out[name] = t
    return out


def _load_trainable(model: nn.Module, tensors: Dict[str, torch.Tensor], rows: Dict[str, List[int]]) -> None:
    params = dict(model.named_parameters())
    expected = set(trainable_state(model, rows))
    got = set(tensors)
    if expected != got:
        raise CheckpointError(
            f"the checkpoint's trainable tensors do not match the model's: missing {sorted(expected - got)[:8]}, "
            f"unexpected {sorted(got - expected)[:8]} (was the freeze configuration changed?)"
        )
    with torch.no_grad():
        for key, t in tensors.items():
            if key.endswith(":rows"):
                name = key[: -len(":rows")]
                params[name][rows[name]] = t.to(params[name].dtype)
            else:
                if params[key].shape != t.shape:
                    raise CheckpointError(f"{key}: expected shape {tuple(params[key].shape)}, got {tuple(t.shape)}")
                params[key].copy_(t)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder under ``ckpt_dir``, or None."""
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    p = Path(ckpt_dir) / f.read_text().strip()
    if not (p / "state.pt").is_file():
        raise CheckpointError(f"{f} names {p.name}, which is not a complete checkpoint")
    return p


def save_train_state(ckpt_dir: Path, step: int, model: nn.Module, optimizer, scheduler,
                     data: Dict[str, Any], rows: Dict[str, List[int]], extra: Optional[Dict[str, Any]] = None,
                     keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` (completed optimizer steps); returns its folder."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = ckpt_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_checkpoint(trainable_state(model, rows), tmp, metadata={"step": str(step)})
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "data": data,
            "rows": rows,
            "extra": extra or {},
        }
        torch.save(state, tmp / "state.pt")
        _fsync_tree(tmp)
        final = ckpt_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(ckpt_dir / "latest", (name + "\n").encode())
    done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".step-*.tmp-*"):  # leftovers of killed saves
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_train_state(folder: Path, model: nn.Module, optimizer, scheduler) -> Tuple[int, Dict[str, Any], Dict[str, Any]]:
    """Restore a checkpoint into ``model`` / ``optimizer`` / ``scheduler`` and the RNGs.
    Returns (step, data positions, extra)."""
    folder = Path(folder)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    rows = {k: [int(r) for r in v] for k, v in state["rows"].items()}
    _load_trainable(model, load_state_dict(folder), rows)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"]), state["data"], state.get("extra", {})
