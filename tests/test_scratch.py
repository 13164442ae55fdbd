"""flamingo_rt.ops.scratch: per-thread buffers grown to the largest size asked, reused (the
same storage), separate per name and per thread, freed by release()."""
import threading

import pytest
import torch

from flamingo_rt.ops import scratch


def test_buffers_grow_are_reused_and_released():
    scratch.release()
    assert scratch.held_bytes() == 0
    a = scratch.buffer("t", 100, torch.float32, "cpu")
    assert a.shape == (100,) and a.dtype == torch.float32
    b = scratch.buffer("t", 50, torch.bfloat16, "cpu")  # smaller: the same storage
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    c = scratch.buffer("t", 1000, torch.float32, "cpu")  # larger: grown
    assert c.numel() == 1000 and scratch.held_bytes() == 4000
    d = scratch.buffer("other", 10, torch.float64, "cpu", min_bytes=1 << 16)
    assert d.numel() == 10 and scratch.held_bytes() == 4000 + (1 << 16)
    assert d.untyped_storage().data_ptr() != c.untyped_storage().data_ptr()
    scratch.release()
    assert scratch.held_bytes() == 0


def test_each_thread_has_its_own():
    scratch.release()
    mine = scratch.buffer("t", 64, torch.float32, "cpu").untyped_storage().data_ptr()
    theirs = []
    th = threading.Thread(target=lambda: theirs.append(scratch.buffer("t", 64, torch.float32, "cpu")
                                                        .untyped_storage().data_ptr()))
    th.start()
    th.join()
    assert theirs and theirs[0] != mine
    scratch.release()


def test_bad_size():
    with pytest.raises(ValueError, match="expected numel >= 0, got -1"):
        scratch.buffer("t", -1, torch.float32, "cpu")
