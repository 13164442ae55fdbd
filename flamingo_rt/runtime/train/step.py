"""One optimizer step over a weighted mixture: every dataset's batch, its loss scaled by
the dataset's weight, gradients accumulated, then clip and step.

The loss of dataset d is ``sum of token cross-entropies / number of target tokens in d's
*global* batch``, so a global batch split over P processes gives the same gradient as one
process holding it all (each process scales its partial sum by P; DDP averages).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ...ops import factored_grads as _fg
from .. import cpu_cache
from . import factored_step
from .collate import Batch

__all__ = ["NonFiniteLossError", "StepResult", "loss_sum", "train_step"]


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient was NaN or infinite; the step was not applied."""

    def __init__(self, what: str, step: int, value: float):
        super().__init__(
            f"non-finite {what} ({value}) at step {step}; the optimizer step was not applied and no "
            "checkpoint was written (the last good checkpoint is intact). Lower the learning rate, "
            "check the data, or try precision='fp32'."
        )
        self.what = what
        self.step = step
        self.value = value


@dataclass
class StepResult:
    """Per-dataset losses (mean over the global batch's target tokens), the gradient norm
    before clipping, and token counts."""

    losses: Dict[str, float]
    grad_norm: float
    tokens: int
    targets: Dict[str, int] = field(default_factory=dict)


def loss_sum(model: nn.Module, batch: Batch, backend: Optional[str] = None) -> torch.Tensor:
    """Sum of next-token cross-entropies (float32 scalar) over the batch's target tokens.
    Padding is on the right, so no attention mask is needed (causal attention never lets a
    token see the padding after it). The LM head and the loss run chunked
    (``return_logits=False``): the (B, T, vocab) logits are never held."""
    out = model(batch.input_ids, media=batch.media, num_media=batch.num_media, backend=backend,
                labels=batch.labels, return_logits=False, loss_reduction="sum")
    return out.loss


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def train_step(
    model: nn.Module,
    batches: Mapping[str, Batch],
    weights: Mapping[str, float],
    global_targets: Mapping[str, int],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    step: int = 0,
    grad_clip: Optional[float] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
    no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    params=None,
    grad_mask: Optional[Callable[[], None]] = None,
    factored: bool = True,
    cpu_block_cache: bool = True,
) -> StepResult:
    """Accumulate ``weights[d] * loss_d`` over the datasets, clip, step.

    Args:
        model: the (possibly DDP / FSDP wrapped) model.
        batches: this process's rows of each dataset's global batch (already on the device).
        weights: dataset loss weights.
        global_targets: target tokens per dataset in the *global* batch (the loss divisor).
        no_sync: a context-manager factory suppressing gradient synchronisation (DDP's
            ``no_sync``), used for every dataset but the last.
        params: the parameters to clip (default: the model's trainable ones).
        grad_mask: called after the backward passes, before clipping (e.g. a
            :class:`~flamingo_rt.runtime.train.freeze.RowGradMask`).
        factored: let ops keep large weight gradients as the factors of their product
            (:mod:`flamingo_rt.ops.factored_grads`: the cross-attention FF's at small batches),
            clipped and applied a block of rows at a time (:mod:`.factored_step`). Used in one
            process with Adam / AdamW (:func:`factored_step.supports`); the same step as with
            dense gradients up to the products' summation order. Those parameters' ``.grad``
            stay None during the step.
        cpu_block_cache: on the CPU, run the step inside a bounded
            :func:`flamingo_rt.runtime.cpu_cache.scope`: the step's large tensors come from
            blocks that stay mapped from one step to the next instead of fresh pages
            (first-touch page faults), the cache's footprint within the peak of the step's
            live tensors, so the step's peak memory does not grow (the issue-7 connector step
            on the 2-core AMX guest: one step adds 398 -> 402 MiB in bf16, 523 -> 525 MiB in
            float32; bf16 step medians 1.51-1.54 -> 1.43-1.46 s, float32 within the noise).
            The memory stays with the process between steps (``cpu_cache.empty()`` gives it
            back). The same values either way.
    Raises:
        NonFiniteLossError naming the dataset and step when a loss (or the gradient norm) is
        not finite; gradients are cleared and nothing is applied.
    """
    device = next(iter(batches.values())).input_ids.device
    with cpu_cache.scope(bounded=True) if cpu_block_cache and device.type == "cpu" else contextlib.nullcontext():
        return _train_step(model, batches, weights, global_targets, optimizer, scheduler, step, grad_clip,
                           autocast_dtype, backend, no_sync, params, grad_mask, factored, device)


def _train_step(model, batches, weights, global_targets, optimizer, scheduler, step, grad_clip, autocast_dtype,
                backend, no_sync, params, grad_mask, factored, device) -> StepResult:
    world = dist.get_world_size() if _distributed() else 1
    names = list(batches)
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    optimizer.zero_grad(set_to_none=True)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    store = _factored_store(factored, params, optimizer, no_sync, grad_mask)
    tokens = 0
    try:
        with _fg.collecting(store) if store is not None else contextlib.nullcontext():
            for i, name in enumerate(names):
                b = batches[name]
                tokens += b.num_tokens
                last = i == len(names) - 1
                ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
                with ctx:
                    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                        enabled=autocast_dtype is not None):
                        s = loss_sum(model, b, backend)
                    finite = torch.isfinite(s.detach()).to(torch.float64)
                    if _distributed():
                        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                    if not bool(finite):
                        raise NonFiniteLossError(f"loss of dataset {name!r}", step, float(s.detach()))
                    n = max(1, int(global_targets[name]))
                    (s * (float(weights[name]) * world / n)).backward()
                    sums[i] = s.detach().double() / n
        _all_reduce(sums)
        if grad_mask is not None:
            grad_mask()
        if store is not None and len(store):
            norm_t = factored_step.clip_(params, store, grad_clip)
        else:
            norm_t = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
        norm = float(norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t)
        if not math.isfinite(norm):
            raise NonFiniteLossError("gradient norm", step, norm)
        if store is not None and len(store):
            factored_step.step_(optimizer, store)
        else:
            optimizer.step()
    except BaseException:
        optimizer.zero_grad(set_to_none=True)
        raise
    finally:
        if store is not None:
            store.clear()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult({n: float(v) for n, v in zip(names, sums.tolist())}, norm, tokens,
                      {n: int(global_targets[n]) for n in names})


def _factored_store(factored: bool, params, optimizer, no_sync, grad_mask) -> Optional[_fg.FactoredGrads]:
    """A store for factored weight gradients when the step can use one: asked for, one
    process (DDP / FSDP reduce ``.grad``), an optimizer :mod:`.factored_step` updates, and no
    gradient mask it cannot see (a :class:`~.freeze.RowGradMask` names its parameters: those
    stay dense)."""
    if not factored or _distributed() or no_sync is not None or not factored_step.supports(optimizer):
        return None
    masked = set()
    if grad_mask is not None:
        if not hasattr(grad_mask, "params"):
            return None
        masked = {id(p) for p in grad_mask.params}
    return _fg.FactoredGrads(p for p in params if id(p) not in masked and type(p) is nn.Parameter)
