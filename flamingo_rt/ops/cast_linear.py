"""``cast_linear``: ``F.linear`` of x, weight and bias rounded to a dtype, with the weight cast
a block at a time and kept itself (no cast copy) for the backward.

One autograd Function serves two callers:

- CPU bf16 autocast with a frozen float32 weight and an input that needs its gradient (a
  frozen LM layer the loss flows back through, :func:`flamingo_rt.ops.linear.linear`):
  autocast would keep the weight's bf16 cast from the forward to the backward (frozen weights
  are not in its cast cache): 168 MiB for OpenFlamingo-3B's frozen LM layers. Here the
  backward casts the float32 weight again (~2 ms per 2048 x 5632);
- bfloat16 / float16 products on CPUs without such kernels (:mod:`half_widening`), where
  each cast block is multiplied widened to float32, with the weight and bias trainable or not.

The forward is :func:`cast_blocks.linear` on x rounded to ``dtype`` (the weight's rows cast a
block at a time into a reused buffer), the input's gradient :func:`cast_blocks.mm` (the
weight's columns, cast again a block at a time), the weight's gradient ``dy^T x`` summed in
float32 by :func:`widening_gemm.mm` (not rounded to ``dtype``) and cast to the weight's
dtype, the bias's gradient a float32 column sum. The rounded x is kept only when the weight
needs its gradient, the weight only when x does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cast_blocks
from .precision import column_sum

__all__ = ["CastLinear", "cast_linear"]


class CastLinear(torch.autograd.Function):
    """``F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))`` with float32 sums, the
    weight cast a block at a time in the forward and again in the backward (module docstring).
    x (..., K) in float32 or ``dtype``, weight (N, K) and bias (N,) or None in float32 or
    ``dtype``, on the CPU; returns (..., N) in ``dtype``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast("cpu", enabled=False):
            xr = x.reshape(-1, x.shape[-1]).to(dtype)
            y = cast_blocks.linear(xr, weight, dtype, bias)
        ctx.save_for_backward(xr if need_w else None, weight if need_x else None)
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        from . import widening_gemm  # (it imports half_widening, which imports this module)

        xr, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast("cpu", enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)
            dx = cast_blocks.mm(dy2, weight, ctx.dtype).view(ctx.x_shape).to(ctx.x_dtype) if need_x else None
            dw = widening_gemm.mm(dy2.t(), xr).to(ctx.w_dtype) if need_w else None
            db = column_sum(dy2, torch.float32).to(ctx.b_dtype) if need_b else None
        return dx, dw, db, None


def cast_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """:class:`CastLinear`: x (..., K), weight (N, K), bias (N,) or None on the CPU, each in
    float32 or ``dtype`` (bfloat16 / float16) -> (..., N) in ``dtype``; differentiable in x,
    weight and bias."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"cast_linear: expected a bfloat16 / float16 dtype, got {dtype}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float32, dtype):
            raise TypeError(f"cast_linear: expected {name} in float32 or {dtype}, got {t.dtype}")
    return CastLinear.apply(x, weight, bias, dtype)
