"""Dtype rules the fused ops share, and the widening reductions they need without copies.

* :func:`acc_dtype`: the accumulation dtype of a tensor dtype (float32 for bf16/fp16/fp32,
  float64 stays float64).
* :func:`compute_dtype`: the dtype a matrix product of ``x`` runs in: the autocast dtype when
  autocast is on for x's device (x floating point, not float64), else x's dtype.
* :func:`column_sum` and :func:`add_widened_`: a bf16 (R, C) matrix's column sums in float32,
  and ``acc += a`` into a float32 accumulator. Written plainly (``a.sum(0, dtype=float32)``,
  ``acc.add_(a)``) PyTorch first makes a whole float32 copy of ``a`` (a fresh allocation,
  page-faulted in: 8192 x 1024 bf16 took 13.6 ms for the sum and 14.7 ms for the add on the
  2-core machine, against 1.1 and 1.7 ms here), so these widen a block of rows at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backend as _backend
from .cpu_gemm import block_rows

__all__ = ["acc_dtype", "compute_dtype", "column_sum", "add_widened_", "widen_block_rows", "layer_norm_in",
           "WIDEN_BLOCK_BYTES"]

WIDEN_BLOCK_BYTES = 8 << 20  # the widened block (rows x C in the accumulation dtype) made at once


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and products of ``dtype`` values accumulate in: float32 or float64."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a matrix product of ``x`` in (x's dtype when autocast is off
    for its device, x is float64 or not floating point)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and x.is_floating_point() and x.dtype != torch.float64 \
            and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def widen_block_rows(rows: int, columns: int, dtype: torch.dtype) -> int:
    """Rows per block when ``rows`` rows of ``columns`` values are widened to ``dtype`` a block
    at a time: at most :data:`WIDEN_BLOCK_BYTES` per widened block, the blocks balanced
    (:func:`cpu_gemm.block_rows`)."""
    esize = torch.empty(0, dtype=dtype).element_size()
    return block_rows(rows, WIDEN_BLOCK_BYTES // max(1, columns * esize))


def layer_norm_in(x: Tensor, eps: float, dtype: torch.dtype, weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """x (R, D) -> (LayerNorm(x) with the optional affine ``weight`` / ``bias`` (D,), in
    ``dtype``; mean, rstd (R, 1) in the accumulation dtype, as ``native_layer_norm`` returns
    them for its backward). Computed in the accumulation dtype; for a lower ``dtype`` (bf16
    under autocast) a block of rows at a time (:func:`widen_block_rows`), so no whole
    accumulation-dtype copy exists (the block's FF input at batch 4: 64 MiB of fresh pages).
    Traced graphs get one whole-tensor op (which also takes a symbolic row count)."""
    acc = acc_dtype(x.dtype)
    D = x.shape[-1]
    if _ln_kernel_fits(x, dtype, weight, bias):
        # the C++ row kernel: one pass, bf16 read and written directly (8192 x 1024 bf16 ->
        # bf16: 1.7 ms against 4.5-9.5 for the blocked native_layer_norm below)
        return torch.ops.flamingo_rt_C.layer_norm_rows(x, weight, bias, float(eps), dtype)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if dtype == acc or torch.compiler.is_compiling() or _backend.exporting():
        y, mean, rstd = torch.native_layer_norm(x.to(acc), [D], w, b, eps)
        return y.to(dtype), mean, rstd
    R = x.shape[0]
    y = torch.empty((R, D), dtype=dtype, device=x.device)
    mean = torch.empty((R, 1), dtype=acc, device=x.device)
    rstd = torch.empty((R, 1), dtype=acc, device=x.device)
    step = widen_block_rows(R, D, acc)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        yb, m, r = torch.native_layer_norm(x[r0:r1].to(acc), [D], w, b, eps)
        y[r0:r1] = yb
        mean[r0:r1] = m
        rstd[r0:r1] = r
    return y, mean, rstd


_LN_DTYPES = (torch.float32, torch.bfloat16)


def _ln_kernel_fits(x: Tensor, dtype: torch.dtype, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """flamingo_rt_C::layer_norm_rows takes it: a 2-D float32 / bf16 CPU tensor in eager mode,
    output float32 / bf16, both or neither of weight and bias."""
    if x.device.type != "cpu" or x.dim() != 2 or x.dtype not in _LN_DTYPES or dtype not in _LN_DTYPES:
        return False
    if (weight is None) != (bias is None) or x.shape[-1] == 0:
        return False
    if torch.compiler.is_compiling() or _backend.exporting():
        return False
    from .. import _ext

    return _ext.load()


def column_sum(a: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """a (R, C) any float dtype -> (C,) column sums accumulated and returned in ``dtype``
    (default: :func:`acc_dtype` of a's), widening a block of rows at a time."""
    if a.dim() != 2:
        raise ValueError(f"column_sum expects a 2-D (rows, columns) tensor, got shape {tuple(a.shape)}")
    dtype = acc_dtype(a.dtype) if dtype is None else dtype
    if a.dtype == dtype:
        return a.sum(0)
    from . import widening_gemm  # (imports this module)

    if a.dtype == torch.bfloat16 and dtype == torch.float32 and widening_gemm.available() and a.device.type == "cpu":
        # ones (1, R) @ a with float32 accumulation (MKL): one read of a, no widened blocks
        # (an 8192 x 1024 gradient: 0.8 ms against 2.3)
        return widening_gemm.mm(a.new_ones((1, a.shape[0])), a)[0]
    s = torch.zeros(a.shape[1], dtype=dtype, device=a.device)
    step = widen_block_rows(a.shape[0], a.shape[1], dtype)
    for r0 in range(0, a.shape[0], step):
        s += a[r0:r0 + step].sum(0, dtype=dtype)
    return s


def add_widened_(acc: Tensor, a: Tensor) -> Tensor:
    """``acc += a`` in place for acc (R, C) and a (R, C) of any float dtypes (a typically bf16
    into a float32 acc), widening a block of a's rows at a time. Returns acc."""
    if acc.shape != a.shape or acc.dim() != 2:
        raise ValueError(f"add_widened_ expects two 2-D tensors of one shape, got {tuple(acc.shape)} and {tuple(a.shape)}")
    if acc.dtype == a.dtype:
        return acc.add_(a)
    step = widen_block_rows(a.shape[0], a.shape[1], acc.dtype)
    for r0 in range(0, a.shape[0], step):
        acc[r0:r0 + step] += a[r0:r0 + step]
    return acc


#: the dtypes the attention ops compute in (float64: the reference backend, for checks)
ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_attention_dtype(q: Tensor) -> None:
    """TypeError unless the attention ops' queries (and so keys and values, which they check
    to be of q's dtype) are float32, bfloat16, float16 or float64: a softmax of integer or
    bool scores is not an attention."""
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"expected floating-point q, k, v (float32, bfloat16, float16 or float64), got {q.dtype}")
