"""Which parameters train: Flamingo's rule, configurable.

Default: the vision encoder and the LM are frozen (no gradients; the vision encoder in eval
mode, an NFNet with its weight standardization folded once), the resampler and the
cross-attention blocks train, and of the LM's vocabulary only the rows of ``<image>`` and
``<|endofchunk|>`` train (OpenFlamingo's rule): the embedding (and an untied output
projection) keeps ``requires_grad`` but a gradient hook zeroes every other row, and it is
excluded from weight decay, so AdamW leaves those rows bit-identical.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ...models.flamingo import Flamingo
from .config import FreezeConfig

__all__ = ["apply_freeze", "row_mask_hook"]


def row_mask_hook(param: nn.Parameter, rows: Sequence[int]):
    """Register a hook that keeps only ``rows`` of ``param``'s gradient (others exactly 0).
    Returns the hook handle."""
    keep = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
    keep[list(rows)] = 1
    return param.register_hook(lambda g: g * keep.to(dtype=g.dtype, device=g.device))


def apply_freeze(model: Flamingo, cfg: FreezeConfig, default_token_ids: Sequence[int]) -> List:
    """Apply ``cfg`` to ``model`` in place. ``default_token_ids``: the rows that train when
    ``cfg.trainable_token_ids`` is None (the tokenizer's ``<image>`` and ``<|endofchunk|>``).
    Returns the hook handles (removing them lifts the row restriction)."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.freeze_backbones(vision=cfg.vision, lm=cfg.lm)
    if cfg.resampler:
        model.resampler.requires_grad_(False)
    if cfg.xattn:
        model.lm.xattn.requires_grad_(False)
    handles = []
    rows: Optional[Sequence[int]] = cfg.trainable_token_ids
    if rows is None:
        rows = list(default_token_ids)
    if cfg.lm and rows:
        V = model.lm.cfg.vocab_size
        bad = [r for r in rows if not 0 <= int(r) < V]
        if bad:
            raise ValueError(f"trainable_token_ids {bad} are out of range for vocab_size {V}")
        params = {id(model.lm.embed_tokens.weight): model.lm.embed_tokens.weight}
        params.setdefault(id(model.lm.lm_head.weight), model.lm.lm_head.weight)
        for p in params.values():
            p.requires_grad_(True)
            handles.append(row_mask_hook(p, rows))
    return handles
