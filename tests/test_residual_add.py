"""residual_add_ (flamingo_rt.ops.residual) and the in-place inference activations of
FeedForward: same values as the out-of-place expressions, bit for bit; in place exactly
when no gradient is taken and the branch output can hold the result."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.models.ff import FeedForward
from flamingo_rt.ops.residual import residual_add_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
def test_in_place_equals_expression(dtype, gated):
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 8, dtype=dtype), torch.randn(3, 5, 8, dtype=dtype)
    gate = torch.tensor(0.37, dtype=dtype) if gated else None
    want = torch.addcmul(x, gate, y) if gated else x + y
    ptr = y.data_ptr()
    with torch.no_grad():
        got = residual_add_(x, y, gate)
    assert got.data_ptr() == ptr  # written over y
    assert torch.equal(got, want)


def test_gate_one_is_plain_add():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    want = x + y
    assert torch.equal(residual_add_(x, y.clone(), 1), want)


@pytest.mark.parametrize("case", ["grad", "broadcast", "dtype", "overlap", "strided"])
def test_out_of_place_when_y_cannot_hold_the_result(case):
    torch.manual_seed(1)
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    if case == "grad":
        y.requires_grad_()
    elif case == "broadcast":
        y = torch.randn(1, 6)
    elif case == "dtype":
        y = y.bfloat16()  # fp32 + bf16 -> fp32
    elif case == "overlap":
        y = x[:, :]  # a view of x
    elif case == "strided":
        y = torch.randn(6, 4).t()
    y_before = y.detach().clone()
    want = x + y
    got = residual_add_(x, y)
    assert torch.equal(got, want) and got.dtype == want.dtype
    assert torch.equal(y.detach(), y_before)  # y untouched
    if case == "grad":
        got.sum().backward()
        assert torch.equal(y.grad, torch.ones_like(y))


def test_gradients_flow_through_the_gate():
    x = torch.randn(2, 3, requires_grad=True)
    y = torch.randn(2, 3, requires_grad=True)
    g = torch.tensor(0.5, requires_grad=True)
    residual_add_(x, y, g).sum().backward()
    assert torch.allclose(g.grad, y.detach().sum()) and torch.allclose(y.grad, torch.full_like(y, 0.5))


@pytest.mark.parametrize("kind", ["gelu", "sqrelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feed_forward_inference_activation_in_place_same_bits(kind, dtype, monkeypatch):
    """Unfused inference (the activation in place on fc1's fresh output) gives the module
    expression's bits; the fused oneDNN epilogue is tested in test_fused_linear."""
    from flamingo_rt.ops import fused_linear
    monkeypatch.setattr(fused_linear, "_path", lambda *a: None)
    torch.manual_seed(2)
    ff = FeedForward(16, 4, kind).to(dtype)
    x = torch.randn(3, 7, 16, dtype=dtype)
    h = ff.fc1(ff.norm(x))
    a = F.gelu(h) if kind == "gelu" else torch.relu(h).square()
    want = ff.fc2(a)
    with torch.no_grad():
        got = ff(x)
    assert torch.equal(got, want.detach())
    # with gradients the graph is the out-of-place one and trains
    xg = x.clone().requires_grad_()
    ff(xg).float().sum().backward()
    assert xg.grad is not None and ff.fc1.weight.grad is not None
