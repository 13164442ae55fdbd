"""flamingo_rt models (plain PyTorch through the flamingo_rt ops)."""
from .config import (
    FlamingoConfig,
    LMConfig,
    NFNetConfig,
    PRESETS,
    ResamplerConfig,
    VisionConfig,
    XAttnConfig,
    get_preset,
)

__all__ = [
    "FlamingoConfig",
    "LMConfig",
    "NFNetConfig",
    "PRESETS",
    "ResamplerConfig",
    "VisionConfig",
    "XAttnConfig",
    "get_preset",
]
