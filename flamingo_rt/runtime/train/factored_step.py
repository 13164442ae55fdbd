"""Clipping and the optimizer update of a step whose large weight gradients are held as
factors (:mod:`flamingo_rt.ops.factored_grads`) instead of in ``.grad``.

- :func:`clip_`: the total gradient norm over the dense ``.grad``s and the factored gradients
  (their norms from Gram matrices, never materialized), and the clip coefficient applied to
  both (the factored ones by scaling their factor lists) exactly as
  ``torch.nn.utils.clip_grad_norm_`` computes it.
- :func:`step_`: the optimizer's step for the dense gradients, then each factored parameter
  updated a block of rows at a time: the block's gradient made into one small buffer
  (:data:`ROW_BLOCK_BYTES`) and handed with the block's rows of the parameter and of its
  Adam moments to ``torch.optim.adam.adam`` -- the functional the optimizer itself calls,
  with the optimizer's group settings and the parameter's step count, so the update is the
  optimizer's own, elementwise, on the same gradient values (up to the products' summation
  order). A parameter without optimizer state yet (its first step) gets its dense gradient
  once and the optimizer's own ``step()``, which creates the state as it always does.

Only for Adam / AdamW without amsgrad, ``capturable``, ``differentiable`` or a grad scaler
(:func:`supports`): their update is elementwise, so rows can be updated apart.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch.optim.adam import adam as _adam

from ...ops.factored_grads import FactoredGrads

__all__ = ["supports", "clip_", "step_", "ROW_BLOCK_BYTES"]

#: float32 bytes of the gradient block made at a time for a factored parameter's update: the
#: block's product has only R (the step's rows) as its inner dimension, and runs faster in
#: larger blocks (OpenFlamingo-3B's block FF, 512 rows, bf16: 8 MiB blocks 26 ms per FF's
#: two weights, 16 MiB 21 ms, 32 MiB 19 ms)
ROW_BLOCK_BYTES = 16 << 20


def supports(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`step_` can update ``optimizer``'s parameters from factored gradients."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return False
    return all(not g.get("amsgrad") and not g.get("capturable") and not g.get("differentiable")
               and not g.get("maximize") for g in optimizer.param_groups)


def clip_(params: Iterable[Tensor], store: FactoredGrads, max_norm: Optional[float]) -> Tensor:
    """The L2 norm of all gradients -- the dense ``.grad`` of ``params`` and the store's --
    as a float32 scalar; with ``max_norm``, every gradient scaled by
    ``min(1, max_norm / (norm + 1e-6))`` (``clip_grad_norm_``'s coefficient)."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    if grads:
        sq = sq + torch.nn.utils.get_total_norm(grads, 2.0).double().cpu() ** 2
    for p in store.params():
        sq = sq + store.sq_norm(p).cpu()
    total = sq.sqrt().float()
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        store.scale_(coef)
    return total


def step_(optimizer: torch.optim.Optimizer, store: FactoredGrads) -> None:
    """``optimizer.step()`` for the dense gradients, then every parameter of ``store`` updated
    from its factors (see the module docstring); the store is emptied, every ``.grad`` None."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    # one block buffer per (dtype, device) for all the parameters' updates: a fresh one per
    # parameter page-faulted 16 MiB each time (bf16 connector step of issue 7: 16 factored
    # weights, 256 MiB of first touches, ~200 ms of the profile's copies into it); freed with
    # the step, so it never sits beside the next backward's gradients
    bufs: dict = {}
    for p in store.params():
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has a factored gradient but is not in the optimizer")
        state = optimizer.state.get(p)
        if not state:  # the first step: the optimizer creates the state itself
            p.grad = store.dense(p)
            optimizer.step()
            p.grad = None
        else:
            _update_rows(p, group, state, store, bufs)
        store.pop(p)


def _block_buffer(bufs: dict, shape: tuple, p: Tensor) -> Tensor:
    """A ``shape`` view of the step's flat buffer for p's dtype and device (grown when short)."""
    n = math.prod(shape)
    key = (p.dtype, p.device)
    flat = bufs.get(key)
    if flat is None or flat.numel() < n:
        bufs[key] = None
        flat = bufs[key] = torch.empty(n, dtype=p.dtype, device=p.device)
    return flat[:n].view(shape)


def _update_rows(p: Tensor, group: dict, state: dict, store: FactoredGrads, bufs: dict) -> None:
    rows = max(1, ROW_BLOCK_BYTES // max(1, p[0].numel() * 4))
    buf = _block_buffer(bufs, (min(rows, p.shape[0]),) + tuple(p.shape[1:]), p)
    beta1, beta2 = group["betas"]
    with torch.no_grad():
        for r0 in range(0, p.shape[0], rows):
            r1 = min(p.shape[0], r0 + rows)
            g = store.rows_into(p, r0, r1, buf[:r1 - r0])
            step = state["step"].clone()  # the functional counts it up: each block from the same count
            _adam(
                [p[r0:r1]], [g], [state["exp_avg"][r0:r1]], [state["exp_avg_sq"][r0:r1]], [], [step],
                foreach=group["foreach"], capturable=False, differentiable=False, fused=group["fused"],
                grad_scale=None, found_inf=None, has_complex=False,
                decoupled_weight_decay=group.get("decoupled_weight_decay", False),
                amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False)
        state["step"].add_(1)
