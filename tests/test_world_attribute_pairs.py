"""Short attribute captions of single-object scenes (stage 1's attribute batches)."""
import numpy as np
import pytest
import torch

from flamingo_rt.world.data import attribute_pairs
from flamingo_rt.world.scene import sample_scene
from flamingo_rt.world.text import ATTRIBUTE_CAPTION_KINDS, attribute_caption


def test_attribute_captions_name_the_subject():
    sc = sample_scene(np.random.default_rng(0), "train", kind="single")
    o = sc.subject
    art = "an" if o.colour[0] in "aeiou" else "a"
    assert attribute_caption(sc, "colour") == f"{art} {o.colour} shape."
    assert attribute_caption(sc, "shape_colour") == f"{art} {o.colour} {o.shape}."
    assert attribute_caption(sc, "shape").endswith(f" {o.shape}.")
    with pytest.raises(ValueError, match="expected kind in"):
        attribute_caption(sc, "size")
    with pytest.raises(ValueError, match="single-object scene"):
        attribute_caption(sample_scene(np.random.default_rng(0), "train", kind="multi"), "shape")


def test_attribute_pairs_are_deterministic_and_match_their_scenes():
    a = list(attribute_pairs(3, "train", 32, n=4))
    b = list(attribute_pairs(3, "train", 32, n=4))
    assert len(a) == 4
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and x["captions"] == y["captions"]
        assert x["image"].shape == (3, 32, 32) and x["scene"].kind == "single"
        assert set(x["captions"]) == set(ATTRIBUTE_CAPTION_KINDS)
        assert x["captions"]["shape_colour"] == attribute_caption(x["scene"], "shape_colour")
    assert len({p["captions"]["shape_colour"] for p in a}) > 1  # different records differ
