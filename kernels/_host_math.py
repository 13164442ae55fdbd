"""Integer helpers for the kernels' host code (grids, block sizes, autotune keys).

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``s in triton 3.x:
callable from host code, but each call goes through triton's JIT-callable machinery
(~6 us on the 2-core CPU here; a backward of the cross-attention made six such calls per
layer). These are the same functions on plain Python ints.
"""
from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for ints, y > 0."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (which gives 0 for 0)."""
    n = int(n)
    return n if n <= 1 else 1 << (n - 1).bit_length()
