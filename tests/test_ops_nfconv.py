"""NFNet ops (flamingo_rt::ws_standardize, bias_gamma_act, se_residual) and ws_conv2d:
references vs direct formulas and timm, gradcheck of every explicit backward, opcheck,
every CPU-runnable backend vs the reference, torch.compile."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from flamingo_rt.ops import backend as B
from flamingo_rt.ops import bias_gamma_act, se_residual, ws_conv2d, ws_standardize
from flamingo_rt.ops import nfconv
from flamingo_rt.ops.reference import nfnet as ref
from conftest import every_other_row, rel_err

timm_layers = pytest.importorskip("timm.layers")

F64 = torch.float64
GELU_GAMMA = 1.7015043497085571


def _cpu_backends(op: str):
    """Backends of ``op`` that can run on CPU in this process (reference always)."""
    return [b for b in B.implemented(op) if B._device_ok(b, torch.device("cpu"))]


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _poison(shape, dtype):
    """Allocate and free NaN-filled memory of this size so a kernel that leaves elements
    unwritten in a reused block shows NaN."""
    t = torch.full(shape, float("nan"), dtype=dtype)
    del t


# ------------------------------------------------------------------ references vs formulas / timm


class _CaptureConvWeight(TorchFunctionMode):
    """Records the weight argument of every conv2d call (timm's standardized weight)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            self.weights.append(args[1].detach().clone())
        return func(*args, **kwargs)


def _timm_conv(cin, cout, k, stride, groups, eps=1e-5):
    conv = timm_layers.ScaledStdConv2dSame(cin, cout, k, stride=stride, groups=groups, eps=eps)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight) * 0.3 + 0.05)
        conv.gain.copy_(1.0 + 0.3 * torch.randn_like(conv.gain))
        conv.bias.copy_(0.1 * torch.randn_like(conv.bias))
    return conv


@pytest.mark.parametrize("cin,cout,k,groups", [(3, 16, 3, 1), (16, 16, 3, 2), (24, 8, 1, 1)])
def test_ws_reference_matches_timm_weight(cin, cout, k, groups):
    conv = _timm_conv(cin, cout, k, 1, groups, eps=1e-5)
    cap = _CaptureConvWeight()
    with torch.no_grad(), cap:
        conv(torch.randn(1, cin, 7, 7))
    assert len(cap.weights) == 1
    timm_w = cap.weights[0]
    ours = ref.ws_standardize(conv.weight.detach(), conv.gain.detach(), 1e-5)
    assert ours.shape == timm_w.shape and ours.dtype == timm_w.dtype
    assert rel_err(ours, timm_w) < 1e-6
    # and in float64 against the formula written out
    w64, g64 = conv.weight.detach().double(), conv.gain.detach().double()
    flat = w64.reshape(cout, -1)
    fan_in = flat.shape[1]
    formula = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    formula = (formula * g64.reshape(cout, 1) / math.sqrt(fan_in)).reshape(w64.shape)
    assert rel_err(ref.ws_standardize(w64, g64, 1e-5), formula) < 1e-13


@pytest.mark.parametrize("k,stride,groups,size", [(3, 2, 1, (16, 16)), (3, 2, 2, (15, 17)), (3, 1, 2, (9, 10)), (1, 1, 1, (5, 6))])
def test_ws_conv2d_matches_timm_conv(k, stride, groups, size):
    conv = _timm_conv(8, 12, k, stride, groups)
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        want = conv(x)
        got = ws_conv2d(x, conv.weight, conv.gain, conv.bias, stride, groups, 1e-5, "same", backend="reference")
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-6


def test_bias_gamma_act_reference_matches_formula():
    x = _rand(2, 5, 4, 3, dtype=F64)
    b = _rand(5, dtype=F64)
    z = x + b[None, :, None, None]
    want = {
        "gelu": 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
        "relu": torch.clamp(z, min=0),
        "silu": z / (1 + torch.exp(-z)),
    }
    for act, w in want.items():
        assert rel_err(ref.bias_gamma_act(x, b, act, 1.3), 1.3 * w) < 1e-14
    assert rel_err(ref.bias_gamma_act(x, None, "gelu", GELU_GAMMA), GELU_GAMMA * F.gelu(x)) < 1e-14
    # float32 / bfloat16 inputs keep their dtype, computed in float32
    for dt in (torch.float32, torch.bfloat16):
        y = ref.bias_gamma_act(x.to(dt), b.to(dt), "gelu", 2.0)
        assert y.dtype == dt
        assert rel_err(y, 2.0 * want["gelu"]) < (1e-6 if dt == torch.float32 else 1e-2)


def test_se_residual_reference_matches_timm_block_tail():
    """timm's NormFreeBlock tail: attn_gain * SE(x), times skipinit gain, times alpha, + shortcut."""
    C = 16
    se = timm_layers.SEModule(C, rd_ratio=0.5, rd_divisor=8)
    with torch.no_grad():
        for p in se.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    x, shortcut = torch.randn(2, C, 5, 4), torch.randn(2, C, 5, 4)
    alpha, attn_gain, skip = 0.2, 2.0, torch.tensor(0.7)
    with torch.no_grad():
        want = (attn_gain * se(x)) * skip * alpha + shortcut
        pooled = x.mean((2, 3))
        logits = F.linear(F.relu(F.linear(pooled, se.fc1.weight.flatten(1), se.fc1.bias)), se.fc2.weight.flatten(1), se.fc2.bias)
        got = ref.se_residual(x, logits, shortcut, skip * (alpha * attn_gain))
    assert rel_err(got, want) < 1e-6
    # float64 formula
    x64, s64, g64 = x.double(), shortcut.double(), logits.double()
    scale = torch.tensor(0.37, dtype=F64)
    formula = s64 + scale * x64 / (1 + torch.exp(-g64))[:, :, None, None]
    assert rel_err(ref.se_residual(x64, g64, s64, scale), formula) < 1e-14


# ------------------------------------------------------------------ gradcheck of every backward


def _gradcheck_backends(op: str):
    """reference, and the C++ backend when built (float64 kernels)."""
    return [b for b in ("reference", "cpu") if b in B.implemented(op)]


@pytest.mark.parametrize("backend", _gradcheck_backends("ws_standardize"))
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (6, 2, 1, 1)])
def test_ws_standardize_gradcheck(shape, backend):
    w = _rand(*shape, dtype=F64, requires_grad=True)
    g = (1 + 0.3 * torch.randn(shape[0], 1, 1, 1, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, g: ws_standardize(w, g, 1e-3, backend=backend), (w, g))


@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bias_gamma_act_gradcheck(act, with_bias, channels_last):
    x = _rand(2, 3, 4, 5, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    inputs = (x, _rand(3, dtype=F64, requires_grad=True)) if with_bias else (x,)

    def f(x, b=None):
        return bias_gamma_act(x, b, act, 1.7, backend="reference")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", _gradcheck_backends("se_residual"))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_se_residual_gradcheck(scale_shape, channels_last, backend):
    x = _rand(2, 3, 4, 5, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = _rand(2, 3, dtype=F64, requires_grad=True)
    s = _rand(2, 3, 4, 5, dtype=F64, requires_grad=True)
    scale = (0.5 + torch.rand(scale_shape, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, g, s, c: se_residual(x, g, s, c, backend=backend), (x, g, s, scale)
    )


def test_ws_conv2d_gradcheck_same_padding():
    x = _rand(1, 4, 7, 6, dtype=F64, requires_grad=True)
    w = _rand(6, 2, 3, 3, dtype=F64, requires_grad=True)
    g = (1 + 0.2 * torch.randn(6, 1, 1, 1, dtype=F64)).requires_grad_()
    b = _rand(6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, g, b: ws_conv2d(x, w, g, b, 2, 2, 1e-4, backend="reference"), (x, w, g, b)
    )


# ------------------------------------------------------------------ opcheck


def test_opcheck_ws_standardize():
    w, g = _rand(5, 3, 3, 3, requires_grad=True), (1 + 0.1 * torch.randn(5, 1, 1, 1)).requires_grad_()
    torch.library.opcheck(nfconv._ws_op, (w, g, 1e-5, "reference"))
    torch.library.opcheck(nfconv._ws_bwd_op, (torch.randn(5, 3, 3, 3), w.detach(), g.detach(), 1e-5, "reference"))
    wc = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()  # layout kept
    torch.library.opcheck(nfconv._ws_op, (wc, g, 1e-5, "reference"))
    torch.library.opcheck(nfconv._ws_bwd_op, (torch.randn(5, 3, 3, 3), wc.detach(), g.detach(), 1e-5, "reference"))


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_bias_gamma_act(with_bias):
    x = _rand(2, 4, 3, 3, requires_grad=True)
    b = _rand(4, requires_grad=True) if with_bias else None
    torch.library.opcheck(nfconv._bga_op, (x, b, "gelu", GELU_GAMMA, "reference"))
    torch.library.opcheck(
        nfconv._bga_bwd_op,
        (torch.randn(2, 4, 3, 3), x.detach(), None if b is None else b.detach(), "silu", 1.5, "reference"),
    )


def test_opcheck_se_residual():
    x, g, s = _rand(2, 4, 3, 3, requires_grad=True), _rand(2, 4, requires_grad=True), _rand(2, 4, 3, 3, requires_grad=True)
    c = torch.tensor(0.4, requires_grad=True)
    torch.library.opcheck(nfconv._se_op, (x, g, s, c, "reference"))
    torch.library.opcheck(nfconv._se_bwd_op, (torch.randn(2, 4, 3, 3), x.detach(), g.detach(), s.detach(), c.detach(), "reference"))


# ------------------------------------------------------------------ every CPU backend vs reference


@pytest.mark.parametrize("be", _cpu_backends("bias_gamma_act"))
@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
def test_bias_gamma_act_backends(be, act):
    x = _rand(2, 6, 5, 7).to(memory_format=torch.channels_last).requires_grad_()
    b = _rand(6, requires_grad=True)
    go = torch.randn(2, 6, 5, 7)
    _poison((2, 6, 5, 7), torch.float32)
    y = bias_gamma_act(x, b, act, GELU_GAMMA, backend=be)
    dx, db = torch.autograd.grad(y, (x, b), go)
    x64, b64 = x.detach().double(), b.detach().double()
    y64 = ref.bias_gamma_act(x64, b64, act, GELU_GAMMA)
    dx64, db64 = ref.bias_gamma_act_backward(go.double(), x64, b64, act, GELU_GAMMA)
    for got, want in ((y, y64), (dx, dx64), (db, db64)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-5
    assert y.data_ptr() != x.data_ptr()


def _layout(t, layout):
    """NCHW, channels-last, or a non-contiguous view: every other column of a wider tensor
    ("strided"), or every other row of a taller one, NCHW ("rows_strided": W runs dense,
    H*W planes not) or channels-last ("cl_rows_strided": pixels C apart within a row, rows
    not W*C apart)."""
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.randn(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        v = wide[..., ::2]
    elif layout in ("rows_strided", "cl_rows_strided"):
        return every_other_row(t, channels_last=layout == "cl_rows_strided")
    else:
        return t
    v.copy_(t)
    return v


@pytest.mark.parametrize("be", _cpu_backends("se_residual"))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "rows_strided", "cl_rows_strided"])
def test_se_residual_backends(be, layout):
    # x sets the output's layout (dense, in x's memory format); the shortcut's may differ:
    # "cl_rows_strided" pairs a dense channels-last x with a row-strided shortcut, the one
    # mix whose operands all pass the channels-last checks but the shortcut's row stride
    x_layout = "channels_last" if layout == "cl_rows_strided" else layout
    x = _layout(torch.randn(2, 70, 5, 7), x_layout).requires_grad_()
    s = _layout(torch.randn(2, 70, 5, 7), "nchw" if layout == "strided" else layout).requires_grad_()
    g, c = _rand(2, 70, requires_grad=True), torch.tensor(0.6, requires_grad=True)
    go = torch.randn(2, 70, 5, 7)
    _poison((2, 70, 5, 7), torch.float32)
    y = se_residual(x, g, s, c, backend=be)
    grads = torch.autograd.grad(y, (x, g, s, c), go)
    args64 = [t.detach().double() for t in (x, g, s, c)]
    y64 = ref.se_residual(*args64)
    dx, dg, dc = ref.se_residual_backward(go.double(), *args64)
    for got, want in zip((y,) + grads, (y64, dx, dg, go.double(), dc)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-5
    assert y.data_ptr() not in (x.data_ptr(), s.data_ptr())


@pytest.mark.parametrize("be", _cpu_backends("se_residual"))
def test_se_residual_backends_bfloat16(be):
    """bf16: error at most ~2x the plain-torch bf16 reference's own error (vs float64)."""
    x, s = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    g, c = torch.randn(2, 16), torch.tensor(0.8)
    args = [t.bfloat16() for t in (x, g, s, c)]
    go = torch.randn(2, 16, 6, 6).bfloat16()
    a64 = [t.double() for t in args]
    want = ref.se_residual(*a64)
    got = se_residual(*args, backend=be)
    base = rel_err(ref.se_residual(*args), want)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 2 * base + 1e-3
    wants = ref.se_residual_backward(go.double(), *a64)
    gots = nfconv._backend.get("se_residual.backward", be)(go, *args)
    bases = ref.se_residual_backward(go, *args)
    for gt, wt, bs in zip(gots, wants, bases):
        assert gt.dtype == torch.bfloat16 and rel_err(gt, wt) <= 3 * rel_err(bs, wt) + 1e-2


@pytest.mark.parametrize("be", _cpu_backends("ws_standardize"))
# (65, 64, 3, 3): rows split over threads with a remainder (65 x 576 elements: parallel)
@pytest.mark.parametrize("shape", [(12, 8, 3, 3), (48, 1, 3, 3), (16, 600, 1, 1), (65, 64, 3, 3)])
def test_ws_standardize_backends_shapes(be, shape):
    w, g = _rand(*shape) * 0.3 + 0.1, 1 + 0.2 * torch.randn(shape[0], 1, 1, 1)
    go = torch.randn(*shape)
    _poison(shape, torch.float32)
    w64, g64 = w.double(), g.double()
    got = ws_standardize(w, g, 1e-5, backend=be)
    assert rel_err(got, ref.ws_standardize(w64, g64, 1e-5)) < 1e-6
    dw, dg = nfconv._backend.get("ws_standardize.backward", be)(go, w, g, 1e-5)
    dw64, dg64 = ref.ws_standardize_backward(go.double(), w64, g64, 1e-5)
    assert rel_err(dw, dw64) < 1e-5 and rel_err(dg, dg64) < 1e-5
    # bfloat16: the kernel's error is at most ~2x the bf16 reference's
    wb, gb = w.bfloat16(), g.bfloat16()
    want = ref.ws_standardize(wb.double(), gb.double(), 1e-5)
    assert rel_err(ws_standardize(wb, gb, 1e-5, backend=be), want) <= 2 * rel_err(ref.ws_standardize(wb, gb, 1e-5), want) + 1e-3


@pytest.mark.parametrize("be", _cpu_backends("ws_standardize"))
def test_ws_standardize_backends(be):
    w, g = _rand(12, 8, 3, 3, requires_grad=True), (1 + 0.2 * torch.randn(12, 1, 1, 1)).requires_grad_()
    go = torch.randn(12, 8, 3, 3)
    _poison((12, 8, 3, 3), torch.float32)
    y = ws_standardize(w, g, 1e-5, backend=be)
    dw, dg = torch.autograd.grad(y, (w, g), go)
    w64, g64 = w.detach().double(), g.detach().double()
    dw64, dg64 = ref.ws_standardize_backward(go.double(), w64, g64, 1e-5)
    for got, want in ((y, ref.ws_standardize(w64, g64, 1e-5)), (dw, dw64), (dg, dg64)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-5
    assert dg.shape == g.shape


@pytest.mark.parametrize("be", _cpu_backends("ws_standardize"))
def test_ws_standardize_keeps_channels_last_weights(be):
    """A channels-last weight is standardized (and its gradient computed) in its own layout:
    same values as the contiguous weight's, outputs channels-last, no layout mix-ups
    between grad_out and the weight (grad_out given contiguous, weight channels-last)."""
    shape = (12, 8, 3, 3)
    w0, g0 = _rand(*shape) * 0.3 + 0.1, 1 + 0.2 * torch.randn(shape[0], 1, 1, 1)
    w = w0.contiguous(memory_format=torch.channels_last).requires_grad_()
    g = g0.clone().requires_grad_()
    go = torch.randn(*shape)
    _poison(shape, torch.float32)
    y = ws_standardize(w, g, 1e-5, backend=be)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    dw, dg = torch.autograd.grad(y, (w, g), go)
    assert dw.is_contiguous(memory_format=torch.channels_last)
    w64, g64 = w0.double(), g0.double()
    dw64, dg64 = ref.ws_standardize_backward(go.double(), w64, g64, 1e-5)
    for got, want in ((y, ref.ws_standardize(w64, g64, 1e-5)), (dw, dw64), (dg, dg64)):
        assert rel_err(got, want) < 1e-5
    # the backend kernel on its own, grad_out in the other layout than the weight
    dwk, dgk = nfconv._backend.get("ws_standardize.backward", be)(go, w.detach(), g0, 1e-5)
    assert rel_err(dwk, dw64) < 1e-5 and rel_err(dgk, dg64) < 1e-5
    yk = nfconv._backend.get("ws_standardize", be)(w.detach(), g0, 1e-5)
    if be != "reference":  # the kernels keep the layout themselves (the op wrapper ensures it for all)
        assert yk.is_contiguous(memory_format=torch.channels_last) and dwk.is_contiguous(memory_format=torch.channels_last)


def test_ws_conv2d_channels_last_input_standardizes_channels_last():
    """ws_conv2d on channels-last activations: the weight is reordered once in the graph (its
    gradient comes back in the parameter's own layout), the result equals the NCHW conv's."""
    x = _rand(2, 8, 9, 9)
    w = _rand(12, 4, 3, 3, requires_grad=True)
    g = (1 + 0.1 * torch.randn(12, 1, 1, 1)).requires_grad_()
    seen = []
    real = nfconv.ws_standardize

    def spy(weight, *a, **k):
        seen.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
        return real(weight, *a, **k)

    want = ws_conv2d(x, w, g, None, 2, 2)
    dw_want, dg_want = torch.autograd.grad(want.square().sum(), (w, g))
    nfconv.ws_standardize = spy
    try:
        got = ws_conv2d(x.contiguous(memory_format=torch.channels_last), w, g, None, 2, 2)
    finally:
        nfconv.ws_standardize = real
    assert seen == [True]
    assert got.is_contiguous(memory_format=torch.channels_last)
    dw, dg = torch.autograd.grad(got.square().sum(), (w, g))
    assert rel_err(got, want) < 1e-5 and rel_err(dw, dw_want) < 1e-5 and rel_err(dg, dg_want) < 1e-5
    assert dw.shape == w.shape


def test_ws_conv2d_channels_last_1x1_weight_gets_channels_last_strides(monkeypatch):
    """A 1x1 weight is both layouts at once; for channels-last x the conv gets it with
    channels-last strides (a view), and values and gradients are the NCHW conv's."""
    x = _rand(2, 8, 5, 6)
    w = _rand(12, 8, 1, 1, requires_grad=True)
    g = (1 + 0.1 * torch.randn(12, 1, 1, 1)).requires_grad_()
    want = ws_conv2d(x, w, g, None, 1, 1)
    dw_want, dg_want = torch.autograd.grad(want.square().sum(), (w, g))
    strides = []
    real = F.conv2d

    def spy(inp, weight, *a, **k):
        strides.append(weight.stride())
        return real(inp, weight, *a, **k)

    monkeypatch.setattr(F, "conv2d", spy)
    monkeypatch.setattr(nfconv, "CONV1X1_MM_MAX_ROWS_FP32", 0)  # the convolution, not the product
    got = ws_conv2d(x.contiguous(memory_format=torch.channels_last), w, g, None, 1, 1)
    monkeypatch.setattr(F, "conv2d", real)
    assert strides == [(8, 1, 8, 8)]
    dw, dg = torch.autograd.grad(got.square().sum(), (w, g))
    assert rel_err(got, want) < 1e-5 and rel_err(dw, dw_want) < 1e-5 and rel_err(dg, dg_want) < 1e-5
    assert dw.shape == w.shape


@pytest.fixture
def conv2d_calls(monkeypatch):
    """Counts F.conv2d calls (a 1x1 conv that runs as a matrix product makes none)."""
    calls = []
    real = F.conv2d

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "conv2d", spy)
    return calls


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16-autocast"])
def test_ws_conv2d_1x1_channels_last_runs_as_matrix_product(conv2d_calls, with_bias, dtype):
    """A stride-1 1x1 conv of channels-last x runs as one product over x's (N*H*W, C) rows
    (no F.conv2d call): output channels-last, values and every gradient (x, weight, gain,
    bias) those of the NCHW convolution; under bf16 autocast a bf16 output within bf16
    rounding of the float32 convolution."""
    x = _rand(2, 24, 5, 6, requires_grad=True)
    w = _rand(40, 24, 1, 1, requires_grad=True)
    g = (1 + 0.1 * torch.randn(40, 1, 1, 1)).requires_grad_()
    b = _rand(40, requires_grad=True) if with_bias else None
    params = [x, w, g] + ([b] if with_bias else [])
    r = torch.randn(2, 40, 5, 6)
    want = ws_conv2d(x, w, g, b, 1, 1)  # NCHW x: the convolution
    grads_want = torch.autograd.grad((want * r).sum(), params)
    conv2d_calls.clear()
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32"):
        got = ws_conv2d(xc, w, g, b, 1, 1)
    assert conv2d_calls == []
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
    assert got.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
    grads = torch.autograd.grad((got.float() * r).sum(), [xc] + params[1:])
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert rel_err(got.float(), want) < tol
    for a, e in zip(grads, grads_want):
        assert a.shape == e.shape and rel_err(a, e) < tol
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_ws_conv2d_1x1_product_rule(monkeypatch, conv2d_calls):
    """Which 1x1 convs take the product: float32 up to CONV1X1_MM_MAX_ROWS_FP32 output
    pixels, bf16 at any size; strided, grouped, padded or NCHW ones stay convolutions."""
    cl = torch.channels_last
    w = torch.randn(8, 4, 1, 1)
    small = torch.randn(2, 4, 8, 8).contiguous(memory_format=cl)  # 128 rows
    assert nfconv._conv1x1_as_mm(small, w)
    assert not nfconv._conv1x1_as_mm(small.contiguous(), w)  # NCHW
    assert not nfconv._conv1x1_as_mm(small, torch.randn(8, 4, 3, 3))
    monkeypatch.setattr(nfconv, "CONV1X1_MM_MAX_ROWS_FP32", 127)
    assert not nfconv._conv1x1_as_mm(small, w)
    assert nfconv._conv1x1_as_mm(small.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nfconv._conv1x1_as_mm(small, w)
    ws_conv2d(small, torch.randn(8, 4, 1, 1), torch.ones(8, 1, 1, 1), None, 2, 1)  # stride 2
    ws_conv2d(small, torch.randn(8, 2, 1, 1), torch.ones(8, 1, 1, 1), None, 1, 2)  # groups
    assert conv2d_calls == [1, 1]


def test_ws_conv2d_1x1_product_compiles_fullgraph():
    """The product path traces (full graph, autograd) and matches eager."""
    torch._dynamo.reset()
    x = _rand(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    w, g = _rand(12, 8, 1, 1, requires_grad=True), (1 + 0.1 * torch.randn(12, 1, 1, 1)).requires_grad_()

    def f(x, w, g):
        return ws_conv2d(x, w, g, None, 1, 1)

    want = f(x, w, g)
    got = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")(x, w, g)
    assert rel_err(got, want) < 1e-6
    for a, e in zip(torch.autograd.grad(got.square().sum(), (w, g)), torch.autograd.grad(want.square().sum(), (w, g))):
        assert rel_err(a, e) < 1e-5


def test_bias_none_gives_no_bias_grad():
    x = _rand(1, 3, 2, 2, requires_grad=True)
    y = bias_gamma_act(x, None, "relu", 1.0)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    assert dx.shape == x.shape


# ------------------------------------------------------------------ errors, compile


def test_input_errors_say_expected_and_got():
    with pytest.raises(ValueError, match=r"expected gain with 4 elements.*got shape \(3, 1, 1, 1\)"):
        ws_standardize(torch.randn(4, 2, 3, 3), torch.randn(3, 1, 1, 1))
    with pytest.raises(ValueError, match=r"expected bias of shape \(C,\) = \(3,\), got \(4,\)"):
        bias_gamma_act(torch.randn(1, 3, 2, 2), torch.randn(4))
    with pytest.raises(ValueError, match="expected act"):
        bias_gamma_act(torch.randn(1, 3, 2, 2), None, "tanh")
    with pytest.raises(ValueError, match=r"expected gate_logits of shape \(N, C\) = \(1, 3\), got \(1, 4\)"):
        se_residual(torch.randn(1, 3, 2, 2), torch.randn(1, 4), torch.randn(1, 3, 2, 2), 1.0)
    with pytest.raises(ValueError, match="expected scale of shape"):
        se_residual(torch.randn(1, 3, 2, 2), torch.randn(1, 3), torch.randn(1, 3, 2, 2), torch.ones(2))
    with pytest.raises(ValueError, match=r"expected x with C_in = 4 channels.*got x of shape \(1, 3, 5, 5\)"):
        ws_conv2d(torch.randn(1, 3, 5, 5), torch.randn(6, 2, 3, 3), torch.ones(6, 1, 1, 1), groups=2)


def test_same_padding_matches_timm():
    from timm.layers.padding import get_same_padding

    for size in range(1, 20):
        for k in (1, 3, 5):
            for s in (1, 2, 3):
                total = get_same_padding(size, k, s, 1)
                assert sum(nfconv.same_padding(size, k, s)) == total
                assert nfconv.same_padding(size, k, s)[0] == total // 2


def _compile_case():
    x = _rand(2, 4, 9, 8)
    w, g, b = _rand(6, 2, 3, 3, requires_grad=True), (1 + 0.1 * torch.randn(6, 1, 1, 1)).requires_grad_(), _rand(6, requires_grad=True)

    def f(x, w, g, b):
        y = ws_conv2d(x, w, g, None, 2, 2, 1e-5)
        y = bias_gamma_act(y, b, "gelu", GELU_GAMMA)
        return se_residual(y, y.mean((2, 3)), y * 0.5, g[0, 0, 0])

    return f, (x, w, g, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fpad", [(0, 1, 0, 1), (1, 1, 1, 1), (2, 0, 0, 3), (0, 0, 0, 0)])
def test_pad_zeros_equals_f_pad(dtype, channels_last, fpad):
    """The frozen path's padding writes only the border zeros: the same values as F.pad, in
    x's memory format, with NaNs left in fresh memory never showing through."""
    from flamingo_rt.ops.nfconv import pad_zeros
    x = torch.randn(2, 5, 6, 7).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.full((2, 5, 12, 12), float("nan")).to(dtype)  # poison: a freed block of NaNs
    with torch.no_grad():
        got = pad_zeros(x, fpad)
    assert torch.equal(got, F.pad(x, fpad))
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    xg = torch.randn(1, 2, 3, 3, requires_grad=True)
    y = pad_zeros(xg, (0, 1, 0, 1))  # with a gradient: F.pad (differentiable)
    y.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(xg))


def test_ws_conv2d_compiles_fullgraph_inductor():
    """Inductor, inference: the ops trace as one graph and run compiled."""
    torch._dynamo.reset()
    f, args = _compile_case()
    with torch.no_grad():
        want = f(*args)
        got = torch.compile(f, fullgraph=True, dynamic=False)(*args)
    assert rel_err(got, want) < 1e-6


def test_ws_conv2d_compiles_fullgraph_training():
    """Full graph with autograd (AOT autograd through the registered backward ops)."""
    torch._dynamo.reset()
    f, (x, w, g, b) = _compile_case()
    compiled = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")
    want = f(x, w, g, b)
    got = compiled(x, w, g, b)
    assert rel_err(got, want) < 1e-6
    gw = torch.autograd.grad(want.square().sum(), (w, g, b))
    gc = torch.autograd.grad(got.square().sum(), (w, g, b))
    for a, e in zip(gc, gw):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("k,groups,channels_last", [(3, 2, True), (3, 1, False), (1, 1, True)])
def test_ws_conv2d_bf16_autocast_standardizes_into_bf16_bitwise(monkeypatch, k, groups, channels_last):
    """Under CPU bf16 autocast the float32 weight is standardized straight into bf16 (one op,
    flamingo_rt::ws_standardize_bf16): output and every gradient (x, weight, gain, bias)
    bitwise those of the float32 standardization cast by autocast."""
    if not (B._device_ok("cpu", torch.device("cpu")) and nfconv._has_kernel("ws_standardize_bf16")):
        pytest.skip("flamingo_rt._C not built")
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 8, 9, 10, generator=g)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0 = torch.randn(12, 8 // groups, k, k, generator=g) * 0.2
    g0 = 1 + 0.1 * torch.randn(12, 1, 1, 1, generator=g)
    b0 = torch.randn(12, generator=g)
    used = []
    real = nfconv._ws_bf16
    monkeypatch.setattr(nfconv, "_ws_bf16", lambda *a: used.append(1) or real(*a))

    def run(fused):
        monkeypatch.setattr(nfconv, "_ws_bf16_ok", (lambda *a: fused) if not fused else _ok)
        x, w, gn, b = (t.clone().requires_grad_() for t in (x0, w0, g0, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ws_conv2d(x, w, gn, b, stride=1, groups=groups, backend="cpu")
        y.float().square().sum().backward()
        return [y, x.grad, w.grad, gn.grad, b.grad]

    _ok = nfconv._ws_bf16_ok
    want = run(False)
    assert used == []
    got = run(True)
    assert used == [1]
    for a, c in zip(got, want):
        assert a.dtype == c.dtype and torch.equal(a, c)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32


def test_opcheck_ws_standardize_bf16():
    if not nfconv._has_kernel("ws_standardize_bf16"):
        pytest.skip("flamingo_rt._C not built")
    w, g = _rand(5, 3, 3, 3, requires_grad=True), (1 + 0.1 * torch.randn(5, 1, 1, 1)).requires_grad_()
    torch.library.opcheck(nfconv._ws_bf16_op, (w, g, 1e-5))
