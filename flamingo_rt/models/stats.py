"""Parameter and FLOP counts, also for models built on the meta device (no memory)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import FlamingoConfig, get_preset


def build_meta(config: FlamingoConfig | str, vision_encoder: Optional[nn.Module] = None) -> nn.Module:
    """A :class:`Flamingo` on the meta device (shapes only, nothing allocated)."""
    from .flamingo import Flamingo

    if isinstance(config, str):
        config = get_preset(config)
    with torch.device("meta"):
        return Flamingo(config, vision_encoder=vision_encoder)


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Parameter counts: ``vision``, ``resampler``, ``xattn`` (gated blocks), ``lm`` (the LM
    without its blocks), ``trainable`` and ``total``; shared (tied) parameters count once."""
    seen = set()
    out = {"vision": 0, "resampler": 0, "xattn": 0, "lm": 0, "trainable": 0, "total": 0}
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if name.startswith("vision_encoder."):
            part = "vision"
        elif name.startswith("resampler."):
            part = "resampler"
        elif name.startswith("lm.xattn."):
            part = "xattn"
        else:
            part = "lm"
        out[part] += n
        out["total"] += n
        if p.requires_grad:
            out["trainable"] += n
    return out


def count_forward_flops(model: nn.Module, batch: int = 1, seq_len: int = 256, num_media: int = 1,
                        frames: int = 1, image_size: Optional[int] = None) -> Dict[str, int]:
    """FLOPs of one forward pass on the meta device, by component and in total.

    Returns {"vision", "resampler", "lm", "total"} (the LM part includes the
    cross-attention blocks). Works on meta and real models alike (inputs are meta).
    """
    cfg: FlamingoConfig = model.config
    size = image_size or cfg.vision.image_size
    chans = cfg.vision.nfnet.in_chans if cfg.vision.nfnet is not None else 3
    dev = torch.device("meta")
    model = model.to(dev) if next(model.parameters()).device.type != "meta" else model
    media = torch.empty(batch, num_media, frames, chans, size, size, device=dev)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=dev)
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            if cfg.vision.kind == "external":
                feats = None
            else:
                frames_in = media.reshape(-1, chans, size, size)
                feats = model.vision_encoder(frames_in)
        counts["vision"] = fc.get_total_flops()
        if feats is None:
            feats = torch.empty(batch * num_media * frames, 256, cfg.vision.width, device=dev)
        feats = feats.reshape(batch, num_media, frames, feats.shape[1], feats.shape[2])
        with FlopCounterMode(display=False) as fc:
            tokens = model.resampler(feats)
        counts["resampler"] = fc.get_total_flops()
        idx = torch.zeros(batch, seq_len, dtype=torch.int32, device=dev)
        with FlopCounterMode(display=False) as fc:
            model.lm(ids, xattn_kwargs=dict(media=tokens, media_index=idx, validate=False))
        counts["lm"] = fc.get_total_flops()
    counts["total"] = counts["vision"] + counts["resampler"] + counts["lm"]
    return counts
