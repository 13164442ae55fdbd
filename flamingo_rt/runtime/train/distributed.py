"""torch.distributed set-up for training: process group from torchrun's environment, the
process's share of a global batch, DDP and FSDP2 wrapping."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "close_distributed", "exit_distributed_process", "wrap_model",
           "row_range"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, nccl on CUDA. A single process without
    those variables runs undistributed."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)


def close_distributed(info: DistInfo) -> None:
    """Destroy the process group when ``init_distributed`` created it (``info.initialized_here``;
    a group the caller made is the caller's). Call it once a training process is done: a
    gloo group left to the interpreter's exit can abort a rank there ("terminate called
    without an active exception") after training has finished."""
    if info.initialized_here and dist.is_available() and dist.is_initialized():
        # no barrier: after an error on one rank the others may never reach it; after a
        # normal finish the last checkpoint's barrier has already lined the ranks up
        dist.destroy_process_group()
        info.initialized_here = False


def exit_distributed_process(code: int = 0) -> NoReturn:
    """End a process that trained under torch.distributed (after :func:`close_distributed`),
    skipping the interpreter's finalization: stdout, stderr and logging are flushed, then
    ``os._exit(code)``. At finalization torch's gloo teardown can abort a rank that has
    finished its work ("terminate called without an active exception", SIGABRT, with no
    Python frame left on any thread: 3 of about 100 two-process FSDP runs on a loaded 2-core
    machine, after the group was destroyed), and torchrun then reports the whole job as
    failed. Everything the trainer writes (checkpoints, logs, the final folder) is closed
    before this is called."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def row_range(global_batch: int, info: DistInfo, dataset: str = "") -> range:
    """This process's rows of a global batch (contiguous, equal shares)."""
    if global_batch % info.world_size:
        raise ValueError(
            f"dataset {dataset!r}: expected batch_size divisible by the number of processes "
            f"({info.world_size}), got {global_batch}"
        )
    n = global_batch // info.world_size
    return range(info.rank * n, (info.rank + 1) * n)


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, device: str
               ) -> "tuple[nn.Module, Optional[Callable[[], contextlib.AbstractContextManager]]]":
    """Wrap for data parallelism. ``strategy``: "none" / "auto" (DDP when distributed) /
    "ddp" / "fsdp" (FSDP2 ``fully_shard`` per decoder layer, cross-attention block and
    the resampler, then the root; the frozen vision encoder stays replicated). Returns (model, no_sync factory or None)."""
    if info.world_size <= 1 or strategy == "none":
        return model, None
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if device.startswith("cuda") else None
        # Datasets of different kinds use different parameters (e.g. temporal embeddings only
        # for clips), hence find_unused_parameters.
        ddp = DDP(model, device_ids=ids, find_unused_parameters=True)
        return ddp, ddp.no_sync
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.lm.layers:
            fully_shard(layer)
        for blk in model.lm.xattn.values():
            fully_shard(blk)
        fully_shard(model.resampler)
        # The frozen vision encoder is replicated, not sharded (NFNet's scalar skip-init
        # gains cannot be sharded, and a frozen encoder needs no optimizer state).
        fully_shard(model, ignored_params=set(model.vision_encoder.parameters()))

        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return model, no_sync
    raise ValueError(f"unknown strategy {strategy!r}")
