"""A cache of large CPU memory blocks for flamingo_rt's hot paths (``csrc/torch/cpu_block_cache.cpp``).

PyTorch allocates CPU tensors with the C library's malloc, and glibc serves each large block
with a fresh ``mmap`` that it unmaps again on free, so every large activation takes a page
fault per 4 KiB on first touch: a frozen NFNet-F0 forward at batch 4 faults ~13 thousand
pages per call and runs ~10% slower than on memory that stays mapped. The CUDA caching
allocator solves this on GPUs; :func:`scope` is the same idea for the CPU, limited to the
code inside it:

- inside ``with cpu_cache.scope():`` large CPU tensors (>= 128 KiB) allocated by this thread
  come from a free list of blocks that stay mapped (best fit, at most twice the size asked);
- freeing such a tensor, anywhere, puts its block back on the list, or releases it when the
  list would hold more than the limit (2 GiB by default, ``FLAMINGO_RT_CPU_CACHE_MIB``, or
  :func:`set_limit`);
- in a ``scope(bounded=True)`` the cache's footprint (blocks in use plus free list) stays
  within the peak of the bytes its live tensors asked for: reuse without a higher peak (the
  training step's scope);
- outside a scope nothing changes: the allocator installed on first use forwards every call
  to the one it replaced.

The frozen NFNet's forward (:meth:`flamingo_rt.models.nfnet.NFNet.forward_features`) runs in
a scope by default. ``FLAMINGO_RT_CPU_CACHE=0`` turns the scopes off (they run as plain
``nullcontext``), :func:`empty` gives the free list back to the system. Unlike
:func:`flamingo_rt.runtime.cpu_malloc.keep_freed_memory`, which tunes glibc for the whole
process, only memory allocated in a scope is kept.

Without ``flamingo_rt._C`` (or off the CPU) the scopes do nothing and :func:`stats` reports
``installed=False``.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["CacheStats", "available", "enabled", "scope", "inference_scope", "stats", "empty", "set_limit",
           "depth"]


@dataclass(frozen=True)
class CacheStats:
    """Counters of the block cache (since the process started)."""

    hits: int  #: allocations served from the free list
    misses: int  #: allocations that mapped a new block
    releases: int  #: freed blocks given back because the free list was full (or emptied)
    cached_bytes: int  #: bytes on the free list
    in_use_bytes: int  #: bytes of the cache's blocks held by live tensors
    limit_bytes: int  #: the free list's limit
    installed: bool  #: the cache is the process's CPU allocator
    live_bytes: int = 0  #: bytes live tensors asked of the cache's blocks
    live_peak_bytes: int = 0  #: the peak of ``live_bytes`` since the last :func:`empty`


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """The extension with the cache is loaded."""
    from .. import _ext

    return _ext.load() and hasattr(torch.ops.flamingo_rt_C, "cpu_block_cache_enter")


def enabled() -> bool:
    """Scopes are active: the extension is there and ``FLAMINGO_RT_CPU_CACHE`` is not ``0``."""
    setting = os.environ.get("FLAMINGO_RT_CPU_CACHE", "1").strip().lower()
    if setting not in ("", "0", "1", "off", "on"):
        raise ValueError(f"FLAMINGO_RT_CPU_CACHE: expected 0 or 1, got {setting!r}")
    return setting not in ("0", "off") and available()


@contextlib.contextmanager
def _cached(bounded: bool) -> Iterator[None]:
    ops = torch.ops.flamingo_rt_C
    ops.cpu_block_cache_enter(bounded)
    try:
        yield
    finally:
        ops.cpu_block_cache_exit()


def scope(bounded: bool = False):
    """Context manager: large CPU tensors allocated by this thread inside it come from the
    block cache. Nestable (the innermost scope's ``bounded`` applies); a no-op when
    :func:`enabled` is False or under ``torch.compile`` tracing (the compiled graph's own
    buffers are allocated at run time by its caller).

    ``bounded``: a new block is mapped only after releasing cached blocks (largest first) so
    that the cache's footprint -- its blocks in use plus its free list -- stays within the peak
    of bytes live tensors have asked of it (``stats().live_peak_bytes``, since the last
    :func:`empty`), and a cached block serves only requests at most an eighth smaller than
    itself. The cache then holds about what plain malloc would at its peak: a loop that
    allocates the same tensors on every pass (a training step) reuses its blocks without the
    cache raising the loop's peak memory. Plain scopes keep every freed block up to the limit
    and let a block serve requests down to half its size."""
    if torch.compiler.is_compiling() or not enabled():
        return contextlib.nullcontext()
    return _cached(bool(bounded))


def inference_scope(x: torch.Tensor, min_rows: int = 0):
    """Context manager for a module's CPU inference forward on ``x`` (..., features): a
    bounded :func:`scope`, so the forward's large activations come from blocks that stay
    mapped, and later calls reuse them without raising the forward's peak.

    A ``nullcontext`` instead when ``x`` is not on the CPU; when gradients are enabled
    (training: the freed saved tensors stayed cached in a forward-only scope while the
    backward allocated outside it, which raised the resampler's fwd+bwd memory from 608 to
    816 MiB per step at 32 images; the training step's own scope covers training); under
    ``torch.compile`` tracing; and when ``x`` has fewer than ``min_rows`` rows (the product of
    its leading sizes: decode-sized calls, whose tensors are small). A symbolic size is not
    compared, so tracing adds no guard on it."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if min_rows > 0:
        rows = 1
        for size in x.shape[:-1]:
            if not isinstance(size, int):
                return contextlib.nullcontext()
            rows *= size
        if rows < min_rows:
            return contextlib.nullcontext()
    return scope(bounded=True)


def depth() -> int:
    """Scopes open on the calling thread (0 without the extension)."""
    return int(torch.ops.flamingo_rt_C.cpu_block_cache_depth()) if available() else 0


def stats() -> CacheStats:
    """The cache's counters; all zero and ``installed=False`` without the extension. The
    first call installs the allocator (it forwards everything outside scopes)."""
    if not available():
        return CacheStats(0, 0, 0, 0, 0, 0, False)
    h, m, r, c, u, lim, inst, live, peak = torch.ops.flamingo_rt_C.cpu_block_cache_stats()
    return CacheStats(h, m, r, c, u, lim, bool(inst), live, peak)


def empty() -> None:
    """Release every block on the free list (blocks of live tensors return to it when freed)
    and restart ``live_peak_bytes`` from the bytes live now."""
    if available():
        torch.ops.flamingo_rt_C.cpu_block_cache_empty()


def set_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` on the free list (>= 0; 0 keeps nothing), releasing the rest."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"expected a limit in bytes >= 0, got {nbytes!r}")
    if available():
        torch.ops.flamingo_rt_C.cpu_block_cache_set_limit(nbytes)
