"""Per-thread scratch buffers that stay mapped from one use to the next.

glibc maps each large CPU block anew and unmaps it on free, so a fresh temporary of a few
MiB pays a page fault per 4 KiB on first touch, every time (on the 2-core guests of the
benchmarks 0.3-1.4 ms per MiB: more than the copy or product that fills it). A buffer kept
per (thread, name, device) and grown to the largest size asked is touched once.

A view returned by :func:`buffer` is valid until the next :func:`buffer` call with the same
name on the same thread: each name belongs to one caller that uses its view and is done with
it before asking again (no nesting within a name). :func:`release` frees them (measurements
of memory, tests).
"""
from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch
from torch import Tensor

__all__ = ["buffer", "release", "held_bytes"]

_local = threading.local()


def _buffers() -> Dict[Tuple[str, torch.device], Tensor]:
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    return bufs


def buffer(name: str, numel: int, dtype: torch.dtype, device, min_bytes: int = 0) -> Tensor:
    """A (numel,) ``dtype`` view of the calling thread's buffer ``name`` on ``device``, grown to
    the largest size asked (at least ``min_bytes``) and kept. Its contents are unspecified."""
    if numel < 0:
        raise ValueError(f"scratch.buffer: expected numel >= 0, got {numel}")
    device = torch.device(device)
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    bufs = _buffers()
    key = (name, device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < nbytes:
        bufs[key] = buf = None  # free the smaller one first
        buf = bufs[key] = torch.empty(max(nbytes, min_bytes), dtype=torch.uint8, device=device)
    return buf[:nbytes].view(dtype)


def release() -> None:
    """Free the calling thread's buffers."""
    _buffers().clear()


def held_bytes() -> int:
    """Bytes of the calling thread's buffers."""
    return sum(b.numel() for b in _buffers().values())
