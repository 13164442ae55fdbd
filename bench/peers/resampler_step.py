"""The Perceiver Resampler, ours and open_flamingo's, on the same weights and features.

Shapes (issue 4's benchmark, :data:`ISSUE_SHAPES`): OpenFlamingo's resampler (width 1024,
depth 6, 8 heads x 64, 64 latents) on a 32-shot prompt (32 images x 256 features) and on
video (8 clips of 8 frames x 64 features, learned temporal embeddings).

- forward: no gradient (inference).
- forward+backward: the gradients of every weight and of the features (in Flamingo the
  features come from a frozen encoder, but a benchmark of the kernels' backward wants the
  input gradient too, as the bench's timing rows compute it).
- bf16: both sides under CPU autocast (weights and features stay float32).

Importable (``bench/test_bench_resampler.py``) and runnable: ``python
bench/peers/resampler_step.py --side ours --dtype fp32 --mode fwd_bwd --shape images``
prints, as JSON, the peak resident memory of that side in a fresh process (:mod:`rss`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ISSUE_SHAPES = {
    # name: (dim, depth, heads, dim_head, latents, media, S, frames)
    "issue4 32 images x 256": (1024, 6, 8, 64, 64, 32, 256, 1),
    "issue4 video 8 clips x 8 frames x 64": (1024, 6, 8, 64, 64, 8, 64, 8),
}
SHORT = {"images": "issue4 32 images x 256", "video": "issue4 video 8 clips x 8 frames x 64"}
if os.environ.get("FLAMINGO_RT_BENCH_QUICK") == "1":  # a smoke run (bench/harness.py)
    ISSUE_SHAPES = {"quick 4 images x 16": (64, 2, 2, 16, 8, 4, 16, 1),
                    "quick video 2 clips x 3 frames x 8": (64, 2, 2, 16, 8, 2, 8, 3)}
    SHORT = dict(zip(("images", "video"), ISSUE_SHAPES))
MODES = ("fwd", "fwd_bwd")


def of_helpers():
    """open_flamingo's src/helpers.py (the peer modules): :func:`of_helpers.load`."""
    import of_helpers as ofh

    return ofh.load("_of_helpers_resampler")


def pair(of, dim: int, depth: int, heads: int, dh: int, latents: int, frames: int, seed: int = 0):
    """(peer, ours): open_flamingo's ``PerceiverResampler`` (temporal embeddings for
    ``frames`` > 1) and ours converted from it, float32."""
    from flamingo_rt.models.resampler import PerceiverResampler

    torch.manual_seed(seed)
    peer = of.PerceiverResampler(dim=dim, depth=depth, dim_head=dh, heads=heads, num_latents=latents,
                                 max_num_frames=frames if frames > 1 else None)
    return peer, PerceiverResampler.from_open_flamingo(peer)


def features(dim: int, media: int, S: int, frames: int, seed: int = 1) -> torch.Tensor:
    """(1, media, frames, S, dim) float32 features."""
    return torch.randn(1, media, frames, S, dim, generator=torch.Generator().manual_seed(seed))


def gemm_shapes(dim, depth, heads, dh, L, M, S, frames):
    """(rows, in, out) of every matrix product of the resampler's forward: per layer the
    features' K/V, the latents' Q and K/V, the output projection and the FF (x4)."""
    inner, rf, rl = heads * dh, M * frames * S, M * L
    layer = [(rf, dim, 2 * inner), (rl, dim, inner), (rl, dim, 2 * inner), (rl, inner, dim),
             (rl, dim, 4 * dim), (rl, 4 * dim, dim)]
    return layer * depth


def forward(m, inp, autocast: bool = False) -> Callable[[], torch.Tensor]:
    """A closure: m(inp) without gradients, under bf16 autocast if asked."""
    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return m(inp)
    return run


def forward_backward(m, xg, autocast: bool = False) -> Callable[[], None]:
    """A closure: m(xg) and the backward of its sum (every weight's and xg's gradient)."""
    def run():
        m.zero_grad(set_to_none=True)
        xg.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xg)
        y.float().sum().backward()
    return run


def measure_memory(side: str, dtype: str, mode: str, shape: str, steps: int = 2) -> dict:
    """Peak resident memory of ``side``'s ``mode`` in this (fresh) process (:mod:`rss`):
    ``step_mib`` is what one call adds over the weights and features (fwd: its temporaries
    and output; fwd_bwd: saved activations, temporaries and the gradients it makes), with
    gradients freed between calls; ``grad_mib`` the gradients alone (every weight's and the
    features'), which both sides hold at the end of a backward; ``kept_mib`` (ours) the packed
    weight copies its products made at the first call and read at every later one
    (:func:`flamingo_rt.ops.fused_linear.packed_bytes`): in the base, not in ``step_mib``, but
    resident beside the weights for as long as the model runs."""
    import rss

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    dim, depth, heads, dh, L, M, S, frames = ISSUE_SHAPES[SHORT.get(shape, shape)]
    peer, ours = pair(of_helpers(), dim, depth, heads, dh, L, frames)
    m = ours if side == "ours" else peer
    del peer, ours
    x = features(dim, M, S, frames)
    autocast = dtype == "bf16"
    if mode == "fwd":
        run = forward(m, x, autocast)
        grad = 0
    else:
        xg = x.requires_grad_()
        inner = forward_backward(m, xg, autocast)

        def run():  # gradients freed after each call, so the base holds none
            inner()
            m.zero_grad(set_to_none=True)
            xg.grad = None
        grad = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad) + \
            x.numel() * x.element_size()
    measured = rss.measure(run, steps, before_base=rss.release_ours_kept if side == "ours" else None)
    kept = 0
    if side == "ours":
        from flamingo_rt.ops import fused_linear

        kept = fused_linear.packed_bytes()
    return dict(side=side, dtype=dtype, mode=mode, shape=SHORT.get(shape, shape), threads=torch.get_num_threads(),
                grad_mib=grad / 2 ** 20, kept_mib=kept / 2 ** 20, **measured)


def memory_both(dtype: str, mode: str, shape: str, steps: int = 2) -> Tuple[dict, dict]:
    """(ours, peer): :func:`measure_memory` of each side in its own fresh process."""
    import rss

    root = Path(__file__).resolve().parents[2]
    return tuple(rss.run(Path(__file__), ["--side", side, "--dtype", dtype, "--mode", mode, "--shape", shape,
                                          "--steps", str(steps)], root)
                 for side in ("ours", "peer"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("ours", "peer"), required=True)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--shape", choices=sorted(SHORT) + sorted(ISSUE_SHAPES), default="images")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    import rss

    rss.emit(measure_memory(a.side, a.dtype, a.mode, a.shape, a.steps))
