"""The LM head + next-token loss: ``ops.linear_cross_entropy`` (chunked) vs the plain path
(``F.cross_entropy(F.linear(h, W).float())``), forward and backward, side by side.

Shape: the training benchmark's (issue 7) LM head: 2 x 256 tokens, width 2048, a
32,000-word vocabulary, the head frozen (gradient to the hidden states only), float32 and
bf16 autocast. Besides the time, the memory one forward+backward adds is printed: the plain
path holds the (tokens, vocabulary) logits, their float32 copy and the log-softmax at once,
ours one chunk of logits.
"""
from __future__ import annotations

import pytest
import torch

from harness import QUICK, peak_added_mib

from flamingo_rt.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

N, D, V = (31, 64, 1000) if QUICK else (511, 2048, 32000)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lm_head_loss(benchmark, ceilings, report, precision):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = torch.randn(V, D, generator=g) / D ** 0.5
    t = torch.randint(0, V, (N,), generator=g)
    ac = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(fn):
        def go():
            h.grad = None
            with torch.autocast(**ac):
                loss = fn(h, w, t)
            loss.backward()
            return loss.detach(), h.grad
        return go

    ours, plain = run(linear_cross_entropy), run(linear_cross_entropy_reference)
    (l1, g1), (l2, g2) = ours(), plain()
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert torch.allclose(l1, l2, rtol=tol) and float((g1 - g2).norm() / g2.norm()) < tol
    sizes = {name: peak_added_mib(fn) for name, fn in (("ours", ours), ("plain", plain))}
    flops = 2 * 2 * N * D * V  # logits + gradient to the hidden states
    row = report.compare(f"LM head + loss fwd+bwd {precision} ({N} x {D} -> {V})", ours, plain,
                         "F.linear + F.cross_entropy", flops=flops)
    # under autocast both sides hold the weight's bf16 copy (V x D, 125 MiB) for the whole call:
    # the same on both sides and not what chunking removes (the logits)
    cast = V * D * 2 / 2 ** 20 if precision == "bf16" else 0.0
    report.notes.append(f"  memory one fwd+bwd adds ({precision}): ours {sizes['ours']:.0f} MiB, "
                        f"plain {sizes['plain']:.0f} MiB ({sizes['plain'] / max(sizes['ours'], 1e-9):.1f}x)"
                        + (f"; besides the weight's bf16 copy both make ({cast:.0f} MiB): "
                           f"{sizes['ours'] - cast:.0f} / {sizes['plain'] - cast:.0f} MiB "
                           f"({(sizes['plain'] - cast) / max(sizes['ours'] - cast, 1e-9):.1f}x)" if cast else ""))
    benchmark.extra_info.update(ratio_plain_over_ours=row.speedup, ours_added_mib=sizes["ours"],
                                plain_added_mib=sizes["plain"])
    benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=1)
    assert sizes["ours"] - cast < (sizes["plain"] - cast) / 2 or QUICK  # (MiB: noise at a quick shape)
