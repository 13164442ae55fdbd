"""One connector training step, ours vs open_flamingo, same weights and data (issue 7).

Shape and step: see ``bench/peers/train_step.py`` (OpenFlamingo-3B-shaped cross-attention:
LM width 2048 with 2 decoder layers and a gated cross-attention block before each, resampler
depth 6 width 1024, batch 2 x 256 tokens x 8 images of 257 features; resampler and blocks
train, LM frozen; AdamW with clipping). fp32 and bf16 autocast, on the CPU.

Ours runs as ``flamingo-rt train`` does by default: under bf16 autocast its frozen LM's
linear weights are stored in bf16 (``freeze.frozen_linear_dtype = "auto"``: the values
autocast's per-use casts give the peer's products); a bf16 row with them kept float32 and cast
at each use, as the peer's are, follows.

Before timing, both sides compute the loss and the gradients of every trainable parameter
from the same fresh weights; they must agree. Then steps alternate (ours, peer, ours, ...)
so drift in machine load hits both alike; the medians are reported.

The same step is also timed with each side alone in its own fresh process (default malloc):
in one process each side's first-touch page faults depend on what the other keeps mapped (on
the AMX guest of 2026-12-05 (x) the peer's float32 step ran 5.6-5.7 s beside ours with its
block cache off and 6.5-6.7 s with it on, ours the same either way), which that row takes out.

A row with the vocabulary rows of ``<image>`` and ``<|endofchunk|>`` training too (as both
training loops do by default), each side alone by its own rule: open_flamingo makes its input
embedding trainable and multiplies all other rows of its (V, D) gradient by 0 after the
backward pass; ``flamingo-rt train`` trains those rows as (k, D) parameters
(``flamingo_rt/models/token_rows.py``; also the rows of an untied output projection, which
open_flamingo leaves frozen).

Memory: each side runs in its own fresh process (``bench/peers/train_step.py``) with glibc's
mmap threshold fixed at 64 KiB, so every tensor buffer is mapped on allocation and unmapped
on free and the resident set follows live memory. After a warm-up step (which allocates
AdamW's state), the kernel's RSS high-water mark is reset (``/proc/self/clear_refs``) and two
steps run: "peak" is the high-water RSS of the process during them, "step" the high-water
minus the RSS just before (what one step adds to weights and optimizer state: saved
activations, gradients, temporaries). tracemalloc does not see torch's allocations. The peer
holds every trainable parameter's float32 gradient (520 MiB) at the end of its backward;
ours keeps the weight gradients whose product factors are under half their size (the
cross-attention blocks' FF) as those factors (``flamingo_rt.ops.factored_grads``)
and clips and applies them a block of rows at a time (``runtime/train/factored_step.py``),
as ``train_step`` does by default.

FLOP count of one step (fp32, torch's counter with our op formulas): about 1.1 TFLOP, almost
all matrix products (resampler ~50%, cross-attention blocks ~21%, frozen LM layers ~17%, LM
head ~12%), and both sides do nearly the same products: ours skips one product per
resampler layer in the backward (``norm_project``, ~52 GFLOP). So the time ratio is bounded
by the non-product work: in fp32 the peer's products are ~70% of its step, so even a step
with nothing but products would be < 1.5x faster; in bf16 the products are ~40% of the
peer's step and the rest is mostly autocast's casts and AdamW (profile with
``bench/peers/profile_train_step.py``).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import count_flops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "peers"))

import train_step as ts  # noqa: E402

ROUNDS = int(os.environ.get("FLAMINGO_RT_BENCH_TRAIN_ROUNDS", "5"))
TOL_FP32 = (1e-5, 1e-3)  # (loss, gradient) relative tolerances, ours vs peer from the same weights
# bf16 autocast: the error of each of our gradients against the peer's float32 gradient may
# be at most 2x the peer's own bf16 error plus a floor (DESIGN.md section 3); scalars (the
# gates) are sums over the whole batch and carry the largest relative rounding noise.
BF16_LOSS_TOL, BF16_FACTOR, BF16_FLOOR = 1e-2, 2.0, 1e-2


def _grad_pairs(ours, of):
    """(name, ours grad, peer grad) of every trainable parameter, mapped by name."""
    peer = {}
    for n, p in of.perceiver.named_parameters():
        parts = n.split(".")
        if parts[0] == "layers":  # layers.i.0.* (attention), layers.i.1.{0,1,3}.* (FF)
            sub = "attn" if parts[2] == "0" else "ff." + {"0": "norm", "1": "fc1", "3": "fc2"}[parts[3]]
            n = ".".join(["layers", parts[1], sub] + parts[3 if parts[2] == "0" else 4:])
        peer["resampler." + n] = p
    for n, p in of.lang_encoder.gated_cross_attn_layers.named_parameters():
        i, rest = n.split(".", 1)
        rest = rest.replace("ff.0.", "ff.norm.").replace("ff.1.", "ff.fc1.").replace("ff.3.", "ff.fc2.")
        peer[f"lm.xattn.{i}.{rest}"] = p
    out = []
    for n, p in ours.named_parameters():
        if p.requires_grad:
            out.append((n, p.grad, peer.pop(n).grad))
    assert not peer, f"peer parameters without a counterpart: {sorted(peer)[:5]}"
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _loss_and_grads(side: str, dtype: str, sh, seed_model=0):
    """Fresh models, one forward + backward of ``side``: (loss, {our parameter name: grad})."""
    of = ts.build_peer(sh, seed=seed_model)
    ours = ts.build_ours(of, ts.default_frozen_linears_bf16(dtype))
    data = ts.make_data(sh)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = ts.ours_loss(ours, data, sh["B"]) if side == "ours" else ts.peer_loss(of, data, sh["B"])
    loss.backward()
    k = 1 if side == "ours" else 2
    return float(loss.detach()), {t[0]: t[k] for t in _grad_pairs(ours, of)}


def _pool_scalars(grads: dict) -> dict:
    """{name: grad} with the one-element gradients (the gates) replaced by one vector "gates"."""
    out = {n: g for n, g in grads.items() if g.numel() > 1}
    out["gates"] = torch.cat([g.reshape(1).float() for n, g in sorted(grads.items()) if g.numel() == 1])
    return out


def check_same_step(dtype: str):
    """From the same fresh weights and data, our loss and the gradient of every trainable
    parameter agree with the peer's. Returns (peer loss, (worst name, its error))."""
    sh = ts.shape()
    lo, go = _loss_and_grads("ours", dtype, sh)
    lp, gp = _loss_and_grads("peer", dtype, sh)
    if dtype != "fp32":
        _, truth = _loss_and_grads("peer", "fp32", sh)
    # the scalar gates' gradients are compared as one vector: each is a whole-batch sum
    # whose relative bf16 error swings with its cancellation (measured: 1e-4 .. 6e-2 on
    # either side), a norm over the four is what the tensor rule means for them
    go, gp = _pool_scalars(go), _pool_scalars(gp)
    if dtype == "fp32":
        tl, tg = TOL_FP32
        limit = {n: tg for n in gp}
    else:
        tl = BF16_LOSS_TOL
        truth = _pool_scalars(truth)
        limit = {n: BF16_FACTOR * _rel(gp[n], truth[n]) + BF16_FLOOR for n in gp}
        gp = truth
    assert abs(lo - lp) <= tl * abs(lp), (lo, lp)
    worst = ("", 0.0)
    for n, g in go.items():
        assert g is not None and gp[n] is not None and torch.isfinite(g).all(), n
        e = _rel(g, gp[n])
        assert e <= limit[n], f"{dtype} gradient of {n} differs by {e:.2e} (limit {limit[n]:.2e})"
        worst = max(worst, (n, e), key=lambda t: t[1])
    return lp, worst


def step_flops() -> int:
    sh = ts.shape()
    of = ts.build_peer(sh)
    ours = ts.build_ours(of)
    del of
    data = ts.make_data(sh)
    return count_flops(lambda: ts.ours_loss(ours, data, sh["B"]).backward())


def alternate(ours_step, peer_step, rounds: int):
    """One warm-up step each (AdamW state), then ``rounds`` x (ours, peer); per-step seconds."""
    ours_step()
    peer_step()
    to, tp = [], []
    for _ in range(rounds):
        for f, acc in ((ours_step, to), (peer_step, tp)):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    return to, tp


def _side_process(side: str, dtype: str, *extra: str, **run_kw) -> dict:
    """``bench/peers/train_step.py`` for one side in a fresh process (:func:`rss.run` with
    ``run_kw``); what it emitted."""
    import rss

    return rss.run(ROOT / "bench" / "peers" / "train_step.py", ["--side", side, "--dtype", dtype, *extra], ROOT,
                   **run_kw)


def memory(side: str, dtype: str, *extra: str) -> dict:
    """One side's step memory in a fresh process (glibc's mmap threshold fixed: :data:`rss.ENV`)."""
    return _side_process(side, dtype, *extra)


def time_alone(side: str, dtype: str, *extra: str) -> dict:
    """One side's step times alone in a fresh process (the C library's default malloc):
    ``median_s`` and ``all_s`` of :data:`ROUNDS` steps."""
    return _side_process(side, dtype, *extra, "--time", "--steps", str(ROUNDS), malloc_env=None)


def separate_times(dtype: str) -> dict:
    """Each side's step times alone in its own fresh process: ``{side: result}``."""
    return {side: time_alone(side, dtype) for side in ("ours", "peer")}


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_step(benchmark, ceilings, report, of_helpers, dtype):
    sh = ts.shape()
    loss, worst = check_same_step(dtype)
    flops = step_flops() if dtype == "fp32" else None
    of = ts.build_peer(sh)
    ours = ts.build_ours(of, ts.default_frozen_linears_bf16(dtype))  # as `flamingo-rt train` runs it
    data = ts.make_data(sh)
    ac = torch.bfloat16 if dtype == "bf16" else None
    load0 = _load()
    to, tp = alternate(ts.ours_stepper(ours, data, sh["B"], ac), ts.peer_stepper(of, data, sh["B"], ac), ROUNDS)
    load1 = _load()
    del of, ours
    mo, mp = memory("ours", dtype), memory("peer", dtype)
    sep = separate_times(dtype)
    so, sp = sep["ours"]["median_s"], sep["peer"]["median_s"]
    o, p = statistics.median(to), statistics.median(tp)
    quick = " (QUICK shape)" if sh is ts.QUICK else ""
    if not any(n.startswith("connector training step") for n in report.notes):
        report.notes += [
            f"connector training step{quick} (resampler + 2 xattn blocks train, LM frozen, AdamW), ours vs open_flamingo:",
            "  | precision | ours step | peer step | peer/ours | ours peak RSS | peer peak RSS | peer/ours "
            "| ours step adds | peer step adds | peer/ours | loss, worst grad err | load avg |",
        ]
    report.notes.append(
        f"  | {dtype} | {o:.2f} s | {p:.2f} s | {p / o:.2f}x | {mo['peak_mib']:.0f} MiB | {mp['peak_mib']:.0f} MiB "
        f"| {mp['peak_mib'] / mo['peak_mib']:.2f}x | {mo['step_mib']:.0f} MiB | {mp['step_mib']:.0f} MiB "
        f"| {mp['step_mib'] / max(mo['step_mib'], 1e-9):.2f}x | {loss:.4f} equal, {worst[1]:.1e} ({worst[0]}) | {load0} -> {load1} |")
    if flops:
        report.notes.append(f"  ({dtype}: ours {flops / o / 1e9:.0f} GFLOP/s on {flops / 1e9:.0f} GFLOP per step; "
                            f"median of {ROUNDS} alternating steps, {torch.get_num_threads()} threads; all times: "
                            f"ours {' '.join(f'{t:.2f}' for t in to)}, peer {' '.join(f'{t:.2f}' for t in tp)})")
    else:
        report.notes.append(f"  ({dtype}: all times: ours {' '.join(f'{t:.2f}' for t in to)}, "
                            f"peer {' '.join(f'{t:.2f}' for t in tp)})")
    report.notes.append(
        f"  ({dtype}, each side alone in its own process: ours {so:.2f} s, peer {sp:.2f} s, {sp / so:.2f}x; all times: "
        f"ours {' '.join(f'{t:.2f}' for t in sep['ours']['all_s'])}, "
        f"peer {' '.join(f'{t:.2f}' for t in sep['peer']['all_s'])})")
    benchmark.extra_info.update(ours_s=o, peer_s=p, ratio=p / o, ours_all_s=to, peer_all_s=tp,
                                mem_ours=mo, mem_peer=mp, load=[load0, load1],
                                separate_ours_s=so, separate_peer_s=sp, separate_ratio=sp / so)
    # the vocabulary rows of <image> / <|endofchunk|> training too, each side by its own rule,
    # each side alone in its own process (time) and measured for memory as above
    tro, trp = time_alone("ours", dtype, "--token-rows"), time_alone("peer", dtype, "--token-rows")
    mto, mtp = memory("ours", dtype, "--token-rows"), memory("peer", dtype, "--token-rows")
    o_r, p_r = tro["median_s"], trp["median_s"]
    report.notes.append(
        f"  | {dtype}, the <image> / <|endofchunk|> vocabulary rows training too, each side alone (the peer: its input "
        f"embedding's masked (V, D) gradient; ours: (k, D) parameters, also the untied head's rows) | {o_r:.2f} s "
        f"| {p_r:.2f} s | {p_r / o_r:.2f}x | {mto['peak_mib']:.0f} MiB | {mtp['peak_mib']:.0f} MiB "
        f"| {mtp['peak_mib'] / mto['peak_mib']:.2f}x | {mto['step_mib']:.0f} MiB | {mtp['step_mib']:.0f} MiB "
        f"| {mtp['step_mib'] / max(mto['step_mib'], 1e-9):.2f}x | (tests/test_token_rows.py) | |")
    report.notes.append(f"  ({dtype} with the vocabulary rows training, all times: ours "
                        f"{' '.join(f'{t:.2f}' for t in tro['all_s'])}, peer {' '.join(f'{t:.2f}' for t in trp['all_s'])})")
    benchmark.extra_info.update(token_rows_ours_s=o_r, token_rows_peer_s=p_r, mem_ours_token_rows=mto,
                                mem_peer_token_rows=mtp)
    if dtype == "bf16":  # ours with freeze.frozen_linear_dtype = "none": its frozen LM linears cast at each use
        of = ts.build_peer(sh)
        ours = ts.build_ours(of, frozen_linears_bf16=False)
        to32, tp32 = alternate(ts.ours_stepper(ours, data, sh["B"], ac), ts.peer_stepper(of, data, sh["B"], ac), ROUNDS)
        del of, ours
        m32 = memory("ours", dtype, "--frozen-linears", "none")
        s32 = time_alone("ours", dtype, "--frozen-linears", "none")
        o32, p32, so32 = statistics.median(to32), statistics.median(tp32), s32["median_s"]
        report.notes.append(
            f"  | bf16, ours with its frozen LM linears float32, cast at each use as the peer's (frozen_linear_dtype "
            f"= \"none\") | {o32:.2f} s | {p32:.2f} s | {p32 / o32:.2f}x | {m32['peak_mib']:.0f} MiB | {mp['peak_mib']:.0f} MiB "
            f"| {mp['peak_mib'] / m32['peak_mib']:.2f}x | {m32['step_mib']:.0f} MiB | {mp['step_mib']:.0f} MiB "
            f"| {mp['step_mib'] / max(m32['step_mib'], 1e-9):.2f}x | (same products' inputs: tests) | |")
        report.notes.append(f"  (bf16 frozen linears float32: all times: ours {' '.join(f'{t:.2f}' for t in to32)}, "
                            f"peer {' '.join(f'{t:.2f}' for t in tp32)}; alone in its own process: ours {so32:.2f} s "
                            f"against the peer's {sp:.2f} s above, {sp / so32:.2f}x)")
        benchmark.extra_info.update(frozen_f32_ours_s=o32, frozen_f32_peer_s=p32, mem_ours_frozen_f32=m32,
                                    separate_frozen_f32_ours_s=so32)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
