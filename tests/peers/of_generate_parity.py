"""Run in a subprocess with transformers 4.36 first on sys.path (see
tests/test_openflamingo_generate.py): build a small open_flamingo Flamingo on a LLaMA LM,
greedy-decode and beam-search with open_flamingo's own generate(), convert the model to
flamingo_rt, greedy-decode with our caches and beam-search with our Generator; print both
sides' results as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from of_models import EOC, IMG, build_of_llama  # noqa: E402

from flamingo_rt.models import Flamingo  # noqa: E402
from flamingo_rt.runtime.cache import StaticCache  # noqa: E402
from flamingo_rt.runtime.engine import decode_step, encode_rows, forward_chunk  # noqa: E402

V = 300


def build(seed: int):
    return build_of_llama(vocab=V, dim=64, layers=4, heads=4, kv_heads=2, intermediate=128, every=2, gate=0.8,
                          seed=seed, initializer_range=0.2)


def ours_greedy(model: Flamingo, ids, media, max_new: int):
    cache = StaticCache(model, 1, 128, media.shape[1])
    tokens, counts, _ = encode_rows(model, [[m for m in media[0]]], "cpu", torch.float32)
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


def ours_beams(model: Flamingo, ids, media, max_new: int, beams: int) -> str:
    """Our beam search (Generator) with the end-of-chunk token held back until max_new, as
    open_flamingo's generate(min_new_tokens=max_new) holds back its eos; <image> and pad
    banned on both sides."""
    from flamingo_rt.io import FlamingoTokenizer
    from flamingo_rt.runtime import EncodedPrompt, GenerationConfig, Generator

    gen = Generator(model, tokenizer(), max_seq_len=128, max_media=media.shape[1])
    cfg = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, num_beams=beams, stop_on_eoc=True,
                           stop_on_eos=False)
    return gen.generate(EncodedPrompt(ids[0].tolist(), [m for m in media[0]]), cfg)


def tokenizer():
    """A BPE tokenizer of V ids whose special tokens are IMG (0), EOC (1), pad (2), eos (3)."""
    from flamingo_rt.io import FlamingoTokenizer

    words = [f"w{i}" for i in range(200)]
    tok = FlamingoTokenizer.train_bpe([" ".join(words[(i * 7 + j) % 200] for i in range(20)) for j in range(200)],
                                      vocab_size=V)
    assert (tok.image_token_id, tok.eoc_token_id, tok.pad_token_id, tok.vocab_size) == (IMG, EOC, 2, V)
    return tok


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
            # beams: <image> (banned from generation on both sides) made likely, unevenly across
            # contexts, so the beams' scores depend on taking the log-probabilities before the ban
            # (not renormalized after it), as HF does
            of.lang_encoder.get_output_embeddings().weight[IMG] *= 6.0
            ours = Flamingo.from_open_flamingo(of).eval()
            beam_peer = of.generate(vx, ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                    num_beams=3, do_sample=False, pad_token_id=EOC,
                                    bad_words_ids=[[IMG], [2]])[0, T:].tolist()
            beam_mine = ours_beams(ours, ids, vx, 8, 3)
        results.append({"of": peer, "ours": mine, "of_beams": tokenizer().decode(beam_peer), "ours_beams": beam_mine,
                        "of_beam_ids": beam_peer})
    import transformers

    print(json.dumps({"transformers": transformers.__version__, "results": results}))


if __name__ == "__main__":
    main()
