"""bfloat16 x bfloat16 products with float32 results on the CPU: ``c = beta c + alpha a @ b``.

Under bf16 autocast the weight gradients are float32 (the parameters' dtype) but torch's bf16
products return bf16: each product is rounded to bf16 and then widened into the float32
gradient by another pass over memory, once per chunk of rows it is accumulated over; and
oneDNN runs a column-major first operand -- every weight gradient ``dy^T x`` -- at half speed
on AMX (2048 x 8192 x 2048: 56 ms against 26 for the row-major one). MKL, inside torch's
x86-64 CPU library, has the product that accumulates bf16 inputs straight into a float32
``c`` (``cblas_gemm_bf16bf16f32``, AMX on Intel CPUs that have it) and reads a transposed
operand in place at full speed: the same shape 30 ms, written into the float32 gradient,
adding to it when asked, never rounded to bf16 (so more accurate than the widened product).

:func:`addmm_` and :func:`mm` run it where it is available (flamingo_rt's C++ extension
found MKL's symbol in torch, on an Intel x86-64 CPU: MKL's bf16 kernels are Intel's own;
``FLAMINGO_RT_WIDENING_GEMM=0`` turns it off, read at each call) and otherwise torch's bf16
product widened into ``c`` a block of rows at a time. Tensors of other dtypes or devices, or
under ``torch.compile``, take plain torch.
"""
from __future__ import annotations

import functools
import os
import platform

import torch
from torch import Tensor

from .. import _ext
from . import cpu_gemm, half_widening
from .precision import WIDEN_BLOCK_BYTES

__all__ = ["available", "addmm_", "mm"]


@functools.lru_cache(maxsize=None)
def mkl_symbol() -> bool:
    """True when flamingo_rt's C++ extension found MKL's ``cblas_gemm_bf16bf16f32`` in torch
    (x86-64): the widening product can run here, whichever the CPU's vendor (on a 2-core
    AMD EPYC it runs exact at 167-176 GFLOP/s, against torch's rounded bf16 product at
    404-415, so it is not :func:`available` there; tests force it on to check both paths)."""
    if not _ext.load() or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return bool(torch.ops.flamingo_rt_C.widening_gemm_available())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _mkl_present() -> bool:
    return cpu_gemm.intel_cpu() and mkl_symbol()


def available() -> bool:
    """True when :func:`addmm_` runs MKL's float32-accumulating bf16 product (see the
    module docstring); False when it takes torch's bf16 product and widens."""
    return os.environ.get("FLAMINGO_RT_WIDENING_GEMM", "1") != "0" and _mkl_present()


def _fits(c: Tensor, a: Tensor, b: Tensor) -> bool:
    return (a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and c.dtype == torch.float32
            and c.device.type == "cpu" and a.device.type == "cpu" and b.device.type == "cpu"
            and c.dim() == 2 and (c.stride(1) == 1 or c.shape[1] <= 1)
            and not torch.compiler.is_compiling())


def addmm_(c: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """``c = beta * c + alpha * (a @ b)`` in place; returns c.

    Args:
        c: (M, N) float32, unit column stride (written only, not read, when beta is 0).
        a: (M, K), b: (K, N), bfloat16 (any strides; a transposed view is read in place).
    Other dtypes: the same formula in torch (a @ b in their own dtype, added into c)."""
    if a.dim() != 2 or b.dim() != 2 or c.dim() != 2 or a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"addmm_ expects c (M, N), a (M, K), b (K, N), got c {tuple(c.shape)}, "
                         f"a {tuple(a.shape)}, b {tuple(b.shape)}")
    if _fits(c, a, b) and available():
        torch.ops.flamingo_rt_C.widening_addmm_(c, a, b, float(alpha), float(beta))
        return c
    if half_widening.wanted(a, b) and c.dtype == torch.float32:
        # no fast bf16 kernels here (half_widening): the product of the widened operands in
        # float32, not rounded to bf16 (MKL's product's values, up to the order of its sums)
        bf = b.float()
        rows = cpu_gemm.block_rows(a.shape[0], max(1, WIDEN_BLOCK_BYTES // max(1, a.shape[1] * 4)))
        for r0 in range(0, a.shape[0], rows):
            r1 = min(a.shape[0], r0 + rows)
            c[r0:r1].addmm_(a[r0:r1].float(), bf, beta=beta, alpha=alpha)  # beta 0: c not read
        return c
    # torch's product in the operands' dtype, widened into c a block of rows at a time
    esize = c.element_size()
    rows = cpu_gemm.block_rows(a.shape[0], max(1, WIDEN_BLOCK_BYTES // max(1, b.shape[1] * esize)))
    for r0 in range(0, a.shape[0], rows):
        r1 = min(a.shape[0], r0 + rows)
        p = cpu_gemm.mm(a[r0:r1], b)
        cb = c[r0:r1]
        if beta == 0:
            cb.copy_(p)
            if alpha != 1:
                cb.mul_(alpha)
        else:
            if beta != 1:
                cb.mul_(beta)
            cb.add_(p, alpha=alpha)
    return c


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as a new float32 (M, N) tensor (bf16 a (M, K) and b (K, N)): accumulated in
    float32 and not rounded to bf16 where :func:`available`; elsewhere torch's bf16 product,
    rounded to bf16 once and widened (see :func:`addmm_`)."""
    c = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
    return addmm_(c, a, b, 1.0, 0.0)
