"""flamingo_rt.world: determinism, rendering, attribute families, the train / held-out split,
text correctness against the rendered pixels, episodes, documents and clips."""
from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict

import numpy as np
import pytest
import torch

import flamingo_rt.world as W
from flamingo_rt.io.tokenizer import EOC_TOKEN, IMAGE_TOKEN
from flamingo_rt.world.scene import Obj, Scene, object_masks, render_scene

S = 64


def _rgb_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def _mean_colour(img: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    sel = torch.from_numpy(mask > 0.95)
    return img[:, sel].mean(dim=1).numpy()


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(W.COLOURS, key=lambda c: _rgb_distance(W.COLOURS[c], rgb))


def _centroid(mask: np.ndarray):
    ys, xs = np.nonzero(mask > 0.5)
    return xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]


# --------------------------------------------------------------------------- determinism

def _fingerprint(seed: int):
    imgs, texts = [], []
    for r in W.image_text_pairs(seed, n=4):
        imgs.append(r["image"]); texts.append(r["text"])
    for r in W.interleaved_documents(seed, n=2):
        imgs += r["images"]; texts.append(r["text"])
    for r in W.video_text_pairs(seed, n=2, num_frames=4):
        imgs.append(r["video"]); texts.append(r["text"])
    texts += list(W.text_corpus(seed, n=5))
    for task in ("classify", "qa", "video_qa"):
        e = W.few_shot_episode(task, 1, seed)
        imgs += [p for p in e.prompt if torch.is_tensor(p)]
        texts += [p for p in e.prompt if isinstance(p, str)] + [e.answer]
    return imgs, texts


def test_deterministic_under_seed():
    a_imgs, a_txt = _fingerprint(123)
    b_imgs, b_txt = _fingerprint(123)
    c_imgs, c_txt = _fingerprint(124)
    assert a_txt == b_txt
    assert len(a_imgs) == len(b_imgs) and all(torch.equal(x, y) for x, y in zip(a_imgs, b_imgs))
    assert a_txt != c_txt
    assert not torch.equal(a_imgs[0], c_imgs[0])
    # global RNG state is neither used nor disturbed
    torch.manual_seed(0); np.random.seed(0)
    x = W.few_shot_episode("caption", 2, 7).prompt
    torch.manual_seed(99); np.random.seed(99)
    y = W.few_shot_episode("caption", 2, 7).prompt
    assert x[1] == y[1] and torch.equal(x[0], y[0])
    assert W.world_corpus(20, 3) == W.world_corpus(20, 3) != W.world_corpus(20, 4)


def test_image_and_clip_tensors():
    for r in W.image_text_pairs(0, n=8):
        im = r["image"]
        assert im.shape == (3, S, S) and im.dtype == torch.float32
        assert float(im.min()) >= 0.0 and float(im.max()) <= 1.0 and float(im.std()) > 0.03
    r = next(W.image_text_pairs(0, image_size=96, n=1))
    assert r["image"].shape == (3, 96, 96)
    v = next(W.video_text_pairs(0, num_frames=6, n=1))["video"]
    assert v.shape == (6, 3, S, S) and v.dtype == torch.float32
    assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    assert not torch.equal(v[0], v[1])  # per-frame sensor noise at least


# --------------------------------------------------------------------------- attribute families

def test_families_have_at_least_8_values():
    assert len(W.SHAPES) >= 8 and len(W.COLOURS) >= 8 and len(W.SIZES) >= 8
    assert len(W.COUNTS) >= 8 and len(W.REGIONS) >= 8 and len(W.DIRECTIONS) >= 8
    assert len(set(W.SHAPES)) == len(W.SHAPES) and len(set(W.COLOUR_NAMES)) == len(W.COLOUR_NAMES)


def test_colours_distinguishable_in_pixels():
    means = {}
    for c in W.COLOURS:
        sc = Scene((Obj("square", c, 7, 0.5, 0.5),), "single", seed=5, style="blotches")
        img = render_scene(sc, S)
        means[c] = _mean_colour(img, object_masks(sc, S)[0])
        assert _nearest_colour(means[c]) == c
    for a, b in itertools.combinations(W.COLOURS, 2):
        assert _rgb_distance(means[a], means[b]) > 0.2, (a, b)


def test_shapes_differ_in_mask_and_pixels():
    masks = {}
    for s in W.SHAPES:
        sc = Scene((Obj(s, "white", 7, 0.5, 0.5),), "single", seed=5)
        masks[s] = object_masks(sc, S)[0] > 0.5
        assert masks[s].sum() > 60, s
        for lvl in (0, 3):  # small sizes still render a visible blob
            assert object_masks(Scene((Obj(s, "white", lvl, 0.5, 0.5),), "single", 5), S)[0].sum() > 12
    for a, b in itertools.combinations(W.SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.8, (a, b, iou)
    img_a = render_scene(Scene((Obj("circle", "red", 6, 0.5, 0.5),), "single", 5), S)
    img_b = render_scene(Scene((Obj("heart", "red", 6, 0.5, 0.5),), "single", 5), S)
    assert (img_a - img_b).abs().sum() > 3.0


def test_sizes_graded_and_regions_rendered():
    areas = [object_masks(Scene((Obj("circle", "red", z, 0.5, 0.5),), "single", 1), S)[0].sum() for z in W.SIZES]
    assert all(b > a * 1.1 for a, b in zip(areas, areas[1:]))
    seen = set()
    g = np.random.default_rng(0)
    for _ in range(200):
        sc = W.sample_scene(g, kind="single")
        o = sc.subject
        cx, cy = _centroid(object_masks(sc, S)[0])
        assert W.REGIONS[3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)] == o.region
        seen.add(o.region)
    assert seen == set(W.REGIONS)


def test_sampled_scenes_never_overlap_and_counts_cover_1_to_8():
    g = np.random.default_rng(1)
    counts = set()
    for _ in range(150):
        sc = W.sample_scene(g, kind="count")
        m = object_masks(sc, S)
        assert (m.sum(0) <= 1.0 + 1e-5).all()  # disjoint coverage
        assert (m.reshape(len(m), -1).sum(1) > 5).all()  # every object visible
        counts.add(sc.count)
    assert counts == set(W.COUNTS)


# --------------------------------------------------------------------------- split

def _train_texts_and_combos(seed: int):
    texts, combos, tids = [], [], []
    for r in W.image_text_pairs(seed, n=300):
        texts.append(r["text"]); combos += r["scene"].combos(); tids.append(r["template_id"])
    for r in W.interleaved_documents(seed, n=120, image_size=16):
        texts.append(r["text"])
        for sc in r["scenes"]:
            combos += sc.combos()
    for r in W.video_text_pairs(seed, n=120, image_size=16, num_frames=3):
        texts.append(r["text"]); combos += r["clip"].combos()
    texts += list(W.text_corpus(seed, n=800))
    texts += W.world_corpus(200, seed)
    for i, task in enumerate(W.TASKS * 6):
        e = W.few_shot_episode(task, 2, seed * 1000 + i, image_size=16, num_frames=3, n_way=3)
        texts += [p for p in e.prompt if isinstance(p, str)]
        for sc in e.meta.get("scenes", []) + ([e.meta["query_scene"]] if "query_scene" in e.meta else []):
            combos += sc.combos()
        for c in e.meta.get("clips", []) + ([e.meta["query_clip"]] if "query_clip" in e.meta else []):
            combos += c.combos()
        tids += [q.template_id for q in e.meta.get("qas", [])] + e.meta.get("template_ids", [])
        if task == "classify":
            tids.append(e.meta["template_id"])
            assert all(W.nonsense_word_split(w) == "train" for w in e.candidates)
    return texts, combos, tids


def _heldout_phrases():
    out = []
    for s, c in W.HELDOUT_COMBOS:
        out.append(re.compile(rf"\b{c} ({s}|{W.SHAPE_PLURALS[s]})\b"))
    return out


def test_training_never_emits_heldout_combos_or_formats():
    texts, combos, tids = _train_texts_and_combos(11)
    assert len(combos) > 2000
    assert not set(combos) & W.HELDOUT_COMBOS
    markers = W.heldout_markers()
    assert len(markers) >= 5
    phrases = _heldout_phrases()
    for t in texts:
        assert not any(m in t for m in markers), t
        assert not any(p.search(t) for p in phrases), t
    assert tids and all(".h" not in t for t in tids)
    # every non-held-out pair does occur in training
    assert len(set(combos)) == len(W.SHAPES) * len(W.COLOURS) - len(W.HELDOUT_COMBOS)


def test_heldout_samples_contain_heldout_combos_and_formats():
    n_held = 0
    for r in W.image_text_pairs(5, split="heldout", n=60):
        assert (r["scene"].subject.shape, r["scene"].subject.colour) in W.HELDOUT_COMBOS
        assert r["template_id"].split(".")[-1].startswith("h")
        n_held += 1
    for r in W.video_text_pairs(5, split="heldout", n=30, image_size=16, num_frames=3):
        assert set(r["clip"].combos()) & W.HELDOUT_COMBOS
    seen = set()
    markers = W.heldout_markers()
    for i, task in enumerate(W.TASKS):
        e = W.few_shot_episode(task, 1, i, split="heldout", image_size=16, num_frames=3, n_way=3)
        text = " ".join(p for p in e.prompt if isinstance(p, str))
        assert any(m in text for m in markers), (task, text)
        for sc in e.meta.get("scenes", []) + [e.meta.get("query_scene")]:
            if sc is not None:
                seen |= set(sc.combos()) & W.HELDOUT_COMBOS
        if task == "classify":
            assert all(W.nonsense_word_split(w) == "heldout" for w in e.candidates)
    assert seen
    # held-out combinations with train formats (for evaluation of composition alone)
    e = W.few_shot_episode("qa.colour", 2, 0, split="heldout", format_split="train")
    assert not any(m in p for p in e.prompt if isinstance(p, str) for m in markers)
    with pytest.raises(ValueError, match="held-out"):
        W.few_shot_episode("qa", 1, 0, split="train", format_split="heldout")
    with pytest.raises(ValueError, match="split"):
        W.sample_scene(np.random.default_rng(0), split="test")


# --------------------------------------------------------------------------- texts are correct

def test_qa_answers_match_rendered_scene():
    g = np.random.default_rng(3)
    n_checked = defaultdict(int)
    for i in range(240):
        sc = W.sample_scene(g, split=("train", "heldout")[i % 2])
        qa = W.sample_qa(g, sc, "train")
        img = render_scene(sc, S)
        masks = object_masks(sc, S)
        o = sc.subject
        if qa.qtype == "count":
            # counted from the description, and each counted object is rendered, disjoint
            n = sum(ob.shape == o.shape for ob in sc.objects)
            assert qa.answer == W.COUNT_WORDS[n]
            idx = [j for j, ob in enumerate(sc.objects) if ob.shape == o.shape]
            assert all(masks[j].sum() > 5 for j in idx)
            assert o.shape in qa.question or W.SHAPE_PLURALS[o.shape] in qa.question
        elif qa.qtype == "colour":
            assert _nearest_colour(_mean_colour(img, masks[0])) == qa.answer
        elif qa.qtype == "shape":
            assert qa.answer == o.shape and f"{o.colour} " in qa.question
        elif qa.qtype == "position":
            cx, cy = _centroid(masks[0])
            assert W.REGIONS[3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)] == qa.answer
        elif qa.qtype == "relation":
            m = re.search(r"is the (.+?) (left of|right of|above|below) the (.+?)\?", qa.question)
            a_name, rel, b_name = m.groups()
            find = {ob.name: j for j, ob in enumerate(sc.objects)}
            find.update({ob.shape: j for j, ob in enumerate(sc.objects)})
            (ax, ay), (bx, by) = _centroid(masks[find[a_name]]), _centroid(masks[find[b_name]])
            truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]
            assert qa.answer == ("yes" if truth else "no"), (qa, sc)
        elif qa.qtype == "size":
            assert qa.answer == W.size_name(o.size)
        assert qa.answer in qa.candidates
        n_checked[qa.qtype] += 1
    assert set(n_checked) == set(W.QA_TYPES)
    answers = {W.sample_qa(g, W.sample_scene(g, kind="multi"), qtype="relation").answer for _ in range(30)}
    assert answers == {"yes", "no"}


def test_captions_name_the_objects():
    g = np.random.default_rng(4)
    for _ in range(100):
        sc = W.sample_scene(g)
        text, _ = W.caption(g, sc)
        if sc.kind == "count":
            assert W.COUNT_WORDS[sc.count] in text
        for o in sc.objects:
            assert o.colour in text and (o.shape in text)


# --------------------------------------------------------------------------- clips

def _colour_centroid(frame: torch.Tensor, colour: str):
    ref = torch.tensor(W.COLOURS[colour]).view(3, 1, 1)
    m = ((frame - ref).norm(dim=0) < 0.22).numpy()
    if m.sum() < 4:
        return None
    ys, xs = np.nonzero(m)
    return xs.mean(), ys.mean(), m.sum()


def test_clip_motion_matches_description():
    g = np.random.default_rng(8)
    for d in W.DIRECTIONS:
        clip = W.sample_clip(g, num_frames=6, kind="move", direction=d)
        frames = W.render_clip(clip, S)
        assert frames.shape == (6, 3, S, S)
        s = clip.event.subject
        assert clip.event.direction == d
        x0, y0, _ = _colour_centroid(frames[0], s.colour)
        x1, y1, _ = _colour_centroid(frames[-1], s.colour)
        dx, dy = x1 - x0, y1 - y0
        ux, uy = W.DIRECTION_VECTORS[d]
        assert math.hypot(dx, dy) > 8
        assert (dx * ux + dy * uy) / math.hypot(dx, dy) > 0.9, (d, dx, dy)
        # the text says the same
        qa = W.sample_video_qa(g, clip, qtype="direction")
        assert qa.answer == d and s.name in qa.question
        assert W.sample_video_qa(g, clip, qtype="what_moved").answer == s.name


def test_clip_appear_disappear_change_match_frames():
    g = np.random.default_rng(9)
    for kind in ("appear", "disappear", "change_colour"):
        for _ in range(4):
            clip = W.sample_clip(g, num_frames=8, kind=kind)
            frames = W.render_clip(clip, S)
            e = clip.event
            f = e.frame
            assert 1 <= f < 8
            if kind == "appear":
                assert _colour_centroid(frames[f - 1], e.subject.colour) is None
                assert _colour_centroid(frames[f], e.subject.colour) is not None
                assert W.sample_video_qa(g, clip).answer == e.subject.name
            elif kind == "disappear":
                assert _colour_centroid(frames[f - 1], e.subject.colour) is not None
                assert _colour_centroid(frames[f], e.subject.colour) is None
            else:
                assert e.colour_from != e.colour_to
                assert _colour_centroid(frames[f - 1], e.colour_from) is not None
                assert _colour_centroid(frames[f - 1], e.colour_to) is None
                assert _colour_centroid(frames[f], e.colour_to) is not None
                assert _colour_centroid(frames[f], e.colour_from) is None
                assert W.sample_video_qa(g, clip, qtype="new_colour").answer == e.colour_to
                assert W.sample_video_qa(g, clip, qtype="what_changed").answer == e.subject.shape
            cap, _ = W.video_caption(g, clip)
            assert e.subject.shape in cap


# --------------------------------------------------------------------------- episodes

@pytest.mark.parametrize("by", W.CLASSIFY_BY)
def test_classification_episode_structure(by):
    n, k = 4, 3
    e = W.few_shot_episode("classify", k, 21, n_way=n, by=by, image_size=32)
    assert len(e.prompt) == 2 * (n * k + 1)
    assert all(torch.is_tensor(p) for p in e.prompt[0::2]) and all(isinstance(p, str) for p in e.prompt[1::2])
    assert all(p.endswith(EOC_TOKEN) for p in e.prompt[1:-1:2]) and not e.prompt[-1].endswith(EOC_TOKEN)
    words = [a for _, a in e.support]
    assert sorted(set(words)) == sorted(e.candidates) and all(words.count(w) == k for w in e.candidates)
    assert words != sorted(words, key=e.candidates.index)  # shuffled, not grouped
    assert e.answer in e.candidates and e.query is e.prompt[-2]
    # the binding is visual: each support image shows its word's class
    def value(sc):
        o = sc.subject
        return {"shape": o.shape, "colour": o.colour, "shape_colour": (o.shape, o.colour)}[by]
    for sc, w in zip(e.meta["scenes"], words):
        assert value(sc) == e.meta["binding"][w]
    assert value(e.meta["query_scene"]) == e.meta["binding"][e.answer]
    assert len(set(map(str, e.meta["binding"].values()))) == n
    vocab = W.world_vocabulary()
    assert not set(e.candidates) & vocab
    e0 = W.few_shot_episode("classify", 0, 21, n_way=n)
    assert len(e0.prompt) == 2 and e0.support == []


def test_classification_binding_is_fresh_per_episode():
    seen = defaultdict(set)
    for i in range(400):
        e = W.few_shot_episode("classify", 0, i, n_way=5, image_size=16)
        for w, v in e.meta["binding"].items():
            seen[w].add(v)
    repeated = [w for w, vs in seen.items() if len(vs) > 1]
    assert len(repeated) >= 5  # same word, different class in different episodes
    assert len(seen) > 1000  # words are drawn from a large space


def test_qa_and_video_episodes_layout():
    for task in ("caption", "qa.count", "qa.relation", "video_caption", "video_qa.direction"):
        e = W.few_shot_episode(task, 3, 2, image_size=32, num_frames=4)
        assert len(e.prompt) == 8 and len(e.support) == 3
        media = e.prompt[0::2]
        want = (3, 32, 32) if not task.startswith("video") else (4, 3, 32, 32)
        assert all(tuple(m.shape) == want for m in media)
        for (m, a), p, txt in zip(e.support, e.support_prefixes, e.prompt[1::2]):
            assert txt == f"{p} {a}{EOC_TOKEN}" and IMAGE_TOKEN not in txt
        assert e.prompt[-1] == e.query_prefix
        if e.candidates is not None:
            assert e.answer in e.candidates


def test_episode_prompt_encodes_with_runtime():
    from flamingo_rt.io.tokenizer import FlamingoTokenizer
    from flamingo_rt.models.config import VisionConfig
    from flamingo_rt.runtime.prompt import encode_prompt
    tok = FlamingoTokenizer.train_bpe(W.world_corpus(300, 0), vocab_size=400)
    vis = VisionConfig(image_size=32)
    e = W.few_shot_episode("classify", 2, 0, n_way=2, image_size=32)
    enc = encode_prompt(e.prompt, tok, vis)
    assert len(enc.media) == 5 and enc.ids.count(tok.image_token_id) == 5
    d = W.sample_document(np.random.default_rng(0), image_size=32)
    enc = encode_prompt([d.text] + d.images, tok, vis)
    assert len(enc.media) == len(d.images) == enc.ids.count(tok.image_token_id)


# --------------------------------------------------------------------------- documents

def test_documents_markers_match_media():
    kinds = set()
    for r in W.interleaved_documents(2, n=40, image_size=16, max_images=4):
        t = r["text"]
        assert 1 <= len(r["images"]) <= 4 and t.count(IMAGE_TOKEN) == len(r["images"]) == len(r["scenes"])
        assert t.count(EOC_TOKEN) == len(r["images"])
        # each image's text sits between its marker and its end-of-chunk
        for chunk in t.split(IMAGE_TOKEN)[1:]:
            assert EOC_TOKEN in chunk and chunk.index(EOC_TOKEN) > 0
        kinds.add(r["kind"])
        if r["kind"] == "naming":
            b = r["meta"]["binding"]
            used = re.findall(rf"(\w+){re.escape(EOC_TOKEN)}", t)
            assert set(used) == set(b)  # every bound word is used, at least once
            assert len(used) > len(set(used))  # and some repeat (the in-context binding)
        d = W.Document(t, r["images"], r["scenes"], r["kind"])
        items = d.as_prompt()
        assert sum(torch.is_tensor(x) for x in items) == len(r["images"])
    assert kinds == set(W.DOCUMENT_KINDS)


def test_text_corpus_has_no_images_and_varies():
    recs = list(W.text_corpus(0, n=200))
    assert all(IMAGE_TOKEN not in r and r for r in recs)
    assert len(set(recs)) > 150
    corpus = W.world_corpus(50, 0)
    assert len(corpus) == 50 and any(EOC_TOKEN in c for c in corpus)


def test_nonsense_words_pronounceable_and_disjoint():
    g = np.random.default_rng(0)
    words = W.nonsense_words(g, 300)
    vocab = W.world_vocabulary()
    assert len(set(words)) == 300 and not set(words) & vocab
    assert all(re.fullmatch(r"([bdfgklmnprstvz]|bl|br|dr|fl|gl|gr|kl|pl|pr|sk|sl|sp|st|tr)[aeiou][bdfgklmnprstvz][aeiou][klmnpstx]?", w)
               for w in words)
    held = W.nonsense_words(g, 50, split="heldout")
    assert all(W.nonsense_word_split(w) == "heldout" for w in held)
    assert all(W.nonsense_word_split(w) == "train" for w in words)


# --------------------------------------------------------------------------- end to end

def test_png_grid_of_examples(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = np.random.default_rng(0)
    scenes = [W.sample_scene(g, split=("train", "heldout")[i % 2]) for i in range(12)]
    clip = W.sample_clip(g, num_frames=4, kind="move")
    fig, axes = plt.subplots(4, 4, figsize=(8, 8))
    for ax, sc in zip(axes.flat, scenes):
        ax.imshow(render_scene(sc, S).permute(1, 2, 0).numpy())
        ax.set_title(W.caption(g, sc)[0][:28], fontsize=5)
    for ax, fr in zip(axes.flat[12:], W.render_clip(clip, S)):
        ax.imshow(fr.permute(1, 2, 0).numpy())
    for ax in axes.flat:
        ax.axis("off")
    out = tmp_path / "world_examples.png"
    fig.savefig(out, dpi=60)
    plt.close(fig)
    assert out.exists() and out.stat().st_size > 5000
