"""Triton kernels of the NFNet ops and their launch helpers (no autograd; registered as the
``triton`` backend of ``bias_gamma_act``, ``se_residual`` and ``ws_standardize`` by
:mod:`flamingo_rt.ops.nfconv`).

- elementwise tails: ``bias_gamma_act`` forward / backward and ``se_residual`` forward /
  backward, over a dense NCHW or channels-last tensor seen as a flat array (the channel of
  element i is ``(i // HW) % C`` for NCHW, ``i % C`` for channels-last); math in float32
  (float64 for float64);
- ``ws_standardize`` forward / backward: one program per output channel (row), the row
  walked in blocks of ``BLOCK`` twice (statistics, then the output).

Reductions that are not per-row (``bias_gamma_act``'s dbias, ``se_residual``'s sums over
H*W) are done by torch on the float32 (float64) values the kernels write, in a fixed
order, so they are deterministic.

Triton is imported here, lazily for the package: ``import flamingo_rt`` works without it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._host_math import cdiv, next_power_of_2

_ACT_CODE = {"gelu": 0, "relu": 1, "silu": 2}
_BLOCK = 1024


def _fmt(x: Tensor) -> torch.memory_format:
    """Channels-last when x is (and not also contiguous), else contiguous: activations, and
    conv weights (each output channel's row is dense in either layout)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(x: Tensor) -> Tuple[Tensor, bool]:
    """x dense in its suggested memory format (a copy only for other strides), and whether
    it is channels-last."""
    fmt = _fmt(x)  # any other strides: a copy to NCHW
    x = x.contiguous(memory_format=fmt)
    return x, fmt == torch.channels_last


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        return tl.where(z > 0, z, 0.0)
    else:
        return z / (1.0 + tl.exp(-z))


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 1:
        return tl.where(z > 0, 1.0, 0.0)
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        return s * (1.0 + z * (1.0 - s))


@triton.jit
def _channel(offs, C, HW, CL: tl.constexpr):
    if CL:
        return offs % C
    else:
        return (offs // HW) % C


# ------------------------------------------------------------------ bias_gamma_act


@triton.jit
def _bga_fwd_kernel(x_ptr, b_ptr, y_ptr, total, C, HW, gamma, HAS_BIAS: tl.constexpr,
                    ACT: tl.constexpr, CL: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    if F64:
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        c = _channel(offs, C, HW, CL)
        z = z + tl.load(b_ptr + c, mask=mask, other=0.0).to(z.dtype)
    y = _act_fwd(z, ACT) * gamma
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bga_bwd_kernel(go_ptr, x_ptr, b_ptr, dz_ptr, total, C, HW, gamma, HAS_BIAS: tl.constexpr,
                    ACT: tl.constexpr, CL: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    if F64:
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        c = _channel(offs, C, HW, CL)
        z = z + tl.load(b_ptr + c, mask=mask, other=0.0).to(z.dtype)
    dz = g * _act_grad(z, ACT) * gamma
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def bias_gamma_act(x: Tensor, bias: Optional[Tensor], act: str, gamma: float) -> Tensor:
    """(N, C, H, W) -> gamma * act(x + bias[c]), dense in x's memory format."""
    xd, cl = _dense(x)
    y = torch.empty_like(xd)
    total = xd.numel()
    if total == 0:
        return y
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    b = bias.contiguous() if bias is not None else xd
    grid = (cdiv(total, _BLOCK),)
    _bga_fwd_kernel[grid](xd, b, y, total, C, HW, float(gamma), HAS_BIAS=bias is not None,
                          ACT=_ACT_CODE[act], CL=cl, F64=x.dtype == torch.float64, BLOCK=_BLOCK)
    return y


def bias_gamma_act_backward(grad_out: Tensor, x: Tensor, bias: Optional[Tensor], act: str,
                            gamma: float) -> Tuple[Tensor, Tensor]:
    """(dx in x's dtype and format, dbias (C,) summed in float32 / float64 from unrounded dx)."""
    xd, cl = _dense(x)
    go = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    dz = torch.empty_like(xd, dtype=_acc_dtype(x.dtype))
    total = xd.numel()
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    if total > 0:
        b = bias.contiguous() if bias is not None else xd
        grid = (cdiv(total, _BLOCK),)
        _bga_bwd_kernel[grid](go, xd, b, dz, total, C, HW, float(gamma), HAS_BIAS=bias is not None,
                              ACT=_ACT_CODE[act], CL=cl, F64=x.dtype == torch.float64, BLOCK=_BLOCK)
    db_dtype = bias.dtype if bias is not None else x.dtype
    return dz.to(x.dtype), dz.sum(dim=(0, 2, 3)).to(db_dtype)


# ------------------------------------------------------------------ se_residual


@triton.jit
def _se_operands(x_ptr, y_ptr, g_ptr, scale_ptr, offs, mask, C, HW, CL: tl.constexpr, F64: tl.constexpr):
    """The elementwise operands of se_residual at flat offsets ``offs``, in the computation
    dtype (float64 for float64 inputs, else float32): x, a second same-shaped tensor y (the
    shortcut in the forward, the output gradient in the backward), sigmoid of the gate logit
    of each element's (sample, channel), and the scalar scale."""
    c = _channel(offs, C, HW, CL)
    n = offs // (HW * C)
    ty = tl.float64 if F64 else tl.float32
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ty)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ty)
    gl = tl.load(g_ptr + n * C + c, mask=mask, other=0.0).to(ty)
    scale = tl.load(scale_ptr).to(ty)
    return x, y, 1.0 / (1.0 + tl.exp(-gl)), scale


@triton.jit
def _se_fwd_kernel(x_ptr, g_ptr, s_ptr, scale_ptr, y_ptr, total, C, HW, CL: tl.constexpr,
                   F64: tl.constexpr, BLOCK: tl.constexpr):
    """y = shortcut + scale * sigmoid(gate) * x."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    x, sc, sig, scale = _se_operands(x_ptr, s_ptr, g_ptr, scale_ptr, offs, mask, C, HW, CL, F64)
    tl.store(y_ptr + offs, (sc + scale * sig * x).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _se_bwd_kernel(go_ptr, x_ptr, g_ptr, scale_ptr, dx_ptr, gxp_ptr, total, C, HW,
                   CL: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """dx = go * scale * sig; gxp = go * x (float32 / float64, summed over H*W by torch)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    x, go, sig, scale = _se_operands(x_ptr, go_ptr, g_ptr, scale_ptr, offs, mask, C, HW, CL, F64)
    tl.store(dx_ptr + offs, (go * scale * sig).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(gxp_ptr + offs, (go * x).to(gxp_ptr.dtype.element_ty), mask=mask)


def se_residual(x: Tensor, gate_logits: Tensor, shortcut: Tensor, scale: Tensor) -> Tensor:
    """shortcut + scale * x * sigmoid(gate_logits)[:, :, None, None], dense in x's format."""
    xd, cl = _dense(x)
    sd = shortcut.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    y = torch.empty_like(xd)
    total = xd.numel()
    if total == 0:
        return y
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    grid = (cdiv(total, _BLOCK),)
    _se_fwd_kernel[grid](xd, gate_logits.contiguous(), sd, scale.reshape(1).to(x.dtype).contiguous(), y,
                         total, C, HW, CL=cl, F64=x.dtype == torch.float64, BLOCK=_BLOCK)
    return y


def se_residual_backward(grad_out: Tensor, x: Tensor, gate_logits: Tensor, shortcut: Tensor,
                         scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, d_gate_logits (N, C), d_scale (scale's shape)); the shortcut's gradient is grad_out."""
    xd, cl = _dense(x)
    go = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    ct = _acc_dtype(x.dtype)
    dx = torch.empty_like(xd)
    gxp = torch.empty_like(xd, dtype=ct)
    total = xd.numel()
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    if total > 0:
        grid = (cdiv(total, _BLOCK),)
        _se_bwd_kernel[grid](go, xd, gate_logits.contiguous(), scale.reshape(1).to(x.dtype).contiguous(),
                             dx, gxp, total, C, HW, CL=cl, F64=x.dtype == torch.float64, BLOCK=_BLOCK)
    gx = gxp.sum(dim=(2, 3))
    sig = torch.sigmoid(gate_logits.to(ct))
    s = scale.to(ct).reshape(())
    d_gate = gx * s * sig * (1.0 - sig)
    d_scale = (gx * sig).sum()
    return dx, d_gate.to(gate_logits.dtype), d_scale.reshape(scale.shape).to(scale.dtype)


# ------------------------------------------------------------------ ws_standardize


@triton.jit
def _ws_fwd_kernel(w_ptr, g_ptr, o_ptr, fan_in, inv_sqrt_fan, eps, F64: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * fan_in
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, fan_in, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + base + offs, mask=offs < fan_in, other=0.0).to(acc.dtype)
    mean = tl.sum(acc, axis=0) / fan_in
    acc2 = acc * 0.0
    for k0 in range(0, fan_in, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        m = offs < fan_in
        d = tl.where(m, tl.load(w_ptr + base + offs, mask=m, other=0.0).to(acc.dtype) - mean, 0.0)
        acc2 += d * d
    var = tl.sum(acc2, axis=0) / fan_in
    a = tl.load(g_ptr + row).to(acc.dtype) * inv_sqrt_fan / tl.sqrt(var + eps)
    for k0 in range(0, fan_in, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        m = offs < fan_in
        w = tl.load(w_ptr + base + offs, mask=m, other=0.0).to(acc.dtype)
        tl.store(o_ptr + base + offs, ((w - mean) * a).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ws_bwd_kernel(go_ptr, w_ptr, g_ptr, dw_ptr, dg_ptr, fan_in, inv_sqrt_fan, eps,
                   F64: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * fan_in
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, fan_in, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + base + offs, mask=offs < fan_in, other=0.0).to(acc.dtype)
    mean = tl.sum(acc, axis=0) / fan_in
    acc2 = acc * 0.0
    for k0 in range(0, fan_in, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        m = offs < fan_in
        d = tl.where(m, tl.load(w_ptr + base + offs, mask=m, other=0.0).to(acc.dtype) - mean, 0.0)
        acc2 += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=0) / fan_in + eps)
    sg = acc * 0.0
    sgx = acc * 0.0
    for k0 in range(0, fan_in, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        m = offs < fan_in
        w = tl.load(w_ptr + base + offs, mask=m, other=0.0).to(acc.dtype)
        go = tl.load(go_ptr + base + offs, mask=m, other=0.0).to(acc.dtype)
        xh = tl.where(m, (w - mean) * rstd, 0.0)
        sg += go
        sgx += go * xh
    sum_g = tl.sum(sg, axis=0)
    sum_gx = tl.sum(sgx, axis=0)
    tl.store(dg_ptr + row, (sum_gx * inv_sqrt_fan).to(dg_ptr.dtype.element_ty))
    s = tl.load(g_ptr + row).to(acc.dtype) * inv_sqrt_fan
    mg = sum_g / fan_in
    mgx = sum_gx / fan_in
    for k0 in range(0, fan_in, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        m = offs < fan_in
        w = tl.load(w_ptr + base + offs, mask=m, other=0.0).to(acc.dtype)
        go = tl.load(go_ptr + base + offs, mask=m, other=0.0).to(acc.dtype)
        xh = (w - mean) * rstd
        dw = rstd * s * (go - mg - xh * mgx)
        tl.store(dw_ptr + base + offs, dw.to(dw_ptr.dtype.element_ty), mask=m)


def _ws_block(fan_in: int) -> int:
    return max(16, min(1024, next_power_of_2(fan_in)))


def ws_standardize(weight: Tensor, gain: Tensor, eps: float) -> Tensor:
    """(O, I/g, kh, kw) -> the scaled standardized weight in weight's dtype, channels-last
    when weight is (and not also contiguous), else contiguous (rows are dense either way)."""
    w = weight.contiguous(memory_format=_fmt(weight))
    out = torch.empty_like(w)
    rows = w.shape[0]
    fan_in = w[0].numel()
    if rows == 0 or fan_in == 0:
        return out
    _ws_fwd_kernel[(rows,)](w, gain.contiguous().reshape(-1), out, fan_in, fan_in ** -0.5, float(eps),
                            F64=w.dtype == torch.float64, BLOCK=_ws_block(fan_in))
    return out


def ws_standardize_backward(grad_out: Tensor, weight: Tensor, gain: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(d_weight, d_gain) in the shapes and dtypes of weight and gain."""
    w = weight.contiguous(memory_format=_fmt(weight))
    go = grad_out.to(w.dtype).contiguous(memory_format=_fmt(weight))
    rows = w.shape[0]
    fan_in = w[0].numel()
    dw = torch.empty_like(w)
    dg = torch.empty(rows, dtype=gain.dtype, device=gain.device)
    if rows > 0 and fan_in > 0:
        _ws_bwd_kernel[(rows,)](go, w, gain.contiguous().reshape(-1), dw, dg, fan_in, fan_in ** -0.5,
                                float(eps), F64=w.dtype == torch.float64, BLOCK=_ws_block(fan_in))
    return dw, dg.reshape(gain.shape)
