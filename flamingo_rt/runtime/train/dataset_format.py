"""The on-disk format of training datasets, its writer and its record decoder.

A dataset is a folder of shards ``*.jsonl`` (read in sorted name order), one JSON object
per line, with media in files beside them (paths relative to the dataset folder)::

    data/docs/
      shard-00000.jsonl
      shard-00001.jsonl
      media/000000-0.png ...

Records, by dataset kind:

* ``"interleaved"`` (M3W-like documents)::

      {"text": "intro <image>a red circle.<|endofchunk|> more text <image>...", "images": ["media/a.png", ...]}

  ``text`` holds one ``<image>`` marker per entry of ``images``, in order; each image's
  text follows its marker and usually ends with ``<|endofchunk|>``.
* ``"pairs"`` (ALIGN / LTIP-like image-text pairs)::

      {"image": "media/b.png", "text": "a small blue star."}

* ``"video"`` (VTP-like clip-text pairs), frames as image files or one ``.npy`` array::

      {"frames": ["media/c-0.png", "media/c-1.png", ...], "text": "a square moves left."}
      {"video": "media/c.npy", "text": "..."}          # uint8 (F, H, W, 3)

Image files: ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` (read with PIL) or ``.npy`` (uint8
(H, W, 3) or (H, W)). Any other key in a record is ignored.

A record that cannot be used raises :class:`BadRecord` with a reason from ``BAD_REASONS``;
the stream skips and counts it, the run continues.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import torch

from ...io.npy import load_npy
from ...io.tokenizer import EOC_TOKEN, IMAGE_TOKEN
from ..prompt import check_unit_pixels

__all__ = ["BadRecord", "BAD_REASONS", "Sample", "decode_record", "read_image", "write_dataset"]

BAD_REASONS = ("malformed", "missing_image", "undecodable_image", "too_many_images", "marker_mismatch",
               "empty_text")


class BadRecord(Exception):
    """A record that is skipped: ``reason`` is one of :data:`BAD_REASONS`."""

    def __init__(self, reason: str, detail: str):
        assert reason in BAD_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    """A decoded record: ``text`` with one ``<image>`` marker per medium, and ``media``, each
    a uint8 tensor (F, 3, H, W) (F = 1 for images)."""

    text: str
    media: List[torch.Tensor]


def read_image(path: Path) -> np.ndarray:
    """An image file -> uint8 (H, W, 3). Raises :class:`BadRecord` ("missing_image" or
    "undecodable_image")."""
    if not path.is_file():
        raise BadRecord("missing_image", f"{path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            arr = load_npy(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
    except ImportError:
        raise BadRecord("undecodable_image", f"{path}: reading {path.suffix} files needs PIL (pip install pillow)")
    except Exception as e:  # any decoder error: truncated file, garbage bytes ...
        raise BadRecord("undecodable_image", f"{path}: {type(e).__name__}: {e}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
        raise BadRecord("undecodable_image",
                        f"{path}: expected uint8 (H, W, 3) pixels, got {arr.dtype} {tuple(arr.shape)}")
    return arr


def _frames(arrays: List[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).permute(0, 3, 1, 2).contiguous()


def _resample_frames(clip: torch.Tensor, num_frames: Optional[int]) -> torch.Tensor:
    if num_frames is None or clip.shape[0] == num_frames:
        return clip
    idx = torch.linspace(0, clip.shape[0] - 1, num_frames).round().long()
    return clip[idx]


def decode_record(line: Union[str, bytes], root: Path, kind: str, max_images: int,
                  num_frames: Optional[int] = None) -> Sample:
    """One JSONL line of a ``kind`` dataset -> :class:`Sample`, or :class:`BadRecord`."""
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRecord("malformed", f"not a JSON object: {e}")
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise BadRecord("malformed", "expected a JSON object with a string 'text'")
    text = rec["text"]
    if kind == "interleaved":
        images = rec.get("images")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise BadRecord("malformed", "expected 'images': a list of file paths")
        if len(images) > max_images:
            raise BadRecord("too_many_images", f"{len(images)} images, at most {max_images} allowed")
        if text.count(IMAGE_TOKEN) != len(images):
            raise BadRecord("marker_mismatch", f"{text.count(IMAGE_TOKEN)} <image> markers for {len(images)} images")
        media = [_frames([read_image(root / p)]) for p in images]
    elif kind == "pairs":
        if not isinstance(rec.get("image"), str):
            raise BadRecord("malformed", "expected 'image': a file path")
        media = [_frames([read_image(root / rec["image"])])]
        text = IMAGE_TOKEN + text.strip() + EOC_TOKEN
    elif kind == "video":
        if isinstance(rec.get("frames"), list) and all(isinstance(p, str) for p in rec["frames"]) and rec["frames"]:
            clip = _frames([read_image(root / p) for p in rec["frames"]])
        elif isinstance(rec.get("video"), str):
            p = root / rec["video"]
            if not p.is_file():
                raise BadRecord("missing_image", f"{p} does not exist")
            try:
                arr = load_npy(p)
            except Exception as e:
                raise BadRecord("undecodable_image", f"{p}: {type(e).__name__}: {e}")
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
                raise BadRecord("undecodable_image", f"{p}: expected uint8 (F, H, W, 3), got {arr.dtype} {arr.shape}")
            clip = _frames(list(arr))
        else:
            raise BadRecord("malformed", "expected 'frames' (a non-empty list of paths) or 'video' (an .npy path)")
        media = [_resample_frames(clip, num_frames)]
        text = IMAGE_TOKEN + text.strip() + EOC_TOKEN
    else:
        raise ValueError(f"unknown dataset kind {kind!r}")
    if not text.replace(IMAGE_TOKEN, "").replace(EOC_TOKEN, "").strip():
        raise BadRecord("empty_text", "the record has no text")
    return Sample(text, media)


def _to_uint8_hwc(x: Any, where: str) -> np.ndarray:
    """float (3, H, W) in [0, 1] or uint8 (3, H, W) (a tensor or numpy array) -> uint8
    (H, W, 3). ``where`` names the record and field in errors."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x))  # a copy: read-only arrays (PIL's) are fine
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected an image tensor or numpy array (3, H, W), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[0] != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{where}: expected an image of shape (3, H, W), got {tuple(x.shape)}")
    if x.is_floating_point():
        check_unit_pixels(x, where)
        x = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise TypeError(f"{where}: expected uint8 or float pixels, got {x.dtype}")
    return x.detach().cpu().permute(1, 2, 0).contiguous().numpy()


def _record_field(rec: Any, i: int, key: str, kind: str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(f"record {i}: a record of kind {kind!r} needs {key!r}; got {got}")
    return rec[key]


def _save_image(arr: np.ndarray, path: Path, image_format: str) -> None:
    if image_format == "npy":
        np.save(path, arr, allow_pickle=False)
    else:
        from PIL import Image

        Image.fromarray(arr).save(path, format="PNG")


def write_dataset(records: Iterable[Dict[str, Any]], folder: Union[str, Path], kind: str,
                  shard_size: int = 1000, image_format: str = "png") -> Dict[str, int]:
    """Write records in this format (e.g. the world's ``image_text_pairs``,
    ``interleaved_documents`` or ``video_text_pairs`` streams, limited with ``n``).

    Records: "pairs" ``{"image": (3, H, W), "text"}``; "interleaved" ``{"text", "images":
    [(3, H, W), ...]}`` (one ``<image>`` marker per image); "video" ``{"video": (F, 3, H, W),
    "text"}``; tensors or numpy arrays, pixels float in [0, 1] or uint8 (anything else, a
    missing field or a marker count that does not match is a ValueError / TypeError naming the
    record). ``image_format``: "png" (needs PIL) or "npy". Shards are written to a temporary
    name and renamed. Returns ``{"records": n, "shards": s}``.
    """
    if kind not in ("interleaved", "pairs", "video"):
        raise ValueError(f"expected kind 'interleaved', 'pairs' or 'video', got {kind!r}")
    if image_format not in ("png", "npy"):
        raise ValueError(f"expected image_format 'png' or 'npy', got {image_format!r}")
    if shard_size < 1:
        raise ValueError(f"expected shard_size >= 1, got {shard_size}")
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    ext = "." + image_format
    n = shards = 0
    lines: List[str] = []

    def flush() -> None:
        nonlocal shards, lines
        if not lines:
            return
        final = folder / f"shard-{shards:05d}.jsonl"
        tmp = final.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, final)
        shards += 1
        lines = []

    for rec in records:
        stem = f"media/{n:07d}"
        text = _record_field(rec, n, "text", kind)
        if not isinstance(text, str):
            raise TypeError(f"record {n}: expected 'text' to be a str, got {type(text).__name__}")
        if kind == "pairs":
            rel = stem + ext
            _save_image(_to_uint8_hwc(_record_field(rec, n, "image", kind), f"record {n} 'image'"),
                        folder / rel, image_format)
            out = {"image": rel, "text": text}
        elif kind == "interleaved":
            images = _record_field(rec, n, "images", kind)
            if text.count(IMAGE_TOKEN) != len(images):
                raise ValueError(f"record {n}: {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} markers in its text for "
                                 f"{len(images)} images; expected one marker per image")
            rels = []
            for j, img in enumerate(images):
                rels.append(f"{stem}-{j}{ext}")
                _save_image(_to_uint8_hwc(img, f"record {n} 'images'[{j}]"), folder / rels[-1], image_format)
            out = {"text": text, "images": rels}
        else:
            video = _record_field(rec, n, "video", kind)
            if len(video) < 1 or getattr(video, "ndim", 4) != 4:
                raise ValueError(f"record {n}: expected 'video' of shape (F, 3, H, W) with F >= 1, got "
                                 f"{tuple(getattr(video, 'shape', (len(video),)))}")
            rels = []
            for j, frame in enumerate(video):
                rels.append(f"{stem}-{j}{ext}")
                _save_image(_to_uint8_hwc(frame, f"record {n} 'video'[{j}]"), folder / rels[-1], image_format)
            out = {"frames": rels, "text": text}
        lines.append(json.dumps(out) + "\n")
        n += 1
        if len(lines) >= shard_size:
            flush()
    flush()
    return {"records": n, "shards": shards}
