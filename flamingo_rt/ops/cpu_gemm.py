"""float32 matrix products on the CPU through oneDNN, where torch's BLAS is the slow one.

torch's CPU wheels run float32 ``mm`` / ``addmm`` / ``linear`` through MKL, which picks its
AVX-512 kernels only on Intel CPUs: on other x86 CPUs with AVX-512 (AMD Zen 4 and later)
it runs its AVX2 kernels. oneDNN, also inside torch (``torch.ops.mkldnn._linear_pointwise``,
the op Inductor's CPU backend calls), dispatches on the instruction set alone. Measured on
a 2-core AMD EPYC (Zen 4) on the training step's shapes: MKL 100-155 GFLOP/s, oneDNN
185-205 GFLOP/s in the forward and the input-gradient products, 150-170 against 70-165 in
the weight-gradient ones (``dy^T x``, whose transposed operand is copied to rows first).
bfloat16 products already go to oneDNN inside torch, so only float32 is routed here; for
them :func:`mm` only copies a transposed first operand to rows (:func:`rows_first`).

The choice is made per machine, never per call or by timing (results must not depend on
which library won a race): ``FLAMINGO_RT_CPU_GEMM`` = ``auto`` (default: oneDNN on non-Intel
x86 CPUs whose torch capability is AVX-512, torch's BLAS elsewhere), ``onednn`` or ``torch``;
:func:`use` overrides it in a ``with`` block (tests, A/B benchmarks). Under
``torch.compile`` / export, on other devices and dtypes, with an empty reduction, or when
the op is missing from the torch build, every function here is its torch counterpart.

The functions do not record autograd history (callers are custom-op implementations and
:class:`flamingo_rt.ops.linear` 's autograd function).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import backend as _backend

__all__ = ["POLICIES", "policy", "onednn_active", "use", "mm", "mm_add", "linear", "available", "eligible",
           "half_products_slow", "warn_if_half_products_slow",
           "plain_tensor", "shares_storage", "transpose_rows", "block_rows", "rows_first"]

POLICIES = ("auto", "onednn", "torch")
BLOCK_BYTES = 16 << 20  # the largest transposed copy mm makes at once
_LOCAL = threading.local()  # .stack: the policies of the enclosing use() blocks, per thread


def _stack() -> list:
    st = getattr(_LOCAL, "stack", None)
    if st is None:
        st = _LOCAL.stack = []
    return st


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def intel_cpu() -> bool:
    """The CPU's vendor is Intel (``GenuineIntel``; /proc/cpuinfo is read once)."""
    return _cpu_vendor() == "GenuineIntel"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when this torch build has oneDNN and its linear op."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def bf16_available() -> bool:
    """True when oneDNN runs bf16 products on this CPU (and this torch build has oneDNN)."""
    try:
        return available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def half_products_slow(device, dtype: torch.dtype) -> bool:
    """True when ``dtype`` (bfloat16 / float16) products on ``device`` run in torch's own
    reference loops: a CPU where oneDNN has no kernels of that dtype (an AVX2-only x86 CPU,
    where torch's bf16 ``mm`` measured 0.58 GFLOP/s on a 2-core AMD EPYC Zen 3 against
    160 for float32: 270x slower). flamingo_rt's C++ kernels (the decode step's small-batch
    linear, attention, activations) are not affected, and flamingo_rt's matrix products and
    convolutions run widened to float32 there instead (:mod:`half_widening`)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if dtype == torch.bfloat16:
        return not bf16_available()
    return not _fp16_available()


@functools.lru_cache(maxsize=None)
def _fp16_available() -> bool:
    """True when oneDNN runs float16 products on this CPU (and this torch build has oneDNN)."""
    try:
        return available() and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


_WARNED_SLOW: set = set()


def warn_if_half_products_slow(device, dtype: torch.dtype, where: str) -> bool:
    """Warns (once per ``where`` and dtype, ``RuntimeWarning``) when :func:`half_products_slow`
    and flamingo_rt's products do not run widened to float32 instead (only with
    ``FLAMINGO_RT_WIDEN_HALF=0``: :mod:`half_widening`). ``where`` names what asked for the
    dtype (``"load_pretrained(dtype=torch.bfloat16)"``). Returns whether the products run in
    torch's slow loops."""
    from . import half_widening  # (it imports this module)

    slow = half_products_slow(device, dtype) and not half_widening.active(device, dtype)
    if slow and (where, dtype) not in _WARNED_SLOW:
        import warnings

        _WARNED_SLOW.add((where, dtype))
        name = str(dtype).replace("torch.", "")
        warnings.warn(
            f"{where}: {name} matrix products on this CPU run in torch's reference loops (oneDNN has no "
            f"{name} kernels for it: no AVX-512 {name} support), about 270x slower than float32 "
            f"(0.58 against 160 GFLOP/s measured on an AVX2 AMD EPYC), and FLAMINGO_RT_WIDEN_HALF=0 keeps "
            f"them there; unset it (auto: products widened to float32) or use float32 here.",
            RuntimeWarning, stacklevel=3)
    return slow


@functools.lru_cache(maxsize=None)
def _auto() -> bool:
    if not available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and not intel_cpu()


def policy() -> str:
    """The policy in force: the innermost :func:`use`, else ``FLAMINGO_RT_CPU_GEMM``, else auto."""
    st = _stack()
    if st:
        return st[-1]
    p = os.environ.get("FLAMINGO_RT_CPU_GEMM", "auto").strip().lower() or "auto"
    if p not in POLICIES:
        raise ValueError(f"FLAMINGO_RT_CPU_GEMM={p!r}: expected one of {POLICIES}")
    return p


def onednn_active() -> bool:
    """Whether float32 CPU products go to oneDNN under the policy in force."""
    p = policy()
    if p == "torch":
        return False
    if p == "onednn":
        if not available():
            raise RuntimeError("FLAMINGO_RT_CPU_GEMM=onednn, but this torch build has no oneDNN "
                               "(torch.backends.mkldnn.is_available() is False)")
        return True
    return _auto()


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """``with use("onednn"): ...`` forces a policy (``auto``, ``onednn`` or ``torch``) in the
    block, on this thread (as ``torch.no_grad``; a CPU backward runs on the calling thread)."""
    if name not in POLICIES:
        raise ValueError(f"unknown CPU GEMM policy {name!r}; expected one of {POLICIES}")
    st = _stack()
    st.append(name)
    try:
        yield
    finally:
        st.pop()


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_tensor(t: Tensor) -> bool:
    """A ``torch.Tensor`` or ``nn.Parameter`` itself, not a subclass."""
    return type(t) in _PLAIN_TYPES


def shares_storage(a: Tensor, b: Tensor) -> bool:
    """a and b are views of one storage (conservatively: any shared storage counts)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def eligible(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether oneDNN computes ``a`` (..., K) times the 2-D weight-like ``b`` (+ ``bias``) here:
    eager mode (not compiling or exporting), plain float32 CPU tensors (not a tensor
    subclass such as DTensor, which has no rule for the oneDNN op), a non-empty product,
    and the policy in force picks oneDNN."""
    if torch.compiler.is_compiling() or _backend.exporting():
        return False
    if not (plain_tensor(a) and plain_tensor(b)):
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return False
    if a.shape[-1] == 0 or a.numel() == 0 or b.numel() == 0 or b.dim() != 2:
        return False
    return onednn_active()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) -> (..., N) float32
    (bfloat16 / float16 on a CPU without such kernels: widened, :mod:`half_widening`)."""
    from . import half_widening  # (it imports this module)

    if half_widening.wanted(x, weight, bias):
        return half_widening.linear(x, weight, bias)
    if eligible(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def mm(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` for 2-D a (M, K) and b (K, N) -> (M, N), any strides.

    ``out``: a dense (M, N) tensor of the result's dtype that the caller no longer needs
    (a dead temporary), written with the product and returned when torch's BLAS computes
    it: no fresh allocation, whose first-touch page faults cost more than a large
    product's output on the CPU. The oneDNN path returns a new tensor.

    A column-major ``a`` (a transposed view, as in weight gradients ``dy.t() @ x``) is copied
    to rows first: oneDNN runs it 10-40 % slower in place, more than the copy costs. The copy
    is :func:`transpose_rows` (3x faster than ``.contiguous()`` on such views), made in blocks
    of at most ``BLOCK_BYTES`` of ``a``'s rows when ``a`` is larger, each block's product
    written into its rows of the output: the copy never holds more than a block (a 2048-token
    FF's ``dh`` is 64 MiB in float32; the blocked product measured as fast as the whole).
    The same holds for bfloat16 / float16 on torch's own path (oneDNN inside torch), where a
    column-major ``a`` runs at about half speed: see :func:`rows_first`. bfloat16 / float16
    on a CPU without such kernels (torch's reference loops) is computed widened to float32
    (:func:`half_widening.mm`)."""
    from . import half_widening  # (it imports this module)

    if a.dim() == 2 and b.dim() == 2 and half_widening.wanted(a, b):
        return half_widening.mm(a, b, out if out is not None and _out_fits(out, a, b) else None)
    if a.dim() != 2 or b.dim() != 2 or not eligible(a, b):
        fits = out is not None and _out_fits(out, a, b)
        if rows_first(a, b):
            return _rows_first_mm(a, b, out if fits else None)
        if fits:
            return torch.mm(a, b, out=out)
        return a @ b
    return _onednn_mm(a, b, None)


ROWS_FIRST_MIN_N = 1024  # below this many output columns the column-major product is as fast


def rows_first(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`mm` copies a column-major bfloat16 / float16 ``a`` to rows (in blocks)
    before torch's product: eager, plain 2-D CPU tensors of one of those dtypes, ``a`` with
    strided rows, and at least :data:`ROWS_FIRST_MIN_N` output columns. torch computes
    these products through oneDNN, which runs a transposed ``a`` at about half speed on the
    AMX machine of the benchmarks (bf16 weight gradients ``dy^T x`` of the block's and the
    resampler's shapes: 1000-1350 against 1750-2650 GFLOP/s); with the copy the products
    take 0.56-0.85x the time (2048 x 2048 x 8192: 71.9 -> 40.6 ms). With 512 output
    columns (a 512-wide head projection's gradient) the copy did not pay: not taken. Only
    where oneDNN runs torch's bf16 products (:func:`bf16_available`): elsewhere (an AVX2-only
    CPU) torch's own loops run them, which the copy does not speed up."""
    return (
        a.dim() == 2 and b.dim() == 2
        and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
        and a.device.type == "cpu" and b.device.type == "cpu"
        and a.stride(-1) != 1 and a.shape[0] > 1 and a.shape[1] > 1
        and b.shape[1] >= ROWS_FIRST_MIN_N
        and not torch.compiler.is_compiling() and not _backend.exporting()
        and plain_tensor(a) and plain_tensor(b)
        and bf16_available()
    )


def _rows_first_mm(a: Tensor, b: Tensor, out: Optional[Tensor]) -> Tensor:
    """torch's ``a @ b`` with ``a`` copied to rows (:func:`_by_copied_row_blocks`), written
    into ``out`` when given."""
    def prod(x: Tensor, r0: int, r1: int, dst: Optional[Tensor]) -> Tensor:
        return x @ b if dst is None else torch.mm(x, b, out=dst)

    return _by_copied_row_blocks(a, b.shape[1], prod, out)


def _by_copied_row_blocks(a: Tensor, n: int, prod, out: Optional[Tensor] = None) -> Tensor:
    """The (M, n) product of a column-major ``a`` (M, K) made from ``a`` copied to rows
    (:func:`transpose_rows`): whole when ``a`` is at most ``BLOCK_BYTES``, else in blocks of
    rows of at most that size, each block's product written into its rows of ``out`` (new
    when None). ``prod(x, r0, r1, dst)`` multiplies the copied rows x = a[r0:r1]: into ``dst``
    when given, else returning a new tensor."""
    M, K = a.shape
    rows = block_rows(M, BLOCK_BYTES // (K * a.element_size()))
    if M <= rows:
        return prod(transpose_rows(a), 0, M, out)
    if out is None:
        out = a.new_empty((M, n))
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        prod(transpose_rows(a[r0:r1]), r0, r1, out[r0:r1])
    return out


def _out_fits(out: Tensor, a: Tensor, b: Tensor) -> bool:
    return (
        a.dim() == 2 and b.dim() == 2
        and not torch.compiler.is_compiling() and not _backend.exporting()
        and plain_tensor(out) and plain_tensor(a) and plain_tensor(b)
        and not out.requires_grad
        and out.shape == (a.shape[0], b.shape[1])
        and out.dtype == a.dtype == b.dtype and out.device == a.device
        and out.is_contiguous()
        and not shares_storage(out, a) and not shares_storage(out, b)
    )


def mm_add(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` as a new (M, N) tensor, for 2-D c (M, N), a (M, K), b (K, N) of one dtype:
    the accumulation of a product split along K (a weight gradient summed over row chunks).
    On oneDNN (float32) the add is the product's post-op (one write of the output, measured
    ~5 % over the bare product on 2048 x 1024 x 8192, against ~13 % for a separate add);
    elsewhere ``torch.addmm``."""
    if c.shape != (a.shape[0], b.shape[1]) or c.dtype != a.dtype:
        raise ValueError(f"mm_add: expected c of shape ({a.shape[0]}, {b.shape[1]}) and dtype {a.dtype}, "
                         f"got {tuple(c.shape)} {c.dtype}")
    from . import half_widening  # (it imports this module)

    if a.dim() == 2 and b.dim() == 2 and half_widening.wanted(c, a, b):
        return half_widening.addmm(c, a, b)
    if a.dim() != 2 or b.dim() != 2 or not eligible(a, b) or not plain_tensor(c):
        return torch.addmm(c, a, b)
    return _onednn_mm(a, b, c.contiguous())


def _onednn_mm(a: Tensor, b: Tensor, c: Optional[Tensor]) -> Tensor:
    """oneDNN's ``a @ b`` (+ ``c``), ``a`` copied to rows in blocks when it is a transposed view."""
    lp = torch.ops.mkldnn._linear_pointwise
    bt = b.t()

    def prod(x: Tensor, cc: Optional[Tensor]) -> Tensor:
        if cc is None:
            return lp(x, bt, None, "none", [], "")
        return lp.binary(x, cc, bt, None, "add")

    if a.stride(-1) == 1:
        return prod(a, c)

    def block(x: Tensor, r0: int, r1: int, dst: Optional[Tensor]) -> Tensor:
        y = prod(x, None if c is None else c[r0:r1])
        return y if dst is None else dst.copy_(y)

    return _by_copied_row_blocks(a, b.shape[1], block)


def block_rows(rows: int, most: int) -> int:
    """Rows per block when ``rows`` are split into blocks of at most ``most`` rows, balanced:
    the fewest blocks, of equal size but the last (1024 rows of 4112 floats under a 16 MiB
    bound: 2 x 512, not 1020 + a 4-row product)."""
    most = max(1, most)
    if rows <= most:
        return max(1, rows)
    n = -(-rows // most)
    return -(-rows // n)


def transpose_rows(a: Tensor) -> Tensor:
    """``a.contiguous()`` for a 2-D CPU view ``a`` whose rows are strided (a transpose): the
    tiled C++ copy ``flamingo_rt_C::transpose_copy`` when the extension is built (measured
    3x faster than torch's strided copy on 16-64 MiB float32 matrices), else torch's."""
    if a.dim() == 2 and a.device.type == "cpu" and a.stride(-1) != 1 and a.element_size() in (2, 4, 8) \
            and not a.is_complex() and _ext.load():
        return torch.ops.flamingo_rt_C.transpose_copy(a.t())
    return a.contiguous()
