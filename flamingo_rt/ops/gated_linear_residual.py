"""``flamingo_rt::gated_linear_residual``: ``x + gate * (o W^T)``, the output projection of a
Flamingo cross-attention branch and its tanh-gated residual add as one op (``torch.library``,
fake implementation and autograd).

The module path (``to_out`` Linear, then ``addcmul``) keeps the projection's input o (for
W's gradient) and its output y = o W^T (for the gate's gradient sum(dz * y)): y is as wide
as the text stream (rows x D; 64 MiB for 8192 tokens of width 2048 in float32). This op
keeps o only: the gate's gradient is the same sum taken on the other side of the product,

    sum(dz * (o W^T)) = <W, dz^T o>,

and dz^T o is W's (ungated) gradient, computed anyway. The incoming gradient is not scaled
into a second (rows, D) tensor either: dW = gate * dz^T o, do = gate * (dz W), dx = dz.

Under autocast (``compute_dtype`` bfloat16/float16) the product runs in the compute dtype as
autocast's ``linear`` does and the sum x + gate * y in x's dtype (as ``addcmul`` promotes);
parameter gradients come back in the parameters' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cpu_gemm import BLOCK_BYTES, block_rows, mm
from .precision import acc_dtype as _acc
from .precision import compute_dtype as _compute_dtype
from . import widening_gemm
from ._eager import EagerOp

__all__ = ["gated_linear_residual", "module_gated_linear_residual", "check_gate", "gate_weight_grads"]


def check_gate(gate: Optional[Tensor], x: Tensor) -> None:
    """A residual branch's gate is None or a one-element tensor in x's dtype."""
    if gate is not None and (gate.numel() != 1 or gate.dtype != x.dtype):
        raise ValueError(f"expected a one-element gate of x's dtype {x.dtype}, got shape {tuple(gate.shape)} "
                         f"and dtype {gate.dtype}")


def gate_weight_grads(dw_raw: Tensor, weight: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """For a branch ``x + gate * (a W^T)``: from W's ungated gradient ``dz^T a`` (any dtype),
    (W's gradient gate * dz^T a in the accumulation dtype, the gate's gradient
    sum(dz * a W^T) = <W, dz^T a> in the gate's dtype and shape). The branch's output is
    never needed."""
    acc = _acc(weight.dtype)
    dw = dw_raw.to(acc)
    dgate = torch.dot(dw.reshape(-1), weight.to(acc).reshape(-1)).reshape(gate.shape).to(gate.dtype)
    return dw.mul_(gate.reshape(()).to(acc)), dgate


def _glr_op_impl(x: Tensor, o: Tensor, weight: Tensor, gate: Optional[Tensor], compute_dtype: torch.dtype) -> Tensor:
    """x (R, D), o (R, K), weight (D, K), gate (1,) in x's dtype or None -> (R, D) in x's dtype,
    in row blocks (no whole (R, D) product besides the output)."""
    with torch.autocast(x.device.type, enabled=False):
        R, D = x.shape
        wt = weight.to(compute_dtype).t()
        oc = o.to(compute_dtype)
        z = torch.empty_like(x)
        g = None if gate is None else gate.reshape(())
        step = block_rows(R, BLOCK_BYTES // max(1, D * x.element_size()))
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            y = mm(oc[r0:r1], wt)
            if g is None:
                torch.add(x[r0:r1], y, out=z[r0:r1])
            else:
                torch.addcmul(x[r0:r1], g, y, out=z[r0:r1])
    return z


_glr_op = torch.library.custom_op("flamingo_rt::gated_linear_residual", mutates_args=())(_glr_op_impl)


@_glr_op.register_fake
def _(x, o, weight, gate, compute_dtype):
    return torch.empty_like(x)


def _glr_bwd_op_impl(dz: Tensor, o: Tensor, weight: Tensor, gate: Optional[Tensor],
                     compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(do (R, K) in o's dtype, dW (D, K) in W's dtype, dgate (1,) or empty)."""
    with torch.autocast(dz.device.type, enabled=False):
        cd = compute_dtype
        dzc, oc, wc = dz.to(cd), o.to(cd), weight.to(cd)
        acc = _acc(weight.dtype)
        if cd == torch.bfloat16 and acc == torch.float32 and widening_gemm.available():
            dw = widening_gemm.mm(dzc.t(), oc)  # float32-accumulated, dz^T read in place
        else:
            dw = mm(dzc.t(), oc).to(acc)  # ungated dz^T o
        do = mm(dzc, wc)
        if gate is None:
            return do.to(o.dtype), dw.to(weight.dtype), dz.new_empty(0)
        dw, dgate = gate_weight_grads(dw, weight, gate)
        do = do.mul_(gate.reshape(()).to(do.dtype)).to(o.dtype)
    return do, dw.to(weight.dtype), dgate


_glr_bwd_op = torch.library.custom_op("flamingo_rt::gated_linear_residual_backward", mutates_args=())(_glr_bwd_op_impl)


@_glr_bwd_op.register_fake
def _(dz, o, weight, gate, compute_dtype):
    return (torch.empty_like(o), torch.empty_like(weight),
            torch.empty_like(gate) if gate is not None else dz.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, o, weight, gate, compute_dtype = inputs
    ctx.save_for_backward(o, weight, gate)
    ctx.compute_dtype = compute_dtype


def _backward(ctx, dz):
    o, weight, gate = ctx.saved_tensors
    do, dw, dgate = _glr_bwd(dz.contiguous(), o, weight, gate, ctx.compute_dtype)
    return dz, do, dw, (dgate if gate is not None else None), None


_glr_op.register_autograd(_backward, setup_context=_setup_context)

# plain eager calls skip the custom-op machinery (_eager.py); compile / export see the ops
_glr = EagerOp(_glr_op, _glr_op_impl, _setup_context, _backward)
_glr_bwd = EagerOp(_glr_bwd_op, _glr_bwd_op_impl)


def gated_linear_residual(x: Tensor, o: Tensor, weight: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """``x + gate * F.linear(o, weight)`` (``x + F.linear(o, weight)`` when gate is None).

    Args:
        x: (..., D) the residual stream, any float dtype.
        o: (..., K) the branch's input to the projection (the attention output), same leading
            shape as x.
        weight: (D, K) the projection (no bias).
        gate: a one-element tensor in x's dtype (e.g. ``tanh(attn_gate)``; its gradient is
            exact), or None.
    Returns:
        (..., D) in x's dtype; the product in the autocast dtype when autocast is on for x's
        device (and x is not float64), else in x's dtype.
    """
    D, K = x.shape[-1], o.shape[-1]
    if weight.shape != (D, K) or o.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"expected o (..., K) with x's leading shape {tuple(x.shape[:-1])} and weight ({D}, K); "
                         f"got o {tuple(o.shape)}, weight {tuple(weight.shape)}")
    check_gate(gate, x)
    z = _glr(x.reshape(-1, D), o.reshape(-1, K), weight, gate, _compute_dtype(x))
    return z.view(x.shape)


def module_gated_linear_residual(linear, x: Tensor, o: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """``x + gate * linear(o)`` for a bias-free ``nn.Linear``-like module: through
    :func:`gated_linear_residual` when a gradient will be taken (training, eager), else the
    module and ``addcmul`` (inference keeps the module's small-batch decode kernels)."""
    w = linear.weight
    training = torch.is_grad_enabled() and (
        x.requires_grad or o.requires_grad or w.requires_grad or (gate is not None and gate.requires_grad))
    if not training or linear.bias is not None or torch.compiler.is_compiling():
        y = linear(o)
        return x + y if gate is None else torch.addcmul(x, gate, y)
    return gated_linear_residual(x, o, w, gate)
