"""kernels/_host_math.py: the host-side cdiv / next_power_of_2 equal triton's own."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def test_host_math_matches_triton():
    from flamingo_rt.ops._kernel_modules import kernel_module

    hm = kernel_module("_host_math")
    for n in list(range(0, 600)) + [4095, 4096, 4097, (1 << 20) - 1, 1 << 20, (1 << 31) + 5]:
        assert hm.next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(0, 200):
        for b in range(1, 17):
            assert hm.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert hm.cdiv(1 << 40, 3) == triton.cdiv(1 << 40, 3)
