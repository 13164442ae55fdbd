"""Where one training step's time goes: torch.profiler over the step of ``train_step.py``.

    python bench/peers/profile_train_step.py --side ours --dtype fp32 [--threads 1] [--rows 30]

Runs a warm-up step, then profiles one step and prints the top operators by self CPU
time (and the step's wall time). Both models are built (ours is converted from the peer).
"""
from __future__ import annotations

import argparse
import time

import torch

import train_step as ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("ours", "peer"), required=True)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--steps", type=int, default=1, help="timed (unprofiled) steps before the profile")
    ap.add_argument("--memory", action="store_true", help="also sort by self CPU memory")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sh = ts.shape()
    of = ts.build_peer(sh)
    data = ts.make_data(sh)
    ac = torch.bfloat16 if a.dtype == "bf16" else None
    if a.side == "ours":
        ours = ts.build_ours(of)
        del of
        step = ts.ours_stepper(ours, data, sh["B"], ac)
    else:
        step = ts.peer_stepper(of, data, sh["B"], ac)
    step()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        print(f"step {time.perf_counter() - t0:.3f} s ({torch.get_num_threads()} threads)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=a.memory) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    print(f"profiled step {wall:.3f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if a.memory:
        print(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=a.rows))


if __name__ == "__main__":
    main()
