"""Triton kernels of the Perceiver Resampler attention (``resampler_attention``).

Latent queries q (N, L, H, dh) attend to the keys/values of the features
(k_x, v_x: (N, S, H, dh)) followed by those of the latents (k_l, v_l: (N, L, H, dh)).
The concatenation is never built: every program streams the feature keys, then the
latent keys, from their own tensors (any strides).

Forward: a program per (medium, head, tile of up to 128 latents) — with the usual 64
latents that is one program per (medium, head), all N media in one launch. Online
softmax in the exp2 domain, fp32 accumulation; inputs fp32 (IEEE products, no TF32),
bf16 or fp16; output in q's dtype.

Backward: a program per (medium, head) owning all L (<= 128) query rows and all S + L
keys of its problem, so every gradient element is written by exactly one program, once
(deterministic, no atomics) and no softmax statistics have to be kept from the forward:
pass 1 recomputes the row max / sum and O (fp32) to get the log-sum-exp and
delta = rowsum(dO * O); pass 2 walks the key blocks again, writes dK and dV of each
block and accumulates dQ in registers. L > 128 is not handled by the backward kernel
(:func:`backward_supported`); the op falls back to the reference there.

Both are autotuned over a small space (key block size, warps, stages) keyed on the head
dimension block and a bucket of S, for problems of at least AUTOTUNE_MIN_ROWS rows
(smaller ones, or all with FLAMINGO_RT_TRITON_AUTOTUNE=0, run a heuristic configuration);
under ``TRITON_INTERPRET=1`` (CPU) one fixed configuration runs instead.
No autograd here: :mod:`flamingo_rt.ops.resampler` registers these as the ``triton``
backend.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ._host_math import cdiv, next_power_of_2
from ._launch_policy import autotune, interpreting

LOG2E = 1.4426950408889634
MAX_BWD_L = 128  # the backward keeps all query rows of a (medium, head) in one tile
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supported(q: Tensor) -> bool:
    """dtype / head-dim this module handles (fp32, bf16, fp16; dh <= 256)."""
    return q.dtype in _DTYPES and q.shape[-1] <= 256


def backward_supported(q: Tensor) -> bool:
    return supported(q) and q.shape[1] <= MAX_BWD_L


def _s_bucket(S: int) -> int:
    """Autotune key for the feature count: powers of two up to 4096."""
    return min(4096, next_power_of_2(max(S, 1)))


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter + bf16 only): the operands go
    through float32 first (the products are the same, exact in fp32), because the
    Triton CPU interpreter returns garbage for bf16 tl.dot."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PREC)
    return c


@triton.jit
def _fwd_keys(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
              n_keys, offs_d, d_mask, qk_scale,
              BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax accumulation of ``n_keys`` keys/values starting at k_base/v_base.
    Scores are in the log2 domain (qk_scale = scale * log2(e))."""
    offs_s = tl.arange(0, BLOCK_S)
    for start in range(0, n_keys, BLOCK_S):
        s_idx = start + offs_s
        s_mask = s_idx < n_keys
        kv_mask = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + s_idx[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        s = tl.where(s_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + s_idx[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _bwd_keys(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
              dk_base, dv_base, stride_dks, stride_dvs,
              n_keys, offs_d, d_mask, qk_scale, sm_scale,
              BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV of ``n_keys`` keys (written) and their contribution to dQ (returned, unscaled)."""
    offs_s = tl.arange(0, BLOCK_S)
    for start in range(0, n_keys, BLOCK_S):
        s_idx = start + offs_s
        s_mask = s_idx < n_keys
        kv_mask = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + s_idx[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + s_idx[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(s_mask[None, :], p, 0.0)
        dv = _dot(tl.trans(p.to(do.dtype)), do, DOT_PREC, UPCAST)
        dp = _dot(do, tl.trans(v), DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk = _dot(tl.trans(ds.to(q.dtype)), q, DOT_PREC, UPCAST) * sm_scale
        dq += _dot(ds.to(k.dtype), k, DOT_PREC, UPCAST)
        tl.store(dk_base + s_idx[:, None] * stride_dks + offs_d[None, :],
                 dk.to(dk_base.dtype.element_ty), mask=kv_mask)
        tl.store(dv_base + s_idx[:, None] * stride_dvs + offs_d[None, :],
                 dv.to(dv_base.dtype.element_ty), mask=kv_mask)
    return dq


# ----------------------------------------------------------------------------- kernels


# Shape arguments that vary between problems are not specialized (Triton compiles a variant
# per "== 1" / "divisible by 16" class of every int argument otherwise: S = 1, 49, 256 gave
# three compilations per head dim, minutes each in float32); strides stay specialized (the
# unit stride of the head dim is what vectorizes the loads).
_NO_SPEC = ["H", "L", "S", "S_BUCKET"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _resampler_fwd(
    Q, KX, VX, KL, VL, O,
    sq_n, sq_l, sq_h, sq_d,
    skx_n, skx_s, skx_h, skx_d,
    svx_n, svx_s, svx_h, svx_d,
    skl_n, skl_s, skl_h, skl_d,
    svl_n, svl_s, svl_h, svl_d,
    so_n, so_l, so_h,
    H, L, S, qk_scale, S_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    pid_l = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = (pid_nh % H).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_mask = offs_l < L
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + n * sq_n + h * sq_h + offs_l[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=l_mask[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_L,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, KX + n * skx_n + h * skx_h, VX + n * svx_n + h * svx_h,
                              skx_s, skx_d, svx_s, svx_d, S, offs_d, d_mask, qk_scale,
                              BLOCK_S, DOT_PREC, UPCAST)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, KL + n * skl_n + h * skl_h, VL + n * svl_n + h * svl_h,
                              skl_s, skl_d, svl_s, svl_d, L, offs_d, d_mask, qk_scale,
                              BLOCK_S, DOT_PREC, UPCAST)
    out = acc / l_i[:, None]
    tl.store(O + n * so_n + h * so_h + offs_l[:, None] * so_l + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=l_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _resampler_bwd(
    Q, KX, VX, KL, VL, DO, DQ, DKX, DVX, DKL, DVL,
    sq_n, sq_l, sq_h, sq_d,
    skx_n, skx_s, skx_h, skx_d,
    svx_n, svx_s, svx_h, svx_d,
    skl_n, skl_s, skl_h, skl_d,
    svl_n, svl_s, svl_h, svl_d,
    sdo_n, sdo_l, sdo_h, sdo_d,
    H, L, S, qk_scale, sm_scale, S_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # gradients are written contiguous: (N, L|S, H, dh)
    pid = tl.program_id(0)
    n = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_mask = offs_l < L
    d_mask = offs_d < HEAD_DIM
    ld_mask = l_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + n * sq_n + h * sq_h + offs_l[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=ld_mask, other=0.0)
    do = tl.load(DO + n * sdo_n + h * sdo_h + offs_l[:, None] * sdo_l + offs_d[None, :] * sdo_d,
                 mask=ld_mask, other=0.0)
    kx = KX + n * skx_n + h * skx_h
    vx = VX + n * svx_n + h * svx_h
    kl = KL + n * skl_n + h * skl_h
    vl = VL + n * svl_n + h * svl_h
    # pass 1: softmax statistics and O (fp32)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_L,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, kx, vx, skx_s, skx_d, svx_s, svx_d, S,
                              offs_d, d_mask, qk_scale, BLOCK_S, DOT_PREC, UPCAST)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, kl, vl, skl_s, skl_d, svl_s, svl_d, L,
                              offs_d, d_mask, qk_scale, BLOCK_S, DOT_PREC, UPCAST)
    o = acc / l_i[:, None]
    delta = tl.sum(o * do.to(tl.float32), 1)
    lse2 = m_i + tl.log2(l_i)
    # pass 2: dK, dV per key block; dQ accumulated here
    H_D = H * HEAD_DIM
    dq = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dq = _bwd_keys(dq, q, do, lse2, delta, kx, vx, skx_s, skx_d, svx_s, svx_d,
                   DKX + (n * S * H + h) * HEAD_DIM, DVX + (n * S * H + h) * HEAD_DIM, H_D, H_D,
                   S, offs_d, d_mask, qk_scale, sm_scale, BLOCK_S, DOT_PREC, UPCAST)
    dq = _bwd_keys(dq, q, do, lse2, delta, kl, vl, skl_s, skl_d, svl_s, svl_d,
                   DKL + (n * L * H + h) * HEAD_DIM, DVL + (n * L * H + h) * HEAD_DIM, H_D, H_D,
                   L, offs_d, d_mask, qk_scale, sm_scale, BLOCK_S, DOT_PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + (n * L * H + h) * HEAD_DIM + offs_l[:, None] * H_D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=ld_mask)


# ----------------------------------------------------------------------------- tuning


def _prune(configs, named_args, **kwargs):
    """Drop key blocks much larger than the key count, and big blocks with wide heads
    (register pressure), keeping at least one config."""
    S = named_args["S"]
    L = named_args["L"]
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    keep = [c for c in configs
            if c.kwargs["BLOCK_S"] <= max(32, next_power_of_2(S + L))
            and not (bd >= 256 and c.kwargs["BLOCK_S"] > 32)]
    return keep or configs[:1]


_FWD_CONFIGS = [
    triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=st)
    for bs in (32, 64, 128) for w in (4, 8) for st in (2, 3)
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=st)
    for bs in (32, 64) for w in (4, 8) for st in (1, 2)
]


#: Autotune only problems of at least this many (medium, head, latent) rows; below, the
#: heuristic configuration. Autotuning compiles every configuration of the space per key
#: (S bucket, head dim, dtype): the GPU check's correctness cases (3 media x 2 heads x 64
#: latents) would compile 20 kernels per head dim and feature-count bucket, which in
#: float32 (IEEE products) took minutes each on the H200's host.
AUTOTUNE_MIN_ROWS = 8192


def _autotune(rows: int) -> bool:
    """Whether a problem of ``rows`` (N * H * L) rows runs the autotuned kernel:
    ``rows >= AUTOTUNE_MIN_ROWS`` and FLAMINGO_RT_TRITON_AUTOTUNE is not 0."""
    return autotune(rows, AUTOTUNE_MIN_ROWS)


def _heuristic(which: str, S: int, L: int, block_d: int) -> dict:
    """The configuration of untuned problems: one of the tuning space that
    :func:`_prune` keeps for every S, L and head dim (key blocks of 32 for short key sets
    and wide heads, else 64; 4 warps)."""
    bs = 32 if S + L <= 64 or block_d >= 256 else 64
    if which == "fwd":
        return {"BLOCK_S": bs, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_S": 32, "num_warps": 4, "num_stages": 1}


def _launch(which: str, grid, args, meta: dict, S: int, L: int, rows: int) -> None:
    """Run the forward or backward kernel: the fixed interpreter blocks under
    TRITON_INTERPRET=1; on the GPU the autotuned kernel for large problems
    (:func:`_autotune`), else the heuristic configuration."""
    raw = _resampler_fwd if which == "fwd" else _resampler_bwd
    if interpreting():
        raw[grid](*args, **meta, BLOCK_S=32 if S + L <= 64 else 64)
    elif _autotune(rows):
        _tuned(which)[grid](*args, **meta)
    else:
        raw[grid](*args, **meta, **_heuristic(which, S, L, meta["BLOCK_D"]))


@functools.lru_cache(maxsize=None)
def _tuned(which: str):
    if which == "fwd":
        return triton.autotune(_FWD_CONFIGS, key=["BLOCK_D", "BLOCK_L", "S_BUCKET", "DOT_PREC", "UPCAST"],
                               prune_configs_by={"early_config_prune": _prune})(_resampler_fwd)
    return triton.autotune(_BWD_CONFIGS, key=["BLOCK_D", "BLOCK_L", "S_BUCKET", "DOT_PREC", "UPCAST"],
                           prune_configs_by={"early_config_prune": _prune},
                           reset_to_zero=None)(_resampler_bwd)


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE products (TF32 would miss the fp32 tolerances); ignored for 16-bit
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q: Tensor, k_x: Tensor, v_x: Tensor, k_l: Tensor, v_l: Tensor) -> None:
    if not supported(q):
        raise TypeError(f"resampler triton kernel: expected q of dtype float32/bfloat16/float16 and "
                        f"head dim <= 256, got {q.dtype}, dh={q.shape[-1]}")
    for t in (k_x, v_x, k_l, v_l):
        if t.device != q.device or t.dtype != q.dtype:
            raise TypeError(f"resampler triton kernel: expected every input on {q.device} in {q.dtype}, "
                            f"got {t.device} {t.dtype}")


def resampler_attention_fwd(q: Tensor, k_x: Tensor, v_x: Tensor, k_l: Tensor, v_l: Tensor,
                            scale: float) -> Tensor:
    """(N, L, H, dh) output (contiguous, q's dtype); inputs of any strides."""
    _check(q, k_x, v_x, k_l, v_l)
    N, L, H, dh = q.shape
    S = k_x.shape[1]
    out = torch.empty((N, L, H, dh), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    BLOCK_L = min(MAX_BWD_L, max(16, next_power_of_2(L)))
    BLOCK_D = max(16, next_power_of_2(dh))
    args = (q, k_x, v_x, k_l, v_l, out, *q.stride(), *k_x.stride(), *v_x.stride(), *k_l.stride(),
            *v_l.stride(), out.stride(0), out.stride(1), out.stride(2),
            H, L, S, float(scale) * LOG2E, _s_bucket(S))
    meta = dict(HEAD_DIM=dh, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, DOT_PREC=_dot_prec(q.dtype),
                UPCAST=interpreting() and q.dtype == torch.bfloat16)
    _launch("fwd", (N * H, cdiv(L, BLOCK_L)), args, meta, S, L, N * H * L)
    return out


def resampler_attention_bwd(grad_out: Tensor, q: Tensor, k_x: Tensor, v_x: Tensor, k_l: Tensor,
                            v_l: Tensor, scale: float) -> Tuple[Tensor, ...]:
    """(dq, dk_x, dv_x, dk_l, dv_l), each contiguous with its input's shape and dtype.
    Requires L <= 128 (:func:`backward_supported`)."""
    _check(q, k_x, v_x, k_l, v_l)
    N, L, H, dh = q.shape
    S = k_x.shape[1]
    if L > MAX_BWD_L:
        raise ValueError(f"resampler triton backward: expected at most {MAX_BWD_L} latents, got {L}")
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    dq = torch.empty((N, L, H, dh), device=q.device, dtype=q.dtype)
    dk_x = torch.empty((N, S, H, dh), device=q.device, dtype=q.dtype)
    dv_x = torch.empty_like(dk_x)
    dk_l = torch.empty_like(dq)
    dv_l = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk_x.zero_(), dv_x.zero_(), dk_l, dv_l
    BLOCK_L = max(16, next_power_of_2(L))
    BLOCK_D = max(16, next_power_of_2(dh))
    args = (q, k_x, v_x, k_l, v_l, grad_out, dq, dk_x, dv_x, dk_l, dv_l,
            *q.stride(), *k_x.stride(), *v_x.stride(), *k_l.stride(), *v_l.stride(), *grad_out.stride(),
            H, L, S, float(scale) * LOG2E, float(scale), _s_bucket(S))
    meta = dict(HEAD_DIM=dh, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, DOT_PREC=_dot_prec(q.dtype),
                UPCAST=interpreting() and q.dtype == torch.bfloat16)
    _launch("bwd", (N * H,), args, meta, S, L, N * H * L)
    return dq, dk_x, dv_x, dk_l, dv_l


__all__ = ["resampler_attention_fwd", "resampler_attention_bwd", "supported", "backward_supported",
           "MAX_BWD_L"]
