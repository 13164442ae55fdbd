"""Small open_flamingo models for parity tests and benchmarks (test-only).

open_flamingo's package ``__init__`` imports open_clip (only its factory uses it), so a
stand-in module is registered first. The vision encoder is a CLIP-like patch embedding
whose ``visual`` returns (pooled, tokens), as open_clip's does.
"""
from __future__ import annotations

import sys
import types

import torch

sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))

IMG, EOC = 0, 1  # media and end-of-chunk token ids used by these models


class Visual(torch.nn.Module):
    """Patch embedding: (N, 3, H, W) -> (pooled (N, width), tokens (N, (H/patch)^2, width))."""

    def __init__(self, width: int = 32, patch: int = 8):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, width, patch, patch)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        return t.mean(1), t


class Encoder(torch.nn.Module):
    """What open_flamingo's Flamingo expects: a module with ``.visual``."""

    def __init__(self, width: int = 32, patch: int = 8):
        super().__init__()
        self.visual = Visual(width, patch)


def build_of_llama(vocab: int, dim: int, layers: int, heads: int, kv_heads: int, intermediate: int, every: int,
                   vis_width: int = 32, patch: int = 8, gate: float = 0.6, seed: int = 0,
                   randomize_connectors: bool = True, **llama_kwargs):
    """An open_flamingo ``Flamingo`` over a random transformers ``LlamaForCausalLM``, in
    eval mode, with open gates (``gate``) and, optionally, re-randomized resampler and
    cross-attention weights (their defaults make tests weak)."""
    from open_flamingo.src.flamingo import Flamingo as OFFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=2048, **llama_kwargs))
    extend_instance(hf, FlamingoLMMixin)
    hf.set_decoder_layers_attr_name("model.layers")
    m = OFFlamingo(Encoder(vis_width, patch), hf, eoc_token_id=EOC, media_token_id=IMG, vis_dim=vis_width,
                   cross_attn_every_n_layers=every)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(gate)
            elif randomize_connectors and p.dim() > 1 and ("perceiver" in name or "gated_cross" in name):
                p.normal_(0, p.shape[-1] ** -0.5)
    return m.eval()
