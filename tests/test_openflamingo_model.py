"""A whole open_flamingo Flamingo (LLaMA LM) converted to ours: same logits, same grads."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flamingo_rt.models import Flamingo
from conftest import rel_err


@pytest.fixture(scope="module")
def of_model(of_helpers):
    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    from of_models import build_of_llama

    return build_of_llama(vocab=300, dim=64, layers=4, heads=4, kv_heads=2, intermediate=128, every=2,
                          attn_implementation="eager")


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
