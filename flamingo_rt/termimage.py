"""Small pictures for the terminal and PNG files, for world images and clips.

* :func:`to_rgb8`: an image (3, H, W) / clip (F, 3, H, W) float tensor in [0, 1] -> an
  (H, W', 3) uint8 array (a clip becomes a strip of frames, see ``max_frames``).
* :func:`save_png`: that array as a PNG file (optionally scaled up, nearest neighbour).
* :func:`render`: terminal lines. With colour, each character cell shows two pixels, one
  above the other: the upper half block ``▀`` in the upper pixel's colour on the lower
  pixel's colour (24-bit ANSI escapes). Without colour, a luminance ramp of ASCII characters.
* :func:`supports_color`: whether a stream should get the colour version (a TTY, TERM not
  "dumb", NO_COLOR unset).
* :func:`side_by_side`: several rendered pictures in one row with captions below.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import List, Optional, Sequence, TextIO, Union

import numpy as np
import torch

__all__ = ["to_rgb8", "save_png", "render", "supports_color", "side_by_side", "display_width"]

_RAMP = " .:-=+*#%@"
_RESET = "\x1b[0m"


def to_rgb8(media: Union[torch.Tensor, np.ndarray], max_frames: int = 4, gap: int = 2) -> np.ndarray:
    """Image (3, H, W) or clip (F, 3, H, W), float in [0, 1] (or uint8) -> (H, W', 3) uint8.

    A clip shows ``min(F, max_frames)`` evenly spaced frames (first and last included) left
    to right, ``gap`` white pixels apart.
    """
    t = torch.as_tensor(media).detach().cpu()
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"expected an image (3, H, W) or clip (F, 3, H, W), got {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    F = t.shape[0]
    idx = sorted({round(i * (F - 1) / max(1, min(F, max_frames) - 1)) for i in range(min(F, max_frames))})
    frames = [t[i].permute(1, 2, 0).numpy() for i in idx]
    if len(frames) == 1:
        return np.ascontiguousarray(frames[0])
    H = frames[0].shape[0]
    white = np.full((H, gap, 3), 255, np.uint8)
    parts = []
    for i, f in enumerate(frames):
        parts += [f] if i == 0 else [white, f]
    return np.concatenate(parts, axis=1)


def save_png(media: Union[torch.Tensor, np.ndarray], path: Union[str, Path], scale: int = 2,
             max_frames: int = 8) -> Path:
    """Write an image or clip (see :func:`to_rgb8`; an (H, W, 3) uint8 array is written as
    is) as a PNG, each pixel a ``scale`` x ``scale`` block. Returns the path."""
    from PIL import Image

    arr = media if isinstance(media, np.ndarray) and media.ndim == 3 and media.shape[-1] == 3 \
        and media.dtype == np.uint8 else to_rgb8(media, max_frames=max_frames)
    if scale < 1:
        raise ValueError(f"expected scale >= 1, got {scale}")
    if scale > 1:
        arr = arr.repeat(scale, 0).repeat(scale, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def supports_color(stream: Optional[TextIO] = None) -> bool:
    """True when ``stream`` (default stdout) is a terminal that should get 24-bit colour."""
    import sys

    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM", "") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average (box filter) resize of (H, W, 3) uint8 to (height, width, 3) float."""
    from PIL import Image

    img = Image.fromarray(rgb).resize((width, height), Image.Resampling.BOX)
    return np.asarray(img).astype(np.float32)


def render(media: Union[torch.Tensor, np.ndarray], width: int = 16, color: bool = True,
           max_frames: int = 3) -> List[str]:
    """An image / clip (or (H, W, 3) uint8 array) as terminal lines: ``width`` characters
    per image side (a clip's strip of ``max_frames`` frames is proportionally wider), a
    character cell per pixel column and two pixel rows. Colour: half blocks; plain: ASCII ramp over the picture's luminance range."""
    rgb = media if isinstance(media, np.ndarray) and media.ndim == 3 and media.shape[-1] == 3 \
        and media.dtype == np.uint8 else to_rgb8(media, max_frames=max_frames)
    H, W = rgb.shape[:2]
    if width < 1:
        raise ValueError(f"expected width >= 1, got {width}")
    cols = max(1, round(width * W / H)) if W > H else width
    rows = max(2, 2 * round(cols * H / W / 2))  # pixel rows, even
    px = _resize(rgb, cols, rows).round().astype(np.int64)
    lines = []
    if color:
        for r in range(0, rows, 2):
            cells = []
            for c in range(cols):
                (r1, g1, b1), (r2, g2, b2) = px[r, c], px[r + 1, c]
                cells.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m▀")
            lines.append("".join(cells) + _RESET)
    else:
        lum = (0.299 * px[..., 0] + 0.587 * px[..., 1] + 0.114 * px[..., 2]) / 255.0
        lum = (lum[0::2] + lum[1::2]) / 2  # one character per two pixel rows
        lo, hi = float(lum.min()), float(lum.max())
        lum = (lum - lo) / (hi - lo) if hi - lo > 1e-6 else lum * 0  # contrast stretched
        idx = np.clip((lum * len(_RAMP)).astype(int), 0, len(_RAMP) - 1)
        lines = ["".join(_RAMP[i] for i in row) for row in idx]
    return lines


def display_width(text: str) -> int:
    """Terminal columns of a string (ANSI escapes take none; wide characters two)."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in plain)


def side_by_side(blocks: Sequence[List[str]], captions: Sequence[str], gap: int = 2, max_width: int = 100) -> List[str]:
    """Rendered pictures in rows of at most ``max_width`` columns, each with its caption
    (cut to the picture's width) below it."""
    if len(blocks) != len(captions):
        raise ValueError(f"expected one caption per picture, got {len(blocks)} pictures and {len(captions)} captions")
    out: List[str] = []
    row: List[int] = []
    widths = [max(display_width(line) for line in b) for b in blocks]

    def flush():
        if not row:
            return
        height = max(len(blocks[i]) for i in row)
        for r in range(height + 1):
            parts = []
            for i in row:
                w = widths[i]
                if r < len(blocks[i]):
                    s = blocks[i][r]
                elif r == height:
                    cap = captions[i][:w]
                    s = cap
                else:
                    s = ""
                parts.append(s + " " * (w - display_width(s)))
            out.append((" " * gap).join(parts).rstrip())
        row.clear()

    used = 0
    for i in range(len(blocks)):
        need = widths[i] + (gap if row else 0)
        if row and used + need > max_width:
            flush()
            used, need = 0, widths[i]
        row.append(i)
        used += need
    flush()
    return out
