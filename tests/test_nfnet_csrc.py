"""The NFNet C++ ops (flamingo_rt_C::ws_standardize / se_residual and their backwards):
direct calls, error messages, fake kernels, thread-count independence, and the CUDA
sources compile-checked with nvcc for sm_90 (no GPU needed)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flamingo_rt import _ext
from flamingo_rt.ops.reference import nfnet as ref
from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]

needs_ext = pytest.mark.skipif(
    not (_ext.load() and hasattr(torch.ops.flamingo_rt_C, "ws_standardize")),
    reason="flamingo_rt._C not built with the NFNet ops")


@needs_ext
def test_direct_calls_match_reference_float64():
    C = torch.ops.flamingo_rt_C
    w, g = torch.randn(10, 7, 3, 3, dtype=torch.float64), 1 + 0.1 * torch.randn(10, 1, 1, 1, dtype=torch.float64)
    go = torch.randn_like(w)
    assert rel_err(C.ws_standardize(w, g, 1e-5), ref.ws_standardize(w, g, 1e-5)) < 1e-13
    for got, want in zip(C.ws_standardize_backward(go, w, g, 1e-5), ref.ws_standardize_backward(go, w, g, 1e-5)):
        assert rel_err(got, want) < 1e-12
    x, s = torch.randn(3, 5, 4, 6, dtype=torch.float64), torch.randn(3, 5, 4, 6, dtype=torch.float64)
    gl, sc = torch.randn(3, 5, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    assert rel_err(C.se_residual(x, gl, s, sc), ref.se_residual(x, gl, s, sc)) < 1e-14
    gy = torch.randn_like(x)
    for got, want in zip(C.se_residual_backward(gy, x, gl, sc), ref.se_residual_backward(gy, x, gl, s, sc)):
        assert got.shape == want.shape and rel_err(got, want) < 1e-12


@needs_ext
@pytest.mark.parametrize("cl", [True, False])
def test_bf16_with_a_float32_scale_against_float64(cl):
    """bf16 tensors with a float32 scale (a float32 gain under bf16 autocast): the kernels read
    the scale unrounded and return its gradient in float32; within bf16 rounding of float64,
    and the whole-op wrapper runs the kernel, not the reference."""
    C = torch.ops.flamingo_rt_C
    g = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, 80, 7, 9, generator=g).bfloat16().contiguous(memory_format=fmt)
    s = torch.randn(2, 80, 7, 9, generator=g).bfloat16().contiguous(memory_format=fmt)
    gl = torch.randn(2, 80, generator=g).bfloat16()
    sc = torch.tensor(0.2998)  # 0.32% from its bf16 rounding (0.298828125): a rounded scale would show
    go = torch.randn(2, 80, 7, 9, generator=g).bfloat16().contiguous(memory_format=fmt)
    y = C.se_residual(x, gl, s, sc)
    want = ref.se_residual(x.double(), gl.double(), s.double(), sc.double())
    assert y.dtype == torch.bfloat16 and rel_err(y, want) < 4e-3
    # the scale is read unrounded: with a zero shortcut the output is nearer the float64 result of
    # the exact scale than of its bf16 rounding
    z = torch.zeros_like(s)
    y0 = C.se_residual(x, gl, z, sc)
    e_exact = rel_err(y0, ref.se_residual(x.double(), gl.double(), z.double(), sc.double()))
    e_rounded = rel_err(y0, ref.se_residual(x.double(), gl.double(), z.double(), sc.bfloat16().double()))
    assert e_exact < 0.75 * e_rounded, (e_exact, e_rounded)
    dx, dg, ds = C.se_residual_backward(go, x, gl, sc)
    wdx, wdg, wds = ref.se_residual_backward(go.double(), x.double(), gl.double(), s.double(), sc.double())
    assert dx.dtype == dg.dtype == torch.bfloat16 and ds.dtype == torch.float32 and ds.shape == sc.shape
    assert rel_err(dx, wdx) < 4e-3 and rel_err(dg, wdg) < 4e-3 and rel_err(ds, wds) < 1e-5
    with pytest.raises(RuntimeError, match="expected every tensor of x's dtype"):
        C.se_residual(x.float(), gl.float(), s.float(), sc.double())  # only float32 beside bf16


@needs_ext
def test_se_residual_op_under_bf16_autocast_runs_the_kernel(monkeypatch):
    """The model's case (bf16 activations, float32 scale): flamingo_rt.ops.nfconv.se_residual
    forward and backward on the cpu backend call the C++ kernels, never the reference."""
    from flamingo_rt.ops import _cpp_backends, nfconv
    from flamingo_rt.ops import backend as _backend
    from flamingo_rt.ops.reference import nfnet as refmod

    called = []

    def spy(op):
        real = _backend.get(op, "reference")
        return lambda *a: called.append(op) or real(*a)

    monkeypatch.setattr(_cpp_backends, "_reference", spy)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 64, 6, 6, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    s = torch.randn(2, 64, 6, 6, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    gl = torch.randn(2, 64, generator=g).bfloat16().requires_grad_()
    sc = torch.tensor(0.7, requires_grad=True)
    y = nfconv.se_residual(x, gl, s, sc, backend="cpu")
    y.float().square().sum().backward()
    assert called == [] and sc.grad.dtype == torch.float32
    xd, gd, sd = x.detach().double().requires_grad_(), gl.detach().double().requires_grad_(), sc.detach().double().requires_grad_()
    refmod.se_residual(xd, gd, s.double(), sd).square().sum().backward()
    assert rel_err(x.grad, xd.grad) < 1e-2 and rel_err(gl.grad, gd.grad) < 1e-2 and rel_err(sc.grad, sd.grad) < 1e-2


@needs_ext
@pytest.mark.parametrize("cl", [False, True])
def test_ws_standardize_bf16_is_the_float32_result_rounded_once(cl):
    """ws_standardize_bf16 (float32 weight -> bf16) is bitwise ws_standardize's float32 output
    cast to bf16; the backward with a bf16 grad_out beside the float32 weight is bitwise the
    backward of that gradient widened to float32; only float32 weights."""
    C = torch.ops.flamingo_rt_C
    g = torch.Generator().manual_seed(6)
    w = torch.randn(48, 16, 3, 3, generator=g) * 0.1 + 0.01
    if cl:
        w = w.contiguous(memory_format=torch.channels_last)
    gain = 1 + 0.1 * torch.randn(48, 1, 1, 1, generator=g)
    y = C.ws_standardize_bf16(w, gain, 1e-5)
    assert y.dtype == torch.bfloat16 and y.stride() == C.ws_standardize(w, gain, 1e-5).stride()
    assert torch.equal(y, C.ws_standardize(w, gain, 1e-5).bfloat16())
    go = torch.randn(48, 16, 3, 3, generator=g).bfloat16()
    if cl:
        go = go.contiguous(memory_format=torch.channels_last)
    dw, dg = C.ws_standardize_backward(go, w, gain, 1e-5)
    dw32, dg32 = C.ws_standardize_backward(go.float(), w, gain, 1e-5)
    assert dw.dtype == dg.dtype == torch.float32 and torch.equal(dw, dw32) and torch.equal(dg, dg32)
    with pytest.raises(RuntimeError, match="expected a float32 weight"):
        C.ws_standardize_bf16(w.double(), gain.double(), 1e-5)
    with pytest.raises(RuntimeError, match="expected grad_out like weight"):
        C.ws_standardize_backward(go.half(), w, gain, 1e-5)


@needs_ext
def test_results_independent_of_thread_count():
    C = torch.ops.flamingo_rt_C
    x = torch.randn(4, 96, 20, 20).to(memory_format=torch.channels_last)
    go = torch.randn_like(x)
    gl, sc = torch.randn(4, 96), torch.tensor(0.7)
    w, g = torch.randn(256, 64, 3, 3), torch.randn(256, 1, 1, 1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = (C.se_residual_backward(go, x, gl, sc), C.ws_standardize_backward(w, w, g, 1e-5))
        torch.set_num_threads(2)
        b = (C.se_residual_backward(go, x, gl, sc), C.ws_standardize_backward(w, w, g, 1e-5))
    finally:
        torch.set_num_threads(n)
    for ta, tb in zip(list(a[0]) + list(a[1]), list(b[0]) + list(b[1])):
        assert torch.equal(ta, tb)


@needs_ext
def test_errors_say_expected_and_got():
    C = torch.ops.flamingo_rt_C
    with pytest.raises(RuntimeError, match=r"expected gain with 4 elements, got shape \[3\]"):
        C.ws_standardize(torch.randn(4, 2, 1, 1), torch.randn(3), 1e-5)
    with pytest.raises(RuntimeError, match="expected dtype float32, bfloat16 or float64 on CPU, got Half"):
        C.ws_standardize(torch.randn(4, 2, 1, 1).half(), torch.randn(4).half(), 1e-5)
    with pytest.raises(RuntimeError, match=r"expected gate_logits of shape \(N, C\) = \(2, 3\)"):
        C.se_residual(torch.randn(2, 3, 4, 4), torch.randn(2, 4), torch.randn(2, 3, 4, 4), torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="expected shortcut of x's shape"):
        C.se_residual(torch.randn(2, 3, 4, 4), torch.randn(2, 3), torch.randn(2, 3, 4, 5), torch.tensor(1.0))


@needs_ext
def test_fake_kernels_follow_memory_format():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 5, 5).to(memory_format=torch.channels_last)
        y = torch.ops.flamingo_rt_C.se_residual(x, torch.empty(2, 8), x, torch.empty(()))
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        w = torch.ops.flamingo_rt_C.ws_standardize(torch.empty(4, 3, 3, 3), torch.empty(4, 1, 1, 1), 1e-5)
        assert w.shape == (4, 3, 3, 3)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_for_sm90(tmp_path):
    src = ROOT / "csrc" / "cuda" / "nfnet.cu"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "-O2", f"-I{ROOT / 'csrc' / 'include'}", "-c", str(src),
         "-o", str(tmp_path / "nfnet.o")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _layouts(n, c, h, w):
    """x of shape (n, c, h, w) in every layout our ops must treat alike in the real and the
    fake kernel: NCHW, channels-last, a channels-last tensor that is also NCHW-contiguous
    (c = 1 or h = w = 1 make the two the same), and a non-dense slice."""
    yield "nchw", torch.randn(n, c, h, w)
    yield "channels_last", torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    yield "ambiguous_c1", torch.randn(n, h, w, 1).permute(0, 3, 1, 2)
    yield "ambiguous_hw1", torch.randn(n, 1, 1, c).permute(0, 3, 1, 2)
    yield "slice", torch.randn(n, c, h, w + 3)[..., 1:w + 1]


@needs_ext
@pytest.mark.parametrize("shape", [(2, 8, 5, 5), (1, 1, 6, 6), (2, 8, 1, 1)])
def test_real_and_fake_kernels_give_the_same_strides(shape):
    """Every output of the NFNet ops has the strides its fake kernel promises, for every input
    layout (AOTInductor lays out the buffers after an op by the fake kernel: an exported vision
    encoder whose stem had one channel read every later activation with the wrong strides when
    the real op called a (1, 1, H, W) input channels-last and the fake kernel NCHW)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    C = torch.ops.flamingo_rt_C
    n, c, h, w = shape
    for name, x in _layouts(n, c, h, w):
        if x.shape != shape:  # the ambiguous layouts exist for c = 1 or h = w = 1 only
            continue
        gate, scale = torch.randn(n, c), torch.tensor(0.7)
        calls = [
            ("bias_gamma_act", lambda t: C.bias_gamma_act(t[0], t[1], "gelu", 1.7), (x, torch.randn(c))),
            ("bias_gamma_act_backward", lambda t: C.bias_gamma_act_backward(t[0], t[1], t[2], "gelu", 1.7),
             (x, x, torch.randn(c))),
            ("se_residual", lambda t: C.se_residual(t[0], t[1], t[2], t[3]), (x, gate, x, scale)),
            ("se_residual_backward", lambda t: C.se_residual_backward(t[0], t[1], t[2], t[3]), (x, x, gate, scale)),
            ("ws_standardize", lambda t: C.ws_standardize(t[0], t[1], 1e-5), (x, torch.rand(n, 1, 1, 1) + 0.5)),
        ]
        for op, call, args in calls:
            real = call(args)
            mode = FakeTensorMode()
            with mode:
                fake = call(tuple(mode.from_tensor(a) for a in args))
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            for r, f in zip(real, fake):
                assert r.shape == f.shape and r.stride() == f.stride(), \
                    f"{op} on a {name} x {tuple(x.shape)} strides {x.stride()}: real {r.stride()}, fake {f.stride()}"
