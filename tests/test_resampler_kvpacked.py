"""resampler_attention_kvpacked: the keys and values of each source packed as the halves of
one [K | V] projection (N, rows, 2, H, dh), their gradients returned in that layout. The
specification is the unpacked op on the halves; the CPU backend writes the packed gradients
in its kernel (no stack), the others' are stacked."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from flamingo_rt.ops import _cpp_backends, resampler_attention, resampler_attention_kvpacked
from flamingo_rt.ops import backend as be
from flamingo_rt.ops.reference import resampler as ref

OP = "resampler_attention"
BACKENDS = ["reference"] + (["cpu"] if _cpp_backends.AVAILABLE else []) + (
    ["triton"] if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
    else [])


def _packed(n, L, S, H, dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(n, L, H, dh, generator=g)).to(dtype).requires_grad_()
    kv_x = torch.randn(n, S, 2, H, dh, generator=g).to(dtype).requires_grad_()
    kv_l = torch.randn(n, L, 2, H, dh, generator=g).to(dtype).requires_grad_()
    go = torch.randn(n, L, H, dh, generator=g).to(dtype)
    return q, kv_x, kv_l, go


@pytest.mark.parametrize("backend, dtype", [(b, d) for b in BACKENDS
                                            for d in (torch.float32, torch.bfloat16, torch.float64)
                                            if not (b == "triton" and d == torch.float64)])  # triton: 32/16-bit
@pytest.mark.parametrize("S", [1, 49, 257])
def test_equals_the_unpacked_op_bit_for_bit(backend, dtype, S):
    """Output and every gradient equal the unpacked op's on the halves (the same kernels);
    the packed gradients are contiguous in the packed layout."""
    L = 8 if backend == "triton" else 16
    q, kv_x, kv_l, go = _packed(2, L, S, 2, 64, dtype)
    out = resampler_attention_kvpacked(q, kv_x, kv_l, backend=backend)
    gq, gkv_x, gkv_l = torch.autograd.grad(out, (q, kv_x, kv_l), go)
    halves = [t.detach().clone().requires_grad_() for t in (q, *kv_x.unbind(2), *kv_l.unbind(2))]
    want = resampler_attention(*halves, backend=backend)
    wq, wkx, wvx, wkl, wvl = torch.autograd.grad(want, halves, go)
    assert torch.equal(out, want) and torch.equal(gq, wq)
    assert gkv_x.shape == kv_x.shape and gkv_x.is_contiguous() and gkv_l.is_contiguous()
    assert torch.equal(gkv_x, torch.stack((wkx, wvx), 2)) and torch.equal(gkv_l, torch.stack((wkl, wvl), 2))
    if dtype == torch.float32:  # and both are the specification's
        d = [t.detach().double() for t in halves]
        assert torch.allclose(out.double(), ref.resampler_attention(*d), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _cpp_backends.AVAILABLE, reason="flamingo_rt._C not built")
def test_cpu_backend_writes_the_packed_gradients_itself(monkeypatch):
    """On the cpu backend the packed backward is the C++ op's (the kernel writes d[K | V] in
    place): the unpacked backward, whose separate gradients would be stacked, is not called."""
    from flamingo_rt.ops import _cpp_backends as cb

    assert "cpu" in be.implemented(OP + ".backward_kvpacked")
    calls = []
    unpacked = be.get(OP + ".backward", "cpu")
    monkeypatch.setitem(be._IMPLS[OP + ".backward"], "cpu", lambda *a: calls.append(1) or unpacked(*a))
    q, kv_x, kv_l, go = _packed(3, 16, 49, 2, 64, torch.float32)
    torch.autograd.grad(resampler_attention_kvpacked(q, kv_x, kv_l, backend="cpu"), (q, kv_x, kv_l), go)
    assert calls == [] and cb.AVAILABLE


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck(backend):
    q, kv_x, kv_l, _ = _packed(2, 3, 5, 2, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: resampler_attention_kvpacked(*t, backend=backend), (q, kv_x, kv_l))


@pytest.mark.skipif(not _cpp_backends.AVAILABLE, reason="flamingo_rt._C not built")
def test_ops_pass_opcheck_and_compile():
    """Schemas, fake kernels and autograd registrations agree with the real ones (the C++
    packed backward and both flamingo_rt custom ops); torch.compile(fullgraph=True) takes
    forward and backward."""
    q, kv_x, kv_l, go = _packed(2, 8, 21, 2, 64, torch.float32)
    k_x, v_x = kv_x.detach().unbind(2)
    k_l, v_l = kv_l.detach().unbind(2)
    torch.library.opcheck(torch.ops.flamingo_rt_C.resampler_attention_backward_kvpacked,
                          (go, q.detach(), k_x, v_x, k_l, v_l, 0.125), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.flamingo_rt.resampler_attention_kvpacked, (q, kv_x, kv_l, 0.125, "cpu"))
    torch.library.opcheck(torch.ops.flamingo_rt.resampler_attention_kvpacked_backward,
                          (go, q.detach(), kv_x.detach(), kv_l.detach(), 0.125, "cpu"))

    def f(q, kv_x, kv_l):
        return resampler_attention_kvpacked(q, kv_x, kv_l, backend="cpu")

    want = torch.autograd.grad(f(q, kv_x, kv_l), (q, kv_x, kv_l), go)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, kv_x, kv_l), (q, kv_x, kv_l), go)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_errors_say_what_was_expected():
    q, kv_x, kv_l, _ = _packed(2, 4, 7, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"kv_x of shape \(2, S, 2, 2, 8\)"):
        resampler_attention_kvpacked(q, kv_x[:, :, 0], kv_l)
    with pytest.raises(ValueError, match=r"kv_l of shape \(2, 4, 2, 2, 8\)"):
        resampler_attention_kvpacked(q, kv_x, kv_l[:, :3])
    with pytest.raises(TypeError, match="kv_x of dtype torch.float32"):
        resampler_attention_kvpacked(q, kv_x.double(), kv_l)
