"""The chunked LM-head + cross-entropy against its plain-torch specification."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from conftest import rel_err, use_bf16_products


def _inputs(N, D, V, dtype, ignore_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = -100
    return h, w, t


def _exact(h, w, t, ignore_index=-100):
    """float64 throughout (the specification's ``.float()`` would round float64 logits)."""
    return torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(h.double(), w.double()), t, ignore_index=ignore_index, reduction="sum").float()


def _loss_and_grads(fn, h, w, t, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, t, **kw)
    (loss * 0.37).backward()  # a non-unit incoming gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_matches_reference(chunk, dtype, tol):
    h, w, t = _inputs(29, 24, 101, dtype)
    spec = _exact if dtype == torch.float64 else linear_cross_entropy_reference
    want = _loss_and_grads(spec, h, w, t)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=chunk)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) < tol, (rel_err(a, b), tol)
    # float64 reference of the float32 run: as accurate as the plain path (2x plus a floor)
    if dtype == torch.float32:
        exact = _loss_and_grads(_exact, h.double(), w.double(), t)
        for a, b, e in zip(got, want, exact):
            assert rel_err(a, e) <= 2 * rel_err(b, e) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_matches_the_plain_path(dtype):
    """float32 weights and hidden states, products in the autocast dtype (as F.linear would),
    the softmax in float32; within the autocast dtype's rounding of the plain path."""
    h, w, t = _inputs(40, 32, 257, torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        want = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
        got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=9)
    exact = _loss_and_grads(_exact, h.double(), w.double(), t)
    for a, b, e in zip(got, want, exact):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) < 2e-2
        assert rel_err(a, e) <= 2 * rel_err(b, e) + 1e-3


def test_frozen_weight_no_weight_gradient_and_no_grad_mode():
    h, w, t = _inputs(16, 8, 33, torch.float32)
    w = w.detach()
    h = h.detach().requires_grad_()
    loss = linear_cross_entropy(h, w, t, chunk_rows=5)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    linear_cross_entropy_reference(h2, w, t).backward()
    assert w.grad is None and rel_err(h.grad, h2.grad) < 2e-6
    with torch.no_grad():
        out = linear_cross_entropy(h, w, t)
    assert not out.requires_grad and torch.allclose(out, loss.detach())


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    h, w, _ = _inputs(6, 8, 11, torch.float32)
    t = torch.full((6,), -100)
    loss, gh, gw = _loss_and_grads(linear_cross_entropy, h, w, t)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_rows_without_a_loss_are_never_multiplied(monkeypatch):
    """Ignored rows (padding, <image> targets) never reach the head's products, and their
    gradient is exactly 0; the loss and the other rows' gradients are the reference's."""
    from flamingo_rt.ops import linear_cross_entropy as lce

    rows = []
    real = lce._WeightBlocks.logits
    monkeypatch.setattr(lce._WeightBlocks, "logits", lambda self, h: rows.append(h.shape[0]) or real(self, h))
    h, w, t = _inputs(40, 16, 53, torch.float32, ignore_frac=0.4)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=8)
    valid = t != -100
    assert 0 < int(valid.sum()) < 40 and sum(rows) == int(valid.sum())
    assert not got[1][~valid].any()
    want = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-6


def test_errors_say_what_was_expected():
    h, w, t = _inputs(4, 8, 11, torch.float32)
    with pytest.raises(IndexError, match=r"\[0, 11\)"):
        linear_cross_entropy(h, w, torch.tensor([0, 11, -100, 3]))
    with pytest.raises(ValueError, match=r"targets of shape \(4,\)"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="hidden \\(N, D\\) and weight \\(V, D\\)"):
        linear_cross_entropy(h, w[:, :5], t)
    with pytest.raises(TypeError, match="one dtype"):
        linear_cross_entropy(h, w.double(), t)


def test_never_holds_more_than_one_chunk_of_logits():
    """No op creates a tensor with more than chunk_rows x V elements (besides the weight's
    gradient), forward or backward: the (N, V) logits never exist."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.shape != w.shape and o.shape != w.shape[::-1]:
                    Largest.biggest = max(Largest.biggest, o.numel())
            return out

    h, w, t = _inputs(64, 16, 300, torch.float32)
    with Largest():
        linear_cross_entropy(h, w, t, chunk_rows=8).backward()
    assert 0 < Largest.biggest <= 8 * 300
    Largest.biggest = 0
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with Largest():
        linear_cross_entropy_reference(h2, w2, t).backward()
    assert Largest.biggest >= 64 * 300  # the plain path does hold them (the check can see it)


def _xent_spec(logits, t, ignore_index=-100):
    """float64 loss per row and softmax - onehot (0 rows where ignored)."""
    x = logits.double()
    valid = t != ignore_index
    tt = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(x, -1)
    loss = torch.where(valid, lse - x.gather(1, tt[:, None])[:, 0], torch.zeros_like(lse))
    g = (x - lse[:, None]).exp()
    g[torch.arange(len(t)), tt] -= 1
    return loss, g * valid[:, None]


def test_softmax_xent_rows_kernel_one_dominant_logit_among_many_small():
    """A row whose largest logit (exp 1) stands ~17 above 32,767 others: each of their exps
    (~4e-8, 1.4e-3 in all) is below half a float32 ulp of 1, so a float32 partial sum that
    holds the 1 drops every term it adds (its vector lane's share: the softmax 1.7e-4 off
    with 8 lanes, 8e-5 with 16); the kernel sums in float64."""
    from flamingo_rt import _ext

    if not _ext.load():
        pytest.skip("C++ extension not built")
    V = 1 << 15
    logits = torch.full((3, V), -17.0)
    logits[:, 0] = 0.0
    logits[1, 1:] = torch.linspace(-18.0, -16.0, V - 1)
    t = torch.tensor([0, 5, V - 1])
    want_loss, want_g = _xent_spec(logits, t)
    loss = torch.ops.flamingo_rt_C.softmax_xent_rows_(logits, t, -100, True, 1.0)
    assert rel_err(loss, want_loss.float()) < 1e-6
    assert torch.allclose(logits.double(), want_g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
def test_softmax_xent_rows_kernel(dtype, tol):
    """flamingo_rt_C::softmax_xent_rows_ against float64: the per-row loss, and the gradient
    written over the logits (rounded once to their dtype), with ignored rows, a row stride
    wider than the row, a scale; the logits untouched without write_grad."""
    from flamingo_rt import _ext

    if not _ext.load():
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(3)
    wide = (torch.randn(13, 1100, generator=g) * 4).to(dtype)
    logits = wide[:, :1037]  # row stride 1100
    logits[2, 5] = 60.0  # a dominant logit
    t = torch.randint(0, 1037, (13,), generator=g)
    t[[1, 7]] = -100
    want_loss, want_g = _xent_spec(logits, t)
    keep, tail = logits.clone(), wide[:, 1037:].clone()
    loss = torch.ops.flamingo_rt_C.softmax_xent_rows_(logits, t, -100, False, 1.0)
    assert torch.equal(logits, keep)
    assert loss.dtype == torch.float32 and loss[1] == 0 and loss[7] == 0
    assert rel_err(loss, want_loss.float()) < 1e-6
    loss2 = torch.ops.flamingo_rt_C.softmax_xent_rows_(logits, t, -100, True, 0.5)
    assert torch.equal(loss, loss2)
    assert not logits[[1, 7]].any()
    assert rel_err(logits, (0.5 * want_g).to(dtype)) < tol
    # each gradient element is the float64 value rounded once to the dtype (a few ulp in float32)
    assert torch.allclose(logits.double(), 0.5 * want_g, rtol=tol, atol=1e-7)
    assert torch.equal(wide[:, 1037:], tail)  # past the row's end: untouched


def test_softmax_xent_rows_errors():
    from flamingo_rt import _ext

    if not _ext.load():
        pytest.skip("C++ extension not built")
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match=r"targets in \[0, 10\)"):
        torch.ops.flamingo_rt_C.softmax_xent_rows_(x, torch.tensor([0, 10, 2]), -100, True, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.flamingo_rt_C.softmax_xent_rows_(x.double(), torch.tensor([0, 1, 2]), -100, True, 1.0)
    with pytest.raises(RuntimeError, match="unit element stride"):
        torch.ops.flamingo_rt_C.softmax_xent_rows_(x.t(), torch.tensor([0, 1] * 5), -100, True, 1.0)
    with pytest.raises(RuntimeError, match=r"int64 targets of shape \(3\)"):
        torch.ops.flamingo_rt_C.softmax_xent_rows_(x, torch.tensor([0, 1]), -100, True, 1.0)


@pytest.mark.parametrize("widening", [True, False])
def test_float32_weight_under_bf16_autocast_is_cast_a_block_at_a_time(monkeypatch, widening):
    """A float32 LM head under bf16 autocast: its bf16 cast made a block at a time (vocabulary
    rows for the logits, and for the hidden states' gradient where the widening product sums
    them; the weight's columns otherwise; ragged last blocks), the results assembled from the
    blocks: the plain path's values within bf16 rounding, as accurate against float64, and
    no cast tensor larger than a block."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import flamingo_rt.ops.linear_cross_entropy as lce
    from flamingo_rt.ops import cast_blocks

    use_bf16_products("widening" if widening else "rounded", monkeypatch)
    D, V = 32, 257
    monkeypatch.setattr(cast_blocks, "BLOCK_BYTES", 40 * D * 2)  # 40-row blocks: 7 of them
    h, w, t = _inputs(50, D, V, torch.float32)
    w = w.detach()
    assert lce._WeightBlocks(w, torch.bfloat16).blockwise

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.copy_.default and out.dtype == torch.bfloat16 and out.dim() == 2 \
                    and args[1].dtype == torch.float32:  # a block of the weight cast into the buffer
                Largest.biggest = max(Largest.biggest, out.numel())
            return out

    def run(fn, **kw):
        hh = h.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hh, w, t, **kw)
        (loss * 0.37).backward()
        return loss.detach(), hh.grad

    with Largest():
        got = run(linear_cross_entropy, chunk_rows=20)
    want = run(linear_cross_entropy_reference)
    exact = _loss_and_grads(_exact, h.double(), w.double(), t)
    for a, b, e in zip(got, want, exact):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) < 2e-2
        assert rel_err(a, e) <= 2 * rel_err(b, e) + 1e-3
    assert 0 < Largest.biggest <= 40 * D  # one block of the cast weight at a time, never (V, D)
