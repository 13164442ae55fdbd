"""Checkpoints (safetensors), configs and the tokenizer."""
from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    load_config,
    load_metadata,
    load_state_dict,
    save_checkpoint,
    save_config,
)
from .tokenizer import (
    EOC_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    FlamingoTokenizer,
    IncrementalDecoder,
)

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "load_checkpoint",
    "load_config",
    "load_metadata",
    "load_state_dict",
    "save_checkpoint",
    "save_config",
    "EOC_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "FlamingoTokenizer",
    "IncrementalDecoder",
]

from .pretrained import load_pretrained, save_pretrained  # noqa: E402

__all__ += ["load_pretrained", "save_pretrained"]
