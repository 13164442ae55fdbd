"""Measure the frozen NFNet encoder on the CPU, one thread by default: timm dm_nfnet_f0 vs
ours unfolded vs ours folded (fast path), NCHW vs channels-last, fp32 and bf16. Prints a
table (median ms of a few runs, interleaved). Used to pick the fast path's layout.

    python bench/nfnet_layout.py [--res 224] [--batch 1] [--threads 1] [--reps 3]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import timm

    from flamingo_rt.models.nfnet import NFNet

    torch.manual_seed(0)
    tm = timm.create_model("dm_nfnet_f0", pretrained=False).eval().requires_grad_(False)
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.7)
    x = torch.randn(a.batch, 3, a.res, a.res)
    unf = NFNet.from_timm(tm).freeze(fast=False)
    fast = NFNet.from_timm(tm).freeze()
    fast_nchw = NFNet.from_timm(tm).freeze()
    fast_nchw.channels_last = False
    fast16 = copy.deepcopy(fast).to(torch.bfloat16).freeze()
    fast16_nchw = copy.deepcopy(fast16)
    fast16_nchw.channels_last = False
    tm_cl = copy.deepcopy(tm).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)

    def timm_cl_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tm_cl.forward_features(xc)

    runs = {
        "timm fp32 NCHW": lambda: tm.forward_features(x),
        "timm bf16 autocast channels-last": timm_cl_bf16,
        "ours unfolded fp32": lambda: unf.forward_features(x),
        "ours folded fp32 NCHW": lambda: fast_nchw.forward_features(x),
        "ours folded fp32 channels-last": lambda: fast.forward_features(x),
        "ours folded bf16 NCHW": lambda: fast16_nchw.forward_features(x),
        "ours folded bf16 channels-last": lambda: fast16.forward_features(x),
    }
    times = {k: [] for k in runs}
    with torch.no_grad():
        for f in runs.values():
            f()  # warm up
        for _ in range(a.reps):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    base = statistics.median(times["timm fp32 NCHW"])
    print(f"dm_nfnet_f0 {a.res}px batch {a.batch}, {a.threads} thread(s), median of {a.reps}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:<36} {m * 1e3:9.1f} ms   timm-fp32/this {base / m:5.2f}x")


if __name__ == "__main__":
    main()
