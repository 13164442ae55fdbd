"""flamingo_rt::feed_forward (LN -> fc1 -> act -> fc2 saving only x and h) against the
FeedForward module: values, gradients, gradcheck in float64, autocast bf16, meta."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.models.ff import FeedForward
from flamingo_rt.ops import feed_forward
from flamingo_rt.ops.feed_forward import module_feed_forward
from conftest import rel_err


def _module(D, kind, dtype=torch.float32):
    ff = FeedForward(D, 4, kind).to(dtype)
    with torch.no_grad():
        ff.norm.weight.normal_(1, 0.3)
        ff.norm.bias.normal_(0, 0.2)
    return ff


def _op(ff, x):
    return feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, ff.norm.eps, ff.kind)


@pytest.mark.parametrize("kind", ["gelu", "sqrelu"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_matches_module_fp32(kind, x_grad):
    torch.manual_seed(0)
    ff = _module(48, kind)
    x = (torch.randn(3, 11, 48) * 2 + 0.3).requires_grad_(x_grad)
    y, want = _op(ff, x), ff(x)
    assert y.shape == want.shape and rel_err(y, want) < 1e-6
    go = torch.randn_like(want)
    leaves = ([x] if x_grad else []) + list(ff.parameters())
    for a, b in zip(torch.autograd.grad(y, leaves, go), torch.autograd.grad(want, leaves, go)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("kind", ["gelu", "sqrelu"])
def test_gradcheck_float64(kind):
    torch.manual_seed(1)
    ff = _module(6, kind, torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ps = [ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight]
    assert torch.autograd.gradcheck(lambda x, g, b, w1, w2: feed_forward(x, g, b, w1, w2, 1e-5, kind), (x, *ps))


def test_autocast_bf16_like_the_module():
    torch.manual_seed(2)
    ff = _module(64, "gelu")
    x = torch.randn(40, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = _op(ff, x), ff(x)
    truth = ff(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert rel_err(y, truth) <= 2 * rel_err(ref, truth) + 1e-3
    go = torch.randn_like(truth)
    leaves = [x, *ff.parameters()]
    got = torch.autograd.grad(y.float(), leaves, go)
    want = torch.autograd.grad(ref.float(), leaves, go)
    exact = torch.autograd.grad(truth, leaves, go)
    for a, b, e, leaf in zip(got, want, exact, leaves):
        assert a.dtype == leaf.dtype
        assert rel_err(a, e) <= 3 * rel_err(b, e) + 1e-3


def test_module_helper_uses_the_module_without_grad_and_meta_errors():
    ff = _module(16, "gelu")
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(module_feed_forward(ff, x), ff(x))
    y = feed_forward(torch.empty(4, 16, device="meta"), *(torch.empty(s, device="meta") for s in ((16,), (16,), (64, 16), (16, 64))))
    assert y.shape == (4, 16) and y.device.type == "meta"
    with pytest.raises(ValueError, match="unknown feed-forward kind"):
        feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, kind="relu")
    with pytest.raises(ValueError, match="expected gamma"):
        feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc1.weight)
