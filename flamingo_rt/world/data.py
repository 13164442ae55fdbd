"""Dataset-style streams for training: image-text pairs, interleaved multi-image documents
(the M3W analogue), video-text pairs and plain text for language-model pretraining, plus
:func:`world_corpus` to train a tokenizer on.

Every stream is a generator of plain records (dicts of str / tensors / structured scenes),
deterministic under its ``seed``, infinite unless ``n`` is given, and obeys ``split``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..io.tokenizer import EOC_TOKEN, IMAGE_TOKEN
from .attributes import COUNT_WORDS, article, check_split
from .clip import render_clip, sample_clip
from .scene import Scene, render_scene, sample_scene

__all__ = [
    "Document", "DOCUMENT_KINDS", "sample_document", "describe_scene", "image_text_pairs",
    "interleaved_documents", "video_text_pairs", "text_corpus", "world_corpus", "attribute_pairs",
]

_INTROS = ("here are some pictures.", "look at these images.", "a page about shapes and colours.",
           "my collection of shapes.", "some pictures from the world of shapes.")
_OUTROS = ("that is all for today.", "thanks for looking.", "more pictures soon.")
_TEXT_WORDS = frozenset(w.strip(".,:") for s in _INTROS + _OUTROS for w in s.split())

DOCUMENT_KINDS = ("captions", "qa", "naming", "mixed")


@dataclass
class Document:
    """An interleaved document. ``text`` holds one ``<image>`` per image, each image's text
    right after its marker and closed by ``<|endofchunk|>``; ``images`` are float32
    (3, H, W) in [0, 1], in marker order; ``scenes`` describe them."""

    text: str
    images: List[torch.Tensor]
    scenes: List[Scene]
    kind: str
    meta: Dict[str, Any] = field(default_factory=dict)

    def as_prompt(self) -> List[Any]:
        """The document as an interleaved list ``[text, image, text, ...]`` without literal
        markers (the form :func:`flamingo_rt.runtime.prompt.encode_prompt` also accepts)."""
        parts = self.text.split(IMAGE_TOKEN)
        out: List[Any] = [parts[0]] if parts[0] else []
        for img, p in zip(self.images, parts[1:]):
            out.append(img)
            if p:
                out.append(p)
        return out


def _sentences_for(rng: np.random.Generator, kind: str, scene: Scene, split: str, ctx: Dict[str, Any]) -> str:
    from .text import _pick, CLASSIFY_FORMATS, caption, sample_qa
    if kind == "captions":
        return caption(rng, scene, split)[0]
    if kind == "qa":
        return sample_qa(rng, scene, split, ctx["qtype"]).text
    if kind == "naming":
        return f"{ctx['format']} {ctx['word']}"
    cap = caption(rng, scene, split)[0]
    return f"{cap} {sample_qa(rng, scene, split).text}"


def sample_document(rng: np.random.Generator, split: str = "train", image_size: int = 64, max_images: int = 5,
                    kind: Optional[str] = None) -> Document:
    """One interleaved document of 1..``max_images`` images (kinds: ``DOCUMENT_KINDS``).

    * "captions": each image followed by its caption;
    * "qa": each image followed by a question of one type (shared by the document) and its answer;
    * "naming": 2-4 nonsense words bound to shapes / colours / shape-colour pairs for this
      document only, each image followed by "<format> <word>" (in-context binding, as in the
      few-shot "classify" task);
    * "mixed": caption and question per image.
    An intro sentence may come before the first image and an outro after the last."""
    from .episodes import CLASSIFY_BY, _classify_class_values, _classify_scene
    from .text import CLASSIFY_FORMATS, QA_TYPES, _pick, nonsense_words

    check_split(split)
    if max_images < 1:
        raise ValueError(f"expected max_images >= 1, got {max_images}")
    if kind is None:
        kind = DOCUMENT_KINDS[int(rng.choice(4, p=[0.25, 0.25, 0.3, 0.2]))]
    if kind not in DOCUMENT_KINDS:
        raise ValueError(f"expected kind in {DOCUMENT_KINDS}, got {kind!r}")
    if kind == "naming" and max_images < 3:
        kind = "captions"
    m = int(rng.integers(1, max_images + 1)) if kind != "naming" else int(rng.integers(3, max_images + 1))
    ctx: Dict[str, Any] = {}
    scenes: List[Scene] = []
    chunks: List[str] = []
    if kind == "naming":
        by = CLASSIFY_BY[int(rng.integers(len(CLASSIFY_BY)))]
        n = int(rng.integers(2, min(4, m - 1) + 1))
        values = _classify_class_values(rng, by, n, split)
        words = nonsense_words(rng, n, split)
        fmt = _pick(rng, "", split, CLASSIFY_FORMATS).text
        # every class once (in random order), then repeats: later images test the binding
        classes = [int(c) for c in rng.permutation(n)] + [int(rng.integers(n)) for _ in range(m - n)]
        ctx.update(format=fmt)
        ctx_meta = {"binding": dict(zip(words, values)), "by": by, "classes": classes}
        for c in classes:
            sc = _classify_scene(rng, by, values[c], split)
            scenes.append(sc)
            chunks.append(f"{fmt} {words[c]}")
    else:
        qtype = QA_TYPES[int(rng.integers(len(QA_TYPES)))]
        ctx["qtype"] = qtype
        kinds = {"count": "count", "relation": "multi"}
        for _ in range(m):
            sk = kinds.get(qtype) if kind == "qa" else None
            if kind == "qa" and sk is None:
                sk = ("single", "multi")[int(rng.integers(2))]
            sc = sample_scene(rng, split, kind=sk)
            scenes.append(sc)
            chunks.append(_sentences_for(rng, kind, sc, split, ctx))
        ctx_meta = {"qtype": qtype} if kind == "qa" else {}
    text = _INTROS[int(rng.integers(len(_INTROS)))] + " " if rng.random() < 0.5 else ""
    text += "".join(f"{IMAGE_TOKEN}{c}{EOC_TOKEN}" for c in chunks)
    if rng.random() < 0.3:
        text += _OUTROS[int(rng.integers(len(_OUTROS)))]
    images = [render_scene(sc, image_size) for sc in scenes]
    return Document(text, images, scenes, kind, ctx_meta)


def describe_scene(scene: Scene) -> str:
    """A complete text description of a still scene (every object with size, colour, shape
    and place), so questions about it can be answered from text alone."""
    from .text import where_phrase
    parts = [f"{article(o.size_name)} {o.size_name} {o.colour} {o.shape} {where_phrase(o.region)}" for o in scene.objects]
    if scene.kind == "count":
        n = scene.count
        g = scene.subject
        from .attributes import SHAPE_PLURALS
        head = f"{COUNT_WORDS[n]} {g.colour} {g.shape if n == 1 else SHAPE_PLURALS[g.shape]}"
        rest = [f"{article(o.colour)} {o.name}" for o in scene.objects[n:]]
        return "there " + ("is " if n == 1 else "are ") + ", ".join([head] + rest) + "."
    return "there is " + ", ".join(parts) + "."


def _seq(seed: int, n: Optional[int]) -> Iterator[np.random.Generator]:
    """Independent per-record generators (record i depends only on (seed, i))."""
    i = 0
    while n is None or i < n:
        yield np.random.default_rng([seed, i])
        i += 1


def image_text_pairs(seed: int, split: str = "train", image_size: int = 64, n: Optional[int] = None
                     ) -> Iterator[Dict[str, Any]]:
    """Image-caption pairs: ``{"image": float32 (3, S, S) in [0, 1], "text": caption,
    "scene": Scene, "template_id": str}``."""
    from .text import caption
    check_split(split)
    for g in _seq(seed, n):
        sc = sample_scene(g, split)
        text, tid = caption(g, sc, split)
        yield {"image": render_scene(sc, image_size), "text": text, "scene": sc, "template_id": tid}


def attribute_pairs(seed: int, split: str = "train", image_size: int = 64, n: Optional[int] = None
                    ) -> Iterator[Dict[str, Any]]:
    """Single-object images with their short attribute captions (one per kind of
    :data:`~flamingo_rt.world.text.ATTRIBUTE_CAPTION_KINDS`): ``{"image": float32 (3, S, S)
    in [0, 1], "scene": Scene, "captions": {"shape": "a star.", "colour": "a red shape.",
    "shape_colour": "a red star."}}``. Record i depends only on (seed, i), and its scene is
    drawn independently of record i of :func:`image_text_pairs` under the same seed."""
    from .text import ATTRIBUTE_CAPTION_KINDS, attribute_caption
    check_split(split)
    i = 0
    while n is None or i < n:
        g = np.random.default_rng([seed, i, 1])
        sc = sample_scene(g, split, kind="single")
        yield {"image": render_scene(sc, image_size), "scene": sc,
               "captions": {k: attribute_caption(sc, k) for k in ATTRIBUTE_CAPTION_KINDS}}
        i += 1


def interleaved_documents(seed: int, split: str = "train", image_size: int = 64, max_images: int = 5,
                          n: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Interleaved documents: ``{"text": str with <image> markers and <|endofchunk|>,
    "images": list of float32 (3, S, S) (as many as markers, <= max_images),
    "scenes": list of Scene, "kind": str}``."""
    check_split(split)
    for g in _seq(seed, n):
        d = sample_document(g, split, image_size, max_images)
        yield {"text": d.text, "images": d.images, "scenes": d.scenes, "kind": d.kind, "meta": d.meta}


def video_text_pairs(seed: int, split: str = "train", image_size: int = 64, num_frames: int = 8,
                     n: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Clip-text pairs: ``{"video": float32 (F, 3, S, S) in [0, 1], "text": a caption or
    "Question: ... Answer: ...", "clip": Clip}``."""
    from .text import sample_video_qa, video_caption
    check_split(split)
    for g in _seq(seed, n):
        c = sample_clip(g, split, num_frames)
        text = video_caption(g, c, split)[0] if g.random() < 0.5 else sample_video_qa(g, c, split).text
        yield {"video": render_clip(c, image_size), "text": text, "clip": c}


def _text_record(g: np.random.Generator, split: str) -> str:
    from .clip import sample_clip as _sc
    from .text import caption, sample_qa, sample_video_qa, video_caption
    r = g.random()
    if r < 0.2:
        return caption(g, sample_scene(g, split), split)[0]
    if r < 0.45:  # a described scene and a question answerable from the description
        sc = sample_scene(g, split)
        return f"{describe_scene(sc)} {sample_qa(g, sc, split).text}"
    if r < 0.65:  # in-context naming in text: descriptions bound to nonsense words
        from .episodes import CLASSIFY_BY, _classify_class_values, _classify_scene
        from .text import CLASSIFY_FORMATS, _pick, nonsense_words
        by = CLASSIFY_BY[int(g.integers(3))]
        nc = int(g.integers(2, 5))
        values = _classify_class_values(g, by, nc, split)
        words = nonsense_words(g, nc, split)
        fmt = _pick(g, "", split, CLASSIFY_FORMATS).text
        out = []
        for _ in range(int(g.integers(3, 9))):
            c = int(g.integers(nc))
            o = _classify_scene(g, by, values[c], split).subject
            out.append(f"{article(o.size_name)} {o.size_name} {o.colour} {o.shape}: {fmt} {words[c]}.")
        return " ".join(out)
    if r < 0.8:  # a document, without its images
        d = sample_document(g, split, 16, 5)
        return d.text.replace(IMAGE_TOKEN, "").replace(EOC_TOKEN, " ").strip()
    c = _sc(g, split, 2)
    if g.random() < 0.5:
        return video_caption(g, c, split)[0]
    return f"{video_caption(g, c, split)[0]} {sample_video_qa(g, c, split).text}"


def text_corpus(seed: int, split: str = "train", n: Optional[int] = None) -> Iterator[str]:
    """Plain text for LM pretraining: captions, scene descriptions followed by questions and
    answers, naming paragraphs with nonsense words, documents without their images, and
    video captions / questions. No image is rendered."""
    check_split(split)
    for g in _seq(seed, n):
        yield _text_record(g, split)


def world_corpus(n: int, seed: int = 0, split: str = "train") -> List[str]:
    """``n`` texts of the world (from :func:`text_corpus`, plus few-shot formatted lines with
    ``<|endofchunk|>``) to train a tokenizer on."""
    from .text import sample_qa
    if n < 0:
        raise ValueError(f"expected n >= 0, got {n}")
    out = list(text_corpus(seed, split, n))
    g = np.random.default_rng([seed, 1 << 20])
    for i in range(0, len(out), 4):  # a quarter in few-shot layout
        sc = sample_scene(g, split)
        out[i] = f"{sample_qa(g, sc, split).text}{EOC_TOKEN}" + out[i]
    return out
