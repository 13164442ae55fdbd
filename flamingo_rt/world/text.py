"""Text from structured scenes and clips: captions, questions and answers, video captions and
questions, and nonsense words for in-context naming.

Every generated text comes from a :class:`Template` that belongs to one split. Templates of
the ``"heldout"`` split (held-out task *formats*) differ from every train template by a
literal phrase (``Template.marker``) that no train text contains; samplers of the
``"train"`` split only ever use train templates.

Question/answer texts are written ``"Question: <q> Answer: <a>"`` (the few-shot prompt ends
at ``"Answer:"`` and the model continues with ``" <a>"``). Answers are short: a colour, a
shape, a number word (``"three"``), a size word, a region (``"top left"``), ``"yes"`` /
``"no"``, a direction (``"up left"``) or an object name (``"red circle"``).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .attributes import (
    COLOUR_NAMES, COUNT_WORDS, DIRECTIONS, REGIONS, RELATIONS, SHAPE_PLURALS, SHAPES, SIZE_BINS,
    article, check_split,
)
from .clip import Clip
from .scene import Obj, Scene, relation_holds

__all__ = [
    "Template", "TEMPLATES", "QA", "QA_TYPES", "VIDEO_QA_TYPES", "ANSWER_SETS", "heldout_markers",
    "caption", "sample_qa", "video_caption", "sample_video_qa", "qa_text", "where_phrase",
    "nonsense_word", "nonsense_words", "nonsense_word_split", "world_vocabulary",
    "CLASSIFY_FORMATS", "CAPTION_PREFIXES", "ATTRIBUTE_CAPTION_KINDS", "attribute_caption",
]


@dataclass(frozen=True)
class Template:
    """One phrasing. ``id`` is unique; ``split`` is "train" or "heldout"; ``marker`` (held-out
    only) is a literal phrase that no train text contains."""

    id: str
    text: str
    split: str = "train"
    marker: Optional[str] = None


def _T(family: str, train: Sequence[str], heldout: Sequence[Tuple[str, str]]) -> List[Template]:
    out = [Template(f"{family}.{i}", t, "train") for i, t in enumerate(train)]
    out += [Template(f"{family}.h{i}", t, "heldout", m) for i, (t, m) in enumerate(heldout)]
    return out


#: family -> templates. Fields: {a} article of the next word, {colour} {shape} {plural}
#: {size} {where} {n} (number word) {list} {name} {name2} {rel} {dir} {c1} {c2}.
TEMPLATES: Dict[str, List[Template]] = {
    "caption.single": _T("caption.single", [
        "{a} {size} {colour} {shape}.",
        "{a} {colour} {shape} {where}.",
        "there is {a} {colour} {shape} {where}.",
        "a picture of {a} {size} {colour} {shape}.",
    ], [("this image shows one {colour} {shape} {where}.", "this image shows")]),
    "caption.multi": _T("caption.multi", [
        "{list}.",
        "{a} {name} {rel} {a2} {name2}.",
        "there are {n} shapes: {list}.",
    ], [("this image shows {list}.", "this image shows")]),
    "caption.count": _T("caption.count", [
        "{n} {colour} {plural}{rest}.",
        "there {be} {n} {colour} {plural}{rest}.",
    ], [("this image shows {n} {colour} {plural}{rest}.", "this image shows")]),
    "qa.colour": _T("qa.colour", [
        "what colour is the {shape}?", "which colour is the {shape}?",
    ], [("the {shape} has what colour?", "has what colour")]),
    "qa.shape": _T("qa.shape", [
        "what shape is the {colour} object?", "what is the {colour} shape?",
    ], [("the {colour} object has what shape?", "has what shape")]),
    "qa.count": _T("qa.count", [
        "how many {plural} are there?", "how many {plural} can you see?",
    ], [("what is the number of {plural}?", "what is the number of")]),
    "qa.size": _T("qa.size", [
        "what size is the {name}?", "how big is the {name}?",
    ], [("the {name} has what size?", "has what size")]),
    "qa.position": _T("qa.position", [
        "where is the {name}?", "in which part of the image is the {name}?",
    ], [("the {name} is located where?", "is located where")]),
    "qa.relation": _T("qa.relation", [
        "is the {name} {rel} the {name2}?", "is the {shape} {rel} the {shape2}?",
    ], [("is it true that the {name} is {rel} the {name2}?", "is it true that")]),
    "video.caption": _T("video.caption", [
        "{event}.", "in the video, {event}.",
    ], [("in this clip {event}.", "in this clip")]),
    "vqa.what_moved": _T("vqa.what_moved", [
        "what moved?", "which object moved?",
    ], [("what object was in motion?", "was in motion")]),
    "vqa.direction": _T("vqa.direction", [
        "which way did the {name} move?", "in which direction did the {name} move?",
    ], [("the {name} went which way?", "went which way")]),
    "vqa.what_changed": _T("vqa.what_changed", [
        "what changed colour?", "which object changed colour?",
    ], [("the colour of which object changed?", "the colour of which")]),
    "vqa.new_colour": _T("vqa.new_colour", [
        "what colour did the {shape} turn?", "what colour did the {shape} become?",
    ], [("the {shape} ended up what colour?", "ended up what")]),
    "vqa.what_appeared": _T("vqa.what_appeared", [
        "what appeared?", "which object appeared?",
    ], [("which object came into view?", "came into view")]),
    "vqa.what_disappeared": _T("vqa.what_disappeared", [
        "what disappeared?", "which object disappeared?",
    ], [("which object went out of view?", "went out of view")]),
}

#: few-shot prefixes of N-way naming (classification): support text "<prefix> <word>"
CLASSIFY_FORMATS: List[Template] = [
    Template("classify.0", "This is a", "train"),
    Template("classify.1", "It is called a", "train"),
    Template("classify.h0", "Here we have a", "heldout", "Here we have"),
]
#: few-shot prefixes of captioning: support text "<prefix> <caption>"
CAPTION_PREFIXES: List[Template] = [
    Template("caption_prefix.0", "Output:", "train"),
    Template("caption_prefix.h0", "Description:", "heldout", "Description:"),
]

QA_TYPES = ("colour", "shape", "count", "size", "position", "relation")
VIDEO_QA_TYPES = ("what_moved", "direction", "what_changed", "new_colour", "what_appeared", "what_disappeared")
_VQA_FOR_EVENT = {"move": ("what_moved", "direction"), "change_colour": ("what_changed", "new_colour"),
                  "appear": ("what_appeared",), "disappear": ("what_disappeared",)}
_OBJECT_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES)

#: question type -> all possible answers (candidates for ranking)
ANSWER_SETS: Dict[str, Tuple[str, ...]] = {
    "colour": COLOUR_NAMES, "shape": SHAPES, "count": tuple(COUNT_WORDS.values()), "size": SIZE_BINS,
    "position": REGIONS, "relation": ("yes", "no"), "what_moved": _OBJECT_NAMES,
    "direction": DIRECTIONS, "what_changed": SHAPES, "new_colour": COLOUR_NAMES,
    "what_appeared": _OBJECT_NAMES, "what_disappeared": _OBJECT_NAMES,
}


def heldout_markers() -> List[str]:
    """The literal phrases that identify held-out formats (none occurs in any train text)."""
    ts = [t for f in TEMPLATES.values() for t in f] + CLASSIFY_FORMATS + CAPTION_PREFIXES
    return sorted({t.marker for t in ts if t.split == "heldout"})


def _pick(rng: np.random.Generator, family: str, split: str, templates: Optional[List[Template]] = None
          ) -> Template:
    ts = [t for t in (templates if templates is not None else TEMPLATES[family]) if t.split == split]
    return ts[int(rng.integers(len(ts)))]


def _fill(text: str, **kw: str) -> str:
    # articles: "{a} {x}" -> article of the first word of the filled {x}
    def sub_article(m: "re.Match[str]") -> str:
        key = m.group(2)
        return article(str(kw[key]).split(" ")[0]) + " {" + key + "}"
    text = re.sub(r"\{(a2?)\} \{(\w+)\}", sub_article, text)
    return text.format(**kw).strip()


def where_phrase(region: str) -> str:
    """``"top left"`` -> ``"in the top left corner"``, ``"left"`` -> ``"on the left"``, ..."""
    if region == "center":
        return "in the center"
    if region in ("left", "right"):
        return f"on the {region}"
    if region in ("top", "bottom"):
        return f"at the {region}"
    return f"in the {region} corner"


def _listing(objs: Sequence[Obj]) -> str:
    names = [f"{article(o.colour)} {o.name}" for o in objs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _clear_relation(rng: np.random.Generator, a: Obj, b: Obj) -> Tuple[str, bool]:
    rels = [(r, relation_holds(a, b, r)) for r in RELATIONS]
    rels = [(r, h) for r, h in rels if h is not None]
    if not rels:
        raise ValueError(f"no clear spatial relation between {a.name} and {b.name}")
    return rels[int(rng.integers(len(rels)))]


def caption(rng: np.random.Generator, scene: Scene, split: str = "train") -> Tuple[str, str]:
    """A caption of a still scene. Returns (caption text, template id)."""
    check_split(split)
    if scene.kind == "single":
        o = scene.subject
        t = _pick(rng, "caption.single", split)
        return _fill(t.text, a="", size=o.size_name, colour=o.colour, shape=o.shape,
                     where=where_phrase(o.region)), t.id
    if scene.kind == "multi":
        fam = [t for t in TEMPLATES["caption.multi"] if len(scene.objects) == 2 or "{rel}" not in t.text]
        t = _pick(rng, "caption.multi", split, fam)  # relation captions only for two objects
        a, b = scene.objects[0], scene.objects[1]
        if "{rel}" in t.text:
            rel, holds = _clear_relation(rng, a, b)
            if not holds:  # a is clearly on the other side: "b <rel> a" holds
                a, b = b, a
            text = _fill(t.text, name=a.name, name2=b.name, rel=rel)
        else:
            order = rng.permutation(len(scene.objects))
            text = _fill(t.text, list=_listing([scene.objects[i] for i in order]),
                         n=COUNT_WORDS[len(scene.objects)])
        return text, t.id
    if scene.kind == "count":
        t = _pick(rng, "caption.count", split)
        n = scene.count
        g = scene.subject
        rest = scene.objects[n:]
        rest_s = "".join((" and " if i == len(rest) - 1 else ", ") + f"{article(o.colour)} {o.name}"
                         for i, o in enumerate(rest))
        return _fill(t.text, n=COUNT_WORDS[n], colour=g.colour, plural=g.shape if n == 1 else SHAPE_PLURALS[g.shape],
                     rest=rest_s, be="is" if n == 1 else "are"), t.id
    raise ValueError(f"expected a still scene of kind single/multi/count, got {scene.kind!r}")


#: what an attribute caption names: the shape, the colour, or both
ATTRIBUTE_CAPTION_KINDS = ("shape", "colour", "shape_colour")


def attribute_caption(scene: Scene, kind: str) -> str:
    """A short caption of a single-object scene that names one or two attributes of its
    object: ``"a star."`` (kind "shape"), ``"a red shape."`` ("colour") or ``"a red star."``
    ("shape_colour"). Deterministic (no template is drawn); only words of the train captions.
    Used to pretrain the vision encoder contrastively, where many images share a caption."""
    if scene.kind != "single":
        raise ValueError(f"expected a single-object scene, got kind {scene.kind!r}")
    o = scene.subject
    if kind == "shape":
        return f"{article(o.shape)} {o.shape}."
    if kind == "colour":
        return f"{article(o.colour)} {o.colour} shape."
    if kind == "shape_colour":
        return f"{article(o.colour)} {o.colour} {o.shape}."
    raise ValueError(f"expected kind in {ATTRIBUTE_CAPTION_KINDS}, got {kind!r}")


@dataclass(frozen=True)
class QA:
    """A question about an image or clip: ``question`` (without the "Question:" wrapper),
    ``answer``, ``qtype`` (a key of ``ANSWER_SETS``), ``template_id``."""

    question: str
    answer: str
    qtype: str
    template_id: str

    @property
    def prefix(self) -> str:
        """The prompt text up to the answer: ``"Question: <q> Answer:"``."""
        return f"Question: {self.question} Answer:"

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.answer}"

    @property
    def candidates(self) -> Tuple[str, ...]:
        return ANSWER_SETS[self.qtype]


def qa_text(qa: QA) -> str:
    """``"Question: <q> Answer: <a>"``."""
    return qa.text


def _valid_qtypes(scene: Scene) -> Tuple[str, ...]:
    if scene.kind == "single":
        return ("colour", "shape", "count", "size", "position")
    if scene.kind == "multi":
        return ("colour", "shape", "count", "size", "position", "relation")
    return ("count",)


def sample_qa(rng: np.random.Generator, scene: Scene, split: str = "train", qtype: Optional[str] = None) -> QA:
    """A question about the scene's subject (its answer is correct for the scene).

    ``qtype`` in ``QA_TYPES`` (default: drawn among those valid for the scene: "count" for
    count scenes, "relation" only for multi scenes)."""
    check_split(split)
    valid = _valid_qtypes(scene)
    if qtype is None:
        qtype = valid[int(rng.integers(len(valid)))]
    if qtype not in valid:
        raise ValueError(f"expected a question type in {valid} for a {scene.kind!r} scene, got {qtype!r}")
    o = scene.subject
    t = _pick(rng, f"qa.{qtype}", split)
    if qtype == "colour":
        q, a = _fill(t.text, shape=o.shape), o.colour
    elif qtype == "shape":
        q, a = _fill(t.text, colour=o.colour), o.shape
    elif qtype == "count":
        n = scene.count_shape(o.shape)
        q, a = _fill(t.text, plural=SHAPE_PLURALS[o.shape]), COUNT_WORDS[n]
    elif qtype == "size":
        q, a = _fill(t.text, name=o.name), o.size_name
    elif qtype == "position":
        q, a = _fill(t.text, name=o.name), o.region
    else:
        others = scene.objects[1:]
        b = others[int(rng.integers(len(others)))]
        rel, holds = _clear_relation(rng, o, b)
        if rng.random() < 0.5:  # ask it the other way round half the time
            o, b = b, o
            holds = bool(relation_holds(o, b, rel))
        q = _fill(t.text, name=o.name, name2=b.name, shape=o.shape, shape2=b.shape, rel=rel)
        a = "yes" if holds else "no"
    return QA(q, a, qtype, t.id)


def _event_phrase(rng: np.random.Generator, clip: Clip) -> str:
    e = clip.event
    s = e.subject
    if e.kind == "move":
        verb = ["moves", "slides"][int(rng.integers(2))]
        return f"the {s.name} {verb} {e.direction}"
    if e.kind == "appear":
        return f"{article(s.colour)} {s.name} appears"
    if e.kind == "disappear":
        return f"the {s.name} disappears"
    return [f"the {s.shape} turns from {e.colour_from} to {e.colour_to}",
            f"the {s.shape} changes colour from {e.colour_from} to {e.colour_to}"][int(rng.integers(2))]


def video_caption(rng: np.random.Generator, clip: Clip, split: str = "train") -> Tuple[str, str]:
    """A caption of a clip's event. Returns (text, template id)."""
    check_split(split)
    t = _pick(rng, "video.caption", split)
    return _fill(t.text, event=_event_phrase(rng, clip)), t.id


def sample_video_qa(rng: np.random.Generator, clip: Clip, split: str = "train", qtype: Optional[str] = None) -> QA:
    """A question about a clip's event. ``qtype`` in ``VIDEO_QA_TYPES`` and valid for the
    event (move: what_moved / direction; change_colour: what_changed / new_colour; appear:
    what_appeared; disappear: what_disappeared)."""
    check_split(split)
    e = clip.event
    valid = _VQA_FOR_EVENT[e.kind]
    if qtype is None:
        qtype = valid[int(rng.integers(len(valid)))]
    if qtype not in valid:
        raise ValueError(f"expected a video question type in {valid} for a {e.kind!r} clip, got {qtype!r}")
    t = _pick(rng, f"vqa.{qtype}", split)
    s = e.subject
    if qtype == "direction":
        q, a = _fill(t.text, name=s.name), e.direction
    elif qtype == "what_changed":
        q, a = _fill(t.text), s.shape
    elif qtype == "new_colour":
        q, a = _fill(t.text, shape=s.shape), e.colour_to
    else:
        q, a = _fill(t.text), s.name
    return QA(q, a, qtype, t.id)


# --------------------------------------------------------------------------- nonsense words

_ONSETS = tuple("bdfgklmnprstvz") + ("bl", "br", "dr", "fl", "gl", "gr", "kl", "pl", "pr", "sk", "sl", "sp", "st", "tr")
_SIMPLE = tuple("bdfgklmnprstvz")
_VOWELS = tuple("aeiou")
_CODAS = ("", "", "", "k", "l", "m", "n", "p", "s", "t", "x")


def world_vocabulary() -> frozenset:
    """Every word the world's non-nonsense texts can contain (lower case)."""
    words = set()
    for fam in TEMPLATES.values():
        for t in fam:
            words.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t.text.lower())))
    for t in CLASSIFY_FORMATS + CAPTION_PREFIXES:
        words.update(re.findall(r"[a-z]+", t.text.lower()))
    for vals in ANSWER_SETS.values():
        for v in vals:
            words.update(v.split())
    words.update(SHAPE_PLURALS.values())
    words.update("a an and the is are there shapes on at in corner moves slides appears disappears turns "
                 "changes colour from to question answer yes no".split())
    from .data import _TEXT_WORDS  # sentences of documents
    words.update(_TEXT_WORDS)
    return frozenset(words)


def nonsense_word_split(word: str) -> str:
    """The split a nonsense word belongs to: a fixed hash puts about 1 in 4 in "heldout"."""
    return "heldout" if zlib.crc32(word.encode()) % 4 == 0 else "train"


_VOCAB_CACHE: List[frozenset] = []


def nonsense_word(rng: np.random.Generator, split: str = "train") -> str:
    """A pronounceable nonsense word (2 consonant-vowel syllables, optional final consonant,
    e.g. ``"blimot"``) of ``split``, never a word of the world's other texts."""
    check_split(split)
    if not _VOCAB_CACHE:
        _VOCAB_CACHE.append(world_vocabulary())
    vocab = _VOCAB_CACHE[0]
    while True:
        w = (_ONSETS[int(rng.integers(len(_ONSETS)))] + _VOWELS[int(rng.integers(5))]
             + _SIMPLE[int(rng.integers(len(_SIMPLE)))] + _VOWELS[int(rng.integers(5))]
             + _CODAS[int(rng.integers(len(_CODAS)))])
        if w not in vocab and nonsense_word_split(w) == split:
            return w


def nonsense_words(rng: np.random.Generator, n: int, split: str = "train") -> List[str]:
    """``n`` distinct nonsense words of ``split``."""
    out: List[str] = []
    while len(out) < n:
        w = nonsense_word(rng, split)
        if w not in out:
            out.append(w)
    return out
