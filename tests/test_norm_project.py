"""flamingo_rt::norm_project (shared LayerNorm statistics + several projections): values
and gradients against LayerNorm -> Linear, gradcheck in float64, autocast bf16, meta."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.ops import norm_project
from conftest import rel_err, use_bf16_products


def _params(n, D, O, dtype=torch.float32):
    g = [(1 + 0.3 * torch.randn(D, dtype=dtype)).requires_grad_() for _ in range(n)]
    b = [(0.2 * torch.randn(D, dtype=dtype)).requires_grad_() for _ in range(n)]
    w = [(torch.randn(O, D, dtype=dtype) * D ** -0.5).requires_grad_() for _ in range(n)]
    return g, b, w


def _ref(x, g, b, w, eps=1e-5):
    return [F.linear(F.layer_norm(x, (x.shape[-1],), gi, bi, eps), wi) for gi, bi, wi in zip(g, b, w)]


@pytest.mark.parametrize("x_grad", [False, True])
def test_matches_layernorm_linear_fp32(x_grad):
    torch.manual_seed(0)
    x = (torch.randn(3, 37, 48) * 2 + 0.5).requires_grad_(x_grad)
    g, b, w = _params(3, 48, 40)
    outs = norm_project(x, g, b, w)
    refs = _ref(x, g, b, w)
    gos = [torch.randn_like(r) for r in refs]
    leaves = ([x] if x_grad else []) + g + b + w
    got = torch.autograd.grad(outs, leaves, gos)
    want = torch.autograd.grad(refs, leaves, gos)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and rel_err(o, r) < 1e-5
    for a, c in zip(got, want):
        assert rel_err(a, c) < 1e-5


def test_unused_output_and_gradcheck_float64():
    torch.manual_seed(1)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    g, b, w = _params(2, 6, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda x, *p: tuple(norm_project(x, p[0:2], p[2:4], p[4:6])), (x, *g, *b, *w))
    # only one of the outputs used: the other's parameters get no gradient (each projection
    # its own node), or a zero one (one node for all, as in traced graphs)
    for x_grad in (True, False):
        xi = x.detach().requires_grad_(x_grad)
        out = norm_project(xi, g, b, w)[1].sum()
        ref = _ref(xi, g, b, w)[1].sum()
        leaves = ([xi] if x_grad else []) + [*g, *b, *w]
        got = torch.autograd.grad(out, leaves, allow_unused=True)
        for a, c in zip(got, torch.autograd.grad(ref, leaves, allow_unused=True)):
            assert (c is None and (a is None or float(a.abs().max()) == 0)) or rel_err(a, c) < 1e-10


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("rows_first", [False, True])
@pytest.mark.parametrize("widening", [False, True])
def test_autocast_bf16_close_to_float32_like_layernorm_linear(monkeypatch, x_grad, rows_first, widening):
    """Three projections (the input gradient summed over them in float32) with the widening
    blocks shrunk to 16 rows, so the bf16 column sums and the bf16 -> float32 adds run in
    several blocks; with ``rows_first`` the weight gradients go as G^T = xhat^T dy (the path
    of D >= cpu_gemm.ROWS_FIRST_MIN_N, shrunk here), and equal the other path's bitwise.
    ``widening``: MKL's float32-accumulating bf16 products (widening_gemm; forced on
    wherever torch carries them, whatever the CPU), else torch's bf16 products widened."""
    from flamingo_rt.ops import cpu_gemm, precision
    use_bf16_products("widening" if widening else "rounded", monkeypatch)
    monkeypatch.setattr(precision, "WIDEN_BLOCK_BYTES", 16 * 96 * 4)
    if rows_first:
        if not cpu_gemm.bf16_available():
            pytest.skip("rows first is taken only where oneDNN runs torch's bf16 products (not on this CPU)")
        monkeypatch.setattr(cpu_gemm, "ROWS_FIRST_MIN_N", 16)
        spy = []
        orig = cpu_gemm.transpose_rows
        monkeypatch.setattr(cpu_gemm, "transpose_rows", lambda a: spy.append(tuple(a.shape)) or orig(a))
    torch.manual_seed(2)
    x = torch.randn(200, 64).requires_grad_(x_grad)
    g, b, w = _params(3, 64, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = norm_project(x, g, b, w)
        refs = _ref(x, g, b, w)
    exact = _ref(x.double(), [t.double() for t in g], [t.double() for t in b], [t.double() for t in w])
    for o, r, e in zip(outs, refs, exact):
        assert o.dtype == torch.bfloat16 == r.dtype
        assert rel_err(o, e) <= 2 * rel_err(r, e) + 1e-3
    gos = [torch.randn_like(e).float() for e in exact]
    leaves = ([x] if x_grad else []) + g + b + w
    got = torch.autograd.grad([o.float() for o in outs], leaves, gos)
    want = torch.autograd.grad([r.float() for r in refs], leaves, gos)
    truth = torch.autograd.grad([e.float() for e in _ref(x, g, b, w)], leaves, gos)
    for a, c, t in zip(got, want, truth):
        assert a.dtype == torch.float32
        assert rel_err(a, t) <= 3 * rel_err(c, t) + 1e-3
    if rows_first:
        assert (64, 200) in spy  # xhat^T, copied to rows once
        monkeypatch.setattr(cpu_gemm, "ROWS_FIRST_MIN_N", 1 << 30)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs2 = norm_project(x, g, b, w)
        again = torch.autograd.grad([o.float() for o in outs2], leaves, gos)
        for a, c in zip(got, again):
            assert torch.equal(a, c)


def test_meta_and_errors():
    x = torch.empty(4, 8, 16, device="meta")
    g, b, w = [torch.empty(16, device="meta")], [torch.empty(16, device="meta")], [torch.empty(32, 16, device="meta")]
    (y,) = norm_project(x, g, b, w)
    assert y.shape == (4, 8, 32) and y.device.type == "meta"
    with pytest.raises(ValueError, match="weight of shape"):
        norm_project(torch.randn(2, 16), [torch.ones(16)], [torch.zeros(16)], [torch.randn(3, 15)])
    with pytest.raises(ValueError, match="as many"):
        norm_project(torch.randn(2, 16), [torch.ones(16)], [], [torch.randn(3, 16)])


@pytest.mark.parametrize("x_grad", [False, True])
def test_one_node_per_projection(x_grad):
    """Eager mode: one autograd node per projection, so that each projection's backward runs
    on its own output gradient alone (the K/V gradients of the resampler's layers are freed
    one by one). With x's gradient they share one normalization node, whose backward takes
    the input gradient summed across the projections in float32. Same values either way."""
    torch.manual_seed(7)
    x = torch.randn(2, 30, 32).requires_grad_(x_grad)
    g, b, w = _params(3, 32, 24)
    outs = norm_project(x, g, b, w)
    nodes = [o.grad_fn.next_functions[0][0] for o in outs]  # under each output's view
    assert len({id(n) for n in nodes}) == 3
    if x_grad:
        norms = {id(f) for n in nodes for f, _ in n.next_functions if f is not None and "Normalize" in f.name()}
        assert len(norms) == 1
    refs = _ref(x, g, b, w)
    only_first = torch.autograd.grad(outs[0].sum(), [g[0], b[0], w[0]], retain_graph=True)
    want = torch.autograd.grad(refs[0].sum(), [g[0], b[0], w[0]], retain_graph=True)
    for a, c in zip(only_first, want):
        assert rel_err(a, c) < 1e-5
    if x_grad:  # twice over the same graph: the float32 sum starts anew each backward
        gos = [torch.randn_like(r) for r in refs]
        want = torch.autograd.grad(refs, [x], gos, retain_graph=True)[0]
        for _ in range(2):
            assert rel_err(torch.autograd.grad(outs, [x], gos, retain_graph=True)[0], want) < 1e-5
        assert rel_err(torch.autograd.grad(outs[2], [x], gos[2])[0], torch.autograd.grad(refs[2], [x], gos[2])[0]) < 1e-5
    with torch.no_grad():
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(norm_project(x, g, b, w), refs))


def test_inference_computes_each_projection_when_taken(monkeypatch):
    """No gradient anywhere (inference): one product per take, so only the outputs still
    referenced are alive (not all of them from the first take); same values."""
    import importlib

    npm = importlib.import_module("flamingo_rt.ops.norm_project")
    from flamingo_rt.ops import norm_project_iter

    torch.manual_seed(9)
    x = torch.randn(3, 10, 32)
    g, b, w = _params(4, 32, 16)
    calls = []
    real_cached, real = npm._folded_cached, npm._forward
    monkeypatch.setattr(npm, "_folded_cached", lambda *a, **k: calls.append(1) or real_cached(*a, **k))
    monkeypatch.setattr(npm, "_forward", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    refs = _ref(x, g, b, w)
    with torch.no_grad():
        it = norm_project_iter(x, g, b, w)
        assert calls == []
        o0 = next(it)
        assert calls == [1]  # the first projection alone
        outs = [o0, *it]
    assert calls == [1, 1, 1, 1]
    assert all(rel_err(o, r) < 1e-5 for o, r in zip(outs, refs))


def test_inference_folded_weights_cached_until_a_parameter_changes():
    """Inference keeps each weight's folded form (W diag(gamma), W beta) between calls:
    the outputs are bitwise those of the op path, a second call folds nothing, and an in-place
    update of gamma, beta or W (an optimizer step, load_state_dict) is seen at the next call."""
    import importlib

    npm = importlib.import_module("flamingo_rt.ops.norm_project")
    from flamingo_rt.ops import norm_project_iter

    torch.manual_seed(10)
    x = torch.randn(2, 9, 32)
    g, b, w = _params(3, 32, 24)
    folds = []
    real = npm._folded
    npm_folded = lambda *a: folds.append(1) or real(*a)  # noqa: E731
    try:
        npm._folded = npm_folded
        with torch.no_grad():
            first = list(norm_project_iter(x, g, b, w))
            assert len(folds) == 3
            again = list(norm_project_iter(x, g, b, w))
            assert len(folds) == 3  # all three from the cache
            op_path = [norm_project(x, [gi], [bi], [wi])[0] for gi, bi, wi in zip(g, b, w)]  # folds anew
            n = len(folds)
            for a, c, o in zip(first, again, op_path):
                assert torch.equal(a, c) and torch.equal(a, o)
            g[1].mul_(1.5)
            b[2].add_(0.25)
            w[0].mul_(-1.0)
            updated = list(norm_project_iter(x, g, b, w))
            assert len(folds) == n + 3
        for o, r in zip(updated, _ref(x, g, b, w)):
            assert rel_err(o, r) < 1e-5
    finally:
        npm._folded = real


def test_inference_with_inference_tensor_weights_folds_uncached():
    """Parameters made under ``torch.inference_mode`` have no version counter: their folded
    forms are made at each call (an update could not be seen), with the right values."""
    import importlib

    npm = importlib.import_module("flamingo_rt.ops.norm_project")
    from flamingo_rt.ops import norm_project_iter

    torch.manual_seed(11)
    with torch.inference_mode():
        x = torch.randn(2, 9, 32)
        g, b, w = _params(3, 32, 24)
        before = len(npm._FOLDED_CACHE)
        outs = list(norm_project_iter(x, g, b, w))
        g[0].mul_(2.0)  # seen: nothing was cached
        outs2 = list(norm_project_iter(x, g, b, w))
        assert len(npm._FOLDED_CACHE) == before
    for o, r in zip(outs2, _ref(x, g, b, w)):
        assert rel_err(o, r) < 1e-5
    assert not torch.equal(outs[0], outs2[0])


@pytest.mark.parametrize("x_grad", [False, True])
def test_iter_computes_each_projection_when_taken(x_grad):
    """norm_project_iter: output i's node is created when it is taken, after whatever ran
    before (so the engine runs its backward right after those ops'), whether x needs a
    gradient or not."""
    from flamingo_rt.ops import norm_project_iter

    torch.manual_seed(8)
    g, b, w = _params(3, 16, 8)
    x = torch.randn(5, 16).requires_grad_(x_grad)
    it = norm_project_iter(x, g, b, w)
    o0 = next(it)
    between = (o0 * 2).sum()
    o1 = next(it)
    node = lambda o: o.grad_fn.next_functions[0][0]  # noqa: E731  (under the output's view)
    assert node(o1)._sequence_nr() > between.grad_fn._sequence_nr() > node(o0)._sequence_nr()
    refs = _ref(x, g, b, w)
    assert all(rel_err(o, r) < 1e-5 for o, r in zip([o0, o1, *it], refs))
    with pytest.raises(ValueError, match="as many gammas"):
        norm_project_iter(x, g[:2], b, w)  # checked at the call, not at the first take
