"""Training runtime: frozen backbones, a weighted mixture of on-disk datasets with
gradients accumulated over all of them every step, AdamW with warmup + cosine, bf16
autocast, activation checkpointing, atomic checkpoints with exact resume, JSONL logs,
DDP / FSDP2 through torch.distributed.

Pieces (one idea per file): :mod:`.config` (TrainConfig), :mod:`.dataset_format` (on-disk
format, writer, decoder), :mod:`.dataset_stream` (deterministic streams with positions),
:mod:`.collate` (Batch), :mod:`.freeze`, :mod:`.optim`, :mod:`.step` (train_step),
:mod:`.train_state` (checkpoints), :mod:`.metrics_log`, :mod:`.distributed`,
:mod:`.trainer` (Trainer).
"""
from .collate import Batch, Collator
from .config import DatasetConfig, FreezeConfig, OptimConfig, TrainConfig, load_train_config
from .dataset_format import BAD_REASONS, BadRecord, Sample, decode_record, write_dataset
from .dataset_stream import DatasetStream, NoUsableRecordError
from .freeze import apply_freeze
from .optim import build_optimizer, build_scheduler, lr_factor, param_groups
from .step import NonFiniteLossError, StepResult, loss_sum, train_step
from .train_state import latest_checkpoint, load_train_state, save_train_state
from .trainer import Trainer, train

__all__ = [
    "BAD_REASONS", "BadRecord", "Batch", "Collator", "DatasetConfig", "DatasetStream", "FreezeConfig",
    "NoUsableRecordError", "NonFiniteLossError", "OptimConfig", "Sample", "StepResult", "TrainConfig", "Trainer", "apply_freeze",
    "build_optimizer", "build_scheduler", "decode_record", "latest_checkpoint", "load_train_config",
    "load_train_state", "loss_sum", "lr_factor", "param_groups", "save_train_state", "train", "train_step",
    "write_dataset",
]
