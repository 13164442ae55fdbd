"""The feed-forward of the resampler and of the gated cross-attention blocks."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.feed_forward import FF_KINDS
from ..ops.fused_linear import linear_act, linear_packed, linear_residual
from ..ops.linear import Linear



class FeedForward(nn.Module):
    """LayerNorm -> Linear(dim, mult*dim, no bias) -> activation -> Linear(mult*dim, dim, no bias).

    ``kind``: ``"gelu"`` (exact erf GELU, OpenFlamingo) or ``"sqrelu"`` (squared ReLU, the
    Flamingo paper). Input and output (..., dim), any float dtype.
    """

    def __init__(self, dim: int, mult: int = 4, kind: str = "gelu"):
        super().__init__()
        if kind not in FF_KINDS:
            raise ValueError(f"unknown feed-forward kind {kind!r}; expected one of {FF_KINDS}")
        self.kind = kind
        inner = int(dim * mult)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, inner, bias=False)
        self.fc2 = Linear(inner, dim, bias=False)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(fc1(norm(x))): (..., dim) -> (..., mult*dim). In inference the activation is
        fc1's oneDNN post-op, or is applied in place on fc1's fresh output
        (:func:`~flamingo_rt.ops.fused_linear.linear_act`): no second (rows, inner) tensor,
        whose fresh pages cost more than the activation itself (2048 x 4096 bf16: 8.8 vs 19
        ms for fc1 + GELU); with gradients, the out-of-place ops."""
        h = linear_act(self.norm(x), self.fc1.weight, self.fc1.bias, "gelu" if self.kind == "gelu" else "relu")
        if self.kind == "gelu":
            return h
        return h.square() if torch.is_grad_enabled() and h.requires_grad else h.square_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fc2 through the packed-weight product in inference (linear.linear otherwise)
        return linear_packed(self._hidden(x), self.fc2.weight, self.fc2.bias)

    def forward_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + self(x)``; in inference the add is fc2's oneDNN post-op where it runs
        (:func:`~flamingo_rt.ops.fused_linear.linear_residual`), else written over fc2's
        fresh output."""
        return linear_residual(self._hidden(x), self.fc2.weight, self.fc2.bias, x)

    def load_open_flamingo(self, sd: dict, prefix: str) -> dict:
        """Our state-dict entries from OpenFlamingo's ``Sequential(LN, Linear, GELU, Linear)``."""
        return {
            "norm.weight": sd[prefix + "0.weight"],
            "norm.bias": sd[prefix + "0.bias"],
            "fc1.weight": sd[prefix + "1.weight"],
            "fc2.weight": sd[prefix + "3.weight"],
        }
