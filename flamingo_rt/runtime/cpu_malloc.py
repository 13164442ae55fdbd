"""Process-wide tuning of glibc's malloc for large CPU tensors (``flamingo-rt train`` applies it).

PyTorch allocates CPU tensors with the C library's allocator. glibc serves every block larger
than its mmap threshold (at most 32 MiB, 128 KiB to start) with a fresh ``mmap`` and returns
it with ``munmap`` on free, so each large tensor -- an activation, a gradient, a bf16 cast of
a weight -- maps new pages and takes a page fault on the first touch of every 4 KiB of it.
On the 2-core machine of the benchmarks that costs ~0.3 ms per MiB: cloning a 64 MiB tensor
takes 28 ms instead of 5, a bf16 cast of an 8192 x 2048 weight 13.5 ms instead of 3.5, and a
connector training step under bf16 autocast spends ~20% of its time faulting pages in
(``bench/peers/train_step.py``: 4.5 s -> 3.65 s with this tuning).

:func:`keep_freed_memory` makes glibc serve large blocks from its heap (no mmap per block)
and keep freed memory for reuse (no trimming), as the CUDA caching allocator does on GPUs
and jemalloc / tcmalloc do when preloaded. The trade-off: memory freed by the process is not
returned to the operating system, so the resident size stays at its high-water mark (the
peak itself does not grow beyond fragmentation). It is process-wide, so it is never applied
on import; the CLI's ``train`` applies it unless ``--default-malloc`` is given.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Optional

__all__ = ["keep_freed_memory", "restore_default_malloc"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def _libc() -> Optional[ctypes.CDLL]:
    """glibc's handle, or None off glibc (musl, macOS, Windows: no ``mallopt`` to tune)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(top_pad_mib: int = 64) -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (see the
    module docstring). ``top_pad_mib``: extra MiB requested whenever the heap grows.

    Returns True when applied (glibc), False where there is nothing to tune. Idempotent.
    """
    if top_pad_mib < 0:
        raise ValueError(f"expected top_pad_mib >= 0, got {top_pad_mib}")
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0)  # no mmap per block: large blocks come from the heap
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never give the heap's top back
    ok &= libc.mallopt(_M_TOP_PAD, top_pad_mib << 20)
    return bool(ok)


def restore_default_malloc() -> bool:
    """glibc's defaults again (mmap for large blocks, trimming at 128 KiB). Memory already
    kept stays with the process until it is freed and trimmed. Returns True on glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
    ok &= libc.mallopt(_M_TOP_PAD, 0)
    ok &= libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
    return bool(ok)
