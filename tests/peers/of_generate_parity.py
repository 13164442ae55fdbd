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


def ours_beams_stopping(model: Flamingo, ids, media, max_new: int, beams: int, early_stopping,
                        length_penalty: float, repetition_penalty: float = 1.0) -> str:
    """Our beam search (greedy for beams = 1) with the end-of-chunk token as its stop token
    (open_flamingo's eos)."""
    from flamingo_rt.runtime import EncodedPrompt, GenerationConfig, Generator

    gen = Generator(model, tokenizer(), max_seq_len=128, max_media=media.shape[1])
    cfg = GenerationConfig(max_new_tokens=max_new, num_beams=beams, stop_on_eoc=True, stop_on_eos=False,
                           early_stopping=early_stopping, length_penalty=length_penalty,
                           repetition_penalty=repetition_penalty)
    return gen.generate(EncodedPrompt(ids[0].tolist(), [m for m in media[0]]), cfg)


def until_eoc(ids):
    return ids[:ids.index(EOC)] if EOC in ids else ids


def tokenizer():
    """A BPE tokenizer of V ids whose special tokens are IMG (0), EOC (1), pad (2), eos (3)."""
    from flamingo_rt.io import FlamingoTokenizer

    words = [f"w{i}" for i in range(200)]
    tok = FlamingoTokenizer.train_bpe([" ".join(words[(i * 7 + j) % 200] for i in range(20)) for j in range(200)],
                                      vocab_size=V)
    assert (tok.image_token_id, tok.eoc_token_id, tok.pad_token_id, tok.vocab_size) == (IMG, EOC, 2, V)
    return tok


def hypotheses_fuzz(trials: int = 300) -> dict:
    """Our BeamHypotheses against transformers' on the same random calls: hypotheses of
    random log-likelihoods (ties included) added over the steps, is_done asked after each
    step, the best taken at the end, for every stopping rule and several length penalties."""
    from transformers.generation.beam_search import BeamHypotheses as HF

    from flamingo_rt.runtime.beams import BeamHypotheses

    rng = __import__("random").Random(0)
    prompt_len, max_new = 5, 10
    done_calls = mismatches = done_true = 0
    for trial in range(trials):
        K = rng.randint(1, 4)
        lp = rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0])
        es = rng.choice([True, False, "never"])
        ours, hf = BeamHypotheses(K, lp, es, max_new), HF(K, lp, es, max_length=prompt_len + max_new)
        uid = 0
        for step in range(1, max_new + 1):
            for _ in range(rng.randint(0, 3)):
                uid += 1
                tokens = [uid] * step
                ll = -rng.choice([0.5, 1.0, 2.0]) * rng.randint(1, 6) * step ** rng.choice([0.5, 1.0, 1.5])
                ours.add(tokens, ll)
                hf.add(torch.tensor(tokens), ll, generated_len=step)
            best = -rng.random() * 4 * step
            a, b = ours.is_done(best, step), hf.is_done(best, prompt_len + step, prompt_len)
            done_calls += 1
            done_true += int(b)
            mismatches += int(a != b)
        if len(hf):
            hf_best = sorted(hf.beams, key=lambda x: x[0]).pop()[1].tolist()
            mismatches += int(ours.best() != hf_best)
            mismatches += int(sorted((s, t) for s, t in ours.items) != sorted((s, t.tolist()) for s, t, _ in hf.beams))
    return {"done_calls": done_calls, "done_true": done_true, "mismatches": mismatches}


class _Rows:
    """A stand-in for the beam search's caches: each row's generated tokens."""

    def __init__(self, n: int):
        self.rows = [[] for _ in range(n)]

    def broadcast_from(self, src, repeats: int = 1):
        self.rows = [list(r) for r in src.rows for _ in range(repeats)]

    def select_rows(self, idx, media=True):
        self.rows = [list(self.rows[i]) for i in idx.tolist()]


def scripted_logits(seed: int, stop_bias: float, histories) -> torch.Tensor:
    """(rows, V) logits, a fixed random function of each row's tokens so far: 6 ordinary
    tokens (ids 10..15) and the end of chunk (biased by ``stop_bias``) are likely, the rest not."""
    import zlib

    out = torch.full((len(histories), V), -12.0)
    for i, h in enumerate(histories):
        g = torch.Generator().manual_seed(zlib.crc32(repr((seed, tuple(h))).encode()))
        z = torch.randn(7, generator=g) * 2.0
        out[i, 10:16] = z[:6]
        out[i, EOC] = z[6] + stop_bias
    return out


def scripted_fuzz(model: Flamingo, trials: int = 150) -> dict:
    """Our beam search against transformers' (its BeamSearchScorer, in the loop of its
    beam_search) on random scripted next-token distributions where the end of chunk stops
    beams: every stopping rule, several length penalties, beam counts and lengths."""
    import random

    from transformers.generation.beam_search import BeamSearchScorer
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from flamingo_rt.runtime import EncodedPrompt, GenerationConfig, Generator

    class Scripted(Generator):
        def _start(self, prompts, cfg, prefix):
            encs = [EncodedPrompt([5] * 3) for _ in prompts]  # the prompt: 3 tokens of id 5
            return _Rows(len(prompts)), encs, scripted_logits(self.seed, self.bias, [[]] * len(prompts))

        def _cache(self, batch):
            return _Rows(batch)

        def _decode(self, cache, tokens):
            for r, t in zip(cache.rows, tokens.tolist()):
                r.append(t)
            return scripted_logits(self.seed, self.bias, cache.rows)

        def _finish_text(self, ids, cfg):
            return until_eoc(list(ids))

    gen = Scripted(model, tokenizer(), max_seq_len=128, max_media=4)
    rng = random.Random(1)
    mismatches, early, cases, penalty_changed = [], 0, 0, 0
    for trial in range(trials):
        K, es = rng.choice([2, 3, 4]), rng.choice([True, False, "never"])
        lp, max_new = rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0]), rng.randint(3, 8)
        gen.seed, gen.bias = trial, rng.uniform(-1.0, 2.5)
        rep = rng.choice([1.0, 1.0, 1.5])
        cfg = GenerationConfig(max_new_tokens=max_new, num_beams=K, stop_on_eoc=True, stop_on_eos=False,
                               early_stopping=es, length_penalty=lp, repetition_penalty=rep).validate()
        ours = gen._beam_search([None], cfg, None)[0]
        # transformers 4.36's beam_search loop, on the same logits
        P = 3
        scorer = BeamSearchScorer(1, K, "cpu", length_penalty=lp, do_early_stopping=es, max_length=P + max_new)
        input_ids = torch.full((K, P), 5)
        beam_scores = torch.zeros(K)
        beam_scores[1:] = -1e9
        for step in range(max_new):
            logp = scripted_logits(trial, gen.bias, [r[P:].tolist() for r in input_ids]).log_softmax(-1)
            logp[:, [IMG, 2]] = float("-inf")  # the bad words
            if rep != 1.0:
                logp = RepetitionPenaltyLogitsProcessor(rep)(input_ids, logp)
            nxt = (logp + beam_scores[:, None]).view(1, K * V)
            top, idx = torch.topk(nxt, 2 * K, dim=1, largest=True, sorted=True)
            out = scorer.process(input_ids, top, idx % V, idx // V, pad_token_id=EOC, eos_token_id=EOC,
                                 decoder_prompt_len=P)
            beam_scores = out["next_beam_scores"]
            input_ids = torch.cat([input_ids[out["next_beam_indices"]], out["next_beam_tokens"][:, None]], -1)
            if scorer.is_done:
                break
        seq = scorer.finalize(input_ids, beam_scores, None, None, max_length=P + max_new, pad_token_id=EOC,
                              eos_token_id=EOC, decoder_prompt_len=P)["sequences"][0, P:].tolist()
        theirs = until_eoc(seq)
        cases += 1
        early += int(len(theirs) < max_new)
        if ours != theirs:
            mismatches.append({"trial": trial, "K": K, "es": es, "lp": lp, "rep": rep, "ours": ours,
                               "theirs": theirs})
        if rep != 1.0:  # (the same search without the penalty: does it matter here?)
            plain = gen._beam_search([None], GenerationConfig(
                max_new_tokens=max_new, num_beams=K, stop_on_eoc=True, stop_on_eos=False, early_stopping=es,
                length_penalty=lp).validate(), None)[0]
            penalty_changed += int(plain != ours)
    return {"cases": cases, "stopped_early": early, "mismatches": mismatches, "penalty_changed": penalty_changed}


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
            # a repetition penalty, greedy and with beams (long answers: the penalty on the tokens
            # generated so far matters)
            penalized = []
            for beams in (1, 3):
                p_ids = of.generate(vx, ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=beams,
                                    do_sample=False, pad_token_id=EOC, bad_words_ids=[[IMG], [2]],
                                    repetition_penalty=1.8)[0, T:].tolist()
                answer = ours_beams_stopping(ours, ids, vx, 12, beams, False, 1.0, repetition_penalty=1.8)
                penalized.append({"beams": beams, "of": tokenizer().decode(until_eoc(p_ids)), "ours": answer,
                                  "of_ids": until_eoc(p_ids)})
            # beams that stop: the end of chunk (open_flamingo's eos) made likely in some contexts,
            # so that hypotheses finish at different steps and the stopping rules matter
            out_emb = of.lang_encoder.get_output_embeddings().weight
            eoc_row = out_emb[EOC].clone()
            stopping = []
            for boost in (2.2, 3.0):
                out_emb[EOC] = eoc_row * boost
                ours = Flamingo.from_open_flamingo(of).eval()
                for es, lp in ((False, 1.0), (True, 1.0), ("never", 1.0), (False, 2.0), (True, 2.0), ("never", 2.0),
                               (False, 0.0), ("never", -1.0)):
                    p_ids = of.generate(vx, ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=3,
                                        do_sample=False, pad_token_id=EOC, bad_words_ids=[[IMG], [2]],
                                        early_stopping=es, length_penalty=lp)[0, T:].tolist()
                    stopping.append({"case": [boost, es, lp], "of_ids": until_eoc(p_ids),
                                     "of": tokenizer().decode(until_eoc(p_ids)),
                                     "ours": ours_beams_stopping(ours, ids, vx, 12, 3, es, lp)})
        results.append({"of": peer, "ours": mine, "of_beams": tokenizer().decode(beam_peer), "ours_beams": beam_mine,
                        "of_beam_ids": beam_peer, "stopping": stopping, "penalized": penalized})
    import transformers

    print(json.dumps({"transformers": transformers.__version__, "results": results,
                      "hypotheses": hypotheses_fuzz(), "scripted": scripted_fuzz(ours)}))


if __name__ == "__main__":
    main()
