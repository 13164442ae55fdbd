"""flamingo_rt: kernels and runtime for Flamingo-style visual language models.

Layers (DESIGN.md section 2): :mod:`flamingo_rt.ops` (torch.library ops with reference,
C++, CUDA and Triton backends), :mod:`flamingo_rt.models` (NFNet, Perceiver Resampler,
gated cross-attention, LLaMA-family LM, Flamingo, presets), :mod:`flamingo_rt.io`
(safetensors checkpoints, tokenizer, model folders).
"""
__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the torch.library ops)
from .models import (  # noqa: F401
    DecoderLM,
    Flamingo,
    FlamingoConfig,
    GatedCrossAttentionBlock,
    NFNet,
    PerceiverResampler,
    get_preset,
)
from .io import FlamingoTokenizer, load_pretrained, save_pretrained  # noqa: F401
from .runtime import GenerationConfig, Generator, few_shot_prompt  # noqa: F401
