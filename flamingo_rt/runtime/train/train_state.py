"""Training checkpoints: trainable weights, optimizer, scheduler, RNG states, data
positions and the step, written atomically; exact resume.

Layout (``<out_dir>/checkpoints``)::

    step-00000100/
        trainable.safetensors   the trainable parameters (row-restricted ones: only their rows)
        state.pt                optimizer, scheduler, RNG states, data positions, step, rows
    latest                      the name of the newest complete checkpoint

State is gathered with ``torch.distributed.checkpoint.state_dict`` (full, on the CPU of the
main process), so plain, DDP and FSDP2 runs write the same files and resume the same way.

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


_OPTS = dict(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def trainable_state(model: nn.Module, rows: Dict[str, List[int]]) -> Dict[str, torch.Tensor]:
    """{name: full tensor on CPU} of the trainable parameters (gathered from all processes
    under FSDP; a collective there, every process must call it). For a name in ``rows`` only
    those rows (stored as ``name + ":rows"``). With several processes only the main one
    receives the tensors (the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(**_OPTS))
    out = {}
    for name, t in sd.items():
        if name in rows:
            out[name + ":rows"] = t[rows[name]].clone()
        else:
            out[name] = t
    return out


def _load_trainable(model: nn.Module, tensors: Dict[str, torch.Tensor], rows: Dict[str, List[int]]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, set_model_state_dict,
    )

    current = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    expected = {k + ":rows" if k in rows else k for k in current}
    got = set(tensors)
    if expected != got:
        raise CheckpointError(
            f"the checkpoint's trainable tensors do not match the model's: missing {sorted(expected - got)[:8]}, "
            f"unexpected {sorted(got - expected)[:8]} (was the freeze configuration changed?)"
        )
    full = {}
    for name, cur in current.items():
        cur = cur.full_tensor() if hasattr(cur, "full_tensor") else cur
        if name in rows:
            t = cur.detach().to("cpu", copy=True)
            t[rows[name]] = tensors[name + ":rows"].to(t.dtype)
        else:
            t = tensors[name]
            if tuple(t.shape) != tuple(cur.shape):
                raise CheckpointError(f"{name}: expected shape {tuple(cur.shape)}, got {tuple(t.shape)}")
        full[name] = t
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


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
                     keep: int = 2, is_main: bool = True) -> Optional[Path]:
    """Write the checkpoint of ``step`` (completed optimizer steps). Every process must call
    it (gathering sharded state is collective); the main one writes and returns the folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = trainable_state(model, rows)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = ckpt_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_checkpoint(weights, tmp, metadata={"step": str(step)})
        state = {
            "step": step,
            "optimizer": optim,
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
    """Restore a checkpoint into ``model`` / ``optimizer`` / ``scheduler`` and the RNGs
    (every process reads the folder). Returns (step, data positions, extra)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    folder = Path(folder)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    rows = {k: [int(r) for r in v] for k, v in state["rows"].items()}
    _load_trainable(model, load_state_dict(folder), rows)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"]), state["data"], state.get("extra", {})
