"""The CPU Winograd F(4x4, 3x3) convolution (flamingo_rt.ops.winograd_conv) against a float64
``F.conv2d`` reference: sizes that are and are not multiples of the 4x4 tile, groups, every
tail (bias, activation, gamma), several chunkings of the tiles, our products and torch's
batched ones; the weight transform; its eligibility rules; and the frozen NFNet taking it
for its 3x3 stride-1 convs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.ops import winograd_conv as W
from conftest import count_calls, rel_err, small_nfnet, stride1_3x3_convs

pytestmark = pytest.mark.skipif(not W.enabled(), reason="needs the compiled extension (flamingo_rt._C)")

# F(4x4, 3x3) in float32: measured 1-2.5e-6 relative (norm) against float64, ~10x a direct conv
TOL_NORM = 1e-5
TOL_MAX = 5e-5

_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)


def _reference(x, w, b, groups, act, gamma):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1, groups=groups)
    if act != "none":
        y = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[act](y)
    return gamma * y


def _case(n, c, h, w, co, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(co, c // groups, 3, 3, generator=g) / (9 * c // groups) ** 0.5
    b = 0.3 * torch.randn(co, generator=g)
    return x, wt, b


def _check(y, want):
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y).all()
    err = rel_err(y, want)
    worst = ((y.double() - want).abs().max() / want.abs().max()).item()
    assert err < TOL_NORM and worst < TOL_MAX, (err, worst)


SHAPES = [
    # n, c_in, h, w, c_out, groups
    (2, 32, 9, 9, 64, 1),      # 3x3 tiles, the last row / column of tiles partial
    (1, 64, 4, 4, 32, 1),      # exactly one tile
    (3, 48, 1, 1, 48, 3),      # a 1x1 image: only the centre tap sees data
    (2, 64, 7, 13, 128, 2),    # h != w
    (1, 40, 6, 5, 24, 2),      # 20 -> 12 channels per group: the products' unvectorized path
    (2, 128, 14, 14, 128, 4),  # dm_nfnet-like grouped conv
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("products", ["auto", "ours", "blas"])
def test_matches_float64_conv(shape, products):
    n, c, h, w, co, groups = shape
    x, wt, b = _case(n, c, h, w, co, groups)
    u = W.winograd_weight(wt, groups)
    for chunk in (0, 1, 5):  # one chunk; one tile per chunk; a chunking that leaves a remainder
        y = W.conv3x3_winograd(x, u, b, groups, "gelu", chunk_tiles=chunk, products=products)
        _check(y, _reference(x, wt, b, groups, "gelu", 1.0))


@pytest.mark.parametrize("act", ["none", "gelu", "relu", "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tails(act, with_bias):
    x, wt, b = _case(2, 32, 10, 11, 48, 1, seed=1)
    b = b if with_bias else None
    y = W.conv3x3_winograd(x, W.winograd_weight(wt), b, 1, act, gamma=1.7)
    _check(y, _reference(x, wt, b, 1, act, 1.7))


def test_layouts_and_views_of_x():
    x, wt, b = _case(2, 32, 12, 12, 32, 1, seed=2)
    u = W.winograd_weight(wt)
    want = _reference(x, wt, b, 1, "none", 1.0)
    _check(W.conv3x3_winograd(x, u, b), want)  # NCHW: made channels-last first
    _check(W.conv3x3_winograd(x.contiguous(memory_format=torch.channels_last), u, b), want)
    big = torch.randn(2, 40, 14, 12).contiguous(memory_format=torch.channels_last)
    view = big[:, 4:36, 1:13]  # channels-last strides, not dense
    _check(W.conv3x3_winograd(view, u, b), _reference(view, wt, b, 1, "none", 1.0))


def test_result_does_not_depend_on_chunking():
    """Our products give the same bits whatever the tile chunking (each sum runs in one order)."""
    x, wt, b = _case(2, 64, 17, 9, 64, 2, seed=3)
    u = W.winograd_weight(wt, 2)
    base = W.conv3x3_winograd(x, u, b, 2, "silu", chunk_tiles=0, products="ours")
    for chunk in (1, 2, 7, 1000):
        assert torch.equal(W.conv3x3_winograd(x, u, b, 2, "silu", chunk_tiles=chunk, products="ours"), base)


def test_weight_transform_is_g_w_gt_rounded_once():
    _, wt, _ = _case(1, 24, 1, 1, 36, 3, seed=4)
    u = W.winograd_weight(wt, 3)
    assert u.shape == (36 * 3, 8, 12) and u.dtype == torch.float32
    # U[(a, b), g, ci, co] = (G w[g * 12 + co, ci] G^T)[a, b]
    full = torch.einsum("ak,ockl,bl->aboc", _G, wt.double(), _G)  # (6, 6, 36, 8)
    want = full.reshape(36, 3, 12, 8).transpose(-1, -2).reshape(36 * 3, 8, 12)
    # rounded once from float64 (sums in another order can round to the neighbouring float)
    torch.testing.assert_close(u, want.float(), rtol=2.5e-7, atol=1e-12)
    assert (u != want.float()).float().mean() < 0.01
    # transposed: the input gradient's weight (in / out swapped per group, kernels flipped)
    wt_t = wt.reshape(3, 12, 8, 3, 3).transpose(1, 2).flip(-2, -1).reshape(24, 12, 3, 3)
    assert torch.equal(W.winograd_weight(wt, 3, transposed=True), W.winograd_weight(wt_t, 3))


def test_errors_say_what_was_expected():
    x, wt, b = _case(1, 32, 8, 8, 32, 1)
    u = W.winograd_weight(wt)
    with pytest.raises(RuntimeError, match=r"expected u of shape \(72, 16, C_out/groups\)"):
        W.conv3x3_winograd(x, u, b, 2)
    with pytest.raises(RuntimeError, match="expected float32 x and u"):
        W.conv3x3_winograd(x.to(torch.bfloat16), u, b)
    with pytest.raises(RuntimeError, match=r"expected a float32 bias of shape \(32,\)"):
        W.conv3x3_winograd(x, u, b[:16])
    with pytest.raises(ValueError, match="expected act to be one of"):
        W.conv3x3_winograd(x, u, b, act="tanh")
    with pytest.raises(RuntimeError, match="expected products 'auto', 'ours' or 'blas'"):
        W.conv3x3_winograd(x, u, b, products="mkl")
    with pytest.raises(RuntimeError, match=r"expected a weight of shape \(C_out, C_in/groups, 3, 3\)"):
        W.winograd_weight(torch.randn(4, 4, 1, 1))
    with pytest.raises(TypeError, match="expected a float32 weight"):
        W.winograd_weight(wt.double())


def test_eligibility(monkeypatch):
    x = torch.randn(1, 64, 8, 8)
    w = torch.randn(64, 32, 3, 3)
    assert W.eligible(x, w, 1, 2)
    assert not W.eligible(x, w, 2, 2)                                      # strided
    assert not W.eligible(x, torch.randn(64, 64, 1, 1), 1, 1)              # 1x1
    assert not W.eligible(x.bfloat16(), w.bfloat16(), 1, 2)                # not float32
    assert not W.eligible(x, torch.randn(64, 16, 3, 3), 1, 4)              # 16 channels per group
    assert W.eligible(x.requires_grad_(), w.requires_grad_(), 1, 2)      # training: conv3x3
    x, w = x.detach(), w.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not W.eligible(x, w, 1, 2)
    with W.use(False):
        assert not W.eligible(x, w, 1, 2)
        with W.use(True):
            assert W.eligible(x, w, 1, 2)
    monkeypatch.setenv("FLAMINGO_RT_WINOGRAD", "0")
    assert not W.eligible(x, w, 1, 2)
    with W.use(True):
        assert W.eligible(x, w, 1, 2)
    monkeypatch.setenv("FLAMINGO_RT_WINOGRAD", "sometimes")
    with pytest.raises(ValueError, match="FLAMINGO_RT_WINOGRAD: expected auto, 1 or 0"):
        W.enabled()


def test_frozen_nfnet_uses_it_and_stays_close(monkeypatch):
    """A frozen NFNet with 32-channel groups runs its 3x3 stride-1 convs through the
    Winograd path (counted) and gives the direct convolution's features within float32
    Winograd rounding."""
    net = small_nfnet(32, 5, random_bias=True).eval()
    net.freeze()
    x = torch.randn(2, 3, 48, 40)
    calls = count_calls(monkeypatch, W, "conv3x3_winograd")
    with torch.no_grad():
        got = net.forward_features(x)
        assert len(calls) == len(stride1_3x3_convs(net, W.MIN_CHANNELS)) >= 4
        monkeypatch.setenv("FLAMINGO_RT_WINOGRAD", "0")
        calls.clear()
        direct = net.forward_features(x)
        assert not calls
    err = rel_err(got, direct)
    print(f"frozen NFNet, Winograd vs direct convolutions: rel err {err:.2e}")
    assert 0 < err < 2e-5


@pytest.mark.parametrize("shape", [(2, 32, 9, 9, 64, 1), (2, 64, 7, 13, 128, 2), (1, 40, 6, 5, 24, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv3x3_forward_and_gradients_match_float64(shape, with_bias):
    """The training function: output, input / weight / bias gradients against float64
    autograd through F.conv2d, for a non-contiguous upstream gradient."""
    n, c, h, w, co, groups = shape
    x, wt, b = _case(n, c, h, w, co, groups, seed=6)
    b = b if with_bias else None
    leaves = [x.requires_grad_(), wt.requires_grad_()] + ([b.requires_grad_()] if with_bias else [])
    y = W.conv3x3(x, wt, b, groups)
    dy = torch.randn(n, h, w, co).permute(0, 3, 1, 2)  # channels-last strides
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    yr = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, padding=1, groups=groups)
    want = torch.autograd.grad(yr, ref_leaves, dy.double())
    _check(y.detach(), yr.detach())
    for name, g, r in zip(("x", "w", "bias"), got, want):
        assert g.shape == r.shape and torch.isfinite(g).all(), name
        assert rel_err(g, r) < TOL_NORM, (name, rel_err(g, r))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_gradient_matches_float64(shape):
    """The weight gradient alone, over chunkings that make the tile sum run in one range,
    one tile a range, and ranges with a remainder: every one equal to the first (the sum's
    order is fixed) and close to float64."""
    n, c, h, w, co, groups = shape
    x, wt, _ = _case(n, c, h, w, co, groups, seed=9)
    dy = torch.randn(n, co, h, w)
    w64 = wt.double().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(x.double(), w64, padding=1, groups=groups), [w64], dy.double())
    first = W.conv3x3_weight_grad(x, dy, groups)
    assert first.shape == wt.shape and first.is_contiguous()
    assert rel_err(first, want) < TOL_NORM, rel_err(first, want)
    for chunk in (1, 5):
        assert torch.equal(W.conv3x3_weight_grad(x, dy, groups, chunk_tiles=chunk, products="ours"),
                           W.conv3x3_weight_grad(x, dy, groups, products="ours"))
        blas = W.conv3x3_weight_grad(x, dy, groups, chunk_tiles=chunk, products="blas")
        assert rel_err(blas, want) < TOL_NORM
    with pytest.raises(RuntimeError, match=r"expected dy of shape \(%d, C_out, %d, %d\)" % (n, h, w)):
        W.conv3x3_weight_grad(x, torch.randn(n, co, h + 1, w), groups)


def test_conv3x3_only_the_gradients_asked_for():
    x, wt, b = _case(1, 32, 8, 8, 32, 1, seed=7)
    y = W.conv3x3(x, wt.requires_grad_(), b, 1)  # x and bias need none
    (gw,) = torch.autograd.grad(y.sum(), [wt])
    w64 = wt.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(F.conv2d(x.double(), w64, padding=1).sum(), [w64])
    assert rel_err(gw, want) < TOL_NORM
    with pytest.raises(TypeError, match="expected float32 x and w"):
        W.conv3x3(x.double(), wt.double())


def test_nfnet_training_takes_it_and_matches_the_direct_gradients(monkeypatch):
    """An unfrozen NFNet with 32-channel groups: its 3x3 stride-1 convs run through conv3x3
    (counted) and every parameter gradient stays within Winograd rounding of the direct
    convolutions'."""
    net = small_nfnet(32, 8).train()
    x = torch.randn(2, 3, 40, 40)
    r = torch.randn_like(net.forward_features(x))
    calls = count_calls(monkeypatch, W, "conv3x3")

    def grads():
        net.zero_grad(set_to_none=True)
        (net.forward_features(x) * r).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    got = grads()
    assert len(calls) >= 4
    monkeypatch.setenv("FLAMINGO_RT_WINOGRAD", "0")
    calls.clear()
    want = grads()
    assert not calls and got.keys() == want.keys()
    errs = {n: rel_err(got[n], want[n]) for n in want}
    worst = max(errs, key=errs.get)
    print(f"NFNet training, Winograd vs direct: worst parameter gradient {worst} {errs[worst]:.2e}")
    assert errs[worst] < 1e-4


def test_flop_counter_counts_the_direct_convolution():
    """FlopCounterMode counts a Winograd convolution (forward, and each backward convolution)
    as the direct convolution it computes, as it counts F.conv2d's forward."""
    from torch.utils.flop_counter import FlopCounterMode

    x, wt, b = _case(2, 64, 8, 8, 96, 2)
    with FlopCounterMode(display=False) as ours:
        W.conv3x3_winograd(x, W.winograd_weight(wt, 2), b, 2)
    with FlopCounterMode(display=False) as direct:
        F.conv2d(x, wt, b, padding=1, groups=2)
    assert ours.get_total_flops() == direct.get_total_flops() == 2 * 2 * 64 * 96 * 32 * 9
    with FlopCounterMode(display=False) as train:
        W.conv3x3(x.requires_grad_(), wt.requires_grad_(), None, 2).sum().backward()
    assert train.get_total_flops() == 3 * direct.get_total_flops()  # forward, input and weight gradients
