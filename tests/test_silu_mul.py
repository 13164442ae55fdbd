"""silu_mul (the SwiGLU product that keeps only its inputs) against its plain-torch
specification: bitwise in each dtype and under bf16 autocast, float64 gradcheck, and what it
keeps for the backward."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.ops.silu_mul import silu_mul, silu_mul_reference


def _run(fn, g0, u0, go, autocast=False):
    g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(g, u)
    return (y, *torch.autograd.grad(y, (g, u), go.to(y.dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bitwise_the_plain_expression(dtype):
    gen = torch.Generator().manual_seed(0)
    g0, u0 = (torch.randn(2, 37, 96, generator=gen) * 3).to(dtype), torch.randn(2, 37, 96, generator=gen).to(dtype)
    go = torch.randn(2, 37, 96, generator=gen)
    for a, b in zip(_run(silu_mul, g0, u0, go), _run(silu_mul_reference, g0, u0, go)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_bitwise_under_bf16_autocast_from_a_linear():
    gen = torch.Generator().manual_seed(1)
    x, wg, wu = torch.randn(40, 32, generator=gen), torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    go = torch.randn(40, 64, generator=gen)

    def run(fn):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(torch.nn.functional.linear(xx, wg), torch.nn.functional.linear(xx, wu))
        return y, torch.autograd.grad(y, xx, go.to(y.dtype))[0]

    (y, dx), (ya, dxa) = run(silu_mul), run(silu_mul_reference)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ya) and torch.equal(dx, dxa)


def test_gradcheck_and_keeps_only_its_inputs():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (g, u))
    y = silu_mul(g, u)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is g and saved[1] is u
    # one input without a gradient: only the other's is made
    dg, = torch.autograd.grad(silu_mul(g, u.detach()).sum(), g)
    assert torch.allclose(dg, torch.autograd.grad(silu_mul_reference(g, u.detach()).sum(), g)[0])
    with torch.no_grad():
        assert silu_mul(g, u).grad_fn is None
