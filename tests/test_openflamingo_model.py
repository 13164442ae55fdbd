"""A whole open_flamingo Flamingo (LLaMA LM) converted to ours: same logits, same grads."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from flamingo_rt.models import Flamingo
from conftest import rel_err


@pytest.fixture(scope="module")
def of_model(of_helpers):
    # open_flamingo's package __init__ imports open_clip (only its factory uses it)
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
    from open_flamingo.src.flamingo import Flamingo as OFFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, attn_implementation="eager"))
    extend_instance(hf, FlamingoLMMixin)
    hf.set_decoder_layers_attr_name("model.layers")

    class Visual(torch.nn.Module):  # a CLIP-like visual returning (pooled, tokens)
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 32, 8, 8)

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            return t.mean(1), t

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Visual()

    m = OFFlamingo(Encoder(), hf, eoc_token_id=1, media_token_id=0, vis_dim=32, cross_attn_every_n_layers=2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(0.6)
            elif p.dim() > 1 and ("perceiver" in name or "gated_cross" in name):
                p.normal_(0, p.shape[-1] ** -0.5)
    return m.eval()


def test_whole_model_logits_and_grads_match(of_model):
    ours = Flamingo.from_open_flamingo(of_model).eval()
    assert sorted(ours.lm.xattn.keys(), key=int) == ["1", "3"]
    ids = torch.randint(4, 300, (2, 14))
    ids[0, [2, 7]] = 0
    ids[1, 0] = 0
    vx = torch.randn(2, 2, 1, 3, 32, 32)
    want = of_model(vx, ids).logits
    got = ours(ids, vx, num_media=torch.tensor([2, 1])).logits
    assert rel_err(got, want) < 1e-5
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    for i in ("1", "3"):
        peer = of_model.lang_encoder.gated_cross_attn_layers[int(i)]
        assert rel_err(ours.lm.xattn[i].attn_gate.grad, peer.attn_gate.grad) < 1e-4
        assert rel_err(ours.lm.xattn[i].attn.to_kv.weight.grad, peer.attn.to_kv.weight.grad) < 1e-4
    assert rel_err(ours.resampler.layers[0].attn.to_kv.weight.grad, of_model.perceiver.layers[0][0].to_kv.weight.grad) < 1e-4
