"""A dataset as an endless, deterministic stream of decoded samples with an exact position.

Order: in epoch ``e`` the shards are visited in a permutation drawn from ``(seed, e)`` and
each shard's records in a permutation drawn from ``(seed, e, shard)``; only the current
shard's line offsets are held in memory (records are read by seeking). The position
(epoch, shard, record) and the bad-record counts are the stream's ``state_dict``, so a
resumed stream continues with exactly the records an uninterrupted one would have read.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .config import DatasetConfig
from .dataset_format import BAD_REASONS, BadRecord, Sample, decode_record

__all__ = ["DatasetStream", "NoUsableRecordError"]

log = logging.getLogger("flamingo_rt.train")


def _line_offsets(path: Path) -> List[int]:
    """Byte offsets of the non-empty lines of a file."""
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


class NoUsableRecordError(RuntimeError):
    """A whole epoch over a dataset gave no usable record (every record bad): training on it
    cannot go on. The message names the dataset, its folder and the bad-record counts."""


class DatasetStream:
    """Streams :class:`Sample` s from a dataset folder (see :mod:`.dataset_format`).

    Args:
        cfg: the dataset's :class:`DatasetConfig` (path, kind, max_images, num_frames).
        seed: the shuffling seed (the run's seed).
    Raises FileNotFoundError when the folder has no ``*.jsonl`` shard.
    """

    def __init__(self, cfg: DatasetConfig, seed: int):
        self.cfg = cfg
        self.seed = int(seed)
        self.root = Path(cfg.path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset {cfg.name!r}: folder {self.root} does not exist")
        self.shards = sorted(self.root.glob("*.jsonl"))
        if not self.shards:
            raise FileNotFoundError(f"dataset {cfg.name!r}: expected *.jsonl shards in {self.root}, found none")
        self.epoch = 0
        self.shard_pos = 0
        self.record_pos = 0
        self.seen = 0
        self.bad: Counter = Counter()
        self._cache_key: Optional[tuple] = None
        self._offsets: List[int] = []
        self._order: np.ndarray = np.zeros(0, dtype=np.int64)
        self._good_this_epoch = 0

    # ------------------------------------------------------------------ order
    def _shard_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _load_shard(self) -> Path:
        shard_idx = int(self._shard_order()[self.shard_pos])
        key = (self.epoch, shard_idx)
        path = self.shards[shard_idx]
        if self._cache_key != key:
            if self._cache_key is None or self._cache_key[1] != shard_idx:
                self._offsets = _line_offsets(path)
            self._order = np.random.default_rng([self.seed, self.epoch, shard_idx, 1]).permutation(len(self._offsets))
            self._cache_key = key
        return path

    def _advance_shard(self) -> None:
        self.shard_pos += 1
        self.record_pos = 0
        if self.shard_pos >= len(self.shards):
            if self._good_this_epoch == 0 and self.seen > 0:
                raise NoUsableRecordError(
                    f"dataset {self.cfg.name!r}: a whole epoch over {self.root} gave no usable record "
                    f"(bad records so far: {dict(self.bad)})"
                )
            self.epoch += 1
            self.shard_pos = 0
            self._good_this_epoch = 0

    # ------------------------------------------------------------------ reading
    def next_sample(self) -> Sample:
        """The next usable sample; bad records are skipped, counted and logged."""
        empty_shards = 0
        while True:
            path = self._load_shard()
            if self.record_pos >= len(self._offsets):
                empty_shards += 1
                if empty_shards > 2 * len(self.shards):
                    raise RuntimeError(f"dataset {self.cfg.name!r}: every shard in {self.root} is empty")
                self._advance_shard()
                continue
            off = self._offsets[int(self._order[self.record_pos])]
            with open(path, "rb") as f:
                f.seek(off)
                line = f.readline()
            self.record_pos += 1
            self.seen += 1
            try:
                s = decode_record(line, self.root, self.cfg.kind, self.cfg.max_images, self.cfg.num_frames)
            except BadRecord as e:
                self.bad[e.reason] += 1
                n = sum(self.bad.values())
                if n <= 5 or (n & (n - 1)) == 0:  # the first few, then at powers of two
                    log.warning("dataset %r: skipped a bad record in %s (%s); %d skipped so far",
                                self.cfg.name, path.name, e, n)
                if self.record_pos >= len(self._offsets):
                    self._advance_shard()
                continue
            self._good_this_epoch += 1
            if self.record_pos >= len(self._offsets):
                self._advance_shard()
            return s

    def take(self, n: int) -> List[Sample]:
        return [self.next_sample() for _ in range(n)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "record_pos": self.record_pos,
                "seen": self.seen, "good_this_epoch": self._good_this_epoch, "bad": dict(self.bad),
                "num_shards": len(self.shards)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state.get("num_shards", len(self.shards))) != len(self.shards):
            raise ValueError(
                f"dataset {self.cfg.name!r}: the checkpoint was made with {state['num_shards']} shards, "
                f"the folder {self.root} now has {len(self.shards)}; resuming would not be exact"
            )
        self.epoch = int(state["epoch"])
        self.shard_pos = int(state["shard_pos"])
        self.record_pos = int(state["record_pos"])
        self.seen = int(state["seen"])
        self._good_this_epoch = int(state.get("good_this_epoch", 0))
        self.bad = Counter({k: int(v) for k, v in state.get("bad", {}).items() if k in BAD_REASONS})
