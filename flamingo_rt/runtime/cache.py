"""Static generation state, owned in one place (gpt-fast style).

A :class:`StaticCache` holds, for B rows:

- the self-attention keys/values of every decoder layer, (B, Hkv, S, Dh) each, with S
  the cache length fixed at creation;
- the cross-attention keys/values of every gated block, per medium: (B, M, N, H, dh),
  computed once per image or clip and reused by every later token, beam and turn;
- the bookkeeping that makes rows of different lengths and image counts share one
  batch: which slots hold real tokens (``key_valid``), how many padding slots precede
  each row's tokens (``pad``, so RoPE positions stay 0, 1, 2, ... per row), how many
  media and ``<image>`` tokens each row has so far, and the next free slot both as a
  Python int (``length``) and as a device tensor (``position``, what a compiled or
  CUDA-graph decode step reads, so no graph depends on it).

Every buffer is allocated once; reset / restore / broadcast write in place.

Chunks of tokens are appended at the same slots for every row; a row with a shorter
chunk is left-padded inside that chunk (padding slots are invalid keys), so each row
computes exactly what it would compute alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models.flamingo import Flamingo


@dataclass
class CacheSnapshot:
    """The bookkeeping of a cache at some point (buffers past it are free to overwrite)."""

    length: int
    key_valid: torch.Tensor
    pad: torch.Tensor
    num_media: torch.Tensor
    image_count: torch.Tensor


class StaticCache:
    """Preallocated caches of a :class:`~flamingo_rt.models.flamingo.Flamingo` for
    ``batch`` rows, ``max_seq_len`` token slots and ``max_media`` media per row.

    Raises ValueError (before allocating) for non-positive sizes or a cache longer than
    the LM's ``max_seq_len``.
    """

    def __init__(self, model: Flamingo, batch: int, max_seq_len: int, max_media: int,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        lm_cfg = model.config.lm
        if batch < 1 or max_seq_len < 1 or max_media < 0:
            raise ValueError(
                f"expected batch >= 1, max_seq_len >= 1, max_media >= 0, got {batch}, {max_seq_len}, {max_media}"
            )
        if max_seq_len > lm_cfg.max_seq_len:
            raise ValueError(
                f"cache length {max_seq_len} exceeds the LM's max_seq_len {lm_cfg.max_seq_len}"
            )
        p = next(model.parameters())
        self.dtype = dtype or p.dtype
        self.device = torch.device(device) if device is not None else p.device
        self.batch, self.max_seq_len, self.max_media = batch, max_seq_len, max_media
        kw = dict(dtype=self.dtype, device=self.device)
        shape = (batch, lm_cfg.n_kv_heads, max_seq_len, lm_cfg.head_dim)
        self.kv: List[Tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in range(lm_cfg.n_layers)
        ]
        self.media_kv: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        n_lat = model.config.resampler.num_latents
        for key, blk in model.lm.xattn.items():
            mshape = (batch, max(max_media, 1), n_lat, blk.attn.heads, blk.attn.dim_head)
            self.media_kv[key] = (torch.zeros(mshape, **kw), torch.zeros(mshape, **kw))
        self.slots = torch.arange(max_seq_len, device=self.device)
        # bookkeeping, allocated once: reset() / restore() write in place, so a compiled or
        # CUDA-graph decode step keeps reading the same buffers
        self.length = 0
        self.position = torch.zeros((), dtype=torch.long, device=self.device)  # == length, on the device
        self.key_valid = torch.zeros(batch, max_seq_len, dtype=torch.bool, device=self.device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.num_media = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.image_count = torch.zeros(batch, dtype=torch.long, device=self.device)
        for t in self.buffers():
            # inputs at fixed addresses (as parameters are): CUDA graphs of the decode step
            # read and write them in place instead of copying them in and out every replay
            torch._dynamo.mark_static_address(t, guard=False)

    def buffers(self) -> List[torch.Tensor]:
        """Every tensor the cache owns (allocated once, never replaced)."""
        out = [t for kv in self.kv for t in kv] + [t for kv in self.media_kv.values() for t in kv]
        return out + [self.slots, self.position, self.key_valid, self.pad, self.num_media, self.image_count]

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty every row, in place (nothing is reallocated)."""
        self.length = 0
        for t in (self.position, self.key_valid, self.pad, self.num_media, self.image_count):
            t.zero_()

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(self.length, self.key_valid.clone(), self.pad.clone(),
                             self.num_media.clone(), self.image_count.clone())

    def restore(self, snap: CacheSnapshot) -> None:
        """Go back to ``snap`` (O(1): later slots and media are simply overwritten)."""
        self.length = snap.length
        self.position.fill_(snap.length)
        self.key_valid.copy_(snap.key_valid)
        self.pad.copy_(snap.pad)
        self.num_media.copy_(snap.num_media)
        self.image_count.copy_(snap.image_count)

    def select_rows(self, rows, media: bool = True) -> None:
        """Row b becomes a copy of old row ``rows[b]`` (beam reordering, or expanding one
        prompt's row into many). ``rows`` (a tensor or a sequence of ints) has ``batch``
        entries in [0, batch). ``media=False`` skips the media K/V when rows only move among
        copies of the same prompt.

        Only the rows that change are copied, and of them only what can be read later: the
        token K/V of the filled slots (the first :attr:`length`; a later slot is written
        before it is read) and the media K/V of the first ``num_media.max()`` media. A beam
        step in a 2048-slot cache after a 300-token prompt so copies ~1/7 of the K/V, and
        nothing for the beams that continue themselves."""
        idx = [int(r) for r in (rows.tolist() if torch.is_tensor(rows) else rows)]
        if len(idx) != self.batch or any(not 0 <= r < self.batch for r in idx):
            raise ValueError(f"expected {self.batch} row indices in [0, {self.batch}), got {idx}")
        moved = [b for b, r in enumerate(idx) if r != b]
        if not moved:
            return
        dst = torch.tensor(moved, device=self.device)
        src = torch.tensor([idx[b] for b in moved], device=self.device)

        def copy(t: torch.Tensor) -> None:  # rows dst of t <- its rows src (read first)
            t.index_copy_(0, dst, t.index_select(0, src))

        n = self.length
        if n:
            for k, v in self.kv:
                copy(k[:, :, :n])
                copy(v[:, :, :n])
        if media and self.media_kv:
            m = int(self.num_media.max())
            if m:
                for k, v in self.media_kv.values():
                    copy(k[:, :m])
                    copy(v[:, :m])
        for name in ("key_valid", "pad", "num_media", "image_count"):
            copy(getattr(self, name))

    def broadcast_from(self, src: "StaticCache", repeats: Optional[int] = None) -> None:
        """Copy ``src``'s rows into this cache: its filled token slots, its media K/V and its
        bookkeeping. A one-row ``src`` goes into every row (a computed prefix or prompt);
        with ``repeats`` = K each row of ``src`` goes into K consecutive rows (row b into
        b*K .. b*K+K-1: a batch's prompts into their beams), which needs
        ``batch == src.batch * K``."""
        K = self.batch if repeats is None else repeats
        if repeats is None and src.batch != 1:
            raise ValueError(f"expected a one-row source cache, got {src.batch} rows")
        if src.batch * K != self.batch:
            raise ValueError(f"expected {src.batch} x {K} = {src.batch * K} rows to copy {src.batch} rows "
                             f"{K} times into, got a cache of {self.batch} rows")
        n, m, S = src.length, int(src.num_media.max()), src.batch
        for (k, v), (ks, vs) in zip(self.kv, src.kv):  # (rows, heads, slots, dh): rows seen as (S, K)
            k.view(S, K, *k.shape[1:])[:, :, :, :n] = ks[:, None, :, :n]
            v.view(S, K, *v.shape[1:])[:, :, :, :n] = vs[:, None, :, :n]
        for key, (k, v) in self.media_kv.items():  # (rows, media, latents, heads, dh)
            ks, vs = src.media_kv[key]
            k.view(S, K, *k.shape[1:])[:, :, :m] = ks[:, None, :m]
            v.view(S, K, *v.shape[1:])[:, :, :m] = vs[:, None, :m]
        self.restore(CacheSnapshot(n, src.key_valid.repeat_interleave(K, 0), src.pad.repeat_interleave(K, 0),
                                   src.num_media.repeat_interleave(K, 0), src.image_count.repeat_interleave(K, 0)))

    # ------------------------------------------------------------------ media
    def add_media(self, model: Flamingo, media_tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Store the cross-attention K/V of new media after each row's existing ones.

        media_tokens: (B, M_new, N, D) resampler outputs (rows padded to M_new);
        counts: (B,) how many of them are real for each row.
        """
        B, M_new = media_tokens.shape[:2]
        start = self.num_media
        need = int((start + counts).max()) if B else 0
        if need > self.max_media:
            raise ValueError(
                f"expected at most {self.max_media} media per row in this cache, a row would have {need}"
            )
        if M_new == 0:
            return
        for key, blk in model.lm.xattn.items():
            k_new, v_new = blk.attn.media_kv(media_tokens.to(self.dtype))
            kb, vb = self.media_kv[key]
            for b in range(B):
                c, s0 = int(counts[b]), int(start[b])
                if c:
                    kb[b, s0:s0 + c] = k_new[b, :c]
                    vb[b, s0:s0 + c] = v_new[b, :c]
        self.num_media += counts.to(self.device)

    # ------------------------------------------------------------------ chunks
    def plan_chunk(self, lengths: torch.Tensor, T: int):
        """Slots, positions and mask for appending a chunk of T slots where row b has
        ``lengths[b]`` real tokens, right-aligned (left-padded) in the chunk.

        Returns (slots (T,), position_ids (B, T), attn_mask (B, 1, T, E), real (B, T) bool),
        the mask over the first E = length + T slots only (no later slot is visible: the
        attention reads those slots alone, not the whole cache).
        Raises ValueError when the chunk does not fit in the cache.
        """
        self.check_room(T)
        dev = self.device
        lengths = lengths.to(dev)
        E = self.length + T
        slots = self.slots[self.length:E]
        j = torch.arange(T, device=dev)
        pad_here = (T - lengths)[:, None]  # (B, 1)
        real = j[None, :] >= pad_here  # (B, T)
        self.key_valid[:, self.length:E] = real
        pad_total = self.pad[:, None] + pad_here  # padding before each real token
        positions = (slots[None, :] - pad_total).clamp_min(0)
        k = self.slots[None, :E]  # (1, E)
        q = slots[:, None]  # (T, 1)
        visible = (k <= q)[None] & (self.key_valid[:, None, :E] | (k == q)[None])  # (B, T, E)
        return slots, positions, visible[:, None], real

    def plan_packed_rows(self, lengths: Sequence[Sequence[int]]):
        """:meth:`plan_chunk` for independent continuations of each row's context, packed one
        after another in the slots past the cache's end: row b's continuation i
        (``lengths[b][i]`` tokens; a row may have none) sees the row's valid slots and its
        own earlier tokens, never another's, and its positions continue the row's as if it
        alone followed. T is the longest row's total; a shorter row's remaining slots are
        padding (``real`` False, at the row's next position, seeing its context and itself,
        so no query row of the mask is empty). The bookkeeping is left as it is (nothing is
        committed: the slots written lie past :attr:`length`), so any number of packs can
        follow one prompt. Scoring candidates this way runs them as one chunk.

        Returns (slots (T,), position_ids (B, T), attn_mask (B, 1, T, E), real (B, T) bool),
        the mask over the first E = length + T slots (as :meth:`plan_chunk`'s).
        Raises ValueError when there is not one list of lengths per row, a length is not
        positive, no row has a token, or the pack does not fit in the cache.
        """
        if len(lengths) != self.batch:
            raise ValueError(f"expected the continuations' lengths of each of the cache's {self.batch} rows, "
                             f"got {len(lengths)} rows")
        for row in lengths:
            if any(L < 1 for L in row):
                raise ValueError(f"expected continuations of at least one token, got lengths {list(row)}")
        totals = [int(sum(row)) for row in lengths]
        T = max(totals)
        if T == 0:
            raise ValueError("expected at least one continuation token in some row, got none")
        self.check_room(T)
        dev = self.device
        n = self.length
        slots = self.slots[n:n + T]
        within = torch.zeros(self.batch, T, dtype=torch.long)  # each token's offset in its own continuation
        for b, row in enumerate(lengths):
            within[b, :totals[b]] = torch.tensor([j for L in row for j in range(L)], dtype=torch.long)
        within = within.to(dev)
        real = torch.arange(T, device=dev)[None, :] < torch.tensor(totals, device=dev)[:, None]  # (B, T)
        positions = (n + within - self.pad[:, None]).clamp_min(0)  # (B, T)
        E = n + T
        k = self.slots[None, None, :E]  # (1, 1, E)
        prompt = (self.slots[None, :E] < n) & self.key_valid[:, :E]  # (B, E): each row's valid slots
        first = (slots[None, :] - within)[:, :, None]  # (B, T, 1): the slot of each token's continuation's start
        own = (k >= first) & (k <= slots[None, :, None])  # (B, T, E)
        visible = prompt[:, None, :] | own
        return slots, positions, visible[:, None], real

    def commit_chunk(self, lengths: torch.Tensor, T: int) -> None:
        self.pad += (T - lengths.to(self.device))
        self.length += T
        self.position.fill_(self.length)

    def check_room(self, T: int) -> None:
        """Raise ValueError when T more slots do not fit."""
        if self.length + T > self.max_seq_len:
            raise ValueError(
                f"expected at most {self.max_seq_len} tokens in the cache, got "
                f"{self.length} + {T} = {self.length + T}"
            )

    def plan_decode(self, extent: Optional[int] = None):
        """:meth:`plan_chunk` for one real token per row (T = 1, every row real), from
        tensors alone: the slot is :attr:`position` (a 0-dim tensor on the cache's device),
        so no Python number reaches a shape or an offset and one compiled graph (or CUDA
        graph) serves every decode position; its mask covers every slot. Same values as
        ``plan_chunk(ones, 1)``; the caller checks the room (:meth:`check_room`) and advances
        :attr:`position` and :attr:`length` after the step
        (:func:`~flamingo_rt.runtime.engine.decode_step`). ``extent``: the mask covers only
        the first ``extent`` (> :attr:`position`) slots, which are all the attention then
        reads (eager decoding: a shape that changes at every step).
        """
        slots = self.position.view(1)
        self.key_valid.index_fill_(1, slots, True)
        positions = (self.position - self.pad).clamp_min(0)[:, None]  # (B, 1)
        E = self.max_seq_len if extent is None else extent
        visible = (self.slots[:E] <= self.position)[None, :] & self.key_valid[:, :E]  # (B, E)
        real = torch.ones(self.batch, 1, dtype=torch.bool, device=self.device)
        return slots, positions, visible[:, None, None, :], real
