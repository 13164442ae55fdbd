"""NFNet ops: ``flamingo_rt::ws_standardize``, ``flamingo_rt::bias_gamma_act``,
``flamingo_rt::se_residual`` (each with a ``*_backward`` op), and :func:`ws_conv2d`.

Registered with ``torch.library`` (fake implementations and autograd included), so
``torch.compile(fullgraph=True)`` and ``torch.export`` see opaque ops whose backend
(reference, cpu, cuda, triton) is chosen per call. Backends register under the op names
``"ws_standardize"``, ``"bias_gamma_act"``, ``"se_residual"`` and ``NAME + ".backward"``
with the argument lists of the reference functions in
:mod:`flamingo_rt.ops.reference.nfnet`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend as _backend
from . import cpu_gemm, half_widening
from . import winograd_conv as _winograd
from .linear import linear as _linear
from ._eager import EagerOp
from ._outputs import act_format as _fmt
from ._outputs import new_act_like as _new_act
from ._outputs import new_like as _new
from ._outputs import new_weight_like as _new_weight
from .reference import nfnet as _ref


def _is_fake(t: Tensor) -> bool:
    return t.device.type == "meta" or type(t) is not Tensor and not isinstance(t, torch.nn.Parameter)


WS_OP = "ws_standardize"
BGA_OP = "bias_gamma_act"
SE_OP = "se_residual"




# --------------------------------------------------------------------------------------
# ws_standardize
# --------------------------------------------------------------------------------------


def _ws_op_impl(weight: Tensor, gain: Tensor, eps: float, backend: str) -> Tensor:
    return _backend.get(WS_OP, backend)(weight, gain, eps).contiguous(memory_format=_fmt(weight))


_ws_op = torch.library.custom_op("flamingo_rt::ws_standardize", mutates_args=())(_ws_op_impl)


@_ws_op.register_fake
def _(weight, gain, eps, backend):
    return _new_weight(weight)


def _ws_bwd_op_impl(
    grad_out: Tensor, weight: Tensor, gain: Tensor, eps: float, backend: str
) -> Tuple[Tensor, Tensor]:
    dw, dg = _backend.get(WS_OP + ".backward", backend)(grad_out, weight, gain, eps)
    return dw.contiguous(memory_format=_fmt(weight)), dg.contiguous()


_ws_bwd_op = torch.library.custom_op("flamingo_rt::ws_standardize_backward", mutates_args=())(_ws_bwd_op_impl)


@_ws_bwd_op.register_fake
def _(grad_out, weight, gain, eps, backend):
    return _new_weight(weight), _new(gain)


def _ws_setup(ctx, inputs, output):
    weight, gain, eps, backend = inputs
    ctx.save_for_backward(weight, gain)
    ctx.eps, ctx.backend = eps, backend


def _ws_backward(ctx, grad_out):
    weight, gain = ctx.saved_tensors
    dw, dg = _ws_bwd(grad_out.contiguous(memory_format=_fmt(weight)), weight, gain, ctx.eps, ctx.backend)
    return dw, dg, None, None


_ws_op.register_autograd(_ws_backward, setup_context=_ws_setup)

# plain eager calls skip the custom-op machinery (_eager.py); compile / export see the ops
_ws = EagerOp(_ws_op, _ws_op_impl, _ws_setup, _ws_backward)
_ws_bwd = EagerOp(_ws_bwd_op, _ws_bwd_op_impl)


def _ws_bf16_op_impl(weight: Tensor, gain: Tensor, eps: float) -> Tensor:
    """:func:`ws_standardize` of a float32 weight, rounded once to bf16 (the C++ kernel writes
    it so): bitwise the float32 op's output cast to bf16, as bf16 autocast casts it for the
    convolution. Its backward takes the bf16 gradient as is (no float32 copy first)."""
    return torch.ops.flamingo_rt_C.ws_standardize_bf16(weight, gain, eps)


_ws_bf16_op = torch.library.custom_op("flamingo_rt::ws_standardize_bf16", mutates_args=())(_ws_bf16_op_impl)


@_ws_bf16_op.register_fake
def _(weight, gain, eps):
    return _new_weight(weight).to(torch.bfloat16)


def _ws_bf16_setup(ctx, inputs, output):
    weight, gain, eps = inputs
    ctx.save_for_backward(weight, gain)
    ctx.eps = eps


def _ws_bf16_backward(ctx, grad_out):
    weight, gain = ctx.saved_tensors
    dw, dg = _ws_bwd(grad_out.contiguous(memory_format=_fmt(weight)), weight, gain, ctx.eps, "cpu")
    return dw, dg, None


_ws_bf16_op.register_autograd(_ws_bf16_backward, setup_context=_ws_bf16_setup)
_ws_bf16 = EagerOp(_ws_bf16_op, _ws_bf16_op_impl, _ws_bf16_setup, _ws_bf16_backward)


def _ws_bf16_ok(weight: Tensor, gain: Tensor, backend: Optional[str]) -> bool:
    """Under CPU bf16 autocast, a float32 weight for the convolution is standardized straight
    into bf16 by the C++ kernel (autocast would cast the float32 result: one more pass, and
    the backward one more over the gradient). F0's bf16 training step: the weights' casts
    and their gradients' were ~35 of its ~500 ms."""
    if not (weight.device.type == "cpu" and weight.dtype == torch.float32 and gain.dtype == torch.float32):
        return False
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    if torch.compiler.is_compiling() or _backend.exporting():
        return False
    if _backend.resolve(WS_OP, backend, weight.device) != "cpu":
        return False
    return _has_kernel("ws_standardize_bf16")


@functools.lru_cache(maxsize=None)
def _has_kernel(name: str) -> bool:
    """flamingo_rt._C is built and loaded, and has the op ``flamingo_rt_C::<name>``."""
    from .. import _ext

    return _ext.load() and hasattr(torch.ops.flamingo_rt_C, name)


_backend.register(WS_OP, "reference", _ref.ws_standardize)
_backend.register(WS_OP + ".backward", "reference", _ref.ws_standardize_backward)


def _check_ws(weight: Tensor, gain: Tensor) -> None:
    if weight.dim() != 4:
        raise ValueError(f"expected weight of shape (O, I/groups, kh, kw), got {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point weight, got {weight.dtype}")
    if gain.numel() != weight.shape[0]:
        raise ValueError(
            f"expected gain with {weight.shape[0]} elements (shape ({weight.shape[0]}, 1, 1, 1)), "
            f"got shape {tuple(gain.shape)}"
        )
    if gain.dtype != weight.dtype:
        raise TypeError(f"expected gain of weight's dtype {weight.dtype}, got {gain.dtype}")


def ws_standardize(weight: Tensor, gain: Tensor, eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """Scaled weight standardization of a conv weight (timm's ``ScaledStdConv2d``).

    ``(w - mean) / sqrt(var + eps) * gain * fan_in ** -0.5`` per output channel, with
    the biased variance over fan_in = I/groups * kh * kw.

    Args:
        weight: (O, I/groups, kh, kw), float32 / bfloat16 / float16 / float64.
        gain: (O, 1, 1, 1) (any shape with O elements), same dtype as weight.
        eps: added to the variance inside the square root (timm's ``std_conv_eps``).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            default from ``FLAMINGO_RT_BACKEND``, else ``auto``.

    Returns:
        (O, I/groups, kh, kw) standardized weight in weight's dtype: channels-last when
        weight is (and not also contiguous), else contiguous; the weight's gradient
        likewise (a channels-last model trains without reordering its weights).
    """
    _check_ws(weight, gain)
    be = _backend.resolve(WS_OP, backend, weight.device)
    if _backend.exporting():  # the kernel itself, no Python op in the exported graph
        return _backend.get(WS_OP, be)(weight, gain, float(eps))
    return _ws(weight, gain, float(eps), be)


# --------------------------------------------------------------------------------------
# bias_gamma_act
# --------------------------------------------------------------------------------------


def _bga_op_impl(x: Tensor, bias: Optional[Tensor], act: str, gamma: float, backend: str) -> Tensor:
    return _backend.get(BGA_OP, backend)(x, bias, act, gamma).contiguous(memory_format=_fmt(x))


_bga_op = torch.library.custom_op("flamingo_rt::bias_gamma_act", mutates_args=())(_bga_op_impl)


@_bga_op.register_fake
def _(x, bias, act, gamma, backend):
    return _new_act(x)


def _bga_bwd_op_impl(
    grad_out: Tensor, x: Tensor, bias: Optional[Tensor], act: str, gamma: float, backend: str
) -> Tuple[Tensor, Tensor]:
    dx, db = _backend.get(BGA_OP + ".backward", backend)(grad_out, x, bias, act, gamma)
    return dx.contiguous(memory_format=_fmt(x)), db.contiguous()


_bga_bwd_op = torch.library.custom_op("flamingo_rt::bias_gamma_act_backward", mutates_args=())(_bga_bwd_op_impl)


@_bga_bwd_op.register_fake
def _(grad_out, x, bias, act, gamma, backend):
    db_dtype = bias.dtype if bias is not None else x.dtype
    return _new_act(x), x.new_empty((x.shape[1],), dtype=db_dtype)


def _bga_setup(ctx, inputs, output):
    x, bias, act, gamma, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.has_bias = bias is not None
    ctx.act, ctx.gamma, ctx.backend = act, gamma, backend


def _bga_backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    dx, db = _bga_bwd(grad_out.contiguous(memory_format=_fmt(x)), x, bias, ctx.act, ctx.gamma, ctx.backend)
    return dx, (db if ctx.has_bias else None), None, None, None


_bga_op.register_autograd(_bga_backward, setup_context=_bga_setup)
_bga = EagerOp(_bga_op, _bga_op_impl, _bga_setup, _bga_backward)
_bga_bwd = EagerOp(_bga_bwd_op, _bga_bwd_op_impl)

_backend.register(BGA_OP, "reference", _ref.bias_gamma_act)
_backend.register(BGA_OP + ".backward", "reference", _ref.bias_gamma_act_backward)


def bias_gamma_act(
    x: Tensor,
    bias: Optional[Tensor],
    act: str = "gelu",
    gamma: float = 1.0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """``gamma * act(x + bias[None, :, None, None])``, fused.

    Args:
        x: (N, C, H, W), float32 / bfloat16 / float16 / float64, any memory format.
        bias: (C,) in x's dtype, or None.
        act: ``"gelu"`` (exact erf), ``"relu"`` or ``"silu"``.
        gamma: output scale (e.g. timm's GELU gamma 1.7015043497085571, times beta).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            default from ``FLAMINGO_RT_BACKEND``, else ``auto``.

    Returns:
        (N, C, H, W) in x's dtype and memory format (NCHW or channels-last).
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point x, got {x.dtype}")
    if bias is not None:
        if bias.shape != (x.shape[1],):
            raise ValueError(f"expected bias of shape (C,) = ({x.shape[1]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"expected bias of x's dtype {x.dtype}, got {bias.dtype}")
    if act not in _ref.ACTS:
        raise ValueError(f"expected act to be one of {_ref.ACTS}, got {act!r}")
    be = _backend.resolve(BGA_OP, backend, x.device)
    if _backend.exporting():  # the kernel itself, no Python op in the exported graph
        return _backend.get(BGA_OP, be)(x, bias, act, float(gamma))
    return _bga(x, bias, act, float(gamma), be)


# --------------------------------------------------------------------------------------
# se_residual
# --------------------------------------------------------------------------------------


def _se_op_impl(x: Tensor, gate_logits: Tensor, shortcut: Tensor, scale: Tensor, backend: str) -> Tensor:
    return _backend.get(SE_OP, backend)(x, gate_logits, shortcut, scale).contiguous(memory_format=_fmt(x))


_se_op = torch.library.custom_op("flamingo_rt::se_residual", mutates_args=())(_se_op_impl)


@_se_op.register_fake
def _(x, gate_logits, shortcut, scale, backend):
    return _new_act(x)


def _se_bwd_op_impl(
    grad_out: Tensor, x: Tensor, gate_logits: Tensor, shortcut: Tensor, scale: Tensor, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dg, ds = _backend.get(SE_OP + ".backward", backend)(grad_out, x, gate_logits, shortcut, scale)
    return dx.contiguous(memory_format=_fmt(x)), dg.contiguous(), ds.contiguous()


_se_bwd_op = torch.library.custom_op("flamingo_rt::se_residual_backward", mutates_args=())(_se_bwd_op_impl)


@_se_bwd_op.register_fake
def _(grad_out, x, gate_logits, shortcut, scale, backend):
    return _new_act(x), _new(gate_logits), _new(scale)


def _se_setup(ctx, inputs, output):
    x, gate_logits, shortcut, scale, backend = inputs
    ctx.save_for_backward(x, gate_logits, shortcut, scale)
    ctx.backend = backend


def _se_backward(ctx, grad_out):
    x, gate_logits, shortcut, scale = ctx.saved_tensors
    dx, dg, ds = _se_bwd(grad_out.contiguous(memory_format=_fmt(x)), x, gate_logits, shortcut, scale, ctx.backend)
    return dx, dg, grad_out, ds, None


_se_op.register_autograd(_se_backward, setup_context=_se_setup)
_se = EagerOp(_se_op, _se_op_impl, _se_setup, _se_backward)
_se_bwd = EagerOp(_se_bwd_op, _se_bwd_op_impl)

_backend.register(SE_OP, "reference", _ref.se_residual)
_backend.register(SE_OP + ".backward", "reference", _ref.se_residual_backward)


def se_residual(
    x: Tensor, gate_logits: Tensor, shortcut: Tensor, scale: Union[Tensor, float], *, backend: Optional[str] = None
) -> Tensor:
    """NormFree block tail: ``shortcut + scale * x * sigmoid(gate_logits)[:, :, None, None]``.

    Args:
        x: (N, C, H, W) residual-branch output (conv3 output, before SE), float dtype.
        gate_logits: (N, C) pre-sigmoid SE output, x's dtype.
        shortcut: (N, C, H, W) in x's dtype.
        scale: 0-dim or (1,) tensor (``alpha * attn_gain * skipinit_gain``), gradient exact;
            a Python float is turned into a 0-dim tensor.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            default from ``FLAMINGO_RT_BACKEND``, else ``auto``.

    Returns:
        (N, C, H, W) in x's dtype and memory format (NCHW or channels-last).
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point x, got {x.dtype}")
    N, C = x.shape[0], x.shape[1]
    if gate_logits.shape != (N, C):
        raise ValueError(f"expected gate_logits of shape (N, C) = ({N}, {C}), got {tuple(gate_logits.shape)}")
    if shortcut.shape != x.shape:
        raise ValueError(f"expected shortcut of x's shape {tuple(x.shape)}, got {tuple(shortcut.shape)}")
    if gate_logits.dtype != x.dtype or shortcut.dtype != x.dtype:
        raise TypeError(
            f"expected x, gate_logits, shortcut of one dtype, got {x.dtype}, {gate_logits.dtype}, {shortcut.dtype}"
        )
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=x.dtype, device=x.device)
    if scale.numel() != 1 or scale.dim() > 1:
        raise ValueError(f"expected scale of shape () or (1,), got {tuple(scale.shape)}")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point scale, got {scale.dtype}")
    be = _backend.resolve(SE_OP, backend, x.device)
    if _backend.exporting():  # the kernel itself, no Python op in the exported graph
        return _backend.get(SE_OP, be)(x, gate_logits, shortcut, scale)
    return _se(x, gate_logits, shortcut, scale, be)


def spatial_mean(x: Tensor) -> Tensor:
    """The squeeze of squeeze-excite: the mean of each (n, c) plane, in float32 (float64 for
    float64 x), for inference.

    On the CPU, when no gradient is needed and outside ``torch.compile`` / export, the C++
    kernel ``flamingo_rt_C::spatial_mean`` reads x once (float32 accumulation; torch's
    ``x.mean(dim=(2, 3), dtype=torch.float32)`` casts a bfloat16 x to a new float32 tensor
    first); otherwise that torch expression.

    Args:
        x: (N, C, H, W) float32, bfloat16 or float64 (other float dtypes: torch), any strides.

    Returns:
        (N, C) float32 (float64 for float64 x).
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point x, got {x.dtype}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float64)
            and not (torch.is_grad_enabled() and x.requires_grad) and not _backend.exporting()
            and not torch.compiler.is_compiling() and not _is_fake(x) and _has_kernel("spatial_mean")):
        return torch.ops.flamingo_rt_C.spatial_mean(x)
    return x.mean(dim=(2, 3), dtype=acc)


# --------------------------------------------------------------------------------------
# triton backends (flamingo_rt.kernels.nfnet, imported on first use)
# --------------------------------------------------------------------------------------


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_fn(name: str):
    def call(*args):
        from ._kernel_modules import kernel_module

        return getattr(kernel_module("nfnet"), name)(*args)

    call.__name__ = name
    return call


if _triton_available():
    for _op, _name in ((WS_OP, "ws_standardize"), (BGA_OP, "bias_gamma_act"), (SE_OP, "se_residual")):
        _backend.register(_op, "triton", _triton_fn(_name))
        _backend.register(_op + ".backward", "triton", _triton_fn(_name + "_backward"))


# --------------------------------------------------------------------------------------
# ws_conv2d
# --------------------------------------------------------------------------------------


def _pair(v: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2:
        raise ValueError(f"expected {name} as an int or a pair, got {v}")
    return (int(v[0]), int(v[1]))


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TF-style SAME padding (before, after) along one spatial dim of length ``size``.

    Total = max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0),
    with the odd pixel after (right / bottom), as TensorFlow and timm's ``pad_same``.
    """
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def ws_conv2d(
    x: Tensor,
    weight: Tensor,
    gain: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, Tuple[int, int]] = 1,
    groups: int = 1,
    eps: float = 1e-5,
    padding: Union[str, int, Tuple[int, int]] = "same",
    backend: Optional[str] = None,
) -> Tensor:
    """Convolution with a scaled-weight-standardized weight (timm's ``ScaledStdConv2dSame``).

    The weight goes through :func:`ws_standardize`, then ``F.conv2d``. ``padding="same"``
    is TF-style SAME padding computed from x's spatial size (asymmetric when needed: the
    extra pixel goes right / bottom), as timm's ``pad_same``; an int (or pair) is plain
    symmetric zero padding. For channels-last x the weight is standardized in channels-last
    layout (one reorder of the raw weight in the graph, instead of one per conv call and its
    gradient inside oneDNN), and the result is channels-last.

    Args:
        x: (N, C_in, H, W) float tensor.
        weight: (C_out, C_in / groups, kh, kw) in x's dtype.
        gain: (C_out, 1, 1, 1) in x's dtype.
        bias: (C_out,) or None.
        stride: int or (sh, sw).
        groups: conv groups; C_in and C_out must be multiples of it.
        eps: weight-standardization epsilon.
        padding: ``"same"``, ``"valid"``, an int or (ph, pw).
        backend: backend of the standardization op (see :func:`ws_standardize`).

    Returns:
        (N, C_out, H_out, W_out) in x's dtype; with SAME padding H_out = ceil(H / sh).
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"expected weight of shape (C_out, C_in/groups, kh, kw), got {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"expected C_out {weight.shape[0]} to be a multiple of groups {groups}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"expected x with C_in = {weight.shape[1] * groups} channels "
            f"(weight {tuple(weight.shape)}, groups {groups}), got x of shape {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    cl = _fmt(x) == torch.channels_last
    # (a Winograd convolution reads the weight in its own layout: no channels-last copy for it)
    winograd = (padding == "same" and _pair(stride, "stride") == (1, 1) and tuple(weight.shape[2:]) == (3, 3)
                and (_winograd.eligible(x, weight, 1, groups) or _winograd.eligible_bf16_autograd(x, weight, groups)))
    if cl and not winograd and _fmt(weight) != torch.channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    if _ws_bf16_ok(weight, gain, backend):
        _check_ws(weight, gain)
        w = _ws_bf16(weight, gain, float(eps))  # bf16: autocast's cast for the conv is then a no-op
    else:
        w = ws_standardize(weight, gain, eps, backend=backend)
    if cl and w.shape[2] == w.shape[3] == 1 and w.is_contiguous():
        # a 1x1 weight is both layouts at once; give it channels-last strides (a view: same
        # memory) or oneDNN reorders its gradient (measured up to 98 ms a step on F0's)
        o, i = w.shape[0], w.shape[1]
        w = w.reshape(o, 1, 1, i).permute(0, 3, 1, 2)
    return conv2d_padded(x, w, bias, stride, groups, padding)


def conv2d_padded(
    x: Tensor,
    w: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, Tuple[int, int]] = 1,
    groups: int = 1,
    padding: Union[str, int, Tuple[int, int]] = "same",
) -> Tensor:
    """``F.conv2d`` with the padding modes of :func:`ws_conv2d` (TF-style ``"same"``,
    ``"valid"``, an int or a pair), for a weight that is already standardized (e.g. folded
    once in a frozen encoder). x (N, C_in, H, W); w (C_out, C_in/groups, kh, kw)."""
    sh, sw = _pair(stride, "stride")
    kh, kw = w.shape[2], w.shape[3]
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            pad: Tuple[int, int] = (0, 0)
        elif mode == "same":
            top, bottom = same_padding(x.shape[2], kh, sh)
            left, right = same_padding(x.shape[3], kw, sw)
            if top == bottom and left == right:
                pad = (top, left)
            else:
                x = F.pad(x, (left, right, top, bottom))
                pad = (0, 0)
        else:
            raise ValueError(f"expected padding 'same', 'valid', an int or a pair, got {padding!r}")
    else:
        pad = _pair(padding, "padding")
    if (sh, sw) == (1, 1) and pad == (1, 1) and kh == kw == 3 and _winograd.eligible_bf16_autograd(x, w, groups):
        return _winograd.conv3x3_bf16(x, w, bias, groups)  # bf16 (autocast): forward and input gradient
    dt = half_widening.autocast_wanted(x, w, bias)
    if dt is not None:  # autocast's rounding to dt, then the widened convolution below
        x, w, bias = x.to(dt), w.to(dt), None if bias is None else bias.to(dt)
    if half_widening.wanted(x, w, bias):
        # bf16 / fp16 on a CPU without such kernels (torch's reference loops: a 3x3 conv 47x
        # slower than float32 on an AVX2 AMD EPYC): the float32 paths of this function on the
        # widened tensors (x already padded), rounded once to x's dtype
        with torch.autocast("cpu", enabled=False):
            y = conv2d_padded(x.float(), w.float(), None if bias is None else bias.float(), (sh, sw), groups, pad)
        return y.to(x.dtype)
    if (sh, sw) == (1, 1) and pad == (0, 0) and groups == 1 and _conv1x1_as_mm(x, w):
        return _conv1x1_mm(x, w, bias)
    if (sh, sw) == (1, 1) and pad == (1, 1) and kh == kw == 3 and _winograd.eligible(x, w, 1, groups):
        return _winograd.conv3x3(x, w, bias, groups)  # forward and both gradients as Winograd convolutions
    return F.conv2d(x, w, bias, (sh, sw), pad, 1, groups)


#: float32 1x1 convolutions with at most this many output pixels (N * H * W) run as a matrix
#: product (see :func:`_conv1x1_as_mm`); bf16 ones always do.
CONV1X1_MM_MAX_ROWS_FP32 = 4096


def _conv1x1_as_mm(x: Tensor, w: Tensor) -> bool:
    """Whether a stride-1, unpadded, ungrouped 1x1 convolution of x runs as one matrix
    product over its (N*H*W, C) rows (:func:`_conv1x1_mm`): on the CPU, for channels-last x
    (the rows are then x's memory, a view), in float32 up to
    :data:`CONV1X1_MM_MAX_ROWS_FP32` rows and in bf16 (also under autocast) at any size.

    Measured on a 2-core Xeon with AMX, forward + backward of each of dm_nfnet_f0's 1x1 convs
    at batch 4 and 224 px (ms, oneDNN's convolution / torch's product): float32 14x14 and 7x7
    (196 / 49 rows per image) 1.07-1.26x faster as a product, 1536 -> 3072 at 7x7 38.3 / 18.3;
    28x28 (3136 rows) 0.97-1.10x; 56x56 (12544 rows, 128-256 channels) 0.76-0.92x, so not
    taken; bf16 1.0-1.8x at every size. All of F0's 1x1 convs, forward + backward: float32
    388 -> 343 ms, bf16 133 -> 112 ms."""
    if x.device.type != "cpu" or x.dim() != 4 or w.shape[2] != 1 or w.shape[3] != 1:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype == torch.bfloat16:
        return True
    return dtype == torch.float32 and x.shape[0] * x.shape[2] * x.shape[3] <= CONV1X1_MM_MAX_ROWS_FP32


def _conv1x1_mm(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 convolution of channels-last x (N, C, H, W) by w (O, C, 1, 1) as
    ``rows @ w^T (+ bias)`` over x's (N*H*W, C) rows; returns (N, O, H, W) channels-last (a
    view of the product). Autocast and autograd apply as to any ``torch.mm`` / ``addmm``."""
    N, C, H, W = x.shape
    O = w.shape[0]
    rows = x.permute(0, 2, 3, 1).reshape(N * H * W, C)
    if x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        # ops.linear: float32 products (and their backward) through oneDNN where MKL runs its
        # AVX2 kernels (ops.cpu_gemm's policy), torch's elsewhere
        y = _linear(rows, w.reshape(O, C), bias)
    else:
        wt = w.reshape(O, C).t()
        y = torch.mm(rows, wt) if bias is None else torch.addmm(bias, rows, wt)
    return y.view(N, H, W, O).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------
# conv2d_bias_act: the frozen (inference-only) conv with its tail fused
# --------------------------------------------------------------------------------------

_ACTS_OR_NONE = ("none",) + _ref.ACTS


def _mkldnn_dtype_ok(dtype: torch.dtype) -> bool:
    """oneDNN runs this dtype's convolutions on this CPU (its bf16 path needs AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT; an AVX2-only CPU has none and must take aten's conv instead)."""
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return cpu_gemm.bf16_available()
    return False


def _mkldnn_pointwise_ok(x: Tensor, act: str, gamma: float) -> bool:
    return (
        x.device.type == "cpu"
        and _mkldnn_dtype_ok(x.dtype)
        and act in ("none", "gelu", "relu", "silu")
        and gamma == 1.0
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def pad_zeros(x: Tensor, fpad) -> Tensor:
    """``F.pad(x, fpad)`` (zeros; fpad = (left, right, top, bottom) >= 0) for x (N, C, H, W)
    without a gradient, in x's memory format: the interior copied, only the border strips
    zeroed (F.pad fills the whole output first: ~0.2 ms of a 3 MB bfloat16 map, three per F0
    forward, for nothing)."""
    left, right, top, bottom = fpad
    if min(fpad) < 0 or x.dim() != 4 or (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        return F.pad(x, fpad)
    n, c, h, w = x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    out[:, :, top:top + h, left:left + w].copy_(x)
    if top:
        out[:, :, :top].zero_()
    if bottom:
        out[:, :, top + h:].zero_()
    if left:
        out[:, :, top:top + h, :left].zero_()
    if right:
        out[:, :, top:top + h, left + w:].zero_()
    return out


def _mkldnn_geometry(x_shape, w_shape, stride: int):
    """(pad (t, l), F.pad arg or None, padded input shape) of a SAME conv for oneDNN."""
    kh, kw = w_shape[2], w_shape[3]
    top, bottom = same_padding(x_shape[2], kh, stride)
    left, right = same_padding(x_shape[3], kw, stride)
    if top != bottom or left != right:
        shape = (x_shape[0], x_shape[1], x_shape[2] + top + bottom, x_shape[3] + left + right)
        return (0, 0), (left, right, top, bottom), shape
    return (top, left), None, tuple(x_shape)


def mkldnn_pack_conv_weight(w: Tensor, x_shape, stride: int, groups: int) -> Optional[Tensor]:
    """w reordered once into oneDNN's blocked layout for inputs of ``x_shape`` (an opaque
    mkldnn tensor that :func:`conv2d_bias_act` accepts as ``packed`` on the CPU), or None
    when this torch has no oneDNN. Saves the weight reorder oneDNN otherwise does per call
    (~10% of a frozen NFNet forward at batch 1)."""
    if not (torch.backends.mkldnn.is_available() and w.device.type == "cpu"
            and _mkldnn_dtype_ok(w.dtype)):
        return None
    pad, _, shape = _mkldnn_geometry(x_shape, w.shape, stride)
    try:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.contiguous().to_mkldnn(), list(pad), [stride, stride], [1, 1], groups, list(shape))
    except (RuntimeError, AttributeError):
        return None


_TRITON_CONV_BROKEN = False


def _triton_conv_failed(e: Exception) -> None:
    """The Triton conv raised (not a wrong result: the GPU check tests those): warn once and
    use the vendor convolution from now on in this process."""
    global _TRITON_CONV_BROKEN
    import warnings

    _TRITON_CONV_BROKEN = True
    warnings.warn(f"flamingo_rt: the Triton NHWC convolution failed ({type(e).__name__}: {e}); "
                  "using F.conv2d + the fused bias/activation op instead", RuntimeWarning)


def _non_triton_backend(device: torch.device) -> str:
    for cand in ("cuda", "cpu", "reference"):
        if cand in _backend.implemented(BGA_OP) and _backend._device_ok(cand, device):
            return cand
    return "reference"


def pack_conv_weight(w: Tensor) -> Tensor:
    """The weight layout of the Triton NHWC convolution: (kh, kw, C_in/groups, C_out)."""
    return w.permute(2, 3, 1, 0).contiguous()


def conv2d_bias_act(
    x: Tensor,
    w: Tensor,
    bias: Optional[Tensor],
    stride: int = 1,
    groups: int = 1,
    act: str = "gelu",
    gamma: float = 1.0,
    *,
    packed: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``gamma * act(conv2d(x, w) + bias)`` with TF-style SAME padding, for frozen
    inference (no autograd through this function's fused paths: call it under
    ``torch.no_grad()`` or on tensors that need no gradient; otherwise it runs the plain
    differentiable ops).

    Paths, by device and ``backend`` (of the ``bias_gamma_act`` op):
      - ``triton`` (GPU default; CPU under ``TRITON_INTERPRET=1``): the implicit-GEMM NHWC
        convolution of :mod:`flamingo_rt.kernels.conv` with bias, activation and gamma in
        its epilogue (one pass, output channels-last);
      - CPU, float32 / bfloat16, gamma 1: one oneDNN primitive (conv, bias, activation as a
        post-op), in x's memory format;
      - otherwise ``F.conv2d`` then the fused :func:`bias_gamma_act` (``act="none"``: the
        conv with its bias, times gamma).

    Args:
        x: (N, C_in, H, W); w: (C_out, C_in/groups, kh, kw) (already standardized / folded),
            bias (C_out,) or None, all of one dtype (bias / w are cast to x's).
        act: ``"none"``, ``"gelu"``, ``"relu"`` or ``"silu"``.
        packed: :func:`pack_conv_weight` of w (Triton path) or :func:`mkldnn_pack_conv_weight`
            (CPU oneDNN path), cached by the caller; ignored by the other paths.

    Returns:
        (N, C_out, ceil(H / stride), ceil(W / stride)) in x's dtype.
    """
    if act not in _ACTS_OR_NONE:
        raise ValueError(f"expected act to be one of {_ACTS_OR_NONE}, got {act!r}")
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))
    be = _backend.resolve(BGA_OP, backend, x.device)
    mk = packed is not None and packed.is_mkldnn
    if (not needs_grad and be == "triton" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not _TRITON_CONV_BROKEN):
        try:
            from ._kernel_modules import kernel_module

            _kconv = kernel_module("conv")
            return _kconv.conv2d_nhwc(x, w, bias, stride, groups, act, gamma, "same",
                                      packed=None if mk else packed)
        except Exception as e:  # e.g. a Triton that cannot compile it: the vendor conv instead
            _triton_conv_failed(e)
            be = _non_triton_backend(x.device)
    if not needs_grad and _mkldnn_pointwise_ok(x, act, gamma):
        (top, left), fpad, _ = _mkldnn_geometry(x.shape, w.shape, stride)
        if fpad is not None:
            x = pad_zeros(x, fpad)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed if mk and packed.dtype == x.dtype else w, bias, [top, left], [stride, stride], [1, 1], groups,
            "swish" if act == "silu" else act, [], "none" if act == "gelu" else None,
        )
    if act == "none":
        y = conv2d_padded(x, w, bias, stride, groups, "same")
        return y if gamma == 1.0 else y * gamma
    y = conv2d_padded(x, w, None, stride, groups, "same")
    if bias is not None and bias.dtype != y.dtype:  # autocast ran the conv in its own dtype
        bias = bias.to(y.dtype)
    return bias_gamma_act(y, bias, act, gamma, backend=be)
