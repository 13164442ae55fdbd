"""Clips: F frames of one scene in which one event happens.

Events (``EVENT_KINDS``):

* ``"move"``: the subject slides in a straight line in one of 8 ``DIRECTIONS`` (a displacement
  of 0.2-0.35 canvas sides between the first and last frame), the others stay still;
* ``"appear"`` / ``"disappear"``: the subject is absent before / after frame ``event.frame``;
* ``"change_colour"``: the subject has ``event.colour_from`` before frame ``event.frame`` and
  ``event.colour_to`` from it on.

All objects of a clip have different shapes and different colours (also ``colour_to``), so
"the red circle" and "the square" always name one object. In the ``"train"`` split no frame
holds a held-out (shape, colour) pair; in ``"heldout"`` the subject is one in some frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import numpy as np
import torch

from .attributes import DIRECTION_VECTORS, DIRECTIONS, allowed_colours, check_split
from .scene import BACKGROUND_STYLES, Obj, Scene, _GAP, _EDGE, _others, place_objects, render_scene, sample_object

__all__ = ["ClipEvent", "Clip", "EVENT_KINDS", "sample_clip", "render_clip"]

EVENT_KINDS = ("move", "appear", "disappear", "change_colour")


@dataclass(frozen=True)
class ClipEvent:
    """What happens in a clip. ``subject``: the object as it is in the first frame where it is
    visible; ``direction`` (move), ``frame`` (appear / disappear / change_colour: the first
    frame showing the new state), ``colour_from`` / ``colour_to`` (change_colour)."""

    kind: str
    subject: Obj
    direction: Optional[str] = None
    frame: Optional[int] = None
    colour_from: Optional[str] = None
    colour_to: Optional[str] = None


@dataclass(frozen=True)
class Clip:
    """A described clip: ``frames[f]`` is the :class:`Scene` of frame f (all share one seed, so
    background and clutter are identical; the sensor noise differs per frame)."""

    frames: Tuple[Scene, ...]
    event: ClipEvent

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def combos(self) -> List[Tuple[str, str]]:
        return [c for s in self.frames for c in s.combos()]


def sample_clip(rng: np.random.Generator, split: str = "train", num_frames: int = 8,
                kind: Optional[str] = None, n_objects: Optional[int] = None,
                direction: Optional[str] = None) -> Clip:
    """Sample a clip (structure only; render with :func:`render_clip`).

    Args:
        rng: the only source of randomness.
        split: "train" | "heldout" (see the module docstring).
        num_frames: F >= 2.
        kind: one of ``EVENT_KINDS`` (default drawn uniformly).
        n_objects: objects in the clip, subject included (1..3; default drawn).
        direction: for "move", one of ``DIRECTIONS`` (default drawn).
    """
    check_split(split)
    if num_frames < 2:
        raise ValueError(f"expected num_frames >= 2, got {num_frames}")
    if kind is None:
        kind = EVENT_KINDS[int(rng.integers(len(EVENT_KINDS)))]
    if kind not in EVENT_KINDS:
        raise ValueError(f"expected kind in {EVENT_KINDS}, got {kind!r}")
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"expected n_objects in 1..3, got {n}")
    seed = int(rng.integers(0, 2 ** 31 - 1))
    style = BACKGROUND_STYLES[int(rng.integers(len(BACKGROUND_STYLES)))]
    F = num_frames
    s0, c0 = sample_object(rng, split)
    others = _others(rng, n - 1, split, {s0}, {c0})
    colour_to = None
    if kind == "change_colour":
        used = {c0} | {c for _, c in others}
        cands = [c for c in allowed_colours(s0, "train") if c not in used]
        colour_to = cands[int(rng.integers(len(cands)))]
        if split == "heldout" and rng.random() < 0.5:  # the held-out pair comes after the change
            c0, colour_to = colour_to, c0
    sizes = [int(rng.integers(1, 6)) for _ in range(n)]
    for _ in range(200):
        objs = place_objects(rng, [(s0, c0, sizes[0])] + [(s, c, z) for (s, c), z in zip(others, sizes[1:])],
                             by_region=False)
        subj, rest = objs[0], list(objs[1:])
        if kind != "move":
            break
        d = direction or DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        if d not in DIRECTION_VECTORS:
            raise ValueError(f"expected direction in {DIRECTIONS}, got {d!r}")
        dist = float(rng.uniform(0.2, 0.35))
        dx, dy = DIRECTION_VECTORS[d]
        end = replace(subj, x=subj.x + dx * dist, y=subj.y + dy * dist)
        r = subj.radius
        if not (r + _EDGE <= end.x <= 1 - r - _EDGE and r + _EDGE <= end.y <= 1 - r - _EDGE):
            continue
        if all(_seg_dist(subj, end, o) >= r + o.radius + _GAP for o in rest):
            break
    else:
        raise RuntimeError("could not lay out a move clip")

    frames: List[Scene] = []
    ev_frame = int(rng.integers(1, F)) if kind != "move" else None
    for f in range(F):
        if kind == "move":
            t = f / (F - 1)
            o = replace(subj, x=subj.x + (end.x - subj.x) * t, y=subj.y + (end.y - subj.y) * t)
            objs_f = (o, *rest)
        elif kind == "appear":
            objs_f = (subj, *rest) if f >= ev_frame else tuple(rest)
        elif kind == "disappear":
            objs_f = (subj, *rest) if f < ev_frame else tuple(rest)
        else:
            objs_f = (replace(subj, colour=colour_to) if f >= ev_frame else subj, *rest)
        frames.append(Scene(tuple(objs_f), "clip", seed, style))
    event = ClipEvent(kind, subj, direction=d if kind == "move" else None, frame=ev_frame,
                      colour_from=c0 if kind == "change_colour" else None, colour_to=colour_to)
    return Clip(tuple(frames), event)


def _seg_dist(a: Obj, b: Obj, p: Obj) -> float:
    """Distance from p's centre to the segment a-b."""
    ax, ay, bx, by = a.x, a.y, b.x, b.y
    vx, vy = bx - ax, by - ay
    L2 = vx * vx + vy * vy
    t = 0.0 if L2 == 0 else max(0.0, min(1.0, ((p.x - ax) * vx + (p.y - ay) * vy) / L2))
    return math.hypot(p.x - (ax + t * vx), p.y - (ay + t * vy))


def render_clip(clip: Clip, image_size: int = 64, supersample: int = 4) -> torch.Tensor:
    """Render a clip. Returns float32 (F, 3, image_size, image_size) in [0, 1]."""
    return torch.stack([render_scene(s, image_size, supersample, frame=f) for f, s in enumerate(clip.frames)])
