"""bfloat16 / float16 products widened to float32 on CPUs that have no kernels for them.

On an x86 CPU without AVX-512 bf16 (AVX2 only: AMD Zen 2 / Zen 3, Intel before Cooper
Lake), oneDNN has no bf16 kernels and torch runs bf16 ``mm`` / ``linear`` / ``conv2d`` in
its reference loops: a 2048^3 ``mm`` measured 0.29 GFLOP/s on a 2-core AMD EPYC (Zen 3)
against 173 GFLOP/s in float32 (600x), and a 3x3 convolution 47x slower than float32
(:func:`flamingo_rt.ops.cpu_gemm.half_products_slow`). There flamingo_rt's model products
run on their operands widened to float32: the product of two bf16 (or fp16) values is exact
in float32 and the sums run in float32, as oneDNN's bf16 kernels sum, and the result is
rounded once to the inputs' dtype -- the values of a bf16 kernel up to the order of its sums.

- :func:`linear` is the path of :func:`flamingo_rt.ops.linear.linear` (plain, and under CPU
  autocast with float32 tensors, rounded to the autocast dtype first) and of
  :func:`cpu_gemm.linear` for such inputs;
- :func:`mm` and :func:`addmm` are those of :func:`cpu_gemm.mm` and :func:`cpu_gemm.mm_add`
  (the products inside the fused ops' forwards and backwards); :mod:`cast_blocks` and
  :mod:`widening_gemm` widen their blocks themselves;
- :func:`scaled_dot_product_attention` is the LM's causal attention in training (torch's
  fused attention's backward runs half products; its forward does not);
- :func:`flamingo_rt.ops.nfconv.conv2d_padded` runs its float32 paths (Winograd, 1x1 as a
  product, oneDNN) on the widened tensors.

:func:`linear` widens a weight a block at a time (:mod:`cast_blocks`: at most 16 MiB of
float32 weight exists at once) and keeps no widened copy for the backward, so a model kept
in bf16 to halve its memory keeps that saving; :func:`mm` widens both operands whole, as
temporaries freed with the product.

``FLAMINGO_RT_WIDEN_HALF``: ``auto`` (the default: where half products are slow), ``1``
(every CPU: tests), ``0`` (never: torch's own kernels). Read per call, like the other
``FLAMINGO_RT_*`` switches. Under ``torch.compile`` and export the products are torch's: a
compiled or exported graph does not depend on the machine that traced it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend as _backend
from . import cpu_gemm
from .cast_linear import cast_linear

__all__ = ["setting", "wanted", "autocast_wanted", "active", "attention_wanted", "linear", "mm", "addmm",
           "scaled_dot_product_attention"]

_SETTINGS = ("auto", "1", "0")
_HALF = (torch.bfloat16, torch.float16)


def setting() -> str:
    """``FLAMINGO_RT_WIDEN_HALF`` (``auto``, ``1`` or ``0``); ValueError for anything else."""
    s = os.environ.get("FLAMINGO_RT_WIDEN_HALF", "auto").strip().lower() or "auto"
    if s not in _SETTINGS:
        raise ValueError(f"FLAMINGO_RT_WIDEN_HALF: expected auto, 1 or 0, got {s!r}")
    return s


def wanted(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether a product of ``x`` with ``others`` (weights, biases; None entries are skipped)
    runs widened here: eager mode (not compiling or exporting), plain CPU tensors all of one
    bfloat16 / float16 dtype, and the setting on (``auto``: where
    :func:`cpu_gemm.half_products_slow`)."""
    if x.dtype not in _HALF or x.device.type != "cpu":
        return False
    for t in others:
        if t is not None and (t.dtype != x.dtype or t.device.type != "cpu" or not cpu_gemm.plain_tensor(t)):
            return False
    if not cpu_gemm.plain_tensor(x) or torch.compiler.is_compiling() or _backend.exporting():
        return False
    return active(x.device, x.dtype)


def autocast_wanted(x: Tensor, *others: Optional[Tensor]) -> Optional[torch.dtype]:
    """The CPU autocast dtype when autocast would run a product of ``x`` with ``others`` in
    bfloat16 / float16 and such products run widened here (:func:`wanted` on the cast
    tensors): CPU autocast on with that dtype, plain CPU tensors of float32 or that dtype,
    eager mode. Else None. The caller casts the tensors to the dtype (autocast's rounding)
    and calls the widened op."""
    if not torch.is_autocast_enabled("cpu"):
        return None
    dt = torch.get_autocast_dtype("cpu")
    if dt not in _HALF or torch.compiler.is_compiling() or _backend.exporting():
        return None
    for t in (x, *others):
        if t is not None and (t.device.type != "cpu" or t.dtype not in (torch.float32, dt)
                              or not cpu_gemm.plain_tensor(t)):
            return None
    return dt if active(x.device, dt) else None


def active(device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` products on ``device`` run widened (what the slow-kernel warnings ask)."""
    if torch.device(device).type != "cpu" or dtype not in _HALF:
        return False
    s = setting()
    return cpu_gemm.half_products_slow(device, dtype) if s == "auto" else s == "1"


def attention_wanted(q: Tensor, k: Tensor, v: Tensor) -> Optional[torch.dtype]:
    """The dtype when ``F.scaled_dot_product_attention`` of q, k, v should run widened
    (:func:`scaled_dot_product_attention`), else None: with gradients, half tensors (or CPU
    autocast to a half dtype) where such products are slow. Its forward is its own vectorized
    kernel (bf16 4.6 ms against float32 4.2 on the AVX2 guest), but its backward runs torch's
    bf16 products: 131 ms against 20.5 in float32 (2 x 32 heads x 256 tokens x 64, GQA 8:1)."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return None
    dt = autocast_wanted(q, k, v)
    if dt is None and wanted(q, k, v):
        dt = q.dtype
    return dt


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype, **kwargs) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)`` of q, k, v rounded to ``dtype``,
    computed in float32 (forward and backward) and rounded once to ``dtype``."""
    with torch.autocast("cpu", enabled=False):
        qf, kf, vf = (t.to(dtype).float() for t in (q, k, v))
        return F.scaled_dot_product_attention(qf, kf, vf, **kwargs).to(dtype)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` in ``dtype`` (default x's: bfloat16 or float16), computed
    widened to float32 and rounded once to ``dtype``; differentiable in x, weight and bias.

    x (..., K), weight (N, K), bias (N,) or None on the CPU, each in ``dtype`` or float32
    (autocast's case: float32 tensors are rounded to ``dtype`` first, as autocast casts them);
    returns (..., N) in ``dtype``. No widened copy of the weight outlives a block of it."""
    dtype = x.dtype if dtype is None else dtype
    if dtype not in _HALF:
        raise TypeError(f"half_widening.linear: expected a bfloat16 / float16 dtype, got {dtype}")
    return cast_linear(x, weight, bias, dtype)  # cast_blocks widens each block here


def mm(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` for 2-D a (M, K), b (K, N) of one bfloat16 / float16 dtype on the CPU,
    computed in float32 (:func:`cpu_gemm.mm` on the widened operands) and rounded to a's
    dtype; written into ``out`` when given (a dense (M, N) tensor of that dtype), else new."""
    with torch.autocast("cpu", enabled=False):
        y = cpu_gemm.mm(a.float(), b.float())
    if out is not None:
        return out.copy_(y)
    return y.to(a.dtype)


def addmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` as a new tensor in c's dtype: the sum and the product in float32 (c
    widened as the accumulator, ``cpu_gemm.mm_add``), rounded once."""
    with torch.autocast("cpu", enabled=False):
        y = cpu_gemm.mm_add(c.float(), a.float(), b.float())
    return y.to(c.dtype)
