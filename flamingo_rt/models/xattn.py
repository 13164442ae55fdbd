"""GATED XATTN-DENSE: tanh-gated, image-causal cross-attention plus a gated feed-forward."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..ops.linear import Linear

from ..ops import image_causal_attention, norm_project
from ..ops.feed_forward import module_feed_forward
from ..ops.gated_linear_residual import module_gated_linear_residual
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

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> q (B, T, H, dh) = to_q(norm(x)). When a gradient will be taken (eager),
        through :func:`~flamingo_rt.ops.norm_project`, which keeps x (the residual stream
        holds it anyway) instead of the normalized copy the Linear would keep."""
        B, T, _ = x.shape
        n, w = self.norm, self.to_q.weight
        if (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or n.weight.requires_grad)
                and self.to_q.bias is None and not torch.compiler.is_compiling()):
            q = norm_project(x, [n.weight], [n.bias], [w], n.eps)[0]
        else:
            q = self.to_q(n(x))
        return q.view(B, T, self.heads, self.dim_head)

    def attend(self, x, kv, media_index, all_previous=False, backend=None):
        """x (B, T, D); kv: keys, values (B, M, N, H, dh); media_index (B, T) -> the attention
        output before ``to_out``, (B, T, H * dh)."""
        B, T, _ = x.shape
        k, v = kv
        out = image_causal_attention(
            self.queries(x), k, v, media_index, all_previous=all_previous, scale=self.dim_head ** -0.5,
            backend=backend,
        )
        return out.reshape(B, T, self.heads * self.dim_head)

    def forward(self, x, kv, media_index, all_previous=False, backend=None):
        """x (B, T, D); kv: keys, values (B, M, N, H, dh); media_index (B, T) -> (B, T, D)."""
        return self.to_out(self.attend(x, kv, media_index, all_previous, backend))


#: blocks called with fewer rows (B*T: decoding) run outside the CPU block cache's scope
CACHE_MIN_ROWS = 64


class GatedCrossAttentionBlock(nn.Module):
    """y = x + tanh(attn_gate) * XAttn(x, media);  z = y + tanh(ff_gate) * FF(y).

    In training each branch's output projection and gated add is one op
    (:func:`~flamingo_rt.ops.gated_linear_residual`, :func:`~flamingo_rt.ops.feed_forward`
    with ``residual``): neither branch's (T, D) output is kept for its gate's gradient, the
    queries keep x instead of LN(x) (:func:`~flamingo_rt.ops.norm_project`), and the FF's
    backward runs over chunks of rows. Exact gate gradients throughout.

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
        # CPU inference (prefill, cpu_cache.inference_scope): the large tensors come from the
        # block cache: the FF's pre-activation is (B*T, 4 D) -- 64 MiB at OpenFlamingo-3B's
        # width and 2048 tokens, which glibc maps anew (a page fault per 4 KiB) at every call.
        # Not for decode-sized calls (fewer than CACHE_MIN_ROWS rows: small tensors)
        from ..runtime import cpu_cache  # (here: flamingo_rt.runtime imports the models)

        with cpu_cache.inference_scope(x, min_rows=CACHE_MIN_ROWS):
            return self._forward(x, media, media_locations, media_index, num_media, media_kv, backend, validate)

    def _forward(self, x, media, media_locations, media_index, num_media, media_kv, backend, validate):
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
            o = self.attn.attend(x, media_kv, idx, self.all_previous, backend)
            gate = self.gate("attn_gate", x.dtype) if self.gated else None
            x = module_gated_linear_residual(self.attn.to_out, x, o, gate)
        else:
            if media_locations is not None and not torch.compiler.is_compiling() and bool(media_locations.any()):
                raise ValueError(
                    "batch has <image> tokens but no media were supplied; expected media of shape (B, M, N, Dv)"
                )
        gate = self.gate("ff_gate", x.dtype) if self.gated else None
        return module_feed_forward(self.ff, x, residual=True, gate=gate)

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
