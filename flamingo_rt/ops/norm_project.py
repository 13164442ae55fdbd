"""``flamingo_rt::norm_project``: several ``Linear_i(LayerNorm_i(x))`` of one input, sharing
the normalization, registered with ``torch.library`` (fake implementation and autograd).

The Perceiver Resampler projects the same media features x (B*M*S rows of width D) to keys
and values in each of its layers, each through its own LayerNorm (gamma_i, beta_i) and
``to_kv`` weight W_i:  y_i = (xhat * gamma_i + beta_i) W_i^T,  xhat = (x - mean) * rstd.
Written as  y_i = xhat (W_i diag(gamma_i))^T + W_i beta_i,  the statistics and xhat are
computed once for all i, no normalized copy per layer exists, and the backward needs no
gradient with respect to the normalized input when x itself needs none (frozen features):

    G_i = dy_i^T xhat,  s_i = colsum(dy_i)      (the one matrix product per layer)
    dW_i = G_i diag(gamma_i) + s_i beta_i^T,  dgamma_i = colsum(W_i * G_i),  dbeta_i = W_i^T s_i

where the usual backward needs two products per layer (dW_i and d(LN_i(x)) for gamma_i and
beta_i). Only x is saved (xhat is recomputed in the backward, one pass over x). That one
op for all projections is what traced graphs (compile, export) get. In eager mode x is
normalized once and each projection is its own node saving that xhat, so each backward
runs (and frees its output gradient) as soon as its output gradient is complete. When x
needs a gradient, the normalization is a node of its own too: each projection's backward
adds its share dy_i (W_i diag(gamma_i)) to a float32 sum, and the normalization's backward,
which the engine runs after all of theirs, turns that sum into dx.

Under autocast (``compute_dtype`` bfloat16/float16) the statistics are float32, xhat and
the folded weights are cast to the compute dtype for the product (as autocast's
``layer_norm`` -> ``linear`` does with the normalized input and the weight), the
outputs are in the compute dtype, and the parameter gradients in the parameters' dtype.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import backend as _backend
from . import cpu_gemm, widening_gemm
from ._eager import EagerOp
from .fused_linear import linear_packed
from .precision import acc_dtype as _acc
from .precision import add_widened_, column_sum, layer_norm_in
from .precision import compute_dtype as _compute_dtype

__all__ = ["norm_project", "norm_project_iter"]


def _xhat(x: Tensor, eps: float, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """x (R, D) -> (xhat (R, D) in ``compute_dtype``, mean, rstd in the accumulation dtype):
    :func:`precision.layer_norm_in` without affine (in bf16 a block of rows at a time, so no
    whole float32 xhat exists: at 4112 x 1024 it was 16 MiB at the training step's peak)."""
    return layer_norm_in(x, eps, compute_dtype)


def _norm_project_op_impl(
    x: Tensor, gammas: List[Tensor], betas: List[Tensor], weights: List[Tensor], eps: float,
    compute_dtype: torch.dtype, normalized: bool = False,
) -> List[Tensor]:
    """``normalized``: x is already xhat, in the compute dtype (the per-projection form of
    :func:`norm_project`; x needs no gradient then)."""
    with torch.autocast(x.device.type, enabled=False):  # the dtypes below are explicit
        return _forward(x, gammas, betas, weights, eps, compute_dtype, normalized)


_norm_project_op = torch.library.custom_op("flamingo_rt::norm_project", mutates_args=())(_norm_project_op_impl)


def _forward(x, gammas, betas, weights, eps, compute_dtype, normalized=False):
    xc = x if normalized else _xhat(x, eps, compute_dtype)[0]
    return [cpu_gemm.linear(xc, *_folded(g, b, w, compute_dtype)) for g, b, w in zip(gammas, betas, weights)]


def _folded(g: Tensor, b: Tensor, w: Tensor, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(W diag(gamma), W beta) in the compute dtype, computed in the accumulation dtype."""
    wf = w.to(_acc(w.dtype))
    return (wf * g.to(wf.dtype)[None, :]).to(compute_dtype), (wf @ b.to(wf.dtype)).to(compute_dtype)


# inference: each weight's folded form, kept while the weight, gamma and beta are unchanged
_FOLDED_CACHE = WeakIdKeyDictionary()


def _folded_cached(g: Tensor, b: Tensor, w: Tensor, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`_folded`, cached per weight (weakly) until the weight, gamma or beta changes (an
    in-place update bumps its version; another tensor changes the key). Made anew at every
    call, the resampler's six bf16 forms made its inference forward 9 ms slower (32 images:
    the folds themselves 3 ms, the rest the products reading freshly written weights)."""
    if w.is_inference() or g.is_inference() or b.is_inference():
        return _folded(g, b, w, compute_dtype)  # no version counter to see an update by: not cached
    key = (compute_dtype, w._version, g._version, b._version, w.data_ptr(), g.data_ptr(), b.data_ptr())
    hit = _FOLDED_CACHE.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        val = _folded(g, b, w, compute_dtype)
    _FOLDED_CACHE[w] = (key, val)
    return val


@_norm_project_op.register_fake
def _(x, gammas, betas, weights, eps, compute_dtype, normalized=False):
    return [x.new_empty((x.shape[0], w.shape[0]), dtype=compute_dtype) for w in weights]


def _norm_project_bwd_op_impl(
    grads: List[Tensor], x: Tensor, gammas: List[Tensor], betas: List[Tensor], weights: List[Tensor],
    eps: float, compute_dtype: torch.dtype, need_dx: bool, normalized: bool = False,
) -> List[Tensor]:
    """Returns [dx (or an empty tensor), dgamma_0.., dbeta_0.., dW_0..]."""
    with torch.autocast(x.device.type, enabled=False):
        return _backward_impl(grads, x, gammas, betas, weights, eps, compute_dtype, need_dx, normalized)


_norm_project_bwd_op = torch.library.custom_op("flamingo_rt::norm_project_backward", mutates_args=())(
    _norm_project_bwd_op_impl)


def _backward_impl(grads, x, gammas, betas, weights, eps, compute_dtype, need_dx, normalized=False):
    if normalized:
        if need_dx:
            raise ValueError("norm_project: no input gradient through an already normalized input")
        xc = x
    else:
        xc, mean, rstd = _xhat(x, eps, compute_dtype)
    dgs, dbs, dws = [], [], []
    dxhat: Optional[Tensor] = None
    dbuf: Optional[Tensor] = None  # each projection's share of dxhat, in one buffer reused (no fresh pages)
    # bf16 weight gradients G = dy^T xc: torch runs a transposed first operand at half speed
    # (cpu_gemm.rows_first), so xc^T is copied to rows once for every projection and G^T =
    # xc^T dy is the product (the same values: each element is the same dot product), not a
    # copy of each (rows, out) dy (the resampler's six K/V projections: 142 -> 130 ms)
    xct: Optional[Tensor] = None
    for dy, g, b, w in zip(grads, gammas, betas, weights):
        wf = w.to(_acc(w.dtype))
        gf = g.to(wf.dtype)
        dy = dy.to(compute_dtype)
        # bf16 products with float32 results (MKL, widening_gemm): G^T and each projection's
        # share of dxhat accumulated in float32 by the product itself
        widen = compute_dtype == torch.bfloat16 and wf.dtype == torch.float32 and widening_gemm.available()
        if xct is None and (widen or cpu_gemm.rows_first(dy.t(), xc)):
            xct = cpu_gemm.transpose_rows(xc.t())
        if widen:
            G = cpu_gemm.transpose_rows(widening_gemm.mm(xct, dy).t())  # (out, D) float32
        elif xct is not None:
            G = cpu_gemm.transpose_rows(torch.mm(xct, dy).t()).to(wf.dtype)  # (out, D)
        else:
            G = cpu_gemm.mm(dy.t(), xc).to(wf.dtype)  # (out, D)
        s = column_sum(dy, wf.dtype)  # (out,), in the accumulation dtype without a whole widened copy of dy
        dws.append(torch.addr(G * gf[None, :], s, b.to(wf.dtype)).to(w.dtype))
        dgs.append((wf * G).sum(0).to(g.dtype))
        dbs.append((wf.t() @ s).to(b.dtype))
        if need_dx:
            dxhat, dbuf = _add_dxhat_share(dxhat, dy, wf, gf, compute_dtype, mean.dtype, dbuf)
    if need_dx:
        del xc  # the LayerNorm backward below needs x and its statistics only
        xf = x.to(mean.dtype)
        # rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) in one pass (no (R, D)
        # temporaries: written out, the formula made five, 320 MiB for 8192 rows of 2048)
        dx = torch.ops.aten.native_layer_norm_backward(dxhat, xf, [xf.shape[-1]], mean, rstd, None, None,
                                                        [True, False, False])[0]
        dx = dx.to(x.dtype)
    else:
        dx = x.new_empty(0)
    return [dx, *dgs, *dbs, *dws]


def _add_dxhat_share(dxhat: Optional[Tensor], dy: Tensor, wf: Tensor, gf: Tensor, compute_dtype: torch.dtype,
                     acc_dtype: torch.dtype, dbuf: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """One projection's share of d(xhat), dy (R, O) @ (W diag(gamma)) (O, D) in the compute
    dtype, added into ``dxhat`` (R, D) in ``acc_dtype`` (None: the share becomes it). bf16
    products with float32 results (MKL, widening_gemm) accumulate in float32 in the product
    itself; else the product's result is added widened, through ``dbuf`` (a buffer of the
    product's dtype reused from the previous share: no fresh pages). Returns (dxhat, dbuf)."""
    wg = (wf * gf[None, :]).to(compute_dtype)
    if compute_dtype == torch.bfloat16 and acc_dtype == torch.float32 and widening_gemm.available():
        first = dxhat is None
        if first:
            dxhat = torch.empty((dy.shape[0], wf.shape[1]), dtype=acc_dtype, device=dy.device)
        widening_gemm.addmm_(dxhat, dy, wg, beta=0.0 if first else 1.0)
        return dxhat, dbuf
    if dxhat is not None and dy.dtype == dxhat.dtype == compute_dtype:  # (float32) the product accumulates
        if cpu_gemm.eligible(dy, wg):
            return cpu_gemm.mm_add(dxhat, dy, wg), dbuf  # oneDNN's product, the add its post-op
        return dxhat.addmm_(dy, wg), dbuf
    d = cpu_gemm.mm(dy, wg, out=dbuf)
    if dxhat is None:
        dxhat = d.to(acc_dtype)
        if d.dtype != acc_dtype:
            dbuf = d  # dxhat is a widened copy: d's buffer is free for the next projection
        return dxhat, dbuf
    return add_widened_(dxhat, d), dbuf


@_norm_project_bwd_op.register_fake
def _(grads, x, gammas, betas, weights, eps, compute_dtype, need_dx, normalized=False):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return [dx, *(g.new_empty(g.shape) for g in gammas), *(b.new_empty(b.shape) for b in betas),
            *(w.new_empty(w.shape) for w in weights)]


def _setup_context(ctx, inputs, output):
    x, gammas, betas, weights, eps, compute_dtype, normalized = inputs
    ctx.save_for_backward(x, *gammas, *betas, *weights)
    ctx.n, ctx.eps, ctx.compute_dtype, ctx.normalized = len(weights), eps, compute_dtype, normalized


def _backward(ctx, grads):
    n = ctx.n
    saved = ctx.saved_tensors
    x, gammas, betas, weights = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:]
    grads = [g if g is not None else x.new_zeros((x.shape[0], w.shape[0]), dtype=ctx.compute_dtype)
             for g, w in zip(grads, weights)]
    need_dx = ctx.needs_input_grad[0]
    res = _norm_project_bwd(grads, x, list(gammas), list(betas), list(weights), ctx.eps,
                            ctx.compute_dtype, need_dx, ctx.normalized)
    dx = res[0] if need_dx else None
    return dx, res[1:1 + n], res[1 + n:1 + 2 * n], res[1 + 2 * n:], None, None, None


_norm_project_op.register_autograd(_backward, setup_context=_setup_context)

# plain eager calls skip the custom-op machinery (_eager.py; with gradients, its Tensor[]
# arguments take the registered op); compile / export see the ops
_norm_project = EagerOp(_norm_project_op, _norm_project_op_impl, _setup_context, _backward)
_norm_project_bwd = EagerOp(_norm_project_bwd_op, _norm_project_bwd_op_impl)


class _DxhatSum:
    """The float32 (accumulation-dtype) sum of the projections' shares of d(xhat), shared by
    the nodes of one :func:`_projections_with_dx` call: each projection's backward adds its
    share, the normalization's backward (which the engine runs after all of them) takes it."""

    __slots__ = ("acc", "dbuf", "task")

    def __init__(self):
        self.acc: Optional[Tensor] = None
        self.dbuf: Optional[Tensor] = None
        self.task = -1  # the backward pass (graph task) the sum belongs to

    def take(self) -> Optional[Tensor]:
        """The sum of this backward pass's shares (None: none), and a fresh start."""
        acc = self.acc if self.task == torch._C._current_graph_task_id() else None
        self.acc = self.dbuf = None
        return acc


class _Normalize(torch.autograd.Function):
    """x (R, D) -> xhat (R, D) in the compute dtype; the backward is the LayerNorm's input
    gradient of the summed shares (:class:`_DxhatSum`), not of the gradient the engine hands
    it (the projections hand it none: their shares went into the sum, in float32)."""

    @staticmethod
    def forward(ctx, x, eps, compute_dtype, dsum):
        with torch.autocast(x.device.type, enabled=False):
            xc, mean, rstd = _xhat(x, eps, compute_dtype)
        ctx.save_for_backward(x, mean, rstd)
        ctx.dsum = dsum
        ctx.set_materialize_grads(False)
        return xc

    @staticmethod
    def backward(ctx, _unused):
        dxhat = ctx.dsum.take()
        if dxhat is None:
            return None, None, None, None
        x, mean, rstd = ctx.saved_tensors
        xf = x.to(mean.dtype)
        dx = torch.ops.aten.native_layer_norm_backward(dxhat, xf, [xf.shape[-1]], mean, rstd, None, None,
                                                        [True, False, False])[0]
        return dx.to(x.dtype), None, None, None


class _ProjectNormalized(torch.autograd.Function):
    """xhat (R, D) (compute dtype) -> (xhat gamma + beta) W^T (R, O), one projection as its own
    node: its backward runs as soon as its output gradient is complete, adds its share of
    d(xhat) to the :class:`_DxhatSum` and frees that gradient."""

    @staticmethod
    def forward(ctx, xc, g, b, w, compute_dtype, dsum):
        with torch.autocast(xc.device.type, enabled=False):
            y = cpu_gemm.linear(xc, *_folded(g, b, w, compute_dtype))
        ctx.save_for_backward(xc, g, b, w)
        ctx.compute_dtype, ctx.dsum = compute_dtype, dsum
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, g, b, w = ctx.saved_tensors
        cd = ctx.compute_dtype
        dg = db = dw = None
        with torch.autocast(xc.device.type, enabled=False):
            if any(ctx.needs_input_grad[1:4]):
                _, dg, db, dw = _backward_impl([dy], xc, [g], [b], [w], 0.0, cd, False, normalized=True)
            # x's gradient, when this backward pass computes it (the normalization's node
            # runs; not for, e.g., autograd.grad of the parameters alone)
            if ctx.needs_input_grad[0] and torch._C._will_engine_execute_node(xc.grad_fn):
                d = ctx.dsum
                task = torch._C._current_graph_task_id()
                if d.task != task:  # the first share of this pass (an earlier pass may have been cut short)
                    d.acc = d.dbuf = None
                    d.task = task
                wf = w.to(_acc(w.dtype))
                d.acc, d.dbuf = _add_dxhat_share(d.acc, dy.to(cd), wf, g.to(wf.dtype), cd, _acc(cd), d.dbuf)
        return None, dg, db, dw, None, None


def _projections_with_dx(x2: Tensor, gammas, betas, weights, eps: float, cd: torch.dtype) -> Iterator[Tensor]:
    """x2 (R, D) needing a gradient: x normalized once (a node of its own), then each
    projection its own node, made when taken. The input gradient is summed across the
    projections in float32 as their backwards run, so each output gradient is freed after its
    projection's backward instead of all of them waiting for one node (the resampler's six
    K/V gradients at 32 images: 192 MiB in float32 held together at the backward's peak)."""
    dsum = _DxhatSum()
    xc = _Normalize.apply(x2, float(eps), cd, dsum)
    for g, b, w in zip(gammas, betas, weights):
        yield _ProjectNormalized.apply(xc, g, b, w, cd, dsum)


def norm_project(
    x: Tensor, gammas: Sequence[Tensor], betas: Sequence[Tensor], weights: Sequence[Tensor],
    eps: float = 1e-5,
) -> List[Tensor]:
    """``[F.linear(F.layer_norm(x, (D,), gammas[i], betas[i], eps), weights[i]) for i]``.

    Args:
        x: (..., D) input, any float dtype.
        gammas, betas: (D,) LayerNorm scale and shift per projection.
        weights: (O_i, D) projection weights (no bias), same count as ``gammas``.
        eps: the LayerNorm epsilon.
    Returns:
        a list of (..., O_i) tensors: in the autocast dtype when autocast is on for x's
        device (and x is floating point, not float64), else in x's dtype.
    """
    return list(_projections(x, gammas, betas, weights, eps))


def norm_project_iter(
    x: Tensor, gammas: Sequence[Tensor], betas: Sequence[Tensor], weights: Sequence[Tensor],
    eps: float = 1e-5,
) -> Iterator[Tensor]:
    """:func:`norm_project`'s outputs one at a time, each computed when it is taken.

    Eager mode: x is normalized once and each projection is its own op, run when taken
    (frozen features and trainable layers, the common case): taking output i
    just before the layer that uses it puts its autograd node among that layer's, so its
    backward runs (and frees its output gradient) right after that layer's, instead of every
    output gradient waiting for one node created before all the layers (the resampler's six
    K/V gradients, 8 MiB each in the bf16 training step, held together at the memory peak).
    The same when x needs a gradient too (:func:`_projections_with_dx`: x is normalized at
    the call, its gradient summed across the projections in float32), and in inference (no
    gradient anywhere): only the outputs still referenced are alive, not all of them from
    the first take. In a traced graph the one op computes them all at the first take."""
    return _projections(x, gammas, betas, weights, eps)


def _projections(x, gammas, betas, weights, eps) -> Iterator[Tensor]:
    if not (len(gammas) == len(betas) == len(weights)) or not weights:
        raise ValueError(
            f"expected as many gammas, betas and weights (at least one), got {len(gammas)}, {len(betas)}, {len(weights)}"
        )
    D = x.shape[-1]
    for i, (g, b, w) in enumerate(zip(gammas, betas, weights)):
        if g.shape != (D,) or b.shape != (D,) or w.dim() != 2 or w.shape[1] != D:
            raise ValueError(
                f"expected gamma/beta of shape ({D},) and weight of shape (O, {D}) for projection {i}, "
                f"got {tuple(g.shape)}, {tuple(b.shape)}, {tuple(w.shape)}"
            )
    cd = _compute_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, D)
    if _backend.exporting():  # plain aten in AOTInductor packages (a Python op cannot run in a C++ host)
        outs = _forward(x2, list(gammas), list(betas), list(weights), float(eps), cd)
    elif _per_projection_with_dx(x, gammas, betas, weights):
        outs = _projections_with_dx(x2, gammas, betas, weights, eps, cd)
    elif _per_projection(x, gammas, betas, weights):
        no_autocast = (torch.autocast(x.device.type, enabled=False)
                       if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext())
        with torch.no_grad(), no_autocast:  # (no autocast on "meta")
            xc = _xhat(x2, float(eps), cd)[0]  # saved by every projection op (not recomputed)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*gammas, *betas, *weights)):
            # inference: the products of the cached folded weights, no op dispatch
            outs = (linear_packed(xc, *_folded_cached(g, b, w, cd)) for g, b, w in zip(gammas, betas, weights))
        else:
            outs = (_norm_project(xc, [g], [b], [w], float(eps), cd, True)[0]
                    for g, b, w in zip(gammas, betas, weights))
    else:
        outs = _norm_project(x2, list(gammas), list(betas), list(weights), float(eps), cd)
    return (o.view(*lead, o.shape[-1]) for o in outs)


def _per_projection_with_dx(x: Tensor, gammas, betas, weights) -> bool:
    """x needs a gradient (eager mode, several projections, a CPU or CUDA tensor): x is
    normalized once and each projection is its own node (:func:`_projections_with_dx`)."""
    return (len(weights) >= 2 and x.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and x.device.type != "meta")


def _per_projection(x: Tensor, gammas, betas, weights) -> bool:
    """Normalize x once and run each projection on its own, computed when taken (eager
    mode: a traced graph keeps the one op), when x gets no gradient and there are several
    projections: either their parameters get gradients (each projection its own op, whose
    backward then runs on its own output gradient), or nothing does (inference: the product
    of the cached folded weight, :func:`_folded_cached`; one output is alive at a time instead of
    all of them -- the resampler's six K/V outputs are 96 MiB of fresh pages in bf16 at 32
    images, ~30 ms to touch on a 2-core guest, against one 16 MiB buffer the heap reuses)."""
    if len(weights) < 2 or torch.compiler.is_compiling():
        return False
    return not (x.requires_grad and torch.is_grad_enabled())
