"""A procedural world of shapes for Flamingo-style few-shot learning.

No pretrained weights can be downloaded here, so flamingo_rt trains and evaluates on a world
of its own: small RGB images (float32 (3, S, S) in [0, 1], S = 64 by default) of coloured
shapes on textured, noisy backgrounds with distractor specks, and short clips (F, 3, S, S)
in which one thing happens (an object moves, appears, disappears or changes colour).

Attribute families (:mod:`.attributes`), each with at least 8 values: 9 shapes, 10 colours,
8 size levels (named small / medium / large), counts 1..8, 9 regions of a 3x3 grid (plus the
relations left of / right of / above / below) and 8 directions of motion.

Structure first, pixels second: a :class:`Scene` / :class:`Clip` is sampled from a
``numpy.random.Generator`` (never the global RNG), then rendered deterministically
(:func:`render_scene`, :func:`render_clip`), and every text is derived from the structure,
so answers are correct by construction:

* captions and questions about colour, shape, count, size, position and relations
  (:func:`caption`, :func:`sample_qa`), video captions and questions (:func:`video_caption`,
  :func:`sample_video_qa`);
* N-way naming with pronounceable nonsense words (:func:`nonsense_words`) bound to a shape,
  colour or shape-colour pair freshly per episode, so it can only be solved in context;
* interleaved multi-image documents, the M3W analogue (:func:`sample_document`);
* few-shot episodes for evaluation (:func:`few_shot_episode`, tasks in ``TASKS``);
* training streams (:func:`image_text_pairs`, :func:`interleaved_documents`,
  :func:`video_text_pairs`, :func:`text_corpus`) and :func:`world_corpus` for the tokenizer.

The split (``split="train" | "heldout"`` everywhere):

* held-out attribute combinations: ``HELDOUT_COMBOS``, 9 (shape, colour) pairs (one per shape,
  each a different colour). Train samples never contain them, in any image or frame or text;
  held-out samples make their subject one of them.
* held-out task formats: each text family has phrasings used only in ``"heldout"``
  (:data:`TEMPLATES`; each carries a marker phrase no train text contains), and the few-shot
  prefixes of classification and captioning have held-out variants. ``format_split="train"``
  evaluates held-out combinations with train formats.
* held-out nonsense words: a fixed hash puts a quarter of all nonsense words in "heldout".
"""
from .attributes import (  # noqa: F401
    COLOUR_NAMES, COLOURS, COUNT_WORDS, COUNTS, DIRECTIONS, DIRECTION_VECTORS, HELDOUT_COMBOS, REGIONS,
    RELATIONS, SHAPE_PLURALS, SHAPES, SIZE_BINS, SIZE_RADII, SIZES, SPLITS, is_heldout_combo, size_name,
)
from .scene import (  # noqa: F401
    BACKGROUND_STYLES, SCENE_KINDS, Obj, Scene, object_masks, place_objects, relation_holds, render_scene,
    sample_scene, shape_mask,
)
from .clip import EVENT_KINDS, Clip, ClipEvent, render_clip, sample_clip  # noqa: F401
from .text import (  # noqa: F401
    ANSWER_SETS, CAPTION_PREFIXES, CLASSIFY_FORMATS, QA, QA_TYPES, TEMPLATES, VIDEO_QA_TYPES, Template,
    caption, heldout_markers, nonsense_word, nonsense_word_split, nonsense_words, sample_qa, sample_video_qa,
    video_caption, world_vocabulary,
)
from .episodes import CLASSIFY_BY, TASKS, Episode, as_rng, few_shot_episode  # noqa: F401
from .data import (  # noqa: F401
    DOCUMENT_KINDS, Document, describe_scene, image_text_pairs, interleaved_documents, sample_document,
    text_corpus, video_text_pairs, world_corpus,
)
