"""GATED XATTN-DENSE: tanh-gated, image-causal cross-attention plus a gated feed-forward."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..ops.linear import Linear

from ..ops import image_causal_attention
from ..ops.feed_forward import module_feed_forward
from .ff import FeedForward
from .media import num_media_tensor, resolve_media_index


class MaskedCrossAttention(nn.Module):
    """Text queries (from LN(x)) attend to the visual tokens of their image.

    ``to_kv`` maps media tokens (width ``dim_visual``) to [K | V]; media are not normed
    (as OpenFlamingo). Keys/values are computed once per medium (:meth:`media_kv`) and
    can be passed in precomputed (the runtime's media cache).
    """

    def __init__(self, dim: int, dim_visual: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = Linear(dim, inner, bias=False)
        self.to_kv = Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)

    def media_kv(self, media: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """media (B, M, N, Dv) -> keys, values, each (B, M, N, H, dh)."""
        B, M, N, _ = media.shape
        return self.to_kv(media).view(B, M, N, 2, self.heads, self.dim_head).unbind(3)

    def forward(self, x, kv, media_index, all_previous=False, backend=None):
        """x (B, T, D); kv: keys, values (B, M, N, H, dh); media_index (B, T) -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.to_q(self.norm(x)).view(B, T, self.heads, self.dim_head)
        k, v = kv
        out = image_causal_attention(
            q, k, v, media_index, all_previous=all_previous, scale=self.dim_head ** -0.5, backend=backend
        )
        return self.to_out(out.reshape(B, T, self.heads * self.dim_head))


class GatedCrossAttentionBlock(nn.Module):
    """y = x + tanh(attn_gate) * XAttn(x, media);  z = y + tanh(ff_gate) * FF(y).

    Gates start at 0, so a fresh block is the identity (to the last bit). ``gated=False``
    (the paper's "no tanh gating" ablation) drops both gates: y = x + XAttn(x, media),
    z = y + FF(y); the block then has no gate parameters.

    Args:
        dim: text width D; dim_visual: media token width Dv.
        heads, dim_head: cross-attention heads.
        ff_mult, ff_kind: feed-forward width multiple and ``"gelu"`` / ``"sqrelu"``.
        all_previous: False (default, image-causal): a token sees only the tokens of the
            latest image at or before it; True: all images up to it (ablation).
        gated: tanh gates on both residual branches (default) or none (ablation).
    """

    def __init__(self, dim: int, dim_visual: int, heads: int = 8, dim_head: int = 64,
                 ff_mult: int = 4, ff_kind: str = "gelu", all_previous: bool = False, gated: bool = True):
        super().__init__()
        self.dim, self.dim_visual = dim, dim_visual
        self.all_previous, self.gated = all_previous, gated
        self.attn = MaskedCrossAttention(dim, dim_visual, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult, ff_kind)
        if gated:
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.ff_gate = nn.Parameter(torch.zeros(1))

    def gate(self, name: str, dtype: torch.dtype):
        """tanh of the gate parameter ``name`` ("attn_gate" / "ff_gate") in ``dtype``, or
        the plain number 1 for an ungated block."""
        return getattr(self, name).tanh().to(dtype) if self.gated else 1

    def forward(
        self,
        x: torch.Tensor,
        media: Optional[torch.Tensor] = None,
        media_locations: Optional[torch.Tensor] = None,
        media_index: Optional[torch.Tensor] = None,
        num_media: Union[int, torch.Tensor, None] = None,
        media_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        backend: Optional[str] = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, T, D) text hidden states.
            media: (B, M, N, Dv) media tokens (from the resampler), or None when the batch
                has no media (the attention then contributes exactly 0; the FF still applies).
            media_locations: (B, T) bool, True at ``<image>`` tokens; or
            media_index: (B, T) int, precomputed index of each token's image (-1: none).
            num_media: images actually supplied per row (int or (B,)), default M; a row
                with more ``<image>`` tokens than that is an error.
            media_kv: precomputed ``self.attn.media_kv(media)`` (keys, values), instead of media.
            backend: op backend (see :mod:`flamingo_rt.ops.backend`).
            validate: check the media index against the images supplied (a host sync);
                callers that validated once per batch (``Flamingo``) pass False.
        Returns:
            (B, T, D) in x's dtype.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, T, {self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if media is not None and media_kv is None:
            if media.dim() != 4 or media.shape[0] != B or media.shape[-1] != self.dim_visual:
                raise ValueError(
                    f"expected media of shape ({B}, M, N, {self.dim_visual}), got {tuple(media.shape)}"
                )
            media_kv = self.attn.media_kv(media)
        if media_kv is not None:
            M = media_kv[0].shape[1]
            if validate or media_index is None:
                idx = resolve_media_index(
                    media_locations, media_index, num_media_tensor(num_media, B, M, x.device)
                )
            else:
                idx = media_index
            if idx.shape != (B, T):
                raise ValueError(f"expected media index/locations of shape ({B}, {T}), got {tuple(idx.shape)}")
            attn = self.attn(x, media_kv, idx, self.all_previous, backend)
            x = self._gated_add(x, "attn_gate", attn)
        else:
            if media_locations is not None and not torch.compiler.is_compiling() and bool(media_locations.any()):
                raise ValueError(
                    "batch has <image> tokens but no media were supplied; expected media of shape (B, M, N, Dv)"
                )
        return self._gated_add(x, "ff_gate", module_feed_forward(self.ff, x))

    def _gated_add(self, x: torch.Tensor, gate: str, y: torch.Tensor) -> torch.Tensor:
        """x + tanh(gate) * y in one pass (``addcmul``; in x's dtype when y is a lower-precision
        autocast output): the (T, D) product is never written out. Exact gate gradient
        (autograd of addcmul: sum(dz * y))."""
        if not self.gated:
            return x + y
        return torch.addcmul(x, self.gate(gate, x.dtype), y)

    @classmethod
    def from_open_flamingo(cls, module: nn.Module, ff_kind: str = "gelu") -> "GatedCrossAttentionBlock":
        """A block with the weights of an open_flamingo ``GatedCrossAttentionBlock``."""
        a = module.attn
        dim = a.norm.normalized_shape[0]
        ours = cls(
            dim=dim,
            dim_visual=a.to_kv.in_features,
            heads=a.heads,
            dim_head=a.to_q.out_features // a.heads,
            ff_mult=module.ff[1].out_features // dim,
            ff_kind=ff_kind,
            all_previous=not a.only_attend_immediate_media,
        ).to(a.to_q.weight.dtype)
        sd = module.state_dict()
        new = {
            "attn_gate": sd["attn_gate"],
            "ff_gate": sd["ff_gate"],
            "attn.norm.weight": sd["attn.norm.weight"],
            "attn.norm.bias": sd["attn.norm.bias"],
            "attn.to_q.weight": sd["attn.to_q.weight"],
            "attn.to_kv.weight": sd["attn.to_kv.weight"],
            "attn.to_out.weight": sd["attn.to_out.weight"],
        }
        for k, v in ours.ff.load_open_flamingo(sd, "ff.").items():
            new[f"ff.{k}"] = v
        ours.load_state_dict(new, strict=True)
        return ours
