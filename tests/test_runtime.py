"""Generation runtime on the tiny preset: caches equal recomputation, batching, prefix
reuse, streaming, beams, sampling, sessions, scoring, media encoded once, errors."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from flamingo_rt.io import FlamingoTokenizer
from flamingo_rt.models import Flamingo, get_preset
from flamingo_rt.runtime import EncodedPrompt, GenerationConfig, Generator, few_shot_prompt
from flamingo_rt.runtime.cache import StaticCache
from flamingo_rt.runtime.engine import decode_step
from conftest import rel_err

WORDS = "red green blue square circle triangle small big left right above below one two three a the of is".split()


@pytest.fixture(scope="module")
def tok():
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for i in range(12)) for j in range(300)]
    corpus += ["café ☕ 漢字 naïve"] * 5
    return FlamingoTokenizer.train_bpe(corpus, vocab_size=320)


@pytest.fixture(scope="module")
def gen(tok):
    torch.manual_seed(1234)
    cfg = get_preset("tiny")
    cfg.lm.vocab_size = tok.vocab_size
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        for b in model.xattn_blocks():
            b.attn_gate.fill_(0.9)
            b.ff_gate.fill_(0.5)
    return Generator(model, tok, max_seq_len=160, max_media=5)


def img():
    return torch.rand(3, 64, 64)


GREEDY = GenerationConfig(max_new_tokens=10, stop_on_eoc=False, stop_on_eos=False)


def test_cached_decoding_equals_full_recomputation(gen):
    enc = gen.encode([img(), "a red square", img(), "two blue"])
    steps = [int(t) for t in torch.randint(4, gen.tok.vocab_size, (8,))]
    full = gen.model(torch.tensor([enc.ids + steps]), torch.stack(enc.media)[None]).logits[0]
    cache = gen._cache(1)
    with torch.no_grad():
        logits = gen._prefill(cache, [enc])
        assert rel_err(logits[0], full[len(enc.ids) - 1]) < 1e-5
        for i, t in enumerate(steps):
            logits = decode_step(gen.model, cache, torch.tensor([t]))
            assert rel_err(logits[0], full[len(enc.ids) + i]) < 1e-5, i


def test_batch_equals_one_by_one(gen):
    prompts = [[img(), "a red square", img(), "two"], ["the", img(), "big"], ["one two three left"]]
    alone = [gen.generate(p, GREEDY) for p in prompts]
    assert gen.generate(prompts, GREEDY) == alone


def test_prefix_reuse_equals_recomputation(gen):
    support = [img(), "a red square<|endofchunk|>", img(), "a blue circle<|endofchunk|>"]
    queries = [[img(), "a"], [img(), "the big"], ["two", img()]]
    pre = gen.prefix(support)
    want = [gen.generate(support + q, GREEDY) for q in queries]
    assert [gen.generate(q, GREEDY, prefix=pre) for q in queries] == want
    assert gen.generate(queries, GREEDY, prefix=pre) == want  # batched over one prefix
    # a repetition penalty counts the prefix's tokens as seen, as in the whole prompt (greedy,
    # streamed, and beams)
    for pen in (GenerationConfig(max_new_tokens=10, stop_on_eoc=False, stop_on_eos=False, repetition_penalty=3.0),
                GenerationConfig(max_new_tokens=8, num_beams=3, stop_on_eoc=False, stop_on_eos=False,
                                 repetition_penalty=3.0)):
        want = [gen.generate(support + q, pen) for q in queries]
        assert want != [gen.generate(support + q, replace(pen, repetition_penalty=1.0)) for q in queries]
        assert [gen.generate(q, pen, prefix=pre) for q in queries] == want
        assert gen.generate(queries, pen, prefix=pre) == want
        if pen.num_beams == 1:
            assert ["".join(gen.stream(q, pen, prefix=pre)) for q in queries] == want


def test_stream_equals_generate_and_stop_strings(gen):
    p = [img(), "a red"]
    cfg = GenerationConfig(max_new_tokens=14, stop_on_eoc=False, stop_on_eos=False)
    full = gen.generate(p, cfg)
    pieces = list(gen.stream(p, cfg))
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[3:5]
    cfg_stop = GenerationConfig(max_new_tokens=14, stop_on_eoc=False, stop_on_eos=False, stop_strings=(stop,))
    cut = gen.generate(p, cfg_stop)
    assert cut == full[: full.find(stop)]
    assert "".join(gen.stream(p, cfg_stop)) == cut
    got = []
    assert gen.generate_with_callback(p, lambda s: got.append(s) or len(got) == 2, cfg) == "".join(got[:2])


def test_streaming_multibyte_characters(gen, tok):
    """Stream pieces are whole characters even when one character spans several tokens."""
    ids = tok.encode("café ☕ 漢字")
    from flamingo_rt.io import IncrementalDecoder

    dec = IncrementalDecoder(tok)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == "café ☕ 漢字"
    assert all("\ufffd" not in p for p in pieces)


def test_beam_one_equals_greedy_and_beams_run(gen):
    p = [img(), "a red", img(), "the"]
    assert gen.generate(p, GREEDY, num_beams=1) == gen.generate(p, GREEDY)
    out = gen.generate(p, GREEDY, num_beams=3)
    assert isinstance(out, str) and len(out) > 0


def test_beam_search_finds_a_likelier_sequence_than_greedy(gen):
    p = [img(), "a red", img(), "the"]
    cfg = GenerationConfig(max_new_tokens=6, stop_on_eoc=False, stop_on_eos=False, length_penalty=0.0)
    greedy = gen.generate(p, cfg)
    beam = gen.generate(p, cfg, num_beams=4)
    s_g, s_b = gen.score(p, [greedy, beam])
    assert s_b >= s_g - 1e-3


@pytest.mark.parametrize("stops", [False, True])
def test_beam_search_of_a_batch_equals_each_prompt_alone(gen, stops):
    """Beams of several prompts (different lengths and image counts) decode as one batch;
    each prompt's answer is its search alone, with or without a prefix, stop tokens on or
    off, and with a length penalty."""
    prompts = [[img(), "a red", img(), "the"], ["one two"], [img(), "big blue circle on the left of"]]
    for cfg in (GenerationConfig(max_new_tokens=7, num_beams=3, stop_on_eoc=stops, stop_on_eos=stops),
                GenerationConfig(max_new_tokens=5, num_beams=4, length_penalty=0.0, stop_on_eoc=stops,
                                 stop_on_eos=stops)):
        alone = [gen.generate(p, cfg) for p in prompts]
        assert len(set(alone)) == 3, "the prompts should get different answers"
        assert gen.generate(prompts, cfg) == alone
    shots = gen.prefix([img(), "a red square<|endofchunk|>"])
    cfg = GenerationConfig(max_new_tokens=6, num_beams=3, stop_on_eoc=stops, stop_on_eos=stops)
    assert gen.generate(prompts, cfg, prefix=shots) == [gen.generate(p, cfg, prefix=shots) for p in prompts]


class _EocLikely(Generator):
    """The end-of-chunk token made likely (its logit raised), so beams finish early."""

    def _mask_banned(self, logits, cfg=None, step=0):
        out = super()._mask_banned(logits, cfg, step)
        out[:, self.tok.eoc_token_id] += self.boost
        return out


def test_beam_search_of_a_batch_with_finishing_beams(gen):
    """Beams that end in a stop token are set aside per prompt, and a prompt whose K beams
    finished stops while the others go on: each prompt's answer is still its search alone
    (some answers stop early)."""
    g = _EocLikely(gen.model, gen.tok, max_seq_len=gen.max_seq_len, max_media=gen.max_media)
    prompts = [[img(), "a red", img(), "the"], ["one two"], [img(), "big blue circle on the left of"],
               ["the small"]]
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3, stop_on_eos=False)
    for boost in (6.0, 9.0):
        g.boost = boost
        alone = [g.generate(p, cfg) for p in prompts]
        assert g.generate(prompts, cfg) == alone
        n_tokens = [len(gen.tok.encode(a)) for a in alone]
        assert min(n_tokens) < cfg.max_new_tokens - 1, (boost, alone)


def test_broadcast_from_copies_each_row_into_its_beams(gen):
    from flamingo_rt.runtime.cache import StaticCache

    encs = [gen.encode([img(), "a red", img(), "the"]), gen.encode(["one two"])]
    src = StaticCache(gen.model, 2, 64, 4)
    with torch.no_grad():
        gen._prefill(src, encs)
    dst = StaticCache(gen.model, 6, 64, 4)
    dst.broadcast_from(src, repeats=3)
    n, rows = src.length, torch.tensor([0, 0, 0, 1, 1, 1])
    assert dst.length == n and int(dst.position) == n
    for (k, v), (ks, vs) in zip(dst.kv, src.kv):
        assert torch.equal(k[:, :, :n], ks[rows, :, :n]) and torch.equal(v[:, :, :n], vs[rows, :, :n])
    for key, (k, v) in dst.media_kv.items():
        assert torch.equal(k[:, :2], src.media_kv[key][0][rows, :2])
    for name in ("key_valid", "pad", "num_media", "image_count"):
        assert torch.equal(getattr(dst, name), getattr(src, name)[rows]), name
    with pytest.raises(ValueError, match=r"expected 2 x 2 = 4 rows to copy 2 rows 2 times into, got a cache of 6"):
        dst.broadcast_from(src, repeats=2)
    with pytest.raises(ValueError, match="one-row source cache, got 2 rows"):
        dst.broadcast_from(src)


def test_sampling_repeats_under_its_seed(gen):
    p = [img(), "a"]
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=50, top_p=0.95,
                           repetition_penalty=1.2, seed=7, stop_on_eoc=False, stop_on_eos=False)
    a, b = gen.generate(p, cfg), gen.generate(p, cfg)
    assert a == b
    others = {gen.generate(p, cfg, seed=s) for s in range(8, 12)}
    assert len(others | {a}) > 1


def test_vision_encoder_runs_once_per_medium(gen):
    calls = []
    h = gen.model.vision_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        p = [img(), "a red", img(), "the", img()]
        gen.generate(p, GREEDY, num_beams=3)
        assert sum(calls) == 3
        calls.clear()
        gen.generate([p, [img(), "x"]], GREEDY)
        assert sum(calls) == 4
    finally:
        h.remove()


def test_session_multi_turn_equals_one_long_prompt(gen):
    sess = gen.session()
    sess.append(img(), "a red square")
    r1 = sess.generate(GREEDY)
    sess.append(img(), "the big")
    r2 = sess.generate(GREEDY)
    assert len(sess.history) == 2 and sess.history[1] == r2
    # the same conversation, recomputed from scratch with the second image as media index 1
    n2 = len(sess.token_ids) - 10  # tokens before the second reply
    enc = EncodedPrompt(sess.token_ids[:n2], sess.media)
    assert gen.generate(enc, GREEDY) == r2
    assert r1 == gen.generate(EncodedPrompt(sess.token_ids[: n2 - 10 - len(gen.tok.encode("the big")) - 1],
                                            sess.media[:1]), GREEDY)


def test_session_refusals_leave_it_usable(gen):
    """append refuses what is not text or usable media (nothing queued; a bad item stayed
    queued and every later generate failed); a generate that does not fit keeps the new
    items for a retry with fewer tokens; discard() and reset() recover."""
    a, b = img(), img()
    sess = gen.session()
    with pytest.raises(TypeError, match="expected text .* got int"):
        sess.append("a red", 5)
    bad = a.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        sess.append(bad)
    assert sess._pending == []
    sess.append(a, "a red square")
    with pytest.raises(ValueError, match="exceeds the cache length 160 .*are kept: retry with fewer max_new_tokens"):
        sess.generate(max_new_tokens=500)
    first = sess.generate(GREEDY)  # the retry: the items were kept
    assert first == gen.session().append(a, "a red square").generate(GREEDY)
    sess.append("x " * 300)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        sess.generate(GREEDY)
    assert sess.discard() == ["x " * 300]
    second = sess.append(b, "the big").generate(GREEDY)
    ref = gen.session()
    ref.append(a, "a red square").generate(GREEDY)
    assert second == ref.append(b, "the big").generate(GREEDY)
    sess.reset()
    assert sess.token_ids == [] and sess.history == [] and sess._pending == []
    assert sess.append(b, "the big").generate(GREEDY) == gen.session().append(b, "the big").generate(GREEDY)


def test_session_prefill_fork_score(gen, tok):
    """Session.prefill / fork / score (as the C API's session): a prefilled turn answers as
    one not prefilled (repetition penalty included: the prefilled tokens count); forks of a
    prefilled support set answer as fresh sessions holding support + query, and leave the
    original as it was; score equals Generator.score on the whole conversation and leaves
    the conversation unchanged; clear refusals."""
    a, b, c = img(), img(), img()
    pen = GenerationConfig(max_new_tokens=10, stop_on_eoc=False, stop_on_eos=False, repetition_penalty=1.5)
    plain = gen.session().append(a, "a red square").generate(pen)
    pre = gen.session().append(a, "a red").prefill().append(" square")
    assert pre._pending and pre.cache.length == len(gen.tok.encode("a red")) + 1
    seen = []
    real = gen._token_stream
    try:  # the tokens the penalty counts as seen: the whole turn's, the prefilled ones included
        gen._token_stream = lambda cache, encs, logits, cfg: seen.append(encs[0].ids) or real(cache, encs, logits, cfg)
        assert pre.generate(pen) == plain
    finally:
        del gen._token_stream
    assert seen == [gen.encode([a, "a red square"]).ids]

    support = gen.session().append(a, "a red square<|endofchunk|>").prefill()
    held = (support.cache.length, list(support.token_ids))
    for q, text in ((b, "the"), (c, "a blue")):
        f = support.fork().append(q, text)
        assert f.generate(GREEDY) == gen.session().append(a, "a red square<|endofchunk|>", q, text).generate(GREEDY)
    assert (support.cache.length, support.token_ids) == held and support.history == []
    # a fork of a conversation mid-way (an answer given, its last token carried)
    s1 = gen.session().append(a, "a red")
    s1.generate(GREEDY)
    s2 = s1.fork()
    assert s2.append(b, "the").generate(GREEDY) == s1.append(b, "the").generate(GREEDY)

    cands = [" square", " big blue circle", " a"]
    s = gen.session().append(a, "a red square<|endofchunk|>")
    s.generate(GREEDY)
    s.append(b, "the")
    got = s.score(cands)
    whole = EncodedPrompt(list(s.token_ids), list(s.media))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(gen.score(whole, cands)), rtol=0, atol=1e-3)
    assert s.score(cands, max_pack_tokens=1) == pytest.approx(got, abs=1e-3)
    ref = gen.session().append(a, "a red square<|endofchunk|>")
    ref.generate(GREEDY)
    assert s.generate(GREEDY) == ref.append(b, "the").generate(GREEDY)  # the scores left no trace

    with pytest.raises(ValueError, match="expected text or media to score after, got an empty session"):
        gen.session().score(cands)
    full = gen.session().append(a, "x " * 150)
    with pytest.raises(ValueError, match="plus the longest candidate's tokens \\(30\\) = .* exceeds the cache length 160 "
                                         ".*are kept: score shorter candidates, or discard"):
        full.score([" a" * 30])
    with pytest.raises(ValueError, match="plus the longest candidate's tokens"):
        gen.score([a, "x " * 150], [" a" * 30])
    assert full._pending and full.cache.length == 0
    with pytest.raises(TypeError, match="got a str"):
        full.score("a")


def test_min_new_tokens_holds_the_stop_tokens_back(gen, tok, monkeypatch):
    """min_new_tokens (open_flamingo evaluation's min_generation_length): with the model made
    to prefer <|endofchunk|> everywhere, greedy, sampled, beam and streamed answers stop at
    once without it and run exactly min_new_tokens tokens with it (eos held back as well)."""
    eoc, eos = tok.eoc_token_id, tok.eos_token_id

    def favour_stop(fn):
        def run(*args, **kw):
            logits = fn(*args, **kw).clone()
            logits[..., eoc] += 100.0
            logits[..., eos] += 90.0
            return logits
        return run

    monkeypatch.setattr(gen, "_prefill", favour_stop(gen._prefill))
    monkeypatch.setattr(gen, "_decode", favour_stop(gen._decode))
    answers = []  # the token ids of each answer (the stop token included)
    finish = gen._finish_text
    monkeypatch.setattr(gen, "_finish_text", lambda ids, cfg: answers.append(list(ids)) or finish(ids, cfg))
    p = [img(), "a red"]
    base = dict(max_new_tokens=8)
    for extra in (dict(), dict(do_sample=True, seed=3), dict(num_beams=3)):
        assert gen.generate(p, **base, **extra) == "" and answers[-1] == [eoc]
        out = gen.generate(p, **base, **extra, min_new_tokens=4)
        assert out and len(answers[-1]) == 5 and answers[-1][4] == eoc, extra
        assert not {eoc, eos} & set(answers[-1][:4])
        gen.generate(p, **base, **extra, min_new_tokens=4, stop_on_eoc=False)
        assert answers[-1][:4] == [eoc] * 4, extra  # only the stop tokens in force are held back
    assert "".join(gen.stream(p, **base, min_new_tokens=3)) == gen.generate(p, **base, min_new_tokens=3)
    s = gen.session().append(*p)
    assert s.generate(**base, min_new_tokens=2) == gen.generate(p, **base, min_new_tokens=2)
    for bad in (-1, 9, 2.5):
        with pytest.raises(ValueError, match=r"expected min_new_tokens to be an integer in \[0, max_new_tokens = 8\]"):
            gen.generate(p, **base, min_new_tokens=bad)


def test_preprocessed_media_is_used_as_is(gen, monkeypatch):
    """PreprocessedMedia (preprocess once, reuse across prompts) gives the same answers as the
    raw image; Session.append preprocesses each medium once (it did it again at generate);
    media preprocessed for another image size are refused by name."""
    from flamingo_rt.runtime import PreprocessedMedia
    from flamingo_rt.runtime import prompt as prompt_mod

    a = img()
    vision = gen.model.config.vision
    ready = PreprocessedMedia.of(a, vision)
    assert ready.frames.shape == (1, 3, vision.image_size, vision.image_size)
    assert gen.generate([ready, "a red square"], GREEDY) == gen.generate([a, "a red square"], GREEDY)
    calls = []
    real = prompt_mod._to_frames
    monkeypatch.setattr(prompt_mod, "_to_frames", lambda x: calls.append(1) or real(x))
    sess = gen.session().append(a, "a red square")
    assert len(calls) == 1
    answer = sess.generate(GREEDY)
    assert len(calls) == 1, "generate preprocessed the appended image again"
    assert answer == gen.session().append(ready, "a red square").generate(GREEDY)
    assert gen.session().append(a, "x").discard()[0] is a  # discard gives the items as given
    assert ready in [ready] and ready != PreprocessedMedia(ready.frames, ready.image_size)  # by identity
    other = PreprocessedMedia(ready.frames, vision.image_size + 1)
    with pytest.raises(ValueError, match=f"expected media preprocessed for image size {vision.image_size}, "
                                         f"got media preprocessed for {vision.image_size + 1}"):
        gen.session().append(other)


def test_score_matches_full_forward(gen, tok):
    """score packs the candidates into chunks after the prompt (each sees the prompt and
    itself only); every packing (one candidate a chunk, some, all) gives each candidate's
    log-likelihood computed alone by a full forward of prompt + candidate."""
    p = [img(), "a red"]
    cands = [" square", " blue circle", " a", " big red square on the", " blue circle"]
    assert {len(tok.encode(c)) for c in cands} >= {1, 2}, "the candidates should have several lengths"
    enc = gen.encode(p)
    want = []
    for c in cands:
        ids = tok.encode(c)
        x = torch.tensor([enc.ids + ids])
        with torch.no_grad():
            lp = gen.model(x, torch.stack(enc.media)[None]).logits[0].float().log_softmax(-1)
        n = len(enc.ids)
        want.append(sum(float(lp[n - 1 + i, t]) for i, t in enumerate(ids)))
    for cap in (256, 1, 3):
        got = gen.score(p, cands, max_pack_tokens=cap)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-3)
        assert got[1] == got[4]
    shots = [img(), "a red square<|endofchunk|>"]
    torch.testing.assert_close(torch.tensor(gen.score(p, cands, prefix=gen.prefix(shots))),
                               torch.tensor(gen.score(shots + p, cands)), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="max_pack_tokens an integer >= 1, got 0"):
        gen.score(p, cands, max_pack_tokens=0)


def test_pack_continuations():
    from flamingo_rt.runtime.engine import pack_continuations

    feeds = [(0, [1, 2]), (1, [3]), (2, [4, 5, 6, 7, 8]), (3, [9]), (4, [1, 1])]
    assert [[k for k, _ in p] for p in pack_continuations(feeds, 3)] == [[0, 1], [2], [3, 4]]
    assert [[k for k, _ in p] for p in pack_continuations(feeds, 100)] == [[0, 1, 2, 3, 4]]
    assert [[k for k, _ in p] for p in pack_continuations(feeds, 1)] == [[0], [1], [2], [3], [4]]
    assert list(pack_continuations([], 8)) == []
    # a pack holds at most cap tokens: two of 2 go apart under a cap of 3
    assert [[k for k, _ in p] for p in pack_continuations([(0, [1, 2]), (1, [3, 4])], 3)] == [[0], [1]]


def test_cache_rows_and_media_bookkeeping(gen):
    """StaticCache.select_rows makes row b a copy of old row rows[b] (token K/V, media K/V
    unless media=False, and every bookkeeping field); add_media refuses a row past
    max_media counting the media it already holds; every query row of a left-padded chunk's
    mask sees at least one slot (its own: a padding row with none would give NaN)."""
    encs = [gen.encode([img(), "a red square"]), gen.encode(["two", img(), img(), "blue big circle on"])]
    cache = gen._cache(2)
    with torch.no_grad():
        gen._prefill(cache, encs)
    assert int(cache.pad[0]) != int(cache.pad[1]) and int(cache.num_media[0]) != int(cache.num_media[1])
    before = {name: getattr(cache, name).clone() for name in ("key_valid", "pad", "num_media", "image_count")}
    kv = [(k.clone(), v.clone()) for k, v in cache.kv]
    media = {key: (k.clone(), v.clone()) for key, (k, v) in cache.media_kv.items()}
    swap = torch.tensor([1, 0])
    cache.select_rows(swap, media=False)
    for key, (k, v) in cache.media_kv.items():  # media K/V left as they were
        assert torch.equal(k, media[key][0]) and torch.equal(v, media[key][1])
    cache.select_rows(swap)  # back to the start for the token K/V and bookkeeping; media now swapped
    for name, t in before.items():
        assert torch.equal(getattr(cache, name), t), name
    for (k, v), (k0, v0) in zip(cache.kv, kv):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    m = int(before["num_media"].max())
    for key, (k, v) in cache.media_kv.items():  # (the media a row can read: the first num_media.max())
        assert torch.equal(k[:, :m], media[key][0][swap, :m]) and torch.equal(v[:, :m], media[key][1][swap, :m])
    cache.select_rows(torch.tensor([1, 1]))
    for name, t in before.items():
        assert torch.equal(getattr(cache, name), t[[1, 1]]), name
    # only what can be read is copied: a moved row's filled slots (not the slots past the
    # length, written before they are read), and nothing of a row that stays
    n = cache.length
    for (k, v), (k0, v0) in zip(cache.kv, kv):
        assert torch.equal(k[:, :, :n], k0[[1, 1], :, :n]) and torch.equal(v[:, :, :n], v0[[1, 1], :, :n])
        assert torch.equal(k[0, :, n:], k0[0, :, n:]) and torch.equal(k[1], k0[1])
    with pytest.raises(ValueError, match=r"expected 2 row indices in \[0, 2\), got \[0, 2\]"):
        cache.select_rows([0, 2])
    # add_media: the capacity counts what a row already holds
    small = StaticCache(gen.model, 1, 64, 2)
    tokens, counts = gen._encode_media([[img(), img()]])
    small.add_media(gen.model, tokens, counts)
    one, n1 = gen._encode_media([[img()]])
    with pytest.raises(ValueError, match="at most 2 media per row in this cache, a row would have 3"):
        small.add_media(gen.model, one, n1)
    # a left-padded chunk: padding query rows see their own slot
    fresh = gen._cache(2)
    _, _, mask, real = fresh.plan_chunk(torch.tensor([2, 5]), 5)
    assert (~real).any() and bool(mask.any(-1).all())


def test_forward_packed_equals_each_continuation_alone(gen, tok):
    """forward_packed: each continuation's logits equal a chunk of it alone after the
    prompt (restored between); the cache's bookkeeping is unchanged; bad packs refused."""
    from flamingo_rt.runtime.cache import StaticCache
    from flamingo_rt.runtime.engine import forward_chunk, forward_packed

    enc = gen.encode([img(), "a red square<|endofchunk|>", img(), "the"])
    cache = StaticCache(gen.model, 1, 64, 4)
    gen._prefill(cache, [enc])
    conts = [tok.encode(" big blue"), tok.encode(" a"), tok.encode(" circle on the red")]
    before = (cache.length, cache.key_valid.clone(), cache.image_count.clone(), cache.pad.clone())
    with torch.no_grad():
        got = forward_packed(gen.model, cache, conts)
    assert cache.length == before[0] and torch.equal(cache.key_valid, before[1])
    assert torch.equal(cache.image_count, before[2]) and torch.equal(cache.pad, before[3])
    snap = cache.snapshot()
    for c, lg in zip(conts, got):
        cache.restore(snap)
        with torch.no_grad():
            alone = forward_chunk(gen.model, cache, torch.tensor([c]), torch.tensor([len(c)]), last_only=False)[0]
        assert lg.shape == alone.shape
        torch.testing.assert_close(lg, alone, rtol=1e-4, atol=1e-4)
    cache.restore(snap)
    with pytest.raises(ValueError, match="expected at most 64 tokens in the cache"):
        forward_packed(gen.model, cache, [[5] * 40, [5] * 20])
    with pytest.raises(ValueError, match="at least one token"):
        forward_packed(gen.model, cache, [[5], []])
    with pytest.raises(ValueError, match="without <image>"):
        forward_packed(gen.model, cache, [[5, tok.image_token_id]])
    with pytest.raises(ValueError, match="one-row cache"):
        forward_packed(gen.model, StaticCache(gen.model, 2, 64, 4), [[5]])


def test_forward_packed_rows_equals_each_row_packed_alone(gen, tok):
    """forward_packed_rows: the rows of a batched cache (prompts of different lengths,
    left-padded; one row with no continuation) give each continuation the logits its row's
    prompt gives it in a one-row cache; the bookkeeping is unchanged; bad packs refused."""
    from flamingo_rt.runtime.cache import StaticCache
    from flamingo_rt.runtime.engine import forward_packed, forward_packed_rows

    encs = [gen.encode([img(), "a red square<|endofchunk|>", img(), "the"]), gen.encode(["one two"]),
            gen.encode([img(), "big blue"])]
    rows = [[tok.encode(" big blue"), tok.encode(" a")], [],
            [tok.encode(" circle on the red"), tok.encode(" two"), tok.encode(" left of the")]]
    assert len({sum(map(len, r)) for r in rows}) == 3, "the rows should pack different totals"
    cache = StaticCache(gen.model, 3, 64, 4)
    gen._prefill(cache, encs)
    before = (cache.length, cache.key_valid.clone(), cache.image_count.clone(), cache.pad.clone())
    with torch.no_grad():
        got = forward_packed_rows(gen.model, cache, rows)
    assert cache.length == before[0] and torch.equal(cache.key_valid, before[1])
    assert torch.equal(cache.image_count, before[2]) and torch.equal(cache.pad, before[3])
    assert [len(g) for g in got] == [2, 0, 3]
    for enc, row, lgs in zip(encs, rows, got):
        if not row:
            continue
        one = StaticCache(gen.model, 1, 64, 4)
        gen._prefill(one, [enc])
        with torch.no_grad():
            alone = forward_packed(gen.model, one, row)
        for a, b in zip(lgs, alone):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="of each of the cache's 3 rows, got 2 rows"):
        forward_packed_rows(gen.model, cache, rows[:2])
    with pytest.raises(ValueError, match="at least one continuation token in some row"):
        forward_packed_rows(gen.model, cache, [[], [], []])
    with pytest.raises(ValueError, match="at least one token"):
        forward_packed_rows(gen.model, cache, [[[5]], [[]], []])
    with pytest.raises(ValueError, match="without <image>"):
        forward_packed_rows(gen.model, cache, [[[5]], [[tok.image_token_id]], []])


def test_score_batch_equals_score_per_prompt(gen, tok):
    """score_batch: prompts of different lengths and image counts (one with none), shared
    or per-prompt candidates of several lengths, any pack size, with a prefix: each row's
    scores equal score() on that prompt alone; misuse refused with what was expected."""
    prompts = [[img(), "a red", img(), "two"], ["the big"], [img(), "one two three left of the"]]
    shared = [" square", " blue circle", " a", " big red square on the"]
    per = [[" square", " blue"], [" a big red square on the left", " two", " of", " x"], [" circle on"]]
    want_shared = [gen.score(p, shared) for p in prompts]
    want_per = [gen.score(p, c) for p, c in zip(prompts, per)]
    for cap in (256, 1, 3):
        for cands, want in ((shared, want_shared), (per, want_per)):
            got = gen.score_batch(prompts, cands, max_pack_tokens=cap)
            assert [len(g) for g in got] == [len(w) for w in want]
            for g, w in zip(got, want):
                torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=0, atol=1e-4)
    shots = gen.prefix([img(), "a red square<|endofchunk|>"])
    got = gen.score_batch(prompts, per, prefix=shots)
    for p, c, g in zip(prompts, per, got):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(gen.score(p, c, prefix=shots)), rtol=0, atol=1e-4)
    with pytest.raises(TypeError, match="got Tensor at index 0; score one prompt with score"):
        gen.score_batch([img(), "a red"], shared)
    with pytest.raises(TypeError, match="expected a list of prompts, got str"):
        gen.score_batch("a red", shared)
    with pytest.raises(ValueError, match=r"one list of candidates per prompt \(3\), got 2"):
        gen.score_batch(prompts, per[:2])
    with pytest.raises(ValueError, match="at least one prompt"):
        gen.score_batch([], shared)
    with pytest.raises(ValueError, match="the longest candidate's tokens"):
        gen.score_batch(prompts, [[" a"], [" the" * 200], [" b"]])


def test_media_memo_encodes_each_medium_once(gen, tok):
    """Inside media_memo(), media equal in content to ones encoded in the block (in an
    earlier call, or another row of the same call) are not encoded again, with the same
    results; a medium changed in place, or a weight update, is encoded anew; outside the
    block every call encodes; the memo keeps at most max_items."""
    a, b, c = img(), img(), img()
    p1, p2 = [a, "a red", b, "two"], [a.clone(), "the", c, "big"]  # a's copy: equal content
    cands = [" square", " blue circle"]
    plain = gen.score_batch([p1, p2], cands)
    n0 = gen.vision_calls
    gen.score(p1, cands)
    assert gen.vision_calls - n0 == 2, "outside a memo block every medium is encoded"
    with gen.media_memo() as memo:
        n0 = gen.vision_calls
        got = gen.score_batch([p1, p2], cands)
        assert gen.vision_calls - n0 == 3 and (memo.misses, memo.hits) == (3, 0)  # a once for both rows
        for g, w in zip(got, plain):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=0, atol=1e-5)
        assert gen.score(p2, cands) == got[1] and gen.vision_calls - n0 == 3  # all known: bit for bit
        assert memo.hits == 2 and len(memo) == 3
        b.mul_(0.5)  # changed in place: new content, encoded again
        gen.score(p1, cands)
        assert gen.vision_calls - n0 == 4
        fresh_b = gen.score([b.clone(), "x"], cands)
        assert gen.vision_calls - n0 == 4
        with torch.no_grad():
            w = next(gen.model.resampler.parameters())
            w.add_(0.5)  # a weight update: what the memo holds is stale
            try:
                n1 = gen.vision_calls
                updated = gen.score([b, "x"], cands)
                assert gen.vision_calls - n1 == 1 and updated != fresh_b
            finally:
                w.sub_(0.5)
    n0 = gen.vision_calls
    gen.score(p1, cands)
    assert gen.vision_calls - n0 == 2, "the memo ends with its block"
    with gen.media_memo(max_items=1) as memo:
        for x in (a, c, a):
            gen.score([x, "x"], cands)
        assert len(memo) == 1 and memo.misses == 3, "the least recently used medium was dropped"
    with pytest.raises(ValueError, match="max_items an integer >= 1, got 0"):
        with gen.media_memo(max_items=0):
            pass


def test_few_shot_prompt_builder(gen, tok):
    a, b, q = img(), img(), img()
    items = few_shot_prompt([(a, "red"), (b, "blue")], q, prefix="Output:")
    enc = gen.encode(items)
    assert enc.ids.count(tok.image_token_id) == 3 and len(enc.media) == 3
    assert enc.ids.count(tok.eoc_token_id) == 2
    assert tok.decode(enc.ids).endswith("Output:")


def test_errors_are_clear_and_early(gen):
    with pytest.raises(ValueError, match="exceeds the cache length 160"):
        gen.generate(["one two three"], max_new_tokens=200)
    with pytest.raises(ValueError, match="2 <image> markers but 1 media"):
        gen.generate(["<image>a<image>b", img()])
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(["a"], do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(["a"], do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="non-empty prompt"):
        gen.generate([""])
    with pytest.raises(ValueError, match="at most 5"):
        gen.generate([img() for _ in range(6)])
    with pytest.raises(TypeError, match="expected text"):
        gen.generate([3.5])
    with pytest.raises(TypeError, match="expected config to be a GenerationConfig .*got dict"):
        list(gen.stream(["a"], {"max_new_tokens": 2}))
    with pytest.raises(TypeError, match="unknown generation setting: .*max_new_tokenz"):
        gen.generate(["a"], max_new_tokenz=2)
    # a prompt is a string or a list of text and media: anything else (a dict would iterate
    # over its keys as text, a bare tensor over its channels) is refused by name
    for bad in (5, None, {"a": 1}, img()):
        name = type(bad).__name__
        with pytest.raises(TypeError, match=f"or a list of prompts, got {name}"):
            gen.generate(bad)
        for call in (lambda p: list(gen.stream(p)), lambda p: gen.score(p, ["a"]), gen.prefix):
            with pytest.raises(TypeError, match=f"expected a prompt: a string, or a list of text .*got {name}"):
                call(bad)
    with pytest.raises(TypeError, match="expected a prompt: a string, or a list of text .*got int"):
        gen.generate([["a"], 5])  # a batch whose second prompt is not one
    # score's candidates: a bare string was scored character by character
    with pytest.raises(TypeError, match=r"expected candidates to be a list of strings, got a str \(wrap one"):
        gen.score(["a"], "red")
    with pytest.raises(TypeError, match="expected candidates to be a list of strings, got \\['red', 3\\]"):
        gen.score(["a"], ["red", 3])
    # the candidate checks are shared with ExportedSession.score (runtime.prompt.encode_candidates);
    # a candidate holding <image> would take an image slot no medium fills
    for cands, err, msg in (([], ValueError, "expected at least one candidate"),
                            (["red", ""], ValueError, r"candidate 1 \(''\) has no token"),
                            (["red", "x <image>"], ValueError, "candidate 1 contains <image>"),
                            (("red", None), TypeError, "list of strings")):
        with pytest.raises(err, match=msg):
            gen.score(["a"], cands)
    # settings of the wrong type are named (a str temperature failed in a comparison, a str
    # seed inside torch, a float max_new_tokens said only ">= 1"); numpy scalars are numbers
    for kw, msg in ((dict(temperature="hot"), "expected temperature to be a number, got 'hot'"),
                    (dict(max_new_tokens=2.5), "expected max_new_tokens to be an integer >= 1, got 2.5"),
                    (dict(max_new_tokens=True), "expected max_new_tokens to be an integer >= 1, got True"),
                    (dict(seed="x"), "expected seed to be an integer \\(or None\\), got 'x'"),
                    (dict(do_sample=1), "expected do_sample to be True or False, got 1"),
                    (dict(num_beams=2, early_stopping=1), 'expected early_stopping to be True, False or "never", got 1'),
                    (dict(num_beams=2, early_stopping="always"), "expected early_stopping .*got 'always'"),
                    (dict(stop_strings=[1]), "expected stop_strings to be a string or a list of strings")):
        with pytest.raises(ValueError, match=msg):
            gen.generate(["a"], **kw)
    cfg = GenerationConfig(max_new_tokens=np.int64(2), seed=np.int32(3), temperature=np.float32(0.5)).validate()
    assert type(cfg.max_new_tokens) is int and type(cfg.seed) is int and type(cfg.temperature) is float
    # the generator's own sizes, and a tokenizer with ids the model cannot embed
    with pytest.raises(ValueError, match="expected max_seq_len to be an integer >= 1 \\(or None\\), got 0"):
        Generator(gen.model, gen.tok, max_seq_len=0)
    with pytest.raises(ValueError, match="expected max_media to be an integer >= 0, got -1"):
        Generator(gen.model, gen.tok, max_media=-1)
    small = get_preset("tiny")
    small.lm.vocab_size = gen.tok.vocab_size - 1
    with pytest.raises(ValueError, match=f"tokenizer has {gen.tok.vocab_size} tokens, more than the model's"):
        Generator(Flamingo(small), gen.tok)


def test_nan_logits_are_an_error_not_an_answer(gen):
    """A NaN in the model (here in the resampler's latents, so only prompts with an image are
    hit) made greedy decoding take the NaN as the maximum: a silent empty answer or a banned
    token. It is a FloatingPointError naming the row, for greedy, sampled and beam decoding."""
    import copy

    bad = copy.deepcopy(gen.model)
    with torch.no_grad():
        bad.resampler.latents.fill_(float("nan"))
    g = Generator(bad, gen.tok, max_seq_len=160, max_media=5)
    assert g.generate(["one two"], max_new_tokens=3) == gen.generate(["one two"], max_new_tokens=3)
    batch = [["one"], [img(), "two"]]
    with pytest.raises(FloatingPointError, match=r"logits are NaN in prompt row\(s\) \[1\]"):
        g.generate(batch, max_new_tokens=3)
    with pytest.raises(FloatingPointError, match=r"logits are NaN in prompt row\(s\) \[1\]"):
        g.generate(batch, max_new_tokens=3, do_sample=True, seed=0)
    with pytest.raises(FloatingPointError, match="logits are NaN"):
        g.generate([img(), "two"], max_new_tokens=3, num_beams=2)


def test_memory_stays_flat_over_many_tokens(gen):
    def rss_kb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4

    p = [img(), "a red"]
    cfg = GenerationConfig(max_new_tokens=100, stop_on_eoc=False, stop_on_eos=False)
    for _ in range(3):  # warm-up
        gen.generate(p, cfg)
    before = rss_kb()
    for _ in range(20):  # 2,000 decoded tokens
        gen.generate(p, cfg)
    assert rss_kb() - before < 8 * 1024, "resident memory grew by more than 8 MB"


def _compiled_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend", ["aot_eager", True])
def test_decode_step_compiles_once_for_every_position(gen, tok, backend):
    """One graph per batch size serves every decode position, prompt length and cache
    (a CUDA graph needs exactly that), and its tokens equal the eager step's."""
    torch._dynamo.reset()
    compiled = Generator(gen.model, tok, max_seq_len=160, max_media=5, compile=backend)
    assert not compiled.cuda_graphs  # CPU
    before = _compiled_graphs()
    prompts = [[img(), "a red", img(), "the"], ["one two three left", img(), "big"]]
    for p in prompts:
        assert compiled.generate(p, GREEDY) == gen.generate(p, GREEDY)
    s_eager, s_comp = gen.session(), compiled.session()  # another cache object
    for s in (s_eager, s_comp):
        s.append(prompts[0][0], "a")
    assert s_comp.generate(GREEDY) == s_eager.generate(GREEDY)
    assert _compiled_graphs() - before == 1
    if backend == "aot_eager":  # (inductor: one more compile, ~15 s, for the same fact)
        assert compiled.generate(prompts, GREEDY) == gen.generate(prompts, GREEDY)  # batch 2: its own graph
        assert _compiled_graphs() - before == 2


def test_decode_plan_equals_chunk_plan_and_buffers_stay(gen):
    """plan_decode (tensor position) gives plan_chunk's slots, positions and mask; the
    cache's buffers are never reallocated (reset, restore, broadcast, decoding)."""
    enc = [gen.encode([img(), "a red square"]), gen.encode(["two", img(), "blue"])]
    cache = gen._cache(2)
    ptrs = [t.data_ptr() for t in cache.buffers()]
    with torch.no_grad():
        gen._prefill(cache, enc)
        for t in ([5, 6], [7, 8]):
            decode_step(gen.model, cache, torch.tensor(t))
    assert int(cache.position) == cache.length == max(len(e.ids) for e in enc) + 2
    snap = cache.snapshot()
    want = cache.plan_chunk(torch.ones(2, dtype=torch.long), 1)
    cache.restore(snap)
    got = cache.plan_decode(snap.length + 1)  # (what an eager step asks for)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    cache.restore(snap)
    got = cache.plan_decode()
    for w, g in zip(want[:3], got[:3]):  # (the chunk's mask covers the slots up to its end only)
        assert torch.equal(w, g[..., :w.shape[-1]])
    assert want[2].shape[-1] == snap.length + 1 and not got[2][..., snap.length + 1:].any()
    assert torch.equal(want[3], got[3])
    cache.restore(snap)
    assert int(cache.position) == snap.length
    one = gen._cache(1)
    with torch.no_grad():
        gen._prefill(one, enc[:1])
    cache.broadcast_from(one)
    assert int(cache.position) == cache.length == len(enc[0].ids)
    cache.reset()
    assert int(cache.position) == cache.length == 0 and not cache.key_valid.any()
    assert [t.data_ptr() for t in cache.buffers()] == ptrs


def test_decode_step_errors(gen, tok):
    cache = gen._cache(1)
    with torch.no_grad():
        gen._prefill(cache, [gen.encode(["a red"])])
        with pytest.raises(ValueError, match="<image> tokens but 0 media"):
            decode_step(gen.model, cache, torch.tensor([tok.image_token_id]))
        cache.length = cache.max_seq_len
        with pytest.raises(ValueError, match="at most 160 tokens"):
            decode_step(gen.model, cache, torch.tensor([5]))
    with pytest.raises(ValueError, match="cuda_graphs=True needs compile=True"):
        Generator(gen.model, tok, max_seq_len=160, cuda_graphs=True)


def test_chunks_read_only_the_cache_slots_up_to_their_end(gen, monkeypatch):
    """A prompt chunk, a pack of scored continuations and an eager decode step attend over
    the cache's slots up to their own end, not the whole cache (a 250-token prompt in a
    1024-slot cache read 4x the keys and values): slots past the end, poisoned with NaN,
    change nothing."""
    from flamingo_rt.runtime.engine import forward_chunk, forward_packed_rows, left_pad

    encs = [gen.encode([img(), "a red square"]), gen.encode(["two", img(), "blue"])]
    conts = [[[5, 6, 7], [8]], [[9, 10]]]

    def run(poison: bool):
        cache = gen._cache(2)
        if poison:
            for k, v in cache.kv:
                k.fill_(float("nan"))
                v.fill_(float("nan"))
        tokens, counts = gen._encode_media([e.media for e in encs])
        cache.add_media(gen.model, tokens, counts)
        ids, lengths = left_pad([e.ids for e in encs], gen.tok.pad_token_id, gen.device)
        with torch.no_grad():
            first = forward_chunk(gen.model, cache, ids, lengths, last_only=False)
            packed = forward_packed_rows(gen.model, cache, conts)
            if poison:  # (the pack wrote past the prompt: poison those slots again)
                for k, v in cache.kv:
                    k[:, :, cache.length:] = float("nan")
                    v[:, :, cache.length:] = float("nan")
            steps = [decode_step(gen.model, cache, torch.tensor(t)) for t in ([5, 6], [7, 8])]
        return first, [t for row in packed for t in row] + steps

    clean, poisoned = run(False), run(True)
    # the attention is handed those slots only (the C++ decode kernel skips masked slots
    # anyway; other paths, SDPA, do not); the eager modules' decode steps here (the fused
    # CPU step's mask has the same E: the poisoned run above went through it)
    import flamingo_rt.models.lm as lm_module
    from flamingo_rt.runtime import fused_decode

    seen, inner = [], lm_module.cached_attention
    monkeypatch.setattr(lm_module, "cached_attention", lambda q, k, v, m, s: seen.append(k.shape[2]) or inner(q, k, v, m, s))
    with fused_decode.disabled():
        run(False)
    n_layers, n = len(gen.model.lm.layers), max(len(e.ids) for e in encs)
    assert seen[::n_layers] == [n, n + 4, n + 1, n + 2], seen  # prompt, pack (4 tokens in row 0), 2 steps
    assert torch.isfinite(poisoned[0]).all() and torch.equal(poisoned[0], clean[0])
    for a, b in zip(poisoned[1], clean[1]):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_scoring_packs_fit_the_slots_left_after_a_long_prompt(gen):
    """A pack of candidates holds at most the cache's free slots past the prompt (here fewer
    than max_pack_tokens): they then run in several packs, with the scores of one by one."""
    words = 1
    while len(gen.encode([img(), "x " * (words + 1)]).ids) <= 150:
        words += 1
    p = [img(), "x " * words]
    n = len(gen.encode(p).ids)
    cands = [" big blue circle on", " the small red", " a square left of the", " two", " big red"]
    free = gen.max_seq_len - n
    assert 0 < free < sum(len(gen.tok.encode(c)) - 1 for c in cands) and max(len(gen.tok.encode(c)) for c in cands) <= free
    one_by_one = [gen.score(p, [c])[0] for c in cands]
    assert gen.score(p, cands) == pytest.approx(one_by_one, abs=1e-4)


def test_padded_vocabulary_rows_are_never_generated(tok):
    """A model whose LM vocabulary is larger than its tokenizer's (rows padded to a multiple):
    the ids past the tokenizer's are never chosen, even when their logits are the largest."""
    torch.manual_seed(3)
    cfg = get_preset("tiny")
    cfg.lm.vocab_size = tok.vocab_size + 8
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        model.lm.lm_head.weight[tok.vocab_size:] = model.lm.lm_head.weight[:8] * 50.0
    g = Generator(model, tok, max_seq_len=64, max_media=2)
    for kw in (dict(), dict(num_beams=3), dict(do_sample=True, seed=1)):
        ids = []
        real = g._finish_text  # every path's generated ids (greedy, sampled, the best beam) pass here
        try:
            g._finish_text = lambda toks, cfg: ids.extend(toks) or real(toks, cfg)
            g.generate([img(), "a red"], max_new_tokens=6, stop_on_eoc=False, stop_on_eos=False, **kw)
        finally:
            del g._finish_text
        assert len(ids) == 6 and all(i < tok.vocab_size for i in ids), (kw, ids)
    lp = g._mask_banned(torch.zeros(1, cfg.lm.vocab_size))
    assert torch.isinf(lp[0, tok.vocab_size:]).all() and int(torch.isfinite(lp[0, :tok.vocab_size]).sum()) >= tok.vocab_size - 4
