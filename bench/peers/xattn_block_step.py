"""One gated cross-attention block, ours and open_flamingo's, on the same weights and data.

Shape (issue 3's benchmark): OpenFlamingo-3B's block (LM width 2048, visual width 1024,
8 heads x 64, FF x4), T = 2048 text tokens, M = 32 images x 64 media tokens (a 32-shot
prompt), batch 1 or 4. Gates open (tanh(0.5)), so every path carries a gradient.

- forward: no gradient, the block's output.
- forward+backward: gradients of every block parameter, of the text input x and of the
  media tokens (in Flamingo both come from trainable parts: the LM stream and the resampler).
- under bf16 autocast on both sides for "bf16" (weights and inputs stay float32); the
  forward also with our block in bfloat16 weights (:func:`in_bf16`, no autocast), as bf16
  inference runs it (the peer stays under autocast, as issue 3 prescribes).
- GEMMs alone (:func:`gemm_shapes`, timed with ``harness.gemms_alone``): the block's matrix
  products (q, kv, out projections, FF up and down) as plain ``torch.mm`` on tensors of the
  same shapes in the compute dtype; the backward adds the input-gradient and weight-gradient
  products of each (3x the forward's).

Importable (``bench/test_bench_xattn.py``) and runnable: ``python
bench/peers/xattn_block_step.py --side ours --dtype bf16 --batch 1`` prints the peak resident
memory of forward+backward in a fresh process (:mod:`rss`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM, VIS, HEADS, DH, FF_MULT = 2048, 1024, 8, 64, 4
T, M, N = 2048, 32, 64
if os.environ.get("FLAMINGO_RT_BENCH_QUICK") == "1":  # a smoke run (bench/harness.py)
    DIM, VIS, HEADS, DH, FF_MULT = 64, 32, 2, 16, 2
    T, M, N = 128, 4, 8


def of_helpers():
    """open_flamingo's src/helpers.py (the peer modules): :func:`of_helpers.load`."""
    import of_helpers as ofh

    return ofh.load("_of_helpers_block")


def build(batch: int, of=None, seed: int = 0):
    """(peer, ours, x (B, T, D), media (B, M, N, Dv), media_index (B, T), media_locations (B, T)),
    float32, the same weights on both sides."""
    from flamingo_rt.models.xattn import GatedCrossAttentionBlock

    of = of or of_helpers()
    torch.manual_seed(seed)
    peer = of.GatedCrossAttentionBlock(dim=DIM, dim_visual=VIS, dim_head=DH, heads=HEADS, ff_mult=FF_MULT)
    with torch.no_grad():
        peer.attn_gate.fill_(0.5)
        peer.ff_gate.fill_(0.5)
    ours = GatedCrossAttentionBlock.from_open_flamingo(peer)
    loc = torch.zeros(batch, T, dtype=torch.bool)
    loc[:, torch.linspace(8, T - 40, M).long()] = True  # 32 images spread over the text
    idx = loc.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1
    x = torch.randn(batch, T, DIM)
    media = torch.randn(batch, M, N, VIS)
    return peer, ours, x, media, idx, loc


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def forward(side: str, block, x, media, idx, loc, dtype: str) -> Callable[[], torch.Tensor]:
    """A closure: the block's output without gradients."""
    def run():
        with torch.no_grad(), _autocast(dtype):
            if side == "ours":
                return block(x, media, media_index=idx, backend="cpu", validate=False)
            return block(x, media, media_locations=loc)
    return run


def in_bf16(block, x, media):
    """A bfloat16 copy of ``block`` and of the inputs: bf16 inference as a user runs it (the
    model loaded in bf16, no autocast, no per-call weight casts)."""
    import copy

    return copy.deepcopy(block).to(torch.bfloat16), x.to(torch.bfloat16), media.to(torch.bfloat16)


def forward_backward(side: str, block, x, media, idx, loc, dtype: str) -> Callable[[], Tuple]:
    """A closure: output, then the gradients of every parameter, x and media for a fixed
    output gradient; returns (x.grad, media.grad)."""
    xg, mg = x.clone().requires_grad_(), media.clone().requires_grad_()
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))

    def run():
        block.zero_grad(set_to_none=True)
        xg.grad = mg.grad = None
        with _autocast(dtype):
            if side == "ours":
                y = block(xg, mg, media_index=idx, backend="cpu", validate=False)
            else:
                y = block(xg, mg, media_locations=loc)
        y.backward(go.to(y.dtype))
        out = xg.grad, mg.grad
        xg.grad = mg.grad = None
        return out

    return run


def gemm_shapes(batch: int) -> List[Tuple[int, int, int]]:
    """(rows, in, out) of each of the block's matrix products in the forward."""
    inner = HEADS * DH
    rt, rm = batch * T, batch * M * N
    return [(rt, DIM, inner), (rm, VIS, 2 * inner), (rt, inner, DIM),
            (rt, DIM, FF_MULT * DIM), (rt, FF_MULT * DIM, DIM)]


def gemm_flops(batch: int, train: bool) -> int:
    return (3 if train else 1) * sum(2 * r * i * o for r, i, o in gemm_shapes(batch))


def measure_memory(side: str, dtype: str, batch: int, steps: int = 2) -> dict:
    """Peak resident memory of ``side``'s forward+backward in this (fresh) process: what a step
    adds over the weights (its saved activations, temporaries and the gradients it makes);
    ``grad_mib``: the gradients alone (parameters, x, media), which both sides must hold."""
    import rss

    peer, ours, x, media, idx, loc = build(batch)
    block = ours if side == "ours" else peer
    del peer, ours
    run = forward_backward(side, block, x, media, idx, loc, dtype)

    def step():  # gradients freed after each step, so the base holds none
        run()
        block.zero_grad(set_to_none=True)

    # the gradients a step must hold when it ends (every parameter's, x's and media's), the
    # same on both sides: the floor under "step_mib"
    grad = sum(p.numel() * p.element_size() for p in block.parameters()) + \
        x.numel() * x.element_size() + media.numel() * media.element_size()
    return dict(side=side, dtype=dtype, batch=batch, threads=torch.get_num_threads(), grad_mib=grad / 2 ** 20,
                **rss.measure(step, steps, before_base=rss.release_ours_kept if side == "ours" else None))



if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("ours", "peer"), required=True)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    import rss

    rss.emit(measure_memory(a.side, a.dtype, a.batch, a.steps))
