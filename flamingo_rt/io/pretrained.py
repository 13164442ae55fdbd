"""A Flamingo model folder: ``config.json`` + safetensors weights (+ ``tokenizer.json``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..models.config import FlamingoConfig
from ..ops import cpu_gemm
from ..models.flamingo import Flamingo
from .checkpoint import CheckpointError, load_checkpoint, load_config, save_checkpoint
from .tokenizer import FlamingoTokenizer

PathLike = Union[str, Path]


def save_pretrained(
    model: Flamingo,
    folder: PathLike,
    tokenizer: Optional[FlamingoTokenizer] = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write ``model`` (weights, ``config.json``) and optionally its tokenizer to ``folder``.

    An external vision encoder (``config.vision.kind == "external"``) is saved with the
    rest; loading it back needs the same encoder module passed to :func:`load_pretrained`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, folder, config=model.config.to_dict(), max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
    return folder


def load_pretrained(
    folder: PathLike,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    vision_encoder: Optional[torch.nn.Module] = None,
) -> Tuple[Flamingo, Optional[FlamingoTokenizer]]:
    """Load a model folder written by :func:`save_pretrained`.

    Returns (model in eval mode on ``device``/``dtype``, tokenizer or None when the
    folder has no ``tokenizer.json``). Missing, unexpected or mis-shaped weights raise
    :class:`~flamingo_rt.io.checkpoint.CheckpointError` listing them.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"expected dtype to be a floating torch.dtype such as torch.bfloat16 (or None), got {dtype!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"load_pretrained: device {device} was asked for, but CUDA is not available here")
    folder = Path(folder)
    d = load_config(folder)  # a missing or unreadable file is its own CheckpointError
    try:
        config = FlamingoConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a Flamingo config: {e}", path=folder / "config.json") from None
    with torch.device("meta"):
        model = Flamingo(config, vision_encoder=vision_encoder)
    model = model.to_empty(device=device)
    if dtype is not None:
        cpu_gemm.warn_if_half_products_slow(device, dtype, f"load_pretrained(dtype={dtype})")
        model = model.to(dtype)
    model.lm.tie_weights()
    load_checkpoint(model, folder, strict=True)
    tok_path = folder / "tokenizer.json"
    tokenizer = FlamingoTokenizer.from_file(tok_path) if tok_path.exists() else None
    return model.eval(), tokenizer
