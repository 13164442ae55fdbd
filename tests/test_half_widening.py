"""flamingo_rt.ops.half_widening: on a CPU without bfloat16 / float16 product kernels (torch's
reference loops: AVX2-only CPUs), every matrix product and convolution of the model, its
generation and its training step runs on the operands widened to float32 and is rounded
once to the dtype: the values of a float32-accumulating bf16 kernel (within one bf16 ulp of
the exact product of the bf16 values), and no half-precision product is left to torch.

The CPU without such kernels is simulated (``cpu_gemm.bf16_available`` patched to False, as
on an AVX2 CPU), so these tests take the same paths on every machine."""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from flamingo_rt.ops import cast_blocks, cpu_gemm, half_widening, nfconv, widening_gemm
from flamingo_rt.ops.linear import linear

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: aten's matrix products and convolutions (their leaf ops), which must not see a half dtype
_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot",
             "aten::_convolution", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
             "mkldnn::_linear_pointwise", "mkldnn::_convolution_pointwise",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}  # (its forward is not torch's products)
_HALF_NAMES = ("c10::BFloat16", "BFloat16", "c10::Half", "Half")


@pytest.fixture
def no_half_kernels(monkeypatch):
    """A CPU whose bf16 products are torch's reference loops, widening on auto (the default)."""
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: False)
    monkeypatch.delenv("FLAMINGO_RT_WIDEN_HALF", raising=False)


def _half_products(fn) -> collections.Counter:
    """The aten products (name, input shapes) that ran with a bf16 / fp16 input during fn()."""
    with profile(record_shapes=True) as p:
        fn()
    found = collections.Counter()
    for e in p.events():
        if e.name in _PRODUCTS and any(d in _HALF_NAMES for d in (e.input_dtypes or [])):
            found[(e.name, str(e.input_shapes))] += 1
    return found


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
    """got (bf16 / fp16) is the exact value rounded to its dtype, or a neighbour (float32 sums)."""
    assert got.dtype == dtype
    ulp = exact.abs().clamp_min(1e-30) * torch.finfo(dtype).eps  # 2^-7 bf16, 2^-10 fp16
    assert ((got.double() - exact).abs() <= ulp + 1e-6).all(), (got.double() - exact).abs().max()


def test_setting_and_what_is_widened(monkeypatch, no_half_kernels):
    x = torch.randn(4, 8).bfloat16()
    w = torch.randn(6, 8).bfloat16()
    assert half_widening.setting() == "auto"
    assert half_widening.wanted(x, w, None)
    assert half_widening.active("cpu", torch.bfloat16) and not half_widening.active("cpu", torch.float32)
    assert not half_widening.active("meta", torch.bfloat16)
    assert not half_widening.wanted(x.float(), w.float())  # float32 is not widened
    assert not half_widening.wanted(x, w.float())  # mixed dtypes are the caller's business
    assert not half_widening.wanted(x.to("meta"), w.to("meta"))
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")
    assert not half_widening.wanted(x, w) and not half_widening.active("cpu", torch.bfloat16)
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "bogus")
    with pytest.raises(ValueError, match="FLAMINGO_RT_WIDEN_HALF: expected auto, 1 or 0, got 'bogus'"):
        half_widening.wanted(x, w)
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: True)  # a CPU with bf16 kernels
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "auto")
    assert not half_widening.wanted(x, w)
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "1")  # forced
    assert half_widening.wanted(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert half_widening.autocast_wanted(x.float(), w.float()) == torch.bfloat16
    assert half_widening.autocast_wanted(x.float(), w.float()) is None  # no autocast
    with pytest.raises(TypeError, match="expected a bfloat16 / float16 dtype, got torch.float32"):
        half_widening.linear(x.float(), w.float())
    with pytest.raises(TypeError, match="cast_linear: expected weight in float32 or torch.bfloat16, got torch.float16"):
        half_widening.linear(x, w.half())


@pytest.mark.parametrize("block_bytes", [None, 5 * 48 * 2])
def test_linear_and_mm_are_the_widened_products_rounded_once(no_half_kernels, monkeypatch, block_bytes):
    if block_bytes is not None:  # the weight widened in several blocks
        monkeypatch.setattr(cast_blocks, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 48, generator=g).bfloat16()
    w = (torch.randn(37, 48, generator=g) * 0.2).bfloat16()
    b = torch.randn(37, generator=g).bfloat16()
    exact = x.double() @ w.double().t() + b.double()
    for y in (linear(x, w, b), cpu_gemm.linear(x, w, b)):
        assert y.shape == (3, 7, 37)
        _within_one_ulp(y, exact)
    a = torch.randn(40, 48, generator=g).bfloat16()
    _within_one_ulp(cpu_gemm.mm(a, w.t()), a.double() @ w.double().t())  # a transposed operand
    out = torch.full((40, 37), float("nan"), dtype=torch.bfloat16)
    assert cpu_gemm.mm(a, w.t().contiguous(), out=out).data_ptr() == out.data_ptr()
    _within_one_ulp(out, a.double() @ w.double().t())
    c = torch.randn(40, 37, generator=g).bfloat16()
    _within_one_ulp(cpu_gemm.mm_add(c, a, w.t()), c.double() + a.double() @ w.double().t())
    # bf16 cast blocks of a float32 weight: the bf16-rounded weight's products, float32 sums
    wf = torch.randn(37, 48, generator=g)
    _within_one_ulp(cast_blocks.linear(a, wf, torch.bfloat16), a.double() @ _bf16_exact(wf).t())
    gy = torch.randn(40, 37, generator=g).bfloat16()
    _within_one_ulp(cast_blocks.mm(gy, wf, torch.bfloat16), gy.double() @ _bf16_exact(wf))
    # the float32-result product: not rounded to bf16 at all
    acc = torch.full((40, 37), float("nan"))
    widening_gemm.addmm_(acc, a, w.t(), alpha=2.0, beta=0.0)
    torch.testing.assert_close(acc.double(), 2 * a.double() @ w.double().t(), rtol=1e-6, atol=1e-5)
    assert not _half_products(lambda: (linear(x, w, b), cpu_gemm.mm(a, w.t()), cpu_gemm.mm_add(c, a, w.t()),
                                       cast_blocks.mm(gy, wf, torch.bfloat16)))


def test_float16_too(monkeypatch):
    """float16 the same way (forced on: CPUs with AVX-512 FP16 have kernels for it)."""
    monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "1")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 40, generator=g).half()
    w = (torch.randn(24, 40, generator=g) * 0.2).half()
    b = torch.randn(24, generator=g).half()
    _within_one_ulp(linear(x, w, b), x.double() @ w.double().t() + b.double(), torch.float16)
    _within_one_ulp(cpu_gemm.mm(x, w.t()), x.double() @ w.double().t(), torch.float16)
    assert not _half_products(lambda: (linear(x, w, b), cpu_gemm.mm(x, w.t())))


def test_gradients_and_autocast(no_half_kernels):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(24, 32, generator=g) * 0.2).bfloat16().requires_grad_()
    b = torch.randn(24, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(9, 24, generator=g).bfloat16()

    def run():
        y = linear(x, w, b)
        y.backward(dy)
        return y

    assert not _half_products(run)
    _within_one_ulp(x.grad, dy.double() @ w.double())
    _within_one_ulp(w.grad, dy.double().t() @ x.double())
    # autocast: the inputs rounded to bf16 (autocast's casts), then the widened product
    xf = torch.randn(9, 32, generator=g).requires_grad_()
    wf = torch.randn(24, 32, generator=g).requires_grad_()
    def autocast_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear(xf, wf)
        y.float().sum().backward()  # outside autocast, as torch recommends
        return y

    found = _half_products(autocast_step)
    y = autocast_step()
    xf.grad = wf.grad = None
    autocast_step()
    assert not found
    _within_one_ulp(y, _bf16_exact(xf.detach()) @ _bf16_exact(wf.detach()).t())
    torch.testing.assert_close(xf.grad.double(), _bf16_exact(wf.detach()).sum(0).expand(9, 32),
                               rtol=2 ** -7, atol=1e-6)
    # the float32 weight's gradient sums in float32, not rounded to bf16
    assert wf.grad.dtype == torch.float32
    torch.testing.assert_close(wf.grad.double(), _bf16_exact(xf.detach()).sum(0).expand(24, 32),
                               rtol=1e-6, atol=1e-5)
    # a frozen float32 weight is kept as itself for the input's gradient: no widened or
    # rounded copy of it lives from the forward to the backward
    frozen = torch.randn(24, 32, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear(xf, frozen)
    assert any(t.data_ptr() == frozen.data_ptr() for t in saved)
    assert not [t for t in saved if t.numel() == frozen.numel() and t.data_ptr() != frozen.data_ptr()]
    y.float().sum().backward()


def test_convolutions_widened_in_their_layout(no_half_kernels):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 9, 9, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    for w in (torch.randn(24, 16, 3, 3, generator=g), torch.randn(24, 16, 1, 1, generator=g),
              torch.randn(24, 4, 3, 3, generator=g)):
        w = (w * 0.2).bfloat16()
        groups = 16 // w.shape[1]
        bias = torch.randn(24, generator=g).bfloat16()
        found = _half_products(lambda: nfconv.conv2d_padded(x, w, bias, 1, groups, "same"))
        y = nfconv.conv2d_padded(x, w, bias, 1, groups, "same")
        assert not found
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        pad = w.shape[-1] // 2
        exact = F.conv2d(x.double(), w.double(), bias.double(), padding=pad, groups=groups)
        _within_one_ulp(y, exact)
        # and under autocast with float32 tensors: the convolution of the bf16-rounded ones
        with torch.autocast("cpu", dtype=torch.bfloat16):
            found = _half_products(lambda: nfconv.conv2d_padded(x.float(), w.float(), None, 1, groups, "same"))
            ya = nfconv.conv2d_padded(x.float(), w.float(), None, 1, groups, "same")
        assert not found and ya.dtype == torch.bfloat16
        _within_one_ulp(ya, F.conv2d(x.double(), w.double(), padding=pad, groups=groups))


def test_model_generation_and_training_run_no_half_product(no_half_kernels, tmp_path):
    """The tiny model's forward in bf16 weights (vision encoder, resampler, cross-attention, LM)
    close to its float32 forward, its generation, and a bf16-autocast training step of the
    cross-attention block: no bf16 product left to torch anywhere."""
    from test_flamingo import make_batch, open_gates, tiny_model
    from world_models import tiny_world_model

    from flamingo_rt.io.pretrained import load_pretrained
    from flamingo_rt.models.xattn import GatedCrossAttentionBlock
    from flamingo_rt.runtime.generate import Generator
    from flamingo_rt.runtime.sampling import GenerationConfig

    torch.manual_seed(0)
    model = tiny_model().eval()
    open_gates(model)
    ids, media, _ = make_batch((2, 1), T=24)
    with torch.no_grad():
        ref = model(ids, media).logits
        m16 = model.to(torch.bfloat16)
        found = _half_products(lambda: m16(ids, media.bfloat16()))
        got = m16(ids, media.bfloat16()).logits.float()
    assert not found, found
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    # training the bf16 model: the LM's attention backward too
    found = _half_products(lambda: m16(ids, media.bfloat16()).logits.float().square().mean().backward())
    assert not found, found
    assert all(torch.isfinite(p.grad).all() for p in m16.parameters() if p.grad is not None)

    folder = tiny_world_model(tmp_path / "m")
    m, tok = load_pretrained(folder, dtype=torch.bfloat16)
    gen = Generator(m, tok, max_seq_len=64, max_media=2)
    img = torch.rand(3, 64, 64)
    out = []
    found = _half_products(lambda: out.append(gen.generate([img, "a red"], GenerationConfig(max_new_tokens=4))))
    assert not found, found
    assert isinstance(out[0], str)

    blk = GatedCrossAttentionBlock(64, 32, 2, 16, 2)
    with torch.no_grad():
        blk.attn_gate.fill_(0.5)
        blk.ff_gate.fill_(0.5)
    x = torch.randn(1, 16, 64, requires_grad=True)
    med = torch.randn(1, 2, 8, 32, requires_grad=True)
    loc = torch.zeros(1, 16, dtype=torch.bool)
    loc[0, ::8] = True

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = blk(x, med, loc)
        y.float().square().sum().backward()

    assert not _half_products(step)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in blk.parameters())
