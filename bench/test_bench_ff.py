"""The gated residual branches of a Flamingo block as ops, against the module path they
replace in training, forward+backward side by side (time and memory).

- ``feed_forward(..., residual=True, gate=tanh(a))``: x + tanh(a) * FF(x), LayerNorm ->
  fc1 -> GELU -> fc2 keeping x and h only, forward and backward over chunks of rows; the
  module path (``FeedForward`` then ``addcmul``) keeps LN(x), h, GELU(h) and FF(x).
- ``gated_linear_residual(x, o, W, tanh(a))``: x + tanh(a) * o W^T keeping o only; the
  module path (``Linear`` then ``addcmul``) keeps o and o W^T.

Shape: OpenFlamingo-3B's block (width 2048, FF x4, 8 heads x 64), 2048 tokens (batch 1 of
issue 3's benchmark), float32 and bf16 autocast; gradients of every parameter, of x and of
the gate. Memory: what one forward+backward adds to the process's resident set (its
temporaries, what it keeps for the backward, the gradients it makes), :func:`harness.peak_added_mib`;
and what the forward keeps for the backward besides the inputs and parameters themselves
(the tensors autograd saves, each storage counted once): the number these ops exist to
shrink, asserted.
"""
from __future__ import annotations

import pytest
import torch

from flamingo_rt.models.ff import FeedForward
from flamingo_rt.ops import feed_forward, gated_linear_residual
from harness import QUICK, peak_added_mib

T, D, INNER, HD = (64, 64, 4 * 64, 32) if QUICK else (2048, 2048, 4 * 2048, 512)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _kept_mib(fn, leaves, precision) -> float:
    """MiB of the storages ``fn``'s forward saves for its backward, leaves excluded."""
    leaf_ptrs = {p.untyped_storage().data_ptr() for p in leaves}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in leaf_ptrs:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        fn()
    return sum(kept.values()) / 2 ** 20


def _closure(fn, leaves, precision):
    go = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    ac = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run():
        for p in leaves:
            p.grad = None
        with torch.autocast(**ac):
            z = fn()
        z.backward(go)
        return [p.grad for p in leaves]
    return run


def _report(report, benchmark, name, precision, ours, plain, flops, peer_name, kept):
    got, want = ours(), plain()
    tol = 1e-4 if precision == "fp32" else 3e-2
    for g1, g2 in zip(got, want):
        assert _rel(g1, g2) < tol
    sizes = {n: peak_added_mib(f) for n, f in (("ours", ours), ("plain", plain))}
    row = report.compare(f"{name} fwd+bwd {precision}", ours, plain, peer_name, flops=flops, dtype=precision)
    report.notes.append(f"  {name} fwd+bwd {precision}: kept for the backward ours {kept[0]:.0f} MiB, "
                        f"{peer_name} {kept[1]:.0f} MiB; memory one call adds ours {sizes['ours']:.0f} MiB, "
                        f"{peer_name} {sizes['plain']:.0f} MiB ({sizes['plain'] / max(sizes['ours'], 1e-9):.2f}x)")
    benchmark.extra_info.update(ratio=row.speedup, ours_added_mib=sizes["ours"], plain_added_mib=sizes["plain"],
                                ours_kept_mib=kept[0], plain_kept_mib=kept[1])
    benchmark.pedantic(ours, rounds=1, iterations=1)
    return sizes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gated_feed_forward(benchmark, ceilings, report, precision):
    torch.manual_seed(0)
    ff = FeedForward(D, 4, "gelu")
    a = torch.nn.Parameter(torch.tensor([0.5]))
    x = torch.randn(T, D, requires_grad=True)
    leaves = [x, a, *ff.parameters()]
    n = ff.norm
    f_ours = lambda: feed_forward(x, n.weight, n.bias, ff.fc1.weight, ff.fc2.weight, n.eps, "gelu",  # noqa: E731
                                  residual=True, gate=a.tanh())
    f_plain = lambda: torch.addcmul(x, a.tanh(), ff(x))  # noqa: E731
    kept = _kept_mib(f_ours, leaves, precision), _kept_mib(f_plain, leaves, precision)
    _report(report, benchmark, f"gated FF residual ({T} x {D} -> {INNER})", precision, _closure(f_ours, leaves, precision),
            _closure(f_plain, leaves, precision), 3 * 4 * T * D * INNER, "FeedForward + addcmul", kept)
    # ours keeps h (and the gate); the module path LN(x), h, GELU(h) and FF(x) (and, under
    # autocast, the bf16 weight casts)
    assert kept[0] < kept[1] / 2 or QUICK


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gated_linear_residual(benchmark, ceilings, report, precision):
    torch.manual_seed(0)
    lin = torch.nn.Linear(HD, D, bias=False)
    a = torch.nn.Parameter(torch.tensor([0.5]))
    x = torch.randn(T, D, requires_grad=True)
    o = torch.randn(T, HD, requires_grad=True)
    leaves = [x, o, a, lin.weight]
    f_ours = lambda: gated_linear_residual(x, o, lin.weight, a.tanh())  # noqa: E731
    f_plain = lambda: torch.addcmul(x, a.tanh(), lin(o))  # noqa: E731
    kept = _kept_mib(f_ours, leaves, precision), _kept_mib(f_plain, leaves, precision)
    _report(report, benchmark, f"gated output projection ({T} x {HD} -> {D})", precision,
            _closure(f_ours, leaves, precision), _closure(f_plain, leaves, precision), 3 * 2 * T * HD * D,
            "Linear + addcmul", kept)
    # ours keeps nothing but its inputs (o, W) and the gate; the module path also o W^T (T, D)
    assert kept[0] < kept[1] / 2 or QUICK
