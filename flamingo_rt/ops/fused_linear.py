"""Inference linears with their epilogue fused into the product: ``act(x W^T + b)`` and
``residual + x W^T + b`` as one oneDNN primitive on the CPU (a GELU / ReLU post-op, a binary
add post-op), so the (rows, out) result is written once instead of being written by the
product and then read and written again by the activation or the residual add.

Taken for bf16 (torch's bf16 products are oneDNN's anyway) and, where flamingo_rt's policy
sends float32 products to oneDNN (:func:`cpu_gemm.onednn_active`), for float32; only when no
gradient is taken (the fused primitive has no backward), in eager mode, on plain CPU
tensors, with more than :data:`linear.MAX_ROWS` rows (decode steps keep the small-batch
kernel). Everything else runs :func:`linear.linear` and the activation / add as separate ops,
with the same results up to the fused path's single rounding (the epilogue is applied to the
float32 accumulator before the output is rounded to bf16, where the separate ops round the
product first).

The Perceiver Resampler's bf16 forward in bf16 weights (32 images x 256 features, 6 layers,
2-core Xeon with AMX, 21 interleaved runs): 237 -> 224 ms median with the FF's GELU and both
residual adds fused (fc1 + GELU, fc2 + residual, to_out + residual); its error against the
float32 model 6.6e-3 -> 6.4e-3.

Each weight these products read is packed once into oneDNN's blocked layout for the product
(``mkldnn._reorder_linear_weight``) and kept while the weight is unchanged: the primitive
otherwise reorders the whole weight at every call (2048 rows x 1024 -> 4096 in bf16: 11.1 ->
10.2 ms with the GELU, the 4096 -> 1024 residual product 10.5 -> 9.5; 64 rows 1.13 -> 0.62
ms). The packed copies cost the weights' size again, so they are bounded: at most
:data:`PACK_BUDGET_BYTES` in all (``FLAMINGO_RT_PACK_BUDGET_MB``, 0 turns packing off);
weights past the budget run unpacked. :func:`linear_packed` is the same product without an
epilogue (the resampler's query and latent key/value projections, the folded K/V products,
the feed-forwards' fc2).

float32 inference products that torch's policy leaves to MKL read MKL-packed weights the same
way (``mkl._mkl_reorder_linear_weight`` / ``mkl._mkl_linear``), with the activation or
residual applied in place on the fresh output: packed for one row count per weight (MKL's
packed product runs only for that count; others run unpacked), within the same budget, and
only for weights whose packed copy is at most :data:`MKL_MAX_GROWTH` times their size (MKL
pads by ~10 MB). OpenFlamingo-3B's cross-attention block forward, float32, batch 1: 553 ->
529 ms (its FF's 2048 x 8192 weights, 170 MiB of copies) on an Intel Xeon. On Intel CPUs
only (``FLAMINGO_RT_MKL_PACK``: ``auto``, ``1`` or ``0``): on an AMD EPYC (Zen 3, AVX2) the
packed products ran no faster than the plain ones, and the forwards slower (the xattn block
at batch 1: 866 against 851 ms, 146 MiB of copies; the resampler at 32 images: 2221 against
2166 ms, 271 MiB; medians of 8 interleaved pairs).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import backend as _backend
from . import cpu_gemm
from .linear import MAX_ROWS, linear
from .residual import residual_add_

__all__ = ["linear_act", "linear_residual", "linear_packed", "clear_packed", "packed_bytes"]

#: activations with a oneDNN post-op: name -> (post-op name, algorithm)
_POST_OPS = {"gelu": ("gelu", "none"), "relu": ("relu", "")}


def _path(x: Tensor, weight: Tensor, bias: Optional[Tensor], other: Optional[Tensor] = None) -> Optional[str]:
    """How the inference product ``x W^T (+ b)`` (beside ``other``, a residual) runs here:
    ``"onednn"`` (a oneDNN primitive with its post-op on the packed oneDNN weight: bf16, and
    float32 where the policy sends float32 products to oneDNN), ``"mkl"`` (float32 that MKL
    computes, reading an MKL-packed weight) or None (:func:`linear.linear` and separate ops:
    a gradient to take, compiling, decode rows, other dtypes...). See the module docstring."""
    if torch.compiler.is_compiling() or _backend.exporting():
        return None
    ts = [t for t in (x, weight, bias, other) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return None
    if not all(cpu_gemm.plain_tensor(t) and t.device.type == "cpu" for t in ts):
        return None
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return None
    if x.numel() // x.shape[-1] <= MAX_ROWS or weight.shape[0] == 0:
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._functorch.is_functorch_wrapped_tensor(weight):
        return None
    dtype = x.dtype
    if any(t.dtype != dtype for t in ts):
        return None
    if dtype == torch.bfloat16:
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        return "onednn" if cpu_gemm.bf16_available() else None
    if dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        if cpu_gemm.eligible(x, weight, bias):
            return "onednn"
        if not weight.is_inference() and mkl_packing_active():
            return "mkl"
    return None


#: the most bytes of packed weight copies kept at once (see the module docstring)
PACK_BUDGET_BYTES = int(float(os.environ.get("FLAMINGO_RT_PACK_BUDGET_MB", "1024")) * (1 << 20))

# weight -> (key, packed copy, bytes); weakly keyed: an entry goes with its weight
_PACKED = WeakIdKeyDictionary()


def _key(w: Tensor) -> tuple:
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape), w.stride())


def packed_bytes() -> int:
    """Bytes of the packed weight copies held now (oneDNN's and MKL's)."""
    return (sum(e[2] for e in list(_PACKED.values()))
            + sum(e[2] for sizes in list(_MKL_PACKED.values()) for e in list(sizes.values())))


def clear_packed() -> None:
    """Drop every packed weight copy (they are made again at their weights' next use)."""
    _PACKED.clear()
    _MKL_PACKED.clear()


def _packed(w: Tensor) -> Tensor:
    """w in oneDNN's packed layout, made at its first use and kept until w changes (an
    in-place update bumps its version, new storage its pointer); w itself when packing is
    unavailable, w is an inference tensor (made under ``torch.inference_mode``: no version
    counter, so an update could not be seen) or the copy would pass :data:`PACK_BUDGET_BYTES`."""
    if PACK_BUDGET_BYTES <= 0 or w.is_inference():  # (an inference tensor has no version to watch)
        return w
    hit = _PACKED.get(w)
    key = _key(w)
    if hit is not None:
        if hit[0] == key:
            return hit[1]
        del _PACKED[w]  # stale: w was updated
    nbytes = w.numel() * w.element_size()
    if packed_bytes() + nbytes > PACK_BUDGET_BYTES:
        return w
    try:
        with torch.no_grad():
            p = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
    except (RuntimeError, AttributeError):
        return w
    _PACKED[w] = (key, p, nbytes)
    return p


# weight -> {rows: (key, MKL-packed copy, bytes)}: float32 products packed by MKL for one
# row count each (its packed product runs only for that count; other counts run unpacked)
_MKL_PACKED = WeakIdKeyDictionary()
#: row counts packed per weight at most (the first seen; products of other row counts run unpacked)
MKL_SIZES_PER_WEIGHT = 1
#: a weight is used MKL-packed only when the packed copy is at most this many times its
#: size: MKL pads small weights heavily (1024 x 1024 float32: 13.3 MiB packed for 4 MiB,
#: for 2-3% of the resampler's forward), large ones little (2048 -> 8192: 79 MiB for 64)
MKL_MAX_GROWTH = 1.5


def _mkl_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _mkl_packing_wanted() -> bool:
    """``FLAMINGO_RT_MKL_PACK``: 1 / 0 force MKL packing on / off; auto (the default): on for
    Intel CPUs, where it was measured to pay (see the module docstring)."""
    setting = os.environ.get("FLAMINGO_RT_MKL_PACK", "auto").strip().lower() or "auto"
    if setting not in ("auto", "1", "0", "on", "off"):
        raise ValueError(f"FLAMINGO_RT_MKL_PACK: expected auto, 1 or 0, got {setting!r}")
    if setting == "auto":
        return cpu_gemm.intel_cpu()
    return setting in ("1", "on")


def mkl_packing_active() -> bool:
    """Whether float32 inference products read MKL-packed weights here (MKL present, the
    float32 policy not oneDNN's, packing not turned off, an Intel CPU or
    ``FLAMINGO_RT_MKL_PACK=1``)."""
    return (PACK_BUDGET_BYTES > 0 and _mkl_available() and not cpu_gemm.onednn_active()
            and _mkl_packing_wanted())


def _mkl_packed(w: Tensor, rows: int) -> Optional[Tensor]:
    """w packed by MKL for products of ``rows`` rows (``mkl._mkl_reorder_linear_weight``),
    made at the first such product and kept while w is unchanged; None when packing is off,
    w already has MKL_SIZES_PER_WEIGHT other row counts packed, the copy would be more than
    MKL_MAX_GROWTH times w (remembered: w is not packed again) or would pass
    PACK_BUDGET_BYTES."""
    key = _key(w)
    sizes = _MKL_PACKED.get(w)
    if sizes is not None:
        hit = sizes.get(rows)
        if hit is not None and hit[0] == key:
            return hit[1]  # (None for a weight not worth packing)
        if any(e[0] != key for e in sizes.values()):  # stale: w was updated
            sizes.clear()
        if len(sizes) >= MKL_SIZES_PER_WEIGHT:
            return None
    try:
        with torch.no_grad():
            p = torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), rows)
    except (RuntimeError, AttributeError):
        return None
    nbytes = p.numel() * p.element_size()
    if sizes is None:
        sizes = _MKL_PACKED[w] = {}
    if nbytes > MKL_MAX_GROWTH * w.numel() * w.element_size():
        sizes[rows] = (key, None, 0)
        return None
    if packed_bytes() + nbytes > PACK_BUDGET_BYTES:
        return None
    sizes[rows] = (key, p, nbytes)
    return p


def _mkl_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``F.linear(x, weight, bias)`` through MKL's packed product (None where no packed weight
    is at hand): x (..., K) -> (..., N) float32."""
    x2 = _rows(x)
    p = _mkl_packed(weight, x2.shape[0])
    if p is None:
        return None
    y = torch.ops.mkl._mkl_linear(x2, p, weight, bias, x2.shape[0])
    return y.view(*x.shape[:-1], weight.shape[0])


def _product(path: Optional[str], x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)`` off the oneDNN path (a fresh output): MKL's packed product
    where ``path`` is ``"mkl"`` and a packed weight is at hand, else :func:`linear.linear`."""
    y = _mkl_linear(x, weight, bias) if path == "mkl" else None
    return linear(x, weight, bias) if y is None else y


def _rows(t: Tensor) -> Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.is_contiguous() else t2.contiguous()


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    """``act(F.linear(x, weight, bias))`` for ``act`` in ``"gelu"`` (exact erf), ``"relu"``.

    x (..., K), weight (N, K), bias (N,) or None -> (..., N) in x's dtype (autocast as
    :func:`linear.linear` when not fused)."""
    if act not in _POST_OPS:
        raise ValueError(f"linear_act: expected act to be one of {tuple(_POST_OPS)}, got {act!r}")
    path = _path(x, weight, bias)
    if path == "onednn":
        name, algo = _POST_OPS[act]
        y = torch.ops.mkldnn._linear_pointwise(_rows(x), _packed(weight), bias, name, [], algo)
        return y.view(*x.shape[:-1], weight.shape[0])
    y = _product(path, x, weight, bias)
    in_place = not (torch.is_grad_enabled() and y.requires_grad)  # y is our fresh output
    if act == "gelu":
        return torch.ops.aten.gelu_(y) if in_place else F.gelu(y)
    return y.relu_() if in_place else torch.relu(y)


def linear_residual(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
    """``residual + F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None,
    residual (..., N) of the output's shape -> (..., N). Unfused: the product, then
    :func:`residual.residual_add_` into its fresh output."""
    path = _path(x, weight, bias, residual)
    if path == "onednn" and residual.shape == (*x.shape[:-1], weight.shape[0]):
        y = torch.ops.mkldnn._linear_pointwise.binary(_rows(x), _rows(residual), _packed(weight), bias, "add")
        return y.view(residual.shape)
    return residual_add_(residual, _product(path, x, weight, bias))


def linear_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None -> (..., N),
    through oneDNN with the packed weight where the fused products run (inference, see
    :func:`_path`), with the MKL-packed weight for float32 that MKL computes, else
    :func:`linear.linear`."""
    path = _path(x, weight, bias)
    if path == "onednn":
        y = torch.ops.mkldnn._linear_pointwise(_rows(x), _packed(weight), bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    return _product(path, x, weight, bias)
