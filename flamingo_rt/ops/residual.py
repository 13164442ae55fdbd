"""``x + y`` / ``x + gate * y`` for residual branches at inference, written over y.

A residual branch's output y (an FF's or an attention's output projection) is a fresh
tensor that nothing else holds; adding the residual into it instead of into a new tensor
saves the allocation, whose first touch of fresh pages is the larger cost on the CPU
(the Perceiver Resampler's 12 residual adds of 32 x 64 x 1024 float32 took 26-155 ms per
forward into new tensors, as much as its attention).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import backend as _backend
from .cpu_gemm import plain_tensor, shares_storage


def residual_add_(x: Tensor, y: Tensor, gate: Optional[Union[Tensor, float]] = None) -> Tensor:
    """``x + y`` (``gate`` None or 1) or ``x + gate * y`` (``gate`` a one-element tensor), the
    same values as those expressions. y is overwritten with the result, and returned, when
    no gradient is being taken and y has the result's shape and dtype, is dense and does not
    overlap x (and not while compiling or exporting: traced graphs get the expression);
    otherwise a new tensor is returned and y is left as it was. The caller passes
    a y it does not use afterwards.

    Args:
        x: the residual stream (..., D).
        y: the branch's output, broadcastable with x.
        gate: None, 1, or a one-element tensor.
    """
    plain = gate is None or (not isinstance(gate, Tensor) and gate == 1)
    if _in_place_ok(x, y, gate, plain):
        return torch.add(x, y, out=y) if plain else torch.addcmul(x, gate, y, out=y)
    return x + y if plain else torch.addcmul(x, gate, y)


def _in_place_ok(x: Tensor, y: Tensor, gate, plain: bool) -> bool:
    if torch.compiler.is_compiling() or _backend.exporting():
        return False  # traced graphs get the expression
    if not (plain_tensor(x) and plain_tensor(y)):
        return False  # fake / functional tensors, subclasses
    if torch.is_grad_enabled() and (
            x.requires_grad or y.requires_grad or (isinstance(gate, Tensor) and gate.requires_grad)):
        return False
    dtype = torch.result_type(x, y) if plain else torch.promote_types(torch.result_type(x, y), gate.dtype)
    return (
        y.dtype == dtype
        and y.shape == torch.broadcast_shapes(x.shape, y.shape)
        and y.is_contiguous()
        and y.device == x.device
        and not shares_storage(x, y)
    )

