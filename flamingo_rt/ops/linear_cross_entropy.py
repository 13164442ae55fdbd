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

On the CPU the loss and the gradient of a chunk's logits are one C++ pass per row
(``flamingo_rt_C::softmax_xent_rows_``: max, exp and sum in float32, softmax - onehot written
over the logits in their dtype), where torch made a float32 copy of bf16 logits, its
logsumexp, the exp, the one-hot scatter and a bf16 copy of the result: 2 x 256 rows over
32,000 words under bf16 autocast, ~150 ms of those passes against ~10 in the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import cast_blocks, cpu_gemm, widening_gemm

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference"]

#: bytes of one chunk's logits in the compute dtype (32 MiB: 524 rows of a 32,000-word
#: vocabulary in bf16, 262 in float32) ...
CHUNK_BYTES = 32 << 20
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


def _kernel_ok(logits: Tensor) -> bool:
    """``flamingo_rt_C::softmax_xent_rows_`` takes these logits: float32 / bf16 on the CPU,
    eager, the C++ extension built."""
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling() and _ext.load())


class _WeightBlocks:
    """The weight (V, D) in the compute dtype for the logits and the hidden states' gradient.

    On the CPU a weight in another dtype (a float32 LM head under bf16 autocast) is never cast
    whole: 32,000 x 2048 is 125 MiB of fresh pages, which took 96-205 ms on a 2-core Xeon and
    170 ms on a 2-core EPYC (twice: for the logits and for the gradient), against ~10 ms to
    read the float32 weight. The cast is made :data:`cast_blocks.BLOCK_BYTES` at a time into
    one reused buffer (:mod:`cast_blocks`): the logits by blocks of vocabulary rows, the
    gradient by blocks of the weight's columns (the same products' values); where MKL's
    float32-accumulating product runs (:mod:`widening_gemm`), the gradient is summed over
    blocks of vocabulary rows in float32 and rounded once, as one product would be."""

    def __init__(self, weight: Tensor, dtype: torch.dtype):
        self.weight, self.dtype = weight, dtype
        self.blockwise = weight.dtype != dtype and weight.device.type == "cpu"
        self.whole = None if self.blockwise else weight.to(dtype)

    def logits(self, h: Tensor) -> Tensor:
        """h (n, D) in the compute dtype -> h @ W^T (n, V) in the compute dtype."""
        if not self.blockwise:
            return cpu_gemm.linear(h, self.whole)
        return cast_blocks.linear(h, self.weight, self.dtype)

    def grad_hidden(self, g: Tensor) -> Tensor:
        """g (n, V) in the compute dtype -> g @ W (n, D) in the compute dtype. In bf16 where
        MKL's float32-accumulating product runs, the same blocks of vocabulary rows summed in
        float32 whatever the weight's dtype (a bf16-stored weight gives what its float32
        original under autocast gives, bit for bit)."""
        widen = self.dtype == torch.bfloat16 and self.weight.device.type == "cpu" and widening_gemm.available()
        if not self.blockwise and not widen:
            return cpu_gemm.mm(g, self.whole)
        if not widen:
            return cast_blocks.mm(g, self.weight, self.dtype)
        acc = torch.zeros((g.shape[0], self.weight.shape[1]), dtype=torch.float32, device=g.device)
        for v0, v1, wb in cast_blocks.row_blocks(self.weight, self.dtype):
            widening_gemm.addmm_(acc, g[:, v0:v1], wb)
        return acc.to(self.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, dtype, chunk, need_h, need_w, rows, row_weight, need_r,
                rows_in_weight):
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = _WeightBlocks(weight, dtype)
            rc = delta = None
            if rows is not None and not rows_in_weight:
                # weight[rows] is stale: the k columns of the logits come from row_weight, and
                # the hidden states' gradient is corrected by g[:, rows] (row_weight - weight[rows])
                rc = row_weight.detach().to(dtype)
                delta = rc.to(acc) - weight.detach().index_select(0, rows).to(dtype).to(acc)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            gh = torch.empty_like(hidden) if need_h else None
            gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            gr = torch.zeros(row_weight.shape, dtype=acc, device=row_weight.device) if need_r else None
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)
                t = targets[s:s + chunk]
                logits = w.logits(h)  # (n, V) in the compute dtype
                if rc is not None:
                    logits.index_copy_(1, rows, cpu_gemm.linear(h, rc))
                if _kernel_ok(logits):
                    # the loss per row, and softmax - onehot written over the logits (one
                    # pass per row in float32, rounded once to the compute dtype)
                    losses = torch.ops.flamingo_rt_C.softmax_xent_rows_(logits, t, ignore_index,
                                                                         need_h or need_w or need_r, 1.0)
                    total += losses.sum(dtype=acc)
                    g = logits
                else:
                    valid = t != ignore_index
                    tt = torch.where(valid, t, torch.zeros_like(t))
                    logits = logits.to(acc)
                    lse = torch.logsumexp(logits, dim=-1)
                    picked = logits.gather(1, tt[:, None])[:, 0]
                    total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                    g = None
                    if need_h or need_w or need_r:
                        g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                        g.scatter_add_(1, tt[:, None], -torch.ones_like(lse)[:, None])
                        g.mul_(valid[:, None])
                        g = g.to(dtype)
                del logits
                if need_h and delta is not None:
                    gh[s:s + chunk] = (w.grad_hidden(g).to(acc) + g.index_select(1, rows).to(acc) @ delta).to(hidden.dtype)
                elif need_h:
                    gh[s:s + chunk] = w.grad_hidden(g).to(hidden.dtype)
                if need_w:
                    if dtype == torch.bfloat16 and acc == torch.float32:
                        widening_gemm.addmm_(gw, g.t(), h)
                    else:
                        gw += cpu_gemm.mm(g.t(), h).to(acc)
                if need_r:  # the trained rows' columns only: (k, n) x (n, D), in the accumulation dtype
                    gr += g.index_select(1, rows).t().to(acc) @ h.to(acc)
                del g
        ctx.save_for_backward(*(x for x in (gh, gw, gr) if x is not None))
        ctx.need = (need_h, need_w, need_r)
        ctx.dtypes = (hidden.dtype, weight.dtype, row_weight.dtype if need_r else None)
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w, need_r = ctx.need
        gh = saved.pop(0) * grad_out.to(ctx.dtypes[0]) if need_h else None
        gw = (saved.pop(0) * grad_out).to(ctx.dtypes[1]) if need_w else None
        gr = (saved.pop(0) * grad_out).to(ctx.dtypes[2]) if need_r else None
        return gh, gw, None, None, None, None, None, None, None, gr, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         chunk_rows: Optional[int] = None, rows: Optional[Tensor] = None,
                         row_weight: Optional[Tensor] = None, rows_in_weight: bool = True) -> Tensor:
    """Sum over the rows of ``cross_entropy(hidden @ weight.T, targets)``, chunked.

    Args:
        hidden: (N, D) float (float32, bfloat16, float16, float64); under autocast the
            products run in the autocast dtype, as ``F.linear`` would.
        weight: (V, D) the output projection (the LM head), same dtype as hidden (or autocast).
        targets: (N,) int64 in [0, V), or ``ignore_index`` for rows without a loss.
        chunk_rows: rows per chunk (default: :data:`CHUNK_BYTES` of logits in the compute
            dtype, at least :data:`MIN_CHUNK_ROWS` rows).
        rows, row_weight: rows of ``weight`` that train as their own parameter: ``rows`` (k,)
            int64 distinct indices into V, ``row_weight`` (k, D) their values, which
            ``weight[rows]`` must hold (rounded to weight's dtype: the caller keeps the frozen
            table in step, :class:`~flamingo_rt.models.token_rows.TokenRows`). The loss is
            differentiable in ``row_weight``: its gradient is the k columns of the logits'
            gradient against the hidden states (k x N x D FLOPs, where the whole weight's
            gradient is V x N x D), summed in float32.
        rows_in_weight: False when ``weight[rows]`` does not hold ``row_weight`` (a table that
            cannot be written in place: FSDP2's shards): the logits' k columns are computed from
            ``row_weight`` and the hidden states' gradient gets the correction
            ``g[:, rows] @ (row_weight - weight[rows])`` (2 x k x N x D FLOPs more); the loss
            and gradients are those of a weight holding ``row_weight`` in those rows.
    Rows whose target is ``ignore_index`` are dropped before the products (eager mode), so
    a padded batch pays only for its tokens with a loss.
    Returns:
        float32 scalar (the sum, not the mean); differentiable in hidden, weight and row_weight.
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
    if not torch.compiler.is_compiling() and not bool(valid.all()):
        # rows without a loss (padding, <image> targets) add 0 and get a 0 gradient: their
        # logits are never made (index_select's backward puts the zeros back)
        keep = valid.nonzero().squeeze(1)
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    dtype = _compute_dtype(hidden, weight)
    esize = torch.empty(0, dtype=dtype).element_size()
    chunk = int(chunk_rows) if chunk_rows else max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(V * esize, 1))
    if chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if (rows is None) != (row_weight is None):
        raise ValueError("expected rows and row_weight together (or neither)")
    if rows is not None:
        _check_rows(weight, rows, row_weight, bool(rows_in_weight))
        rows = rows.long()
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    need_r = grad and row_weight is not None and row_weight.requires_grad
    return _LinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), dtype, chunk, need_h, need_w,
                                     rows, row_weight, need_r, bool(rows_in_weight))


def _check_rows(weight: Tensor, rows: Tensor, row_weight: Tensor, in_weight: bool) -> None:
    """rows (k,) integer indices into weight's V rows, row_weight (k, D), and (``in_weight``)
    weight[rows] holding row_weight's values (eager mode: a (k, D) comparison)."""
    V, D = weight.shape
    if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise TypeError(f"expected rows as a 1-d integer tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if tuple(row_weight.shape) != (rows.shape[0], D):
        raise ValueError(f"expected row_weight of shape {(rows.shape[0], D)}, got {tuple(row_weight.shape)}")
    if torch.compiler.is_compiling():
        return
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= V):
        raise IndexError(f"rows must be in [0, {V}), got {rows.tolist()[:8]}")
    if rows.unique().numel() != rows.numel():
        raise ValueError(f"expected distinct rows, got {rows.tolist()[:8]}")
    if in_weight and not torch.equal(weight.detach().index_select(0, rows), row_weight.detach().to(weight.dtype)):
        raise ValueError("weight[rows] must hold row_weight's values (rounded to the weight's dtype): "
                         "copy the trained rows into the frozen table before the loss (TokenRows.sync_)")
