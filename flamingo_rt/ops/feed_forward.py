"""``flamingo_rt::feed_forward``: LayerNorm -> Linear -> GELU / squared ReLU -> Linear as one
op (``torch.library``, fake implementation and autograd) that keeps less for the backward.

The module path keeps, per feed-forward, the normalized input (for fc1's weight gradient),
the pre-activation h (for the activation's backward) and the activation a (for fc2's weight
gradient). This op keeps only the input x (which the residual stream holds anyway) and h,
and recomputes the normalization and a in the backward (elementwise work, no products):
for the resampler's FF (64 latents x 1024 -> 4096) and the cross-attention blocks' FF
(2048 -> 8192) that is 2 of 3 activation tensors of the width-4x kind less per FF.

With ``residual`` the op is the whole residual branch of a Flamingo block, ``x + gate *
FF(x)``: the FF's output is not kept for the gate's gradient (an addcmul would keep it),
and the incoming gradient is not scaled by the gate into a second (rows, D) tensor.
Forward and backward run over chunks of rows (:data:`CHUNK_BYTES`): the activation, its
gradient and their products exist one chunk at a time, the saved h is the only
(rows, inner) tensor.

Under autocast (``compute_dtype`` bfloat16/float16) it computes what autocast does on the
module path: the LayerNorm in float32, the products in the compute dtype, the output in
the compute dtype (with ``residual``: x + gate * that, in x's dtype); parameter gradients
come back in the parameters' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_gemm import BLOCK_BYTES, block_rows, eligible, mm, mm_add, rows_first, transpose_rows
from ._eager import EagerOp
from .precision import acc_dtype as _acc
from .precision import compute_dtype as _compute_dtype
from .precision import layer_norm_in, widen_block_rows
from .gated_linear_residual import check_gate, gate_weight_grads
from .residual import residual_add_
from . import factored_grads, half_widening, scratch, widening_gemm

__all__ = ["feed_forward", "module_feed_forward", "FF_KINDS"]

FF_KINDS = ("gelu", "sqrelu")


def _norm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float):
    """x (R, D) -> (LN(x) in the accumulation dtype, x there, mean, rstd, gamma, beta there)."""
    a = _acc(x.dtype)
    xf, g, b = x.to(a), gamma.to(a), beta.to(a)
    xn, mean, rstd = torch.native_layer_norm(xf, [xf.shape[-1]], g, b, eps)
    return xn, xf, mean, rstd, g, b


def _act(h: Tensor, kind: str) -> Tensor:
    return F.gelu(h) if kind == "gelu" else torch.relu(h).square()


def _act_into(h: Tensor, kind: str, out: Tensor) -> Tensor:
    """:func:`_act` written into ``out`` (same shape and dtype as h)."""
    if kind == "gelu":
        return torch.ops.aten.gelu.out(h, out=out)
    return torch.clamp_min(h, 0, out=out).square_()


CHUNK_BYTES = 32 << 20  # the largest (rows, inner) temporary the op makes at once, forward or backward
# The forward's activation chunks stay below glibc's largest mmap threshold (32 MiB): a block
# of that size or more is mapped fresh on every allocation (first-touch page faults on each
# of its pages), a smaller one comes back from the heap. Forward of OpenFlamingo-3B's block
# FF at batch 4 (bf16, 8192 rows) 410 -> 385 ms, the resampler's (float32) 116.5 -> 109 ms;
# the backward, which accumulates the weight gradients once per chunk, keeps CHUNK_BYTES.
FORWARD_CHUNK_BYTES = 24 << 20


def _chunk_rows(rows: int, inner: int, dtype: torch.dtype, limit: Optional[int] = None) -> int:
    """Rows per chunk: the (chunk, inner) temporaries in ``dtype`` at most ``limit`` bytes
    (default :data:`CHUNK_BYTES`), the chunks balanced (:func:`cpu_gemm.block_rows`)."""
    esize = torch.empty(0, dtype=dtype).element_size()
    return block_rows(rows, (CHUNK_BYTES if limit is None else limit) // max(1, inner * esize))


#: a weight's compute-dtype cast (bf16 under autocast) is made in parts of at most this many
#: bytes: glibc maps every block of 32 MiB or more anew, so a whole 2048 x 8192 bf16 cast
#: (OpenFlamingo-3B's block FF, exactly 32 MiB) was fresh pages at every use, three per block
#: and step; 16 MiB parts come back from its heap.
CAST_PART_BYTES = 16 << 20


def _cast_parts(w: Tensor, dtype: torch.dtype, dim: int, split: bool = True) -> list:
    """``w`` (N, K) in ``dtype`` as [(lo, hi, part)]: contiguous blocks of rows (dim 0) or
    columns (dim 1), each at most :data:`CAST_PART_BYTES`; ``[(0, n, w)]`` when w already is
    in ``dtype``, one whole cast when that is small or ``split`` is False. (The ops split only
    when their rows are one chunk: with many rows the fresh pages are a small share of the
    products, and the products into column blocks of a wide output measured 3-7 % slower,
    8192 rows of the 3B block.)"""
    n = w.shape[dim]
    if w.dtype == dtype:
        return [(0, n, w)]
    if not split:
        return [(0, n, w.to(dtype))]
    nbytes = w.numel() * torch.empty(0, dtype=dtype).element_size()
    count = max(1, -(-nbytes // CAST_PART_BYTES))
    if count == 1 or n < 2:
        return [(0, n, w.to(dtype))]
    per = -(-n // count)
    parts = []
    for lo in range(0, n, per):
        hi = min(n, lo + per)
        src = w[lo:hi] if dim == 0 else w[:, lo:hi]
        parts.append((lo, hi, torch.empty(src.shape, dtype=dtype, device=w.device).copy_(src)))
    return parts


def _mm_parts(a: Tensor, parts: list, transposed: bool, out: Optional[Tensor] = None) -> Tensor:
    """``a @ W.T`` (``transposed``; parts: W's row blocks) or ``a @ W`` (parts: W's column
    blocks) for W given by :func:`_cast_parts`: each part's product written into its columns
    of the output (``out`` when given, a dense (M, N) tensor)."""
    if len(parts) == 1:
        w = parts[0][2]
        return mm(a, w.t() if transposed else w, out=out)
    n = parts[-1][1]
    if out is None:
        out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
    for lo, hi, w in parts:
        wp = w.t() if transposed else w
        if half_widening.wanted(a, wp):  # bf16 / fp16 where torch has no fast kernels
            half_widening.mm(a, wp, out=out[:, lo:hi])
        else:
            torch.mm(a, wp, out=out[:, lo:hi])
    return out


def _act_buffer(rows: int, inner: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (rows, inner) ``dtype`` buffer for the backward's activation chunk: the calling
    thread's :mod:`scratch` buffer on the CPU (valid until the next backward of a feed-forward
    on this thread), a fresh tensor elsewhere (CUDA's caching allocator keeps its pages)."""
    if torch.device(device).type != "cpu":
        return torch.empty((rows, inner), dtype=dtype, device=device)
    return scratch.buffer("feed_forward.backward_act", rows * inner, dtype, device).view(rows, inner)


def _gate_of(gate: Optional[Tensor]) -> Optional[Tensor]:
    return None if gate is None else gate.reshape(())


def _ff_op_impl(x: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor, gate: Optional[Tensor], eps: float,
                kind: str, compute_dtype: torch.dtype, residual: bool,
                keep_branch: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """For x (..., D) contiguous with R rows: returns (y (..., D), h (R, inner), f); h is
    returned to be saved for the backward, and with ``keep_branch`` (a gated residual only)
    f = FF(x) (R, D) in the compute dtype, the ungated branch as the forward rounded it, for
    the gate's gradient sum(dy * f) (else an empty tensor). y has x's shape and is not a view
    (an FSDP2-wrapped module returning a view of it would be warned about).

    y = FF(x) in the compute dtype, or with ``residual`` x + gate * FF(x) in x's dtype (gate
    a one-element tensor in x's dtype, or None for 1). The activation and fc2 run over
    chunks of rows, so the activated (rows, inner) tensor never exists whole."""
    if keep_branch and (not residual or gate is None):
        raise ValueError("feed_forward: keep_branch keeps a gated residual's branch; got "
                         f"residual={residual}, gate={'None' if gate is None else 'given'}")
    with torch.autocast(x.device.type, enabled=False):
        out_shape = (*x.shape[:-1], w2.shape[0])
        x = x.reshape(-1, x.shape[-1])
        R = x.shape[0]
        xn = layer_norm_in(x, eps, compute_dtype, gamma, beta)[0]  # bf16: in blocks of rows
        step = _chunk_rows(R, w1.shape[0], compute_dtype, min(CHUNK_BYTES, FORWARD_CHUNK_BYTES))
        h = _mm_parts(xn, _cast_parts(w1, compute_dtype, 0, split=step >= R), True)
        del xn
        w2p = _cast_parts(w2, compute_dtype, 0, split=step >= R)
        g = _gate_of(gate)
        y_nd = torch.empty(out_shape, dtype=x.dtype if residual else compute_dtype, device=x.device)
        y = y_nd.view(R, w2.shape[0])
        if not residual and step >= R:  # one chunk: the product is the output
            f = _mm_parts(_act(h, kind), w2p, True, out=y)
            if f.data_ptr() != y.data_ptr():  # a product with its own output
                y.copy_(f)
            return y_nd, h, x.new_empty(0)
        branch = torch.empty((R, w2.shape[0]), dtype=compute_dtype, device=x.device) if keep_branch \
            else x.new_empty(0)
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            f = _mm_parts(_act(h[r0:r1], kind), w2p, True, out=branch[r0:r1] if keep_branch else None)
            if keep_branch and f.data_ptr() != branch[r0:r1].data_ptr():  # a product with its own output
                f = branch[r0:r1].copy_(f)
            if not residual:
                y[r0:r1] = f
            elif g is None:
                torch.add(x[r0:r1], f, out=y[r0:r1])
            else:
                torch.addcmul(x[r0:r1], g, f, out=y[r0:r1])
    return y_nd, h, branch


_ff_op = torch.library.custom_op("flamingo_rt::feed_forward", mutates_args=())(_ff_op_impl)


@_ff_op.register_fake
def _(x, gamma, beta, w1, w2, gate, eps, kind, compute_dtype, residual, keep_branch=False):
    R = x.shape[:-1].numel()
    return (x.new_empty((*x.shape[:-1], w2.shape[0]), dtype=x.dtype if residual else compute_dtype),
            x.new_empty((R, w1.shape[0]), dtype=compute_dtype),
            x.new_empty((R, w2.shape[0]) if keep_branch else (0,), dtype=compute_dtype if keep_branch
                        else x.dtype))


def _ff_bwd_op_impl(dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor, h: Tensor,
                    gate: Optional[Tensor], eps: float, kind: str, residual: bool,
                    need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx (or empty), dgamma, dbeta, dw1, dw2, dgate (or empty)) for the output gradient dy.

    Runs over chunks of rows: per chunk, the activation recomputed from h, dW2 += dy^T a
    (ungated), dh = gate (dy W2) * act'(h) (the gate applied to dy's chunk when that is a
    fresh compute-dtype cast: 4x fewer elements than dh), dW1 += dh^T LN(x), d(LN input) = dh W1 and
    the LayerNorm backward; the (chunk, inner) temporaries live one or two at a time and no
    (rows, inner) temporary exists besides the saved h (OpenFlamingo-3B's block, 2048 tokens
    per row, forward+backward in float32, resident memory added with the block's other ops
    of the same change: batch 1 448 -> 328 MiB, batch 4 1489 -> 712 MiB). The gate's gradient
    sum(dy * FF(x)) is <W2, dy^T a> (the ungated dW2 against W2: FF's output need not be kept)."""
    with torch.autocast(x.device.type, enabled=False):
        cd = h.dtype
        R, D = x.shape
        acc = _acc(w1.dtype)
        g = _gate_of(gate)
        dw1 = dw2 = None
        dg = torch.zeros(D, dtype=_acc(gamma.dtype), device=x.device)
        db = torch.zeros(D, dtype=_acc(beta.dtype), device=x.device)
        dx = torch.empty_like(x) if need_dx else x.new_empty(0)
        step = _chunk_rows(R, h.shape[1], cd)
        # The compute-dtype weight casts (bf16 copies under autocast, in parts: _cast_parts):
        # with one chunk they live one at a time; with several, each is made once for all of
        # them (made per chunk they were 40 % of the chunk loop's non-product time at
        # OpenFlamingo-3B's block, batch 4).
        several = step < R
        w2_all = _cast_parts(w2, cd, 1, split=False) if several else None
        w1_all = _cast_parts(w1, cd, 1, split=False) if several else None
        gc = None if g is None else g.to(cd)
        # one (chunk, inner) buffer for all chunks: the activation, then da / dh in place. On
        # the CPU it is the thread's scratch buffer, kept from one backward to the next: a
        # fresh one was fresh pages every time (glibc maps each block of 32 MiB or more anew:
        # the resampler's FF, 2048 x 4096 float32, is exactly that, six per step)
        abuf = _act_buffer(step, h.shape[1], cd, x.device)
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            dyc, hc = dy[r0:r1].to(cd), h[r0:r1]
            a = _act_into(hc, kind, abuf[:r1 - r0])
            dw2 = _acc_mm(dw2, dyc.t(), a, acc)  # the activation lives for this product only
            w2c = w2_all if several else _cast_parts(w2, cd, 1)
            # the gate on dy's chunk when that is a fresh cast (D wide), else on dh (inner wide)
            gate_dy = gc is not None and dy.dtype != cd
            if gate_dy:
                dyc.mul_(gc)
            # da into the activation's (now dead) buffer, made dh in place
            dh = _mm_parts(dyc, w2c, False, out=a)
            del a, dyc
            if kind == "gelu":
                torch.ops.aten.gelu_backward.grad_input(dh, hc, grad_input=dh)
            else:
                dh.mul_(2 * torch.relu(hc))
            if gc is not None and not gate_dy:
                dh.mul_(gc)
            xn, xf, mean, rstd, gm, bt = _norm(x[r0:r1], gamma, beta, eps)
            dw1 = _acc_mm(dw1, dh.t(), xn.to(cd), acc)
            del w2c
            w1c = w1_all if several else _cast_parts(w1, cd, 1)
            dxn = _mm_parts(dh, w1c, False).to(xf.dtype)
            del w1c
            del dh
            _ln_backward_rows(dxn, xf, mean, rstd, gm, bt, dy, r0, r1, residual, dx if need_dx else None, dg, db)
        if g is not None:
            dw2, dgate = gate_weight_grads(dw2, w2, gate)
        else:
            dgate = x.new_empty(0)
    return dx, dg.to(gamma.dtype), db.to(beta.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype), dgate


_ff_bwd_op = torch.library.custom_op("flamingo_rt::feed_forward_backward", mutates_args=())(_ff_bwd_op_impl)


#: compute dtypes whose products are rounded to 16 bits (the gate's gradient is then not made from them)
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _ff_bwd_factored_op_impl(
        dy: Tensor, x: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor, h: Tensor,
        gate: Optional[Tensor], eps: float, kind: str, residual: bool,
        need_dx: bool,
        branch: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_ff_bwd_op` with the weight gradients left as factors (:mod:`factored_grads`):
    (dx (or empty), dgamma, dbeta, dgate (or empty), dh, xn, dyc, a) where dW1 = dh^T xn and
    dW2 = gate * dyc^T a; dh, a (R, inner) and xn, dyc (R, D) in the compute dtype.

    The gate's gradient <W2, dy^T a> = sum(dy * (a W2^T)) = sum(a * (dy W2)): in float32 /
    float64 from da = dy W2, which the input gradient makes anyway (no product of its own; the
    connector step of issue 7 in float32 made a (512 x 8192) x (8192 x 2048) product per block
    for it, 2 x 80 ms); in a 16-bit compute dtype da is rounded, and its sum against a would
    lose the gate's gradient to cancellation, so there FF's output f = a W2^T is summed against
    the unrounded dy: f as the forward made it when it kept it (``branch``, the gated
    residual's rounded branch: the gate's exact gradient for the computed output, as
    autocast's module path takes it), else made again (one (rows, D) product accumulated in
    float32)."""
    with torch.autocast(x.device.type, enabled=False):
        cd = h.dtype
        R, D = x.shape
        inner = h.shape[1]
        acc = _acc(x.dtype)
        g = _gate_of(gate)
        gc = None if g is None else g.to(cd)
        xn, mean, rstd = layer_norm_in(x, eps, cd, gamma, beta)
        gm, bt = gamma.to(acc), beta.to(acc)
        dyc = dy.to(cd) if dy.dtype != cd else dy.clone()  # kept as a factor: our own copy
        a_all = torch.empty((R, inner), dtype=cd, device=x.device)
        dh_all = torch.empty((R, inner), dtype=cd, device=x.device)
        dg = torch.zeros(D, dtype=_acc(gamma.dtype), device=x.device)
        db = torch.zeros(D, dtype=_acc(beta.dtype), device=x.device)
        dgate = torch.zeros((), dtype=torch.float64, device=x.device)
        dx = torch.empty_like(x) if need_dx else x.new_empty(0)
        step = _chunk_rows(R, inner, cd)
        several = step < R
        w2c = _cast_parts(w2, cd, 1, split=not several)  # column blocks: da's output, f's inner dimension
        w1c = _cast_parts(w1, cd, 1, split=False) if several else None
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            hc = h[r0:r1]
            a = _act_into(hc, kind, a_all[r0:r1])
            if g is not None and cd in _HALF_DTYPES and branch is not None:
                dgate += torch.dot(branch[r0:r1].reshape(-1).to(torch.float32),
                                   dy[r0:r1].reshape(-1).to(torch.float32)).to(torch.float64)
            elif g is not None and cd in _HALF_DTYPES:
                # the gate's gradient sum(dy * f) with f = a W2^T (the ungated FF output, not
                # kept from the forward) remade as one (rows, D) product, accumulated in float32
                # (bf16: MKL's widening product) against the unrounded dy; dy W2 rounded to
                # bf16 (da) would lose it to the sum's cancellation
                if cd == torch.bfloat16:  # summed over w2's column blocks in float32
                    f = torch.zeros((r1 - r0, D), dtype=torch.float32, device=x.device)
                    for lo, hi, wp in w2c:
                        widening_gemm.addmm_(f, a[:, lo:hi], wp.t())
                else:
                    f = sum(mm(a[:, lo:hi], wp.t()) for lo, hi, wp in w2c)
                    f = f.to(torch.float32 if cd != torch.float64 else cd)
                dgate += torch.dot(f.reshape(-1), dy[r0:r1].to(f.dtype).reshape(-1)).to(torch.float64)
                del f
            dst = dh_all[r0:r1]
            dh = _mm_parts(dyc[r0:r1], w2c, False, out=dst)  # da, made dh in place below
            if dh.data_ptr() != dst.data_ptr():  # a product that made its own output (oneDNN)
                dh = dst.copy_(dh)
            if g is not None and cd not in _HALF_DTYPES:  # sum(a * da), before da becomes dh in place
                dgate += torch.dot(a.reshape(-1), dh.reshape(-1)).to(torch.float64)
            if not several:  # w1's cast once w2's is no longer needed
                del w2c
                w1c = _cast_parts(w1, cd, 1)
            if kind == "gelu":
                torch.ops.aten.gelu_backward.grad_input(dh, hc, grad_input=dh)
            else:
                dh.mul_(2 * torch.relu(hc))
            if gc is not None:
                dh.mul_(gc)
            dxn = _mm_parts(dh, w1c, False).to(acc)
            _ln_backward_rows(dxn, x[r0:r1].to(acc), mean[r0:r1], rstd[r0:r1], gm, bt, dy, r0, r1, residual,
                              dx if need_dx else None, dg, db)
            del dxn
        dgate_out = dgate.reshape(gate.shape).to(gate.dtype) if gate is not None else x.new_empty(0)
    return dx, dg.to(gamma.dtype), db.to(beta.dtype), dgate_out, dh_all, xn, dyc, a_all


_ff_bwd_factored_op = torch.library.custom_op("flamingo_rt::feed_forward_backward_factored", mutates_args=())(
    _ff_bwd_factored_op_impl)


@_ff_bwd_factored_op.register_fake
def _(dy, x, gamma, beta, w1, w2, h, gate, eps, kind, residual, need_dx, branch=None):
    R, D = x.shape
    cd = h.dtype
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), gamma.new_empty(gamma.shape),
            beta.new_empty(beta.shape), gate.new_empty(gate.shape) if gate is not None else x.new_empty(0),
            h.new_empty(h.shape), x.new_empty((R, D), dtype=cd), x.new_empty((R, D), dtype=cd), h.new_empty(h.shape))


def _ln_backward_rows(dxn: Tensor, xf: Tensor, mean: Tensor, rstd: Tensor, gm: Tensor, bt: Tensor, dy: Tensor,
                      r0: int, r1: int, residual: bool, dx: Optional[Tensor], dg: Tensor, db: Tensor) -> None:
    """The LayerNorm's backward for rows r0:r1 (dxn its output gradient, xf its input, mean /
    rstd its statistics, gm / bt its affine, all in the accumulation dtype): dgamma / dbeta
    added into dg / db, the input gradient (plus dy's rows with ``residual``) written into
    dx's rows when dx is given."""
    dxc, dgc, dbc = torch.ops.aten.native_layer_norm_backward(
        dxn, xf, [xf.shape[-1]], mean, rstd, gm, bt, [dx is not None, True, True])
    dg += dgc
    db += dbc
    if dx is not None:
        if residual:
            dxc = dxc.add_(dy[r0:r1].to(dxc.dtype))
        dx[r0:r1] = dxc


def _acc_mm(c: Optional[Tensor], a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``c += a @ b`` in place in the accumulation dtype ``acc`` (a new acc tensor ``a @ b``
    when c is None), a (M, K) often a transposed view: computed in blocks of a's rows so that
    no temporary is larger than ``cpu_gemm.BLOCK_BYTES`` (a whole-matrix ``c + a @ b`` would
    hold a second weight-gradient-sized tensor). A product in acc adds c as its post-op
    (:func:`cpu_gemm.mm_add`) on oneDNN, and in place (``addmm_``) on torch's BLAS. A
    lower-precision product (bf16 under autocast) is widened into acc a block of rows at a
    time (``precision.WIDEN_BLOCK_BYTES``), never whole: its values are those of the one
    whole product widened (each element is the same dot product, rounded once to the
    compute dtype, as the module path's weight gradient), and no compute-dtype copy of the
    gradient lives beside the float32 one (OpenFlamingo-3B's
    block: 32 MiB at 8192 x 2048)."""
    M, N = a.shape[0], b.shape[1]
    if a.dtype == torch.bfloat16 and acc == torch.float32 and widening_gemm.available():
        # MKL's bf16 product accumulates into the float32 gradient itself: no widening pass,
        # no bf16 rounding, a transposed operand read in place (widening_gemm)
        return widening_gemm.mm(a, b) if c is None else widening_gemm.addmm_(c, a, b)
    if a.dtype == acc:
        if c is None:
            return mm(a, b)  # mm copies a transposed a in blocks itself
        if not eligible(a, b):
            # torch's BLAS (MKL) adds into c in place (beta = 1), a transposed a read as it
            # is: no temporary, no copy back (OpenFlamingo-3B's block in float32, both FF
            # weight gradients over two chunks: 474 -> 447 ms against blocks of c + a @ b)
            return c.addmm_(a, b)
        esize = torch.empty(0, dtype=acc).element_size()
        rows = block_rows(M, BLOCK_BYTES // (max(a.shape[1], N) * esize))
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            c[r0:r1] = mm_add(c[r0:r1], a[r0:r1], b)
        return c
    out = torch.empty((M, N), dtype=acc, device=a.device) if c is None else c
    if M < N and rows_first(a, b) and a.numel() * a.element_size() <= BLOCK_BYTES:
        # a transposed a narrower than b (fc2's dW = dy^T a): a is copied to rows once and the
        # output made in blocks of columns, so each block's product repacks the small operand,
        # not b (2048 x 2048 x 8192 bf16: 80 ms in 16 blocks of rows, 37 ms in blocks of columns)
        a = transpose_rows(a)
        cols = widen_block_rows(N, M, acc)
        for c0 in range(0, N, cols):
            c1 = min(N, c0 + cols)
            if c is None:
                out[:, c0:c1] = mm(a, b[:, c0:c1])
            else:
                out[:, c0:c1] += mm(a, b[:, c0:c1])
        return out
    rows = widen_block_rows(M, max(a.shape[1], N), acc)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        if c is None:
            out[r0:r1] = mm(a[r0:r1], b)
        else:
            out[r0:r1] += mm(a[r0:r1], b)
    return out


@_ff_bwd_op.register_fake
def _(dy, x, gamma, beta, w1, w2, h, gate, eps, kind, residual, need_dx):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), gamma.new_empty(gamma.shape),
            beta.new_empty(beta.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape),
            gate.new_empty(gate.shape) if gate is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, gamma, beta, w1, w2, gate, eps, kind, compute_dtype, residual, keep_branch = inputs
    ctx.save_for_backward(x, gamma, beta, w1, w2, output[1], gate, output[2])
    ctx.eps, ctx.kind, ctx.residual = eps, kind, residual
    ctx.set_materialize_grads(False)  # h's gradient (never used) is None, not a (rows, inner) zeros


def _backward(ctx, dy, dh_unused, branch_unused):
    x_nd, gamma, beta, w1, w2, h, gate, branch = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    nones = (None,) * 5  # eps, kind, compute_dtype, residual, keep_branch
    if dy is None:  # y took no part in the loss
        return (None,) * 11
    x = x_nd.reshape(-1, x_nd.shape[-1])  # (R, D): the backward ops take rows
    dy = dy.reshape(x.shape)
    store = None
    if ctx.needs_input_grad[3] and ctx.needs_input_grad[4]:
        # a training step collecting weight gradients as factors (factored_grads)? dW1 = dh^T xn,
        # dW2 = gate dy^T a: (R, inner + D) factors each, in the compute dtype
        R, D, inner = x.shape[0], x.shape[1], h.shape[1]
        n = R * (inner + D)
        store = factored_grads.store_for([(w1, n), (w2, n)], h.element_size())
    if store is not None:
        dx, dg, db, dgate, dh, xn, dyc, a = _ff_bwd_factored(
            dy.contiguous(), x, gamma, beta, w1, w2, h, gate, ctx.eps, ctx.kind, ctx.residual, need_dx,
            branch if branch.numel() else None)
        store.add(w1, dh, xn)
        store.add(w2, dyc, a, scale=gate)
        return ((dx.reshape(x_nd.shape) if need_dx else None), dg, db, None, None,
                (dgate if gate is not None else None), *nones)
    dx, dg, db, dw1, dw2, dgate = _ff_bwd(dy.contiguous(), x, gamma, beta, w1, w2, h, gate, ctx.eps, ctx.kind,
                                             ctx.residual, need_dx)
    return ((dx.reshape(x_nd.shape) if need_dx else None), dg, db, dw1, dw2, (dgate if gate is not None else None),
            *nones)


_ff_op.register_autograd(_backward, setup_context=_setup_context)

# plain eager calls skip the custom-op machinery (_eager.py); compile / export see the ops
_ff = EagerOp(_ff_op, _ff_op_impl, _setup_context, _backward)
_ff_bwd = EagerOp(_ff_bwd_op, _ff_bwd_op_impl)
_ff_bwd_factored = EagerOp(_ff_bwd_factored_op, _ff_bwd_factored_op_impl)


def feed_forward(x: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor, eps: float = 1e-5,
                 kind: str = "gelu", *, residual: bool = False, gate: Optional[Tensor] = None) -> Tensor:
    """``fc2(act(fc1(LayerNorm(x))))`` with bias-free fc1 (inner, D) and fc2 (D, inner), or with
    ``residual`` the residual branch ``x + gate * fc2(...)`` (the gated FF of a Flamingo block).

    Args:
        x: (..., D) any float dtype; gamma, beta: (D,) LayerNorm affine; w1: (inner, D);
        w2: (D, inner); kind: ``"gelu"`` (exact erf) or ``"sqrelu"`` (squared ReLU).
        residual: add the FF's output (times ``gate``) to x.
        gate: with ``residual``, a one-element tensor in x's dtype scaling the branch (e.g.
            ``tanh(ff_gate)``; its gradient is exact), or None for an ungated residual.
    Returns:
        (..., D): the FF alone in the autocast dtype when autocast is on for x's device (and
        x is not float64), else in x's dtype; with ``residual`` in x's dtype.
    """
    if kind not in FF_KINDS:
        raise ValueError(f"unknown feed-forward kind {kind!r}; expected one of {FF_KINDS}")
    D = x.shape[-1]
    if gamma.shape != (D,) or beta.shape != (D,) or w1.dim() != 2 or w1.shape[1] != D or w2.shape != (D, w1.shape[0]):
        raise ValueError(
            f"expected gamma/beta ({D},), w1 (inner, {D}), w2 ({D}, inner); got {tuple(gamma.shape)}, "
            f"{tuple(beta.shape)}, {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    if gate is not None and not residual:
        raise ValueError("a gate scales the residual branch: pass residual=True with gate")
    check_gate(gate, x)
    cd = _compute_dtype(x)
    # a training step keeping weight gradients as factors in a 16-bit compute dtype takes the
    # gate's gradient from the branch as the forward rounded it (R x D, 2 MiB at issue 7's
    # block) instead of remaking it in the backward (a (R x inner) x (inner x D) product)
    keep = (gate is not None and cd in _HALF_DTYPES and factored_grads.active() and torch.is_grad_enabled()
            and gate.requires_grad and w1.requires_grad and w2.requires_grad)
    # x whole (not its (rows, D) view): the op's output has x's shape and is not a view
    y, _, _ = _ff(x.contiguous(), gamma, beta, w1, w2, gate, float(eps), kind, cd, residual, keep)
    return y


def _inference_chunk_rows(x: Tensor, inner: int) -> int:
    """Rows per chunk for an inference feed-forward whose (rows, inner) activation would
    pass :data:`FORWARD_CHUNK_BYTES` in a 16-bit compute dtype (bf16 / fp16, where the
    products read packed oneDNN weights, so smaller products cost no repacking); 0: run
    whole. A fresh activation of 32 MiB or more is mapped anew on every call (glibc's mmap
    threshold) and its first touch page-faults; chunks below it come back from the heap.
    The cross-attention block's bf16 forward at batch 4 (8192 x 8192 activation, 128 MiB):
    716 -> 649 ms, batch 1 (32 MiB) 164 vs 166 ms. float32 stays whole: unpacked, MKL
    repacks the whole weight for each chunk's product (batch 1: 552 -> 567 ms chunked);
    with MKL-packed weights (:mod:`fused_linear`) chunks of 512 rows gained nothing
    (519.7 vs 522.4 ms)."""
    if torch.compiler.is_compiling() or x.dim() < 2 or not x.is_contiguous() or x.device.type != "cpu":
        return 0
    hd = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if hd not in (torch.bfloat16, torch.float16):
        return 0
    R = x.numel() // max(x.shape[-1], 1)
    if R * inner * 2 <= FORWARD_CHUNK_BYTES:
        return 0
    return block_rows(R, FORWARD_CHUNK_BYTES // (inner * 2))


def _chunked_inference(ff, x: Tensor, rows: int, residual: bool, gate: Optional[Tensor]) -> Tensor:
    """:func:`module_feed_forward` (inference) over chunks of ``rows`` rows of x, each
    chunk's result copied into one output (every row is computed as in the whole call)."""
    D = x.shape[-1]
    R = x.numel() // D
    x2 = x.reshape(R, D)
    out = None
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        yc = module_feed_forward(ff, x2[r0:r1], residual=residual, gate=gate)
        if out is None:
            out = torch.empty((R, yc.shape[-1]), dtype=yc.dtype, device=x.device)
        out[r0:r1] = yc
        del yc
    return out.view(*x.shape[:-1], out.shape[-1])


def module_feed_forward(ff, x: Tensor, residual: bool = False, gate: Optional[Tensor] = None) -> Tensor:
    """``ff(x)`` (or with ``residual`` ``x + gate * ff(x)``, ``x + ff(x)`` when gate is None)
    for a feed-forward module with ``norm`` (LayerNorm), bias-free ``fc1`` / ``fc2`` and
    ``kind`` (:class:`flamingo_rt.models.ff.FeedForward`): through :func:`feed_forward` when a
    gradient will be taken (training), else the module itself and ``addcmul`` (inference keeps
    its small-batch decode kernels)."""
    n, f1, f2 = ff.norm, ff.fc1, ff.fc2
    training = torch.is_grad_enabled() and (
        x.requires_grad or f1.weight.requires_grad or n.weight.requires_grad
        or (gate is not None and gate.requires_grad))
    if not training:
        rows = _inference_chunk_rows(x, f1.weight.shape[0])
        if rows:
            return _chunked_inference(ff, x, rows, residual, gate)
    if (not training or f1.bias is not None or f2.bias is not None or n.weight is None or n.bias is None
            or torch.compiler.is_compiling()):
        if residual and gate is None and hasattr(ff, "forward_residual"):
            return ff.forward_residual(x)  # x + ff(x), the add fused into fc2 where it can be
        y = ff(x)
        if not residual:
            return y
        return residual_add_(x, y, gate)  # y is fc2's fresh output
    return feed_forward(x, n.weight, n.bias, f1.weight, f2.weight, n.eps, ff.kind, residual=residual, gate=gate)
