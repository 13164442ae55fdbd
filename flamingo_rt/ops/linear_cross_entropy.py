"""``linear_cross_entropy``: the LM head and the next-token loss in one pass, chunked over
tokens, so the (tokens, vocabulary) logits are never all in memory.

The plain path (``F.cross_entropy(F.linear(h, W).float(), t, reduction="sum")``) keeps
the logits, their float32 copy and the log-softmax alive from the forward to the backward:
three (N, V) tensors, 195 MiB for 2 x 256 tokens over a 32,000-word vocabulary. Here each
chunk of rows computes its logits, its loss and, when a gradient is wanted, its gradients
at once (the softmax minus the one-hot target, times the weight for the hidden states,
transposed against the hidden states for the weight), then frees them: the backward pass
only scales the stored gradients by the incoming scalar. Same products as the plain path,
same dtypes (the logits and both gradient products in the autocast dtype when autocast is
on, the softmax in float32), sums in a different order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_gemm

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference"]

#: float32 elements of one chunk's logits (8 MiB) ...
CHUNK_ELEMENTS = 1 << 21
#: ... but at least this many rows: thinner float32 products run well under the GEMM rate
#: (511 x 2048 -> 32,000, fwd+bwd, 1 thread: 65-row chunks 8.7 s, 256 rows 5.0 s, 512 rows
#: 4.1 s; the plain path 6.3 s).
MIN_CHUNK_ROWS = 256


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor,
                                   ignore_index: int = -100) -> Tensor:
    """The specification: ``F.cross_entropy(F.linear(hidden, weight).float(), targets,
    ignore_index, reduction="sum")``; hidden (N, D), weight (V, D), targets (N,) -> float32 ()."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index, reduction="sum")


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and hidden.is_floating_point():
        return torch.get_autocast_dtype(dev)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"expected hidden and weight of one dtype (or autocast), got {hidden.dtype} and {weight.dtype}")
    return hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, dtype, chunk, need_h, need_w):
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            gh = torch.empty_like(hidden) if need_h else None
            gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)
                t = targets[s:s + chunk]
                valid = t != ignore_index
                tt = torch.where(valid, t, torch.zeros_like(t))
                logits = cpu_gemm.linear(h, w).to(acc)  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, tt[:, None])[:, 0]
                total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                if need_h or need_w:
                    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    g.scatter_add_(1, tt[:, None], -torch.ones_like(lse)[:, None])
                    g.mul_(valid[:, None])
                    g = g.to(dtype)
                    if need_h:
                        gh[s:s + chunk] = cpu_gemm.mm(g, w).to(hidden.dtype)
                    if need_w:
                        gw += cpu_gemm.mm(g.t(), h).to(acc)
        ctx.save_for_backward(*(x for x in (gh, gw) if x is not None))
        ctx.need = (need_h, need_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        gh = saved.pop(0) * grad_out.to(ctx.dtypes[0]) if need_h else None
        gw = (saved.pop(0) * grad_out).to(ctx.dtypes[1]) if need_w else None
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         chunk_rows: Optional[int] = None) -> Tensor:
    """Sum over the rows of ``cross_entropy(hidden @ weight.T, targets)``, chunked.

    Args:
        hidden: (N, D) float (float32, bfloat16, float16, float64); under autocast the
            products run in the autocast dtype, as ``F.linear`` would.
        weight: (V, D) the output projection (the LM head), same dtype as hidden (or autocast).
        targets: (N,) int64 in [0, V), or ``ignore_index`` for rows without a loss.
        chunk_rows: rows per chunk (default: 8 MiB of float32 logits, at least 256 rows).
    Returns:
        float32 scalar (the sum, not the mean); differentiable in hidden and weight.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets of shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"expected integer targets, got {targets.dtype}")
    V = weight.shape[0]
    valid = targets != ignore_index
    if bool((valid & ((targets < 0) | (targets >= V))).any()):
        bad = targets[valid & ((targets < 0) | (targets >= V))][:5].tolist()
        raise IndexError(f"targets must be in [0, {V}) or {ignore_index}; got {bad}")
    dtype = _compute_dtype(hidden, weight)
    chunk = int(chunk_rows) if chunk_rows else max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(V, 1))
    if chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    return _LinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), dtype, chunk, need_h, need_w)
