"""Which parameters train: Flamingo's rule, configurable.

Default: the vision encoder and the LM are frozen (no gradients; the vision encoder in eval
mode, an NFNet with its weight standardization folded once), the resampler and the
cross-attention blocks train, and of the LM's vocabulary only the rows of ``<image>`` and
``<|endofchunk|>`` train (OpenFlamingo's rule), in the embedding and in an untied output
projection, without weight decay. They train as their own (k, D) parameters
(:meth:`~flamingo_rt.models.lm.DecoderLM.train_token_rows`, ``lm.token_rows``), the tables
staying frozen and following them: no (V, D) gradient, AdamW moments or head weight-gradient
product exists (the OpenFlamingo-3B-shaped connector step of ``bench/peers/train_step.py
--token-rows``, 2-core EPYC, float32: 6.75 s a step through masked (V, D) tables, 5.76 s
with the (k, D) parameters, 5.70 s training no rows; open_flamingo 11.45 s). Under FSDP (``separate_rows=False``) the tables themselves keep ``requires_grad``
and :class:`RowGradMask` zeroes every other row of their gradients after the backward pass,
so AdamW leaves those rows bit-identical (the mask works on FSDP2's sharded DTensors); the
Trainer no longer takes that path: under FSDP2 the rows train as (k, D) parameters too, with
the tables left as they are (``rows_in_tables=False``: the sharded tables cannot be written
from a forward) and every use corrected for the rows.

By default under bf16 autocast (``FreezeConfig.frozen_linear_dtype = "auto"``, when the run
loads a model folder; ``"bf16"`` asks for it anywhere, ``"none"`` never; the
:class:`~flamingo_rt.runtime.train.Trainer` applies it after :func:`apply_freeze`) the
frozen LM's linear weights are stored in bfloat16 (:func:`store_frozen_linears`): under
autocast every product casts them to bfloat16 anyway, so the forward and backward are
bit-identical, while the frozen weights take half their memory and no step casts them
again (OpenFlamingo-3B-shaped connector step of ``bench/test_bench_train.py``, bf16: the
memory a step adds 731 -> 629 MiB against open_flamingo's 1239, peak RSS 3891 -> 3497 MiB,
step time 4.14 -> 3.83 s against 5.59-5.74 s; on the 2-core Xeon with AMX of 2026-12-06,
ours' step alone 1.42-1.46 -> 1.30-1.35 s).
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

    @property
    def params(self) -> List[nn.Parameter]:
        """The parameters whose gradients it masks."""
        return [p for p, _ in self.masks]

    def __call__(self) -> None:
        for p, keep in self.masks:
            if p.grad is not None:
                p.grad.mul_(keep.to(p.grad.dtype))


def apply_freeze(model: Flamingo, cfg: FreezeConfig, default_token_ids: Sequence[int],
                 separate_rows: bool = True, rows_in_tables: bool = True) -> Dict[str, List[int]]:
    """Apply ``cfg`` to ``model`` in place. ``default_token_ids``: the rows that train when
    ``cfg.trainable_token_ids`` is None (the tokenizer's ``<image>`` and ``<|endofchunk|>``).
    With the LM frozen, those vocabulary rows train as ``model.lm.token_rows`` (``separate_rows``,
    the default; returns {}; ``rows_in_tables=False`` for FSDP2, whose sharded tables are never
    written: :attr:`~flamingo_rt.models.token_rows.TokenRows.in_tables`), or
    (``separate_rows=False``) through the whole tables, OpenFlamingo's way: returns
    {parameter name: trainable rows} of those tables (for :class:`RowGradMask`)."""
    model.lm.merge_token_rows()  # rows trained before: into the tables, before flags are reset
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
        if separate_rows:
            model.lm.train_token_rows(sorted({int(r) for r in rows}), in_tables=rows_in_tables)
            return restricted
        seen = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in _ROW_PARAMS and id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                restricted[name] = sorted({int(r) for r in rows})
    return restricted


def store_frozen_linears(model: Flamingo, dtype: torch.dtype) -> List[str]:
    """Store the weights and biases of the LM's frozen ``nn.Linear`` layers in ``dtype`` (in
    place; the cross-attention blocks and any parameter that trains, the embedding table and
    an output projection tied to it excepted). For training under autocast in ``dtype``: the
    products see the same values as autocast's per-use casts of float32 weights, so the
    results are bit-identical. Outside autocast these layers then need ``dtype`` inputs, and
    the model's state holds their rounded values (:class:`~flamingo_rt.runtime.train.Trainer`
    writes the originals back into its final model folder). Returns the converted
    parameters' names (``model.named_parameters`` names)."""
    skip = {id(p) for p in model.lm.xattn.parameters()} | {id(model.lm.embed_tokens.weight)}
    names: List[str] = []
    for mname, mod in model.lm.named_modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) in skip:
            continue
        params = {k: p for k, p in (("weight", mod.weight), ("bias", mod.bias)) if p is not None}
        if any(p.requires_grad for p in params.values()) or all(p.dtype == dtype for p in params.values()):
            continue
        for k, p in params.items():
            setattr(mod, k, nn.Parameter(p.detach().to(dtype), requires_grad=False))
            names.append(f"lm.{mname}.{k}")
    return names
