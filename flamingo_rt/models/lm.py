"""LLaMA-family decoder-only language model with slots for gated cross-attention blocks.

The architecture follows the LLaMA family as Hugging Face ``transformers`` implements
``LlamaForCausalLM`` (pre-norm RMSNorm, rotary position embeddings with the
"rotate half" convention, grouped-query attention, SwiGLU feed-forward), and parameter
names are the Hugging Face names without the leading ``model.``, so HF LLaMA-layout
safetensors load by name (:meth:`DecoderLM.from_hf`) and can be written back
(:meth:`DecoderLM.to_hf_state_dict`, :func:`lm_config_to_hf`).

Flamingo inserts GATED XATTN-DENSE blocks *before* some decoder layers. They live in
``DecoderLM.xattn`` (an ``nn.ModuleDict`` keyed by the decoder layer index as a string)
and are called as ``h = block(h, **xattn_kwargs)`` with ``h`` of shape (B, T, dim).

Shapes used below: B batch, T tokens, D = ``cfg.dim``, H = ``cfg.n_heads``,
Hkv = ``cfg.n_kv_heads``, Dh = ``cfg.head_dim``, V = ``cfg.vocab_size``.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from .._values import is_integer_tensor
from ..ops import half_widening
from ..ops.decode_attention import cached_attention
from ..ops.linear import Linear
from ..ops.silu_mul import silu_mul

from .config import XATTN_PLACEMENTS, LMConfig
from .token_rows import TokenRows

__all__ = [
    "RMSNorm",
    "RotaryEmbedding",
    "rotate_half",
    "apply_rotary",
    "Attention",
    "MLP",
    "DecoderLayer",
    "DecoderLM",
    "xattn_layer_indices",
    "lm_config_from_hf",
    "lm_config_to_hf",
    "hf_key_to_ours",
    "our_key_to_hf",
    "expected_hf_keys",
]



# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """Root-mean-square layer norm as LLaMA uses it.

    ``y = weight * (x / sqrt(mean(x**2, -1) + eps))``, the normalisation computed in
    float32 and cast back to the input dtype before the (learned, no bias) scale.

    Args:
        dim: size D of the last axis.
        eps: added to the mean square inside the square root.

    Shapes: x (..., D) any float dtype -> (..., D) (dtype of ``weight * x``).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        xf = x.float()
        inv_rms = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * (xf * inv_rms).to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (LLaMA / "rotate half" convention).

    ``inv_freq[i] = 1 / theta ** (2i / Dh)`` for i in [0, Dh/2), computed in float32.
    The frequencies are not a buffer, so ``module.to(dtype)`` never rounds them; they
    are cached per device.

    Args:
        head_dim: Dh (even).
        theta: the RoPE base.

    ``forward(position_ids)``: position_ids (B, T) integer -> (cos, sin), each
    (B, T, Dh) float32, with the angle table repeated twice along the last axis.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = int(head_dim)
        self.theta = float(theta)
        self._inv_freq: Dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """(Dh/2,) float32 inverse frequencies on ``device``."""
        device = torch.device(device if device is not None else "cpu")
        tracing = torch.compiler.is_compiling()
        t = None if tracing else self._inv_freq.get(device)
        if t is None:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
            t = (1.0 / (self.theta ** exponents)).to(device)
            if not tracing:  # no attribute writes inside torch.compile / torch.export
                self._inv_freq[device] = t
        return t

    def forward(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., Dh) -> (..., Dh): ``[x1, x2] -> [-x2, x1]`` with x1, x2 the two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, heads, T, Dh) by the tables ``cos``/``sin`` (B, T, Dh).

    The tables are cast to ``x.dtype`` first (as Hugging Face does), so the rotation runs
    in the activation dtype. Returns (B, heads, T, Dh) in ``x.dtype``.
    """
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (H query heads share Hkv K/V heads).

    Submodules ``q_proj`` (D -> H*Dh), ``k_proj`` / ``v_proj`` (D -> Hkv*Dh), ``o_proj``
    (H*Dh -> D); biases when ``cfg.attention_bias``. Attention runs through
    ``torch.nn.functional.scaled_dot_product_attention`` with scale Dh**-0.5.

    ``forward(x, cos, sin, attn_mask=None)``:
        x (B, T, D); cos, sin (B, T, Dh) float32 rotary tables; attn_mask None (plain
        causal) or bool (B, 1, T, T), True where a query may attend a key (it must
        already include causality). Returns (B, T, D) in the dtype of x / the weights.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        cache_slots: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        if kv_cache is not None:
            # Static cache (B, Hkv, S, Dh): write this chunk's keys/values at its slots,
            # then attend over the first E slots; ``attn_mask`` (B, 1, T, E), E <= S, says
            # which are visible (the slots past E are not read).
            k_buf, v_buf = kv_cache
            k_buf.index_copy_(2, cache_slots, k.to(k_buf.dtype))
            v_buf.index_copy_(2, cache_slots, v.to(v_buf.dtype))
            if attn_mask is None:
                raise ValueError("a cached attention step needs attn_mask (B, 1, T, E)")
            E = attn_mask.shape[-1]
            k, v = (k_buf, v_buf) if E == k_buf.shape[2] else (k_buf[:, :, :E], v_buf[:, :, :E])
        widen = half_widening.attention_wanted(q, k, v) if attn_mask is None else None
        if widen is not None:  # training in bf16 / fp16 where their products are slow
            out = half_widening.scaled_dot_product_attention(
                q, k, v, widen, is_causal=True, scale=self.scale, enable_gqa=rep > 1
            )
        elif attn_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=rep > 1
            )
        else:
            out = cached_attention(q, k, v, attn_mask, self.scale)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    x (..., D) -> (..., D); hidden width ``cfg.intermediate_size``; biases when
    ``cfg.mlp_bias``.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = Linear(cfg.dim, cfg.intermediate_size, bias=bias)
        self.up_proj = Linear(cfg.dim, cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer:
    ``h = h + self_attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h))``.

    ``forward(h, cos, sin, attn_mask=None)``: h (B, T, D) -> (B, T, D); see
    :class:`Attention` for the other arguments.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        cache_slots: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, kv_cache, cache_slots)
        return h + self.mlp(self.post_attention_layernorm(h))


# --------------------------------------------------------------------------- placement


def xattn_layer_indices(n_layers: int, every: int, placement: str = "openflamingo") -> List[int]:
    """Indices i of the decoder layers that get a cross-attention block *before* them.

    ``placement="openflamingo"``: (i + 1) % every == 0 (OpenFlamingo's convention: with
    every=4 -> 3, 7, 11, ...). ``placement="first"``: i % every == 0 (0, 4, 8, ...).
    ``every=1`` gives every layer under both placements.
    """
    if placement not in XATTN_PLACEMENTS:
        raise ValueError(f"unknown xattn placement {placement!r}; expected one of {XATTN_PLACEMENTS}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"xattn 'every' must be an integer >= 1, got {every!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 0:
        raise ValueError(f"n_layers must be an integer >= 0, got {n_layers!r}")
    if placement == "openflamingo":
        return [i for i in range(n_layers) if (i + 1) % every == 0]
    return [i for i in range(n_layers) if i % every == 0]


# --------------------------------------------------------------------------- the model


class DecoderLM(nn.Module):
    """LLaMA-family decoder-only LM with optional gated cross-attention blocks.

    Submodules: ``embed_tokens`` (V x D), ``layers`` (``cfg.n_layers`` x
    :class:`DecoderLayer`), ``norm`` (:class:`RMSNorm`), ``lm_head`` (D -> V, no bias;
    its weight *is* ``embed_tokens.weight`` when ``cfg.tie_embeddings``), ``rotary``
    (no parameters) and ``xattn`` (``nn.ModuleDict``, empty by default; key ``str(i)``
    holds the block run before decoder layer i); while some vocabulary rows train on
    their own (:meth:`train_token_rows`), ``token_rows``
    (:class:`~flamingo_rt.models.token_rows.TokenRows`), else None.

    Attribute ``check_inputs`` (default True): validate token ids (integer dtype, range
    [0, V)) on every forward; the range check reads the ids' min/max (a device sync on a
    GPU). It is skipped while ``torch.compile`` traces.

    Attribute ``activation_checkpointing`` (default False): when training with gradients,
    each (cross-attention block, decoder layer) pair keeps only its input and recomputes its
    activations in the backward pass (``torch.utils.checkpoint``, non-reentrant).
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.xattn = nn.ModuleDict()
        self.token_rows: Optional[TokenRows] = None
        self.check_inputs = True
        self.activation_checkpointing = False

    # ------------------------------------------------------------------ helpers

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the same Parameter as ``embed_tokens.weight`` when
        ``cfg.tie_embeddings`` (needed again after loading with ``assign=True``)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ------------------------------------------------------------------ trained vocabulary rows

    def train_token_rows(self, ids: Sequence[int], in_tables: bool = True) -> TokenRows:
        """Train only the vocabulary rows ``ids`` of the embedding table (and of an untied
        ``lm_head``), as their own (k, D) parameters ``token_rows.embed`` / ``token_rows.head``
        (:class:`~flamingo_rt.models.token_rows.TokenRows`): the tables themselves must be
        frozen (``requires_grad`` False); their rows ``ids`` follow the parameters (copied in
        by every :meth:`forward` / :meth:`forward_cached` where they differ, and by
        :meth:`merge_token_rows`; a compiled forward does not copy). ``in_tables=False`` (FSDP2,
        whose sharded tables cannot be written from a forward) never copies them: every use of
        the tables corrects for the trained rows instead (:attr:`TokenRows.in_tables`).
        Replaces earlier trained rows (merged first). Returns the new :class:`TokenRows`."""
        tables = [self.embed_tokens.weight] + ([] if self.lm_head.weight is self.embed_tokens.weight
                                               else [self.lm_head.weight])
        if any(t.requires_grad for t in tables):
            raise ValueError("train_token_rows: expected a frozen embedding table and output projection "
                             "(requires_grad False); they train whole here")
        self.merge_token_rows()
        head = None if len(tables) == 1 else self.lm_head.weight
        self.token_rows = TokenRows(ids, self.embed_tokens.weight, head, in_tables=in_tables)
        return self.token_rows

    def sync_token_rows(self) -> None:
        """Copy the trained vocabulary rows into the embedding table and ``lm_head`` where
        they differ (:meth:`forward` and :meth:`forward_cached` do it on every call; a no-op
        while ``torch.compile`` traces)."""
        if self.token_rows is not None and not torch.compiler.is_compiling():
            self.token_rows.sync_(self.embed_tokens.weight, self.lm_head.weight)

    def merge_token_rows(self) -> None:
        """Write the trained rows into the tables and remove ``token_rows`` (a no-op without)."""
        if self.token_rows is not None:
            self.token_rows.sync_(self.embed_tokens.weight, self.lm_head.weight, force=True)
            self.token_rows = None

    @contextlib.contextmanager
    def token_rows_merged(self) -> Iterator[None]:
        """Inside: the trained rows written into the tables and ``token_rows`` detached, so the
        state dict is that of a plain LM (for saving a model folder); restored on exit."""
        rows = self.token_rows
        if rows is None:
            yield
            return
        self.merge_token_rows()
        try:
            yield
        finally:
            self.token_rows = rows

    def head_row_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`~flamingo_rt.ops.linear_cross_entropy` for ``lm_head``'s
        trained rows: ``{"rows": ids, "row_weight": (k, D), "rows_in_weight": bool}``, or {}
        without trained rows."""
        if self.token_rows is None:
            return {}
        return {"rows": self.token_rows.ids, "row_weight": self.token_rows.head_rows,
                "rows_in_weight": self.token_rows.in_tables}

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"expected input_ids as a torch.Tensor, got {type(input_ids).__name__}")
        if not is_integer_tensor(input_ids):
            raise TypeError(f"expected integer input_ids (torch.long), got dtype {input_ids.dtype}")
        if not self.check_inputs or input_ids.numel() == 0:
            return
        if torch.compiler.is_compiling() or input_ids.device.type == "meta":
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        V = self.cfg.vocab_size
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is out of range for vocab_size {V}: expected ids in [0, {V})"
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: input_ids (B, T) integer -> (B, T, D) in the weight dtype.

        Raises TypeError for non-integer ids and ValueError (naming the offending id and
        the vocabulary size) for ids outside [0, vocab_size)."""
        self._check_ids(input_ids)
        if input_ids.dtype not in (torch.long, torch.int32):
            input_ids = input_ids.long()
        e = self.embed_tokens(input_ids)
        rows = self.token_rows
        if rows is not None and ((torch.is_grad_enabled() and rows.embed.requires_grad) or not rows.in_tables):
            e = rows.embed_rows(input_ids, e)
        return e

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        xattn_kwargs: Optional[Dict[str, Any]] = None,
        return_hidden: bool = False,
        head: bool = True,
        embed_offsets: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Next-token logits.

        Args:
            input_ids: (B, T) integer token ids in [0, V).
            attention_mask: optional (B, T) {0, 1} (any integer dtype) or bool; 0/False
                marks padding keys. Attention is causal plus this key-padding mask.
                Queries at padding positions attend only to themselves (finite, no NaN;
                their outputs are meaningless).
            position_ids: optional (B, T) integer RoPE positions. Default: 0..T-1, or, with
                an attention_mask, ``cumsum(mask) - 1`` clamped at 0 (left padding).
            xattn_kwargs: keyword arguments passed to every cross-attention block, as
                ``h = self.xattn[str(i)](h, **xattn_kwargs)`` before decoder layer i.
            return_hidden: also return the final hidden states (after ``norm``).
            head: False skips ``lm_head`` and returns only the final hidden states (for a
                loss that applies the head itself, chunked: ``ops.linear_cross_entropy``).
            embed_offsets: optional (B, T, D) added to the token embeddings before the first
                layer (stage 2 of the recipe trains the LM to bind words to such offsets, the
                way cross-attention later writes images into the residual stream:
                ``flamingo_rt.recipe.binding``).

        Returns:
            logits (B, T, V) in the dtype of the weights; with ``return_hidden`` a tuple
            ``(logits, hidden)`` with hidden (B, T, D); with ``head=False`` hidden only.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        self.sync_token_rows()
        h = self.embed(input_ids)
        if embed_offsets is not None:
            if tuple(embed_offsets.shape) != (B, T, h.shape[-1]):
                raise ValueError(f"expected embed_offsets of shape (B, T, D) = {(B, T, h.shape[-1])}, "
                                 f"got {tuple(embed_offsets.shape)}")
            h = h + embed_offsets.to(h.dtype)

        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(
                    f"expected attention_mask of shape (B, T) = {(B, T)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_ok = attention_mask.to(device=h.device) != 0  # (B, T) bool
            if position_ids is None:
                position_ids = (key_ok.long().cumsum(-1) - 1).clamp_min(0)
            idx = torch.arange(T, device=h.device)
            causal = idx[:, None] >= idx[None, :]  # (T, T)
            mask = causal[None] & key_ok[:, None, :]  # (B, T, T)
            # A padding query may see no key at all; let it see itself so no row is empty.
            mask = mask | torch.eye(T, dtype=torch.bool, device=h.device)[None]
            mask = mask[:, None]  # (B, 1, T, T)
        if position_ids is None:
            position_ids = torch.arange(T, device=h.device).unsqueeze(0).expand(B, T)
        else:
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            if position_ids.shape[-1] != T or position_ids.shape[0] not in (1, B):
                raise ValueError(
                    f"expected position_ids of shape (B, T) = {(B, T)}, got {tuple(position_ids.shape)}"
                )
            if position_ids.is_floating_point() or position_ids.dtype == torch.bool:
                raise TypeError(f"expected integer position_ids, got dtype {position_ids.dtype}")
            position_ids = position_ids.to(h.device)

        cos, sin = self.rotary(position_ids)
        kw = xattn_kwargs or {}
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if ckpt:
                h = torch.utils.checkpoint.checkpoint(self._layer, i, h, cos, sin, mask, kw, use_reentrant=False)
            else:
                h = self._layer(i, h, cos, sin, mask, kw)
        h = self.norm(h)
        if not head:
            return h
        logits = self.lm_head(h)
        rows = self.token_rows
        if rows is not None and ((torch.is_grad_enabled() and rows.head_rows.requires_grad) or not rows.in_tables):
            logits = rows.head_logits(h, logits)
        if return_hidden:
            return logits, h
        return logits

    def _layer(self, i: int, h: torch.Tensor, cos, sin, mask, kw: Dict[str, Any]) -> torch.Tensor:
        """The cross-attention block before layer ``i`` (if any), then layer ``i``."""
        key = str(i)
        if key in self.xattn:
            h = self.xattn[key](h, **kw)
        return self.layers[i](h, cos, sin, mask)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        kv_caches: List[Tuple[torch.Tensor, torch.Tensor]],
        cache_slots: torch.Tensor,
        attn_mask: torch.Tensor,
        xattn_kwargs: Optional[Dict[str, Any]] = None,
        last_only: bool = False,
        xattn_layer_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
        run_layers: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """One chunk of tokens against static per-layer key/value caches.

        Args:
            input_ids: (B, T) token ids of the chunk.
            position_ids: (B, T) RoPE positions of the chunk's tokens.
            kv_caches: per decoder layer (k, v) buffers, each (B, Hkv, S, Dh); the chunk's
                keys/values are written at ``cache_slots`` (in place).
            cache_slots: (T,) int64 slot of each chunk token (the same for every row).
            attn_mask: (B, 1, T, E) bool over the caches' first E <= S slots, True where a
                chunk token may attend a slot (causality and padding included; every row
                must allow at least one slot); the slots past E are not read.
            xattn_kwargs: passed to every cross-attention block (see :meth:`forward`).
            last_only: return only the logits of the last chunk position, (B, 1, V).
            xattn_layer_kwargs: per block (key ``str(i)``) extra keyword arguments, e.g.
                its cached media keys/values.
            run_layers: when given, ``run_layers(h, cos, sin)`` runs every block and layer
                (h (B, T, D) embedded, cos / sin (B, T, Dh) rotary tables -> (B, T, D)) in
                place of the modules' loop (the runtime's fused decode step).
        Returns:
            logits (B, T, V) (or (B, 1, V)) in the weights' dtype.
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} (k, v) caches, got {len(kv_caches)}")
        self.sync_token_rows()
        h = self.embed(input_ids)
        cos, sin = self.rotary(position_ids)
        if run_layers is not None:
            h = run_layers(h, cos, sin)
        else:
            kw = xattn_kwargs or {}
            per_layer = xattn_layer_kwargs or {}
            for i, layer in enumerate(self.layers):
                key = str(i)
                if key in self.xattn:
                    h = self.xattn[key](h, **kw, **per_layer.get(key, {}))
                h = layer(h, cos, sin, attn_mask, kv_caches[i], cache_slots)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        logits = self.lm_head(h)
        if self.token_rows is not None and not self.token_rows.in_tables:
            logits = self.token_rows.head_logits(h, logits)
        return logits

    # ------------------------------------------------------------------ cross-attention slots

    def insert_xattn(
        self,
        make_block: Callable[[int], nn.Module],
        every: int,
        placement: str = "openflamingo",
    ) -> List[int]:
        """Create cross-attention blocks ``self.xattn[str(i)] = make_block(i)`` for the
        layer indices of :func:`xattn_layer_indices` and return those indices.

        The blocks are stored as built (their device / dtype are the caller's choice).
        Raises ValueError for a bad placement or ``every``, when the LM already holds
        blocks, or when the rule selects no layer.
        """
        idx = xattn_layer_indices(self.cfg.n_layers, every, placement)
        if len(self.xattn):
            raise ValueError(
                f"this LM already has cross-attention blocks at layers {sorted(self.xattn.keys(), key=int)}; "
                "clear them first (lm.xattn = nn.ModuleDict())"
            )
        if not idx:
            raise ValueError(
                f"every={every} with placement {placement!r} selects no layer of a "
                f"{self.cfg.n_layers}-layer LM"
            )
        for i in idx:
            block = make_block(i)
            if not isinstance(block, nn.Module):
                raise TypeError(f"make_block({i}) must return an nn.Module, got {type(block).__name__}")
            self.xattn[str(i)] = block
        return idx

    # ------------------------------------------------------------------ HF interop

    def to_hf_state_dict(self) -> Dict[str, torch.Tensor]:
        """The LM weights under Hugging Face ``LlamaForCausalLM`` names (``model.`` prefix,
        ``lm_head.weight`` only when untied, as ``save_pretrained`` writes them). The
        cross-attention blocks are not included. Tensors are detached and share storage
        with the model."""
        out: Dict[str, torch.Tensor] = {}
        for name, t in self.state_dict().items():
            hf = our_key_to_hf(name)
            if hf is None:
                continue
            if self.cfg.tie_embeddings and name == "lm_head.weight":
                continue
            out[hf] = t.detach()
        return out

    @classmethod
    def from_hf(
        cls,
        src: Union[str, os.PathLike, nn.Module],
        dtype: Optional[torch.dtype] = None,
    ) -> "DecoderLM":
        """Build a DecoderLM from Hugging Face LLaMA weights.

        Args:
            src: a ``transformers`` ``LlamaForCausalLM`` (anything with ``.config`` and
                ``.state_dict()`` in that layout; its tensors are copied), or a folder with
                ``config.json`` and ``model.safetensors`` or sharded
                ``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``.
                Only safetensors are read.
            dtype: parameter dtype; None keeps the checkpoint's (the dtype of
                ``model.embed_tokens.weight``; every tensor is cast to it).

        Returns a model in eval mode, on the device the source tensors were on (CPU for a
        folder). Raises ValueError for unsupported configs (see :func:`lm_config_from_hf`)
        and, listing them, for missing, unexpected or mis-shaped weights.
        """
        if isinstance(src, nn.Module):
            hf_cfg = src.config.to_dict() if hasattr(src.config, "to_dict") else dict(src.config)
            cfg = lm_config_from_hf(hf_cfg)
            tensors = dict(src.state_dict())
            copy = True
        elif isinstance(src, (str, os.PathLike)):
            folder = Path(src)
            cfg = lm_config_from_hf(_read_json(folder / "config.json"))
            tensors = _read_safetensors_folder(folder)
            copy = False
        else:
            raise TypeError(
                "expected a transformers LlamaForCausalLM or a path to a Hugging Face folder, "
                f"got {type(src).__name__}"
            )
        return cls._from_hf_tensors(cfg, tensors, dtype=dtype, copy=copy)

    @classmethod
    def _from_hf_tensors(
        cls,
        cfg: LMConfig,
        tensors: Mapping[str, torch.Tensor],
        dtype: Optional[torch.dtype] = None,
        copy: bool = False,
    ) -> "DecoderLM":
        # Drop what HF checkpoints may carry but is not a weight (old rotary buffers).
        tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        expected = expected_hf_keys(cfg)
        if cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)  # some tied checkpoints also store it
        missing = [k for k in expected if k not in tensors]
        unexpected = sorted(k for k in tensors if k not in expected)
        mis_shaped = [
            f"{k}: expected {tuple(shape)}, got {tuple(tensors[k].shape)}"
            for k, shape in expected.items()
            if k in tensors and tuple(tensors[k].shape) != tuple(shape)
        ]
        if missing or unexpected or mis_shaped:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {_short_list(missing)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)}: {_short_list(unexpected)}")
            if mis_shaped:
                parts.append(f"mis-shaped {len(mis_shaped)}: {_short_list(mis_shaped)}")
            raise ValueError("Hugging Face LLaMA weights do not match the config: " + "; ".join(parts))

        if dtype is None:
            dtype = tensors["model.embed_tokens.weight"].dtype
        if not dtype.is_floating_point:
            raise ValueError(f"expected a floating dtype, got {dtype}")

        with torch.device("meta"):
            model = cls(cfg)
        sd = {}
        for hf_name in expected:
            t = tensors[hf_name]
            sd[hf_key_to_ours(hf_name)] = t.to(dtype=dtype, copy=copy)
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        model.tie_weights()
        return model.eval()


# --------------------------------------------------------------------------- HF config / names


def _short_list(items: List[str], n: int = 20) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"expected a Hugging Face config at {path}, found none")
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _rope_settings(hf: Mapping[str, Any]) -> Tuple[float, Optional[str], Dict[str, Any]]:
    """(rope_theta, rope type or None for default, the scaling dict) from either the
    transformers-5 ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    theta = hf.get("rope_theta")
    scaling: Dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):
        p = hf.get(key)
        if p is None:
            continue
        if not isinstance(p, Mapping):
            raise ValueError(f"unsupported {key} {p!r}: expected a dict")
        if p and not any(k in p for k in ("rope_type", "type", "rope_theta", "factor")):
            raise ValueError(
                f"unsupported {key} with per-layer-type entries {sorted(p)}; "
                "only a single (default) RoPE is supported"
            )
        if p.get("rope_theta") is not None:
            theta = p["rope_theta"]
        scaling.update(p)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        rope_type = None
    if theta is None:
        theta = 10000.0
    return float(theta), rope_type, scaling


def lm_config_from_hf(hf_config: Mapping[str, Any]) -> LMConfig:
    """An :class:`LMConfig` from a Hugging Face LLaMA config dict (``config.json`` or
    ``LlamaConfig.to_dict()``, transformers 4 or 5 layout).

    Raises ValueError naming the feature for what this LM does not implement: RoPE
    scaling other than the default (linear, dynamic, yarn, llama3, ...), a partial rotary
    factor, an activation other than SiLU, sliding-window attention, or a model type
    other than llama / mistral.
    """
    hf = dict(hf_config)
    model_type = hf.get("model_type")
    if model_type not in (None, "llama", "mistral"):
        raise ValueError(f"unsupported model_type {model_type!r}: expected a LLaMA-layout model ('llama')")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is supported")
    theta, rope_type, scaling = _rope_settings(hf)
    if rope_type is not None:
        raise ValueError(
            f"unsupported RoPE scaling type {rope_type!r} (settings {dict(scaling)}): "
            "only the default RoPE is supported"
        )
    prf = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {prf}: only full rotary is supported")
    if hf.get("sliding_window") is not None:
        raise ValueError(f"unsupported sliding_window {hf['sliding_window']}: only full attention is supported")
    for req in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if req not in hf:
            raise ValueError(f"Hugging Face config lacks {req!r}")
    n_heads = int(hf["num_attention_heads"])
    return LMConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        intermediate_size=int(hf.get("intermediate_size") or 0) or None,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=hf.get("head_dim") or None,
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def lm_config_to_hf(cfg: LMConfig) -> Dict[str, Any]:
    """A Hugging Face ``LlamaConfig``-style dict (``config.json``) for ``cfg``, readable by
    transformers 4 (``rope_theta``) and 5 (``rope_parameters``) and by
    :func:`lm_config_from_hf`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
    }


def hf_key_to_ours(name: str) -> Optional[str]:
    """Hugging Face ``LlamaForCausalLM`` parameter name -> ours (``model.x`` -> ``x``,
    ``lm_head.weight`` unchanged); None for names that are not LM weights."""
    if name.startswith("model."):
        return name[len("model."):]
    if name == "lm_head.weight":
        return name
    return None


def our_key_to_hf(name: str) -> Optional[str]:
    """Our parameter name -> Hugging Face's; None for names with no HF counterpart
    (the cross-attention blocks under ``xattn.``)."""
    if name.startswith("xattn."):
        return None
    if name == "lm_head.weight":
        return name
    return "model." + name


def expected_hf_keys(cfg: LMConfig) -> Dict[str, Tuple[int, ...]]:
    """Every Hugging Face weight name an LM with ``cfg`` needs, with its shape
    (``lm_head.weight`` only when the embeddings are untied)."""
    D, Dh, I = cfg.dim, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
    keys: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        lin = {
            "self_attn.q_proj": ((q, D), cfg.attention_bias),
            "self_attn.k_proj": ((kv, D), cfg.attention_bias),
            "self_attn.v_proj": ((kv, D), cfg.attention_bias),
            "self_attn.o_proj": ((D, q), cfg.attention_bias),
            "mlp.gate_proj": ((I, D), cfg.mlp_bias),
            "mlp.up_proj": ((I, D), cfg.mlp_bias),
            "mlp.down_proj": ((D, I), cfg.mlp_bias),
        }
        keys[p + "input_layernorm.weight"] = (D,)
        for name, (shape, bias) in lin.items():
            keys[p + name + ".weight"] = shape
            if bias:
                keys[p + name + ".bias"] = (shape[0],)
        keys[p + "post_attention_layernorm.weight"] = (D,)
    keys["model.norm.weight"] = (D,)
    if not cfg.tie_embeddings:
        keys["lm_head.weight"] = (cfg.vocab_size, D)
    return keys


def _read_safetensors_folder(folder: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a HF folder's ``model.safetensors`` or its sharded set (via
    ``model.safetensors.index.json``), on the CPU."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise FileNotFoundError(f"expected a Hugging Face model folder, {folder} is not a directory")
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        names = sorted(set(weight_map.values()))
        files = [folder / n for n in names]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"shards listed in {index} are missing: {absent}")
    else:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {other}; pickled checkpoints are not read, convert them to safetensors)" if other else ""
        raise FileNotFoundError(
            f"expected model.safetensors or model.safetensors.index.json in {folder}{hint}"
        )
    tensors: Dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in sf.keys():
                if k in tensors:
                    raise ValueError(f"tensor {k!r} appears in more than one shard ({f.name})")
                tensors[k] = sf.get_tensor(k)
    return tensors
