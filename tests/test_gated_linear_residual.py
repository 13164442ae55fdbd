"""flamingo_rt::gated_linear_residual (x + gate * o W^T, keeping o only) against the module
path (Linear then addcmul): values, every gradient (the gate's exact), gradcheck in
float64, autocast bf16, opcheck, what it keeps for the backward, errors; and the block
that uses it keeps no (T, D) branch output."""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.ops import gated_linear_residual
from flamingo_rt.ops.gated_linear_residual import _glr_op, module_gated_linear_residual
from conftest import rel_err


def _ref(x, o, w, gate):
    y = torch.nn.functional.linear(o, w)
    return x + y if gate is None else torch.addcmul(x, gate, y)


def _leaves(lead, D, K, gate=None, dtype=torch.float32):
    """Random x (*lead, D), o (*lead, K), w (D, K) and, for a gate value, a = [gate]: the
    leaves of a gradient (drawn in that order)."""
    x = torch.randn(*lead, D, dtype=dtype, requires_grad=True)
    o = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    w = torch.randn(D, K, dtype=dtype, requires_grad=True)
    a = None if gate is None else torch.tensor([gate], dtype=dtype, requires_grad=True)
    return x, o, w, a


@pytest.mark.parametrize("gate_value", [None, 0.0, -0.8])
def test_matches_module_fp32(gate_value):
    torch.manual_seed(0)
    x, o, w, a = _leaves((2, 9), 24, 16, gate_value)
    z = gated_linear_residual(x, o, w, None if a is None else a.tanh())
    want = _ref(x, o, w, None if a is None else a.tanh())
    assert z.shape == x.shape and z.dtype == x.dtype and rel_err(z, want) < 1e-6
    go = torch.randn_like(z)
    leaves = [x, o, w] + ([a] if a is not None else [])
    for g1, g2 in zip(torch.autograd.grad(z, leaves, go), torch.autograd.grad(want, leaves, go)):
        assert g1.shape == g2.shape and rel_err(g1, g2) < 1e-5
    if a is not None:  # a closed gate (0, a fresh block) still has a gradient
        assert torch.autograd.grad(gated_linear_residual(x, o, w, a.tanh()).sum(), a)[0].abs().item() > 0


@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_float64(gated):
    torch.manual_seed(1)
    x, o, w, a = _leaves((7,), 5, 3, 0.3 if gated else None, torch.float64)
    if gated:
        assert torch.autograd.gradcheck(lambda x, o, w, a: gated_linear_residual(x, o, w, a.tanh()), (x, o, w, a))
    else:
        assert torch.autograd.gradcheck(lambda x, o, w: gated_linear_residual(x, o, w), (x, o, w))


def test_autocast_bf16_like_the_module():
    torch.manual_seed(2)
    x, o, w, a = _leaves((64,), 96, 32, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = gated_linear_residual(x, o, w, a.tanh())
        ref = _ref(x, o, w, a.tanh())
    truth = _ref(x, o, w, a.tanh())
    assert z.dtype == ref.dtype == torch.float32
    assert rel_err(z, truth) <= 2 * rel_err(ref, truth) + 1e-4
    go = torch.randn_like(truth)
    leaves = [x, o, w, a]
    got = torch.autograd.grad(z, leaves, go)
    want = torch.autograd.grad(ref, leaves, go)
    exact = torch.autograd.grad(truth, leaves, go)
    for g1, g2, e, leaf in zip(got, want, exact, leaves):
        assert g1.dtype == leaf.dtype
        assert rel_err(g1, e) <= 3 * rel_err(g2, e) + 1e-3


def test_opcheck_and_meta():
    x, o, w = torch.randn(6, 8), torch.randn(6, 4), torch.randn(8, 4)
    for gate in (None, torch.tensor([0.2])):
        torch.library.opcheck(_glr_op, (x, o, w, gate, torch.float32))
    z = gated_linear_residual(torch.empty(3, 5, 8, device="meta"), torch.empty(3, 5, 4, device="meta"),
                              torch.empty(8, 4, device="meta"), torch.empty(1, device="meta"))
    assert z.shape == (3, 5, 8) and z.device.type == "meta"


def test_keeps_o_not_the_product():
    """The backward keeps o (and the weight and gate), never a (rows, D) tensor."""
    R, D, K = 32, 48, 8
    x, o, w, a = _leaves((R,), D, K, 0.1)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        gated_linear_residual(x, o, w, a.tanh())
    assert (R, D) not in shapes and (R, K) in shapes


def test_errors_and_inference_path():
    x, o, w = torch.randn(4, 8), torch.randn(4, 3), torch.randn(8, 3)
    with pytest.raises(ValueError, match="expected o"):
        gated_linear_residual(x, o, torch.randn(3, 8))
    with pytest.raises(ValueError, match="expected o"):
        gated_linear_residual(x, torch.randn(5, 3), w)
    with pytest.raises(ValueError, match="one-element gate"):
        gated_linear_residual(x, o, w, torch.ones(2))
    lin = torch.nn.Linear(3, 8, bias=False)
    g = torch.tensor([0.7])
    with torch.no_grad():
        assert torch.equal(module_gated_linear_residual(lin, x, o, g), torch.addcmul(x, g, lin(o)))
        assert torch.equal(module_gated_linear_residual(lin, x, o), x + lin(o))


def test_block_training_keeps_no_branch_output():
    """A gated block's training forward keeps no (T, D) tensor but its FF input y = x +
    attention branch (the FF's x) and the attention output o is (T, H * dh): the LN(x)
    copy for the queries, the attention branch's output and the FF's output are not kept,
    and the block's gradients match the module-path block's."""
    from flamingo_rt.models.xattn import GatedCrossAttentionBlock

    torch.manual_seed(3)
    D, Dv, T = 64, 32, 24
    blk = GatedCrossAttentionBlock(D, Dv, heads=2, dim_head=16)
    with torch.no_grad():
        blk.attn_gate.fill_(0.4)
        blk.ff_gate.fill_(-0.3)
    x = torch.randn(1, T, D, requires_grad=True)
    media = torch.randn(1, 2, 5, Dv, requires_grad=True)
    idx = torch.tensor([[-1] * 4 + [0] * 10 + [1] * 10])
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        z = blk(x, media, media_index=idx, backend="reference")
    td = [s for s in shapes if s in ((1, T, D), (T, D))]
    assert len(td) <= 2, shapes  # x (queries' norm_project) and y (the FF's input)
    go = torch.randn_like(z)
    leaves = [x, media, *blk.parameters()]
    got = torch.autograd.grad(z, leaves, go)
    # the module path: no fused ops (inputs that need no gradient would pick it; here by hand)
    a = blk.attn
    q = a.to_q(a.norm(x)).view(1, T, 2, 16)
    k, v = a.media_kv(media)
    from flamingo_rt.ops import image_causal_attention
    o = image_causal_attention(q, k, v, idx, scale=16 ** -0.5, backend="reference").reshape(1, T, 32)
    y = x + blk.attn_gate.tanh() * a.to_out(o)
    want = y + blk.ff_gate.tanh() * blk.ff(y)
    assert rel_err(z, want) < 1e-6
    for g1, g2 in zip(got, torch.autograd.grad(want, leaves, go)):
        assert rel_err(g1, g2) < 1e-5


def test_compiles_fullgraph_forward_and_backward():
    torch.manual_seed(4)
    x, o, w, a = _leaves((12,), 16, 8, 0.2)

    def f(x, o, w, a):
        return gated_linear_residual(x, o, w, a.tanh())

    go = torch.randn(12, 16)
    want = torch.autograd.grad(f(x, o, w, a), [x, o, w, a], go)
    z = torch.compile(f, fullgraph=True, backend="aot_eager")(x, o, w, a)
    assert rel_err(z, f(x, o, w, a)) < 1e-6
    for g1, g2 in zip(torch.autograd.grad(z, [x, o, w, a], go), want):
        assert rel_err(g1, g2) < 1e-6
