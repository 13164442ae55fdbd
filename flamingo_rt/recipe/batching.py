"""World records -> training batches (input_ids, labels, media, media_index) for stage 3.

This is the one place where the recipe turns records into tensors, kept apart from the
training loop so that a general training runtime can take it over unchanged.

A *record* is ``{"text": str, "media": [tensor, ...]}``: the text holds one literal
``<image>`` per medium (each medium's text after its marker, closed by
``<|endofchunk|>``), and each medium is a uint8 or float tensor (F, 3, S, S) (F = 1 for
still images). Records are built from the world's streams by :func:`doc_record`,
:func:`pair_record` and :func:`video_record`; media are stored as uint8 to keep pools small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F

from ..io.tokenizer import EOC_TOKEN, IMAGE_TOKEN, FlamingoTokenizer
from ..models.config import VisionConfig
from ..ops import media_index_from_locations

Record = Dict[str, Any]


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float pixels in [0, 1] (any shape) -> uint8 (rounded), the storage form of pools."""
    return (pixels * 255.0).round().clamp(0, 255).to(torch.uint8)


def normalize_pixels(pixels: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """Pixels (..., 3, H, W), uint8 or float in [0, 1] -> float32 (..., 3, S, S), resized to
    ``vision.image_size`` when needed (bilinear, antialiased) and normalised with the
    encoder's mean and std: the same transform :func:`flamingo_rt.runtime.preprocess_media`
    applies to prompts at inference."""
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"expected pixels of shape (..., 3, H, W), got {tuple(pixels.shape)}")
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    S = vision.image_size
    if tuple(x.shape[-2:]) != (S, S):
        lead = x.shape[:-3]
        x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(S, S), mode="bilinear", align_corners=False,
                          antialias=True).reshape(*lead, 3, S, S)
    mean = torch.tensor(vision.image_mean).view(3, 1, 1)
    std = torch.tensor(vision.image_std).view(3, 1, 1)
    return (x - mean) / std


def doc_record(doc: Dict[str, Any]) -> Record:
    """An interleaved document (``{"text", "images"}``) -> a record."""
    return {"text": doc["text"], "media": [to_uint8(im)[None] for im in doc["images"]]}


def pair_record(pair: Dict[str, Any]) -> Record:
    """An image-caption pair (``{"image", "text"}``) -> ``"<image>caption<|endofchunk|>"``."""
    return {"text": f"{IMAGE_TOKEN}{pair['text']}{EOC_TOKEN}", "media": [to_uint8(pair["image"])[None]]}


def video_record(pair: Dict[str, Any]) -> Record:
    """A clip-text pair (``{"video": (F, 3, S, S), "text"}``) -> ``"<image>text<|endofchunk|>"``."""
    return {"text": f"{IMAGE_TOKEN}{pair['text']}{EOC_TOKEN}", "media": [to_uint8(pair["video"])]}


@dataclass
class Batch:
    """A stage-3 batch.

    input_ids: (B, T) int64, right-padded with ``<pad>``.
    labels: (B, T) int64, -100 at padding and at ``<image>`` tokens.
    attention_mask: (B, T) int64, 1 on real tokens.
    media: (B, M, F, 3, S, S) float32 normalised pixels (rows with fewer media zero-padded),
        or (B, M, F, S', Dv) vision features when collated with ``features=True``.
    num_media: (B,) int64 media per row.
    media_index: (B, T) int32, the medium each token attends to (-1 before the first).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    media: torch.Tensor
    num_media: torch.Tensor
    media_index: torch.Tensor


def collate(records: Sequence[Record], tokenizer: FlamingoTokenizer, vision: VisionConfig,
            max_seq_len: int, features: bool = False) -> Batch:
    """Tokenize and pad ``records`` into a :class:`Batch`.

    Texts longer than ``max_seq_len`` tokens are cut at the end, and the media whose
    ``<image>`` token was cut are dropped. All media of a batch must have the same frame
    count F (stills and clips go in separate batches).

    With ``features=True`` every record carries ``"feats"``: the frozen vision encoder's
    output per medium, (F, S, Dv) float32 (:func:`add_features`), and ``Batch.media`` is
    (B, M, F, S, Dv) features (zero-padded) instead of pixels: the input of the resampler."""
    if not records:
        raise ValueError("expected at least one record, got none")
    img = tokenizer.image_token_id
    seqs, media = [], []
    for r in records:
        n_markers = r["text"].count(IMAGE_TOKEN)
        if n_markers != len(r["media"]):
            raise ValueError(f"a record has {n_markers} <image> markers but {len(r['media'])} media")
        ids = tokenizer.encode(r["text"])[:max_seq_len]
        kept = sum(1 for t in ids if t == img)
        seqs.append(ids)
        media.append((r["feats"] if features else r["media"])[:kept])
    frames = {m.shape[0] for ms in media for m in ms}
    if len(frames) > 1:
        raise ValueError(f"expected one frame count per batch, got {sorted(frames)}")
    B, T = len(seqs), max(len(s) for s in seqs)
    M = max(1, max(len(ms) for ms in media))
    S = vision.image_size
    Fr = frames.pop() if frames else 1
    input_ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    if features:
        shape = next((m.shape[1:] for ms in media for m in ms), (1, vision.width))
        pix = torch.zeros((B, M, Fr, *shape), dtype=torch.float32)
    else:
        pix = torch.zeros((B, M, Fr, 3, S, S), dtype=torch.float32)
    for b, (s, ms) in enumerate(zip(seqs, media)):
        input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, : len(s)] = 1
        for j, m in enumerate(ms):
            pix[b, j] = m if features else normalize_pixels(m, vision)
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == img), -100)
    locations = input_ids == img
    return Batch(input_ids, labels, attention_mask, pix,
                 torch.tensor([len(ms) for ms in media], dtype=torch.long),
                 media_index_from_locations(locations))


@torch.no_grad()
def add_features(records: Sequence[Record], encoder: torch.nn.Module, vision: VisionConfig,
                 chunk: int = 256) -> None:
    """Run the frozen vision ``encoder`` once over every medium of ``records`` and store its
    output in place as ``record["feats"]``: a list of (F, S', Dv) float32 tensors, one per
    medium. A frozen encoder without augmentation gives the same features every step, so
    stage 3 computes them once instead of every step (:func:`collate` with ``features=True``)."""
    frames = [(i, j, m) for i, r in enumerate(records) for j, m in enumerate(r["media"])]
    for r in records:
        r["feats"] = [None] * len(r["media"])
    flat = [(i, j, f) for i, j, m in frames for f in range(m.shape[0])]
    out = {}
    for s in range(0, len(flat), chunk):
        part = flat[s:s + chunk]
        x = torch.stack([normalize_pixels(records[i]["media"][j][f], vision) for i, j, f in part])
        y = encoder(x)
        for (i, j, f), v in zip(part, y):
            out.setdefault((i, j), []).append(v)
    for (i, j), vs in out.items():
        records[i]["feats"][j] = torch.stack(vs)
