"""flamingo_rt::feed_forward (LN -> fc1 -> act -> fc2 saving only x and h) against the
FeedForward module: values, gradients, gradcheck in float64, autocast bf16, meta."""
from __future__ import annotations

import importlib

import pytest
import torch

from flamingo_rt.models.ff import FeedForward
from flamingo_rt.ops import feed_forward
from flamingo_rt.ops.feed_forward import module_feed_forward
from conftest import rel_err

FFMOD = importlib.import_module("flamingo_rt.ops.feed_forward")  # the module (the package exports the function)


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


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("M,N", [(24, 80), (80, 24)])
def test_widened_bf16_weight_gradient_product(accumulate, M, N, monkeypatch):
    """The backward's bf16 weight-gradient products (``_acc_mm``), widened to float32 a block
    at a time: a transposed a narrower than b goes in blocks of columns (a copied to rows
    once), else in blocks of rows; each element is the bf16 product's, rounded once, plus
    the accumulator's value. (Where MKL's float32-accumulating product runs, widening_gemm,
    these are the fallback paths: tests/test_widening_gemm.py covers that one.)"""
    from flamingo_rt.ops import cpu_gemm

    monkeypatch.setenv("FLAMINGO_RT_WIDENING_GEMM", "0")
    monkeypatch.setattr(cpu_gemm, "ROWS_FIRST_MIN_N", 8)
    monkeypatch.setattr(cpu_gemm, "bf16_available", lambda: True)  # the path oneDNN's bf16 CPUs take
    monkeypatch.setattr(FFMOD, "widen_block_rows", lambda rows, cols, dtype: 7)  # blocks of 7
    g = torch.Generator().manual_seed(3)
    K = 37
    a = torch.randn(K, M, generator=g).bfloat16().t()
    b = torch.randn(K, N, generator=g).bfloat16()
    c = torch.randn(M, N, generator=g) if accumulate else None
    before = None if c is None else c.clone()
    spy = []
    orig = FFMOD.transpose_rows
    monkeypatch.setattr(FFMOD, "transpose_rows", lambda t: spy.append(t.shape) or orig(t))
    got = FFMOD._acc_mm(c, a, b, torch.float32)
    want = (a.contiguous() @ b).float()
    if accumulate:
        want = before + want
        assert got.data_ptr() == c.data_ptr()
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    assert spy == ([(M, K)] if M < N else [])  # the column-block path copies a once, whole


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


def _gated_ref(ff, x, gate):
    return x + gate * ff(x) if gate is not None else x + ff(x)


@pytest.mark.parametrize("kind", ["gelu", "sqrelu"])
@pytest.mark.parametrize("gate_value", [None, 0.0, 0.37])
@pytest.mark.parametrize("chunk_bytes", [None, 1000])  # whole, or chunks of 5 rows (inner 192 x 4 B)
def test_residual_gated_matches_module(kind, gate_value, chunk_bytes, monkeypatch):
    """x + tanh(a) * FF(x) as one op against the module plus addcmul: values and every gradient,
    the gate's included (at a gate of 0, a fresh block, the gate's gradient is still nonzero),
    whole and over chunks of rows (the chunks' weight gradients summed)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(FFMOD, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(3)
    ff = _module(48, kind)
    x = (torch.randn(2, 13, 48) * 2 + 0.3).requires_grad_()
    a = None if gate_value is None else torch.tensor([gate_value], requires_grad=True)
    gate = None if a is None else a.tanh()
    y = feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, ff.norm.eps, kind,
                     residual=True, gate=gate)
    want = _gated_ref(ff, x, None if a is None else a.tanh())
    assert y.dtype == x.dtype and rel_err(y, want) < 1e-6
    go = torch.randn_like(want)
    leaves = [x, *ff.parameters()] + ([a] if a is not None else [])
    got = torch.autograd.grad(y, leaves, go)
    ref = torch.autograd.grad(want, leaves, go)
    for g1, g2 in zip(got, ref):
        assert g1.shape == g2.shape and rel_err(g1, g2) < 1e-5
    if a is not None:
        assert got[-1].abs().item() > 0


@pytest.mark.parametrize("gated", [False, True])
def test_residual_gradcheck_float64_over_chunks(gated, monkeypatch):
    monkeypatch.setattr(FFMOD, "CHUNK_BYTES", 2 * 24 * 8)  # 2 rows per chunk (inner 24, float64)
    torch.manual_seed(4)
    ff = _module(6, "gelu", torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ps = [ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight]
    if gated:
        a = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
        fn = lambda x, g, b, w1, w2, a: feed_forward(x, g, b, w1, w2, 1e-5, "gelu", residual=True, gate=a.tanh())
        assert torch.autograd.gradcheck(fn, (x, *ps, a))
    else:
        fn = lambda x, g, b, w1, w2: feed_forward(x, g, b, w1, w2, 1e-5, "gelu", residual=True)
        assert torch.autograd.gradcheck(fn, (x, *ps))


@pytest.mark.parametrize("cast_parts", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 4000])
def test_residual_autocast_bf16_like_the_module(chunk_bytes, cast_parts, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(FFMOD, "CHUNK_BYTES", chunk_bytes)  # 7 rows of 256 bf16 per chunk
    if cast_parts:  # the weights' bf16 casts in 11 blocks (the last one ragged), rows or columns
        monkeypatch.setattr(FFMOD, "CAST_PART_BYTES", 3000)
    torch.manual_seed(5)
    ff = _module(64, "gelu")
    x = torch.randn(40, 64, requires_grad=True)
    a = torch.tensor([0.6], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, residual=True, gate=a.tanh())
        ref = _gated_ref(ff, x, a.tanh())
    truth = _gated_ref(ff, x, a.tanh())
    assert y.dtype == ref.dtype == torch.float32
    assert rel_err(y, truth) <= 2 * rel_err(ref, truth) + 1e-4
    go = torch.randn_like(truth)
    leaves = [x, *ff.parameters(), a]
    got = torch.autograd.grad(y, leaves, go, retain_graph=True)
    want = torch.autograd.grad(ref, leaves, go, retain_graph=True)
    exact = torch.autograd.grad(truth, leaves, go)
    for g1, g2, e, leaf in zip(got, want, exact, leaves):
        assert g1.dtype == leaf.dtype
        assert rel_err(g1, e) <= 3 * rel_err(g2, e) + 1e-3


def test_backward_temporaries_are_chunked(monkeypatch):
    """No (rows, inner) tensor besides the saved h is allocated in the forward or the backward
    (h's unused gradient is not materialized as zeros either): with chunks of 8 rows the
    largest allocation is the saved h itself and every other one is less than a quarter of
    it (a chunk's (8, inner), a weight gradient (inner, D), oneDNN's packed weights)."""
    from torch.profiler import ProfilerActivity, profile

    R, D, inner = 1024, 32, 512
    monkeypatch.setattr(FFMOD, "CHUNK_BYTES", 8 * inner * 4)
    torch.manual_seed(6)
    ff = _module(D, "gelu")
    ff.fc1 = torch.nn.Linear(D, inner, bias=False)
    ff.fc2 = torch.nn.Linear(inner, D, bias=False)
    x = torch.randn(R, D, requires_grad=True)
    gate = torch.tensor([0.5], requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, residual=True, gate=gate.tanh())
        y.backward(torch.randn_like(y))
    sizes = sorted((e.nbytes() for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.nbytes() > 0), reverse=True)
    h_bytes = R * inner * 4
    assert sizes[0] == h_bytes  # h, allocated once
    assert sizes[1] < h_bytes // 4, sizes[:4]


@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_backward_reuses_the_thread_scratch_buffer(chunk_rows, monkeypatch):
    """On the CPU the backward's activation chunk is the thread's scratch buffer, the same
    memory from one backward to the next (no fresh pages per call); what an earlier call left
    in it (poisoned with NaN here) does not reach the gradients, one chunk or several."""
    from flamingo_rt.ops import scratch

    R, D, inner = 64, 16, 64
    if chunk_rows is not None:
        monkeypatch.setattr(FFMOD, "CHUNK_BYTES", chunk_rows * inner * 4)
    ptrs = []
    real = FFMOD._act_buffer

    def spy(rows, inner_, dtype, device):
        buf = real(rows, inner_, dtype, device)
        ptrs.append(buf.data_ptr())
        return buf
    monkeypatch.setattr(FFMOD, "_act_buffer", spy)
    torch.manual_seed(7)
    ff = _module(D, "gelu")
    ff.fc1 = torch.nn.Linear(D, inner, bias=False)
    ff.fc2 = torch.nn.Linear(inner, D, bias=False)
    x = torch.randn(R, D, requires_grad=True)
    dy = torch.randn(R, D)
    scratch.release()
    grads = []
    for _ in range(2):
        x.grad = ff.fc1.weight.grad = ff.fc2.weight.grad = None
        _op(ff, x).backward(dy)
        grads.append([x.grad.clone(), ff.fc1.weight.grad.clone(), ff.fc2.weight.grad.clone()])
        assert scratch.held_bytes() >= (chunk_rows or R) * inner * 4
        scratch.buffer("feed_forward.backward_act", (chunk_rows or R) * inner, torch.float32, "cpu").fill_(float("nan"))
    assert len(ptrs) == 2 and ptrs[0] == ptrs[1]
    for a, b in zip(*grads):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    ref = [torch.autograd.grad(ff(x), [x, ff.fc1.weight, ff.fc2.weight], dy)][0]
    for a, e in zip(grads[1], ref):
        assert rel_err(a, e) < 1e-5
    scratch.release()


def test_residual_errors_and_inference_path():
    ff = _module(16, "gelu")
    x = torch.randn(3, 16)
    args = (x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight)
    with pytest.raises(ValueError, match="residual=True"):
        feed_forward(*args, gate=torch.ones(1))
    with pytest.raises(ValueError, match="one-element gate"):
        feed_forward(*args, residual=True, gate=torch.ones(2))
    with pytest.raises(ValueError, match="one-element gate"):
        feed_forward(*args, residual=True, gate=torch.ones(1, dtype=torch.float64))
    g = torch.tensor([0.3])
    with torch.no_grad():
        assert torch.equal(module_feed_forward(ff, x, residual=True, gate=g), torch.addcmul(x, g, ff(x)))
        assert torch.equal(module_feed_forward(ff, x, residual=True), x + ff(x))
    y = feed_forward(torch.empty(4, 16, device="meta"), *(torch.empty(s, device="meta") for s in ((16,), (16,), (64, 16), (16, 64))),
                     residual=True, gate=torch.empty(1, device="meta"))
    assert y.shape == (4, 16) and y.dtype == torch.float32


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("residual,gated", [(False, False), (True, False), (True, True)])
def test_opcheck(residual, gated, lead):
    """Schema, fake implementation, autograd registration and AOT dispatch of the op (and,
    through its autograd, of the backward op), for rows and for (B, T, D) inputs."""
    torch.manual_seed(7)
    D, inner = 8, 32
    args = (torch.randn(*lead, D, requires_grad=True), torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True),
            torch.randn(inner, D, requires_grad=True), torch.randn(D, inner, requires_grad=True),
            torch.tensor([0.3], requires_grad=True) if gated else None, 1e-5, "gelu", torch.float32, residual)
    torch.library.opcheck(FFMOD._ff_op, args)


@pytest.mark.parametrize("residual,gated,chunk_bytes", [(False, False, None), (False, False, 1024),
                                                         (True, False, None), (True, True, 1024)])
def test_output_is_not_a_view(residual, gated, chunk_bytes, monkeypatch):
    """A (B, T, D) input gives a (B, T, D) output that is no view (a module returning a view
    is warned about by FSDP2: an in-place op on it would skip the module's pre-backward hook),
    whether the product is the output (one chunk) or rows are written chunk by chunk (1024
    bytes: 4 of the 10 rows a chunk); x's gradient has x's shape."""
    if chunk_bytes is not None:
        monkeypatch.setattr(FFMOD, "FORWARD_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(9)
    ff = _module(16, "gelu")
    x = torch.randn(2, 5, 16, requires_grad=True)
    gate = torch.tensor([0.7]) if gated else None
    y = feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, residual=residual, gate=gate)
    assert y.shape == (2, 5, 16) and y._base is None
    want = ff(x)
    want = (x + (gate * want if gated else want)) if residual else want
    assert rel_err(y, want) < 1e-6
    (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    assert gx.shape == x.shape and rel_err(gx, torch.autograd.grad(want, [x], torch.ones_like(want))[0]) < 1e-5


@pytest.mark.parametrize("lead", [(10,), (2, 5)])
def test_flop_count(lead):
    """torch's FLOP counter counts the op by its formulas (ops/flops.py), for rows and for
    (B, T, D) inputs: forward 2 products, backward 4, of R x D x inner each."""
    from torch.utils.flop_counter import FlopCounterMode

    ff = _module(16, "gelu")
    x = torch.randn(*lead, 16, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        y = feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, residual=True)
    assert fc.get_total_flops() == 4 * 10 * 16 * 64
    with FlopCounterMode(display=False) as fc:
        y.sum().backward()
    assert fc.get_total_flops() == 8 * 10 * 16 * 64


def test_compiles_fullgraph_forward_and_backward():
    """The gated residual op under torch.compile(fullgraph=True) (AOT autograd over the fake
    implementation): the same output and gradients as eager."""
    torch.manual_seed(8)
    ff = _module(32, "gelu")
    a = torch.tensor([0.4], requires_grad=True)
    x = torch.randn(10, 32, requires_grad=True)
    leaves = [x, a, *ff.parameters()]

    def f(x, a):
        return feed_forward(x, ff.norm.weight, ff.norm.bias, ff.fc1.weight, ff.fc2.weight, residual=True, gate=a.tanh())

    go = torch.randn(10, 32)
    want = torch.autograd.grad(f(x, a), leaves, go)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, a)
    assert rel_err(y, f(x, a)) < 1e-6
    for g1, g2 in zip(torch.autograd.grad(y, leaves, go), want):
        assert rel_err(g1, g2) < 1e-6


def test_cast_parts_cover_the_weight(monkeypatch):
    """_cast_parts: contiguous bf16 blocks of rows / columns that tile the weight, each within
    CAST_PART_BYTES (plus one row or column of rounding); _mm_parts: the product from them."""
    monkeypatch.setattr(FFMOD, "CAST_PART_BYTES", 200)  # 37 x 23 bf16 = 1702 bytes: 8-9 parts
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 23, generator=g)
    wb = w.bfloat16()
    for dim in (0, 1):
        parts = FFMOD._cast_parts(w, torch.bfloat16, dim)
        assert len(parts) >= 8 and parts[0][0] == 0 and parts[-1][1] == w.shape[dim]
        assert all(p.is_contiguous() and p.numel() * 2 <= 200 + 2 * w.shape[1 - dim] for _, _, p in parts)
        assert all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))
        assert torch.equal(torch.cat([p for _, _, p in parts], dim), wb)
    rows, cols = FFMOD._cast_parts(w, torch.bfloat16, 0), FFMOD._cast_parts(w, torch.bfloat16, 1)
    a, b = torch.randn(5, 23, generator=g).bfloat16(), torch.randn(5, 37, generator=g).bfloat16()
    assert rel_err(FFMOD._mm_parts(a, rows, True), a.double() @ wb.double().t()) < 4e-3
    assert rel_err(FFMOD._mm_parts(b, cols, False), b.double() @ wb.double()) < 4e-3
    assert FFMOD._cast_parts(w, torch.float32, 0)[0][2] is w  # already in the dtype: no copy


@pytest.mark.parametrize("residual,gated", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("mode", ["bf16 weights", "autocast"])
def test_bf16_inference_over_chunks_of_rows(residual, gated, mode, monkeypatch):
    """Inference in bf16 (weights or autocast) runs over chunks of rows when the (rows, inner)
    activation passes FORWARD_CHUNK_BYTES, with the values of the whole call; float32 and
    training run whole."""
    torch.manual_seed(5)
    ff = _module(32, "gelu", torch.bfloat16 if mode == "bf16 weights" else torch.float32)
    x = torch.randn(3, 11, 32, dtype=torch.bfloat16 if mode == "bf16 weights" else torch.float32)
    gate = torch.tensor([0.4], dtype=x.dtype) if gated else None
    calls = []
    real = FFMOD._chunked_inference

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(FFMOD, "_chunked_inference", spy)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            return module_feed_forward(ff, x, residual=residual, gate=gate)

    whole = run()
    assert calls == []  # 33 rows x 128 x 2 B: under the bound
    monkeypatch.setattr(FFMOD, "FORWARD_CHUNK_BYTES", 10 * 128 * 2)  # chunks of at most 10 rows
    chunked = run()
    assert calls == [9]  # 33 rows in 4 balanced chunks of 9 (the last 6)
    assert chunked.shape == whole.shape and chunked.dtype == whole.dtype
    # each row computed as in the whole call (up to the products' blocking for other row counts)
    assert rel_err(chunked, whole) < 4e-3
    # float32 inference and anything with a gradient stay whole
    calls.clear()
    ff32, x32 = _module(32, "gelu"), torch.randn(3, 11, 32)
    with torch.no_grad():
        module_feed_forward(ff32, x32, residual=residual)
    module_feed_forward(ff32, x32.requires_grad_(), residual=residual)
    assert calls == []
