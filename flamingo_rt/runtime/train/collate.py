"""Samples -> a padded training batch (token ids, labels, media, media counts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ...io.tokenizer import FlamingoTokenizer
from ...models.config import VisionConfig
from ..prompt import preprocess_media
from .config import DatasetConfig
from .dataset_format import Sample

__all__ = ["Batch", "Collator"]


@dataclass
class Batch:
    """A right-padded batch of B sequences of length T.

    Attributes:
        input_ids: (B, T) int64, ``<image>`` where each medium goes, padded with ``<pad>``.
        attention_mask: (B, T) int64, 1 for tokens, 0 for padding (padding is on the right,
            so causal attention alone never lets a token see padding).
        labels: (B, T) int64 targets aligned with ``input_ids`` (-100: no loss; the model
            predicts labels[t + 1] from position t).
        media: (B, M, F, 3, S, S) float32 preprocessed media (zeros where a row has fewer
            than M), or None when no row has a medium.
        num_media: (B,) int64 media per row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    media: Optional[torch.Tensor]
    num_media: torch.Tensor

    @property
    def num_targets(self) -> int:
        """Tokens that carry a loss (labels[:, 1:] != -100)."""
        return int((self.labels[:, 1:] != -100).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def rows(self, start: int, end: int) -> "Batch":
        """Rows [start, end) (one process's share of a global batch)."""
        media = None if self.media is None else self.media[start:end]
        return Batch(self.input_ids[start:end], self.attention_mask[start:end], self.labels[start:end],
                     media, self.num_media[start:end])

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     None if self.media is None else self.media.to(device), self.num_media.to(device))


class Collator:
    """Tokenizes, truncates, masks and pads samples of one dataset.

    Per sample: ``tokenize(text) + <|endoftext|>``, cut to ``cfg.max_tokens`` (media whose
    ``<image>`` token was cut are dropped). Labels: the ids, with -100 at ``<image>`` tokens
    and padding; for "interleaved" datasets with ``cfg.mask_before_first_image`` also before
    the first ``<image>`` and between each ``<|endofchunk|>`` and the next ``<image>``.
    """

    def __init__(self, tokenizer: FlamingoTokenizer, vision: VisionConfig, cfg: DatasetConfig):
        self.tok = tokenizer
        self.vision = vision
        self.cfg = cfg

    def _labels(self, ids: List[int]) -> List[int]:
        img, eoc = self.tok.image_token_id, self.tok.eoc_token_id
        labels = list(ids)
        masked = self.cfg.kind == "interleaved" and self.cfg.mask_before_first_image
        hide = masked  # before the first <image>
        for t, i in enumerate(ids):
            if i == img:
                hide = False
                labels[t] = -100
            elif hide:
                labels[t] = -100
            elif masked and i == eoc:
                hide = True  # the <|endofchunk|> itself is a target; what follows until <image> is not
        return labels

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        if not samples:
            raise ValueError("expected at least one sample to collate, got none")
        rows, media_rows = [], []
        for s in samples:
            ids = self.tok.encode(s.text) + [self.tok.eos_token_id]
            ids = ids[: self.cfg.max_tokens]
            m = ids.count(self.tok.image_token_id)
            if m > len(s.media):
                raise ValueError(f"a sample has {m} <image> tokens but {len(s.media)} media")
            rows.append(ids)
            media_rows.append([preprocess_media(x, self.vision) for x in s.media[:m]])
        B, T = len(rows), max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.full((B, T), pad, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, ids in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(ids)] = torch.tensor(self._labels(ids))
            mask[b, : len(ids)] = 1
        num_media = torch.tensor([len(m) for m in media_rows], dtype=torch.long)
        M = int(num_media.max())
        media = None
        if M > 0:
            frames = {m.shape[0] for ms in media_rows for m in ms}
            if len(frames) != 1:
                raise ValueError(
                    f"dataset {self.cfg.name!r}: media of one batch must have the same frame count, got "
                    f"{sorted(frames)}; set num_frames in the dataset config"
                )
            Fr = frames.pop()
            S = self.vision.image_size
            media = torch.zeros((B, M, Fr, 3, S, S), dtype=torch.float32)
            for b, ms in enumerate(media_rows):
                for j, m in enumerate(ms):
                    media[b, j] = m
        return Batch(input_ids, mask, labels, media, num_media)
