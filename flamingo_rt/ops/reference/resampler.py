"""Reference Perceiver Resampler attention."""
from __future__ import annotations

import torch


def resampler_attention(
    q: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    k_l: torch.Tensor,
    v_l: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Latent queries attending to concat(media features, latents).

    Args:
        q: (N, L, H, dh) queries from the L latents of each of N media.
        k_x, v_x: (N, S, H, dh) keys/values from the S feature tokens of each medium.
        k_l, v_l: (N, L, H, dh) keys/values from the latents.
        scale: softmax scale, default ``dh ** -0.5``.

    Returns:
        (N, L, H, dh) in q's dtype; the keys are ``cat(k_x, k_l)`` in that order.
    Accumulates in float32 (float64 for float64 inputs).
    """
    dh = q.shape[-1]
    if scale is None:
        scale = dh ** -0.5
    ct = torch.promote_types(q.dtype, torch.float32)
    probs = _probs(q, k_x, k_l, scale, ct)
    v = torch.cat((v_x, v_l), dim=1).to(ct)
    out = torch.einsum("nhls,nshd->nlhd", probs, v)
    return out.to(q.dtype)


def _probs(q, k_x, k_l, scale, ct):
    k = torch.cat((k_x, k_l), dim=1).to(ct)
    scores = torch.einsum("nlhd,nshd->nhls", q.to(ct), k) * scale
    return torch.softmax(scores, dim=-1)


def resampler_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    k_l: torch.Tensor,
    v_l: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk_x, dv_x, dk_l, dv_l) of :func:`resampler_attention`.

    ``grad_out`` is (N, L, H, dh); each gradient has its input's dtype and shape.
    """
    dh = q.shape[-1]
    if scale is None:
        scale = dh ** -0.5
    S = k_x.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    probs = _probs(q, k_x, k_l, scale, ct)
    k = torch.cat((k_x, k_l), dim=1).to(ct)
    v = torch.cat((v_x, v_l), dim=1).to(ct)
    do = grad_out.to(ct)
    dp = torch.einsum("nlhd,nshd->nhls", do, v)
    ds = probs * (dp - (dp * probs).sum(dim=-1, keepdim=True))
    dq = torch.einsum("nhls,nshd->nlhd", ds, k) * scale
    qf = q.to(ct)

    def grads_of(sl):  # fresh (non-aliasing) dK, dV for the key range ``sl``
        dk_ = torch.einsum("nhls,nlhd->nshd", ds[..., sl], qf) * scale
        dv_ = torch.einsum("nhls,nlhd->nshd", probs[..., sl], do)
        return dk_, dv_

    dk_x, dv_x = grads_of(slice(0, S))
    dk_l, dv_l = grads_of(slice(S, None))
    return (
        dq.to(q.dtype),
        dk_x.to(k_x.dtype),
        dv_x.to(v_x.dtype),
        dk_l.to(k_l.dtype),
        dv_l.to(v_l.dtype),
    )
