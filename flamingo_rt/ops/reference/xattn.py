"""Reference image-causal cross-attention (DESIGN.md section 1)."""
from __future__ import annotations

import torch


def media_index_from_locations(media_locations: torch.Tensor) -> torch.Tensor:
    """Media index of every token.

    Args:
        media_locations: (B, T) bool, True at each ``<image>`` token.

    Returns:
        (B, T) int32: index of the most recent ``<image>`` at or before each token,
        -1 before the first one.
    """
    return (media_locations.to(torch.int32).cumsum(dim=-1, dtype=torch.int32) - 1)


def _masked_probs(q, k, media_index, all_previous, scale, ct):
    """(B, H, T, M*N) attention probabilities in dtype ``ct``; rows without media are 0."""
    B, T, H, dh = q.shape
    M, N = k.shape[1], k.shape[2]
    qf = q.to(ct)
    kf = k.to(ct).reshape(B, M * N, H, dh)
    scores = torch.einsum("bthd,bjhd->bhtj", qf, kf) * scale  # (B, H, T, M*N)
    img = torch.arange(M, device=q.device).repeat_interleave(N)  # (M*N,)
    idx = media_index.to(torch.long)
    if all_previous:
        allowed = img[None, None, :] <= idx[:, :, None]
    else:
        allowed = img[None, None, :] == idx[:, :, None]  # (B, T, M*N)
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(ct).min)
    probs = torch.softmax(scores, dim=-1)
    has_media = (idx >= 0).to(ct)[:, None, :, None]  # (B, 1, T, 1)
    return probs * has_media


def image_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_index: torch.Tensor,
    all_previous: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of text queries to the visual tokens of their image.

    Args:
        q: (B, T, H, dh) queries, any float dtype.
        k, v: (B, M, N, H, dh) keys and values of the N visual tokens of each of M media.
        media_index: (B, T) integer, index into M of each token's image, -1 for none.
            Values must lie in [-1, M).
        all_previous: False (image-causal, the default): token t sees the N tokens of
            image ``media_index[t]``. True: it sees every image ``m <= media_index[t]``.
        scale: softmax scale, default ``dh ** -0.5``.

    Returns:
        (B, T, H, dh) in q's dtype. Rows with ``media_index == -1`` are exactly 0.
    Accumulates in float32 (float64 for float64 inputs).
    """
    B, T, H, dh = q.shape
    M, N = k.shape[1], k.shape[2]
    if scale is None:
        scale = dh ** -0.5
    ct = torch.promote_types(q.dtype, torch.float32)
    probs = _masked_probs(q, k, media_index, all_previous, scale, ct)
    vf = v.to(ct).reshape(B, M * N, H, dh)
    out = torch.einsum("bhtj,bjhd->bthd", probs, vf)
    return out.to(q.dtype)


def image_causal_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_index: torch.Tensor,
    all_previous: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`image_causal_attention` given ``grad_out`` (B, T, H, dh).

    With P the masked probabilities (rows without media all zero):
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dK = scale dS^T Q.
    Each gradient has the dtype and shape of its input.
    """
    B, T, H, dh = q.shape
    M, N = k.shape[1], k.shape[2]
    if scale is None:
        scale = dh ** -0.5
    ct = torch.promote_types(q.dtype, torch.float32)
    probs = _masked_probs(q, k, media_index, all_previous, scale, ct)
    do = grad_out.to(ct)
    kf = k.to(ct).reshape(B, M * N, H, dh)
    vf = v.to(ct).reshape(B, M * N, H, dh)
    dv = torch.einsum("bhtj,bthd->bjhd", probs, do)
    dp = torch.einsum("bthd,bjhd->bhtj", do, vf)
    ds = probs * (dp - (dp * probs).sum(dim=-1, keepdim=True))
    dq = torch.einsum("bhtj,bjhd->bthd", ds, kf) * scale
    dk = torch.einsum("bhtj,bthd->bjhd", ds, q.to(ct)) * scale
    return (
        dq.to(q.dtype),
        dk.reshape(k.shape).to(k.dtype),
        dv.reshape(v.shape).to(v.dtype),
    )
