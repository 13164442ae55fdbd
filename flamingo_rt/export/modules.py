"""The pieces of a Flamingo model that a host runs, as export-ready modules.

Both are pure functions of their inputs apart from in-place writes into caches the host
owns (so one loaded package serves any number of sessions):

* :class:`MediaEncoderStep`: a batch of media's pixels (N media of F frames) -> every
  cross-attention layer's keys and values for each (vision encoder, Perceiver Resampler,
  ``to_kv`` of each block).
* :class:`TokenStep`: a chunk of T tokens (T = 1 when decoding) at positions
  ``start .. start + T - 1`` -> the next-token logits of its last position, writing the
  chunk's self-attention keys/values into the host's KV cache.
* :class:`DecodeStep`: the token step at T = 1; on the CPU, with stock modules, its
  layers are our fused decode ops (one C++ call per decoder layer and per block).
* :class:`ScoreStep`: independent continuations of the context, packed into one chunk
  past its end -> the logits of every position (scoring candidates in one run).

Shapes (batch 1; ``X`` cross-attention layers, ``L`` latents per medium, ``H``/``dh`` the
cross-attention heads, ``Hkv``/``Dh`` the LM's key/value heads, ``S`` cache slots, ``M``
media slots):

* media cache ``(X, 2, 1, M, L, H, dh)``: [:, 0] keys, [:, 1] values of each medium;
* KV cache ``(n_layers, 2, 1, Hkv, S, Dh)``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _ext
from ..models.flamingo import Flamingo
from ..runtime import fused_decode


class MediaEncoderStep(nn.Module):
    """pixels (N, F, 3, S_img, S_img) float, normalised as the vision config says: N media of
    F frames each (N images: F = 1) -> their media keys/values (X, 2, N, L, H, dh) in the
    model dtype. All N * F frames go through the vision encoder in one call (a batch of
    images costs a fraction per image of one image alone)."""

    def __init__(self, model: Flamingo):
        super().__init__()
        self.model = model
        self.keys = list(model.lm.xattn.keys())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.model.encode_media(pixels[None])  # (1, N, L, D)
        out = []
        for key in self.keys:
            k, v = self.model.lm.xattn[key].attn.media_kv(tokens)  # (1, N, L, H, dh) each
            out.append(torch.stack([k[0], v[0]]))
        return torch.stack(out)


def _xattn_kwargs(keys: list, media: list, media_index: torch.Tensor) -> dict:
    """``forward_cached``'s per-block arguments: block ``keys[j]`` reads the cached media
    keys / values ``media[j]`` (each (B, M, L, H, dh)) at ``media_index``."""
    return {key: dict(media_kv=media[j], media_index=media_index, validate=False) for j, key in enumerate(keys)}


def _lm_over_caches(step: nn.Module, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    mask: torch.Tensor, media_index: torch.Tensor, kv_cache: torch.Tensor,
                    media_cache: torch.Tensor, last_only: bool) -> torch.Tensor:
    """The LM over a host's caches: ``ids`` (1, T) at RoPE ``positions`` (T,), written at
    cache ``slots`` (T,), attending where ``mask`` (T, S) is true, each block's media keys /
    values from ``media_cache``. Returns ``forward_cached``'s logits."""
    kv = [(kv_cache[i, 0], kv_cache[i, 1]) for i in range(kv_cache.shape[0])]
    media = [(media_cache[j, 0], media_cache[j, 1]) for j in range(media_cache.shape[0])]
    return step.model.lm.forward_cached(ids, positions[None], kv, slots, mask[None, None],
                                        xattn_layer_kwargs=_xattn_kwargs(step.keys, media, media_index),
                                        last_only=last_only)


class TokenStep(nn.Module):
    """(ids (1, T) int64, start (1,) int64, media_index (1, T) int32, kv_cache, media_cache)
    -> logits (1, V) float32 of the chunk's last token; ``kv_cache`` is written in place.

    ``media_index[0, t]`` is the media slot of the latest ``<image>`` at or before token t
    (-1 before the first). Attention sees cache slots ``0 .. start + t``; slots after
    ``start + T`` are never read, so a new conversation simply starts again at 0.
    """

    def __init__(self, model: Flamingo):
        super().__init__()
        self.model = model
        self.keys = list(model.lm.xattn.keys())

    def forward(self, ids: torch.Tensor, start: torch.Tensor, media_index: torch.Tensor,
                kv_cache: torch.Tensor, media_cache: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        S = kv_cache.shape[4]
        positions = start + torch.arange(T, device=ids.device)  # (T,)
        mask = torch.arange(S, device=ids.device)[None, :] <= positions[:, None]  # (T, S)
        logits = _lm_over_caches(self, ids, positions, positions, mask, media_index, kv_cache, media_cache, True)
        return logits[:, -1].float()


class DecodeStep(TokenStep):
    """:class:`TokenStep` for one token (T = 1) of each of B rows (a session: B = 1; beam
    search: B = K beams at the same position): ids (B, 1), start (1,), media_index (B, 1),
    kv_rows (B, n_layers, 2, Hkv, S, Dh) (written), media_rows (B, X, 2, M, L, H, dh) ->
    logits (B, V) float32. The rows come first (for B = 1 the same memory as the session's
    caches, ``kv_cache.squeeze(2)[None]``): every per-layer view then has a static offset
    (AOTInductor of torch 2.13/2.14 dropped the offsets of views whose offset depends on a
    dynamic batch dimension: every layer wrote into layer 0's cache).

    On the CPU, when every decoder layer and block is a stock module with weights of the
    cache's dtype (:func:`~flamingo_rt.runtime.fused_decode.layer_plan`) and the fused path
    is enabled, the layers run as ``flamingo_rt_C::decoder_layer_step_`` /
    ``xattn_block_step_`` (one call each, as the Python runtime decodes); otherwise as the
    modules. :meth:`fused` says which, for the manifest.
    """

    def fused(self, kv_cache: torch.Tensor) -> bool:
        return self._plan(kv_cache) is not None

    def _plan(self, kv_cache: torch.Tensor):
        if kv_cache.device.type != "cpu" or not fused_decode.enabled() or not _ext.load():
            return None
        return fused_decode.layer_plan(self.model.lm, kv_cache.dtype)

    def forward(self, ids: torch.Tensor, start: torch.Tensor, media_index: torch.Tensor,
                kv_rows: torch.Tensor, media_rows: torch.Tensor) -> torch.Tensor:
        B, S = ids.shape[0], kv_rows.shape[4]
        positions = start.expand(B)[:, None]  # (B, 1): every row at the same position
        mask = (torch.arange(S, device=ids.device)[None, :] <= start[:, None]).expand(B, S).contiguous()
        mask = mask[:, None, None]  # (B, 1, 1, S)
        kv = [(kv_rows[:, i, 0], kv_rows[:, i, 1]) for i in range(kv_rows.shape[1])]  # (B, Hkv, S, Dh) each
        media = [(media_rows[:, j, 0], media_rows[:, j, 1]) for j in range(media_rows.shape[1])]
        plan = self._plan(kv_rows)
        if plan is None:
            logits = self.model.lm.forward_cached(ids, positions, kv, start, mask, last_only=True,
                                                  xattn_layer_kwargs=_xattn_kwargs(self.keys, media, media_index))
            return logits[:, -1].float()
        by_key = dict(zip(self.keys, media))

        def run_layers(h, cos, sin):
            return fused_decode.run_layers(plan, kv, by_key, h, cos, sin, start, mask, media_index)

        logits = self.model.lm.forward_cached(ids, positions, kv, start, mask, last_only=True, run_layers=run_layers)
        return logits[:, -1].float()


class ScoreStep(TokenStep):
    """(ids (1, T) int64, start (1,) int64, offset (1, T) int64, media_index (1, T) int32,
    kv_cache, media_cache) -> logits (1, T, V) float32 of every position.

    The chunk packs independent continuations of the context held in slots ``0 .. start -
    1``, one after another at slots ``start ..``: ``offset[0, t]`` is token t's index inside
    its own continuation (0 at each one's first token). Token t sees the context and the
    tokens ``t - offset[0, t] .. t`` of its continuation, never another's, at the position
    ``start + offset[0, t]`` it would have alone (as ``StaticCache.plan_packed_rows``). The
    chunk's keys/values are written at slots ``start .. start + T - 1``, past the context:
    a later step at ``start`` overwrites them, so the context is unchanged.
    """

    def forward(self, ids: torch.Tensor, start: torch.Tensor, offset: torch.Tensor, media_index: torch.Tensor,
                kv_cache: torch.Tensor, media_cache: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        S = kv_cache.shape[4]
        slots = start + torch.arange(T, device=ids.device)  # (T,)
        positions = start + offset[0]  # (T,)
        k = torch.arange(S, device=ids.device)[None, :]  # (1, S)
        first = (slots - offset[0])[:, None]  # (T, 1): the slot of the continuation's first token
        mask = (k < start) | ((k >= first) & (k <= slots[:, None]))  # (T, S)
        return _lm_over_caches(self, ids, positions, slots, mask, media_index, kv_cache, media_cache, False).float()
