"""Registers the C++ (``cpu``) and CUDA C++ (``cuda``) backends of the ops that
``flamingo_rt._C`` implements, with :func:`flamingo_rt.ops.backend.register`.

Importing this module is enough; it does nothing when the extension is not built
(:data:`AVAILABLE` is then False). The C++ kernels take float32, bfloat16 and float64
(and float16 on CUDA); for any other dtype these backends hand the call to the op's
``reference`` backend, so ``auto`` works for every dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from . import backend as _backend
from ._outputs import act_format as _fmt

BGA_OP = "bias_gamma_act"

_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


def _reference(op: str):
    return _backend.get(op, "reference")


def _make_bga(device: str):
    dtypes = _KERNEL_DTYPES[device]

    def bias_gamma_act(x: Tensor, bias: Optional[Tensor], act: str, gamma: float) -> Tensor:
        """(N, C, H, W) -> gamma * act(x + bias[c]); output dense in x's memory format."""
        if x.dtype not in dtypes:
            return _reference(BGA_OP)(x, bias, act, gamma)
        return torch.ops.flamingo_rt_C.bias_gamma_act(x, bias, act, float(gamma))

    def bias_gamma_act_backward(
        grad_out: Tensor, x: Tensor, bias: Optional[Tensor], act: str, gamma: float
    ) -> Tuple[Tensor, Tensor]:
        """(dx (N, C, H, W), dbias (C,)) in x's dtype; dbias summed deterministically."""
        if x.dtype not in dtypes:
            return _reference(BGA_OP + ".backward")(grad_out, x, bias, act, gamma)
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)
        return torch.ops.flamingo_rt_C.bias_gamma_act_backward(grad_out, x, bias, act, float(gamma))

    return bias_gamma_act, bias_gamma_act_backward


XATTN_OP = "image_causal_attention"


def _make_xattn():
    """The CPU C++ image-causal attention (float32, bfloat16, float64; else the reference)."""
    dtypes = _KERNEL_DTYPES["cpu"]

    def image_causal_attention(q: Tensor, k: Tensor, v: Tensor, media_index: Tensor,
                               all_previous: bool, scale: float) -> Tensor:
        """q (B, T, H, dh), k/v (B, M, N, H, dh), media_index (B, T) -> (B, T, H, dh)."""
        if q.dtype not in dtypes:
            return _reference(XATTN_OP)(q, k, v, media_index, all_previous, scale)
        return torch.ops.flamingo_rt_C.image_causal_attention(
            q, k, v, media_index, bool(all_previous), float(scale))

    def image_causal_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                        media_index: Tensor, all_previous: bool, scale: float
                                        ) -> Tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv), each with the shape and dtype of its input."""
        if q.dtype not in dtypes:
            return _reference(XATTN_OP + ".backward")(grad_out, q, k, v, media_index, all_previous, scale)
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        return torch.ops.flamingo_rt_C.image_causal_attention_backward(
            grad_out, q, k, v, media_index, bool(all_previous), float(scale))

    return image_causal_attention, image_causal_attention_backward


RESAMPLER_OP = "resampler_attention"


def _make_resampler():
    """The Perceiver Resampler attention on the CPU through the image-causal kernel
    (``flamingo_rt_C::resampler_attention`` and its backward): each medium is one batch row
    with a single "image" whose S + L keys/values are read in place from the features' and
    the latents' tensors (the kernel's second source; no concatenation), and every latent
    query sees that image. float32, bfloat16, float64 (fp32 accumulation); other dtypes:
    the reference."""
    dtypes = _KERNEL_DTYPES["cpu"]

    def resampler_attention(q: Tensor, k_x: Tensor, v_x: Tensor, k_l: Tensor, v_l: Tensor,
                            scale: float) -> Tensor:
        """q (N, L, H, dh), k_x/v_x (N, S, H, dh), k_l/v_l (N, L, H, dh) -> (N, L, H, dh)."""
        if q.dtype not in dtypes:
            return _reference(RESAMPLER_OP)(q, k_x, v_x, k_l, v_l, scale)
        return torch.ops.flamingo_rt_C.resampler_attention(q, k_x, v_x, k_l, v_l, float(scale))

    def resampler_attention_backward(grad_out: Tensor, q: Tensor, k_x: Tensor, v_x: Tensor,
                                     k_l: Tensor, v_l: Tensor, scale: float) -> Tuple[Tensor, ...]:
        """(dq, dk_x, dv_x, dk_l, dv_l), each with its input's shape and dtype."""
        if q.dtype not in dtypes:
            return _reference(RESAMPLER_OP + ".backward")(grad_out, q, k_x, v_x, k_l, v_l, scale)
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        return torch.ops.flamingo_rt_C.resampler_attention_backward(grad_out, q, k_x, v_x, k_l, v_l, float(scale))

    def resampler_attention_backward_kvpacked(grad_out: Tensor, q: Tensor, kv_x: Tensor, kv_l: Tensor,
                                              scale: float) -> Tuple[Tensor, Tensor, Tensor]:
        """(dq, dkv_x (N, S, 2, H, dh), dkv_l (N, L, 2, H, dh)): the keys' and values'
        gradients written by the kernel side by side, in the packed layout of kv_x / kv_l."""
        k_x, v_x = kv_x.unbind(2)
        k_l, v_l = kv_l.unbind(2)
        if q.dtype not in dtypes:
            dq, dk_x, dv_x, dk_l, dv_l = _reference(RESAMPLER_OP + ".backward")(grad_out, q, k_x, v_x, k_l, v_l, scale)
            return dq, torch.stack((dk_x, dv_x), 2), torch.stack((dk_l, dv_l), 2)
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        return torch.ops.flamingo_rt_C.resampler_attention_backward_kvpacked(grad_out, q, k_x, v_x, k_l, v_l,
                                                                           float(scale))

    return resampler_attention, resampler_attention_backward, resampler_attention_backward_kvpacked


# ---- NFNet: ws_standardize, se_residual (issue 5) -------------------------------------
WS_OP = "ws_standardize"
SE_OP = "se_residual"
_NF_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float64),
              "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def _make_nfnet(device: str):
    """C++ (cpu: forward + backward) / CUDA C++ (cuda: forward; backward = the reference
    math on the GPU) ws_standardize and se_residual; other dtypes: the reference."""
    dtypes = _NF_DTYPES[device]

    def ws_standardize(weight: Tensor, gain: Tensor, eps: float) -> Tensor:
        if weight.dtype not in dtypes:
            return _reference(WS_OP)(weight, gain, eps)
        return torch.ops.flamingo_rt_C.ws_standardize(weight, gain, float(eps))

    def ws_standardize_backward(grad_out: Tensor, weight: Tensor, gain: Tensor, eps: float):
        if device != "cpu" or weight.dtype not in dtypes:
            return _reference(WS_OP + ".backward")(grad_out, weight, gain, eps)
        if not (grad_out.dtype == torch.bfloat16 and weight.dtype == torch.float32):
            grad_out = grad_out.to(weight.dtype)  # (a bf16 one is read as such beside float32)
        return torch.ops.flamingo_rt_C.ws_standardize_backward(grad_out, weight, gain, float(eps))

    def se_fits(x: Tensor, gate_logits: Tensor, scale: Tensor) -> bool:
        """The kernels take these dtypes: x's for all, or on the CPU a float32 scale beside
        bf16 tensors (a float32 gain under bf16 autocast: it was the float32 reference, 76
        of F0's 600 ms bf16 training step in the 56x56 stage's backward alone)."""
        if x.dtype not in dtypes or gate_logits.dtype != x.dtype:
            return False
        return scale.dtype == x.dtype or (
            device == "cpu" and x.dtype == torch.bfloat16 and scale.dtype == torch.float32)

    def se_residual(x: Tensor, gate_logits: Tensor, shortcut: Tensor, scale: Tensor) -> Tensor:
        if not se_fits(x, gate_logits, scale) or shortcut.dtype != x.dtype:
            return _reference(SE_OP)(x, gate_logits, shortcut, scale)
        return torch.ops.flamingo_rt_C.se_residual(x, gate_logits, shortcut, scale)

    def se_residual_backward(grad_out: Tensor, x: Tensor, gate_logits: Tensor, shortcut: Tensor,
                             scale: Tensor):
        if device != "cpu" or not se_fits(x, gate_logits, scale):
            return _reference(SE_OP + ".backward")(grad_out, x, gate_logits, shortcut, scale)
        return torch.ops.flamingo_rt_C.se_residual_backward(grad_out.to(x.dtype), x, gate_logits, scale)

    return ws_standardize, ws_standardize_backward, se_residual, se_residual_backward


def _register_nfnet_fakes() -> None:
    @torch.library.register_fake("flamingo_rt_C::ws_standardize")
    def _(weight, gain, eps):
        return torch.empty_like(weight, memory_format=_fmt(weight))

    if hasattr(torch.ops.flamingo_rt_C, "ws_standardize_bf16"):
        @torch.library.register_fake("flamingo_rt_C::ws_standardize_bf16")
        def _(weight, gain, eps):
            return torch.empty_like(weight, dtype=torch.bfloat16, memory_format=_fmt(weight))

    @torch.library.register_fake("flamingo_rt_C::ws_standardize_backward")
    def _(grad_out, weight, gain, eps):
        return torch.empty_like(weight, memory_format=_fmt(weight)), gain.new_empty(gain.shape)

    @torch.library.register_fake("flamingo_rt_C::se_residual")
    def _(x, gate_logits, shortcut, scale):
        return torch.empty_like(x, memory_format=_fmt(x))

    @torch.library.register_fake("flamingo_rt_C::se_residual_backward")
    def _(grad_out, x, gate_logits, scale):
        return torch.empty_like(x, memory_format=_fmt(x)), x.new_empty(gate_logits.shape), scale.new_empty(scale.shape)

    if hasattr(torch.ops.flamingo_rt_C, "spatial_mean"):
        @torch.library.register_fake("flamingo_rt_C::spatial_mean")
        def _(x):
            torch._check(x.dim() == 4, lambda: f"spatial_mean: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
            return x.new_empty((x.shape[0], x.shape[1]),
                               dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _register_nfnet(devices) -> None:
    if not hasattr(torch.ops.flamingo_rt_C, "ws_standardize"):
        return  # an extension built before these ops
    _register_nfnet_fakes()
    for dev in devices:
        wf, wb, sf, sb = _make_nfnet(dev)
        _backend.register(WS_OP, dev, wf)
        _backend.register(WS_OP + ".backward", dev, wb)
        _backend.register(SE_OP, dev, sf)
        _backend.register(SE_OP + ".backward", dev, sb)


def register_all() -> bool:
    """Register the C++/CUDA backends; False (nothing registered) without the extension."""
    if not _ext.load():
        return False
    devices = ["cpu"] + (["cuda"] if _ext.with_cuda() else [])
    for dev in devices:
        fwd, bwd = _make_bga(dev)
        _backend.register(BGA_OP, dev, fwd)
        _backend.register(BGA_OP + ".backward", dev, bwd)
    xf, xb = _make_xattn()
    _backend.register(XATTN_OP, "cpu", xf)
    _backend.register(XATTN_OP + ".backward", "cpu", xb)
    rf, rb, rbp = _make_resampler()
    _backend.register(RESAMPLER_OP, "cpu", rf)
    _backend.register(RESAMPLER_OP + ".backward", "cpu", rb)
    _backend.register(RESAMPLER_OP + ".backward_kvpacked", "cpu", rbp)
    _register_nfnet(devices)
    return True


AVAILABLE: bool = register_all()
