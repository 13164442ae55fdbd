"""The image-causal cross-attention op, ``flamingo_rt::image_causal_attention``.

Registered with ``torch.library`` (fake implementation and autograd included), so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque op whose backend
(reference, cpu, cuda, triton) is chosen per call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend as _backend
from .precision import check_attention_dtype
from ._eager import EagerOp
from ._outputs import new_like as _new
from .reference import xattn as _ref

OP = "image_causal_attention"


def _xattn_impl(
    q: Tensor, k: Tensor, v: Tensor, media_index: Tensor, all_previous: bool, scale: float, backend: str
) -> Tensor:
    return _backend.get(OP, backend)(q, k, v, media_index, all_previous, scale).contiguous()


_xattn_op = torch.library.custom_op("flamingo_rt::image_causal_attention", mutates_args=())(_xattn_impl)


@_xattn_op.register_fake
def _(q, k, v, media_index, all_previous, scale, backend):
    return _new(q)


def _xattn_bwd_impl(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, media_index: Tensor,
    all_previous: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _backend.get(OP + ".backward", backend)(
        grad_out, q, k, v, media_index, all_previous, scale
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


_xattn_bwd_op = torch.library.custom_op("flamingo_rt::image_causal_attention_backward", mutates_args=())(
    _xattn_bwd_impl)


@_xattn_bwd_op.register_fake
def _(grad_out, q, k, v, media_index, all_previous, scale, backend):
    return _new(q), _new(k), _new(v)


def _setup_context(ctx, inputs, output):
    q, k, v, media_index, all_previous, scale, backend = inputs
    ctx.save_for_backward(q, k, v, media_index)
    ctx.all_previous, ctx.scale, ctx.backend = all_previous, scale, backend


def _backward(ctx, grad_out):
    q, k, v, media_index = ctx.saved_tensors
    dq, dk, dv = _xattn_bwd(
        grad_out.contiguous(), q, k, v, media_index, ctx.all_previous, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


_xattn_op.register_autograd(_backward, setup_context=_setup_context)

# plain eager calls skip the custom-op machinery (_eager.py); compile / export see the ops
_xattn = EagerOp(_xattn_op, _xattn_impl, _setup_context, _backward)
_xattn_bwd = EagerOp(_xattn_bwd_op, _xattn_bwd_impl)


def _reference_forward(q, k, v, media_index, all_previous, scale):
    return _ref.image_causal_attention(q, k, v, media_index, all_previous, scale)


def _reference_backward(grad_out, q, k, v, media_index, all_previous, scale):
    return _ref.image_causal_attention_backward(grad_out, q, k, v, media_index, all_previous, scale)


_backend.register(OP, "reference", _reference_forward)
_backend.register(OP + ".backward", "reference", _reference_backward)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, media_index: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"expected q of shape (B, T, H, dh), got {tuple(q.shape)}")
    B, T, H, dh = q.shape
    if k.dim() != 5 or k.shape[0] != B or k.shape[3] != H or k.shape[4] != dh:
        raise ValueError(
            f"expected k of shape (B, M, N, H, dh) = ({B}, M, N, {H}, {dh}), got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"expected v of the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if media_index.shape != (B, T):
        raise ValueError(f"expected media_index of shape (B, T) = ({B}, {T}), got {tuple(media_index.shape)}")
    if media_index.dtype.is_floating_point or media_index.dtype == torch.bool:
        raise TypeError(f"expected an integer media_index, got {media_index.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_attention_dtype(q)


#: Up to this many query tokens per sequence, the CUDA C++ forward runs its decode kernel
#: (one block per (b, t, h) row; csrc/cuda/xattn.cu), and ``auto`` picks it over Triton on
#: the GPU: measured on an H200 (bench/results/gpu_check_2026-12-04_NVIDIA-H200.md), one
#: token against 32 cached images took 20.5 us through the cuda backend and 130 us through
#: the triton one, while at training shapes Triton's tiled forward is the faster (0.10 vs
#: 0.38 ms at B8 T2048).
CUDA_DECODE_MAX_T = 4


def shape_backend(resolved: str, requested: str | None, device_type: str, T: int) -> str:
    """The backend for a call of ``T`` query tokens: ``resolved`` (what ``auto`` or the
    request resolved to), except that ``auto`` on a CUDA device takes the CUDA C++ decode
    kernel for T <= CUDA_DECODE_MAX_T when that backend is built. An explicit request
    (argument or FLAMINGO_RT_BACKEND) is never changed."""
    if (_backend.requested(requested) == "auto" and resolved == "triton" and device_type == "cuda"
            and T <= CUDA_DECODE_MAX_T and "cuda" in _backend.implemented(OP)):
        return "cuda"
    return resolved


def image_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    media_index: Tensor,
    *,
    all_previous: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Image-causal cross-attention of text queries to per-image visual tokens.

    Args:
        q: (B, T, H, dh) queries (float32, bfloat16, float16 or float64).
        k, v: (B, M, N, H, dh) keys and values per medium (N visual tokens each).
        media_index: (B, T) int32/int64, index of each token's image, -1 for none.
        all_previous: attend to every image up to ``media_index`` instead of just it.
        scale: softmax scale, default ``dh ** -0.5``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            default from ``FLAMINGO_RT_BACKEND``, else ``auto`` (on the GPU: triton, and
            the CUDA C++ decode kernel for T <= 4; see :func:`shape_backend`).

    Returns:
        (B, T, H, dh) in q's dtype; rows with media_index -1 are exactly zero.
    """
    _check_shapes(q, k, v, media_index)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    be = shape_backend(_backend.resolve(OP, backend, q.device), backend, q.device.type, q.shape[1])
    if _backend.exporting():  # the kernel itself (a flamingo_rt_C op or plain aten), no Python op
        return _backend.get(OP, be)(q, k, v, media_index, bool(all_previous), float(scale))
    return _xattn(q, k, v, media_index, bool(all_previous), float(scale), be)


from . import _triton_xattn  # noqa: E402,F401  (registers the triton backend when triton is installed)
from . import _cuda_xattn  # noqa: E402,F401  (registers the CUDA C++ backend when _C has CUDA)
