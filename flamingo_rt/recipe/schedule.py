"""The learning-rate schedule every stage uses: linear warmup, then cosine decay."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, final_frac: float = 0.1
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` scaling each group's lr by ``(s + 1) / warmup`` for the first
    ``warmup`` steps, then by a cosine from 1 down to ``final_frac`` at step ``total``."""
    if total < 1 or warmup < 0:
        raise ValueError(f"expected total >= 1 and warmup >= 0, got total={total}, warmup={warmup}")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        p = min(1.0, (s - warmup) / max(1, total - warmup))
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
