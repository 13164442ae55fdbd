"""Plain eager calls of the registered ops (flamingo_rt/ops/_eager.py): the implementation or
an autograd.Function in plain eager mode, the torch.library op everywhere else; the same
results either way."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flamingo_rt.ops as ops
from flamingo_rt.ops import _eager
from flamingo_rt.ops import resampler as rs_mod
from flamingo_rt.ops import xattn as xa_mod


class _Record(TorchDispatchMode):
    """Records the names of the ops dispatched below it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _xattn_inputs(requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, M, N, H, dh = 2, 9, 3, 5, 2, 16
    q = torch.randn(B, T, H, dh, generator=g)
    k = torch.randn(B, M, N, H, dh, generator=g)
    v = torch.randn(B, M, N, H, dh, generator=g)
    idx = torch.tensor([[-1, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, -1, -1, -1]], dtype=torch.int32)
    go = torch.randn(B, T, H, dh, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)], idx, go


def _resampler_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, L, S, H, dh = 3, 4, 7, 2, 16
    shapes = [(n, L, H, dh), (n, S, H, dh), (n, S, H, dh), (n, L, H, dh), (n, L, H, dh)]
    xs = [torch.randn(*s, generator=g).requires_grad_(True) for s in shapes]
    return xs, torch.randn(n, L, H, dh, generator=g)


def _xattn_run(backend="cpu"):
    (q, k, v), idx, go = _xattn_inputs()
    out = ops.image_causal_attention(q, k, v, idx, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), go))


def _resampler_run(backend="cpu"):
    xs, go = _resampler_inputs()
    out = ops.resampler_attention(*xs, backend=backend)
    return (out, *torch.autograd.grad(out, xs, go))


@pytest.mark.parametrize("run", [_xattn_run, _resampler_run], ids=["xattn", "resampler"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_eager_path_equals_registered_op_bitwise(monkeypatch, run, backend):
    eager = run(backend)
    monkeypatch.setenv("FLAMINGO_RT_EAGER_OPS", "0")
    registered = run(backend)
    for a, b in zip(eager, registered):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def _forbid_registered(monkeypatch, eager_op):
    def fail(*args):
        raise AssertionError("the registered op ran on a plain eager call")
    monkeypatch.setattr(eager_op, "op", fail)


def test_plain_eager_calls_skip_the_registered_op(monkeypatch):
    _forbid_registered(monkeypatch, xa_mod._xattn)
    _forbid_registered(monkeypatch, xa_mod._xattn_bwd)
    _forbid_registered(monkeypatch, rs_mod._resampler)
    _forbid_registered(monkeypatch, rs_mod._resampler_bwd)
    out, dq, dk, dv = _xattn_run()
    assert "function" in type(out.grad_fn).__name__.lower()
    _resampler_run()
    with torch.no_grad():  # no autograd at all: the implementation itself
        (q, k, v), idx, _ = _xattn_inputs()
        y = ops.image_causal_attention(q, k, v, idx, backend="cpu")
    assert y.grad_fn is None and not y.requires_grad
    (q, k, v), idx, _ = _xattn_inputs(requires_grad=False)
    assert ops.image_causal_attention(q, k, v, idx, backend="cpu").grad_fn is None


def test_modes_and_the_switch_take_the_registered_op(monkeypatch):
    (q, k, v), idx, go = _xattn_inputs()
    with _Record() as rec:  # a dispatch mode sees the op, forward and backward
        out = ops.image_causal_attention(q, k, v, idx, backend="cpu")
        torch.autograd.grad(out, (q, k, v), go)
    assert "flamingo_rt.image_causal_attention.default" in rec.names
    assert "flamingo_rt.image_causal_attention_backward.default" in rec.names
    with torch.device("cpu"):  # a function mode
        assert not _eager.plain((q,))
    monkeypatch.setenv("FLAMINGO_RT_EAGER_OPS", "0")
    out = ops.image_causal_attention(q, k, v, idx, backend="cpu")
    assert "function" not in type(out.grad_fn).__name__.lower()


def test_plain_rejects_subclasses_compile_and_functorch():
    class Sub(torch.Tensor):
        pass

    t = torch.zeros(2)
    assert _eager.plain((t, torch.nn.Parameter(torch.zeros(1)), 1.0, "cpu"))
    assert not _eager.plain((t.as_subclass(Sub),))
    seen = []

    def f(x):
        seen.append(_eager.plain((x,)))
        return x * 2

    torch.func.vmap(f)(torch.zeros(3, 2))
    torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == [False, False]


@pytest.mark.parametrize("eager", ["1", "0"])
def test_double_backward_raises(monkeypatch, eager):
    """Neither path has a second derivative: both say so (never a silent zero)."""
    monkeypatch.setenv("FLAMINGO_RT_EAGER_OPS", eager)
    (q, k, v), idx, go = _xattn_inputs()
    out = ops.image_causal_attention(q, k, v, idx, backend="cpu")
    dq, _, _ = torch.autograd.grad(out, (q, k, v), go.requires_grad_(True), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        dq.sum().backward()


def test_fake_tensors_and_compile_still_see_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    (q, k, v), idx, _ = _xattn_inputs(requires_grad=False)
    with FakeTensorMode() as mode:
        fq, fk, fv, fi = (mode.from_tensor(t) for t in (q, k, v, idx))
        y = ops.image_causal_attention(fq, fk, fv, fi, backend="cpu")
    assert y.shape == q.shape
    f = torch.compile(lambda a, b, c: ops.image_causal_attention(a, b, c, idx, backend="cpu"), backend="eager",
                      fullgraph=True)
    assert torch.equal(f(q, k, v), ops.image_causal_attention(q, k, v, idx, backend="cpu"))


def test_eager_op_needs_both_parts_of_the_autograd_formula():
    with pytest.raises(ValueError, match="setup_context and backward"):
        _eager.EagerOp(lambda x: x, lambda x: x, setup_context=lambda ctx, i, o: None)
