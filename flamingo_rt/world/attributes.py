"""The world's attribute families, their names in text, and the train / held-out split.

Every family has at least 8 values:

* ``SHAPES`` (9): square, circle, triangle, diamond, cross, star, ring, heart, semicircle
* ``COLOURS`` (10 named RGB colours, well separated in pixels on the dark background)
* ``SIZES`` (8 graded levels 0..7, named in text by 3 bins: small / medium / large)
* ``COUNTS`` (1..8, written as number words one..eight)
* ``REGIONS`` (9 cells of a 3x3 grid: top left, top, ..., center, ..., bottom right)
* ``RELATIONS`` (left of, right of, above, below) and ``DIRECTIONS`` (8 compass moves)

The split (fixed, independent of any seed):

* ``HELDOUT_COMBOS``: 9 (shape, colour) pairs, one per shape and each with a different
  colour. No image of the ``"train"`` split ever contains an object with one of these
  pairs (not as a subject, not as a distractor, not after a colour change in a clip), and no
  train text names one. ``"heldout"`` samples make their subject a held-out pair.
* Held-out task formats live with the templates in :mod:`flamingo_rt.world.text`.
* Nonsense words are partitioned by a hash into train and held-out words
  (:func:`flamingo_rt.world.text.nonsense_word_split`).
"""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Sequence, Tuple

__all__ = [
    "SHAPES", "SHAPE_PLURALS", "COLOURS", "COLOUR_NAMES", "SIZES", "SIZE_RADII", "SIZE_BINS",
    "size_name", "COUNTS", "COUNT_WORDS", "REGIONS", "RELATIONS", "DIRECTIONS", "DIRECTION_VECTORS",
    "HELDOUT_COMBOS", "SPLITS", "check_split", "is_heldout_combo", "allowed_colours", "allowed_shapes",
    "article",
]

SPLITS = ("train", "heldout")

SHAPES: Tuple[str, ...] = (
    "square", "circle", "triangle", "diamond", "cross", "star", "ring", "heart", "semicircle",
)
SHAPE_PLURALS: Dict[str, str] = {s: (s + "es" if s.endswith(("s", "x", "sh", "ch")) else s + "s")
                                 for s in SHAPES}

#: name -> RGB in [0, 1]; chosen to be far apart from each other and from the (dark,
#: low-saturation) backgrounds.
COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.96, 0.92, 0.10),
    "green": (0.10, 0.72, 0.18),
    "cyan": (0.10, 0.85, 0.92),
    "blue": (0.15, 0.30, 1.00),
    "purple": (0.62, 0.18, 0.92),
    "pink": (1.00, 0.50, 0.78),
    "white": (0.97, 0.97, 0.97),
    "brown": (0.58, 0.32, 0.08),
}
COLOUR_NAMES: Tuple[str, ...] = tuple(COLOURS)

#: size levels 0..7 and their radius as a fraction of the canvas side
SIZES: Tuple[int, ...] = tuple(range(8))
SIZE_RADII: Tuple[float, ...] = tuple(0.065 + i * (0.17 - 0.065) / 7 for i in range(8))
#: the words used in text: levels 0-2 small, 3-4 medium, 5-7 large
SIZE_BINS: Tuple[str, ...] = ("small", "medium", "large")
_SIZE_BIN_OF_LEVEL = ("small", "small", "small", "medium", "medium", "large", "large", "large")


def size_name(level: int) -> str:
    """The size word (small / medium / large) of a size level 0..7."""
    return _SIZE_BIN_OF_LEVEL[level]


COUNTS: Tuple[int, ...] = tuple(range(1, 9))
COUNT_WORDS: Dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
                               7: "seven", 8: "eight"}

#: 3x3 grid cells, row-major from the top left; index = 3 * row + col
REGIONS: Tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")

#: name -> unit (dx, dy) in image coordinates (y grows downwards)
_D = 0.7071067811865476
DIRECTION_VECTORS: Dict[str, Tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up left": (-_D, -_D), "up right": (_D, -_D), "down left": (-_D, _D), "down right": (_D, _D),
}
DIRECTIONS: Tuple[str, ...] = tuple(DIRECTION_VECTORS)

#: one held-out colour per shape, all different: shape i gets colour (3 i + 1) mod 10
HELDOUT_COMBOS: FrozenSet[Tuple[str, str]] = frozenset(
    (s, COLOUR_NAMES[(3 * i + 1) % len(COLOUR_NAMES)]) for i, s in enumerate(SHAPES)
)


def check_split(split: str) -> str:
    """Validate a split name; returns it."""
    if split not in SPLITS:
        raise ValueError(f"expected split 'train' or 'heldout', got {split!r}")
    return split


def is_heldout_combo(shape: str, colour: str) -> bool:
    """True when (shape, colour) is reserved for the held-out split."""
    return (shape, colour) in HELDOUT_COMBOS


def allowed_colours(shape: str, split: str) -> List[str]:
    """Colours a *non-subject* object of ``shape`` may take in ``split``: in ``"train"`` all
    colours except the held-out one; in ``"heldout"`` all colours."""
    check_split(split)
    return [c for c in COLOUR_NAMES if split == "heldout" or not is_heldout_combo(shape, c)]


def allowed_shapes(colour: str, split: str) -> List[str]:
    """Shapes an object of ``colour`` may take in ``split`` (see :func:`allowed_colours`)."""
    check_split(split)
    return [s for s in SHAPES if split == "heldout" or not is_heldout_combo(s, colour)]


def article(word: str) -> str:
    """``"a"`` or ``"an"`` for the following word."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else SHAPE_PLURALS[shape]


def _sequence_names(values: Sequence[str]) -> str:
    return ", ".join(values)
