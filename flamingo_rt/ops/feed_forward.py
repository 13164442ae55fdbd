"""``flamingo_rt::feed_forward``: LayerNorm -> Linear -> GELU / squared ReLU -> Linear as one
op (``torch.library``, fake implementation and autograd) that keeps less for the backward.

The module path keeps, per feed-forward, the normalized input (for fc1's weight gradient),
the pre-activation h (for the activation's backward) and the activation a (for fc2's weight
gradient). This op keeps only the input x (which the residual stream holds anyway) and h,
and recomputes the normalization and a in the backward (elementwise work, no products):
for the resampler's FF (64 latents x 1024 -> 4096) and the cross-attention blocks' FF
(2048 -> 8192) that is 2 of 3 activation tensors of the width-4x kind less per FF.

Under autocast (``compute_dtype`` bfloat16/float16) it computes what autocast does on the
module path: the LayerNorm in float32, the products in the compute dtype, the output in
the compute dtype; parameter gradients come back in the parameters' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_gemm import mm

__all__ = ["feed_forward", "module_feed_forward", "FF_KINDS"]

FF_KINDS = ("gelu", "sqrelu")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _norm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float):
    """x (R, D) -> (LN(x) in the accumulation dtype, x there, mean, rstd, gamma, beta there)."""
    a = _acc(x.dtype)
    xf, g, b = x.to(a), gamma.to(a), beta.to(a)
    xn, mean, rstd = torch.native_layer_norm(xf, [xf.shape[-1]], g, b, eps)
    return xn, xf, mean, rstd, g, b


def _act(h: Tensor, kind: str) -> Tensor:
    return F.gelu(h) if kind == "gelu" else torch.relu(h).square()


@torch.library.custom_op("flamingo_rt::feed_forward", mutates_args=())
def _ff_op(x: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor, eps: float, kind: str,
           compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Returns (y (R, D), h (R, inner)); h is returned to be saved for the backward."""
    with torch.autocast(x.device.type, enabled=False):
        xn = _norm(x, gamma, beta, eps)[0].to(compute_dtype)
        h = mm(xn, w1.to(compute_dtype).t())
        y = mm(_act(h, kind), w2.to(compute_dtype).t())
    return y, h


@_ff_op.register_fake
def _(x, gamma, beta, w1, w2, eps, kind, compute_dtype):
    return (x.new_empty((x.shape[0], w2.shape[0]), dtype=compute_dtype),
            x.new_empty((x.shape[0], w1.shape[0]), dtype=compute_dtype))


@torch.library.custom_op("flamingo_rt::feed_forward_backward", mutates_args=())
def _ff_bwd_op(dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor, h: Tensor,
               eps: float, kind: str, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx (or empty), dgamma, dbeta, dw1, dw2).

    Ordered so that the (R, inner) temporaries (da, dh, the recomputed activation) and the
    compute-dtype weight casts live one or two at a time: dh first, then the two weight
    gradients, then dx (measured on OpenFlamingo-3B's block, 2048 tokens, forward+backward: the
    peak added memory 528 -> 448 MiB in float32, 450 -> 364 MiB under bf16 autocast)."""
    with torch.autocast(x.device.type, enabled=False):
        cd = h.dtype
        dy = dy.to(cd)
        da = mm(dy, w2.to(cd))
        if kind == "gelu":
            dh = torch.ops.aten.gelu_backward(da, h)
        else:
            dh = da.mul_(2 * torch.relu(h))
        del da
        dw2 = mm(dy.t(), _act(h, kind)).to(w2.dtype)
        xn, xf, mean, rstd, g, b = _norm(x, gamma, beta, eps)
        dw1 = mm(dh.t(), xn.to(cd)).to(w1.dtype)
        dxn = mm(dh, w1.to(cd)).to(xf.dtype)
        del dh
        dx, dg, db = torch.ops.aten.native_layer_norm_backward(
            dxn, xf, [xf.shape[-1]], mean, rstd, g, b, [need_dx, True, True])
    dx = dx.to(x.dtype) if need_dx else x.new_empty(0)
    return dx, dg.to(gamma.dtype), db.to(beta.dtype), dw1, dw2


@_ff_bwd_op.register_fake
def _(dy, x, gamma, beta, w1, w2, h, eps, kind, need_dx):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), gamma.new_empty(gamma.shape),
            beta.new_empty(beta.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape))


def _setup_context(ctx, inputs, output):
    x, gamma, beta, w1, w2, eps, kind, compute_dtype = inputs
    ctx.save_for_backward(x, gamma, beta, w1, w2, output[1])
    ctx.eps, ctx.kind = eps, kind


def _backward(ctx, dy, dh_unused):
    x, gamma, beta, w1, w2, h = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, dg, db, dw1, dw2 = _ff_bwd_op(dy.contiguous(), x, gamma, beta, w1, w2, h, ctx.eps, ctx.kind, need_dx)
    return (dx if need_dx else None), dg, db, dw1, dw2, None, None, None


_ff_op.register_autograd(_backward, setup_context=_setup_context)


def feed_forward(x: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor, eps: float = 1e-5,
                 kind: str = "gelu") -> Tensor:
    """``fc2(act(fc1(LayerNorm(x))))`` with bias-free fc1 (inner, D) and fc2 (D, inner).

    Args:
        x: (..., D) any float dtype; gamma, beta: (D,) LayerNorm affine; w1: (inner, D);
        w2: (D, inner); kind: ``"gelu"`` (exact erf) or ``"sqrelu"`` (squared ReLU).
    Returns:
        (..., D) in the autocast dtype when autocast is on for x's device (and x is not
        float64), else in x's dtype.
    """
    if kind not in FF_KINDS:
        raise ValueError(f"unknown feed-forward kind {kind!r}; expected one of {FF_KINDS}")
    D = x.shape[-1]
    if gamma.shape != (D,) or beta.shape != (D,) or w1.dim() != 2 or w1.shape[1] != D or w2.shape != (D, w1.shape[0]):
        raise ValueError(
            f"expected gamma/beta ({D},), w1 (inner, {D}), w2 ({D}, inner); got {tuple(gamma.shape)}, "
            f"{tuple(beta.shape)}, {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    dev = x.device.type
    cd: Optional[torch.dtype] = None
    if dev in ("cpu", "cuda") and x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        cd = torch.get_autocast_dtype(dev)
    y, _ = _ff_op(x.reshape(-1, D), gamma, beta, w1, w2, float(eps), kind, cd or x.dtype)
    return y.view(*x.shape[:-1], D)


def module_feed_forward(ff, x: Tensor) -> Tensor:
    """``ff(x)`` for a feed-forward module with ``norm`` (LayerNorm), bias-free ``fc1`` /
    ``fc2`` and ``kind`` (:class:`flamingo_rt.models.ff.FeedForward`): through
    :func:`feed_forward` when a gradient will be taken (training), else the module itself
    (inference keeps its small-batch decode kernels)."""
    n, f1, f2 = ff.norm, ff.fc1, ff.fc2
    training = torch.is_grad_enabled() and (x.requires_grad or f1.weight.requires_grad or n.weight.requires_grad)
    if (not training or f1.bias is not None or f2.bias is not None or n.weight is None or n.bias is None
            or torch.compiler.is_compiling()):
        return ff(x)
    return feed_forward(x, n.weight, n.bias, f1.weight, f2.weight, n.eps, ff.kind)
