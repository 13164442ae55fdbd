"""The recipe (flamingo_rt.recipe): batching, frozen-backbone details, and the toy recipe end
to end (under 2 minutes, losses go down, deterministic under its seed, loadable folder)."""
import copy
import time

import numpy as np
import pytest
import torch

from flamingo_rt.io import FlamingoTokenizer, load_pretrained
from flamingo_rt.io.tokenizer import EOC_TOKEN, IMAGE_TOKEN
from flamingo_rt.models import Flamingo
from flamingo_rt.recipe import (
    collate, get_recipe_preset, info_nce, normalize_pixels, run_recipe, train_special_rows,
)
from flamingo_rt.runtime import GenerationConfig, Generator, preprocess_media


@pytest.fixture(scope="module")
def tok():
    texts = ["a red square at the top.", "It is called a blicket", "Question: how many? Answer: two"] * 30
    return FlamingoTokenizer.train_bpe(texts, vocab_size=300)


def _vision():
    return get_recipe_preset("toy").model.vision


def test_normalize_pixels_matches_runtime_preprocessing():
    vis = _vision()
    img = torch.rand(3, 48, 48)
    ours = normalize_pixels(img, vis)
    ref = preprocess_media(img, vis)[0]
    assert ours.shape == (3, vis.image_size, vis.image_size)
    torch.testing.assert_close(ours, ref)
    u8 = (torch.rand(2, 3, vis.image_size, vis.image_size) * 255).to(torch.uint8)
    torch.testing.assert_close(normalize_pixels(u8, vis), (u8.float() / 255 - 0.5) / 0.5)


def test_collate_labels_media_index_and_truncation(tok):
    vis = _vision()
    S = vis.image_size
    m = lambda: (torch.rand(1, 3, S, S) * 255).to(torch.uint8)  # noqa: E731
    recs = [
        {"text": f"hi {IMAGE_TOKEN}a red square{EOC_TOKEN}{IMAGE_TOKEN}It is called a blicket{EOC_TOKEN}",
         "media": [m(), m()]},
        {"text": f"{IMAGE_TOKEN}two{EOC_TOKEN}", "media": [m()]},
    ]
    b = collate(recs, tok, vis, max_seq_len=64)
    ids0 = tok.encode(recs[0]["text"])
    B, T = b.input_ids.shape
    assert (B, T) == (2, len(ids0))
    assert b.media.shape == (2, 2, 1, 3, S, S) and b.num_media.tolist() == [2, 1]
    assert torch.equal(b.media[1, 1], torch.zeros(1, 3, S, S))  # padding medium
    torch.testing.assert_close(b.media[0, 1], normalize_pixels(recs[0]["media"][1], vis))
    img = tok.image_token_id
    # labels: the ids, except <image> tokens and padding
    assert (b.labels[b.input_ids == img] == -100).all()
    assert (b.labels[b.attention_mask == 0] == -100).all()
    keep = (b.input_ids != img) & (b.attention_mask == 1)
    assert torch.equal(b.labels[keep], b.input_ids[keep])
    # media_index: -1 before the first <image>, then the count of <image> so far minus one
    expect = torch.tensor(np.cumsum(np.array(ids0) == img) - 1, dtype=torch.int32)
    assert torch.equal(b.media_index[0], expect)
    # cutting inside the second chunk drops the second image
    cut = [i for i, t in enumerate(ids0) if t == img][1]  # cut right before the second <image>
    bt = collate(recs[:1], tok, vis, max_seq_len=cut)
    assert bt.input_ids.shape == (1, cut) and bt.num_media.tolist() == [1] and bt.media.shape[1] == 1
    with pytest.raises(ValueError, match="2 <image> markers but 1 media"):
        collate([{"text": recs[0]["text"], "media": [m()]}], tok, vis, 64)


def test_info_nce_against_hand_computation():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(np.log(10.0))
    logits = 10.0 * a @ t.t()
    i2t = -torch.log_softmax(logits, 1).diagonal().mean()
    t2i = -torch.log_softmax(logits, 0).diagonal().mean()
    torch.testing.assert_close(info_nce(a, t, scale), 0.5 * (i2t + t2i))
    # captions 0 and 1 equal: each row's target splits over both
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    tgt = same.float() / same.float().sum(1, keepdim=True)
    ref = 0.5 * (-(tgt * torch.log_softmax(logits, 1)).sum(1).mean() - (tgt * torch.log_softmax(logits.t(), 1)).sum(1).mean())
    torch.testing.assert_close(info_nce(a, t, scale, same), ref)


def test_special_rows_are_the_only_lm_weights_that_change(tok):
    """The special rows train as (k, D) parameters (no gradient over the whole tables); after
    merging, the tables' other rows are bit-identical and the trained rows are those of the
    whole tables trained with the other rows' gradients masked (OpenFlamingo's rule)."""
    cfg = get_recipe_preset("toy").model
    cfg.lm.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = Flamingo(cfg).freeze_backbones()
    tables = [model.lm.embed_tokens.weight] + ([] if model.lm.lm_head.weight is model.lm.embed_tokens.weight
                                                else [model.lm.lm_head.weight])
    rows = [tok.image_token_id, tok.eoc_token_id]
    ref = copy.deepcopy(model)  # the masked whole-table way, for the values
    params = train_special_rows(model, rows)
    assert [tuple(p.shape) for p in params] == [(2, cfg.lm.dim)] * len(tables)
    assert not any(t.requires_grad for t in tables)
    before = [t.detach().clone() for t in tables]
    ref_tables = [ref.lm.embed_tokens.weight] + ([] if ref.lm.lm_head.weight is ref.lm.embed_tokens.weight
                                                 else [ref.lm.lm_head.weight])
    keep = torch.zeros(cfg.lm.vocab_size, 1)
    keep[rows] = 1.0
    for w in ref_tables:
        w.requires_grad_(True)
        w.register_hook(lambda g: g * keep)
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}], lr=0.1)
    opt_ref = torch.optim.AdamW([{"params": ref_tables, "weight_decay": 0.0}], lr=0.1)
    ids = torch.randint(4, tok.vocab_size, (2, 12))
    ids[:, 0] = tok.image_token_id
    ids[:, 6] = tok.eoc_token_id
    media = torch.randn(2, 1, 3, cfg.vision.image_size, cfg.vision.image_size)
    for m, o in ((model, opt), (ref, opt_ref)):
        for _ in range(2):
            o.zero_grad()
            m(ids, media, labels=ids).loss.backward()
            o.step()
    assert all(t.grad is None for t in tables)  # no whole-table gradient was made
    model.lm.merge_token_rows()
    assert model.lm.token_rows is None
    others = [i for i in range(tok.vocab_size) if i not in rows]
    for w, w0, wr in zip(tables, before, ref_tables):
        assert torch.equal(w[others], w0[others])
        assert not torch.equal(w[rows], w0[rows])
        torch.testing.assert_close(w[rows], wr.detach()[rows], rtol=1e-5, atol=1e-6)


def _mean(xs, n):
    return sum(xs[:n]) / n, sum(xs[-n:]) / n


def test_toy_recipe_end_to_end(tmp_path):
    t0 = time.perf_counter()
    # one thread: the toy's tensors are tiny, and CI machines are shared
    r = run_recipe("toy", tmp_path / "a", seed=3, progress=False, num_threads=1)
    wall = time.perf_counter() - t0
    assert wall < 120, f"expected the toy recipe under 120 s, took {wall:.1f} s"
    # every stage's loss goes down (mean of the first vs the last few steps)
    for name, losses in [("contrastive", r.contrastive.losses), ("lm", r.lm.losses), ("connectors", r.connectors.losses)]:
        first, last = _mean(losses, 5)
        assert last < first, f"stage {name}: loss went from {first:.4f} to {last:.4f}"
    assert r.lm.heldout_after < r.lm.heldout_before
    assert any(abs(a) > 0 for a, _ in r.connectors.gates.values())  # the gates opened
    # the folder loads and gives the same logits as the model in memory
    gen = Generator.from_pretrained(tmp_path / "a")
    model, tok = load_pretrained(tmp_path / "a")
    for k, v in r.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    S = model.config.vision.image_size
    prompt = [torch.rand(3, S, S), "It is called a"]
    text = gen.generate(prompt, GenerationConfig(max_new_tokens=4))
    assert isinstance(text, str)
    assert (tmp_path / "a" / "recipe.json").is_file()

    # deterministic under the seed: the same run again gives identical weights
    r2 = run_recipe("toy", None, seed=3, progress=False, num_threads=1)
    sd1, sd2 = r.model.state_dict(), r2.model.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), f"{k} differs between two runs with the same seed"
    assert r.connectors.losses == r2.connectors.losses


@pytest.mark.parametrize("freeze_lm", [True, False])
def test_train_connectors_freezing(tok, freeze_lm):
    """Frozen LM (the recipe): only the xattn blocks, the resampler and the special rows
    change; with ``freeze_lm=False`` (the paper's ablation) the LM's own layers change too.
    The vision encoder never changes."""
    from flamingo_rt.recipe import train_connectors

    rc = get_recipe_preset("toy")
    rc.model.lm.vocab_size = tok.vocab_size
    c = rc.connectors
    c.steps, c.doc_pool, c.pair_pool, c.video_pool, c.freeze_lm = 2, 3, 3, 1, freeze_lm
    torch.manual_seed(0)
    model = Flamingo(rc.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_connectors(model, tok, c, seed=0, image_size=rc.image_size, progress=False)
    assert len(stats.losses) == 2 and set(stats.dataset_losses) == {"docs", "pairs", "videos"}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("vision_encoder.") for k in changed)
    assert any(k.startswith("resampler.") for k in changed) and any(k.startswith("lm.xattn.") for k in changed)
    lm_core = {k for k in changed if k.startswith("lm.layers.")}
    assert bool(lm_core) == (not freeze_lm)


def test_quick_eval_word_f1_by_hand():
    from flamingo_rt.recipe.quick_eval import _f1

    # pred "a red circle" vs ref "a red square.": 2 common of 3 and 3 -> P = R = 2/3
    assert _f1("a red circle", "a red square.") == pytest.approx(2 / 3)
    # repeated words count at most as often as in the other text: common 1 -> P 1/2, R 1/3
    assert _f1("red red", "a red square") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert _f1("", "a red square") == 0.0 and _f1("blue", "a red square") == 0.0


def test_quick_eval_in_batches_counts_each_episode():
    """episode_accuracy scores its episodes in batches (score_batch): the same count as
    ranking each episode's candidates with score() alone, for any batch size; caption_f1
    generates a batch at a time: the F1 of each caption generated alone."""
    from flamingo_rt.demo import DEFAULT_MODEL
    from flamingo_rt.recipe.quick_eval import _f1, caption_f1, episode_accuracy
    from flamingo_rt.world import few_shot_episode

    gen = Generator.from_pretrained(DEFAULT_MODEL, max_media=8)
    hits = 0
    for i in range(5):
        ep = few_shot_episode("classify", 1, np.random.default_rng([7, 1, i]), "heldout", n_way=3, by="colour")
        scores = gen.score(ep.prompt, [" " + c for c in ep.candidates])
        hits += ep.candidates[int(np.argmax(scores))] == ep.answer
    assert 0 < hits < 5, "a mix of right and wrong answers makes the count a check"
    for bs in (1, 2, 8):
        assert episode_accuracy(gen, "classify", 1, 5, 7, batch_size=bs, n_way=3, by="colour") == hits / 5
    with pytest.raises(ValueError, match="batch_size >= 1, got 0"):
        episode_accuracy(gen, "classify", 1, 5, 7, batch_size=0)
    # captions: generated a batch at a time, the F1 of each generated alone
    f1s = []
    for i in range(3):
        ep = few_shot_episode("caption", 1, np.random.default_rng([7, 1, i]), "heldout")
        f1s.append(_f1(gen.generate(ep.prompt, max_new_tokens=24), ep.answer))
    assert 0 < sum(f1s) / 3 < 1
    for bs in (1, 2, 8):
        assert caption_f1(gen, 1, 3, 7, batch_size=bs) == pytest.approx(sum(f1s) / 3, abs=1e-12)


def test_cached_features_and_naming_episodes(tok):
    """Stage 3 with the vision features computed once (``cache_features``) gives the losses
    of the per-step encoder, and the naming-episode dataset is in the evaluation's layout."""
    from flamingo_rt.recipe import run_stage3
    from flamingo_rt.recipe.connectors import naming_record

    r = naming_record(np.random.default_rng(0), (2, 3), 2, 32)
    chunks = r["text"].split(IMAGE_TOKEN)[1:]
    assert len(chunks) == len(r["media"]) >= 3 and all(c.endswith(EOC_TOKEN) for c in chunks)
    assert len({c.split(" a ")[0] for c in chunks}) == 1  # one naming format ("This is a" / "It is called a")

    rc = get_recipe_preset("toy")
    rc.model.lm.vocab_size = tok.vocab_size
    c = rc.connectors
    c.steps, c.doc_pool, c.pair_pool, c.video_pool, c.naming_pool, c.naming_batch = 2, 3, 3, 1, 4, 2
    from flamingo_rt.models import NFNet
    from flamingo_rt.models.lm import DecoderLM

    torch.manual_seed(0)
    nf, lm = NFNet(rc.model.vision.nfnet), DecoderLM(rc.model.lm)
    losses = []
    for cache in (True, False):
        c.cache_features = cache
        _, st = run_stage3(rc, tok, copy.deepcopy(nf), lm, seed=1, progress=False)
        assert set(st.dataset_losses) == {"docs", "pairs", "videos", "naming"}
        losses.append(st.losses)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
