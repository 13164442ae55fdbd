"""Resampled media tokens remembered by the content of the medium, for evaluations.

A few-shot evaluation asks each query at several shot counts, and the support images of a
query recur in every one of its prompts (and a batch of queries may share support images),
so most of its vision-encoder work (NFNet + Perceiver Resampler) repeats. A
:class:`MediaMemo` keeps each medium's resampled tokens under a digest of its preprocessed
pixels (shape, dtype and bytes), so a medium seen before is not encoded again.
:meth:`flamingo_rt.runtime.Generator.media_memo` opens one for a block of calls.

Keyed by content, not identity: prompts are encoded anew for each call (the preprocessing
makes new tensors), and a tensor changed in place gets a new key. The tokens depend on the
weights too: the memo records the version counters of the parameters that made them and
forgets everything when one changes (a training step between two calls).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Hashable, Optional, Sequence, Tuple

import torch

__all__ = ["MediaMemo"]


class MediaMemo:
    """Media tokens (N, D) by medium content, at most ``max_items`` (least recently used
    dropped first). ``hits`` / ``misses`` count lookups."""

    def __init__(self, max_items: int = 4096):
        if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1:
            raise ValueError(f"expected max_items an integer >= 1, got {max_items!r}")
        self.max_items = max_items
        self._items: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self._versions: Optional[Tuple[int, ...]] = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def key(medium: torch.Tensor) -> Hashable:
        """The digest of a preprocessed medium (F, C, H, W): shape, dtype, bytes."""
        t = medium.detach().contiguous()
        raw = t.cpu().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        return tuple(t.shape), str(t.dtype), hashlib.sha256(raw).digest()

    def sync(self, params: Sequence[torch.Tensor]) -> None:
        """Forget everything when the version counter of one of ``params`` (the weights
        that make the tokens) moved since the last call: they were updated in place."""
        versions = tuple(p._version for p in params)
        if versions != self._versions:
            self._items.clear()
            self._versions = versions

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        tokens = self._items.get(key)
        if tokens is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return tokens

    def put(self, key: Hashable, tokens: torch.Tensor) -> None:
        self._items[key] = tokens
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
