"""flamingo_rt: kernels and runtime for Flamingo-style visual language models."""
__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the torch.library ops)
