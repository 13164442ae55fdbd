"""flamingo_rt's functional ops.

Each op is registered with ``torch.library`` under the ``flamingo_rt`` namespace, has
a plain-torch reference (:mod:`flamingo_rt.ops.reference`, the specification) and a
set of backends chosen by :mod:`flamingo_rt.ops.backend`.
"""
from . import backend, reference
from .xattn import image_causal_attention
from .resampler import resampler_attention, resampler_attention_kvpacked
from .norm_project import norm_project, norm_project_iter
from .feed_forward import feed_forward
from .gated_linear_residual import gated_linear_residual
from .reference.xattn import media_index_from_locations
from .nfconv import ws_standardize, bias_gamma_act, se_residual, spatial_mean, ws_conv2d
from . import flops as _flops

_flops.register()

__all__ = [
    "backend",
    "reference",
    "image_causal_attention",
    "resampler_attention",
    "resampler_attention_kvpacked",
    "norm_project",
    "norm_project_iter",
    "feed_forward",
    "gated_linear_residual",
    "media_index_from_locations",
    "ws_standardize",
    "bias_gamma_act",
    "se_residual",
    "spatial_mean",
    "ws_conv2d",
]

from . import _cpp_backends  # noqa: E402,F401  (registers the C++/CUDA backends when built)
