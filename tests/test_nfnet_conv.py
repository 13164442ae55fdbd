"""conv2d_bias_act (the frozen NFNet conv with its tail fused) on every CPU-runnable path
against a float64 reference: the Triton implicit-GEMM NHWC convolution (under
TRITON_INTERPRET=1, tiny shapes: strides 1 and 2, TF-style SAME padding with even and odd
sizes, groups, 1x1 and 3x3, each activation, bias or none, float32 and bfloat16), oneDNN's
fused conv + post-op, and the plain fallback; fresh random inputs, poisoned memory."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.ops import backend as B
from flamingo_rt.ops import nfconv
from conftest import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _ref(x, w, b, stride, groups, act, gamma):
    x, w = x.double(), w.double()
    b = None if b is None else b.double()
    t, bo = nfconv.same_padding(x.shape[2], w.shape[2], stride)
    l, r = nfconv.same_padding(x.shape[3], w.shape[3], stride)
    y = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride, 0, 1, groups)
    y = {"none": y, "gelu": F.gelu(y), "relu": F.relu(y), "silu": F.silu(y)}[act]
    return y * gamma


def _poison(n, dtype):
    t = torch.full((n,), float("nan"), dtype=dtype)
    del t


CASES = [
    # N, C_in, H, W, C_out, k, stride, groups
    (2, 8, 7, 6, 16, 3, 1, 1),    # odd/even sizes, stride 1 (symmetric SAME)
    (1, 8, 8, 8, 16, 3, 2, 2),    # even size, stride 2: asymmetric SAME (pad after)
    (1, 12, 9, 7, 12, 3, 2, 3),   # odd sizes, stride 2, groups of 4
    (2, 16, 5, 5, 24, 1, 1, 1),   # 1x1
    (1, 3, 10, 9, 8, 3, 2, 1),    # the stem's first conv (3 input channels)
    (1, 40, 4, 4, 20, 1, 1, 1),   # C_in > one K block, C_out not a multiple of the tile
]


@pytest.mark.skipif(not INTERPRET, reason="the Triton conv runs on the CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("act", ["gelu", "none"])
def test_triton_conv_matches_reference(case, act):
    N, C, H, W, O, k, s, g = case
    x = torch.randn(N, C, H, W)
    w = torch.randn(O, C // g, k, k) * (C // g * k * k) ** -0.5
    b = 0.1 * torch.randn(O)
    _poison(N * O * H * W * 2, torch.float32)
    y = nfconv.conv2d_bias_act(x, w, b, s, g, act, 1.7, backend="triton")
    want = _ref(x, w, b, s, g, act, 1.7)
    assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y).all()
    assert rel_err(y, want) < 1e-5


@pytest.mark.skipif(not INTERPRET, reason="the Triton conv runs on the CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_triton_conv_other_acts_no_bias_bf16(act):
    x = torch.randn(1, 16, 6, 5)
    w = torch.randn(16, 4, 3, 3) * 0.15
    xb, wb = x.bfloat16(), w.bfloat16()
    want = _ref(xb, wb, None, 1, 4, act, 0.9)
    y = nfconv.conv2d_bias_act(xb, wb, None, 1, 4, act, 0.9, backend="triton")
    assert y.dtype == torch.bfloat16
    base = rel_err(_ref(xb, wb, None, 1, 4, act, 0.9).bfloat16(), want)  # bf16 rounding of the output
    assert rel_err(y, want) <= 2 * base + 2e-3
    # channels-last input and a cached packed weight give the same result
    y2 = nfconv.conv2d_bias_act(xb.to(memory_format=torch.channels_last), wb, None, 1, 4, act, 0.9,
                                packed=nfconv.pack_conv_weight(wb), backend="triton")
    assert torch.equal(y, y2)


@pytest.mark.parametrize("be", [b for b in ("cpu", "reference") if b in B.implemented("bias_gamma_act")])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_match_reference(be, case, dtype):
    """gamma 1 takes oneDNN's fused conv + GELU on the CPU; gamma != 1 the fallback."""
    N, C, H, W, O, k, s, g = case
    x = torch.randn(N, C, H, W).to(dtype)
    w = (torch.randn(O, C // g, k, k) * (C // g * k * k) ** -0.5).to(dtype)
    b = (0.1 * torch.randn(O)).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for gamma, cl in ((1.0, False), (1.0, True), (1.3, False)):
        xi = x.to(memory_format=torch.channels_last) if cl else x
        with torch.no_grad():
            y = nfconv.conv2d_bias_act(xi, w, b, s, g, "gelu", gamma, backend=be)
        assert y.dtype == dtype
        assert rel_err(y, _ref(x, w, b, s, g, "gelu", gamma)) < tol


def test_gradients_flow_when_needed():
    """With autograd on, the fused (gradient-free) paths are skipped: gradients are exact."""
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: nfconv.conv2d_bias_act(x, w, b, 2, 1, "gelu", 1.2), (x, w, b))


def test_errors_say_expected_and_got():
    with pytest.raises(ValueError, match="expected act to be one of"):
        nfconv.conv2d_bias_act(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), None, act="tanh")


def test_triton_conv_failure_falls_back_to_the_vendor_conv(monkeypatch):
    """A Triton that cannot compile the conv must not break the frozen encoder."""
    pytest.importorskip("triton")
    from flamingo_rt.kernels import conv as kconv

    def boom(*a, **k):
        raise RuntimeError("no luck")

    monkeypatch.setattr(kconv, "conv2d_nhwc", boom)
    monkeypatch.setattr(nfconv, "_TRITON_CONV_BROKEN", False)
    ok = B._device_ok
    monkeypatch.setattr(B, "_device_ok", lambda b, d: b == "triton" or ok(b, d))  # 'triton' on the CPU
    x, w, b = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3) * 0.2, torch.randn(6)
    with pytest.warns(RuntimeWarning, match="Triton NHWC convolution failed"):
        y = nfconv.conv2d_bias_act(x, w, b, 1, 1, "gelu", 1.0, backend="triton")
    assert rel_err(y, _ref(x, w, b, 1, 1, "gelu", 1.0)) < 1e-5
    assert nfconv._TRITON_CONV_BROKEN
