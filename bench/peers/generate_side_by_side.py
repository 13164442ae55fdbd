"""Few-shot generation, flamingo_rt vs open_flamingo's generate(), in one process.

Run with transformers 4.36 first on sys.path (open_flamingo's generate() needs it; our
runtime does not use transformers at all):

    PYTHONPATH=.venv/peers/openflamingo:. python bench/peers/generate_side_by_side.py [--quick]

Model: a medium LLaMA-style LM (about 200M parameters) with a gated cross-attention block
before every layer (as OpenFlamingo-3B), an OpenFlamingo resampler (width 1024, depth 6),
and a cheap patch-embedding vision encoder (the same module on both sides); random
weights. Prompt: 32 shots (33 images) of about 20 tokens each; 20 new tokens, greedy.
Prints decode tokens/s, prompt-to-last-token time, per-query time for many queries over
one support set, the memory-bound limit of a decode step, and ratios.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "peers"))
from ceilings import measure  # noqa: E402
from of_models import EOC, IMG, build_of_llama  # noqa: E402

from flamingo_rt.io import FlamingoTokenizer  # noqa: E402
from flamingo_rt.models import Flamingo  # noqa: E402
from flamingo_rt.runtime import EncodedPrompt, GenerationConfig, Generator, fused_decode  # noqa: E402
from flamingo_rt.runtime.engine import decode_step  # noqa: E402

PAD = 2


def build(layers: int, dim: int, vocab: int):
    """LM with dim // 64 heads (no GQA), FF 2.75 x dim, xattn before every layer; a
    patch-14 encoder of width 1024 at 224 px (16 x 16 tokens); default OF init, gates 0.5."""
    return build_of_llama(vocab=vocab, dim=dim, layers=layers, heads=dim // 64, kv_heads=dim // 64, intermediate=int(dim * 2.75),
                          every=1, vis_width=1024, patch=14, gate=0.5, randomize_connectors=False)


def tokenizer(vocab: int) -> FlamingoTokenizer:
    words = [f"w{i}" for i in range(400)]
    corpus = [" ".join(words[(i * 13 + j) % 400] for i in range(30)) for j in range(400)]
    return FlamingoTokenizer.train_bpe(corpus, vocab_size=vocab)


def prompt_ids(shots: int, tokens_per_shot: int, vocab: int, g: torch.Generator):
    ids = []
    for _ in range(shots + 1):
        ids.append(IMG)
        ids += torch.randint(4, vocab, (tokens_per_shot - 2,), generator=g).tolist()
        ids.append(EOC)
    return ids[:-1]  # the query ends without <|endofchunk|>


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small model and prompt (smoke test)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    layers, dim, shots, new, queries, of_queries, classes = (12, 1024, 32, 20, 100, 3, 100)
    if args.quick:
        layers, dim, shots, new, queries, of_queries, classes = (2, 256, 4, 5, 6, 2, 10)
    ceil = measure("cpu")
    tok = tokenizer(1024 if args.quick else 8192)
    vocab = tok.vocab_size
    of = build(layers, dim, vocab).to(dtype)
    ours = Flamingo.from_open_flamingo(of).eval()
    n_params = sum(p.numel() for p in ours.lm.parameters())
    g = torch.Generator().manual_seed(1)
    ids = prompt_ids(shots, 20, vocab, g)
    images = torch.rand(shots + 1, 1, 3, 224, 224, generator=g).to(dtype)
    media = [images[i] for i in range(shots + 1)]
    gen = Generator(ours, tok, max_seq_len=len(ids) + new + 8, max_media=shots + 1)
    cfg = GenerationConfig(max_new_tokens=new, stop_on_eoc=False, stop_on_eos=False)
    enc = EncodedPrompt(ids, media)

    with torch.no_grad():
        # ours: prompt-to-first-token (prefill), then the decode steps alone
        gen.generate(enc, GenerationConfig(max_new_tokens=2, stop_on_eoc=False, stop_on_eos=False))  # warm-up
        (cache, encs, logits), t_prefill = timed(lambda: gen._start([enc], cfg, None))
        toks_e, t_decode = timed(lambda: list(gen._token_stream(cache, encs, logits, cfg)))
        t_total = t_prefill + t_decode
        ours_decode_tps = (new - 1) / t_decode
        # the same decode steps through the eager modules (the fused CPU step off): their tokens,
        # then the two step by step, alternating (this machine's bandwidth drifts between
        # phases of a run), medians of 9 steps each
        with fused_decode.disabled():
            (cache_m, encs_m, logits_m), _ = timed(lambda: gen._start([enc], cfg, None))
            toks_m, _ = timed(lambda: list(gen._token_stream(cache_m, encs_m, logits_m, cfg)))
        gen_ab = Generator(ours, tok, max_seq_len=len(ids) + 24, max_media=shots + 1)  # room for 18 steps
        (cache_ab, _, logits_ab), _ = timed(lambda: gen_ab._start([enc], cfg, None))
        tok_ab = logits_ab.argmax(-1)
        ab = {True: [], False: []}
        for _ in range(9):
            for flag in (True, False):
                fused_decode.set_enabled(flag)
                ab[flag].append(timed(lambda: decode_step(ours, cache_ab, tok_ab, check_media=False))[1])
        fused_decode.set_enabled(True)
        step_ab_fused, step_ab_modules = (sorted(ab[f])[4] for f in (True, False))
        # ours with the decode step under torch.compile (Inductor fuses the elementwise work
        # around the projections; the small-batch kernel stays as an extern call)
        genc = Generator(ours, tok, max_seq_len=len(ids) + new + 8, max_media=shots + 1, compile=True)
        _, t_compile = timed(lambda: genc.generate(enc, GenerationConfig(max_new_tokens=3, stop_on_eoc=False, stop_on_eos=False)))
        (cache_c, encs_c, logits_c), _ = timed(lambda: genc._start([enc], cfg, None))
        toks_c, t_decode_c = timed(lambda: list(genc._token_stream(cache_c, encs_c, logits_c, cfg)))
        compiled_decode_tps = (new - 1) / t_decode_c
        # peer: open_flamingo generate (min_new_tokens keeps the lengths equal)
        x = torch.tensor([ids])
        vx = images[None]
        kw = dict(attention_mask=torch.ones_like(x), num_beams=1, do_sample=False, pad_token_id=PAD)
        _, of_prefill = timed(lambda: of.generate(vx, x, max_new_tokens=1, min_new_tokens=1, **kw))
        _, of_total = timed(lambda: of.generate(vx, x, max_new_tokens=new, min_new_tokens=new, **kw))
        of_decode_tps = (new - 1) / max(of_total - of_prefill, 1e-9)
        # many queries over one 32-shot support set
        support = EncodedPrompt(ids[: len(ids) - 19], media[:-1])
        qcfg = GenerationConfig(max_new_tokens=3, stop_on_eoc=False, stop_on_eos=False)
        query = [EncodedPrompt(ids[len(ids) - 19:], [media[-1]]) for _ in range(queries)]

        def ours_many():
            pre = gen.prefix(support)
            out = []
            for i in range(0, queries, 20):
                out += gen.generate(query[i:i + 20], qcfg, prefix=pre)
            return out

        _, t_many = timed(ours_many)
        _, t_of_some = timed(lambda: [of.generate(vx, x, max_new_tokens=3, min_new_tokens=3, **kw) for _ in range(of_queries)])
        # rank classification after the 32-shot prompt: the log-likelihood of each of C class
        # names (1-4 tokens). Ours: Generator.score (the prompt once, the names packed into one
        # chunk) and the names one by one (max_pack_tokens=1, what score did before 2026-12-07);
        # open_flamingo as its evaluation's get_rank_classifications does with use_cache: media
        # cached, the context's past_key_values computed once, then one forward per name
        names = [" " + " ".join(f"w{(7 * c + j) % 400}" for j in range(1 + c % 4)) for c in range(classes)]
        name_ids = [tok.encode(n) for n in names]

        def of_rank():
            of.cache_media(input_ids=x, vision_x=vx)
            pre = of(vision_x=None, lang_x=x, clear_conditioned_layers=False, use_cache=True)
            first = pre.logits[0, -1].float().log_softmax(-1)
            out = []
            for ids_c in name_ids:
                lg = of(vision_x=None, lang_x=torch.tensor([ids_c]), clear_conditioned_layers=False,
                        past_key_values=pre.past_key_values, use_cache=True).logits[0].float().log_softmax(-1)
                out.append(float(first[ids_c[0]]) + sum(float(lg[j, t]) for j, t in enumerate(ids_c[1:])))
            of.uncache_media()
            return out

        # room for the packed names past the prompt (a pack is at most the cache's free slots)
        gen_rank = Generator(ours, tok, max_seq_len=len(ids) + 512, max_media=shots + 1)
        gen_rank.score(enc, names[:2])  # warm-up
        rank_ours, t_rank = timed(lambda: gen_rank.score(enc, names))
        rank_one, t_rank_one = timed(lambda: gen_rank.score(enc, names, max_pack_tokens=1))
        rank_of, t_rank_of = timed(of_rank)
        rank_diff = max(abs(a - b) for a, b in zip(rank_ours, rank_of))
        # beam search over a batch (captioning / VQA evaluations decode with beams: open_flamingo's
        # default is 3): B queries of a 4-shot prompt each, K beams, all queries' beams decoded
        # together on both sides (open_flamingo through HF generate); ours also one query at a
        # time, as generate ran beams before 2026-12-07 (ai)
        bq, bk, bnew = (4, 3, 10) if not args.quick else (2, 2, 4)
        bids = [prompt_ids(4, 20, vocab, g) for _ in range(bq)]
        bimg = torch.rand(bq, 5, 1, 3, 224, 224, generator=g).to(dtype)
        bencs = [EncodedPrompt(bids[i], [bimg[i, j] for j in range(5)]) for i in range(bq)]
        # the same search on both sides: the end-of-chunk token held back to the end (HF: min_new_tokens), the
        # <image> and pad tokens banned (HF: bad_words_ids), end-of-text an ordinary token
        bcfg = GenerationConfig(max_new_tokens=bnew, min_new_tokens=bnew, num_beams=bk, stop_on_eoc=True,
                                stop_on_eos=False)
        gen_beam = Generator(ours, tok, max_seq_len=len(bids[0]) + bnew + 8, max_media=5)
        gen_beam.generate(bencs[:1], GenerationConfig(max_new_tokens=2, num_beams=bk, stop_on_eoc=False,
                                                      stop_on_eos=False))  # warm-up
        beam_ours, t_beam = timed(lambda: gen_beam.generate(bencs, bcfg))
        _, t_beam_one = timed(lambda: [gen_beam.generate(e, bcfg) for e in bencs])
        bx = torch.tensor(bids)
        beam_of, t_beam_of = timed(lambda: of.generate(
            bimg, bx, attention_mask=torch.ones_like(bx), num_beams=bk, do_sample=False, pad_token_id=PAD,
            max_new_tokens=bnew, min_new_tokens=bnew, bad_words_ids=[[IMG], [PAD]]))
        beam_same = sum(tok.decode(r[bx.shape[1]:].tolist()) == o for r, o in zip(beam_of, beam_ours))
    # the memory-bound limit of one decode step: weights read once (the embedding table is
    # gathered, not read) + the caches read (self-attention K/V and the media K/V)
    elt = torch.finfo(dtype).bits // 8
    weight_bytes = (sum(p.numel() for p in ours.lm.parameters()) - ours.lm.embed_tokens.weight.numel()) * elt
    kv_bytes = sum(k.numel() * 2 * elt for k, _ in gen._caches[1].kv)
    media_bytes = sum(k.numel() * 2 * elt for k, _ in gen._caches[1].media_kv.values())
    limit_s = (weight_bytes + kv_bytes + media_bytes) / (ceil.copy_gbps * 1e9)
    # the same bytes at the measured read bandwidth (copy counts read + write: see ceilings.py)
    read_limit_s = (weight_bytes + kv_bytes + media_bytes) / (ceil.read_gbps * 1e9)
    step_s = 1 / ours_decode_tps
    step_c = 1 / compiled_decode_tps
    res = {
        "dtype": args.dtype, "lm_params": n_params, "prompt_tokens": len(ids), "images": shots + 1,
        "ceilings": ceil.line(),
        "ours_decode_tok_s": ours_decode_tps, "of_decode_tok_s": of_decode_tps,
        "decode_ratio": ours_decode_tps / of_decode_tps,
        "ours_prompt_to_last_s": t_total, "of_prompt_to_last_s": of_total, "prompt_to_last_ratio": of_total / t_total,
        "ours_per_query_s": t_many / queries, "of_per_query_s": t_of_some / of_queries,
        "many_queries_ratio": (t_of_some / of_queries) / (t_many / queries),
        "decode_step_ms": step_s * 1e3, "memory_bound_limit_ms": limit_s * 1e3, "step_over_limit": step_s / limit_s,
        "read_bound_limit_ms": read_limit_s * 1e3, "step_over_read_limit": step_s / read_limit_s,
        "compiled_decode_tok_s": compiled_decode_tps, "compiled_decode_ratio": compiled_decode_tps / of_decode_tps,
        "compiled_decode_step_ms": step_c * 1e3, "compiled_step_over_limit": step_c / limit_s,
        "compile_warmup_s": t_compile, "compiled_tokens_equal_eager": toks_c == toks_e,
        "ab_fused_step_ms": step_ab_fused * 1e3, "ab_modules_step_ms": step_ab_modules * 1e3,
        "unfused_tokens_equal": toks_m == toks_e,
        "rank_classes": classes, "ours_rank_s": t_rank, "ours_rank_one_by_one_s": t_rank_one, "of_rank_s": t_rank_of,
        "rank_ratio": t_rank_of / t_rank, "rank_max_abs_diff": rank_diff,
        "beam_queries": bq, "beams": bk, "beam_new_tokens": bnew, "ours_beam_s": t_beam,
        "ours_beam_one_by_one_s": t_beam_one, "of_beam_s": t_beam_of, "beam_ratio": t_beam_of / t_beam,
        "beam_answers_equal": beam_same,
    }
    print(ceil.line())
    print(f"model: LM {n_params / 1e6:.0f}M params ({layers} layers x {dim}, xattn every layer), "
          f"{args.dtype}; prompt {len(ids)} tokens, {shots + 1} images; {new} new tokens")
    print(f"decode            ours {ours_decode_tps:7.2f} tok/s   open_flamingo {of_decode_tps:7.2f} tok/s   ratio {res['decode_ratio']:.2f}x")
    print(f"prompt->last tok  ours {t_total:7.2f} s       open_flamingo {of_total:7.2f} s       ratio {res['prompt_to_last_ratio']:.2f}x")
    print(f"per query ({queries} over one support set) ours {t_many / queries * 1e3:8.1f} ms   open_flamingo (one by one) "
          f"{t_of_some / of_queries * 1e3:8.1f} ms   ratio {res['many_queries_ratio']:.1f}x")
    print(f"decode step {step_s * 1e3:.1f} ms vs memory-bound limit {limit_s * 1e3:.1f} ms "
          f"({(weight_bytes + kv_bytes + media_bytes) / 1e9:.2f} GB at {ceil.copy_gbps:.1f} GB/s): {res['step_over_limit']:.2f}x; "
          f"vs the read-bound limit {read_limit_s * 1e3:.1f} ms (at {ceil.read_gbps:.1f} GB/s read): {res['step_over_read_limit']:.2f}x")
    print(f"decode step, fused CPU step vs the eager modules, alternating: {step_ab_fused * 1e3:.1f} vs "
          f"{step_ab_modules * 1e3:.1f} ms ({step_ab_modules / step_ab_fused:.2f}x); the modules' tokens "
          f"{'equal' if toks_m == toks_e else 'DIFFERENT'}")
    print(f"decode (compiled) ours {compiled_decode_tps:7.2f} tok/s   ratio {res['compiled_decode_ratio']:.2f}x; step "
          f"{step_c * 1e3:.1f} ms = {res['compiled_step_over_limit']:.2f}x the limit (compile warm-up {t_compile:.0f} s; "
          f"tokens {'equal to' if toks_c == toks_e else 'DIFFERENT from'} eager)")
    print(f"rank {classes} class names after the prompt: ours {t_rank * 1e3:.0f} ms (packed; one by one "
          f"{t_rank_one * 1e3:.0f} ms)   open_flamingo (cached context, one forward per name) {t_rank_of * 1e3:.0f} ms   "
          f"ratio {res['rank_ratio']:.1f}x; log-likelihoods within {rank_diff:.1e}")
    print(f"beam search, {bq} 4-shot queries x {bk} beams, {bnew} new tokens: ours {t_beam * 1e3:.0f} ms (one query at "
          f"a time {t_beam_one * 1e3:.0f} ms)   open_flamingo {t_beam_of * 1e3:.0f} ms   ratio {res['beam_ratio']:.2f}x; "
          f"answers equal for {beam_same} of {bq}")
    print("JSON " + json.dumps(res))


if __name__ == "__main__":
    main()
