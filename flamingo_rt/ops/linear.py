"""``linear``: ``F.linear`` with flamingo_rt's small-batch kernel for decode-sized inputs,
and float32 CPU products through oneDNN where that is the faster library.

At decode time every projection multiplies one token per sequence by a weight matrix:
the cost is streaming the weight once, where a general GEMM is not at its best. When the
input has at most 16 rows, lives on the CPU in float32 or bfloat16, and no gradient is
needed, the C++ kernel ``flamingo_rt_C::small_linear`` runs instead (measured 1.4-1.7x
faster than torch's in float32 and about 2x in bfloat16 on 4096 x 1024 weights; on CPUs with
AVX512_BF16 its bfloat16 products are vdpbf16ps: 2-core Zen 4, 4096 x 1024, 1 / 2 / 16 rows
53 / 104 / 470 us against F.linear's 290 / 294 / 645, where its float32-FMA path took
132 / 402 / 1526).
Under ``torch.compile`` and export the kernel is used when the row count is static (the
decode step).

Larger float32 CPU inputs go through :mod:`flamingo_rt.ops.cpu_gemm` (oneDNN instead of MKL
on CPUs where MKL runs its AVX2 kernels), with an autograd function whose backward uses the
same products and keeps the input only when the weight needs a gradient. bfloat16 / float16
CPU inputs on CPUs without such kernels (AVX2 only) run widened to float32
(:mod:`flamingo_rt.ops.half_widening`). Under CPU bf16
autocast a float32 weight that trains gets its gradient from MKL's float32-accumulating bf16
product (:mod:`flamingo_rt.ops.widening_gemm`) where that runs; a frozen float32 weight
that the gradient flows back through is cast again in the backward instead of its bf16 copy
being kept from the forward. Everything else (other
autocast cases, other devices and dtypes, ``torch.compile`` / export, ``torch.func``
transforms) is ``F.linear``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext
from . import backend as _backend
from . import cpu_gemm, half_widening, widening_gemm
from .cast_linear import cast_linear
from .precision import column_sum

MAX_ROWS = 16
_DTYPES = (torch.float32, torch.bfloat16)


def _plain(x: Tensor, weight: Tensor) -> bool:
    """Neither autocast (it decides the product's dtype) nor a ``torch.func`` transform (vmap,
    grad: F.linear has their rules) is active: our kernels may replace F.linear."""
    if torch.is_autocast_enabled("cpu"):
        return False
    return _no_transform(x, weight)


def _no_transform(x: Tensor, weight: Tensor) -> bool:
    """No ``torch.func`` transform (vmap, grad) is active on x or the weight."""
    if torch.compiler.is_compiling():
        return True  # the compiler handles transforms itself (and cannot trace the check below)
    return not (torch._C._functorch.is_functorch_wrapped_tensor(x)
                or torch._C._functorch.is_functorch_wrapped_tensor(weight))


def _kernel_may_run(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """What the small-batch C++ kernel needs beyond dtypes and row counts: x on the CPU,
    :func:`_plain`, no gradient wanted, a 2-D weight with unit stride along K, a contiguous
    bias, the extension loaded."""
    if x.device.type != "cpu" or not _plain(x, weight):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if weight.dim() != 2 or weight.stride(-1) != 1 or (bias is not None and not bias.is_contiguous()):
        return False
    return _ext.load()


def _small_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    if _backend.exporting() or torch.compiler.is_compiling():
        # A graph with a static row count (the decode step; batch 1 is always static) calls
        # the C++ op, as an extern kernel between Inductor's fused ones; a symbolic count (a
        # prefill chunk, or a batch under dynamic=True) is F.linear, compiled by Inductor.
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else None
        if not isinstance(rows, int) or rows > MAX_ROWS:
            return False
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    if x.dim() == 0 or x.shape[-1] == 0 or x.numel() // x.shape[-1] > MAX_ROWS:
        return False
    return _kernel_may_run(x, weight, bias)


class _CpuLinear(torch.autograd.Function):
    """``F.linear`` whose forward and backward products are :mod:`cpu_gemm`'s (float32, CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        need_x, need_w, need_b = ctx.needs_input_grad
        # x is kept only for the weight's gradient; the weight only for the input's.
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.x_shape = x.shape
        return cpu_gemm.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = cpu_gemm.mm(dy2, weight).view(ctx.x_shape) if need_x else None
        dw = cpu_gemm.mm(dy2.t(), x.reshape(-1, x.shape[-1])) if need_w else None
        db = dy2.sum(0) if need_b else None
        return dx, dw, db


class _AutocastBf16Linear(torch.autograd.Function):
    """``F.linear`` under CPU bf16 autocast with a float32 weight that trains: the forward as
    autocast runs it (x and the weight cast to bf16, a bf16 product and output, x's cast kept
    for the weight's gradient), the input's gradient the same bf16 product, and the weight's
    gradient ``dy^T x`` accumulated in float32 by MKL's product (``widening_gemm``): not
    rounded to bf16 and then widened, and without oneDNN's half-speed transposed operand."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        need_x, need_w, need_b = ctx.needs_input_grad
        with torch.autocast("cpu", enabled=False):
            xc = x.to(torch.bfloat16)
            wc = weight.to(torch.bfloat16)
            y = F.linear(xc, wc, None if bias is None else bias.to(torch.bfloat16))
        ctx.save_for_backward(xc if need_w else None, wc if need_x else None)
        ctx.x_dtype, ctx.x_shape, ctx.b_dtype = x.dtype, x.shape, None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        xc, wc = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        with torch.autocast("cpu", enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(torch.bfloat16)
            dx = cpu_gemm.mm(dy2, wc).view(ctx.x_shape).to(ctx.x_dtype) if need_x else None
            dw = widening_gemm.mm(dy2.t(), xc.reshape(-1, xc.shape[-1])) if need_w else None
            db = column_sum(dy2, torch.float32).to(ctx.b_dtype) if need_b else None
        return dx, dw, db


def _eager_cpu_bf16_autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """CPU bf16 autocast in eager mode with gradients on, a float32 / bf16 input, a 2-D float32
    weight and a 1-D float32 bias (or none), no torch.func transform: the cases our autocast
    linears may take over from F.linear."""
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    if torch.compiler.is_compiling() or _backend.exporting() or not torch.is_grad_enabled():
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() == 0:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1):
        return False
    return not (torch._C._functorch.is_functorch_wrapped_tensor(x)
                or torch._C._functorch.is_functorch_wrapped_tensor(weight))


def _autocast_bf16_frozen(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """A frozen weight (and bias) and an input that needs its gradient:
    :func:`cast_linear` replaces autocast's F.linear (the weight's bf16 cast is not kept for the
    backward)."""
    if not x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    return _eager_cpu_bf16_autocast(x, weight, bias)


def _autocast_bf16_training(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """A weight that needs its gradient, and MKL's widening product available:
    :class:`_AutocastBf16Linear` replaces autocast's F.linear."""
    return weight.requires_grad and _eager_cpu_bf16_autocast(x, weight, bias) and widening_gemm.available()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    dt = half_widening.autocast_wanted(x, weight, bias)
    if dt is not None and _no_transform(x, weight):
        # autocast's rounding to dt, then the product widened (no fast dt kernels here)
        return half_widening.linear(x, weight, bias, dt)
    if _autocast_bf16_training(x, weight, bias):
        return _AutocastBf16Linear.apply(x, weight, bias)
    if _autocast_bf16_frozen(x, weight, bias):
        return cast_linear(x, weight, bias, torch.bfloat16)
    if _small_ok(x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.ops.flamingo_rt_C.small_linear(x2, weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    if half_widening.wanted(x, weight, bias) and _plain(x, weight):
        return half_widening.linear(x, weight, bias)  # bf16 / fp16 where torch has no fast kernels
    if cpu_gemm.eligible(x, weight, bias) and _plain(x, weight):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _CpuLinear.apply(x, weight, bias)
        return cpu_gemm.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_bf16_weight(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight.float(), bias)`` for float32 x (..., K), a bfloat16 weight (N, K)
    and a float32 bias (N,) or None, without widening the weight in memory: on the CPU, outside
    autograd, ``torch.compile`` and export, the small-batch kernel reads the bfloat16 rows
    (half the bytes) against every 16 rows of x at a time (the widened weight's products,
    float32 accumulation; bit for bit the float32 kernel on the widened weight on AVX-512
    CPUs, within float32 rounding of it on AVX2); otherwise the widened weight's F.linear.
    Returns (..., N) float32."""
    if x.dtype != torch.float32 or weight.dtype != torch.bfloat16:
        raise TypeError(f"linear_bf16_weight: expected float32 x and a bfloat16 weight, got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.dtype != torch.float32:
        raise TypeError(f"linear_bf16_weight: expected a float32 bias, got {bias.dtype}")
    fast = (weight.device.type == "cpu" and x.dim() > 0 and x.numel() > 0 and not torch.compiler.is_compiling()
            and not _backend.exporting() and _kernel_may_run(x, weight, bias))
    if not fast:
        return F.linear(x, weight.float(), bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    parts = [torch.ops.flamingo_rt_C.small_linear(x2[i:i + MAX_ROWS], weight, bias)
             for i in range(0, x2.shape[0], MAX_ROWS)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose forward is :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
