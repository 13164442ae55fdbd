"""Media index: which image each text token attends to (DESIGN.md section 1)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .._values import is_integer_tensor
from ..ops import media_index_from_locations


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def num_media_tensor(num_media: Union[int, torch.Tensor, None], batch: int, max_media: int,
                     device: torch.device) -> torch.Tensor:
    """(B,) int64 count of the media supplied for each row (``max_media`` when not given)."""
    if num_media is None:
        return torch.full((batch,), max_media, dtype=torch.long, device=device)
    if isinstance(num_media, int):
        if not 0 <= num_media <= max_media:
            raise ValueError(f"expected num_media in [0, {max_media}] (the media given per row), got {num_media}")
        return torch.full((batch,), num_media, dtype=torch.long, device=device)
    num_media = torch.as_tensor(num_media, device=device)
    if not is_integer_tensor(num_media):
        raise TypeError(f"expected integer num_media, got {num_media.dtype}")
    num_media = num_media.long()
    if num_media.shape != (batch,):
        raise ValueError(f"expected num_media of shape ({batch},), got {tuple(num_media.shape)}")
    if not _is_compiling() and num_media.numel() and bool(((num_media < 0) | (num_media > max_media)).any()):
        raise ValueError(f"expected num_media in [0, {max_media}] (the media given per row), "
                         f"got {num_media.tolist()}")
    return num_media


def check_media_index(media_index: torch.Tensor, num_media: torch.Tensor) -> None:
    """Raise if a row refers to more images than it was given (eager mode only).

    ``media_index`` (B, T) integer; ``num_media`` (B,) images supplied per row.
    """
    if _is_compiling():
        return
    if media_index.numel() == 0:
        return
    need = media_index.max(dim=1).values.long() + 1  # (B,) images referenced
    bad = (need > num_media).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(
            f"batch row {b} has {int(need[b])} <image> tokens but {int(num_media[b])} images "
            f"were supplied; expected at most as many <image> tokens as images"
        )
    if bool((media_index < -1).any()):
        raise ValueError(f"expected media_index values >= -1, got {int(media_index.min())}")


def resolve_media_index(
    media_locations: Optional[torch.Tensor],
    media_index: Optional[torch.Tensor],
    num_media: torch.Tensor,
) -> torch.Tensor:
    """(B, T) int32 media index from ``media_locations`` (bool, True at ``<image>``) or a
    given ``media_index``; validated against the (B,) counts ``num_media``."""
    if media_index is not None and media_locations is not None:
        raise ValueError("expected media_locations or media_index, got both (one says where the images are)")
    if media_index is None:
        if media_locations is None:
            raise ValueError("expected media_locations or media_index, got neither")
        if media_locations.dtype != torch.bool:
            raise TypeError(f"expected bool media_locations, got {media_locations.dtype}")
        media_index = media_index_from_locations(media_locations)
    check_media_index(media_index, num_media)
    return media_index
