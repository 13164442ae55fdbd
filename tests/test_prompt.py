"""Prompt media conversion (flamingo_rt.runtime.prompt): read-only arrays (a PIL image's
pixels, a memory-mapped .npy) are copied before torch sees them, never shared writable."""
from __future__ import annotations

import numpy as np
import torch

from flamingo_rt.runtime import prompt as prompt_mod


def test_read_only_arrays_are_copied_before_torch_sees_them(monkeypatch):
    img = (np.random.RandomState(0).rand(8, 6, 3) * 255).astype(np.uint8)
    ro = img.copy()
    ro.setflags(write=False)
    seen = []
    real = torch.from_numpy

    def from_numpy(a):
        seen.append(a.flags.writeable)
        return real(a)

    monkeypatch.setattr(prompt_mod.torch, "from_numpy", from_numpy)
    got = prompt_mod._to_frames(ro)
    assert seen == [True]  # torch warns (and may write through) on read-only arrays
    want = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not ro.flags.writeable and np.array_equal(ro, img)  # the caller's array is untouched


def test_writable_arrays_are_not_copied_twice(monkeypatch):
    img = np.random.RandomState(1).rand(4, 5, 3).astype(np.float32)
    seen = []
    real = torch.from_numpy

    def from_numpy(a):
        seen.append(a)
        return real(a)

    monkeypatch.setattr(prompt_mod.torch, "from_numpy", from_numpy)
    got = prompt_mod._to_frames(img)
    assert len(seen) == 1 and np.shares_memory(seen[0], img)
    torch.testing.assert_close(got, torch.from_numpy(img).permute(2, 0, 1)[None])


def test_float_pixels_outside_unit_range_or_not_finite_are_refused():
    """Float media must be [0, 1] pixels: a 0-255 float image (a common slip) or NaN would
    otherwise be normalised into garbage and answered silently."""
    import pytest

    ok = np.random.RandomState(2).rand(6, 6, 3)
    assert prompt_mod._to_frames(ok).shape == (1, 3, 6, 6)
    assert prompt_mod._to_frames(np.clip(ok, 0, 1) + 5e-4).shape == (1, 3, 6, 6)  # rounding slack
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\], got values in \[[0-9.e-]+, 2[0-9.]+\]; pass uint8"):
        prompt_mod._to_frames(ok * 255.0)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\], got values in \[-0\.5"):
        prompt_mod._to_frames(torch.full((3, 4, 4), -0.5))
    bad = ok.astype(np.float32)
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="finite pixel values"):
        prompt_mod._to_frames(bad)
    with pytest.raises(ValueError, match="finite pixel values"):
        prompt_mod._to_frames(torch.full((2, 3, 4, 4), float("inf")))
    assert prompt_mod._to_frames((ok * 255).astype(np.uint8)).max() <= 1.0  # uint8 is scaled, not refused


def test_few_shot_prompt_names_a_malformed_support_item_or_query():
    import pytest

    img = torch.rand(3, 4, 4)
    assert len(prompt_mod.few_shot_prompt([(img, "a"), [img, 2]], img, prefix="Out:")) == 6
    with pytest.raises(ValueError, match=r"support\[1\] is Tensor"):
        prompt_mod.few_shot_prompt([(img, "a"), img], img)
    with pytest.raises(ValueError, match=r"support\[0\] is a tuple of 3"):
        prompt_mod.few_shot_prompt([(img, "a", "b")], img)
    with pytest.raises(TypeError, match="expected the query to be media .*got NoneType"):
        prompt_mod.few_shot_prompt([(img, "a")], None)
