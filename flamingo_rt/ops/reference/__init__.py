"""Plain-torch references: the specification of every flamingo_rt op.

Each function here takes and returns plain tensors, works in any floating dtype
(float64 included), accumulates in at least float32, and is what every fast backend
is tested against.
"""
from .xattn import image_causal_attention, image_causal_attention_backward, media_index_from_locations
from .resampler import resampler_attention, resampler_attention_backward
from .nfnet import (
    bias_gamma_act,
    bias_gamma_act_backward,
    se_residual,
    se_residual_backward,
    ws_standardize,
    ws_standardize_backward,
)

__all__ = [
    "image_causal_attention",
    "image_causal_attention_backward",
    "media_index_from_locations",
    "resampler_attention",
    "resampler_attention_backward",
    "bias_gamma_act",
    "bias_gamma_act_backward",
    "se_residual",
    "se_residual_backward",
    "ws_standardize",
    "ws_standardize_backward",
]
