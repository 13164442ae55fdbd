"""Output conventions shared by the op registrations: every backend returns fresh,
dense outputs (contiguous, or channels-last for channels-last activations and conv
weights), and the fake implementations promise exactly that."""
from __future__ import annotations

import torch
from torch import Tensor


def new_like(t: Tensor) -> Tensor:
    """A fresh contiguous tensor with t's shape, dtype and device."""
    return t.new_empty(t.shape)


def act_format(x: Tensor) -> torch.memory_format:
    """The memory format activations (and standardized conv weights) keep: channels-last
    when x is (and not also plain-contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def new_act_like(x: Tensor) -> Tensor:
    """A fresh activation-shaped tensor in x's memory format (NCHW or NHWC)."""
    return torch.empty_like(x, memory_format=act_format(x))


#: conv weights (O, I/g, kh, kw) keep the same two layouts ((I, kh, kw) or (kh, kw, I) rows)
new_weight_like = new_act_like
