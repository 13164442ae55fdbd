"""Winograd convolutions on the CPU, F(4x4, 3x3) in float32 and F(2x2, 3x3) in bfloat16:
frozen inference and training.

A 3x3, stride-1 convolution with one pixel of zero padding on every side (TF-style SAME
padding at stride 1), grouped or not, as Lavin & Gray's minimal filtering: every 4x4 output
tile from a 6x6 input tile with 36 products per channel pair instead of 144. The three
stages (input transform, 36 * groups matrix products, output transform with
``gamma * act(. + bias)`` fused) run in ``flamingo_rt_C::conv3x3_winograd`` over chunks of
tiles that stay in cache; the weight is transformed once (:func:`winograd_weight`, in
float64, rounded once) and cached by the caller (the frozen NFNet's convolutions do).

Numerics: the transforms add and scale by up to 5 and 8, so the result's relative error is
about 10x a direct float32 convolution's (measured 1-2.5e-6 against float64, against
2e-7 for oneDNN's direct convolution), well inside the frozen encoder's parity with timm.

Training (:func:`conv3x3`, an autograd function): the forward and the input gradient (the
same convolution of the output gradient by the flipped, transposed weight) run as Winograd
convolutions, the weight transformed at each call (~1.4 ms for a 768 x 128 x 3 x 3 weight);
the weight gradient from the same algebra read backwards (``dL/dU = sum over tiles of
V^T (A dy A^T)``, then ``dL/dw = G^T dL/dU G``; ``flamingo_rt_C::conv3x3_winograd_weight_grad``).

Where it runs (:func:`eligible`): CPU, float32 activations and weight, 3x3, stride 1,
SAME padding, not under autocast or ``torch.compile``, at least :data:`MIN_CHANNELS` input
and output channels per group, and ``FLAMINGO_RT_WINOGRAD`` = ``auto`` (default) or ``1``;
``0`` turns it off (oneDNN's direct convolution then runs, as before); :func:`use` sets it
per thread for a ``with`` block. Each thread that runs these convolutions keeps a workspace
at the largest size it met (dm_nfnet_f0: 14 MiB, 28 MiB with the weight gradient).

bfloat16 (:func:`conv3x3_winograd_bf16`, ``flamingo_rt_C::conv3x3_winograd_bf16``):
F(2x2, 3x3), 16 products per 2x2 output tile instead of 36, on bfloat16 operands with float32
sums (AVX-512 BF16 ``vdpbf16ps``). F(4x4, 3x3) with bfloat16 operands is too inexact (the
transform's coefficients amplify the operands' rounding: dm_nfnet_f0's bf16 features 4.4e-2
relative error against float64, F(2x2, 3x3) 2.1e-2, oneDNN's direct bf16 convolutions 1.9e-2).
The frozen NFNet's bf16 convolutions use it (:func:`eligible_bf16`: bfloat16 x, no gradient
wanted), and so does training (:func:`conv3x3_bf16`, autograd, :func:`eligible_bf16_autograd`:
bf16 tensors or bf16 autocast): the forward, the input gradient and the weight gradient
(:func:`conv3x3_weight_grad_bf16`, the transforms read backwards over pairs of tiles). Both
need at least :data:`MIN_CHANNELS_BF16` (an even number of) input and output channels per
group, and by default (``FLAMINGO_RT_WINOGRAD=auto``) run only on CPUs with AVX-512 BF16 and
without AMX (with AMX, oneDNN's direct bf16 convolutions run on the tile units, several times
faster than any AVX-512 product); ``1`` or ``use(True)`` turns them on wherever the ops exist
(portable code runs them without AVX-512 BF16).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

from .. import _ext

__all__ = ["MIN_CHANNELS", "MIN_CHANNELS_BF16", "enabled", "use", "eligible", "winograd_weight", "conv3x3_winograd", "conv3x3",
           "conv3x3_weight_grad", "bf16_enabled", "eligible_bf16", "winograd_weight_bf16", "conv3x3_winograd_bf16",
           "eligible_bf16_autograd", "conv3x3_bf16", "conv3x3_weight_grad_bf16", "transpose_winograd_weight_bf16"]

#: Fewer input or output channels per group than this and the 36 products are too thin to
#: beat the direct convolution (dm_nfnet_f0's stem 16 -> 32 conv at 112 px measured 0.8-1.1x).
MIN_CHANNELS = 32

#: bfloat16 (F(2x2, 3x3)): fewer channels per group and the products' 16-pair sums and the
#: transforms' per-tile overhead lose to oneDNN's direct convolution (dm_nfnet_f0's stem
#: 32 -> 64 conv at 112 px: 5-12 ms against 4.9; its 128-channel groups: 1.2-1.6x faster).
MIN_CHANNELS_BF16 = 64

_ACTS = ("none", "gelu", "relu", "silu")


_LOCAL = threading.local()  # .stack: the settings of the enclosing use() blocks, per thread


@contextlib.contextmanager
def use(on: bool) -> Iterator[None]:
    """Turn the Winograd path on or off in this thread for a ``with`` block (over
    ``FLAMINGO_RT_WINOGRAD``); e.g. ``with winograd_conv.use(False):`` runs oneDNN's direct
    convolutions (A/B measurements, FLOP counting through ``F.conv2d``)."""
    st = getattr(_LOCAL, "stack", None)
    if st is None:
        st = _LOCAL.stack = []
    st.append(bool(on))
    try:
        yield
    finally:
        st.pop()


def _setting() -> str:
    """``"on"``, ``"off"`` or ``"auto"``: the innermost :func:`use` block's, else
    ``FLAMINGO_RT_WINOGRAD``'s."""
    st = getattr(_LOCAL, "stack", None)
    if st:
        return "on" if st[-1] else "off"
    v = os.environ.get("FLAMINGO_RT_WINOGRAD", "auto").strip().lower()
    if v not in ("", "auto", "1", "on", "true", "yes", "0", "off", "false", "no"):
        raise ValueError(f"FLAMINGO_RT_WINOGRAD: expected auto, 1 or 0, got {v!r}")
    return "off" if v in ("0", "off", "false", "no") else "on" if v in ("1", "on", "true", "yes") else "auto"


def enabled() -> bool:
    """The innermost :func:`use` block's setting, else ``FLAMINGO_RT_WINOGRAD`` is not ``0`` /
    ``off``; and the extension has the op."""
    return _setting() != "off" and _ext.load() and hasattr(torch.ops.flamingo_rt_C, "conv3x3_winograd")


_BF16_AUTO: Optional[bool] = None


def bf16_enabled() -> bool:
    """Whether bfloat16 convolutions may run as F(2x2, 3x3) Winograd convolutions: ``use(True)``
    or ``FLAMINGO_RT_WINOGRAD=1`` (wherever the op exists), ``auto`` (default: only on CPUs with
    AVX-512 BF16 and without AMX), never with ``0`` / ``use(False)``."""
    setting = _setting()
    if setting == "off" or not (_ext.load() and hasattr(torch.ops.flamingo_rt_C, "conv3x3_winograd_bf16")):
        return False
    if setting == "on":
        return True
    global _BF16_AUTO
    if _BF16_AUTO is None:
        cpp = torch.ops.flamingo_rt_C
        amx = hasattr(cpp, "cpu_amx_enabled") and bool(cpp.cpu_amx_enabled())
        _BF16_AUTO = bool(cpp.winograd_bf16_cpu_supported()) and not amx
    return _BF16_AUTO


def _fits(x: Tensor, w: Tensor, groups: int, least: int, even_in: bool = False, even_out: bool = False) -> bool:
    """x (N, C_in, H, W) on the CPU and a 3x3 w (C_out, C_in/groups, 3, 3) whose groups have at
    least ``least`` input and output channels (an even number of inputs with ``even_in``, of
    outputs with ``even_out``)."""
    if not (x.device.type == "cpu" and x.dim() == 4 and w.dim() == 4 and tuple(w.shape[2:]) == (3, 3)):
        return False
    cg, co = w.shape[1], w.shape[0]
    if co % groups or cg < least or co // groups < least:
        return False
    return not (even_in and cg % 2) and not (even_out and (co // groups) % 2)


def eligible(x: Tensor, w: Tensor, stride: int, groups: int) -> bool:
    """Whether the SAME-padded convolution of x (N, C_in, H, W) by w (C_out, C_in/groups,
    kh, kw) at ``stride`` runs as a Winograd convolution (:func:`conv3x3_winograd` without
    gradients, :func:`conv3x3` with them; see the module docstring)."""
    if not (x.dtype == torch.float32 and w.dtype == torch.float32 and stride == 1
            and _fits(x, w, groups, MIN_CHANNELS)):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return enabled()


def eligible_bf16(x: Tensor, w: Tensor, stride: int, groups: int) -> bool:
    """Whether the SAME-padded convolution of bfloat16 x (N, C_in, H, W) by w (C_out,
    C_in/groups, kh, kw) at ``stride`` runs as a bfloat16 Winograd convolution
    (:func:`conv3x3_winograd_bf16`; inference only: the caller checks that no gradient is
    wanted). See the module docstring."""
    if not (x.dtype == torch.bfloat16 and stride == 1 and _fits(x, w, groups, MIN_CHANNELS_BF16, even_in=True)):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return bf16_enabled()


def winograd_weight_bf16(w: Tensor, groups: int = 1, *, transposed: bool = False) -> Tensor:
    """The transformed weight of F(2x2, 3x3), ``G w G^T``, of w (C_out, C_in/groups, 3, 3)
    float32 or bfloat16 (C_in/groups even): (16 * groups, C_in/groups/2, C_out/groups, 2)
    bfloat16 (input channels in pairs, the products' layout), computed in float64 and rounded
    once. ``transposed``: that of the input gradient's convolution (each group's in / out
    channels swapped, every kernel flipped; C_out/groups even), (16 * groups, C_out/groups/2,
    C_in/groups, 2)."""
    if w.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"winograd_weight_bf16: expected a float32 or bfloat16 weight, got {w.dtype}")
    return torch.ops.flamingo_rt_C.conv3x3_winograd_bf16_weight(w.detach(), groups, transposed)


def transpose_winograd_weight_bf16(u: Tensor, groups: int = 1) -> Tensor:
    """``winograd_weight_bf16(w, groups, transposed=True)`` from ``u = winograd_weight_bf16(w,
    groups)``, bitwise, without transforming again: for F(2x2, 3x3) a flipped kernel's
    transform is the kernel's with points 0 and 3 swapped along each axis, so the input
    gradient's weight is a permutation of u's points with each group's channel matrix
    transposed (a 16-bit transpose, ~4x faster than the transform).

    Args:
        u: (16 * groups, C_in/groups/2, C_out/groups, 2) bfloat16; C_out/groups even.

    Returns:
        (16 * groups, C_out/groups/2, C_in/groups, 2) bfloat16.
    """
    return torch.ops.flamingo_rt_C.conv3x3_winograd_bf16_weight_transpose(u, groups)


def conv3x3_winograd_bf16(x: Tensor, u: Tensor, bias: Optional[Tensor], groups: int = 1, act: str = "none",
                          gamma: float = 1.0, *, chunk_tiles: int = 0, products: str = "auto") -> Tensor:
    """``gamma * act(conv2d(x, w, bias, padding=1, groups=groups))`` in bfloat16 for u =
    ``winograd_weight_bf16(w, groups)``, as F(2x2, 3x3) Winograd products on bfloat16
    operands with float32 sums; the tail in float32, rounded once.

    Args:
        x: (N, C_in, H, W) bfloat16 on the CPU, any layout (channels-last is read in place).
        u: (16 * groups, C_in/groups/2, C_out/groups, 2) bfloat16 (:func:`winograd_weight_bf16`).
        bias: (C_out,) float32 or bfloat16, or None.
        act: ``"none"``, ``"gelu"`` (exact, erf), ``"relu"`` or ``"silu"``.
        chunk_tiles: 2x2 output tiles per chunk (0: about 2 MiB of transformed input and
            products, at least 96 tiles). The result does not depend on it.
        products: ``"auto"`` / ``"ours"`` (AVX-512 BF16 kernels where the CPU has them and
            C_out/groups is a multiple of 16, else a portable loop), ``"plain"`` (the portable
            code of every stage, as on CPUs without AVX-512 BF16).

    Returns:
        (N, C_out, H, W) bfloat16, channels-last. No autograd.
    """
    if act not in _ACTS:
        raise ValueError(f"conv3x3_winograd_bf16: expected act to be one of {_ACTS}, got {act!r}")
    return torch.ops.flamingo_rt_C.conv3x3_winograd_bf16(x, u, bias, groups, act, float(gamma), int(chunk_tiles),
                                                         products)


def conv3x3_weight_grad_bf16(x: Tensor, dy: Tensor, groups: int = 1, *, chunk_tiles: int = 0,
                             products: str = "auto", out_dtype: torch.dtype = torch.float32) -> Tensor:
    """dL/dw of ``y = F.conv2d(x, w, padding=1, groups=groups)`` for a 3x3 w and the output
    gradient dy, through the F(2x2, 3x3) transforms read backwards (``dL/dU = sum over tiles
    of V^T (A dy A^T)``, then ``G^T dL/dU G``), V and ``A dy A^T`` rounded once to bfloat16,
    float32 sums: (C_out, C_in/groups, 3, 3) float32, or with ``out_dtype=torch.bfloat16`` those
    values rounded to bfloat16 as the kernel writes them (the bits of ``.to(torch.bfloat16)``
    without its pass: a bfloat16 weight's gradient).

    Args:
        x: (N, C_in, H, W) bfloat16 on the CPU, any layout; C_in/groups even.
        dy: (N, C_out, H, W) bfloat16, any layout.
        chunk_tiles: 2x2 tiles per chunk (0: at least 4 MiB of transforms and twice the size of
            dL/dU, at least 96 tiles; made even).
        products: ``"auto"`` / ``"ours"`` or ``"plain"`` (the portable code of every stage).
        out_dtype: ``torch.float32`` or ``torch.bfloat16``.
    """
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"conv3x3_weight_grad_bf16: expected out_dtype float32 or bfloat16, got {out_dtype}")
    return torch.ops.flamingo_rt_C.conv3x3_winograd_bf16_weight_grad(x, dy, groups, int(chunk_tiles), products,
                                                                     out_dtype == torch.bfloat16)


def eligible_bf16_autograd(x: Tensor, w: Tensor, groups: int) -> bool:
    """Whether a SAME-padded 3x3 stride-1 convolution of x by w runs as :func:`conv3x3_bf16`
    (bfloat16 Winograd forward, input and weight gradients): bfloat16 x and w, or CPU bfloat16
    autocast with float32 / bfloat16 x and w; at least :data:`MIN_CHANNELS_BF16` (an even
    number of) input and output channels per group; :func:`bf16_enabled`; not compiling."""
    if not _fits(x, w, groups, MIN_CHANNELS_BF16, even_in=True, even_out=True) or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return False
        if x.dtype not in (torch.float32, torch.bfloat16) or w.dtype not in (torch.float32, torch.bfloat16):
            return False
    elif not (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16):
        return False
    return bf16_enabled()


def conv3x3_bf16(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, groups: int = 1) -> Tensor:
    """``F.conv2d(x, w, bias, padding=1, groups=groups)`` in bfloat16 as autocast runs it (x, w and
    bias cast to bfloat16, a bfloat16 result), the forward and the input gradient as F(2x2, 3x3)
    Winograd convolutions (:func:`conv3x3_winograd_bf16`; the input gradient's is the flipped,
    transposed weight's), the weight gradient through the transforms read backwards
    (:func:`conv3x3_weight_grad_bf16`); differentiable in x, w and bias (once), the casts included.

    Args:
        x: (N, C_in, H, W) float32 or bfloat16 on the CPU, any layout.
        w: (C_out, C_in/groups, 3, 3) float32 or bfloat16; C_in/groups and C_out/groups even.
        bias: (C_out,) or None.

    Returns:
        (N, C_out, H, W) bfloat16, channels-last.
    """
    if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3):
        raise ValueError(f"conv3x3_bf16: expected a weight of shape (C_out, C_in/groups, 3, 3), got {tuple(w.shape)}")
    for name, t in (("x", x), ("w", w), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"conv3x3_bf16: expected a float32 or bfloat16 {name}, got {t.dtype}")
    bf = torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        return _Conv3x3.apply(x.to(bf), w.to(bf), None if bias is None else bias.to(bf), groups)


def winograd_weight(w: Tensor, groups: int = 1, *, transposed: bool = False) -> Tensor:
    """The transformed weight ``G w G^T`` of w (C_out, C_in/groups, 3, 3) float32:
    (36 * groups, C_in/groups, C_out/groups) float32, computed in float64 and rounded once.
    ``transposed``: that of the input gradient's convolution (each group's in / out channels
    swapped, every kernel flipped), (36 * groups, C_out/groups, C_in/groups)."""
    if w.dtype != torch.float32:
        raise TypeError(f"winograd_weight: expected a float32 weight, got {w.dtype}")
    return torch.ops.flamingo_rt_C.conv3x3_winograd_weight(w.detach(), groups, transposed)


def conv3x3_winograd(x: Tensor, u: Tensor, bias: Optional[Tensor], groups: int = 1, act: str = "none",
                     gamma: float = 1.0, *, chunk_tiles: int = 0, products: str = "auto") -> Tensor:
    """``gamma * act(conv2d(x, w, bias, padding=1, groups=groups))`` for u =
    ``winograd_weight(w, groups)``.

    Args:
        x: (N, C_in, H, W) float32 on the CPU, any layout (channels-last is read in place).
        u: (36 * groups, C_in/groups, C_out/groups) float32 (:func:`winograd_weight`).
        bias: (C_out,) float32 or None.
        act: ``"none"``, ``"gelu"`` (exact, erf), ``"relu"`` or ``"silu"``.
        chunk_tiles: 4x4 output tiles per chunk (0: about 2 MiB of transformed input and
            products, at least 64 tiles). The result does not depend on it.
        products: ``"auto"`` (our AVX-512 kernels where the CPU has AVX-512 and
            C_out/groups is a multiple of 16, else torch's batched product), ``"ours"`` or
            ``"blas"``.

    Returns:
        (N, C_out, H, W) float32, channels-last. No autograd.
    """
    if act not in _ACTS:
        raise ValueError(f"conv3x3_winograd: expected act to be one of {_ACTS}, got {act!r}")
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    return torch.ops.flamingo_rt_C.conv3x3_winograd(x, u, bias, groups, act, float(gamma), int(chunk_tiles),
                                                    products)


def conv3x3_weight_grad(x: Tensor, dy: Tensor, groups: int = 1, *, chunk_tiles: int = 0,
                        products: str = "auto") -> Tensor:
    """dL/dw of ``y = F.conv2d(x, w, padding=1, groups=groups)`` for a 3x3 w and the output
    gradient dy, through the Winograd transforms: (C_out, C_in/groups, 3, 3) float32.

    Args:
        x: (N, C_in, H, W) float32 on the CPU, any layout.
        dy: (N, C_out, H, W) float32, any layout.
        chunk_tiles: 4x4 tiles per chunk (0: at least 4 MiB of transforms and twice the size
            of dL/dU, the float32 sums a range adds to, at least 64 tiles);
            the sum over tiles runs in the same order whatever the chunking (with our products).
        products: as :func:`conv3x3_winograd`'s (``"blas"``: torch's batched products).
    """
    return torch.ops.flamingo_rt_C.conv3x3_winograd_weight_grad(x, dy, groups, int(chunk_tiles), products)


class _Conv3x3(torch.autograd.Function):
    """The forward, input and weight gradients as Winograd convolutions: F(4x4, 3x3) for float32
    x and w, F(2x2, 3x3) for bfloat16 ones."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
        ctx.groups = groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        if x.dtype == torch.bfloat16:
            u = winograd_weight_bf16(w, groups)
            # u kept for the input gradient's weight (a transpose of it: no second transform)
            ctx.save_for_backward(x, w, u)
            return conv3x3_winograd_bf16(x, u, bias, groups)
        ctx.save_for_backward(x, w, None)
        return conv3x3_winograd(x, winograd_weight(w, groups), bias, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, w, u = ctx.saved_tensors
        g = ctx.groups
        bf16 = x.dtype == torch.bfloat16
        dy = dy.to(x.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if bf16:
                dx = conv3x3_winograd_bf16(dy, transpose_winograd_weight_bf16(u, g), None, g)
            else:
                dx = conv3x3_winograd(dy, winograd_weight(w, g, transposed=True), None, g)
        if ctx.needs_input_grad[1]:
            if bf16:  # in w's dtype (bf16 or float32) as the kernel writes it: no cast afterwards
                dw = conv3x3_weight_grad_bf16(x, dy, g, out_dtype=w.dtype)
            else:
                dw = conv3x3_weight_grad(x, dy, g).to(w.dtype)
        if ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db, None


def conv3x3(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, groups: int = 1) -> Tensor:
    """``F.conv2d(x, w, bias, padding=1, groups=groups)`` for a 3x3 float32 weight, as Winograd
    convolutions (forward, input and weight gradients), differentiable in x, w and bias (once).

    Args:
        x: (N, C_in, H, W) float32 on the CPU, any layout.
        w: (C_out, C_in/groups, 3, 3) float32.
        bias: (C_out,) float32 or None.

    Returns:
        (N, C_out, H, W) float32, channels-last.
    """
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        raise TypeError(f"conv3x3: expected float32 x and w, got {x.dtype} and {w.dtype}")
    if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3):
        raise ValueError(f"conv3x3: expected a weight of shape (C_out, C_in/groups, 3, 3), got {tuple(w.shape)}")
    if bias is not None and bias.dtype != torch.float32:
        raise TypeError(f"conv3x3: expected a float32 bias, got {bias.dtype}")
    return _Conv3x3.apply(x, w, bias, groups)
