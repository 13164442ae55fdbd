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
from .flamingo import Flamingo, FlamingoOutput, build_resampler
from .lm import DecoderLM
from .nfnet import NFNet
from .mlp_resampler import MLPResampler
from .resampler import PerceiverResampler
from .xattn import GatedCrossAttentionBlock

__all__ = [
    "DecoderLM",
    "Flamingo",
    "FlamingoOutput",
    "GatedCrossAttentionBlock",
    "NFNet",
    "MLPResampler",
    "PerceiverResampler",
    "build_resampler",
    "FlamingoConfig",
    "LMConfig",
    "NFNetConfig",
    "PRESETS",
    "ResamplerConfig",
    "VisionConfig",
    "XAttnConfig",
    "get_preset",
]
