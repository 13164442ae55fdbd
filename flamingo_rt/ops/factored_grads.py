"""Weight gradients kept as the two factors of their product, for a training step that
needs the gradient only to clip it and to update the weight.

The weight gradient of a linear map over R rows is ``dW = s * A^T B``: A (R, out) the
output's gradient, B (R, in) the input (s a scalar, e.g. a tanh gate). When the rows are few
against the weight's size -- ``R * (out + in)`` elements of factors against ``out * in`` of
gradient -- the factors are the smaller of the two: OpenFlamingo-3B's cross-attention FF
(2048 <-> 8192) trained on 2 x 256 tokens has 20 MiB of bf16 factors per block against 128
MiB of float32 gradients, written into fresh pages at every step. A step needs only

- the gradient's norm, for clipping: ``||s A^T B||^2 = s^2 sum((A A^T) * (B B^T))`` from two
  (R, R) Gram matrices (R^2 (out + in) multiply-adds, fewer than the product's R out in when
  R (out + in) < out in), summed in float64; else from the gradient made a block of rows
  at a time into one buffer, which costs the product (once more for the update) but no
  fresh gradient pages;
- the gradient itself, a block of W's rows at a time, for the optimizer's update of those rows
  (:mod:`flamingo_rt.runtime.train.factored_step`): the same product as the backward would
  have made, made later into one small buffer.

:class:`FactoredGrads` holds the factors of the parameters it was made for while
:func:`collecting` is active; an op whose backward makes such a weight gradient
(:func:`flamingo_rt.ops.feed_forward.feed_forward`) asks :func:`store_for` and, when given a
store, hands it the factors and returns no gradient for the weight (its ``.grad`` stays
None). Factors of several backward passes (a mixture's datasets) are summed; when they would
outgrow the gradient, the store writes the dense gradient into ``.grad`` and the op returns
dense gradients from then on. Eager only (``torch.compile`` and export never see a store).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_gemm, widening_gemm

__all__ = ["FactoredGrads", "active", "collecting", "store_for"]

_ACTIVE: List["FactoredGrads"] = []

#: factors are kept while their bytes stay under this fraction of the gradient's (tests
#: raise it to factor tiny models). Half, not 1: factors near the gradient's size come from
#: many rows R, and their norm's Gram matrices cost R^2 (out + in) multiply-adds, more than
#: the gradient's own product, in small blocks at about half its rate. The connector step's
#: resampler FF (1024 <-> 4096 over R = 1024 latent rows: bf16 factors 0.625 of the float32
#: gradient) spent 152 ms per bf16 step factored (Gram blocks 66 ms at 1.1-1.25 TFLOP/s, the
#: update's row blocks 86 ms) against ~70 ms for its dense products (2-core Xeon with AMX;
#: step 1.49 -> 1.41 s); the cross-attention FF's factors (0.16 of its gradient) stay.
MAX_FRACTION = 0.5


class FactoredGrads:
    """The weight gradients of ``params`` (2-D, floating), each kept as a list of
    ``(A (R, out), B (R, in), s)`` with ``grad = sum s A^T B`` while that is smaller than the
    gradient (A and B in the compute dtype: bf16 under autocast, else the weight's)."""

    def __init__(self, params: Iterable[Tensor]):
        self._params: Dict[int, Tensor] = {id(p): p for p in params if p.dim() == 2 and p.is_floating_point()}
        self._factors: Dict[int, List[Tuple[Tensor, Tensor, Optional[Tensor]]]] = {}

    # ------------------------------------------------------------------ collecting

    def wants(self, w: Tensor, numel: int, element_size: int) -> bool:
        """Whether ``numel`` more factor elements of ``element_size`` bytes for ``w``'s
        gradient are taken: w is one of the store's parameters, has no dense gradient, and
        its factors would stay smaller in memory than the gradient."""
        if id(w) not in self._params or w.grad is not None:
            return False
        held = _nbytes(self._factors.get(id(w), []))
        return held + numel * element_size < MAX_FRACTION * w.numel() * w.element_size()

    def densify(self, w: Tensor) -> None:
        """Write the gradient held as factors into ``w.grad`` (added to it if there is one) and
        drop the factors: gradients that follow accumulate densely."""
        if id(w) in self._factors:
            g = self.dense(w)
            w.grad = g if w.grad is None else w.grad.add_(g)
            del self._factors[id(w)]

    def add(self, w: Tensor, a: Tensor, b: Tensor, scale: Optional[Tensor] = None) -> None:
        """Add ``scale * a^T b`` to ``w``'s gradient: a (R, out), b (R, in) for w (out, in);
        scale a one-element tensor or None for 1."""
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or (a.shape[1], b.shape[1]) != tuple(w.shape):
            raise ValueError(f"expected factors a (R, {w.shape[0]}) and b (R, {w.shape[1]}) for a weight of shape "
                             f"{tuple(w.shape)}, got {tuple(a.shape)} and {tuple(b.shape)}")
        s = None if scale is None else scale.detach().reshape(()).to(torch.float32)
        self._factors.setdefault(id(w), []).append((a.detach(), b.detach(), s))

    # ------------------------------------------------------------------ reading

    def params(self) -> List[Tensor]:
        """The parameters that hold factors (their ``.grad`` is None)."""
        return [self._params[k] for k in self._factors]

    def __contains__(self, p: Tensor) -> bool:
        return id(p) in self._factors

    def __len__(self) -> int:
        return len(self._factors)

    def nbytes(self) -> int:
        """Bytes of the factors held."""
        return sum(_nbytes(fs) for fs in self._factors.values())

    def sq_norm(self, p: Tensor) -> Tensor:
        """||grad of p||_F^2 as a float64 scalar: from the factors' Gram matrices, sum over
        pairs (k, l) of s_k s_l sum((A_k A_l^T) * (B_k B_l^T)), where those cost less than the
        gradient's product (R (m + n) against m n multiply-adds, R the rows, (m, n) p's
        shape); else from the gradient itself, made a block of rows at a time into one
        buffer (:data:`NORM_BLOCK_BYTES`)."""
        fs = self._factors[id(p)]
        rows = sum(a.shape[0] for a, _, _ in fs)
        m, n = p.shape
        if rows * (m + n) * (0.75 if len(fs) == 1 else 1.0) >= m * n:
            return self._sq_norm_by_rows(p)
        # one pair: its rows in blocks (the Gram matrices are symmetric: blocks i <= j do)
        return _gram_sq_norm(_row_blocks(*fs[0]) if len(fs) == 1 else fs)

    def _sq_norm_by_rows(self, p: Tensor) -> Tensor:
        m, n = p.shape
        step = max(1, min(m, NORM_BLOCK_BYTES // max(1, n * 4)))
        buf = torch.empty((step, n), dtype=_grad_dtype(p), device=p.device)
        total = torch.zeros((), dtype=torch.float64, device=p.device)
        for r0 in range(0, m, step):
            blk = self.rows_into(p, r0, min(m, r0 + step), buf[:min(m, r0 + step) - r0]).reshape(-1)
            total += torch.dot(blk, blk).double()
        return total

    def scale_(self, coef: Tensor) -> None:
        """Multiply every held gradient by the scalar ``coef`` (clipping): the scales change,
        the factors do not."""
        c = coef.detach().reshape(()).to(torch.float32)
        for k, fs in self._factors.items():
            self._factors[k] = [(a, b, c if s is None else s * c) for a, b, s in fs]

    def rows_into(self, p: Tensor, r0: int, r1: int, out: Tensor) -> Tensor:
        """Rows r0:r1 of p's gradient written into ``out`` (r1 - r0, in), float32 or p's dtype."""
        first = True
        for a, b, s in self._factors[id(p)]:
            at = a[:, r0:r1].t()  # (rows, R): a transposed view, read in place
            alpha = 1.0 if s is None else float(s)
            if at.dtype == torch.bfloat16 and out.dtype == torch.float32:
                widening_gemm.addmm_(out, at, b, alpha=alpha, beta=0.0 if first else 1.0)
            elif first:
                torch.mm(at.to(out.dtype), b.to(out.dtype), out=out)
                if alpha != 1.0:
                    out.mul_(alpha)
            else:
                out.addmm_(at.to(out.dtype), b.to(out.dtype), alpha=alpha)
            first = False
        return out

    def dense(self, p: Tensor) -> Tensor:
        """p's whole gradient as a new tensor of p's dtype and shape."""
        out = torch.empty(p.shape, dtype=_grad_dtype(p), device=p.device)
        return self.rows_into(p, 0, p.shape[0], out).to(p.dtype)

    def pop(self, p: Tensor) -> None:
        """Drop p's factors."""
        self._factors.pop(id(p), None)

    def clear(self) -> None:
        """Drop every factor."""
        self._factors.clear()


def _nbytes(factors) -> int:
    """Bytes of a list of (a, b, scale) factors."""
    return sum(x.numel() * x.element_size() for f in factors for x in f[:2])


def _grad_dtype(p: Tensor) -> torch.dtype:
    """The dtype a gradient of p is made in (float32 for a bf16 parameter)."""
    return torch.float32 if p.dtype == torch.bfloat16 else p.dtype


def _gram(x: Tensor, y: Tensor) -> Tensor:
    """x y^T (R, R') accumulated in float32 (bf16 through MKL's widening product where it
    runs, :mod:`widening_gemm`; float32 through :func:`cpu_gemm.mm`: oneDNN where the policy
    sends float32 products there: the training step's (512, 8192) x (8192, 512) 24.5 -> 21.0
    ms on a 2-core AMD EPYC; the gradient's row blocks stay on torch's product, whose
    accumulation into ``out`` oneDNN would need a separate add for)."""
    if x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16:
        return widening_gemm.mm(x, y.t())
    return cpu_gemm.mm(x, y.t())


#: bytes of the gradient block :meth:`FactoredGrads.sq_norm` makes at a time when the Gram
#: matrices would cost more than the gradient's product
NORM_BLOCK_BYTES = 16 << 20

#: rows per block of :func:`_row_blocks` (products of fewer rows run below the GEMM rate)
GRAM_BLOCK_ROWS = 256


def _row_blocks(a: Tensor, b: Tensor, s: Optional[Tensor]) -> list:
    """One pair of factors as up to 4 pairs of row blocks (each with the pair's scale): the
    gradient is their sum, and :func:`_gram_sq_norm` over them computes only the blocks
    i <= j of the symmetric Gram matrices (2 blocks: 3/4 of the whole products, 4: 5/8)."""
    R = a.shape[0]
    k = max(1, min(4, R // GRAM_BLOCK_ROWS))
    edges = [R * i // k for i in range(k + 1)]
    return [(a[edges[i]:edges[i + 1]], b[edges[i]:edges[i + 1]], s) for i in range(k)]


def _gram_sq_norm(factors) -> Tensor:
    """||sum_k s_k a_k^T b_k||_F^2 in float64 for (a_k, b_k, s_k) factors: over pairs k <= l
    (off-diagonal ones counted twice) of s_k s_l sum((a_k a_l^T) * (b_k b_l^T))."""
    total = torch.zeros((), dtype=torch.float64, device=factors[0][0].device)
    for k, (ak, bk, sk) in enumerate(factors):
        for l in range(k, len(factors)):
            al, bl, sl = factors[l]
            term = (_gram(ak, al).double() * _gram(bk, bl).double()).sum()
            if sk is not None:
                term = term * sk.double()
            if sl is not None:
                term = term * sl.double()
            total += term if l == k else 2 * term
    return total


@contextlib.contextmanager
def collecting(store: FactoredGrads) -> Iterator[FactoredGrads]:
    """Within the block, ops hand ``store`` the factors of its parameters' gradients."""
    _ACTIVE.append(store)
    try:
        yield store
    finally:
        _ACTIVE.remove(store)


def active() -> bool:
    """Whether a store collects factors here (eager mode): ops may keep what its factored
    backward uses."""
    return bool(_ACTIVE) and not torch.compiler.is_compiling()


def store_for(factors: Iterable[Tuple[Tensor, int]], element_size: int) -> Optional[FactoredGrads]:
    """The active store when it takes the factors of every weight in ``factors`` ((weight,
    elements of its new factors) pairs, each element ``element_size`` bytes), else None --
    and then any factors it held for them are written into their ``.grad`` first (the caller
    returns dense gradients, which accumulate there). None also without a store or in a
    traced graph."""
    if not _ACTIVE or torch.compiler.is_compiling():
        return None
    store = _ACTIVE[-1]
    factors = list(factors)
    if all(store.wants(w, n, element_size) for w, n in factors):
        return store
    for w, _ in factors:
        store.densify(w)
    return None
