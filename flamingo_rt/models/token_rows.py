"""Trainable rows of a frozen vocabulary: a few rows of the token embedding (and of an untied
output projection) trained as their own small parameters.

Flamingo trains, of its frozen LM's vocabulary, only the rows of the tokens it adds
(``<image>``, ``<|endofchunk|>``). OpenFlamingo makes the whole (V, D) embedding trainable and
multiplies all other rows of its gradient by 0 after each backward pass; for k trained rows
that costs a (V, D) float32 gradient and AdamW's two (V, D) moments (768 MiB at 32,000 x
2048), an embedding backward writing V x D, the mask, the norm and AdamW's update over all V
rows every step, and, for an untied output projection, the head's weight gradient, a
(V x N) x (N x D) product for N tokens (67 GFLOP for 2 x 256 tokens over 32,000 x 2048) of
which k rows are kept.

:class:`TokenRows` holds the k rows as (k, D) parameters (``embed``, and ``head`` for an
untied output projection); the full tables stay frozen and hold the same values in those
rows (:meth:`TokenRows.sync_` copies them in where they differ; :class:`~flamingo_rt.models.lm.DecoderLM`
calls it at each forward). Gradients reach only the (k, D)
parameters:

- the embedding: positions whose token is one of the k take their vector from ``embed``
  (:meth:`TokenRows.embed_rows`), so the gradient of those positions lands in ``embed``;
- the head, in the chunked loss: :func:`flamingo_rt.ops.linear_cross_entropy` with ``rows``
  and ``row_weight`` takes the k columns of each chunk's logit gradient against the hidden
  states (k x N x D FLOPs);
- the head, where logits are made (:meth:`TokenRows.head_logits`): the k columns recomputed
  from ``head`` and put in place of the frozen product's.

Training these is training the full tables with the other rows' gradients masked (the same
gradients, norm and AdamW updates for the k rows, the other rows bit-identical); only the
summation order of the k rows' gradients differs.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TokenRows"]


class TokenRows(nn.Module):
    """The trained rows ``ids`` of a frozen embedding table (and of an untied output projection).

    Args:
        ids: the token ids whose rows train (distinct, in [0, V)).
        embed_weight: the frozen embedding table (V, D); ``embed`` starts as its rows.
        head_weight: the frozen output projection (V, D) when it is not the embedding table
            (untied), else None (the head then uses ``embed``: tied).

    Parameters: ``embed`` (k, D), ``head`` (k, D) when untied, float32 (or the tables' dtype
    when that is wider). Buffers: ``ids`` (k,) int64 (persistent: a checkpoint of these
    parameters says which rows they are, and loading one made for other rows raises),
    ``slot`` (V,) int64, the row of ``embed`` of each token or -1 (not saved).
    """

    def __init__(self, ids: Sequence[int], embed_weight: Tensor, head_weight: Optional[Tensor] = None,
                 in_tables: bool = True):
        super().__init__()
        #: the tables hold the trained rows (:meth:`sync_` at each forward). False where the
        #: tables cannot be written in place (FSDP2 shards them; a write into a forward's
        #: gathered copy would be lost): the tables keep their old rows and every use corrects
        #: for them (the embedding's positions, the head's columns and the loss's hidden-state
        #: gradient take the trained rows: :func:`~flamingo_rt.ops.linear_cross_entropy`'s
        #: ``rows_in_weight=False``)
        self.in_tables = bool(in_tables)
        V, D = embed_weight.shape
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("expected at least one token id to train, got none")
        if len(set(ids)) != len(ids):
            raise ValueError(f"expected distinct token ids, got {ids}")
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise ValueError(f"token ids {bad} are out of range for a vocabulary of {V}")
        if head_weight is not None and tuple(head_weight.shape) != (V, D):
            raise ValueError(f"expected an output projection of shape {(V, D)}, got {tuple(head_weight.shape)}")
        dev = embed_weight.device
        idx = torch.tensor(ids, dtype=torch.long, device=dev)
        slot = torch.full((V,), -1, dtype=torch.long, device=dev)
        slot[idx] = torch.arange(len(ids), device=dev)
        self.register_buffer("ids", idx)
        self.register_buffer("slot", slot, persistent=False)
        dtype = torch.promote_types(embed_weight.dtype, torch.float32)
        self.embed = nn.Parameter(embed_weight.detach()[idx].to(dtype).clone())
        self.head: Optional[nn.Parameter] = None
        if head_weight is not None:
            self.head = nn.Parameter(head_weight.detach()[idx].to(torch.promote_types(head_weight.dtype,
                                                                                      torch.float32)).clone())

    @property
    def head_rows(self) -> Tensor:
        """The output projection's trained rows (k, D): ``head``, or ``embed`` when tied."""
        return self.embed if self.head is None else self.head

    def extra_repr(self) -> str:
        return f"ids={self.ids.tolist()}, dim={self.embed.shape[1]}, tied={self.head is None}"

    # ------------------------------------------------------------------ the tables

    @torch.no_grad()
    def sync_(self, embed_weight: Tensor, head_weight: Tensor, force: bool = False) -> None:
        """Copy the trained rows into the frozen tables (in place, rounded to their dtypes)
        where they differ (``force``: always; without it a no-op when not :attr:`in_tables`).
        ``head_weight`` may be ``embed_weight`` (tied).
        Comparing first (2 x k x D reads) leaves the tables untouched, their version counters
        too, while the parameters are unchanged (autograd graphs that saved a table stay
        valid)."""
        if not (force or self.in_tables):
            return
        pairs = [(embed_weight, self.embed)]
        if head_weight is not embed_weight:
            pairs.append((head_weight, self.head_rows))
        for table, rows in pairs:
            new = rows.detach().to(table.dtype)
            if force or not torch.equal(table.index_select(0, self.ids), new):
                table.index_copy_(0, self.ids, new)

    def write_into(self, state: Dict[str, Tensor], embed_key: str, head_key: Optional[str]) -> None:
        """Write the trained rows into the tensors ``state[embed_key]`` (and ``state[head_key]``
        when given) of a state dict (in place, in their dtypes)."""
        with torch.no_grad():
            e = state[embed_key]
            e[self.ids.to(e.device)] = self.embed.detach().to(e.device, e.dtype)
            if head_key is not None and head_key in state and state[head_key] is not e:
                h = state[head_key]
                h[self.ids.to(h.device)] = self.head_rows.detach().to(h.device, h.dtype)

    # ------------------------------------------------------------------ forward pieces

    def embed_rows(self, input_ids: Tensor, embedded: Tensor) -> Tensor:
        """``embedded`` (B, T, D), the frozen table's lookup of ``input_ids`` (B, T), with the
        positions of trained tokens taken from ``embed`` (differentiable in ``embed``)."""
        slot = self.slot[input_ids]
        rows = F.embedding(slot.clamp_min(0), self.embed).to(embedded.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, embedded)

    def head_logits(self, h: Tensor, logits: Tensor) -> Tensor:
        """``logits`` (..., V), the frozen head's product of ``h`` (..., D), with the trained
        columns recomputed from the trained rows (differentiable in them)."""
        cols = F.linear(h, self.head_rows.to(h.dtype))  # under autocast both operands are cast alike
        return logits.index_copy(logits.dim() - 1, self.ids, cols.to(logits.dtype))

    # ------------------------------------------------------------------ checkpoints

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "ids"
        if key in state_dict:
            got = [int(i) for i in state_dict[key].tolist()]
            if got != self.ids.tolist():
                raise ValueError(f"these trained vocabulary rows are for token ids {self.ids.tolist()}, "
                                 f"the state being loaded holds rows of token ids {got}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
