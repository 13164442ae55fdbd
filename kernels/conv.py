"""Triton implicit-GEMM 2-D convolution over NHWC (channels-last) activations, with the bias
and a scaled activation fused into the epilogue; for the frozen NFNet GPU path (no autograd).

    y[n, ho, wo, co] = gamma * act(bias[co] + sum_{kh, kw, ci} x[n, ho*s - pt + kh, wo*s - pl + kw, g*Cg + ci]
                                                            * w[kh, kw, ci, co])

GEMM view: M = N * Ho * Wo output pixels, N_gemm = C_out / groups per group (grid axis 2),
K = kh * kw * C_in / groups walked as (kh, kw) then blocks of input channels, so each A
tile is a [BLOCK_M, BLOCK_K] gather of contiguous channel runs (coalesced in NHWC) with the
zero padding (TF-style SAME, asymmetric allowed) applied by masks: no padded copy of x. The
weight is packed once as (kh, kw, C_in/groups, C_out) so B tiles are contiguous in C_out.
Accumulation in float32 (tl.dot; tf32 for float32 inputs only when torch allows tf32 for
matmuls). Autotuned on the GPU over a small space of tile shapes; under
``TRITON_INTERPRET=1`` one small fixed configuration.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._host_math import cdiv
from ._launch_policy import interpreting

_ACT = {"none": 0, "gelu": 1, "relu": 2, "silu": 3}


@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                 NB, H, W, Ho, Wo, C_out, KH, KW, stride, pad_t, pad_l, cin_g, cout_g,
                 sxn, sxh, sxw, sxc, syn, syh, syw, syc, gamma,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    M = NB * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < cout_g
    wo = offs_m % Wo
    t = offs_m // Wo
    ho = t % Ho
    nb = (t // Ho).to(tl.int64)
    co = grp * cout_g + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(0, KH):
        hi = ho * stride - pad_t + kh
        for kw in range(0, KW):
            wi = wo * stride - pad_l + kw
            ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            x_row = nb * sxn + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw + (grp * cin_g).to(tl.int64) * sxc
            w_row = (kh * KW + kw) * cin_g
            for k0 in range(0, cin_g, BLOCK_K):
                ck = k0 + tl.arange(0, BLOCK_K)
                k_ok = ck < cin_g
                a = tl.load(x_ptr + x_row[:, None] + ck[None, :] * sxc,
                            mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + (w_row + ck)[:, None].to(tl.int64) * C_out + co[None, :],
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:  # the CPU interpreter's dot mishandles 16-bit floats
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        acc = tl.where(acc > 0, acc, 0.0)
    elif ACT == 3:
        acc = acc / (1.0 + tl.exp(-acc))
    acc = acc * gamma
    y_off = nb[:, None] * syn + ho.to(tl.int64)[:, None] * syh + wo.to(tl.int64)[:, None] * syw \
        + co.to(tl.int64)[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _configs():
    out = []
    for bm, bn, bk, warps, stages in (
        (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
        (128, 128, 64, 8, 3), (64, 32, 32, 2, 4), (128, 32, 64, 4, 3),
    ):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                 num_warps=warps, num_stages=stages))
    return out


_conv_kernel_tuned = triton.autotune(
    configs=_configs(), key=["C_out", "cin_g", "cout_g", "KH", "KW", "stride", "H", "W"],
)(_conv_kernel)


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pack_weight(w: Tensor) -> Tensor:
    """(C_out, C_in/groups, kh, kw) -> (kh, kw, C_in/groups, C_out) contiguous (B operand)."""
    return w.permute(2, 3, 1, 0).contiguous()


def conv2d_nhwc(x: Tensor, w: Tensor, bias: Optional[Tensor], stride: int = 1, groups: int = 1,
                act: str = "none", gamma: float = 1.0, padding: str = "same",
                packed: Optional[Tensor] = None) -> Tensor:
    """``gamma * act(conv2d(x, w, bias))`` with TF-style SAME (or ``"valid"``) padding.

    Args:
        x: (N, C_in, H, W) float32 / bfloat16 / float16 (made channels-last if it is not).
        w: (C_out, C_in/groups, kh, kw) in x's dtype (ignored when ``packed`` is given,
            except for its shape).
        bias: (C_out,) or None.
        act: ``"none"``, ``"gelu"`` (exact erf), ``"relu"`` or ``"silu"``.
        packed: ``pack_weight(w)``, to skip packing per call.

    Returns:
        (N, C_out, Ho, Wo) channels-last, x's dtype; SAME: Ho = ceil(H / stride).
    """
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"expected x (N, C, H, W) and w (O, I/g, kh, kw), got {tuple(x.shape)}, {tuple(w.shape)}")
    NB, C_in, H, W = x.shape
    C_out, cin_g, KH, KW = w.shape
    if C_in != cin_g * groups or C_out % groups:
        raise ValueError(f"expected C_in = {cin_g * groups} and C_out divisible by groups {groups}, "
                         f"got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if act not in _ACT:
        raise ValueError(f"expected act in {tuple(_ACT)}, got {act!r}")
    if padding == "same":
        pt, _ = same_padding(H, KH, stride)
        pl, _ = same_padding(W, KW, stride)
        Ho, Wo = -(-H // stride), -(-W // stride)
    elif padding == "valid":
        pt = pl = 0
        Ho, Wo = (H - KH) // stride + 1, (W - KW) // stride + 1
    else:
        raise ValueError(f"expected padding 'same' or 'valid', got {padding!r}")
    x = x.contiguous(memory_format=torch.channels_last)
    wp = packed if packed is not None else pack_weight(w.to(x.dtype))
    y = torch.empty((NB, C_out, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    cout_g = C_out // groups
    b = bias.to(x.dtype).contiguous() if bias is not None else wp
    use_tf32 = (x.dtype == torch.float32 and x.is_cuda and not interpreting()
                and torch.backends.cuda.matmul.allow_tf32)
    prec = "tf32" if use_tf32 else "ieee"
    M = NB * Ho * Wo
    args = (x, wp, b, y, NB, H, W, Ho, Wo, C_out, KH, KW, stride, pt, pl, cin_g, cout_g,
            x.stride(0), x.stride(2), x.stride(3), x.stride(1),
            y.stride(0), y.stride(2), y.stride(3), y.stride(1), float(gamma))
    meta = dict(ACT=_ACT[act], HAS_BIAS=bias is not None, PRECISION=prec,
                UPCAST=interpreting() and x.dtype != torch.float32)
    if interpreting() or not x.is_cuda:
        bm, bn, bk = 16, 16, 16
        grid = (cdiv(M, bm), cdiv(cout_g, bn), groups)
        _conv_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        def grid(cfg):
            return (cdiv(M, cfg["BLOCK_M"]), cdiv(cout_g, cfg["BLOCK_N"]), groups)

        _conv_kernel_tuned[grid](*args, **meta)
    return y
