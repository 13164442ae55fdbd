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


def _resampler_kvpacked_run(backend="cpu"):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 2, 16, generator=g).requires_grad_(True)
    kv_x = torch.randn(3, 7, 2, 2, 16, generator=g).requires_grad_(True)
    kv_l = torch.randn(3, 4, 2, 2, 16, generator=g).requires_grad_(True)
    out = ops.resampler_attention_kvpacked(q, kv_x, kv_l, backend=backend)
    return (out, *torch.autograd.grad(out, (q, kv_x, kv_l), torch.randn(out.shape, generator=g)))


def _grads(out, inputs, seed=3):
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out, *torch.autograd.grad(out, inputs, go))


def _ff_run(backend=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    R, D, inner = 6, 16, 40
    xs = [torch.randn(R, D, generator=g), 1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g),
          0.2 * torch.randn(inner, D, generator=g), 0.2 * torch.randn(D, inner, generator=g),
          torch.full((1,), 0.3)]
    xs = [t.requires_grad_(True) for t in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = ops.feed_forward(*xs[:5], residual=True, gate=xs[5])
    return _grads(out, xs)


def _glr_run(backend=None):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 8, generator=g), 0.2 * torch.randn(16, 8, generator=g),
          torch.full((1,), 0.4)]
    xs = [t.requires_grad_(True) for t in xs]
    return _grads(ops.gated_linear_residual(*xs), xs)


def _nf_run(backend="cpu"):
    g = torch.Generator().manual_seed(4)
    w = (0.2 * torch.randn(6, 4, 3, 3, generator=g)).requires_grad_(True)
    gain = (1 + 0.1 * torch.randn(6, 1, 1, 1, generator=g)).requires_grad_(True)
    x = torch.randn(2, 6, 5, 5, generator=g).requires_grad_(True)
    b = torch.randn(6, generator=g).requires_grad_(True)
    gl = torch.randn(2, 6, generator=g).requires_grad_(True)
    sc = torch.randn(2, 6, 5, 5, generator=g).requires_grad_(True)
    scale = torch.tensor(0.7, requires_grad=True)
    ws = ops.ws_standardize(w, gain, backend=backend)
    a = ops.bias_gamma_act(x, b, "gelu", 1.7, backend=backend)
    y = ops.se_residual(a, gl, sc, scale, backend=backend)
    out = torch.cat([ws.reshape(-1), y.reshape(-1)])
    return _grads(out, [w, gain, x, b, gl, sc, scale])


def _np_run(backend=None):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 16, generator=g).requires_grad_(True)
    ps = [t.requires_grad_(True) for t in (1 + 0.1 * torch.randn(16, generator=g), 0.1 * torch.randn(16, generator=g),
                                           0.2 * torch.randn(12, 16, generator=g))]
    with torch.no_grad():  # inference: the implementation itself (Tensor[] arguments)
        inf = ops.norm_project(x, [ps[0]], [ps[1]], [ps[2]])[0]
    (y,) = ops.norm_project(x, [ps[0]], [ps[1]], [ps[2]])  # gradients: the registered op
    return (inf, *_grads(y, [x, *ps]))


RUNS = {"xattn": _xattn_run, "resampler": _resampler_run, "resampler_kvpacked": _resampler_kvpacked_run,
        "feed_forward": _ff_run,
        "gated_linear_residual": _glr_run, "nfnet_ops": _nf_run, "norm_project": _np_run}


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_eager_path_equals_registered_op_bitwise(monkeypatch, name, backend):
    run = RUNS[name]
    eager = run(backend)
    monkeypatch.setenv("FLAMINGO_RT_EAGER_OPS", "0")
    registered = run(backend)
    assert len(eager) == len(registered) > 1
    for a, b in zip(eager, registered):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_eager_path_under_autocast_bitwise(monkeypatch):
    eager = _ff_run(dtype=torch.bfloat16)
    monkeypatch.setenv("FLAMINGO_RT_EAGER_OPS", "0")
    for a, b in zip(eager, _ff_run(dtype=torch.bfloat16)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _eager_ops():
    import importlib

    mods = [importlib.import_module(f"flamingo_rt.ops.{m}")
            for m in ("xattn", "resampler", "feed_forward", "gated_linear_residual", "nfconv", "norm_project")]
    found = [v for m in mods for v in vars(m).values() if isinstance(v, _eager.EagerOp)]
    assert len(found) == 20, len(found)  # 2 + 4 + 3 + 2 + 7 + 2
    return found


def _forbid_registered(monkeypatch, eager_op):
    def fail(*args):
        raise AssertionError("the registered op ran on a plain eager call")
    monkeypatch.setattr(eager_op, "op", fail)


def test_plain_eager_calls_skip_the_registered_op(monkeypatch):
    import importlib

    np_mod = importlib.import_module("flamingo_rt.ops.norm_project")
    for eager_op in _eager_ops():
        if eager_op is not np_mod._norm_project:  # its calls with gradients take the op (Tensor[])
            _forbid_registered(monkeypatch, eager_op)
    out, dq, dk, dv = _xattn_run()
    assert "function" in type(out.grad_fn).__name__.lower()
    for run in RUNS.values():
        run()
    _forbid_registered(monkeypatch, np_mod._norm_project)
    with torch.no_grad():
        ops.norm_project(torch.randn(3, 8), [torch.ones(8)], [torch.zeros(8)], [torch.randn(4, 8)])
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


def test_list_arguments_needing_gradients_take_the_registered_op():
    """An autograd.Function does not see tensors inside lists: such calls go to the op."""
    calls = []
    op = _eager.EagerOp(lambda xs: calls.append("op") or xs[0] * 2, lambda xs: calls.append("impl") or xs[0] * 2,
                        setup_context=lambda ctx, inputs, out: None, backward=lambda ctx, g: (None,))
    t = torch.ones(2, requires_grad=True)
    op([t])
    with torch.no_grad():
        op([t])
    assert calls == ["op", "impl"]
