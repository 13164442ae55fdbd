"""Few-shot episodes: a prompt of k solved examples and a query, plus the expected answer.

The prompt has the layout :func:`flamingo_rt.runtime.few_shot_prompt` produces and
:func:`flamingo_rt.runtime.prompt.encode_prompt` reads (media items become ``<image>``
tokens; the texts carry no literal ``<image>`` markers)::

    [media_1, "<prefix_1> <answer_1><|endofchunk|>", ..., media_q, "<prefix_q>"]

and the model is expected to continue with ``" " + answer`` (then ``<|endofchunk|>``).

Tasks (``TASKS``):

* ``"caption"``: prefix ``"Output:"`` (held-out format: ``"Description:"``), answer a caption.
* ``"qa"`` (one question type drawn per episode) and ``"qa.<type>"`` for each of ``QA_TYPES``:
  prefix ``"Question: <q> Answer:"``, a short answer; ``candidates`` lists every possible answer.
* ``"classify"``: N-way naming with nonsense words bound freshly per episode to a visual
  category (``by`` = "shape", "colour" or "shape_colour"); k examples of each class, shuffled;
  ``candidates`` are the N words. At k = 0 the prompt is only the query.
* ``"video_caption"``, ``"video_qa"`` and ``"video_qa.<type>"`` for each of ``VIDEO_QA_TYPES``:
  as above with clips (F, 3, H, W) as media.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..io.tokenizer import EOC_TOKEN
from .attributes import COLOUR_NAMES, HELDOUT_COMBOS, SHAPES, allowed_colours, check_split, is_heldout_combo
from .clip import EVENT_KINDS, render_clip, sample_clip
from .scene import render_scene, sample_object, sample_scene
from .text import (
    ANSWER_SETS, CAPTION_PREFIXES, CLASSIFY_FORMATS, QA_TYPES, VIDEO_QA_TYPES, _pick, caption,
    nonsense_words, sample_qa, sample_video_qa, video_caption,
)

__all__ = ["Episode", "TASKS", "CLASSIFY_BY", "few_shot_episode", "as_rng"]

TASKS = (("caption", "qa") + tuple(f"qa.{t}" for t in QA_TYPES) + ("classify", "video_caption", "video_qa")
         + tuple(f"video_qa.{t}" for t in VIDEO_QA_TYPES))
CLASSIFY_BY = ("shape", "colour", "shape_colour")

RngLike = Union[int, np.random.Generator]


def as_rng(seed_or_rng: RngLike) -> np.random.Generator:
    """An int seed -> a fresh ``numpy.random.Generator``; a Generator is returned as is."""
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    if isinstance(seed_or_rng, (int, np.integer)) and not isinstance(seed_or_rng, bool):
        return np.random.default_rng(int(seed_or_rng))
    raise TypeError(f"expected an int seed or a numpy.random.Generator, got {type(seed_or_rng).__name__}")


@dataclass
class Episode:
    """One few-shot episode.

    Attributes:
        task, split, k: as requested (for "classify", k examples *per class*).
        prompt: ``[media, str, ..., media_q, str]``; media are float32 (3, H, W) images or
            (F, 3, H, W) clips in [0, 1]; support texts end with ``<|endofchunk|>``.
        answer: the expected continuation of the last text, without the leading space.
        candidates: possible answers (the N words for "classify"; all answers of the question
            type for QA), or None (captions).
        support: the (media, answer) pairs in prompt order; support_prefixes their prefixes.
        query, query_prefix: the query medium and the last text of the prompt.
        meta: structured facts: scenes / clips, template ids, the word binding ...
    """

    task: str
    split: str
    k: int
    prompt: List[Any]
    answer: str
    candidates: Optional[List[str]]
    support: List[Tuple[torch.Tensor, str]]
    support_prefixes: List[str]
    query: torch.Tensor
    query_prefix: str
    meta: Dict[str, Any] = field(default_factory=dict)


def _assemble(task: str, split: str, k: int, items: List[Tuple[torch.Tensor, str, str]],
              query: Tuple[torch.Tensor, str, str], candidates: Optional[List[str]], meta: Dict[str, Any]) -> Episode:
    prompt: List[Any] = []
    for media, prefix, answer in items:
        prompt += [media, f"{prefix} {answer}{EOC_TOKEN}"]
    prompt += [query[0], query[1]]
    return Episode(task, split, k, prompt, query[2], candidates, [(m, a) for m, _, a in items],
                   [p for _, p, _ in items], query[0], query[1], meta)


def _classify_class_values(rng: np.random.Generator, by: str, n_way: int, split: str) -> List[Any]:
    if by == "shape":
        pool: List[Any] = list(SHAPES)
    elif by == "colour":
        pool = list(COLOUR_NAMES)
    else:
        if split == "heldout":
            held = sorted(HELDOUT_COMBOS)
            first = [held[i] for i in rng.permutation(len(held))[:n_way]]
            rest = [(s, c) for s in SHAPES for c in COLOUR_NAMES if (s, c) not in first]
            extra = [rest[i] for i in rng.permutation(len(rest))[:max(0, n_way - len(first))]]
            return first + extra
        pool = [(s, c) for s in SHAPES for c in COLOUR_NAMES if not is_heldout_combo(s, c)]
    if not 1 <= n_way <= len(pool):
        raise ValueError(f"expected n_way in 1..{len(pool)} for by={by!r}, got {n_way}")
    return [pool[i] for i in rng.permutation(len(pool))[:n_way]]


def _classify_scene(rng: np.random.Generator, by: str, value: Any, split: str):
    """A single-object scene showing a member of the class ``value``."""
    if by == "shape_colour":
        s, c = value
        return sample_scene(rng, split, kind="single", shape=s, colour=c,
                            heldout_subject=is_heldout_combo(s, c))
    held = split == "heldout" and rng.random() < 0.5
    if by == "shape":
        if held:
            return sample_scene(rng, split, kind="single", shape=value, heldout_subject=True)
        return sample_scene(rng, split, kind="single", shape=value, heldout_subject=False)
    if held and any(c == value for _, c in HELDOUT_COMBOS):
        return sample_scene(rng, split, kind="single", colour=value, heldout_subject=True)
    return sample_scene(rng, split, kind="single", colour=value, heldout_subject=False)


def few_shot_episode(task: str, k: int, rng: RngLike, split: str = "train", *, n_way: int = 5,
                     by: str = "shape", image_size: int = 64, num_frames: int = 8,
                     format_split: Optional[str] = None) -> Episode:
    """A few-shot episode of ``task`` with ``k`` shots.

    Args:
        task: one of ``TASKS``.
        k: solved examples (for "classify": per class, so N * k in all); k >= 0.
        rng: an int seed or a ``numpy.random.Generator`` (the only randomness used).
        split: "train" (no held-out attribute combination, word or format) or "heldout"
            (subjects are held-out combinations; held-out words and formats).
        n_way: classes of a "classify" episode. by: what a class is ("shape", "colour",
            "shape_colour").
        image_size: side of the square images (float32 (3, S, S) in [0, 1]).
        num_frames: F of the clips of video tasks ((F, 3, S, S)).
        format_split: templates from this split (default: ``split``); e.g. "train" to
            evaluate held-out combinations with training formats. Must be "train" when split
            is "train".
    """
    check_split(split)
    fsplit = split if format_split is None else check_split(format_split)
    if split == "train" and fsplit == "heldout":
        raise ValueError("held-out formats are not allowed with split 'train'")
    if task not in TASKS:
        raise ValueError(f"expected a task in {TASKS}, got {task!r}")
    if k < 0:
        raise ValueError(f"expected k >= 0 shots, got {k}")
    g = as_rng(rng)
    S = image_size

    if task == "classify":
        if by not in CLASSIFY_BY:
            raise ValueError(f"expected by in {CLASSIFY_BY}, got {by!r}")
        values = _classify_class_values(g, by, n_way, split)
        words = nonsense_words(g, n_way, split)
        fmt = _pick(g, "", fsplit, CLASSIFY_FORMATS)
        order = [c for c in range(n_way) for _ in range(k)]
        order = [order[i] for i in g.permutation(len(order))]
        scenes, items = [], []
        for c in order:
            sc = _classify_scene(g, by, values[c], split)
            scenes.append(sc)
            items.append((render_scene(sc, S), fmt.text, words[c]))
        qc = int(g.integers(n_way))
        qs = _classify_scene(g, by, values[qc], split)
        meta = {"binding": dict(zip(words, values)), "by": by, "n_way": n_way, "support_classes": order,
                "query_class": qc, "scenes": scenes, "query_scene": qs, "template_id": fmt.id}
        return _assemble(task, split, k, items, (render_scene(qs, S), fmt.text, words[qc]), list(words), meta)

    if task == "caption":
        fmt = _pick(g, "", fsplit, CAPTION_PREFIXES)
        scenes = [sample_scene(g, split) for _ in range(k + 1)]
        caps = [caption(g, sc, fsplit) for sc in scenes]
        items = [(render_scene(sc, S), fmt.text, c) for sc, (c, _) in zip(scenes[:k], caps[:k])]
        meta = {"scenes": scenes[:k], "query_scene": scenes[k], "template_ids": [t for _, t in caps],
                "prefix_id": fmt.id}
        return _assemble(task, split, k, items, (render_scene(scenes[k], S), fmt.text, caps[k][0]), None, meta)

    if task.startswith("qa"):
        qtype = task.split(".", 1)[1] if "." in task else QA_TYPES[int(g.integers(len(QA_TYPES)))]
        kinds = {"count": ("count", "single", "multi"), "relation": ("multi",)}.get(qtype, ("single", "multi"))
        scenes = []
        for _ in range(k + 1):
            kind = kinds[0] if len(kinds) == 1 or g.random() < 0.7 else kinds[int(g.integers(1, len(kinds)))]
            scenes.append(sample_scene(g, split, kind=kind))
        qas = [sample_qa(g, sc, fsplit, qtype) for sc in scenes]
        items = [(render_scene(sc, S), qa.prefix, qa.answer) for sc, qa in zip(scenes[:k], qas[:k])]
        meta = {"qtype": qtype, "scenes": scenes[:k], "query_scene": scenes[k], "qas": qas}
        q = qas[k]
        return _assemble(task, split, k, items, (render_scene(scenes[k], S), q.prefix, q.answer),
                         list(ANSWER_SETS[qtype]), meta)

    # video tasks
    if task == "video_caption":
        fmt = _pick(g, "", fsplit, CAPTION_PREFIXES)
        clips = [sample_clip(g, split, num_frames) for _ in range(k + 1)]
        caps = [video_caption(g, c, fsplit) for c in clips]
        items = [(render_clip(c, S), fmt.text, t) for c, (t, _) in zip(clips[:k], caps[:k])]
        meta = {"clips": clips[:k], "query_clip": clips[k], "template_ids": [t for _, t in caps]}
        return _assemble(task, split, k, items, (render_clip(clips[k], S), fmt.text, caps[k][0]), None, meta)
    qtype = task.split(".", 1)[1] if "." in task else VIDEO_QA_TYPES[int(g.integers(len(VIDEO_QA_TYPES)))]
    kind = {"what_moved": "move", "direction": "move", "what_changed": "change_colour",
            "new_colour": "change_colour", "what_appeared": "appear", "what_disappeared": "disappear"}[qtype]
    clips = [sample_clip(g, split, num_frames, kind=kind) for _ in range(k + 1)]
    qas = [sample_video_qa(g, c, fsplit, qtype) for c in clips]
    items = [(render_clip(c, S), qa.prefix, qa.answer) for c, qa in zip(clips[:k], qas[:k])]
    meta = {"qtype": qtype, "clips": clips[:k], "query_clip": clips[k], "qas": qas}
    q = qas[k]
    return _assemble(task, split, k, items, (render_clip(clips[k], S), q.prefix, q.answer),
                     list(ANSWER_SETS[qtype]), meta)
