"""Products with a weight cast to another dtype a block at a time, into one reused buffer.

Under CPU bf16 autocast a float32 weight is cast to bf16 before each product that uses it:
``weight.to(torch.bfloat16)`` is a fresh tensor each time, and glibc maps every large block
anew and unmaps it on free, so each cast pays a page fault per 4 KiB on first touch. In the
connector training step (``bench/peers/train_step.py``, OpenFlamingo-3B-shaped, 2-core AMD
EPYC) the LM head's whole cast (32,000 x 2048: 125 MiB) took 170 ms and the frozen LM layers'
casts (2048 x 5632 and the attention projections, forward and backward) ~200 ms, against
~10 ms to read the float32 weights. Here the weight is cast :data:`BLOCK_BYTES` at a time into
a buffer each thread keeps, and each block's product writes its own columns of the result:

- :func:`linear`: ``x @ weight.T (+ bias)``, blocks of the weight's rows (output features);
- :func:`mm`: ``g @ weight``, blocks of the weight's columns (the product's output columns).

Each output element is still one product's dot product over the whole reduction dimension,
so the results are those of the whole cast's product up to the order the product's kernel
sums in, which may depend on its number of columns (bitwise for the connector step's bf16
shapes here: 32,000 x 2048, 5632 x 2048, 2048 x 5632, 2048 x 2048, both products).
A block's values are valid until the calling thread's next cast; the products here never
nest, and each thread has its own buffer. A bfloat16 / float16 ``dtype`` on a CPU without
such kernels (:mod:`half_widening`) multiplies each cast block widened to float32.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_gemm, scratch

__all__ = ["BLOCK_BYTES", "linear", "mm", "row_blocks"]

#: bytes of one block of the cast weight (the buffer's size unless one row or column needs more)
BLOCK_BYTES = 16 << 20

def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (numel,) view of the calling thread's cast buffer (:mod:`scratch`, at least
    :data:`BLOCK_BYTES`)."""
    return scratch.buffer("cast_blocks", numel, dtype, device, min_bytes=BLOCK_BYTES)


def _check(a: Tensor, weight: Tensor, dtype: torch.dtype, dim: int, name: str) -> None:
    if a.dim() != 2 or weight.dim() != 2 or a.shape[1] != weight.shape[dim]:
        want = "x (n, K) and weight (N, K)" if dim == 1 else "g (n, N) and weight (N, K)"
        raise ValueError(f"cast_blocks.{name}: expected {want}, got {tuple(a.shape)} and {tuple(weight.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"cast_blocks.{name}: expected the activations in {dtype}, got {a.dtype}")
    if a.device != weight.device:
        raise ValueError(f"cast_blocks.{name}: expected one device, got {a.device} and {weight.device}")


def _widened(a: Tensor) -> bool:
    """A bfloat16 / float16 product that runs widened to float32 here (:mod:`half_widening`:
    a CPU without such kernels): each cast block is widened once more and the product is
    float32, rounded to the dtype at the end (the dtype-rounded weight's values, float32 sums)."""
    from . import half_widening  # (it imports this module)

    return half_widening.wanted(a)


def _blocks(weight: Tensor, dtype: torch.dtype, dim: int) -> Iterator[Tuple[int, int, Tensor]]:
    """(lo, hi, the weight's rows (dim 0) or columns (dim 1) lo:hi cast to ``dtype``) for
    balanced blocks of at most :data:`BLOCK_BYTES`, each made in turn in the calling thread's
    buffer (contiguous); a block already in ``dtype`` and contiguous is the weight's own view."""
    n, other = weight.shape[dim], weight.shape[1 - dim]
    esize = torch.empty(0, dtype=dtype).element_size()
    step = cpu_gemm.block_rows(n, BLOCK_BYTES // max(1, other * esize))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        src = weight[lo:hi] if dim == 0 else weight[:, lo:hi]
        if src.dtype == dtype and src.is_contiguous():
            yield lo, hi, src
        else:
            yield lo, hi, _buffer(src.numel(), dtype, weight.device).view(src.shape).copy_(src)


def row_blocks(weight: Tensor, dtype: torch.dtype) -> Iterator[Tuple[int, int, Tensor]]:
    """(r0, r1, weight[r0:r1] cast to ``dtype``) for balanced blocks of at most
    :data:`BLOCK_BYTES`, each made in turn in the calling thread's buffer."""
    return _blocks(weight, dtype, 0)


def linear(x: Tensor, weight: Tensor, dtype: torch.dtype, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.to(dtype).T (+ bias.to(dtype))`` without a whole cast of the weight.

    Args:
        x: (n, K) in ``dtype``.
        weight: (N, K) any floating dtype, any strides.
        bias: (N,) or None.
    Returns:
        (n, N) in ``dtype``, contiguous.
    """
    _check(x, weight, dtype, 1, "linear")
    widen = _widened(x)
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32 if widen else dtype, device=x.device)
    b = None if bias is None else bias.to(dtype)
    if widen:
        x, b = x.float(), None if b is None else b.float()
    for r0, r1, wb in _blocks(weight, dtype, 0):  # each block's product straight into its columns
        if widen:
            wb = wb.float()
        if b is None:
            torch.mm(x, wb.t(), out=out[:, r0:r1])
        else:
            torch.addmm(b[r0:r1], x, wb.t(), out=out[:, r0:r1])
    return out.to(dtype) if widen else out


def mm(g: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``g @ weight.to(dtype)`` without a whole cast of the weight: blocks of its columns.

    Args:
        g: (n, N) in ``dtype``.
        weight: (N, K) any floating dtype, any strides.
    Returns:
        (n, K) in ``dtype``, contiguous.
    """
    _check(g, weight, dtype, 0, "mm")
    widen = _widened(g)
    out = torch.empty((g.shape[0], weight.shape[1]), dtype=torch.float32 if widen else dtype, device=g.device)
    if widen:
        g = g.float()
    for c0, c1, wb in _blocks(weight, dtype, 1):
        torch.mm(g, wb.float() if widen else wb, out=out[:, c0:c1])
    return out.to(dtype) if widen else out
