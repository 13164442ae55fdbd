"""Support selection: RICES (retrieval of nearest support images) and random.

RICES (Yang et al. 2022, used by Flamingo for its few-shot evaluations): from a pool of
candidate support examples, take the ones whose images look most like the query, judged
by cosine similarity of the frozen vision encoder's pooled features. The pool's features
are computed once (:class:`RicesIndex` holds them) and reused for every query and shot
count. Selected examples are returned least similar first, so the most similar one sits
right before the query in the prompt (as OpenFlamingo orders them).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.flamingo import Flamingo
from ..runtime.prompt import MediaLike, preprocess_media

__all__ = ["pooled_features", "RicesIndex", "random_support"]


@torch.no_grad()
def pooled_features(model: Flamingo, media: Sequence[MediaLike], batch_size: int = 64) -> torch.Tensor:
    """Pooled vision features of images / clips.

    Each medium is preprocessed like a prompt's (resized, normalised), every frame goes
    through ``model.vision_encoder`` ((N, 3, S, S) -> (N, S', Dv)), the tokens are averaged
    over the S' grid cells and then over the frames of a clip, and the result is L2
    normalised. Returns (len(media), Dv) float32 on the CPU.
    """
    if len(media) == 0:
        raise ValueError("expected at least one image or clip, got none")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    p = next(model.parameters())
    frames = [preprocess_media(m, model.config.vision) for m in media]  # each (F, 3, S, S)
    counts = [f.shape[0] for f in frames]
    flat = torch.cat(frames)
    pooled = []
    for i in range(0, flat.shape[0], batch_size):
        tokens = model.vision_encoder(flat[i:i + batch_size].to(p.device, p.dtype))  # (n, S', Dv)
        if tokens.dim() != 3:
            raise ValueError(f"expected the vision encoder to return (N, S, Dv) tokens, got {tuple(tokens.shape)}")
        pooled.append(tokens.float().mean(1).cpu())
    per_frame = torch.cat(pooled)  # (total frames, Dv)
    per_media = torch.stack([x.mean(0) for x in per_frame.split(counts)])
    return F.normalize(per_media, dim=-1)


class RicesIndex:
    """A support pool with its features, computed once at construction.

    Args:
        model: the Flamingo model whose vision encoder judges similarity.
        pool: the pool's media (images (3, H, W) / clips (F, 3, H, W), any prompt media).
        labels: optional class of each pool item (for per-class selection).
        features: precomputed (len(pool), Dv) features, L2-normalised (skips the encoder).
    """

    def __init__(self, model: Flamingo, pool: Sequence[MediaLike], labels: Optional[Sequence[int]] = None,
                 features: Optional[torch.Tensor] = None, batch_size: int = 64):
        self.model = model
        self.size = len(pool)
        if labels is not None and len(labels) != self.size:
            raise ValueError(f"expected one label per pool item ({self.size}), got {len(labels)}")
        self.labels = None if labels is None else np.asarray(labels)
        if features is None:
            features = pooled_features(model, pool, batch_size)
        elif features.shape[0] != self.size:
            raise ValueError(f"expected features of shape ({self.size}, Dv), got {tuple(features.shape)}")
        self.features = features  # (P, Dv) float32, unit rows

    def similarities(self, query: MediaLike) -> torch.Tensor:
        """Cosine similarity of the query to every pool item: (P,) float32."""
        q = pooled_features(self.model, [query])[0]
        return self.features @ q

    def select(self, query: MediaLike, k: int, per_class: bool = False) -> List[int]:
        """Indices of the ``k`` pool items nearest to ``query`` (or, with ``per_class``, the
        ``k`` nearest of each class), ordered from least to most similar."""
        if k < 0:
            raise ValueError(f"expected k >= 0, got {k}")
        if k == 0:
            return []
        sim = self.similarities(query)
        if not per_class:
            if k > self.size:
                raise ValueError(f"expected k <= pool size {self.size}, got {k}")
            chosen = torch.topk(sim, k).indices.tolist()
        else:
            if self.labels is None:
                raise ValueError("per-class selection needs labels; this index was built without them")
            chosen = []
            for c in np.unique(self.labels):
                members = np.flatnonzero(self.labels == c)
                if k > len(members):
                    raise ValueError(f"expected k <= {len(members)} pool items of class {c}, got {k}")
                order = torch.argsort(sim[torch.as_tensor(members)], descending=True)[:k]
                chosen += [int(members[int(i)]) for i in order]
        return sorted(chosen, key=lambda i: (float(sim[i]), i))


def random_support(rng: np.random.Generator, pool_size: int, k: int,
                   labels: Optional[Sequence[int]] = None) -> List[int]:
    """``k`` random pool indices (or ``k`` of each class when ``labels`` are given), in
    random order. Deterministic given ``rng``."""
    if k < 0:
        raise ValueError(f"expected k >= 0, got {k}")
    if labels is None:
        if k > pool_size:
            raise ValueError(f"expected k <= pool size {pool_size}, got {k}")
        return [int(i) for i in rng.permutation(pool_size)[:k]]
    labels = np.asarray(labels)
    if len(labels) != pool_size:
        raise ValueError(f"expected one label per pool item ({pool_size}), got {len(labels)}")
    chosen: List[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if k > len(members):
            raise ValueError(f"expected k <= {len(members)} pool items of class {c}, got {k}")
        chosen += [int(i) for i in rng.permutation(members)[:k]]
    return [chosen[i] for i in rng.permutation(len(chosen))]
