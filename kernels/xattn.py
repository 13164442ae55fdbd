"""Triton kernels of image-causal cross-attention (forward and backward).

Shapes (any strides; nothing is copied except ``media_index``, made int32 contiguous):

    q, grad_out        (B, T, H, dh)      float32 / bfloat16 / float16
    k, v               (B, M, N, H, dh)   same dtype as q
    media_index        (B, T)             integer, values in [-1, M); -1: no image

Token t attends to the N keys of image ``media_index[b, t]`` (image-causal) or to every
image ``j <= media_index[b, t]`` (``all_previous``). Rows with index -1 are exactly 0.

Work decomposition (never a (T, M*N) matrix):

- forward, one program per (block of BLOCK_T queries, b, h): the block's images are
  ``[lo, hi]`` = the min / max of its valid indices (``[0, hi]`` in all-previous mode);
  because media_index is non-decreasing the block usually touches one image (two at a
  segment boundary), and each query block loads only those images' keys. Online softmax
  in fp32 over BLOCK_N-key tiles; a row is masked out of every image it does not see, so
  the result is exact for any order of media_index, just slower when it is not sorted.
- backward pass A (same grid): reruns the forward for the block (fp32 output, row max and
  sum), stores the log-sum-exp and D = rowsum(dO * O) per row (fp32, (B, H, T)), then a
  second sweep over the same keys gives dq = scale * sum_j dS_j K_j (one writer per row).
- backward pass B, one program per (b, image j, h, block of BLOCK_N keys): walks the
  query rows that see image j (the segment bounds [start, end): the first and last row
  that sees j, found by the program itself in one sweep over media_index[b], exact for
  any order of it; no host-side work or launch) and accumulates dK_j and dV_j in registers.
  Every output element has one writer and a fixed summation order: deterministic.

Accumulation is fp32. Q K^T and dO V^T run on the inputs' dtype (bf16/fp16 tensor cores);
the products with a probability operand (P V, dS K, P^T dO, dS^T Q) keep that operand in
fp32 and use TF32 tensor cores for 16-bit inputs (rounding P to bf16 would double the
error of a bf16 result; these products are far from the memory-bound kernels' limit).
float32 inputs use IEEE fp32 products throughout (no TF32), so float32 results match the
float64 reference to ~1e-6.

Launch configurations are autotuned on the GPU over a small pruned space keyed on the
head dim, the mode and the segment-length bucket (next power of two of T / M, clamped);
under ``TRITON_INTERPRET=1`` one fixed configuration runs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._host_math import cdiv, next_power_of_2
from ._launch_policy import autotune, interpreting

__all__ = [
    "image_causal_attention_fwd",
    "image_causal_attention_bwd",
    "INTERPRET",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"




# --------------------------------------------------------------------------- device code

# Sizes that vary from call to call: one compiled kernel for all of their values (strides
# keep Triton's divisibility specialization, which the vectorized loads need).
_NO_SPEC = ["T", "M", "N", "H", "DH", "scale", "SEG_BUCKET"]


@triton.jit
def _mma(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: operands in fp32 (the interpreter's dot does
    not handle bfloat16, whose values it stores as raw uint16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _to(x, ty: tl.constexpr, FIX: tl.constexpr):
    """fp32 -> the output dtype, rounded to nearest even. FIX (the interpreter with
    bfloat16, whose fp32 -> bf16 conversion truncates): add the rounding bias to the bits
    first, so the truncation rounds like the GPU does."""
    if ty == tl.float32:
        return x
    else:
        if FIX:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = tl.where(x == 0.0, x, bits.to(tl.float32, bitcast=True))  # exact zeros stay 0
        return x.to(ty)


@triton.jit
def _mma_f32(a, b, PREC: tl.constexpr):
    """a @ b for the products with a probability-like fp32 operand (P V, dS K, P^T dO,
    dS^T Q): both operands in fp32, TF32 tensor cores for 16-bit inputs (PREC "tf32": 10
    mantissa bits for P instead of bf16's 7), IEEE fp32 for float32 inputs."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _attend(q, row_idx, row_ok, k_base, v_base, sk_m, sk_n, sk_d, sv_m, sv_n, sv_d,
            N, DH, lo, hi, scale,
            ALL_PREV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PREC2: tl.constexpr):
    """Online-softmax sweep over images lo..hi: (acc (BLOCK_T, BLOCK_D), row max, row sum)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < DH
    m_i = tl.full([BLOCK_T], -1.0e30, tl.float32)  # finite: no inf - inf = NaN
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for j in range(lo, hi + 1):
        if ALL_PREV:
            allowed = row_ok & (row_idx >= j)
        else:
            allowed = row_ok & (row_idx == j)
        kj = k_base + tl.cast(j, tl.int64) * sk_m
        vj = v_base + tl.cast(j, tl.int64) * sv_m
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            nmask = n < N
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(kj + n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
            s = _mma(q, tl.trans(k), PREC, UPCAST) * scale
            s = tl.where(allowed[:, None] & nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vj + n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _mma_f32(p, v, PREC2)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _row_block(IDX, si_b, si_t, b, pid_t, T, M, BLOCK_T: tl.constexpr, ALL_PREV: tl.constexpr):
    """Rows of one query block: (t, t < T, media index, has an image, first image, last image)."""
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    row_idx = tl.load(IDX + b * si_b + t * si_t, mask=tmask, other=-1)
    # indices >= M (invalid) see nothing: never read past the last image
    row_ok = tmask & (row_idx >= 0) & (row_idx < M)
    hi = tl.max(tl.where(row_ok, row_idx, -1), 0)
    if ALL_PREV:
        lo = hi * 0
    else:
        lo = tl.min(tl.where(row_ok, row_idx, 2147483647), 0)
    return t, tmask, row_idx, row_ok, lo, hi


@triton.jit(do_not_specialize=_NO_SPEC)
def _xattn_fwd_kernel(
    Q, K, V, IDX, OUT,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_m, sk_n, sk_h, sk_d,
    sv_b, sv_m, sv_n, sv_h, sv_d,
    si_b, si_t,
    so_b, so_t, so_h, so_d,
    T, M, N, H, DH, scale,
    SEG_BUCKET,  # autotune key only
    ALL_PREV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PREC2: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t, tmask, row_idx, row_ok, lo, hi = _row_block(IDX, si_b, si_t, b, pid_t, T, M, BLOCK_T, ALL_PREV)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < DH
    qmask = tmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
    acc, m_i, l_i = _attend(q, row_idx, row_ok, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                            sk_m, sk_n, sk_d, sv_m, sv_n, sv_d, N, DH, lo, hi, scale,
                            ALL_PREV, BLOCK_T, BLOCK_N, BLOCK_D, PREC, UPCAST, PREC2)
    has = l_i > 0.0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    tl.store(OUT + b * so_b + h * so_h + t[:, None] * so_t + offs_d[None, :] * so_d,
             _to(o, OUT.dtype.element_ty, UPCAST), mask=qmask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _xattn_bwd_dq_kernel(
    Q, K, V, IDX, DO, DQ, LSE, DELTA,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_m, sk_n, sk_h, sk_d,
    sv_b, sv_m, sv_n, sv_h, sv_d,
    si_b, si_t,
    sg_b, sg_t, sg_h, sg_d,  # grad_out
    sdq_b, sdq_t, sdq_h, sdq_d,
    T, M, N, H, DH, scale,
    SEG_BUCKET,
    ALL_PREV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PREC2: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t, tmask, row_idx, row_ok, lo, hi = _row_block(IDX, si_b, si_t, b, pid_t, T, M, BLOCK_T, ALL_PREV)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < DH
    qmask = tmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
    do = tl.load(DO + b * sg_b + h * sg_h + t[:, None] * sg_t + offs_d[None, :] * sg_d, mask=qmask, other=0.0)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    # pass 1: the forward, in fp32
    acc, m_i, l_i = _attend(q, row_idx, row_ok, k_base, v_base, sk_m, sk_n, sk_d, sv_m, sv_n, sv_d,
                            N, DH, lo, hi, scale, ALL_PREV, BLOCK_T, BLOCK_N, BLOCK_D, PREC, UPCAST, PREC2)
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log(l_safe), 0.0)
    delta = tl.sum(o * do.to(tl.float32), 1)
    row = (b * H + h) * T + t
    tl.store(LSE + row, lse, mask=tmask)
    tl.store(DELTA + row, delta, mask=tmask)
    # pass 2: dq = scale * sum over the seen keys of dS K
    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for j in range(lo, hi + 1):
        if ALL_PREV:
            allowed = row_ok & (row_idx >= j)
        else:
            allowed = row_ok & (row_idx == j)
        kj = k_base + tl.cast(j, tl.int64) * sk_m
        vj = v_base + tl.cast(j, tl.int64) * sv_m
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            nmask = n < N
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(kj + n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
            v = tl.load(vj + n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
            s = _mma(q, tl.trans(k), PREC, UPCAST) * scale
            p = tl.where(allowed[:, None] & nmask[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = _mma(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _mma_f32(ds, k, PREC2)
    dq = dq * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + t[:, None] * sdq_t + offs_d[None, :] * sdq_d,
             _to(dq, DQ.dtype.element_ty, UPCAST), mask=qmask)


@triton.jit
def _sees_image(row_idx, ok, j, M, ALL_PREV: tl.constexpr):
    """Which rows (media_index ``row_idx``, valid where ``ok``) see image j: image-causal,
    row_idx == j; all-previous, j <= row_idx < M."""
    if ALL_PREV:
        sees = ok & (row_idx >= j) & (row_idx < M)
    else:
        sees = ok & (row_idx == j)
    return sees


@triton.jit
def _segment_bounds(IDX, b, si_b, si_t, j, T, M, ALL_PREV: tl.constexpr, SCAN: tl.constexpr):
    """[start, end) of the rows of sequence b that see image j (:func:`_sees_image`; end <=
    start: none), in one sweep over media_index[b] in blocks of SCAN rows."""
    offs = tl.arange(0, SCAN)
    lo = T
    hi = 0
    for t0 in range(0, T, SCAN):
        t = t0 + offs
        ok = t < T
        r = tl.load(IDX + b * si_b + t * si_t, mask=ok, other=-1)
        sees = _sees_image(r, ok, j, M, ALL_PREV)
        lo = tl.minimum(lo, tl.min(tl.where(sees, t, T), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(sees, t + 1, 0), axis=0))
    return lo, hi


@triton.jit(do_not_specialize=_NO_SPEC)
def _xattn_bwd_dkdv_kernel(
    Q, K, V, IDX, DO, DK, DV, LSE, DELTA,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_m, sk_n, sk_h, sk_d,
    sv_b, sv_m, sv_n, sv_h, sv_d,
    si_b, si_t,
    sg_b, sg_t, sg_h, sg_d,
    sdk_b, sdk_m, sdk_n, sdk_h, sdk_d,
    sdv_b, sdv_m, sdv_n, sdv_h, sdv_d,
    T, M, N, H, DH, scale,
    SEG_BUCKET,
    ALL_PREV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PREC2: tl.constexpr,
    SCAN_T: tl.constexpr,
):
    bmh = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = (bmh % H).to(tl.int64)
    bm = bmh // H
    j = bm % M
    b = (bm // M).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    dmask = offs_d < DH
    kv_mask = nmask[:, None] & dmask[None, :]
    j64 = tl.cast(j, tl.int64)
    k = tl.load(K + b * sk_b + j64 * sk_m + h * sk_h + n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + j64 * sv_m + h * sv_h + n[:, None] * sv_n + offs_d[None, :] * sv_d,
                mask=kv_mask, other=0.0)
    t_start, t_end = _segment_bounds(IDX, b, si_b, si_t, j, T, M, ALL_PREV, SCAN_T)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sg_b + h * sg_h
    row_base = (b * H + h) * T
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + offs_t
        tmask = t < t_end
        row_idx = tl.load(IDX + b * si_b + t * si_t, mask=tmask, other=-1)
        allowed = _sees_image(row_idx, tmask, j, M, ALL_PREV)
        qmask = tmask[:, None] & dmask[None, :]
        q = tl.load(q_base + t[:, None] * sq_t + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
        do = tl.load(do_base + t[:, None] * sg_t + offs_d[None, :] * sg_d, mask=qmask, other=0.0)
        lse = tl.load(LSE + row_base + t, mask=tmask, other=0.0)
        delta = tl.load(DELTA + row_base + t, mask=tmask, other=0.0)
        s = _mma(q, tl.trans(k), PREC, UPCAST) * scale  # (BLOCK_T, BLOCK_N)
        p = tl.where(allowed[:, None] & nmask[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += _mma_f32(tl.trans(p), do, PREC2)
        dp = _mma(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _mma_f32(tl.trans(ds), q, PREC2)
    dk = dk * scale
    tl.store(DK + b * sdk_b + j64 * sdk_m + h * sdk_h + n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
             _to(dk, DK.dtype.element_ty, UPCAST), mask=kv_mask)
    tl.store(DV + b * sdv_b + j64 * sdv_m + h * sdv_h + n[:, None] * sdv_n + offs_d[None, :] * sdv_d,
             _to(dv, DV.dtype.element_ty, UPCAST), mask=kv_mask)


# --------------------------------------------------------------------------- autotuning

# (BLOCK_T, BLOCK_N, num_warps, num_stages): a small space, pruned per key below.
_Q_SPACE = ((16, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
            (64, 128, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2))
_KV_SPACE = ((16, 64, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2),
             (64, 64, 8, 2), (32, 128, 4, 2))


def _configs(dkdv: bool):
    space = _KV_SPACE if dkdv else _Q_SPACE
    return [triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bt, bn, w, st in space]


def _arg(named_args, kwargs, name, default):
    return int(named_args.get(name, kwargs.get(name, default)))


def _prune_q(configs, named_args, **kwargs):
    """Query-block kernels: blocks no longer than ~2 segments (a longer block straddles
    images and does their work for every row), key tiles no longer than N, tiles that
    fit the registers for large head dims."""
    seg = _arg(named_args, kwargs, "SEG_BUCKET", 64)
    dh = _arg(named_args, kwargs, "DH", 64)
    T = _arg(named_args, kwargs, "T", 1)
    N = _arg(named_args, kwargs, "N", 64)
    bt_max = max(16, min(2 * seg, next_power_of_2(max(T, 1))))
    bn_max = max(32, next_power_of_2(max(N, 1)))
    keep = [c for c in configs
            if c.kwargs["BLOCK_T"] <= bt_max and c.kwargs["BLOCK_N"] <= bn_max
            and not (dh > 64 and c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return keep or configs[:1]


def _prune_kv(configs, named_args, **kwargs):
    """Key-block kernel: key tiles no longer than N (the tile stays in registers for the
    whole segment sweep), smaller tiles for large head dims."""
    dh = _arg(named_args, kwargs, "DH", 64)
    N = _arg(named_args, kwargs, "N", 64)
    bn_max = max(32, next_power_of_2(max(N, 1)))
    keep = [c for c in configs
            if c.kwargs["BLOCK_N"] <= bn_max
            and not (dh > 64 and c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return keep or configs[:1]


def _heuristic(dkdv: bool, T: int, M: int, N: int, dh: int) -> dict:
    """The configuration of problems too small to be worth tuning (and of the first call
    with FLAMINGO_RT_TRITON_AUTOTUNE=0)."""
    bn = 32 if N <= 32 or dh > 128 else 64
    if dkdv:
        return {"BLOCK_T": 32, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2}
    bt = 16 if _seg_bucket(T, M) <= 16 or T <= 16 else (32 if dh > 64 else 64)
    return {"BLOCK_T": bt, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2}


#: Autotune only problems with at least this many (token, head) rows; below, the heuristic.
AUTOTUNE_MIN_ROWS = 8192

_KEY = ["DH", "SEG_BUCKET", "ALL_PREV", "N"]

_fwd_tuned = triton.autotune(_configs(False), key=_KEY, prune_configs_by={"early_config_prune": _prune_q})(
    _xattn_fwd_kernel)
_dq_tuned = triton.autotune(_configs(False), key=_KEY, prune_configs_by={"early_config_prune": _prune_q})(
    _xattn_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(_configs(True), key=_KEY, prune_configs_by={"early_config_prune": _prune_kv})(
    _xattn_bwd_dkdv_kernel)


def _scan_rows() -> int:
    """Rows of media_index per step of the key-block kernel's segment-bounds sweep: 1024 on
    the GPU (one or two steps at Flamingo's lengths), FLAMINGO_RT_XATTN_INTERP_SCAN (default
    8) under TRITON_INTERPRET=1, so that the tests' short sequences take several steps."""
    if INTERPRET or interpreting():
        return int(os.environ.get("FLAMINGO_RT_XATTN_INTERP_SCAN", "8"))
    return 1024


def _interp_blocks():
    """The one configuration run under TRITON_INTERPRET=1 (small, so tests cover tile edges)."""
    bt = int(os.environ.get("FLAMINGO_RT_XATTN_INTERP_BT", "16"))
    bn = int(os.environ.get("FLAMINGO_RT_XATTN_INTERP_BN", "32"))
    return {"BLOCK_T": bt, "BLOCK_N": bn}


def _launch(tuned, raw, grid_fn, args, consts, heuristic: dict, rows: int):
    """Run one kernel: the fixed interpreter blocks under TRITON_INTERPRET=1; on the GPU the
    autotuned kernel for problems of at least AUTOTUNE_MIN_ROWS rows (unless
    FLAMINGO_RT_TRITON_AUTOTUNE=0), else the heuristic configuration."""
    if INTERPRET or interpreting():
        blocks = _interp_blocks()
        raw[grid_fn(blocks)](*args, **consts, **blocks)
    elif autotune(rows, AUTOTUNE_MIN_ROWS):
        tuned[grid_fn](*args, **consts)
    else:
        raw[grid_fn(heuristic)](*args, **consts, **heuristic)


# --------------------------------------------------------------------------- host side

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocator of every output (tests swap it for one that fills with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _seg_bucket(T: int, M: int) -> int:
    """Expected tokens per image (T / M), as a power of two in [1, 4096]: the autotune key."""
    return min(4096, next_power_of_2(max(1, T // max(M, 1))))


def _common(q, k, media_index, all_previous):
    B, T, H, dh = q.shape
    M, N = k.shape[1], k.shape[2]
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"triton image_causal_attention: expected float32, bfloat16 or float16, got {q.dtype}")
    if M > 0 and N == 0:
        raise ValueError("triton image_causal_attention: expected at least one visual token per image, got N = 0")
    if dh > 256:
        raise ValueError(f"triton image_causal_attention: expected head dim <= 256, got {dh}")
    idx = media_index.to(device=q.device, dtype=torch.int32)
    if not q.is_cuda and idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= M):
        # (on the GPU out-of-range rows read nothing and give 0; checking costs a sync)
        raise ValueError(f"expected media_index values in [-1, {M}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    consts = dict(
        ALL_PREV=bool(all_previous),
        BLOCK_D=max(16, next_power_of_2(dh)),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        PREC2="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=bool(q.dtype == torch.bfloat16 and (INTERPRET or interpreting())),
    )
    return B, T, H, dh, M, N, idx, consts


def image_causal_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               media_index: torch.Tensor, all_previous: bool, scale: float,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """Forward. q (B, T, H, dh), k/v (B, M, N, H, dh), media_index (B, T) -> (B, T, H, dh)
    in q's dtype (written into ``out`` when given, any strides)."""
    B, T, H, dh, M, N, idx, consts = _common(q, k, media_index, all_previous)
    if out is None:
        out = _empty(q.shape, q.dtype, q.device)
    if out.numel() == 0:
        return out
    if M == 0:
        return out.zero_()
    args = (q, k, v, idx, out, *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *out.stride(),
            T, M, N, H, dh, float(scale), _seg_bucket(T, M))
    _launch(_fwd_tuned, _xattn_fwd_kernel, lambda c: (cdiv(T, c["BLOCK_T"]), B * H), args, consts,
            _heuristic(False, T, M, N, dh), B * T * H)
    return out


def image_causal_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, media_index: torch.Tensor, all_previous: bool,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv), contiguous, each with its input's shape and dtype."""
    B, T, H, dh, M, N, idx, consts = _common(q, k, media_index, all_previous)
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if M == 0 or T == 0 or B == 0 or H == 0 or dh == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = _empty((B, H, T), torch.float32, q.device)
    delta = _empty((B, H, T), torch.float32, q.device)
    seg = _seg_bucket(T, M)
    common = (T, M, N, H, dh, float(scale), seg)
    args = (q, k, v, idx, grad_out, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *idx.stride(),
            *grad_out.stride(), *dq.stride(), *common)
    _launch(_dq_tuned, _xattn_bwd_dq_kernel, lambda c: (cdiv(T, c["BLOCK_T"]), B * H), args, consts,
            _heuristic(False, T, M, N, dh), B * T * H)
    args = (q, k, v, idx, grad_out, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(),
            *idx.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *common)
    _launch(_dkdv_tuned, _xattn_bwd_dkdv_kernel, lambda c: (B * M * H, cdiv(N, c["BLOCK_N"])), args,
            dict(consts, SCAN_T=_scan_rows()), _heuristic(True, T, M, N, dh), B * T * H)
    return dq, dk, dv
