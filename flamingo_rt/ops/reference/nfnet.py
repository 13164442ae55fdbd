"""Reference NFNet ops (DESIGN.md section 1): scaled weight standardization, the fused
bias + activation + gamma, and the squeeze-excite residual tail of a NormFree block.

Every function takes plain tensors, works in any floating dtype (float64 included),
computes in float32 at least (float64 for float64 inputs) and returns results in the
dtype of the corresponding input. Each forward has an explicit backward written out by
hand (autograd does not run inside a custom-op implementation); ``gradcheck`` in the
tests verifies them against the forwards.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

#: Activations understood by :func:`bias_gamma_act`.
ACTS = ("gelu", "relu", "silu")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _ct(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float32 for low precision, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------
# scaled weight standardization
# --------------------------------------------------------------------------------------


def _ws_parts(weight: Tensor, gain: Tensor, eps: float):
    """(centered, rstd, per-row scale, fan_in) in the compute dtype, rows = output channels."""
    out_ch = weight.shape[0]
    fan_in = weight[0].numel()
    ct = _ct(weight.dtype)
    w = weight.reshape(out_ch, fan_in).to(ct)
    centered = w - w.mean(dim=1, keepdim=True)
    var = (centered * centered).mean(dim=1, keepdim=True)  # biased variance
    rstd = torch.rsqrt(var + eps)
    scale = gain.reshape(out_ch, 1).to(ct) * (fan_in ** -0.5)
    return centered, rstd, scale, fan_in


def ws_standardize(weight: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Scaled weight standardization, as timm's ``ScaledStdConv2d(Same)`` computes it.

    For each output channel o, over its fan_in = I/groups * kh * kw weights:
    ``w_hat = (w - mean) / sqrt(var + eps) * gain[o] * fan_in ** -0.5`` with the biased
    variance.

    Args:
        weight: (O, I/groups, kh, kw) conv weight, any float dtype.
        gain: (O, 1, 1, 1) per-channel gain (any shape with O elements).
        eps: added to the variance inside the square root.

    Returns:
        (O, I/groups, kh, kw) standardized weight in weight's dtype.
    """
    centered, rstd, scale, _ = _ws_parts(weight, gain, eps)
    return (centered * rstd * scale).reshape(weight.shape).to(weight.dtype)


def ws_standardize_backward(
    grad_out: Tensor, weight: Tensor, gain: Tensor, eps: float
) -> Tuple[Tensor, Tensor]:
    """Gradients (d_weight, d_gain) of :func:`ws_standardize` given ``grad_out`` (weight's shape).

    With xhat = (w - mean) * rstd, s = gain * fan_in^-0.5 and g = grad_out * s (per row):
    ``d_gain = fan_in^-0.5 * sum(grad_out * xhat)`` and
    ``d_w = rstd * (g - mean(g) - xhat * mean(g * xhat))``.
    Each gradient has the dtype and shape of its input.
    """
    centered, rstd, scale, fan_in = _ws_parts(weight, gain, eps)
    out_ch = weight.shape[0]
    xhat = centered * rstd
    go = grad_out.reshape(out_ch, fan_in).to(xhat.dtype)
    d_gain = (go * xhat).sum(dim=1) * (fan_in ** -0.5)
    g = go * scale
    d_w = rstd * (
        g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True)
    )
    return (
        d_w.reshape(weight.shape).to(weight.dtype),
        d_gain.reshape(gain.shape).to(gain.dtype),
    )


# --------------------------------------------------------------------------------------
# bias + activation + gamma
# --------------------------------------------------------------------------------------


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"expected act to be one of {ACTS}, got {act!r}")


def _pre_act(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    z = x.to(_ct(x.dtype))
    if bias is not None:
        z = z + bias.to(z.dtype)[None, :, None, None]
    return z


def _act(z: Tensor, act: str) -> Tensor:
    if act == "gelu":
        return torch.nn.functional.gelu(z)  # exact erf form
    if act == "relu":
        return torch.relu(z)
    return torch.nn.functional.silu(z)


def _act_grad(z: Tensor, act: str) -> Tensor:
    """d act(z) / dz."""
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf
    if act == "relu":
        return (z > 0).to(z.dtype)
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def bias_gamma_act(x: Tensor, bias: Optional[Tensor], act: str, gamma: float) -> Tensor:
    """``gamma * act(x + bias[None, :, None, None])``.

    Args:
        x: (N, C, H, W), any float dtype, any memory format.
        bias: (C,) or None.
        act: ``"gelu"`` (exact erf), ``"relu"`` or ``"silu"``.
        gamma: output scale (timm's ``_nonlin_gamma`` constant, possibly times beta).

    Returns:
        (N, C, H, W) in x's dtype.
    """
    _check_act(act)
    z = _pre_act(x, bias)
    return (_act(z, act) * gamma).to(x.dtype)


def bias_gamma_act_backward(
    grad_out: Tensor, x: Tensor, bias: Optional[Tensor], act: str, gamma: float
) -> Tuple[Tensor, Tensor]:
    """Gradients (dx, dbias) of :func:`bias_gamma_act` given ``grad_out`` (N, C, H, W).

    ``dx = grad_out * gamma * act'(x + bias)`` in x's dtype; ``dbias`` = dx summed over
    (N, H, W), always of shape (C,), in bias's dtype (x's dtype when bias is None; the
    caller drops it then).
    """
    _check_act(act)
    z = _pre_act(x, bias)
    dz = grad_out.to(z.dtype) * _act_grad(z, act) * gamma
    db_dtype = bias.dtype if bias is not None else x.dtype
    return dz.to(x.dtype), dz.sum(dim=(0, 2, 3)).to(db_dtype)


# --------------------------------------------------------------------------------------
# squeeze-excite residual tail
# --------------------------------------------------------------------------------------


def se_residual(x: Tensor, gate_logits: Tensor, shortcut: Tensor, scale: Tensor) -> Tensor:
    """The NormFree block tail: ``shortcut + scale * x * sigmoid(gate_logits)[:, :, None, None]``.

    In timm's ``NormFreeBlock`` the residual branch output ``x`` (conv3's output) goes
    through SE (``x * sigmoid(fc2(...))``), times ``attn_gain``, times the skipinit gain,
    times ``alpha``, plus the shortcut; ``scale`` carries ``alpha * attn_gain * skipinit_gain``.

    Args:
        x: (N, C, H, W) residual-branch output, any float dtype.
        gate_logits: (N, C) pre-sigmoid SE output.
        shortcut: (N, C, H, W).
        scale: 0-dim or (1,) tensor.

    Returns:
        (N, C, H, W) in x's dtype.
    """
    ct = _ct(x.dtype)
    sig = torch.sigmoid(gate_logits.to(ct))[:, :, None, None]
    s = scale.to(ct).reshape(())
    return (shortcut.to(ct) + s * x.to(ct) * sig).to(x.dtype)


def se_residual_backward(
    grad_out: Tensor, x: Tensor, gate_logits: Tensor, shortcut: Tensor, scale: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, d_gate_logits, d_scale) of :func:`se_residual` given ``grad_out``.

    The gradient for ``shortcut`` is ``grad_out`` itself and is not returned.
    With sig = sigmoid(gate_logits) and gx = sum_{H,W}(grad_out * x):
    ``dx = grad_out * scale * sig``, ``d_gate = gx * scale * sig * (1 - sig)``,
    ``d_scale = sum(gx * sig)``. Each gradient has the dtype and shape of its input.
    """
    ct = _ct(x.dtype)
    sig = torch.sigmoid(gate_logits.to(ct))
    s = scale.to(ct).reshape(())
    g = grad_out.to(ct)
    dx = g * s * sig[:, :, None, None]
    gx = (g * x.to(ct)).sum(dim=(2, 3))
    d_gate = gx * s * sig * (1.0 - sig)
    d_scale = (gx * sig).sum()
    return (
        dx.to(x.dtype),
        d_gate.to(gate_logits.dtype),
        d_scale.reshape(scale.shape).to(scale.dtype),
    )
