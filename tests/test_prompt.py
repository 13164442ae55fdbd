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
