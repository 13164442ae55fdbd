"""Registers the ``triton`` backend of ``image_causal_attention`` (forward and backward),
the kernels of :mod:`flamingo_rt.kernels.xattn`.

Importing this module is enough; it registers nothing when triton is not importable
(:data:`AVAILABLE` is then False). The kernels take float32, bfloat16 and float16; other
dtypes (float64) go to the op's ``reference`` backend, so a forced ``triton`` backend
works for every dtype. On the CPU the backend runs only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import backend as _backend

OP = "image_causal_attention"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels():
    from ._kernel_modules import kernel_module

    return kernel_module("xattn")


def image_causal_attention(q: Tensor, k: Tensor, v: Tensor, media_index: Tensor,
                           all_previous: bool, scale: float) -> Tensor:
    """q (B, T, H, dh), k/v (B, M, N, H, dh), media_index (B, T) -> (B, T, H, dh)."""
    if q.dtype not in _DTYPES:
        return _backend.get(OP, "reference")(q, k, v, media_index, all_previous, scale)
    return _kernels().image_causal_attention_fwd(q, k, v, media_index, bool(all_previous), float(scale))


def image_causal_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    media_index: Tensor, all_previous: bool, scale: float
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each with the shape and dtype of its input."""
    if q.dtype not in _DTYPES:
        return _backend.get(OP + ".backward", "reference")(grad_out, q, k, v, media_index, all_previous, scale)
    return _kernels().image_causal_attention_bwd(grad_out, q, k, v, media_index, bool(all_previous), float(scale))


def register() -> bool:
    """Register the backend when triton is installed (imported lazily, on the first call)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    _backend.register(OP, "triton", image_causal_attention)
    _backend.register(OP + ".backward", "triton", image_causal_attention_backward)
    return True


AVAILABLE: bool = register()
