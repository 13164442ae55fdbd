"""The Perceiver Resampler attention op, ``flamingo_rt::resampler_attention``.

Latent queries attend to concat(media features, latents) without the concatenation
being part of the op's interface; registered with ``torch.library`` (fake
implementation and autograd included).
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from . import backend as _backend
from .precision import check_attention_dtype
from ._eager import EagerOp
from ._outputs import new_like as _new
from .reference import resampler as _ref

OP = "resampler_attention"


def _resampler_impl(
    q: Tensor, k_x: Tensor, v_x: Tensor, k_l: Tensor, v_l: Tensor, scale: float, backend: str
) -> Tensor:
    return _backend.get(OP, backend)(q, k_x, v_x, k_l, v_l, scale).contiguous()


_resampler_op = torch.library.custom_op("flamingo_rt::resampler_attention", mutates_args=())(_resampler_impl)


@_resampler_op.register_fake
def _(q, k_x, v_x, k_l, v_l, scale, backend):
    return _new(q)


def _resampler_bwd_impl(
    grad_out: Tensor, q: Tensor, k_x: Tensor, v_x: Tensor, k_l: Tensor, v_l: Tensor,
    scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backend.get(OP + ".backward", backend)(grad_out, q, k_x, v_x, k_l, v_l, scale)
    return tuple(g.contiguous() for g in grads)


_resampler_bwd_op = torch.library.custom_op("flamingo_rt::resampler_attention_backward", mutates_args=())(
    _resampler_bwd_impl)


@_resampler_bwd_op.register_fake
def _(grad_out, q, k_x, v_x, k_l, v_l, scale, backend):
    return tuple(_new(t) for t in (q, k_x, v_x, k_l, v_l))


def _setup_context(ctx, inputs, output):
    """Both ops' (the unpacked and the kv-packed): the tensor inputs saved for the backward,
    the trailing scale and backend kept."""
    *tensors, scale, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_out):
    grads = _resampler_bwd(grad_out.contiguous(), *ctx.saved_tensors, ctx.scale, ctx.backend)
    return (*grads, None, None)


_resampler_op.register_autograd(_backward, setup_context=_setup_context)

# plain eager calls skip the custom-op machinery (_eager.py); compile / export see the ops
_resampler = EagerOp(_resampler_op, _resampler_impl, _setup_context, _backward)
_resampler_bwd = EagerOp(_resampler_bwd_op, _resampler_bwd_impl)


# ---- kv-packed: the keys and values as the two halves of one [K | V] projection --------------
# (N, S, 2, H, dh) packed tensors in, the packed gradients out: the model's to_kv makes K and V
# as one product, and two separate gradients would be stacked back into its layout (a copy of
# the features' whole [K | V] gradient per layer: 16 MiB at issue 7's connector step, 32 MiB
# at issue 4's 32 images). Backends with a packed backward ("resampler_attention.backward_kvpacked")
# write the gradients in place; the others' are stacked here.


def _kvp_impl(q: Tensor, kv_x: Tensor, kv_l: Tensor, scale: float, backend: str) -> Tensor:
    k_x, v_x = kv_x.unbind(2)
    k_l, v_l = kv_l.unbind(2)
    return _resampler_impl(q, k_x, v_x, k_l, v_l, scale, backend)


_kvp_op = torch.library.custom_op("flamingo_rt::resampler_attention_kvpacked", mutates_args=())(_kvp_impl)


@_kvp_op.register_fake
def _(q, kv_x, kv_l, scale, backend):
    return _new(q)


def _kvp_bwd_impl(grad_out: Tensor, q: Tensor, kv_x: Tensor, kv_l: Tensor, scale: float,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend in _backend.implemented(OP + ".backward_kvpacked"):
        grads = _backend.get(OP + ".backward_kvpacked", backend)(grad_out, q, kv_x, kv_l, scale)
        return tuple(g.contiguous() for g in grads)
    k_x, v_x = kv_x.unbind(2)
    k_l, v_l = kv_l.unbind(2)
    dq, dk_x, dv_x, dk_l, dv_l = _backend.get(OP + ".backward", backend)(grad_out, q, k_x, v_x, k_l, v_l, scale)
    return dq.contiguous(), torch.stack((dk_x, dv_x), 2), torch.stack((dk_l, dv_l), 2)


_kvp_bwd_op = torch.library.custom_op("flamingo_rt::resampler_attention_kvpacked_backward", mutates_args=())(
    _kvp_bwd_impl)


@_kvp_bwd_op.register_fake
def _(grad_out, q, kv_x, kv_l, scale, backend):
    return _new(q), kv_x.new_empty(kv_x.shape), kv_l.new_empty(kv_l.shape)


def _kvp_backward(ctx, grad_out):
    grads = _kvp_bwd(grad_out.contiguous(), *ctx.saved_tensors, ctx.scale, ctx.backend)
    return (*grads, None, None)


_kvp_op.register_autograd(_kvp_backward, setup_context=_setup_context)
_kvp = EagerOp(_kvp_op, _kvp_impl, _setup_context, _kvp_backward)
_kvp_bwd = EagerOp(_kvp_bwd_op, _kvp_bwd_impl)


def _reference_forward(q, k_x, v_x, k_l, v_l, scale):
    return _ref.resampler_attention(q, k_x, v_x, k_l, v_l, scale)


def _reference_backward(grad_out, q, k_x, v_x, k_l, v_l, scale):
    return _ref.resampler_attention_backward(grad_out, q, k_x, v_x, k_l, v_l, scale)


_backend.register(OP, "reference", _reference_forward)
_backend.register(OP + ".backward", "reference", _reference_backward)


# ---------------------------------------------------------------- triton backend
# Kernels in flamingo_rt.kernels.resampler (imported on first use: ``import flamingo_rt``
# works without triton). fp32 / bf16 / fp16 and dh <= 256 run the kernels; other dtypes
# (float64) go to the reference, and so does the backward for more than 128 latents.


def _triton_kernels():
    from ._kernel_modules import kernel_module

    return kernel_module("resampler")


def _triton_forward(q, k_x, v_x, k_l, v_l, scale):
    K = _triton_kernels()
    if not K.supported(q):
        return _reference_forward(q, k_x, v_x, k_l, v_l, scale)
    return K.resampler_attention_fwd(q, k_x, v_x, k_l, v_l, scale)


def _triton_backward(grad_out, q, k_x, v_x, k_l, v_l, scale):
    K = _triton_kernels()
    if not K.backward_supported(q):
        return _reference_backward(grad_out, q, k_x, v_x, k_l, v_l, scale)
    return K.resampler_attention_bwd(grad_out, q, k_x, v_x, k_l, v_l, scale)


if importlib.util.find_spec("triton") is not None:
    _backend.register(OP, "triton", _triton_forward)
    _backend.register(OP + ".backward", "triton", _triton_backward)


# ---------------------------------------------------------------- cuda backend
# CUDA C++ forward (csrc/cuda/resampler.cu, ``flamingo_rt_C::resampler_attention``) for
# fp32 / bf16 / fp16 and dh <= 128; its backward is the triton one when triton is
# installed, else the reference (the CUDA C++ backward is not written).

_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cuda_forward(q, k_x, v_x, k_l, v_l, scale):
    if q.dtype not in _CUDA_DTYPES or q.shape[-1] > 128:
        return _reference_forward(q, k_x, v_x, k_l, v_l, scale)
    return torch.ops.flamingo_rt_C.resampler_attention(q, k_x, v_x, k_l, v_l, float(scale))


def _cuda_backward(grad_out, q, k_x, v_x, k_l, v_l, scale):
    if importlib.util.find_spec("triton") is not None:
        return _triton_backward(grad_out, q, k_x, v_x, k_l, v_l, scale)
    return _reference_backward(grad_out, q, k_x, v_x, k_l, v_l, scale)


def _register_cuda() -> bool:
    from .. import _ext

    if not (_ext.with_cuda() and hasattr(torch.ops.flamingo_rt_C, "resampler_attention")):
        return False
    _backend.register(OP, "cuda", _cuda_forward)
    _backend.register(OP + ".backward", "cuda", _cuda_backward)
    return True


def _register_cpp_fake() -> None:
    """Fake kernels of the C++ ops (schemas and CPU kernels in csrc/torch/xattn_ops.cpp, the
    CUDA forward in csrc/torch/resampler_cuda_ops.cpp)."""
    from .. import _ext

    if not (_ext.load() and hasattr(torch.ops.flamingo_rt_C, "resampler_attention")):
        return

    @torch.library.register_fake("flamingo_rt_C::resampler_attention")
    def _(q, k_x, v_x, k_l, v_l, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("flamingo_rt_C::resampler_attention_backward")
    def _(grad_out, q, k_x, v_x, k_l, v_l, scale):
        return (q.new_empty(q.shape), k_x.new_empty(k_x.shape), v_x.new_empty(v_x.shape),
                k_l.new_empty(k_l.shape), v_l.new_empty(v_l.shape))

    if hasattr(torch.ops.flamingo_rt_C, "resampler_attention_backward_kvpacked"):
        @torch.library.register_fake("flamingo_rt_C::resampler_attention_backward_kvpacked")
        def _(grad_out, q, k_x, v_x, k_l, v_l, scale):
            return (q.new_empty(q.shape), k_x.new_empty((*k_x.shape[:2], 2, *k_x.shape[2:])),
                    k_l.new_empty((*k_l.shape[:2], 2, *k_l.shape[2:])))


_register_cpp_fake()
CUDA_AVAILABLE: bool = _register_cuda()


def resampler_attention(
    q: Tensor,
    k_x: Tensor,
    v_x: Tensor,
    k_l: Tensor,
    v_l: Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Perceiver Resampler attention for many media in one call.

    Args:
        q: (N, L, H, dh) latent queries (N media, L latents).
        k_x, v_x: (N, S, H, dh) keys/values of the S feature tokens of each medium.
        k_l, v_l: (N, L, H, dh) keys/values of the latents.
        scale: softmax scale, default ``dh ** -0.5``.
        backend: see :func:`flamingo_rt.ops.backend.resolve`.

    Returns:
        (N, L, H, dh) in q's dtype.
    """
    if q.dim() != 4:
        raise ValueError(f"expected q of shape (N, L, H, dh), got {tuple(q.shape)}")
    check_attention_dtype(q)
    n, L, H, dh = q.shape
    for name, t, rows in (("k_x", k_x, None), ("v_x", v_x, None), ("k_l", k_l, L), ("v_l", v_l, L)):
        if t.dim() != 4 or t.shape[0] != n or t.shape[2] != H or t.shape[3] != dh or (
            rows is not None and t.shape[1] != rows
        ):
            want = f"({n}, {'S' if rows is None else rows}, {H}, {dh})"
            raise ValueError(f"expected {name} of shape {want}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"expected {name} of dtype {q.dtype} (as q), got {t.dtype}")
    if k_x.shape != v_x.shape:
        raise ValueError(f"expected v_x of the shape of k_x {tuple(k_x.shape)}, got {tuple(v_x.shape)}")
    if scale is None:
        scale = dh ** -0.5
    be = _backend.resolve(OP, backend, q.device)
    if _backend.exporting():
        if be == "triton":  # a kernel launched from Python cannot go into an AOTInductor package
            be = "cuda" if "cuda" in _backend.implemented(OP) else "reference"
        return _backend.get(OP, be)(q, k_x, v_x, k_l, v_l, float(scale))
    return _resampler(q, k_x, v_x, k_l, v_l, float(scale), be)


def resampler_attention_kvpacked(
    q: Tensor,
    kv_x: Tensor,
    kv_l: Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """:func:`resampler_attention` with each source's keys and values packed as the two halves
    of one ``[K | V]`` projection, the layout a fused K/V linear makes (OpenFlamingo's
    ``to_kv``); their gradients come back in that layout (no stack of separate K and V
    gradients into it).

    Args:
        q: (N, L, H, dh) latent queries.
        kv_x: (N, S, 2, H, dh) the features' keys ``kv_x[:, :, 0]`` and values ``kv_x[:, :, 1]``.
        kv_l: (N, L, 2, H, dh) the latents' keys and values.
        scale, backend: as :func:`resampler_attention`.

    Returns:
        (N, L, H, dh) in q's dtype, the same values as ``resampler_attention`` on the halves.
    """
    if q.dim() != 4:
        raise ValueError(f"expected q of shape (N, L, H, dh), got {tuple(q.shape)}")
    check_attention_dtype(q)
    n, L, H, dh = q.shape
    for name, t, rows in (("kv_x", kv_x, "S"), ("kv_l", kv_l, L)):
        if t.dim() != 5 or t.shape[2] != 2 or t.shape[0] != n or t.shape[3:] != (H, dh) or (
                rows == L and t.shape[1] != L):
            raise ValueError(f"expected {name} of shape ({n}, {rows}, 2, {H}, {dh}) (N, rows, 2, H, dh: keys and "
                             f"values packed), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"expected {name} of dtype {q.dtype} (as q), got {t.dtype}")
    if _backend.exporting():  # inference graphs: the unpacked op's export path
        k_x, v_x = kv_x.unbind(2)
        k_l, v_l = kv_l.unbind(2)
        return resampler_attention(q, k_x, v_x, k_l, v_l, scale=scale, backend=backend)
    if scale is None:
        scale = dh ** -0.5
    be = _backend.resolve(OP, backend, q.device)
    return _kvp(q, kv_x, kv_l, float(scale), be)
