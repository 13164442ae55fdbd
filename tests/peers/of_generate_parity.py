"""Run in a subprocess with transformers 4.36 first on sys.path (see
tests/test_openflamingo_generate.py): build a small open_flamingo Flamingo on a LLaMA LM,
greedy-decode with open_flamingo's own generate(), convert the model to flamingo_rt and
greedy-decode with our caches; print both token lists as JSON."""
from __future__ import annotations

import json
import sys
import types

import torch

sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))  # only its factory needs it

from open_flamingo.src.flamingo import Flamingo as OFFlamingo  # noqa: E402
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from flamingo_rt.models import Flamingo  # noqa: E402
from flamingo_rt.runtime.cache import StaticCache  # noqa: E402
from flamingo_rt.runtime.engine import decode_step, encode_rows, forward_chunk  # noqa: E402

IMG, EOC, V = 0, 1, 300


class Visual(torch.nn.Module):
    """A CLIP-like visual returning (pooled, tokens)."""

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


def build(seed: int):
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, initializer_range=0.2))
    extend_instance(hf, FlamingoLMMixin)
    hf.set_decoder_layers_attr_name("model.layers")
    m = OFFlamingo(Encoder(), hf, eoc_token_id=EOC, media_token_id=IMG, vis_dim=32, cross_attn_every_n_layers=2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(0.8)
            elif p.dim() > 1 and ("perceiver" in name or "gated_cross" in name):
                p.normal_(0, p.shape[-1] ** -0.5)
    return m.eval()


def ours_greedy(model: Flamingo, ids, media, max_new: int):
    cache = StaticCache(model, 1, 128, media.shape[1])
    tokens, counts = encode_rows(model, [[m for m in media[0]]], "cpu", torch.float32)
    cache.add_media(model, tokens, counts)
    logits = forward_chunk(model, cache, ids, torch.tensor([ids.shape[1]]))
    out = []
    for step in range(max_new):
        t = int(logits.argmax(-1))
        out.append(t)
        if t == EOC or step == max_new - 1:
            break
        logits = decode_step(model, cache, torch.tensor([t]))
    return out


def main():
    results = []
    for seed, (T, img_pos, n_img) in enumerate([(10, [2, 6], 2), (16, [0], 1), (12, [3, 4, 9], 3)]):
        of = build(seed)
        ours = Flamingo.from_open_flamingo(of).eval()
        g = torch.Generator().manual_seed(100 + seed)
        ids = torch.randint(4, V, (1, T), generator=g)
        ids[0, img_pos] = IMG
        vx = torch.randn(1, n_img, 1, 3, 32, 32, generator=g)
        with torch.no_grad():
            peer = of.generate(vx, ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               num_beams=1, do_sample=False, pad_token_id=EOC)[0, T:].tolist()
            mine = ours_greedy(ours, ids, vx, 12)
        results.append({"of": peer, "ours": mine})
    import transformers

    print(json.dumps({"transformers": transformers.__version__, "results": results}))


if __name__ == "__main__":
    main()
