"""Pure prefill / decode functions over a :class:`~flamingo_rt.runtime.cache.StaticCache`."""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from .._values import is_integer
from ..models.flamingo import Flamingo
from . import fused_decode
from .cache import StaticCache
from .media_memo import MediaMemo


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    """(B, T) int64 ids right-aligned with ``pad_id`` on the left, and (B,) lengths."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


def chunk_media_index(cache: StaticCache, ids: torch.Tensor, real: torch.Tensor, image_token_id: int,
                      check: bool = True) -> torch.Tensor:
    """(B, T) int32 media index of a chunk's tokens, continuing each row's image count.
    Raises ValueError when a row would have more ``<image>`` tokens than media."""
    is_img = (ids == image_token_id) & real
    idx = cache.image_count[:, None] + is_img.long().cumsum(1) - 1
    if check and not torch.compiler.is_compiling():
        total = cache.image_count + is_img.long().sum(1)
        bad = (total > cache.num_media).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise ValueError(
                f"row {b} has {int(total[b])} <image> tokens but {int(cache.num_media[b])} media; "
                "expected one image (or clip) per <image> marker"
            )
    return torch.where(real, idx, torch.full_like(idx, -1)).to(torch.int32)


def _forward_planned(model: Flamingo, cache: StaticCache, ids: torch.Tensor, plan: tuple, last_only: bool,
                     backend: Optional[str], check_media: bool) -> torch.Tensor:
    """The chunk (B, T) at the slots of ``plan`` (from ``cache.plan_chunk`` or
    ``cache.plan_decode``): its media index, the LM with every block's cached media K/V,
    the rows' ``<image>`` counts advanced. Returns forward_cached's logits. A one-token
    chunk on the CPU runs its layers through the fused ops where
    :mod:`~flamingo_rt.runtime.fused_decode` allows."""
    slots, positions, mask, real = plan
    img = model.config.image_token_id
    idx = chunk_media_index(cache, ids, real, img, check=check_media)
    lm = model.lm
    fused = fused_decode.layer_plan(lm, cache.dtype) if fused_decode.eligible(lm, cache, ids, backend) else None
    if fused is not None:  # one token per row on the CPU: a fused op per layer and block
        def run_layers(h, cos, sin):
            return fused_decode.run_layers(fused, cache.kv, cache.media_kv, h, cos, sin, slots, mask, idx)

        logits = lm.forward_cached(ids, positions, cache.kv, slots, mask, last_only=last_only, run_layers=run_layers)
    else:
        per_layer = {
            key: dict(media_kv=cache.media_kv[key], media_index=idx, validate=False, backend=backend)
            for key in lm.xattn.keys()
        }
        logits = lm.forward_cached(
            ids, positions, cache.kv, slots, mask, xattn_layer_kwargs=per_layer, last_only=last_only
        )
    cache.image_count += ((ids == img) & real).long().sum(1)
    return logits


def forward_chunk(model: Flamingo, cache: StaticCache, ids: torch.Tensor, lengths: torch.Tensor,
                  last_only: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Append a chunk (B, T) of left-padded token ids (row b has ``lengths[b]`` real ones)
    to the cache and return its logits: (B, V) of the last position when ``last_only``,
    else (B, T, V). Media for the chunk's ``<image>`` tokens must already be in the cache."""
    T = ids.shape[1]
    logits = _forward_planned(model, cache, ids, cache.plan_chunk(lengths, T), last_only, backend, True)
    cache.commit_chunk(lengths, T)
    return logits[:, -1] if last_only else logits


def check_pack_limit(max_pack_tokens) -> None:
    """ValueError unless ``max_pack_tokens`` (the most tokens a pack of scored candidates
    holds) is an integer >= 1."""
    if not is_integer(max_pack_tokens) or max_pack_tokens < 1:
        raise ValueError(f"expected max_pack_tokens an integer >= 1, got {max_pack_tokens!r}")


def pack_continuations(feeds: Sequence[Tuple[int, Sequence[int]]], cap: int) -> Iterator[List[Tuple[int, Sequence[int]]]]:
    """Group ``(key, tokens)`` continuations, in order, into packs of at most ``cap`` tokens
    (a longer one alone): the packs :func:`forward_packed` (or an export's score step) runs."""
    pack: List[Tuple[int, Sequence[int]]] = []
    used = 0
    for item in feeds:
        n = len(item[1])
        if pack and used + n > cap:
            yield pack
            pack, used = [], 0
        pack.append(item)
        used += n
    if pack:
        yield pack


def forward_packed(model: Flamingo, cache: StaticCache, continuations: Sequence[Sequence[int]],
                   backend: Optional[str] = None) -> List[torch.Tensor]:
    """Run independent continuations of a one-row cache's context as one chunk
    (:meth:`StaticCache.plan_packed_rows`) and return each one's logits, (len_i, V) for
    continuation i: position j predicts its token j + 1. The cache's context is unchanged
    (its bookkeeping is not advanced), so this can be called again for more. The
    continuations must hold no ``<image>`` token (they would take the next media index)."""
    if cache.batch != 1:
        raise ValueError(f"expected a one-row cache for packed continuations, got {cache.batch} rows")
    if not continuations:
        raise ValueError("expected continuations of at least one token, got lengths []")
    return forward_packed_rows(model, cache, [continuations], backend)[0]


def forward_packed_rows(model: Flamingo, cache: StaticCache, rows: Sequence[Sequence[Sequence[int]]],
                        backend: Optional[str] = None) -> List[List[torch.Tensor]]:
    """:func:`forward_packed` for every row of the cache in one chunk
    (:meth:`StaticCache.plan_packed_rows`): ``rows[b]`` are row b's continuations (possibly
    none); returns their logits per row, ``[b][i]`` (len, V). Rows shorter than the longest
    are padded at their end. The cache's context is unchanged."""
    img = model.config.image_token_id
    if any(img in c for row in rows for c in row):
        raise ValueError("expected continuations without <image> tokens")
    lengths = [[len(c) for c in row] for row in rows]
    plan = cache.plan_packed_rows(lengths)
    T = plan[0].shape[0]
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # padding: real is False there, any id will do
    for b, row in enumerate(rows):
        flat = [t for c in row for t in c]
        if flat:
            ids[b, :len(flat)] = torch.tensor(flat, dtype=torch.long)
    logits = _forward_planned(model, cache, ids.to(cache.device), plan, False, backend, False)
    return [list(torch.split(logits[b, :sum(ls)], ls)) if ls else [] for b, ls in enumerate(lengths)]


def decode_tensors(model: Flamingo, cache: StaticCache, tokens: torch.Tensor,
                   backend: Optional[str] = None) -> torch.Tensor:
    """The tensor work of one decode step: feed one token per row (B,) at slot
    ``cache.position``, return the next-token logits (B, V), advance ``cache.position``.

    Capture-safe: shapes depend only on the cache's sizes, every cache write is in place,
    no value goes back to the host, so ``torch.compile(fullgraph=True, dynamic=False)``
    makes one graph for every position (and, on CUDA, one CUDA graph). Run eagerly, the
    attention reads the cache's slots up to this token's only (``cache.length`` + 1). Use
    through :func:`decode_step`, which checks the room and advances ``cache.length``."""
    extent = None if torch.compiler.is_compiling() else cache.length + 1
    logits = _forward_planned(model, cache, tokens[:, None], cache.plan_decode(extent), True, backend, False)
    cache.position.add_(1)
    return logits[:, -1]


def decode_step(model: Flamingo, cache: StaticCache, tokens: torch.Tensor, backend: Optional[str] = None,
                step: Callable = decode_tensors, check_media: bool = True) -> torch.Tensor:
    """Feed one token per row (B,) and return the next-token logits (B, V).

    ``step`` is :func:`decode_tensors` or a compiled version of it (see
    :class:`~flamingo_rt.runtime.generate.Generator`). Raises ValueError when the cache is
    full or (``check_media``) a row's ``<image>`` token has no medium."""
    cache.check_room(1)
    if check_media:
        ids = tokens[:, None].to(cache.device)
        chunk_media_index(cache, ids, torch.ones_like(ids, dtype=torch.bool), model.config.image_token_id)
    logits = step(model, cache, tokens, backend)
    cache.length += 1
    return logits


def encode_rows(model: Flamingo, media_rows: List[List[torch.Tensor]], device, dtype,
                backend: Optional[str] = None, memo: Optional[MediaMemo] = None) -> tuple:
    """Encode each row's media (a list of (F, C, H, W) tensors) once.

    Media with the same frame count and size across all rows go through the vision
    encoder in one call. With a ``memo`` (:class:`~flamingo_rt.runtime.media_memo.MediaMemo`),
    media whose content it holds are not encoded again, equal media among the rows are
    encoded once, and the new ones are added to it. Returns (tokens (B, M_max, N, D),
    counts (B,), frames encoded).
    """
    B = len(media_rows)
    counts = torch.tensor([len(r) for r in media_rows], dtype=torch.long, device=device)
    M = int(counts.max()) if B else 0
    cfg = model.config
    out = torch.zeros(B, M, cfg.resampler.num_latents, cfg.resampler.dim, device=device, dtype=dtype)
    if memo is not None:
        memo.sync(list(model.vision_encoder.parameters()) + list(model.resampler.parameters()))
    groups = {}  # shape -> {key: (medium, [(row, index), ...])}, media to encode
    for b, row in enumerate(media_rows):
        for m, x in enumerate(row):
            group = groups.setdefault(tuple(x.shape), {})
            key = (b, m) if memo is None else memo.key(x)
            if key in group:  # an equal medium earlier in this call
                group[key][1].append((b, m))
                continue
            known = None if memo is None else memo.get(key)
            if known is not None:
                out[b, m] = known
            else:
                group[key] = (x, [(b, m)])
    frames = 0
    for shape, group in groups.items():
        if not group:
            continue
        batch = torch.stack([x for x, _ in group.values()]).to(device=device, dtype=dtype)  # (K, F, C, H, W)
        tokens = model.encode_media(batch[:, None], backend=backend)[:, 0]  # (K, N, D)
        frames += batch.shape[0] * batch.shape[1]
        for (key, (_, places)), t in zip(group.items(), tokens):
            for b, m in places:
                out[b, m] = t
            if memo is not None:
                memo.put(key, t.clone())
    return out, counts, frames
