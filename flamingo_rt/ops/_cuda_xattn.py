"""Registers the ``cuda`` backend (CUDA C++, ``flamingo_rt._C``) of ``image_causal_attention``.

The CUDA C++ kernels are forward only (csrc/cuda/xattn.cu: a tiled kernel, and a decode
kernel for one new token per sequence that the forward picks for T <= 4); the backward of
this backend is the ``triton`` backward when triton is installed, else the reference.
float32, bfloat16 and float16 run the kernels; other dtypes (float64) the reference.
Nothing is registered unless ``flamingo_rt._C`` was built with CUDA (:data:`AVAILABLE`).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _ext
from . import backend as _backend

OP = "image_causal_attention"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def image_causal_attention(q: Tensor, k: Tensor, v: Tensor, media_index: Tensor,
                           all_previous: bool, scale: float) -> Tensor:
    """q (B, T, H, dh), k/v (B, M, N, H, dh), media_index (B, T) -> (B, T, H, dh)."""
    if q.dtype not in _DTYPES:
        return _backend.get(OP, "reference")(q, k, v, media_index, all_previous, scale)
    return torch.ops.flamingo_rt_C.image_causal_attention(q, k, v, media_index, bool(all_previous), float(scale))


def image_causal_attention_decode(q: Tensor, k: Tensor, v: Tensor, media_index: Tensor,
                                  all_previous: bool = False, scale: float | None = None) -> Tensor:
    """The decode kernel itself (one block per (b, t, h) row): q (B, 1, H, dh) against cached
    k/v (B, M, N, H, dh), media_index (B, 1) -> (B, 1, H, dh). Forward only, no autograd."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.flamingo_rt_C.image_causal_attention_decode(q, k, v, media_index, bool(all_previous), float(scale))


def image_causal_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    media_index: Tensor, all_previous: bool, scale: float
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv): the triton backward (the CUDA C++ kernels are forward only)."""
    be = "triton" if "triton" in _backend.implemented(OP + ".backward") else "reference"
    return _backend.get(OP + ".backward", be)(grad_out, q, k, v, media_index, all_previous, scale)


def register() -> bool:
    if not (_ext.load() and _ext.with_cuda()) or not hasattr(torch.ops.flamingo_rt_C, "image_causal_attention_decode"):
        return False
    try:
        @torch.library.register_fake("flamingo_rt_C::image_causal_attention_decode")
        def _(q, k, v, media_index, all_previous, scale):
            return torch.empty_like(q, memory_format=torch.contiguous_format)
    except RuntimeError:  # already registered (module reloaded)
        pass
    _backend.register(OP, "cuda", image_causal_attention)
    _backend.register(OP + ".backward", "cuda", image_causal_attention_backward)
    return True


AVAILABLE: bool = register()
