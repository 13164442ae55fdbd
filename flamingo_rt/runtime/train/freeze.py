"""Which parameters train: Flamingo's rule, configurable.

Default: the vision encoder and the LM are frozen (no gradients; the vision encoder in eval
mode, an NFNet with its weight standardization folded once), the resampler and the
cross-attention blocks train, and of the LM's vocabulary only the rows of ``<image>`` and
``<|endofchunk|>`` train (OpenFlamingo's rule): the embedding (and an untied output
projection) keeps ``requires_grad``, :class:`RowGradMask` zeroes every other row of its
gradient after the backward pass, and it is excluded from weight decay, so AdamW leaves
those rows bit-identical. The mask works on plain tensors and on FSDP2's sharded DTensors.

Optionally (``FreezeConfig.frozen_linear_dtype = "bf16"``, for bf16 autocast training) the
frozen LM's linear weights are stored in bfloat16 (:func:`store_frozen_linears`): under
autocast every product casts them to bfloat16 anyway, so the forward and backward are
bit-identical, while the frozen weights take half their memory and no step casts them
again (OpenFlamingo-3B-shaped training-step benchmark, bf16: the memory a step adds
731 -> 629 MiB, the resident weights 294 MiB less).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ...models.flamingo import Flamingo
from .config import FreezeConfig

__all__ = ["apply_freeze", "RowGradMask", "store_frozen_linears", "FROZEN_LINEAR_DTYPES"]

FROZEN_LINEAR_DTYPES = {"bf16": torch.bfloat16}

_ROW_PARAMS = ("lm.embed_tokens.weight", "lm.lm_head.weight")


class RowGradMask:
    """Keeps only some rows of some parameters' gradients (the rest exactly 0).

    Args:
        model: the module whose parameters are named in ``rows`` (after any FSDP wrapping,
            so that the parameters are the ones the optimizer holds).
        rows: {parameter name: row indices that train}.
    """

    def __init__(self, model: nn.Module, rows: Dict[str, Sequence[int]]):
        params = dict(model.named_parameters(remove_duplicate=False))
        self.masks = []
        for name, r in rows.items():
            p = params[name]
            keep = torch.zeros(p.shape[0], 1, dtype=torch.float32)
            keep[list(r)] = 1
            if hasattr(p, "device_mesh"):  # an FSDP2 DTensor: shard the mask like the parameter
                from torch.distributed.tensor import distribute_tensor

                keep = distribute_tensor(keep.expand(tuple(p.shape)).contiguous().to(p.device_mesh.device_type),
                                         p.device_mesh, p.placements)
            else:
                keep = keep.to(p.device)
            self.masks.append((p, keep))

    def __call__(self) -> None:
        for p, keep in self.masks:
            if p.grad is not None:
                p.grad.mul_(keep.to(p.grad.dtype))


def apply_freeze(model: Flamingo, cfg: FreezeConfig, default_token_ids: Sequence[int]) -> Dict[str, List[int]]:
    """Apply ``cfg`` to ``model`` in place. ``default_token_ids``: the rows that train when
    ``cfg.trainable_token_ids`` is None (the tokenizer's ``<image>`` and ``<|endofchunk|>``).
    Returns {parameter name: trainable rows} of the row-restricted parameters (for
    :class:`RowGradMask`)."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.freeze_backbones(vision=cfg.vision, lm=cfg.lm)
    if cfg.resampler:
        model.resampler.requires_grad_(False)
    if cfg.xattn:
        model.lm.xattn.requires_grad_(False)
    restricted: Dict[str, List[int]] = {}
    rows: Optional[Sequence[int]] = cfg.trainable_token_ids
    if rows is None:
        rows = list(default_token_ids)
    if cfg.lm and rows:
        V = model.lm.cfg.vocab_size
        bad = [r for r in rows if not 0 <= int(r) < V]
        if bad:
            raise ValueError(f"trainable_token_ids {bad} are out of range for vocab_size {V}")
        seen = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in _ROW_PARAMS and id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                restricted[name] = sorted({int(r) for r in rows})
    if cfg.frozen_linear_dtype is not None:  # after the row-trained projections regained requires_grad
        store_frozen_linears(model, FROZEN_LINEAR_DTYPES[cfg.frozen_linear_dtype])
    return restricted


def store_frozen_linears(model: Flamingo, dtype: torch.dtype) -> int:
    """Store the weights and biases of the LM's frozen ``nn.Linear`` layers in ``dtype`` (in
    place; the cross-attention blocks and any parameter that trains, the embedding table and
    an output projection tied to it excepted). For training under autocast in ``dtype``: the
    products see the same values as autocast's per-use casts of float32 weights, so the
    results are bit-identical. Outside autocast these layers then need ``dtype`` inputs.
    Returns the number of layers converted."""
    skip = {id(p) for p in model.lm.xattn.parameters()} | {id(model.lm.embed_tokens.weight)}
    n = 0
    for mod in model.lm.modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) in skip:
            continue
        params = [p for p in (mod.weight, mod.bias) if p is not None]
        if any(p.requires_grad for p in params) or all(p.dtype == dtype for p in params):
            continue
        mod.weight = nn.Parameter(mod.weight.detach().to(dtype), requires_grad=False)
        if mod.bias is not None:
            mod.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        n += 1
    return n
