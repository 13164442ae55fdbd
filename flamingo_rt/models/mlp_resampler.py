"""The paper's MLP ablation of the Perceiver Resampler (Flamingo, Table 3 "Resampler: MLP")."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.feed_forward import module_feed_forward
from .config import ResamplerConfig
from .ff import FeedForward
from .resampler import MediaEmbeddings


class MLPResampler(MediaEmbeddings):
    """Media features -> ``num_latents`` tokens without attention.

    Input features (B, M, F, S, D) or (B, M, S, D), as :class:`PerceiverResampler`; the
    same optional temporal (``max_num_frames``) and per-medium (``max_num_media``)
    embeddings are added. Then ``depth`` residual feed-forward layers (LayerNorm, Linear,
    GELU or squared ReLU, Linear; ``ff_mult``) act on every feature token on its own, the
    F*S tokens of each medium are average-pooled along the token axis to ``num_latents``
    (``adaptive_avg_pool1d``: neighbouring tokens averaged when F*S > num_latents, tokens
    repeated when fewer), and a final LayerNorm. Output (B, M, num_latents, D) in the
    input's dtype, so the runtime's caches and the cross-attention see the shapes a
    Perceiver Resampler gives. ``heads``/``dim_head`` of the config are unused.
    """

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        if cfg.kind != "mlp":
            raise ValueError(f"expected a resampler config of kind 'mlp', got {cfg.kind!r}")
        self.config = cfg
        self._init_media_embeddings(cfg)
        self.layers = nn.ModuleList([FeedForward(cfg.dim, cfg.ff_mult, cfg.ff_kind) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self._init_spatial_embeddings(cfg)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """x (B, M, F, S, D) or (B, M, S, D) -> (B, M, num_latents, D). ``backend`` is taken
        for :class:`PerceiverResampler`'s signature; there is no attention op to route."""
        D, L = self.config.dim, self.config.num_latents
        x = self.media_features(x)
        B, M, N, _ = x.shape
        x = x.reshape(B * M, N, D)
        for ff in self.layers:
            x = module_feed_forward(ff, x, residual=True)
        pooled = F.adaptive_avg_pool1d(x.transpose(1, 2), L).transpose(1, 2)
        return self.norm(pooled).reshape(B, M, L, D)
