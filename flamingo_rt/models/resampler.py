"""The Perceiver Resampler: each medium's feature grid -> ``num_latents`` tokens."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import norm_project_iter, resampler_attention_kvpacked
from ..ops.feed_forward import module_feed_forward
from ..ops.linear import Linear
from ..ops.fused_linear import linear_packed, linear_residual
from .config import ResamplerConfig
from .ff import FeedForward


def frame_embeddings(frame_embs: Optional[torch.Tensor], num_frames: int) -> torch.Tensor:
    """(num_frames, D) temporal embeddings from the learned ``frame_embs`` (T, D), in their dtype.

    Contract (``T`` = ``max_num_frames``, the number of learned embeddings):

    - ``num_frames <= T``: the first ``num_frames`` learned embeddings, unchanged
      (a still image, F = 1, gets embedding 0; as OpenFlamingo).
    - ``num_frames > T``: the T learned embeddings are linearly interpolated over the
      frame axis onto ``num_frames`` evenly spaced points with the end points aligned
      (frame 0 gets embedding 0, the last frame embedding T - 1; frame f samples the
      learned sequence at position f * (T - 1) / (num_frames - 1)), so a model trained
      on 8 frames evaluates 30-frame clips as the paper does. Computed in float32.
    - ``num_frames < 1`` is an error; so is a resampler without temporal embeddings
      (``frame_embs=None``, ``max_num_frames=None``; its clips get no temporal embedding).
    """
    if frame_embs is None:
        raise ValueError("this resampler has no temporal embeddings (max_num_frames=None)")
    if num_frames < 1:  # (no int(): num_frames may be symbolic under torch.export)
        raise ValueError(f"expected at least 1 frame per medium, got {num_frames}")
    fe = frame_embs
    if num_frames <= fe.shape[0]:
        return fe[:num_frames]
    return F.interpolate(
        fe.float().t()[None], size=num_frames, mode="linear", align_corners=True
    )[0].t().to(fe.dtype)


class MediaEmbeddings(nn.Module):
    """What every resampler kind shares: the optional learned temporal embeddings
    (``frame_embs`` (max_num_frames, D)), per-medium time embeddings (``media_time_embs``
    (max_num_media, 1, D), OpenFlamingo's) and spatial embeddings (``spatial_embs``
    (max_num_spatial, D), one per feature position of a frame), and the features with them
    added."""

    def _init_media_embeddings(self, cfg: ResamplerConfig) -> None:
        # called by subclasses after any parameter drawn earlier (the draw order fixes the init)
        self.frame_embs = (
            nn.Parameter(torch.randn(cfg.max_num_frames, cfg.dim)) if cfg.max_num_frames else None
        )
        self.media_time_embs = (
            nn.Parameter(torch.randn(cfg.max_num_media, 1, cfg.dim)) if cfg.max_num_media else None
        )
        self.spatial_embs = None  # drawn by _init_spatial_embeddings, after every other parameter

    def _init_spatial_embeddings(self, cfg: ResamplerConfig) -> None:
        # called last by subclasses: turning the option on leaves the other parameters' init as it was
        if cfg.max_num_spatial:
            self.spatial_embs = nn.Parameter(torch.randn(cfg.max_num_spatial, cfg.dim))

    def frame_embeddings(self, num_frames: int) -> torch.Tensor:
        """(num_frames, D) temporal embeddings: :func:`frame_embeddings` of ``frame_embs``."""
        return frame_embeddings(self.frame_embs, num_frames)

    def media_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, M, F, S, D) or (B, M, S, D) -> (B, M, F*S, D) with the spatial
        embeddings (when there are) added per feature position, the temporal embeddings (when
        there are) per frame and the per-medium time embeddings (when there are) per medium:
        the keys every resampler kind reads."""
        dim = self.config.dim
        if x.dim() == 4:
            x = x.unsqueeze(2)
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point media features, got {x.dtype}")
        if x.dim() != 5 or x.shape[-1] != dim:
            raise ValueError(
                f"expected media features of shape (B, M, F, S, {dim}) or (B, M, S, {dim}), got {tuple(x.shape)}"
            )
        B, M, Fr, S, _ = x.shape
        if Fr < 1:
            raise ValueError(f"expected at least 1 frame per medium, got features of shape {tuple(x.shape)}")
        if self.spatial_embs is not None:
            if S > self.spatial_embs.shape[0]:
                raise ValueError(
                    f"expected at most {self.spatial_embs.shape[0]} features per frame (max_num_spatial), "
                    f"got features of shape {tuple(x.shape)}"
                )
            x = x + self.spatial_embs[:S].to(x.dtype)[None, None, None]
        if self.frame_embs is not None:
            x = x + self.frame_embeddings(Fr).to(x.dtype)[None, None, :, None, :]
        x = x.reshape(B, M, Fr * S, dim)
        if self.media_time_embs is not None:
            if M > self.media_time_embs.shape[0]:
                raise ValueError(
                    f"expected at most {self.media_time_embs.shape[0]} media per sequence "
                    f"(max_num_media), got {M}"
                )
            x = x + self.media_time_embs[:M].to(x.dtype)
        return x


class PerceiverAttention(nn.Module):
    """Latents attend to concat(LN(features), LN(latents)), one call for all media.

    ``to_kv`` is one Linear producing [K | V] (as OpenFlamingo), applied to features and
    latents separately so their concatenation is never built. The features' [K | V]
    (``kv_x``, (N, S, 2*H*dh)) may be passed in precomputed: :class:`PerceiverResampler`
    computes those of all layers at once (:func:`~flamingo_rt.ops.norm_project`).
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = Linear(dim, inner, bias=False)
        self.to_kv = Linear(dim, 2 * inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, backend: Optional[str] = None,
                kv_x: Optional[torch.Tensor] = None, residual: bool = False) -> torch.Tensor:
        """x: (N, S, D) features; latents: (N, L, D); kv_x: optional
        ``to_kv(norm_media(x))`` (N, S, 2*H*dh). Returns (N, L, D): the attention's output,
        or with ``residual`` latents + that (in inference the add is to_out's oneDNN post-op
        where it runs: :func:`~flamingo_rt.ops.fused_linear.linear_residual`)."""
        n, S, _ = x.shape
        L = latents.shape[1]
        H, dh = self.heads, self.dim_head
        ln = self.norm_latents(latents)
        # (inference: the packed-weight oneDNN products, fused_linear.linear_packed)
        q = linear_packed(ln, self.to_q.weight, self.to_q.bias).view(n, L, H, dh)
        if kv_x is None:
            kv_x = linear_packed(self.norm_media(x), self.to_kv.weight, self.to_kv.bias)
        kv_l = linear_packed(ln, self.to_kv.weight, self.to_kv.bias).view(n, L, 2, H, dh)
        # [K | V] as to_kv made them; their gradients come back in that layout (no stack)
        out = resampler_attention_kvpacked(q, kv_x.view(n, S, 2, H, dh), kv_l, scale=dh ** -0.5,
                                           backend=backend).reshape(n, L, H * dh)
        if residual:
            return linear_residual(out, self.to_out.weight, self.to_out.bias, latents)
        return self.to_out(out)


class ResamplerLayer(nn.Module):
    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.attn = PerceiverAttention(cfg.dim, cfg.heads, cfg.dim_head)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, cfg.ff_kind)

    def forward(self, x, latents, backend=None, kv_x=None):
        latents = self.attn(x, latents, backend, kv_x, residual=True)
        return module_feed_forward(self.ff, latents, residual=True)


class PerceiverResampler(MediaEmbeddings):
    """Perceiver Resampler (Flamingo section 2.1).

    Input features (B, M, F, S, D) — B sequences, M media each, F frames per medium
    (F = 1 for stills), S feature tokens per frame of width D — or (B, M, S, D) for stills.
    Output (B, M, num_latents, D), in the input's dtype.

    Optional learned temporal embeddings (``max_num_frames``) are added per frame; when a
    clip has more frames than were trained, they are linearly interpolated over time
    (the paper trains on 8 frames and evaluates on 30; see :func:`frame_embeddings`).
    The F frames of a medium are then one set of F*S keys: every medium (image or clip)
    is one attention problem, all of them in one kernel launch per layer.
    ``max_num_media`` adds OpenFlamingo's per-medium time embeddings.
    """

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.config = cfg
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim))
        self._init_media_embeddings(cfg)
        self.layers = nn.ModuleList([ResamplerLayer(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self._init_spatial_embeddings(cfg)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        # CPU inference: the activations come from the block cache (cpu_cache.inference_scope):
        # glibc maps every block of 32 MiB or more anew, which OpenFlamingo's shapes hit
        # exactly (32 images: each layer's features [K | V] and FF pre-activation, 8192 x 1024
        # and 2048 x 4096 float32), a page fault per 4 KiB at every call
        from ..runtime import cpu_cache  # (here: flamingo_rt.runtime imports the models)

        with cpu_cache.inference_scope(x):
            return self._forward(x, backend)

    def _forward(self, x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
        D = self.config.dim
        x = self.media_features(x)
        B, M, N, _ = x.shape
        x = x.reshape(B * M, N, D)
        # a real copy (tiny): a no-grad view of a leaf confuses module hooks (FlopCounterMode)
        latents = self.latents.to(x.dtype).repeat(B * M, 1, 1)
        for layer, kv_x in zip(self.layers, self.media_kv(x)):
            latents = layer(x, latents, backend, kv_x)
        # the norm of the (B, M, L, D) view, not a view of its output: an FSDP2-wrapped
        # resampler returning a view is warned about
        return self.norm(latents.view(B, M, -1, D))

    def media_kv(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """``layer.attn.to_kv(layer.attn.norm_media(x))`` for each layer, in order, each
        computed when taken, for features x (N, S, D), each (N, S, 2*H*dh): with one set of
        LayerNorm statistics and, in the backward, one matrix product per layer instead of
        two (:func:`~flamingo_rt.ops.norm_project_iter`; the features themselves get a
        gradient only when they need one; each layer's projection backward runs right after
        the layer's, freeing its K/V gradient)."""
        attns = [layer.attn for layer in self.layers]
        norms = [a.norm_media for a in attns]
        if any(nm.weight is None or nm.bias is None or nm.eps != norms[0].eps for nm in norms) or any(
            a.to_kv.bias is not None for a in attns
        ):
            return (a.to_kv(a.norm_media(x)) for a in attns)
        return norm_project_iter(x, [nm.weight for nm in norms], [nm.bias for nm in norms],
                                 [a.to_kv.weight for a in attns], eps=norms[0].eps)

    @classmethod
    def from_open_flamingo(cls, module: nn.Module, ff_kind: str = "gelu") -> "PerceiverResampler":
        """A resampler with the weights of an open_flamingo ``PerceiverResampler``."""
        sd = module.state_dict()
        layer0 = module.layers[0][0]
        dim = module.latents.shape[1]
        cfg = ResamplerConfig(
            dim=dim,
            depth=len(module.layers),
            heads=layer0.heads,
            dim_head=layer0.to_q.out_features // layer0.heads,
            num_latents=module.latents.shape[0],
            ff_mult=module.layers[0][1][1].out_features // dim,
            ff_kind=ff_kind,
            max_num_frames=None if module.frame_embs is None else module.frame_embs.shape[0],
            max_num_media=None if module.media_time_embs is None else module.media_time_embs.shape[0],
        )
        ours = cls(cfg).to(module.latents.dtype)
        new = {"latents": sd["latents"], "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
        for name in ("frame_embs", "media_time_embs"):
            if name in sd:
                new[name] = sd[name]
        for i, layer in enumerate(ours.layers):
            for n in ("norm_media", "norm_latents", "to_q", "to_kv", "to_out"):
                for p in ("weight", "bias"):
                    key = f"layers.{i}.0.{n}.{p}"
                    if key in sd:
                        new[f"layers.{i}.attn.{n}.{p}"] = sd[key]
            for k, v in layer.ff.load_open_flamingo(sd, f"layers.{i}.1.").items():
                new[f"layers.{i}.ff.{k}"] = v
        ours.load_state_dict(new, strict=True)
        return ours
