"""The CPU bfloat16 Winograd F(2x2, 3x3) convolution (flamingo_rt.ops.winograd_conv's
conv3x3_winograd_bf16) against float64 references: an exact emulation of its roundings (V and U
rounded once to bfloat16, float64 sums, the tail rounded once) and the direct convolution;
sizes that are and are not multiples of the 2x2 tile, groups, every tail, chunkings, both
product paths (AVX-512 BF16 where the CPU has it, the portable loop), layouts; the weight
transform; errors; the eligibility rules; and a frozen bfloat16 NFNet taking it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.ops import winograd_conv as W
from conftest import count_calls, rel_err, small_nfnet, stride1_3x3_convs

pytestmark = pytest.mark.skipif(
    not (W.enabled() and hasattr(torch.ops.flamingo_rt_C, "conv3x3_winograd_bf16")),
    reason="needs the compiled extension (flamingo_rt._C)")

_BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
_G = torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)
_ACT = {"none": lambda t: t, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def _u_exact(w: torch.Tensor) -> torch.Tensor:
    """G w G^T in float64: (C_out, C_in/groups, 4, 4)."""
    return torch.einsum("ik,ockl,jl->ocij", _G, w.double(), _G)


def _to_bf16(d: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest bfloat16 (ties to even), rounded once (``d.bfloat16()`` rounds
    to float32 first: twice): through float32 rounded to odd."""
    f = d.float()
    inexact = f.double() != d
    f = torch.where(inexact & (f.double().abs() > d.abs()), torch.nextafter(f, torch.zeros_like(f)), f)
    bits = f.view(torch.int32)
    f = torch.where(inexact, bits | 1, bits).view(torch.float32)
    return f.bfloat16()


def _emulated(x, w, b, groups, act, gamma):
    """The op's arithmetic: V = B^T d B (float32) and U = G w G^T (float64) rounded to bfloat16,
    the products and the output transform in float64, the tail rounded once to bfloat16."""
    n, c, h, wd = x.shape
    co = w.shape[0]
    th, tw = (h + 1) // 2, (wd + 1) // 2
    xp = F.pad(x.double(), (1, 2 * tw + 1 - wd, 1, 2 * th + 1 - h))
    tiles = xp.unfold(2, 4, 2).unfold(3, 4, 2)  # n c th tw 4 4
    # B^T d B in float32 as the op computes it, rows then columns: each entry is one float32
    # addition of two, so the roundings are the op's (not always exact: a tiny and a large input)
    bt = _BT.float()
    t = torch.einsum("ik,nchwkl->nchwil", bt, tiles.float())
    v = torch.einsum("nchwil,jl->nchwij", t, bt).bfloat16().double()
    u = _to_bf16(_u_exact(w)).double()
    v = v.view(n, groups, c // groups, th, tw, 4, 4)
    u = u.view(groups, co // groups, c // groups, 4, 4)
    m = torch.einsum("gocij,ngchwij->ngohwij", u, v).reshape(n, co, th, tw, 4, 4)
    y = torch.einsum("ik,nohwkl,jl->nohwij", _AT, m, _AT)
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, co, 2 * th, 2 * tw)[:, :, :h, :wd]
    if b is not None:
        y = y + b.double().view(1, -1, 1, 1)
    return (gamma * _ACT[act](y)).bfloat16().double()


def _direct(x, w, b, groups, act, gamma):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1, groups=groups)
    return gamma * _ACT[act](y)


def _case(n, c, h, w, co, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).bfloat16()
    wt = torch.randn(co, c // groups, 3, 3, generator=g) / (9 * c // groups) ** 0.5
    b = 0.3 * torch.randn(co, generator=g)
    return x, wt, b


def _check(y, x, wt, b, groups, act="none", gamma=1.0):
    n, _, h, w = x.shape
    assert y.dtype == torch.bfloat16 and y.shape == (n, wt.shape[0], h, w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y).all()
    emu = _emulated(x, wt, b, groups, act, gamma)
    # float32 sums in another order than float64's, then one bfloat16 rounding: at most one
    # bfloat16 ulp (2^-8 relative) apart, plus the float32 sums' error near zero
    scale = emu.abs().max().item()
    torch.testing.assert_close(y.double(), emu, rtol=2 ** -7, atol=1e-5 * scale)
    # and the convolution it approximates: measured 2-4e-3 (norm), direct bf16 convs 1.7-2.4e-3
    assert rel_err(y, _direct(x, wt, b, groups, act, gamma)) < 1.5e-2


SHAPES = [
    # n, c_in, h, w, c_out, groups
    (2, 32, 5, 7, 48, 1),      # odd sizes: the last row / column of tiles partial
    (1, 64, 2, 2, 32, 1),      # exactly one tile
    (3, 64, 1, 1, 64, 2),      # a 1x1 image: only the centre tap sees data
    (2, 68, 6, 9, 40, 2),      # 34 -> 20 channels per group: partial 16-channel chunks both ways
    (2, 256, 8, 8, 256, 2),    # dm_nfnet-like 128-channel groups
]
PRODUCTS = ["auto", "plain"]


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_emulation_and_the_direct_conv(shape, products):
    n, c, h, w, co, groups = shape
    x, wt, b = _case(n, c, h, w, co, groups)
    y = W.conv3x3_winograd_bf16(x, W.winograd_weight_bf16(wt, groups), b, groups, products=products)
    _check(y, x, wt, b, groups)


@pytest.mark.parametrize("act", ["none", "gelu", "relu", "silu"])
@pytest.mark.parametrize("bias", ["none", "float32", "bfloat16"])
def test_tails(act, bias):
    x, wt, b = _case(2, 64, 6, 5, 64, 2, seed=1)
    b = {"none": None, "float32": b, "bfloat16": b.bfloat16()}[bias]
    y = W.conv3x3_winograd_bf16(x, W.winograd_weight_bf16(wt, 2), b, 2, act, 1.7)
    _check(y, x, wt, None if b is None else b.float(), 2, act, 1.7)


def test_layouts_views_and_chunkings_give_the_same_result():
    """NCHW, channels-last and a strided view of x; any chunking of the tiles: bitwise the same
    (each product row sums in one fixed order); both product paths agree to float32 sums."""
    x, wt, b = _case(2, 64, 9, 11, 64, 1, seed=2)
    u = W.winograd_weight_bf16(wt, 1)
    want = W.conv3x3_winograd_bf16(x, u, b, 1, "gelu")
    assert x.is_contiguous()  # NCHW: made channels-last inside
    assert torch.equal(W.conv3x3_winograd_bf16(x.contiguous(memory_format=torch.channels_last), u, b, 1, "gelu"),
                       want)
    big = torch.zeros(2, 64, 13, 15, dtype=torch.bfloat16)
    big[:, :, 2:11, 3:14] = x
    assert torch.equal(W.conv3x3_winograd_bf16(big[:, :, 2:11, 3:14], u, b, 1, "gelu"), want)
    for chunk in (1, 7, 30, 1000):
        assert torch.equal(W.conv3x3_winograd_bf16(x, u, b, 1, "gelu", chunk_tiles=chunk), want)
    plain = W.conv3x3_winograd_bf16(x, u, b, 1, "gelu", products="plain")
    torch.testing.assert_close(plain.double(), want.double(), rtol=2 ** -7, atol=1e-3)


def test_default_chunks_nudged_off_4k_strides_give_the_same_result():
    """The binding's own chunk choice moves chunks whose transforms would put a tile's points a
    multiple of 4 KiB apart (dm_nfnet_f0's shapes: 7x7 with 6 groups of 128 channels is one
    64-tile range, split in two; 28x28 with 2 groups, 96 tiles -> 98 forward, 256 -> 258 for the
    weight gradient): the same convolution and gradient as one whole range."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, 768, 7, 7, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(768, 128, 3, 3, generator=g) * 0.05).bfloat16()
    u = W.winograd_weight_bf16(wt, 6)
    want = W.conv3x3_winograd_bf16(x, u, None, 6, "gelu", chunk_tiles=1000)
    assert torch.equal(W.conv3x3_winograd_bf16(x, u, None, 6, "gelu"), want)
    _check(want, x, wt, None, 6, "gelu", 1.0)
    x = torch.randn(4, 256, 28, 28, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 256, 28, 28, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(256, 128, 3, 3, generator=g) * 0.05).bfloat16()
    u = W.winograd_weight_bf16(wt, 2)
    assert torch.equal(W.conv3x3_winograd_bf16(x, u, None, 2), W.conv3x3_winograd_bf16(x, u, None, 2, chunk_tiles=1000))
    whole = W.conv3x3_weight_grad_bf16(x, dy, 2, chunk_tiles=10000)
    got = W.conv3x3_weight_grad_bf16(x, dy, 2)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    ref = torch.nn.grad.conv2d_weight(x.double(), wt.shape, dy.double(), padding=1, groups=2)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_weight_transform_is_g_w_gt_rounded_once():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 20, 3, 3, generator=g)
    u = W.winograd_weight_bf16(w, 2)
    assert u.shape == (16 * 2, 10, 24, 2) and u.dtype == torch.bfloat16
    exact = _u_exact(w).view(2, 24, 20, 16)  # g, o, c, point
    # the op's layout: [point * groups + g, c // 2, o, c % 2]
    got = u.view(16, 2, 10, 24, 2).permute(1, 3, 2, 4, 0).reshape(2, 24, 20, 16).double()
    # correctly rounded: within half a bfloat16 ulp, equal to the rounding of _to_bf16
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert ((got - exact).abs() <= 0.5 * ulp + 1e-30).all()
    assert torch.equal(got, _to_bf16(exact).double())
    # and _to_bf16 itself: a float64 just above a bfloat16 tie whose float32 rounding is the tie
    d = torch.tensor([1 + 2 ** -8 + 2 ** -30], dtype=torch.float64)
    assert d.bfloat16().item() == 1.0 and _to_bf16(d).item() == 1 + 2 ** -7
    # a bfloat16 weight gives the same transform as its float32 values
    assert torch.equal(W.winograd_weight_bf16(w.bfloat16(), 2),
                       W.winograd_weight_bf16(w.bfloat16().float(), 2))


def test_errors_say_what_was_expected():
    x, wt, b = _case(1, 64, 4, 4, 64, 1)
    u = W.winograd_weight_bf16(wt)
    with pytest.raises(RuntimeError, match="expected an even C_in/groups"):
        W.winograd_weight_bf16(torch.randn(64, 33, 3, 3))
    with pytest.raises(TypeError, match="expected a float32 or bfloat16 weight"):
        W.winograd_weight_bf16(wt.double())
    with pytest.raises(RuntimeError, match="expected bfloat16 x and u"):
        W.conv3x3_winograd_bf16(x.float(), u, b)
    with pytest.raises(RuntimeError, match=r"expected u of shape \(16, 32, C_out/groups, 2\)"):
        W.conv3x3_winograd_bf16(x, W.winograd_weight_bf16(torch.randn(64, 32, 3, 3), 2), b)
    with pytest.raises(RuntimeError, match="expected a float32 or bfloat16 bias of shape"):
        W.conv3x3_winograd_bf16(x, u, torch.randn(63))
    with pytest.raises(ValueError, match="expected act to be one of"):
        W.conv3x3_winograd_bf16(x, u, b, 1, "tanh")
    with pytest.raises(RuntimeError, match="expected products 'auto', 'ours' or 'plain'"):
        W.conv3x3_winograd_bf16(x, u, b, products="blas")


def test_eligibility(monkeypatch):
    x = torch.randn(1, 128, 8, 8).bfloat16()
    w = torch.randn(128, 64, 3, 3).bfloat16()
    with W.use(True):
        assert W.eligible_bf16(x, w, 1, 2)
        assert not W.eligible_bf16(x, w, 2, 2)                                  # strided
        assert not W.eligible_bf16(x.float(), w.float(), 1, 2)                  # float32: F(4x4, 3x3)
        assert not W.eligible_bf16(x, torch.randn(128, 32, 3, 3), 1, 4)         # 32 channels per group
        assert not W.eligible_bf16(x, torch.randn(128, 128, 1, 1), 1, 1)        # 1x1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not W.eligible_bf16(x, w, 1, 2)
        with W.use(False):
            assert not W.eligible_bf16(x, w, 1, 2)
    monkeypatch.setenv("FLAMINGO_RT_WINOGRAD", "0")
    assert not W.bf16_enabled()
    monkeypatch.setenv("FLAMINGO_RT_WINOGRAD", "1")
    assert W.bf16_enabled()
    monkeypatch.setenv("FLAMINGO_RT_WINOGRAD", "auto")
    cpp = torch.ops.flamingo_rt_C
    amx = hasattr(cpp, "cpu_amx_enabled") and cpp.cpu_amx_enabled()
    assert W.bf16_enabled() == (cpp.winograd_bf16_cpu_supported() and not amx)


def test_fake_shapes_and_flops():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    x, wt, b = _case(2, 64, 8, 8, 96, 2)
    u = W.winograd_weight_bf16(wt, 2)
    with FakeTensorMode() as mode:
        fx, fu = mode.from_tensor(x), mode.from_tensor(u)
        y = torch.ops.flamingo_rt_C.conv3x3_winograd_bf16(fx, fu, None, 2, "none", 1.0)
        assert y.shape == (2, 96, 8, 8) and y.dtype == torch.bfloat16
        assert torch.ops.flamingo_rt_C.conv3x3_winograd_bf16_weight(mode.from_tensor(wt), 2).shape == u.shape
    with FlopCounterMode(display=False) as ours:
        W.conv3x3_winograd_bf16(x, u, b, 2)
    assert ours.get_total_flops() == 2 * 2 * 64 * 96 * 32 * 9  # the direct convolution's


def test_frozen_bf16_nfnet_uses_it_and_stays_close(monkeypatch):
    """A frozen bfloat16 NFNet with 64-channel groups runs its eligible 3x3 stride-1 convs
    through the bfloat16 Winograd path (counted), within bfloat16 rounding of the float64
    features (as close as the direct bf16 convolutions' within 1.5x)."""
    net = small_nfnet(64, 6, random_bias=True).eval()
    x = torch.randn(2, 3, 32, 40)
    ref = copy.deepcopy(net).double()
    ref.freeze()
    with torch.no_grad():
        want = ref.forward_features(x.double())
    net.freeze()
    net = net.to(torch.bfloat16)
    calls = count_calls(monkeypatch, W, "conv3x3_winograd_bf16")
    with torch.no_grad(), W.use(True):
        got = net.forward_features(x.bfloat16())
    assert len(calls) == len(stride1_3x3_convs(net, W.MIN_CHANNELS_BF16)) >= 4
    calls.clear()
    with torch.no_grad(), W.use(False):
        direct = net.forward_features(x.bfloat16())
    assert not calls
    err, err_direct = rel_err(got, want), rel_err(direct, want)
    print(f"frozen bf16 NFNet vs float64: Winograd {err:.2e}, direct bf16 convolutions {err_direct:.2e}")
    assert err < max(1.5 * err_direct, 1e-2)


def _flip_transpose(w: torch.Tensor, groups: int) -> torch.Tensor:
    """The input gradient's weight: (C_in, C_out/groups, 3, 3), each group's in / out channels
    swapped and every kernel flipped."""
    co, cg = w.shape[0], w.shape[1]
    wg = w.view(groups, co // groups, cg, 3, 3).transpose(1, 2).flip(-1, -2)
    return wg.reshape(groups * cg, co // groups, 3, 3).contiguous()


def test_transposed_weight_transform_is_that_of_the_flipped_transposed_weight():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 18, 3, 3, generator=g)
    u = W.winograd_weight_bf16(w, 2, transposed=True)
    assert u.shape == (32, 16, 18, 2)
    assert torch.equal(u, W.winograd_weight_bf16(_flip_transpose(w, 2), 2))
    with pytest.raises(RuntimeError, match="expected an even C_out/groups"):
        W.winograd_weight_bf16(torch.randn(66, 18, 3, 3), 2, transposed=True)


@pytest.mark.parametrize("co,ci,groups", [(768, 128, 6), (200, 70, 1), (8, 4, 2), (4, 12, 2), (2, 2, 1), (96, 66, 3)])
def test_transpose_of_u_is_the_transposed_transform_bitwise(co, ci, groups):
    """The input gradient's weight made from u (points swapped, channels re-paired) equals
    transforming the flipped, transposed kernels again, bit for bit: several 32 x 32 blocks,
    ragged ones (70 inputs: 35 pairs), groups, float32 and bfloat16 weights."""
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(co, ci, 3, 3).to(dtype)
        u = W.winograd_weight_bf16(w, groups)
        ut = W.transpose_winograd_weight_bf16(u, groups)
        want = W.winograd_weight_bf16(w, groups, transposed=True)
        assert ut.shape == want.shape and torch.equal(ut.view(torch.int16), want.view(torch.int16))
        # and back: transposing twice is the identity
        assert torch.equal(W.transpose_winograd_weight_bf16(ut, groups).view(torch.int16), u.view(torch.int16))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fu = torch.empty(u.shape, dtype=torch.bfloat16)
        assert W.transpose_winograd_weight_bf16(fu, groups).shape == want.shape


def test_transpose_of_u_errors():
    u = W.winograd_weight_bf16(torch.randn(6, 4, 3, 3), 2)  # 3 outputs per group: odd
    with pytest.raises(RuntimeError, match="expected an even C_out/groups"):
        W.transpose_winograd_weight_bf16(u, 2)
    with pytest.raises(RuntimeError, match=r"expected a bfloat16 u of shape \(32, k_in/2, k_out, 2\)"):
        W.transpose_winograd_weight_bf16(torch.zeros(16, 2, 4, 2, dtype=torch.bfloat16), 2)
    with pytest.raises(RuntimeError, match="expected a bfloat16 u"):
        W.transpose_winograd_weight_bf16(torch.zeros(16, 2, 4, 2), 1)


@pytest.mark.parametrize("shape", [(2, 64, 6, 7, 128, 1), (2, 256, 8, 8, 256, 2), (1, 64, 1, 1, 64, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_conv3x3_bf16_forward_and_gradients(shape):
    """conv3x3_bf16 under bf16 autocast: output, input and weight gradients within bfloat16
    Winograd rounding of float64 (measured 4-5e-3, autocast's direct conv 2.8e-3), the bias
    gradient autocast's own (float32 sums)."""
    n, c, h, wd, co, groups = shape
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, c, h, wd, generator=g).requires_grad_()
    w = (torch.randn(co, c // groups, 3, 3, generator=g) / (9 * c // groups) ** 0.5).requires_grad_()
    b = (0.3 * torch.randn(co, generator=g)).requires_grad_()
    r = torch.randn(n, co, h, wd, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert W.eligible_bf16_autograd(x, w, groups) == W.bf16_enabled()
        y = W.conv3x3_bf16(x, w, b, groups)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    (y.float() * r).sum().backward()
    got = (y.detach(), x.grad, w.grad, b.grad)
    assert all(t.dtype == torch.float32 for t in got[1:])  # through autocast's casts, to the parameters' dtype
    xd, wdd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = F.conv2d(xd, wdd, bd, padding=1, groups=groups)
    (yd * r.double()).sum().backward()
    x.grad = w.grad = b.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = F.conv2d(x, w, b, padding=1, groups=groups)
    (ya.float() * r).sum().backward()
    assert rel_err(got[0], yd) < 1.5e-2 and rel_err(got[1], xd.grad) < 1.5e-2
    assert rel_err(got[2], wdd.grad) < 1.5e-2  # the Winograd weight gradient (measured 4e-3)
    torch.testing.assert_close(got[3], b.grad, rtol=1e-5, atol=1e-6)


def test_conv3x3_bf16_only_the_gradients_asked_for():
    x, wt, b = _case(1, 64, 5, 5, 64, 1)
    w = wt.bfloat16().requires_grad_()
    y = W.conv3x3_bf16(x, w, None, 1)
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16 and w.grad.shape == w.shape
    with pytest.raises(TypeError, match="expected a float32 or bfloat16 x"):
        W.conv3x3_bf16(x.double(), w)
    with pytest.raises(ValueError, match="expected a weight of shape"):
        W.conv3x3_bf16(x, w[..., :2])


def test_bf16_autograd_eligibility():
    x = torch.randn(1, 128, 8, 8)
    w = torch.randn(128, 64, 3, 3)
    with W.use(True):
        assert not W.eligible_bf16_autograd(x, w, 2)  # float32 without autocast: conv3x3 (F(4x4, 3x3))
        assert W.eligible_bf16_autograd(x.bfloat16(), w.bfloat16(), 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert W.eligible_bf16_autograd(x, w, 2)
            assert not W.eligible_bf16_autograd(x, torch.randn(128, 32, 3, 3), 4)   # 32 per group
            assert not W.eligible_bf16_autograd(x, torch.randn(128, 64, 1, 1), 2)   # 1x1
        with torch.autocast("cpu", dtype=torch.float16):
            assert not W.eligible_bf16_autograd(x, w, 2)
    with W.use(False), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not W.eligible_bf16_autograd(x, w, 2)


def test_nfnet_autocast_training_takes_it_and_stays_close(monkeypatch):
    """An unfrozen NFNet with 64-channel groups trained under bf16 autocast runs its eligible
    3x3 stride-1 convs through conv3x3_bf16 (counted); its parameter gradients stay within
    bf16 rounding of those of the direct (oneDNN) convolutions."""
    net = small_nfnet(64, 8).train()
    x = torch.randn(2, 3, 32, 32)
    calls = count_calls(monkeypatch, W, "conv3x3_bf16")

    def grads(on: bool, autocast: bool = True):
        net.zero_grad(set_to_none=True)
        with W.use(on), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = net.forward_features(x)
        # a loss whose gradients do not cancel (with random weights on the outputs the scalar
        # gains' gradients are sums that cancel to a few % of their terms, and both bf16 paths
        # land 15-40% off float32 there)
        y.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    ours = grads(True)
    assert len(calls) == len(stride1_3x3_convs(net, W.MIN_CHANNELS_BF16)) >= 4
    calls.clear()
    direct = grads(False)
    assert not calls and ours.keys() == direct.keys()
    want = grads(False, autocast=False)  # float32
    # against float32: the convolution weights' gradients (the changed ops compute them) as close
    # as autocast's direct convolutions leave them, within 1.5x (measured up to 1.16x), and the
    # median over all parameters within 1.3x (single small reductions behind a ReLU, such as a
    # squeeze-excite fc1's, swing either way: 0.19 vs 0.04 in one stage, 0.03 vs 0.06 in the next)
    ratios = []
    for n in ours:
        e_ours, e_direct = rel_err(ours[n], want[n]), rel_err(direct[n], want[n])
        ratios.append(e_ours / e_direct)
        if "conv" in n and n.endswith(".weight"):
            assert e_ours < 1.5 * e_direct + 5e-3, (n, e_ours, e_direct)
    ratios.sort()
    median = ratios[len(ratios) // 2]
    print(f"NFNet bf16 autocast training vs float32, gradients' error over the direct convolutions': "
          f"median {median:.2f}, worst {ratios[-1]:.2f}")
    assert median < 1.3


def _weight_grad_emulated(x, dy, groups):
    """The weight gradient's arithmetic: V = B^T d B and Yg = A dy A^T in float32 as the op
    computes them (each entry one float32 addition of two), rounded to bfloat16; the sum over
    tiles and G^T dU G in float64."""
    n, c, h, wd = x.shape
    co = dy.shape[1]
    th, tw = (h + 1) // 2, (wd + 1) // 2
    xp = F.pad(x.float(), (1, 2 * tw + 1 - wd, 1, 2 * th + 1 - h))
    tiles = xp.unfold(2, 4, 2).unfold(3, 4, 2)  # n c th tw 4 4
    bt = _BT.float()
    v = torch.einsum("nchwij,lj->nchwil", torch.einsum("ik,nchwkl->nchwil", bt, tiles), bt)
    dyp = F.pad(dy.float(), (0, 2 * tw - wd, 0, 2 * th - h))
    dtiles = dyp.unfold(2, 2, 2).unfold(3, 2, 2)  # n o th tw 2 2
    a = _AT.t().float()  # (4, 2)
    yg = torch.einsum("nohwil,jl->nohwij", torch.einsum("ik,nohwkl->nohwil", a, dtiles), a)
    v = v.bfloat16().double().view(n, groups, c // groups, th, tw, 4, 4)
    yg = yg.bfloat16().double().view(n, groups, co // groups, th, tw, 4, 4)
    du = torch.einsum("ngchwij,ngohwij->gocij", v, yg).reshape(co, c // groups, 4, 4)
    return torch.einsum("ik,ocij,jl->ockl", _G, du, _G)


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_grad_matches_emulation_and_float64(shape, products):
    n, c, h, w, co, groups = shape
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, c, h, w, generator=g).bfloat16()
    dy = torch.randn(n, co, h, w, generator=g).bfloat16()
    dw = W.conv3x3_weight_grad_bf16(x, dy, groups, products=products)
    assert dw.dtype == torch.float32 and dw.shape == (co, c // groups, 3, 3)
    emu = _weight_grad_emulated(x, dy, groups)
    # float32 sums over the tiles against float64's
    torch.testing.assert_close(dw.double(), emu, rtol=1e-4, atol=1e-5 * emu.abs().max().item())
    xd = x.double()
    wd = torch.zeros(co, c // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    (F.conv2d(xd, wd, None, padding=1, groups=groups) * dy.double()).sum().backward()
    assert rel_err(dw, wd.grad) < 1.5e-2  # measured 3.8-4.1e-3 (bf16 V and Yg), 0 for a 1x1 image
    # a bfloat16 weight's gradient, written so by the kernel: the float32 result's bits rounded
    dw16 = W.conv3x3_weight_grad_bf16(x, dy, groups, products=products, out_dtype=torch.bfloat16)
    assert dw16.dtype == torch.bfloat16 and dw16.shape == dw.shape and dw16.is_contiguous()
    assert torch.equal(dw16.view(torch.int16), dw.to(torch.bfloat16).view(torch.int16))


def test_weight_grad_chunkings_and_layouts():
    """Chunks of any size (made even: the products take tiles in pairs; an odd range's last pair
    padded with zeros) and any layout of x and dy give the same gradient up to float32 sums."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 64, 7, 9, generator=g).bfloat16()
    dy = torch.randn(3, 48, 7, 9, generator=g).bfloat16()
    want = W.conv3x3_weight_grad_bf16(x, dy, 1, chunk_tiles=1000)
    for chunk in (1, 3, 8, 25):
        got = W.conv3x3_weight_grad_bf16(x, dy, 1, chunk_tiles=chunk)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    big = torch.zeros(3, 48, 7, 12, dtype=torch.bfloat16)
    big[..., 1:10] = dy  # a strided view of dy
    got = W.conv3x3_weight_grad_bf16(x.contiguous(memory_format=torch.channels_last), big[..., 1:10], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_weight_grad_errors_fake_and_flops():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 64, 4, 4).bfloat16()
    dy = torch.randn(1, 32, 4, 4).bfloat16()
    with pytest.raises(RuntimeError, match="expected bfloat16 x and dy"):
        W.conv3x3_weight_grad_bf16(x.float(), dy)
    with pytest.raises(RuntimeError, match=r"expected dy of shape \(1, C_out, 4, 4\)"):
        W.conv3x3_weight_grad_bf16(x, dy[..., :3])
    with pytest.raises(RuntimeError, match="expected an even C_in/groups"):
        W.conv3x3_weight_grad_bf16(torch.randn(1, 66, 4, 4).bfloat16(), dy, 2)
    with pytest.raises(RuntimeError, match="expected products 'auto', 'ours' or 'plain'"):
        W.conv3x3_weight_grad_bf16(x, dy, products="blas")
    with pytest.raises(TypeError, match="expected out_dtype float32 or bfloat16, got torch.float16"):
        W.conv3x3_weight_grad_bf16(x, dy, out_dtype=torch.float16)
    with FakeTensorMode() as mode:
        out = torch.ops.flamingo_rt_C.conv3x3_winograd_bf16_weight_grad(mode.from_tensor(x), mode.from_tensor(dy), 2)
        assert out.shape == (32, 32, 3, 3) and out.dtype == torch.float32
        out = torch.ops.flamingo_rt_C.conv3x3_winograd_bf16_weight_grad(mode.from_tensor(x), mode.from_tensor(dy), 2,
                                                                        bf16_out=True)
        assert out.shape == (32, 32, 3, 3) and out.dtype == torch.bfloat16
    with FlopCounterMode(display=False) as fc:
        W.conv3x3_weight_grad_bf16(x, dy, 2)
    assert fc.get_total_flops() == 2 * 16 * 64 * 32 * 9 // 2
