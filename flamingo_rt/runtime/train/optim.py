"""AdamW with weight-decay exclusions, and a linear-warmup cosine schedule."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["param_groups", "build_optimizer", "lr_factor", "build_scheduler"]

_NO_DECAY_NAMES = ("embed_tokens", "lm_head", "token_rows", "latents", "frame_embs", "media_time_embs",
                   "spatial_embs", "time_emb", "gate")


def decays(name: str, p: nn.Parameter) -> bool:
    """Weight matrices decay; biases, norms, gates, embeddings, latents and positional /
    temporal embeddings do not."""
    return p.ndim >= 2 and not any(k in name for k in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups over the trainable parameters (each parameter once, even if tied):
    ``{"params", "names", "weight_decay"}``."""
    seen, decay, no_decay = set(), ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        grp = decay if decays(name, p) else no_decay
        grp[0].append(p)
        grp[1].append(name)
    if not seen:
        raise ValueError("the model has no trainable parameter; check the freeze configuration")
    return [
        {"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel when every trainable parameter is a
    plain floating CPU/CUDA tensor (measured about 4x faster than the foreach one on a
    136M-parameter connector step, and no extra memory), else the foreach one (e.g. FSDP2's
    DTensors)."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps`` (from 1/warmup), then cosine from 1 down to ``min_lr_ratio`` at the end."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
