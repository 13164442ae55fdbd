"""Scenes: structured descriptions (:class:`Obj`, :class:`Scene`), their sampling under a
split, and their rendering to float32 tensors (3, H, W) in [0, 1].

Rendering is a pure function of the scene (and the frame index for the per-frame sensor
noise): the scene carries the seed of its background, clutter and noise. Shapes are drawn
by evaluating an inside test on a ``supersample`` x ``supersample`` grid per pixel and
averaging (anti-aliased coverage), then alpha-composited over a textured background with
small grey distractor specks; Gaussian pixel noise is added last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .attributes import (
    COLOURS, HELDOUT_COMBOS, REGIONS, SHAPES, SIZE_RADII, allowed_colours, check_split,
    is_heldout_combo, size_name,
)

__all__ = [
    "Obj", "Scene", "BACKGROUND_STYLES", "SCENE_KINDS", "render_scene", "object_masks",
    "shape_mask", "sample_scene", "sample_object", "place_objects", "relation_holds",
]

BACKGROUND_STYLES = ("plain", "gradient", "blotches", "stripes", "grid")
SCENE_KINDS = ("single", "multi", "count")

_GAP = 0.04           # minimum free space between two objects, as a fraction of the canvas
_EDGE = 0.01          # minimum distance of an object's bounding circle from the border
_CELL_MARGIN = 0.05   # centres keep this far from region-cell borders (unambiguous regions)


@dataclass(frozen=True)
class Obj:
    """One object. ``x``, ``y``: centre as fractions of the canvas side (y grows downwards);
    ``size``: level 0..7 (radius ``SIZE_RADII[size]`` of the canvas side); ``angle``: a small
    rotation in degrees (never enough to turn a square into a diamond)."""

    shape: str
    colour: str
    size: int
    x: float
    y: float
    angle: float = 0.0

    @property
    def radius(self) -> float:
        """Radius of the bounding circle, as a fraction of the canvas side."""
        return SIZE_RADII[self.size]

    @property
    def size_name(self) -> str:
        return size_name(self.size)

    @property
    def region(self) -> str:
        """The 3x3 grid cell of the centre (one of ``REGIONS``)."""
        col = min(int(self.x * 3), 2)
        row = min(int(self.y * 3), 2)
        return REGIONS[3 * row + col]

    @property
    def name(self) -> str:
        """``"<colour> <shape>"``, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A still image, described. ``objects[0]`` is the subject (for ``kind == "count"``,
    ``objects[:count]`` are the counted group, identical in shape and colour, and the rest
    have other shapes and colours). ``seed`` fixes background, clutter and noise.

    kinds: ``"single"`` (one object), ``"multi"`` (2-4 objects, all shapes different and all
    colours different, each in its own region cell), ``"count"`` (a group of 1..8 plus 0-2
    distractors)."""

    objects: Tuple[Obj, ...]
    kind: str
    seed: int
    style: str = "plain"
    count: Optional[int] = None

    @property
    def subject(self) -> Obj:
        return self.objects[0]

    def count_shape(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def find(self, shape: Optional[str] = None, colour: Optional[str] = None) -> List[Obj]:
        return [o for o in self.objects if (shape is None or o.shape == shape)
                and (colour is None or o.colour == colour)]

    def combos(self) -> List[Tuple[str, str]]:
        return [(o.shape, o.colour) for o in self.objects]


# --------------------------------------------------------------------------- shapes

def _polygon(u: np.ndarray, v: np.ndarray, verts: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Even-odd inside test of points (u, v) against a closed polygon."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n: int, r: float, start_deg: float) -> List[Tuple[float, float]]:
    return [(r * math.cos(math.radians(start_deg + 360.0 * i / n)),
             r * math.sin(math.radians(start_deg + 360.0 * i / n))) for i in range(n)]


_TRIANGLE = _regular(3, 1.05, -90.0)
_STAR = [p for i in range(5) for p in (
    (1.05 * math.cos(math.radians(-90 + 72 * i)), 1.05 * math.sin(math.radians(-90 + 72 * i))),
    (0.45 * math.cos(math.radians(-54 + 72 * i)), 0.45 * math.sin(math.radians(-54 + 72 * i))),
)]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a shape of unit bounding radius at points (u, v) (v grows downwards).
    Returns a bool array of the points' shape."""
    au, av = np.abs(u), np.abs(v)
    if shape == "square":
        return np.maximum(au, av) <= 0.78
    if shape == "circle":
        return u * u + v * v <= 0.95 ** 2
    if shape == "triangle":
        return _polygon(u, v - 0.12, _TRIANGLE)
    if shape == "diamond":
        return au / 0.82 + av / 1.05 <= 1.0
    if shape == "cross":
        return ((au <= 0.33) & (av <= 0.97)) | ((av <= 0.33) & (au <= 0.97))
    if shape == "star":
        return _polygon(u, v - 0.08, _STAR)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.97 ** 2) & (r2 >= 0.5 ** 2)
    if shape == "heart":
        x, y = u / 0.95, -(v - 0.05) / 0.95 * 1.1  # y up; the classic implicit heart curve
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    if shape == "semicircle":
        vv = v - 0.35  # flat side down, centred on the bounding circle
        return (u * u + vv * vv <= 1.0) & (vv <= 0.0)
    raise ValueError(f"expected a shape in {SHAPES}, got {shape!r}")


# --------------------------------------------------------------------------- rendering

def _coverage(o: Obj, S: int, ss: int) -> Tuple[int, int, np.ndarray]:
    """(y0, x0, coverage (h, w) float32 in [0, 1]) of an object on an S x S canvas."""
    cx, cy, rp = o.x * S, o.y * S, o.radius * S
    ext = rp * 1.1 + 1.0
    x0, x1 = max(int(math.floor(cx - ext)), 0), min(int(math.ceil(cx + ext)), S)
    y0, y1 = max(int(math.floor(cy - ext)), 0), min(int(math.ceil(cy + ext)), S)
    if x1 <= x0 or y1 <= y0:
        return y0, x0, np.zeros((0, 0), np.float32)
    xs = (np.arange(x0 * ss, x1 * ss, dtype=np.float64) + 0.5) / ss
    ys = (np.arange(y0 * ss, y1 * ss, dtype=np.float64) + 0.5) / ss
    du = (xs[None, :] - cx) / rp
    dv = (ys[:, None] - cy) / rp
    if o.angle:
        c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
        u, v = c * du + s * dv, -s * du + c * dv
    else:
        u, v = np.broadcast_to(du, (len(ys), len(xs))), np.broadcast_to(dv, (len(ys), len(xs)))
    m = shape_mask(o.shape, u, v).astype(np.float32)
    h, w = y1 - y0, x1 - x0
    return y0, x0, m.reshape(h, ss, w, ss).mean(axis=(1, 3))


def object_masks(scene: Scene, image_size: int = 64, supersample: int = 4) -> np.ndarray:
    """Per-object coverage, float32 (N, H, W) in [0, 1] (before occlusion; objects of a
    sampled scene never overlap)."""
    S = image_size
    out = np.zeros((len(scene.objects), S, S), np.float32)
    for i, o in enumerate(scene.objects):
        y0, x0, cov = _coverage(o, S, supersample)
        out[i, y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]] = cov
    return out


def _upsample(lowres: np.ndarray, S: int) -> np.ndarray:
    """(h, w, C) -> (S, S, C) bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(lowres.transpose(2, 0, 1)))[None].float()
    return F.interpolate(t, size=(S, S), mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)


def _background(scene: Scene, S: int) -> Tuple[np.ndarray, float]:
    """(S, S, 3) float32 background with clutter, and the sensor-noise sigma."""
    rng = np.random.default_rng([scene.seed, 7])
    base = rng.uniform(0.08, 0.30)
    img = np.full((S, S, 3), base, np.float32) + rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    style = scene.style
    if style == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        img += (0.12 * ((math.cos(a) * xx + math.sin(a) * yy) - 0.5))[..., None]
    elif style == "blotches":
        k = int(rng.integers(3, 8))
        img += _upsample(rng.normal(0, 0.06, size=(k, k, 1)).astype(np.float32), S)
    elif style == "stripes":
        a, f = rng.uniform(0, math.pi), rng.uniform(4, 12)
        img += (0.04 * np.sin(2 * math.pi * f * (math.cos(a) * xx + math.sin(a) * yy)))[..., None]
    elif style == "grid":
        step = int(rng.integers(6, 14))
        lines = ((np.arange(S) % step) == 0)
        img[lines, :, :] += 0.05
        img[:, lines, :] += 0.05
    # distractor specks: small, dim, nearly grey dots (never mistaken for objects)
    for _ in range(int(rng.integers(4, 21))):
        y, x = int(rng.integers(0, S)), int(rng.integers(0, S))
        g = rng.uniform(0.35, 0.65)
        h, w = (1, int(rng.integers(1, 3))) if rng.random() < 0.5 else (int(rng.integers(1, 3)), 1)
        img[y:y + h, x:x + w, :] = g + rng.uniform(-0.05, 0.05, size=3)
    return img, float(rng.uniform(0.01, 0.035))


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 4, frame: int = 0) -> torch.Tensor:
    """Render a scene. Returns float32 (3, image_size, image_size) in [0, 1].

    ``frame`` only changes the sensor noise (frames of a clip share background and clutter).
    """
    if image_size < 16:
        raise ValueError(f"expected image_size >= 16, got {image_size}")
    if supersample < 1:
        raise ValueError(f"expected supersample >= 1, got {supersample}")
    S = image_size
    img, sigma = _background(scene, S)
    jit = np.random.default_rng([scene.seed, 11])
    for o in scene.objects:
        y0, x0, cov = _coverage(o, S, supersample)
        if cov.size == 0:
            continue
        col = np.asarray(COLOURS[o.colour], np.float32) + jit.normal(0, 0.025, size=3).astype(np.float32)
        # a faint top-to-bottom shading so objects are not perfectly flat
        shade = 1.0 + 0.06 * np.linspace(1, -1, cov.shape[0], dtype=np.float32)[:, None, None]
        a = cov[..., None]
        patch = img[y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]]
        patch[...] = patch * (1 - a) + (col[None, None] * shade) * a
    noise = np.random.default_rng([scene.seed, 13, frame]).normal(0, sigma, size=img.shape).astype(np.float32)
    img = np.clip(img + noise, 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- sampling

def _ok(o: Obj, others: Sequence[Obj]) -> bool:
    r = o.radius
    if not (r + _EDGE <= o.x <= 1 - r - _EDGE and r + _EDGE <= o.y <= 1 - r - _EDGE):
        return False
    return all(math.hypot(o.x - p.x, o.y - p.y) >= r + p.radius + _GAP for p in others)


def _angle(rng: np.random.Generator) -> float:
    return float(rng.uniform(-10.0, 10.0))


def place_objects(rng: np.random.Generator, specs: Sequence[Tuple[str, str, int]], by_region: bool,
                  tries: int = 200) -> Tuple[Obj, ...]:
    """Place (shape, colour, size) specs without overlap. ``by_region``: each object in its own
    3x3 cell, its centre away from cell borders (unambiguous region and relations; at most
    9 specs). Sizes shrink when a layout does not fit. Raises RuntimeError if impossible."""
    specs = [list(s) for s in specs]
    for attempt in range(tries):
        placed: List[Obj] = []
        cells = rng.permutation(9)
        ok = True
        for i, (shape, colour, size) in enumerate(specs):
            r = SIZE_RADII[size]
            for _ in range(30):
                if by_region:
                    c = int(cells[i])
                    col, row = c % 3, c // 3
                    lo_x, hi_x = max(col / 3 + _CELL_MARGIN, r + _EDGE), min((col + 1) / 3 - _CELL_MARGIN, 1 - r - _EDGE)
                    lo_y, hi_y = max(row / 3 + _CELL_MARGIN, r + _EDGE), min((row + 1) / 3 - _CELL_MARGIN, 1 - r - _EDGE)
                    x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
                else:
                    x, y = rng.uniform(r + _EDGE, 1 - r - _EDGE, size=2)
                o = Obj(shape, colour, size, float(x), float(y), _angle(rng))
                if _ok(o, placed):
                    placed.append(o)
                    break
            else:
                ok = False
                break
        if ok:
            return tuple(placed)
        if attempt % 10 == 9:  # shrink the largest object and retry
            j = max(range(len(specs)), key=lambda k: specs[k][2])
            specs[j][2] = max(specs[j][2] - 1, 0)
    raise RuntimeError(f"could not place {len(specs)} objects without overlap")


def _subject_combo(rng: np.random.Generator, split: str, shape: Optional[str] = None,
                   colour: Optional[str] = None) -> Tuple[str, str]:
    """A (shape, colour) for a scene's subject: in "train" never a held-out pair, in
    "heldout" always one (when shape/colour constraints allow)."""
    if split == "heldout":
        cands = sorted(c for c in HELDOUT_COMBOS if (shape is None or c[0] == shape)
                       and (colour is None or c[1] == colour))
        if cands:
            return cands[int(rng.integers(len(cands)))]
        raise ValueError(f"no held-out combination has shape={shape!r}, colour={colour!r}")
    if shape is None and colour is None:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if shape is not None and colour is None:
        cols = allowed_colours(shape, "train")
        return shape, cols[int(rng.integers(len(cols)))]
    if shape is None:
        shapes = [s for s in SHAPES if not is_heldout_combo(s, colour)]
        return shapes[int(rng.integers(len(shapes)))], colour
    if is_heldout_combo(shape, colour):
        raise ValueError(f"({shape}, {colour}) is a held-out combination; not allowed in split 'train'")
    return shape, colour


def _others(rng: np.random.Generator, n: int, split: str, used_shapes: set, used_colours: set
            ) -> List[Tuple[str, str]]:
    """n further (shape, colour) pairs, all shapes and colours new, never held-out in train."""
    out = []
    for _ in range(n):
        shapes = [s for s in SHAPES if s not in used_shapes]
        s = shapes[int(rng.integers(len(shapes)))]
        cols = [c for c in allowed_colours(s, split) if c not in used_colours]
        c = cols[int(rng.integers(len(cols)))]
        out.append((s, c))
        used_shapes.add(s)
        used_colours.add(c)
    return out


def sample_object(rng: np.random.Generator, split: str = "train", shape: Optional[str] = None,
                  colour: Optional[str] = None, heldout_subject: Optional[bool] = None) -> Tuple[str, str]:
    """A (shape, colour) for a subject under ``split``. ``heldout_subject`` (default: split ==
    "heldout") asks for a held-out pair; False in "heldout" draws from all pairs."""
    check_split(split)
    want = (split == "heldout") if heldout_subject is None else heldout_subject
    if want and split == "train":
        raise ValueError("held-out subjects are not allowed in split 'train'")
    if want:
        return _subject_combo(rng, "heldout", shape, colour)
    if split == "heldout":
        s = shape or SHAPES[int(rng.integers(len(SHAPES)))]
        if colour is None:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        return s, colour
    return _subject_combo(rng, "train", shape, colour)


def sample_scene(rng: np.random.Generator, split: str = "train", kind: Optional[str] = None,
                 shape: Optional[str] = None, colour: Optional[str] = None, size: Optional[int] = None,
                 count: Optional[int] = None, n_objects: Optional[int] = None,
                 heldout_subject: Optional[bool] = None) -> Scene:
    """Sample a scene (structure only; render with :func:`render_scene`).

    Args:
        rng: the only source of randomness.
        split: "train" (no object is ever a held-out (shape, colour) pair) or "heldout" (the
            subject is a held-out pair unless ``heldout_subject=False``).
        kind: "single" | "multi" | "count" (default: drawn 40/30/30).
        shape, colour, size: constrain the subject.
        count: the group size for kind "count" (1..8; default drawn).
        n_objects: objects in a "multi" scene (2..4; default drawn).
    """
    check_split(split)
    if kind is None:
        kind = SCENE_KINDS[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
    if kind not in SCENE_KINDS:
        raise ValueError(f"expected kind in {SCENE_KINDS}, got {kind!r}")
    s0, c0 = sample_object(rng, split, shape, colour, heldout_subject)
    seed = int(rng.integers(0, 2 ** 31 - 1))
    style = BACKGROUND_STYLES[int(rng.integers(len(BACKGROUND_STYLES)))]
    if kind == "single":
        sz = int(rng.integers(0, 8)) if size is None else size
        objs = place_objects(rng, [(s0, c0, sz)], by_region=True)
        return Scene(objs, "single", seed, style)
    if kind == "multi":
        n = int(rng.integers(2, 5)) if n_objects is None else n_objects
        if not 2 <= n <= 4:
            raise ValueError(f"expected n_objects in 2..4 for a multi scene, got {n}")
        pairs = [(s0, c0)] + _others(rng, n - 1, "train" if split == "train" else "heldout", {s0}, {c0})
        sizes = [int(rng.integers(0, 7)) for _ in pairs]
        if size is not None:
            sizes[0] = size
        objs = place_objects(rng, [(s, c, z) for (s, c), z in zip(pairs, sizes)], by_region=True)
        return Scene(objs, "multi", seed, style)
    n = int(rng.integers(1, 9)) if count is None else count
    if not 1 <= n <= 8:
        raise ValueError(f"expected count in 1..8, got {n}")
    n_dis = int(rng.integers(0, 3)) if n <= 6 else int(rng.integers(0, 2))
    hi = 4 if n <= 3 else 3
    sz = int(rng.integers(0, hi)) if size is None else size
    specs = [(s0, c0, sz)] * n + [(s, c, int(rng.integers(0, hi))) for s, c in
                                  _others(rng, n_dis, split, {s0}, {c0})]
    objs = place_objects(rng, specs, by_region=False)
    return Scene(objs, "count", seed, style, count=n)


def relation_holds(a: Obj, b: Obj, relation: str, margin: float = 0.1) -> Optional[bool]:
    """Whether ``a`` is ``relation`` ("left of", "right of", "above", "below") ``b``: True /
    False when the centres differ by at least ``margin`` along that axis, None when unclear."""
    if relation in ("left of", "right of"):
        d = b.x - a.x if relation == "left of" else a.x - b.x
    elif relation in ("above", "below"):
        d = b.y - a.y if relation == "above" else a.y - b.y
    else:
        raise ValueError(f"expected a relation in ('left of', 'right of', 'above', 'below'), got {relation!r}")
    if abs(d) < margin:
        return None
    return d > 0
