"""The one GPU command (DESIGN.md section 5).

    python bench/gpu_check.py [--out DIR] [--device cuda|cpu] [--quick]

1. builds what needs building (the ``flamingo_rt._C`` extension, in place, if missing);
2. measures the device's ceilings (copy GB/s, bf16 / fp32 GEMM TFLOP/s);
3. checks every backend of every op that can run on the device against the float64
   reference, forward and backward, on fresh random inputs with the edge cases;
4. times each op against its peers (``triton.testing.do_bench`` median on GPU), the
   whole-model decode step, and a few steps of the training runtime's Trainer;
5. prints a short table last and writes ``table.md`` and ``results.json`` under DIR.

With no GPU it dry-runs on the CPU with small shapes (``--device cpu`` forces that), so
the script is known to work before GPU time is spent. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from flamingo_rt.ops import cpu_gemm  # noqa: E402


class RunControl:
    """The run's time budget, its section filter and progress lines: a GPU lease is short,
    so a run that would overrun skips what is left (reported as skipped, not failed) and
    still writes its table, and each section's progress is printed as it happens."""

    # the default order: checks, then the timings by what is least known (the decode step
    # and the NFNet need long compiles, so they come last)
    SECTIONS = ("xattn_checks", "resampler_checks", "bga_checks", "nfnet_checks",
                "xattn_time", "resampler_time", "bga_time", "decode_time", "nfnet_time", "train_time")

    def __init__(self) -> None:
        self.t0 = time.time()
        self.deadline = math.inf
        self.only: Optional[set] = None
        self.only_order: List[str] = []
        self.on_section: Optional[Callable[[], object]] = None  # e.g. write the partial table
        self.skipped: List[str] = []  # sections not run for want of time
        self.out_dir: Optional[Path] = None

    def configure(self, budget_s: Optional[float], only: Optional[str]) -> None:
        if budget_s:
            self.deadline = self.t0 + budget_s
        self.only_order: List[str] = []
        if only:
            want = set()
            for w in (x.strip() for x in only.split(",") if x.strip()):
                hit = [s for s in self.SECTIONS if s == w or s.endswith("_" + w) or s.startswith(w + "_")]
                if not hit:
                    raise SystemExit(f"--only: unknown section {w!r}; expected some of {', '.join(self.SECTIONS)}"
                                     " (or 'checks' / 'time')")
                want.update(hit)
                self.only_order += [h for h in hit if h not in self.only_order]
            self.only = want

    def order(self, names: List[str]) -> List[str]:
        """``names`` in the order --only gave them (the default order otherwise)."""
        if not self.only_order:
            return names
        return [n for n in self.only_order if n in names] + [n for n in names if n not in self.only_order]

    def want(self, section: str, min_left_s: float = 0.0) -> bool:
        """Whether to run ``section``: selected, and (on a budget) at least ``min_left_s``
        seconds left for it (a section whose one long step, e.g. a compile, would overrun)."""
        ok = self.only is None or section in self.only
        if ok and self.on_section is not None:
            self.on_section()
        if ok and time.time() + min_left_s > self.deadline:
            self.progress(f"section {section}: skipped, " + (
                f"under {min_left_s:.0f} s of the time budget left" if min_left_s else "over the time budget"))
            self.skipped.append(section)
            return False
        if ok:
            self.progress(f"section {section}")
        return ok

    def over(self) -> bool:
        return time.time() > self.deadline

    def progress(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f} s] {msg}", flush=True)


RUN = RunControl()

# --------------------------------------------------------------------------- build


def ensure_built(log: List[str]) -> bool:
    """Import flamingo_rt._C, building it in place first if it is missing (with the CUDA
    kernels, for sm_90 unless FLAMINGO_RT_CUDA_ARCHS says otherwise, when a GPU is
    present: FLAMINGO_RT_CUDA=1 makes a build without them an error)."""
    try:
        import flamingo_rt._C  # noqa: F401

        log.append("flamingo_rt._C: already built")
        return True
    except ImportError as e:
        log.append(f"flamingo_rt._C missing ({e}); building in place (setup.py build_ext --inplace)")
    RUN.progress(log[-1])
    t0 = time.time()
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    if torch.cuda.is_available():
        env.setdefault("FLAMINGO_RT_CUDA", "1")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    log.append(f"build exit {proc.returncode} in {time.time() - t0:.0f} s")
    RUN.progress(log[-1])
    if proc.returncode != 0:
        log.append(proc.stdout[-3000:] + proc.stderr[-6000:])
        print(log[-1], flush=True)
        return False
    try:
        import importlib

        importlib.invalidate_caches()
        import flamingo_rt._C  # noqa: F401

        return True
    except ImportError as e:
        log.append(f"still cannot import flamingo_rt._C: {e}")
        return False


def save_extension(out_dir: Path) -> str:
    """Copy the built flamingo_rt._C into out_dir as ``<name>.gz``, debug info stripped (the
    build's -g / -lineinfo make it ~50 MB; stripped and compressed it is a few MB), so a
    later run on a fresh machine can carry it instead of building again."""
    import gzip
    import shutil
    import tempfile

    import flamingo_rt._C as _ext

    src = Path(_ext.__file__)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / src.name
        shutil.copy2(src, lib)
        stripped = shutil.which("strip") is not None and subprocess.run(
            ["strip", "--strip-debug", str(lib)], capture_output=True).returncode == 0
        dst = out_dir / (src.name + ".gz")
        with open(lib, "rb") as f, gzip.open(dst, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
    return f"saved {src.name} ({'debug info stripped, ' if stripped else ''}{dst.stat().st_size / 1e6:.1f} MB gzip) to {dst}"


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``: triton's do_bench on GPU, torch's Timer on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import torch.utils.benchmark as tb

    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def profile_to_file(title: str, fn: Callable[[], object], device: torch.device, iters: int = 5) -> None:
    """Append torch.profiler's per-op table (host and device time) of ``iters`` calls of
    ``fn`` to RUN.out_dir/profiles.txt: where a call's time goes, kernels or the framework
    around them."""
    if RUN.out_dir is None or RUN.over():
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        fn()
        sync(device)
        with profile(activities=acts) as prof:
            for _ in range(iters):
                fn()
            sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        text = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    except Exception as e:  # the profile is a diagnostic: its failure is noted, not fatal
        text = f"profiler failed: {type(e).__name__}: {e}"
    with open(RUN.out_dir / "profiles.txt", "a") as f:
        f.write(f"\n=== {title} ({iters} calls)\n{text}\n")


def cuda_graph_of(fn: Callable[[], object], device: torch.device, reps: int):
    """A CUDA graph of ``reps`` calls of ``fn`` (warmed up on a side stream first, as
    capture requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return g


def ceilings(device: torch.device, quick: bool) -> Dict[str, float]:
    n = 8192 if device.type == "cuda" else (512 if quick else 1024)
    out = {}
    for name, dt in (("gemm_bf16_tflops", torch.bfloat16), ("gemm_fp32_tflops", torch.float32)):
        # a CPU whose bf16 products are torch's reference loops (AVX2 only: ~0.6 GFLOP/s)
        # times a small one: a dry run's 1024^3 took several seconds a call there
        m = 128 if cpu_gemm.half_products_slow(device, dt) else n
        a = torch.randn(m, m, device=device, dtype=dt)
        b = torch.randn(m, m, device=device, dtype=dt)
        ms = time_ms(lambda: torch.mm(a, b), device)
        out[name] = 2 * m**3 / (ms * 1e-3) / 1e12
    numel = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    out["copy_tbps"] = 2 * numel * 4 / (ms * 1e-3) / 1e12
    return out


# --------------------------------------------------------------------------- checks


@dataclass
class Check:
    op: str
    backend: str
    dtype: str
    case: str
    fwd_err: float
    bwd_err: float
    tol: float
    ok: bool
    note: str = ""
    skipped: bool = False


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-10}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    d = b.norm().item()
    return (a - b).norm().item() / (d if d > 0 else 1.0)


def run_case(op_name, fn, ref_fn, inputs, diff_idx, backend, dtype, device, case, cotangent=None) -> Check:
    """fn(*inputs, backend=...) on device/dtype vs ref_fn(*inputs) in float64 on CPU,
    forward and the gradients of inputs[diff_idx] for a random cotangent (or
    ``cotangent(ref, ref_inputs)``: for gradients that are sums over many elements, a
    cotangent without random signs keeps them well conditioned, so a relative error
    measures the kernel, not cancellation in a near-zero sum)."""
    if RUN.over():
        return Check(op_name, backend, str(dtype).replace("torch.", ""), case, math.nan, math.nan, TOL[dtype],
                     True, note="skipped: time budget", skipped=True)
    try:
        dev_in, ref_in = [], []
        for i, t in enumerate(inputs):
            if torch.is_tensor(t) and t.is_floating_point():
                d = t.to(device=device, dtype=dtype).detach().requires_grad_(i in diff_idx)
                # the reference sees exactly the rounded inputs the backend sees
                r = t.to(dtype).double().detach().requires_grad_(i in diff_idx)
            else:
                d, r = (t.to(device) if torch.is_tensor(t) else t), t
            dev_in.append(d)
            ref_in.append(r)
        out = fn(*dev_in, backend=backend)
        ref = ref_fn(*ref_in)
        fwd = rel(out, ref)
        g = torch.randn_like(ref) if cotangent is None else cotangent(ref, ref_in).detach()
        bwd = 0.0
        if diff_idx:
            gd = torch.autograd.grad(out, [dev_in[i] for i in diff_idx], g.to(device=device, dtype=dtype))
            gr = torch.autograd.grad(ref, [ref_in[i] for i in diff_idx], g)
            bwd = max(rel(a, b) for a, b in zip(gd, gr))
        tol = TOL[dtype]
        c = Check(op_name, backend, str(dtype).replace("torch.", ""), case, fwd, bwd, tol,
                  fwd <= tol and bwd <= 3 * tol)
        if not c.ok:
            RUN.progress(f"FAIL {op_name} {backend} {c.dtype} {case}: fwd {fwd:.2e} bwd {bwd:.2e} (tol {tol:.0e})")
        return c
    except Exception as e:  # a crash is a failed check, reported, not fatal
        RUN.progress(f"FAIL {op_name} {backend} {dtype} {case}: {type(e).__name__}: {str(e)[:300]}")
        return Check(op_name, backend, str(dtype).replace("torch.", ""), case, math.inf, math.inf,
                     TOL[dtype], False, note=f"{type(e).__name__}: {str(e)[:200]}")


def xattn_cases(quick: bool):
    from flamingo_rt.ops import media_index_from_locations

    Ns = (1, 49, 64, 257) if quick else (1, 49, 64, 257, 300)
    dhs = (64, 96, 128)
    for N in Ns:
        for dh in dhs:
            if quick and dh == 96 and N != 49:
                continue
            B, T, H, M = 3, 24, 2, 3
            loc = torch.zeros(B, T, dtype=torch.bool)
            loc[0, [2, 3, 9]] = True  # text first, a 1-token segment, more images
            loc[1, [0]] = True  # one image from the first token
            # row 2: no image at all
            idx = media_index_from_locations(loc)
            q = torch.randn(B, T, H, dh)
            k = torch.randn(B, M, N, H, dh)
            v = torch.randn(B, M, N, H, dh)
            yield f"N={N} dh={dh}", (q, k, v, idx)
    # decode: one new token per sequence against the cached per-image K/V (the CUDA decode
    # kernel's path), rows with no image, the first image, a later one
    for N, dh in ((64, 64), (257, 128)):
        B, H, M = 4, 2, 3
        idx = torch.tensor([[-1], [0], [2], [1]], dtype=torch.int32)
        yield f"decode N={N} dh={dh}", (torch.randn(B, 1, H, dh), torch.randn(B, M, N, H, dh),
                                         torch.randn(B, M, N, H, dh), idx)


def resampler_cases(quick: bool, interpreted: bool = False):
    """(case, (q, k_x, v_x, k_l, v_l)); k_x/v_x and k_l/v_l are the halves of fused [K | V]
    projections (non-contiguous, as the resampler makes them). ``interpreted``: the Triton
    interpreter on the CPU (dry run), a few small cases only."""
    Ss = (1, 49, 257) if quick else (1, 49, 256, 257, 300)
    for S in Ss:
        for dh in (64, 96, 128):
            if quick and dh == 96 and S != 49:
                continue
            if interpreted and (S == 257 or dh == 128):
                continue
            n, L, H = (2, 8, 1) if interpreted else (3, 64, 2)
            q = torch.randn(n, L, H, dh)
            k_x, v_x = torch.randn(n, S, 2, H, dh).unbind(2)
            k_l, v_l = torch.randn(n, L, 2, H, dh).unbind(2)
            yield f"S={S} dh={dh}", (q, k_x, v_x, k_l, v_l)


def all_dtypes(device: torch.device) -> List[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def check_all(device: torch.device, quick: bool, dtypes: Optional[List[torch.dtype]] = None,
              backends: Optional[List[str]] = None) -> List[Check]:
    import flamingo_rt.ops as ops
    from flamingo_rt.ops import backend as be
    from flamingo_rt.ops import reference as R

    dtypes = dtypes or all_dtypes(device)
    results: List[Check] = []
    # float32 means IEEE float32 here: torch's default lets cuDNN convolutions use TF32
    # (errors ~3e-4), which would fail the float32 tolerance of the ops built on them
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    def backends_for(op):
        return [b for b in be.implemented(op) if be._device_ok(b, device) and (backends is None or b in backends)]

    for b in backends_for("image_causal_attention") if RUN.want("xattn_checks") else ():
        for dt in dtypes:
            for case, (q, k, v, idx) in xattn_cases(quick):
                if b == "triton" and device.type == "cpu" and not case.startswith(("N=49 dh=64", "decode N=64")):
                    continue  # the Triton interpreter is slow: a dry run checks two cases
                for allp in (False, True):
                    results.append(run_case(
                        "image_causal_attention" + (" all-prev" if allp else ""),
                        lambda q, k, v, i, backend: ops.image_causal_attention(q, k, v, i, all_previous=allp, backend=backend),
                        lambda q, k, v, i: R.image_causal_attention(q, k, v, i, allp),
                        (q, k, v, idx), (0, 1, 2), b, dt, device, case))
    for b in backends_for("resampler_attention") if RUN.want("resampler_checks") else ():
        for dt in dtypes:
            for case, xs in resampler_cases(quick, interpreted=b == "triton" and device.type == "cpu"):
                results.append(run_case(
                    "resampler_attention",
                    lambda *t, backend: ops.resampler_attention(*t, backend=backend),
                    lambda *t: R.resampler_attention(*t),
                    xs, (0, 1, 2, 3, 4), b, dt, device, case))
    if hasattr(ops, "bias_gamma_act") and RUN.want("bga_checks"):
        for b in backends_for("bias_gamma_act"):
            for dt in dtypes:
                for act in ("gelu", "relu", "silu"):
                    for cl in (False, True):
                        x = torch.randn(2, 40, 9, 7)
                        if cl:
                            x = x.to(memory_format=torch.channels_last)
                        bias = torch.randn(40)
                        results.append(run_case(
                            "bias_gamma_act",
                            lambda x, bias, backend: ops.bias_gamma_act(x, bias, act, 1.7015, backend=backend),
                            lambda x, bias: R.bias_gamma_act(x, bias, act, 1.7015),
                            (x, bias), (0, 1), b, dt, device, f"{act} {'NHWC' if cl else 'NCHW'}"))
    if RUN.want("nfnet_checks"):
        results += nfnet_checks(device, dtypes, backends_for, quick)
    return results


def _check_worker(device: str, quick: bool, section: str, dtype: str, backend: str, deadline: float,
                  seed: int) -> List[Check]:
    """One (section, dtype, backend) of the checks in a worker process (``--jobs``)."""
    import flamingo_rt  # noqa: F401  (registers the ops and the C++ backends)

    RUN.deadline, RUN.only = deadline, {section}
    torch.manual_seed(seed)
    return check_all(torch.device(device), quick, [getattr(torch, dtype)], [backend])


def check_all_parallel(device: torch.device, quick: bool, jobs: int) -> List[Check]:
    """The checks split by (section, dtype) over ``jobs`` processes (spawned, each with its
    own CUDA context). Triton compiles each kernel specialization on the CPU, one at a
    time per process: on a GPU machine with many cores this is what the checks' time is,
    and the workers also fill the on-disk kernel cache that the timings then hit."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from flamingo_rt.ops import backend as be

    sections = [s for s in RunControl.SECTIONS if s.endswith("_checks") and (RUN.only is None or s in RUN.only)]
    # the backends on this device (of any op: a section without one of them checks nothing)
    device_backends = [b for b in be.BACKENDS if be._device_ok(b, device)]
    # (section, dtype, backend), the slowest to compile first: Triton, float32 (IEEE products)
    tasks = [(s, str(dt).replace("torch.", ""), b) for s in sections for dt in all_dtypes(device)
             for b in device_backends]
    tasks.sort(key=lambda t: (t[2] != "triton", t[1] != "float32"))
    RUN.progress(f"checks: {len(tasks)} (section, dtype, backend) tasks over {jobs} processes")
    base = int(torch.randint(0, 1 << 30, ()).item())
    out: List[Check] = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_check_worker, str(device), quick, s, d, b, RUN.deadline, base + i): (s, d, b)
                for i, (s, d, b) in enumerate(tasks)}
        done: Dict[tuple, List[Check]] = {}
        for f in cf.as_completed(futs):
            s, d, b = futs[f]
            try:
                done[(s, d, b)] = f.result()
            except Exception as e:  # a worker that died: one failed check that says so
                done[(s, d, b)] = [Check(s, b, d, "-", math.inf, math.inf, math.nan, False,
                                         note=f"worker died: {type(e).__name__}: {str(e)[:200]}")]
            res = done[(s, d, b)]
            RUN.progress(f"checks {s} {d} {b}: {len(res)} done, {sum(not c.ok for c in res)} failed")
    for t in tasks:  # in a fixed order, whatever finished first
        out += done[t]
    return out


def _conv_same_ref(x, w, bias, stride, groups, act, gamma):
    """float64 reference of conv2d_bias_act: TF-style SAME padding, conv, bias, act, gamma."""
    import torch.nn.functional as F

    from flamingo_rt.ops.nfconv import same_padding

    t, b_ = same_padding(x.shape[2], w.shape[2], stride)
    l_, r_ = same_padding(x.shape[3], w.shape[3], stride)
    y = F.conv2d(F.pad(x, (l_, r_, t, b_)), w, bias, stride, 0, 1, groups)
    if act == "gelu":
        y = F.gelu(y)
    return y * gamma


def _conv_checked(x, w, bias, stride, groups, act, backend):
    """conv2d_bias_act on ``backend``; an error if the Triton convolution raised and the op
    fell back to the vendor convolution (which would pass the check without testing it)."""
    from flamingo_rt.ops import nfconv

    y = nfconv.conv2d_bias_act(x, w, bias, stride, groups, act, 1.7, backend=backend)
    if backend == "triton" and x.is_cuda and nfconv._TRITON_CONV_BROKEN:
        raise RuntimeError("the Triton convolution raised and the op fell back to the vendor convolution")
    return y


def nfnet_checks(device, dtypes, backends_for, quick) -> List[Check]:
    """NFNet ops (issue 5): ws_standardize and se_residual forward + backward on every
    backend, and the frozen-path conv2d_bias_act (Triton implicit-GEMM NHWC conv on the GPU:
    strides 1 / 2, SAME padding, groups, 1x1 / 3x3)."""
    import flamingo_rt.ops as ops
    from flamingo_rt.ops import nfconv
    from flamingo_rt.ops import reference as R

    out: List[Check] = []
    if not hasattr(nfconv, "conv2d_bias_act"):
        return out
    RN = R.nfnet
    for b in backends_for("ws_standardize"):
        for dt in dtypes:
            for shape in ((16, 8, 3, 3), (128, 128, 3, 3), (96, 1536, 1, 1)):
                if b == "triton" and device.type == "cpu" and shape != (16, 8, 3, 3):
                    continue  # the Triton interpreter is slow: a dry run checks the small shape
                w = torch.randn(*shape) * 0.3 + 0.1
                g = 1 + 0.2 * torch.randn(shape[0], 1, 1, 1)
                out.append(run_case("ws_standardize",
                                    lambda w, g, backend: ops.ws_standardize(w, g, 1e-5, backend=backend),
                                    lambda w, g: RN.ws_standardize(w, g, 1e-5), (w, g), (0, 1), b, dt, device,
                                    f"{shape}"))
    for b in backends_for("se_residual"):
        for dt in dtypes:
            for cl in (False, True):
                for shape in ((2, 64, 7, 7), (3, 40, 9, 5)):
                    x = torch.randn(*shape)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    gl, sc, c = torch.randn(shape[:2]), torch.randn(*shape), torch.tensor(0.7)
                    out.append(run_case("se_residual",
                                        lambda x, g, s, c, backend: ops.se_residual(x, g, s, c, backend=backend),
                                        RN.se_residual, (x, gl, sc, c), (0, 1, 2, 3), b, dt, device,
                                        f"{shape} {'NHWC' if cl else 'NCHW'}",
                                        # d_scale = sum(g * x * sigmoid(gate)) over every element: a
                                        # cotangent with x's signs keeps that sum far from 0
                                        cotangent=lambda ref, ins: ins[0].sign() * (0.5 + torch.rand_like(ref))))
    conv_cases = [(2, 32, 15, 14, 64, 3, 1, 1), (2, 32, 16, 16, 64, 3, 2, 4), (1, 24, 9, 8, 48, 1, 1, 1),
                  (2, 3, 17, 16, 16, 3, 2, 1), (1, 128, 14, 14, 128, 3, 1, 1)]
    if quick:
        conv_cases = conv_cases[:4]
    for b in backends_for("bias_gamma_act"):
        for dt in dtypes:
            for i, (N, C, H, W, O, k, st, g) in enumerate(conv_cases):
                if b == "triton" and device.type == "cpu" and i not in (2, 3):
                    continue  # the Triton interpreter is slow: a dry run checks a 1x1 and a stride-2 3x3 case
                x = torch.randn(N, C, H, W)
                w = torch.randn(O, C // g, k, k) * (C // g * k * k) ** -0.5
                bias = 0.1 * torch.randn(O)
                for act in ("gelu", "none"):
                    out.append(run_case(
                        "conv2d_bias_act",
                        lambda x, w, bias, backend: _conv_checked(x, w, bias, st, g, act, backend),
                        lambda x, w, bias: _conv_same_ref(x, w, bias, st, g, act, 1.7),
                        (x, w, bias), (), b, dt, device, f"{N}x{C}x{H}x{W}->{O} k{k} s{st} g{g} {act}"))
    return out


def nfnet_timings(device: torch.device, quick: bool, add) -> None:
    """Frozen NFNet encoder: ours folded (fast path) vs ours unfolded vs timm (when
    installed), channels-last bf16 on the GPU (issue 5 target: dm_nfnet_f6 at 448, batch 32,
    >= 1.5x timm channels-last bf16)."""
    from flamingo_rt.models.config import NFNetConfig
    from flamingo_rt.models.nfnet import NFNet

    if device.type == "cuda":
        cases = [("dm_nfnet_f0", 224, 32)] + ([] if quick else [("dm_nfnet_f6", 448, 32)])
        dt = torch.bfloat16
    else:
        cases = [("tiny-nfnet", 64, 2)]
        dt = torch.float32
    for name, res, batch in cases:
        if name.startswith("dm_"):
            cfg = NFNetConfig.timm(name)
        else:
            cfg = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 48, 64, 96), stem_chs=16, group_size=8,
                              num_features=128)
        torch.manual_seed(0)
        net = NFNet(cfg).to(device=device, dtype=dt).eval()
        x = torch.randn(batch, 3, res, res, device=device, dtype=dt)
        # FLOPs of the convs (2 * MACs), counted once from the module shapes
        flops = _nfnet_flops(net, res) * batch
        shape = f"{name} {res}px b{batch}"
        with torch.no_grad():
            net.requires_grad_(False)
            add("nfnet frozen fwd", "ours unfolded", shape, lambda: net.forward_features(x), flops, _nbytes(x))
            net.freeze()
            from flamingo_rt.ops import nfconv

            add("nfnet frozen fwd", "ours folded (fast)", shape, lambda: net.forward_features(x), flops, _nbytes(x),
                note="Triton conv FAILED: vendor conv ran" if nfconv._TRITON_CONV_BROKEN else "")
            try:
                import timm  # noqa: F401

                tm = timm.create_model(name, pretrained=False) if name.startswith("dm_") else None
            except Exception:
                tm = None
            if tm is not None:
                tm = tm.to(device=device, dtype=dt).eval().to(memory_format=torch.channels_last)
                xc = x.contiguous(memory_format=torch.channels_last)
                add("nfnet frozen fwd", "timm channels-last (peer)", shape, lambda: tm.forward_features(xc),
                    flops, _nbytes(x))
        del net


def _nfnet_flops(net, res: int) -> float:
    """2 * multiply-adds of every convolution of one image (the unfolded forward, traced)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    total = [0.0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (F.conv2d, torch.conv2d):
                total[0] += 2.0 * out[0].numel() * args[1][0].numel()
            return out

    from flamingo_rt.ops import winograd_conv

    p = next(net.parameters())
    cl, net.channels_last = net.channels_last, False  # every conv an F.conv2d (CPU: channels-last 1x1 convs are products,
    try:                                              # float32 3x3 ones Winograd convolutions)
        with torch.no_grad(), Count(), winograd_conv.use(False):
            net.forward_features(torch.zeros(1, 3, res, res, device=p.device, dtype=p.dtype))
    finally:
        net.channels_last = cl
    return total[0]


# --------------------------------------------------------------------------- timings


@dataclass
class Timing:
    op: str
    impl: str
    dtype: str
    shape: str
    ms: float
    tflops: float
    tbps: float
    pct_copy: float
    note: str = ""


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))


def time_all(device: torch.device, quick: bool, ceil: Dict[str, float],
             out: Optional[List[Timing]] = None) -> List[Timing]:
    """Every timing, appended to ``out`` (a list the caller may write out as it grows)."""
    import torch.nn.functional as F

    import flamingo_rt.ops as ops
    from flamingo_rt.ops import backend as be

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = [] if out is None else out

    def add(op, impl, shape, fn, flops, nbytes, note="", graph_reps=0):
        """Time ``fn``; with ``graph_reps`` (GPU), ``graph_reps`` calls of it captured in one
        CUDA graph and the replay's time per call: the device time alone, without the host
        time (Python, dispatch, launches) that an eager call of a small problem waits on."""
        if RUN.over():
            out.append(Timing(op, impl, str(dt).replace("torch.", ""), shape, math.nan, math.nan, math.nan,
                              math.nan, "skipped: time budget"))
            return
        try:
            if graph_reps:
                ms = time_ms(cuda_graph_of(fn, device, graph_reps).replay, device) / graph_reps
            else:
                ms = time_ms(fn, device)
            s = ms * 1e-3
            tb = nbytes / s / 1e12
            out.append(Timing(op, impl, str(dt).replace("torch.", ""), shape, ms, flops / s / 1e12, tb,
                              100 * tb / ceil["copy_tbps"], note))
            RUN.progress(f"{op} | {impl} | {shape}: {ms:.4f} ms, {flops / s / 1e12:.2f} TFLOP/s, {tb:.3f} TB/s")
        except Exception as e:
            RUN.progress(f"{op} | {impl} | {shape}: {type(e).__name__}: {str(e)[:300]}")
            out.append(Timing(op, impl, str(dt).replace("torch.", ""), shape, math.nan, math.nan, math.nan,
                              math.nan, f"{type(e).__name__}: {str(e)[:120]}"))

    def xattn_time():
        # image-causal cross-attention: a few-shot prompt, every token sees its own 64 tokens
        if device.type == "cuda":
            B, T, M, N, H, dh = 8, 2048, 16, 64, 8, 64
        else:
            B, T, M, N, H, dh = 1, 128, 4, 64, 8, 64
        q = torch.randn(B, T, H, dh, device=device, dtype=dt)
        k = torch.randn(B, M, N, H, dh, device=device, dtype=dt)
        v = torch.randn(B, M, N, H, dh, device=device, dtype=dt)
        loc = torch.zeros(B, T, dtype=torch.bool)
        loc[:, torch.linspace(1, T - 8, M).long()] = True
        from flamingo_rt.ops import media_index_from_locations

        idx = media_index_from_locations(loc).to(device)
        shape = f"B{B} T{T} M{M} N{N} H{H} d{dh}"
        flops = 4 * B * T * N * H * dh
        nbytes = _nbytes(q, k, v, idx) + q.numel() * q.element_size()
        xattn_backends = [b for b in be.implemented("image_causal_attention") if be._device_ok(b, device)
                          and not (b == "triton" and device.type == "cpu")]  # no timing of the interpreter
        for b in xattn_backends:
            add("xattn fwd", b, shape, lambda: ops.image_causal_attention(q, k, v, idx, backend=b), flops, nbytes)
            if device.type == "cuda":
                add("xattn fwd", f"{b} (CUDA graph, per call)", shape,
                    lambda b=b: ops.image_causal_attention(q, k, v, idx, backend=b), flops, nbytes, graph_reps=10)
        # peer: OpenFlamingo's dense formulation through SDPA with a (T, M*N) boolean mask
        img = torch.arange(M, device=device).repeat_interleave(N)
        mask = (img[None, None, :] == idx[:, :, None].long())[:, None]  # (B, 1, T, M*N)
        qh, kh, vh = q.transpose(1, 2), k.reshape(B, M * N, H, dh).transpose(1, 2), v.reshape(B, M * N, H, dh).transpose(1, 2)
        add("xattn fwd", "sdpa dense mask (OF)", shape,
            lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), 4 * B * T * M * N * H * dh, nbytes,
            note="FLOPs counted dense")

        _time_xattn_more(add, device, dt, xattn_backends)

    def resampler_time():
        # resampler attention: all media of a batch in one call
        if device.type == "cuda":
            n, L, S, H, dh = 256, 64, 257, 16, 96
        else:
            n, L, S, H, dh = 8, 64, 64, 8, 64
        qr = torch.randn(n, L, H, dh, device=device, dtype=dt)
        kx, vx = (torch.randn(n, S, H, dh, device=device, dtype=dt) for _ in range(2))
        kl, vl = (torch.randn(n, L, H, dh, device=device, dtype=dt) for _ in range(2))
        shape = f"n{n} L{L} S{S} H{H} d{dh}"
        flops = 4 * n * L * (S + L) * H * dh
        nbytes = _nbytes(qr, kx, vx, kl, vl, qr)
        # (the Triton interpreter on the CPU is not worth timing)
        r_backends = [b for b in be.implemented("resampler_attention") if be._device_ok(b, device)
                      and not (b == "triton" and device.type == "cpu")]
        for b in r_backends:
            add("resampler fwd", b, shape, lambda: ops.resampler_attention(qr, kx, vx, kl, vl, backend=b), flops, nbytes)
        kc = torch.cat([kx, kl], 1).transpose(1, 2)
        vc = torch.cat([vx, vl], 1).transpose(1, 2)
        add("resampler fwd", "sdpa on concat (peer)", shape,
            lambda: F.scaled_dot_product_attention(qr.transpose(1, 2), kc, vc), flops, nbytes,
            note="concat excluded")
        add("resampler fwd", "sdpa incl. concat (peer)", shape,
            lambda: F.scaled_dot_product_attention(qr.transpose(1, 2), torch.cat([kx, kl], 1).transpose(1, 2),
                                                   torch.cat([vx, vl], 1).transpose(1, 2)), flops, nbytes)
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def sdpa_flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qr.transpose(1, 2), kc, vc)

            add("resampler fwd", "sdpa flash on concat (peer)", shape, sdpa_flash, flops, nbytes,
                note="backend pinned, concat excluded")
        # backward: the kernels alone (dq, dk_x, dv_x, dk_l, dv_l from dO); bytes = inputs + dO + grads
        go = torch.randn_like(qr)
        bflops = 2.5 * flops  # recomputed QK^T and PV, plus dV, dP, dK, dQ
        bbytes = 2 * _nbytes(qr, kx, vx, kl, vl) + _nbytes(go)
        for b in r_backends:
            bwd_fn = be.get("resampler_attention.backward", b)
            add("resampler bwd", b, shape, lambda: bwd_fn(go, qr, kx, vx, kl, vl, dh ** -0.5), bflops, bbytes)
        qs, ks_, vs_ = (t.detach().requires_grad_() for t in (qr.transpose(1, 2), kc, vc))
        o_sdpa = F.scaled_dot_product_attention(qs, ks_, vs_)
        add("resampler bwd", "sdpa on concat (peer)", shape,
            lambda: torch.autograd.grad(o_sdpa, (qs, ks_, vs_), go.transpose(1, 2), retain_graph=True),
            bflops, bbytes, note="concat excluded")

    def bga_time():
        if not hasattr(ops, "bias_gamma_act"):
            return
        x = torch.randn(32 if device.type == "cuda" else 2, 256, 56, 56, device=device, dtype=dt)
        bias = torch.randn(256, device=device, dtype=dt)
        nb = 2 * _nbytes(x)
        for b in [b for b in be.implemented("bias_gamma_act") if be._device_ok(b, device)]:
            add("bias_gamma_act fwd", b, f"{tuple(x.shape)}", lambda: ops.bias_gamma_act(x, bias, "gelu", 1.7015, backend=b), 0, nb)
        add("bias_gamma_act fwd", "torch eager (peer)", f"{tuple(x.shape)}",
            lambda: F.gelu(x + bias[None, :, None, None]) * 1.7015, 0, nb)
    sections = {  # name: (run, seconds it needs at least: a long compile would overrun)
        "xattn_time": (xattn_time, 0),
        "resampler_time": (resampler_time, 0),
        "bga_time": (bga_time, 0),
        "decode_time": (lambda: decode_step_timings(device, quick, add), 150 if device.type == "cuda" else 0),
        "nfnet_time": (lambda: nfnet_timings(device, quick, add), 60),
        "train_time": (lambda: train_timings(device, quick, out), 60 if device.type == "cuda" else 0),
    }
    for name in RUN.order([n for n in RunControl.SECTIONS if n in sections]):
        fn, min_left = sections[name]
        if RUN.want(name, min_left_s=min_left):
            fn()
    return out


def _registered_op(fn):
    """``fn`` run with FLAMINGO_RT_EAGER_OPS=0: flamingo_rt's ops through their registered
    torch.library ops, as before the plain eager path."""
    from unittest import mock

    def run():
        with mock.patch.dict(os.environ, {"FLAMINGO_RT_EAGER_OPS": "0"}):
            return fn()
    return run


def _time_xattn_more(add, device, dt, backends) -> None:
    """image-causal attention beyond the forward above: forward+backward (the training
    step's attention core) at OpenFlamingo-3B's shape (T 2048, M 32 images of 64 tokens,
    8 heads x 64, batch 1 and 4), single-token decode at batch 1, each against SDPA with
    OpenFlamingo's dense (T, M*64) mask and, on GPU, compiled FlexAttention with a block mask."""
    import torch.nn.functional as F

    import flamingo_rt.ops as ops
    from flamingo_rt.ops import backend as be
    from flamingo_rt.ops import media_index_from_locations

    H, N, dh = 8, 64, 64
    shapes = [(1, 2048, 32), (4, 2048, 32)] if device.type == "cuda" else [(1, 128, 4)]
    for B, T, M in shapes:
        q = torch.randn(B, T, H, dh, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(B, M, N, H, dh, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(B, M, N, H, dh, device=device, dtype=dt, requires_grad=True)
        loc = torch.zeros(B, T, dtype=torch.bool)
        loc[:, torch.linspace(1, T - 8, M).long()] = True
        idx = media_index_from_locations(loc).to(device)
        go = torch.randn(B, T, H, dh, device=device, dtype=dt)
        shape = f"B{B} T{T} M{M} N{N} H{H} d{dh}"
        flops = 3 * 4 * B * T * N * H * dh  # fwd 4, bwd 8 (dq, dk, dv, dP) per q.k pair
        esz = q.element_size()
        nbytes = esz * (2 * q.numel() + 2 * k.numel() + 2 * v.numel() + 2 * q.numel()) + idx.numel() * 4
        for b in backends:
            def step(b=b):
                out = ops.image_causal_attention(q, k, v, idx, backend=b)
                torch.autograd.grad(out, (q, k, v), go)
            add("xattn fwd+bwd", b, shape, step, flops, nbytes,
                note="bwd = triton kernels" if b == "cuda" else "")
            # the same through the registered torch.library op: what the plain eager path
            # (flamingo_rt/ops/_eager.py) saves in host time
            add("xattn fwd+bwd", f"{b} (registered op)", shape, _registered_op(step), flops, nbytes)
            if device.type == "cuda":
                add("xattn fwd+bwd", f"{b} (CUDA graph, per call)", shape, step, flops, nbytes, graph_reps=5)
            profile_to_file(f"xattn fwd+bwd {b} {shape}", step, device)
        # the backward's kernels alone (no op dispatch, no autograd): what of the fwd+bwd
        # time is kernels, and what is the framework around them
        for b in backends:
            try:
                bwd_fn = be.get("image_causal_attention.backward", b)
            except Exception:
                continue
            add("xattn bwd (kernels alone)", b, shape,
                lambda bwd_fn=bwd_fn: bwd_fn(go, q.detach(), k.detach(), v.detach(), idx, False, dh ** -0.5),
                flops * 2 / 3, esz * (2 * q.numel() + 2 * k.numel() + 2 * v.numel() + 2 * q.numel()))
        img = torch.arange(M, device=device).repeat_interleave(N)
        mask = (img[None, None, :] == idx[:, :, None].long())[:, None]
        kd, vd = (t.detach().reshape(B, M * N, H, dh).transpose(1, 2).requires_grad_(True) for t in (k, v))
        qd = q.detach().transpose(1, 2).requires_grad_(True)
        god = go.transpose(1, 2)

        def sdpa_step():
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
            torch.autograd.grad(out, (qd, kd, vd), god)
        add("xattn fwd+bwd", "sdpa dense mask (OF)", shape, sdpa_step, M * flops, nbytes, note="FLOPs counted dense")
        if device.type == "cuda":
            add("xattn fwd+bwd", "sdpa dense mask (OF) (CUDA graph, per call)", shape, sdpa_step, M * flops, nbytes,
                note="FLOPs counted dense", graph_reps=5)
        if device.type == "cuda":
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                idx_l = idx.long()

                def mask_mod(b, h, q_idx, kv_idx):
                    return idx_l[b, q_idx] == kv_idx // N

                bm = create_block_mask(mask_mod, B, None, T, M * N, device=device)
                flex = torch.compile(flex_attention)
                add("xattn fwd", "flex_attention compiled", shape,
                    lambda: flex(qd, kd, vd, block_mask=bm), flops / 3, esz * (2 * q.numel() + k.numel() + v.numel()),
                    note="forward only")

                def flex_step():
                    out = flex(qd, kd, vd, block_mask=bm)
                    torch.autograd.grad(out, (qd, kd, vd), god)
                add("xattn fwd+bwd", "flex_attention compiled", shape, flex_step, flops, nbytes)
            except Exception as e:  # FlexAttention missing or failing: say so in the table
                add("xattn fwd", "flex_attention compiled", shape, lambda: (_ for _ in ()).throw(e), 0, 1)

    # decode: one token per sequence, batch 1, against cached K/V of 32 images
    B, M = 1, (32 if device.type == "cuda" else 4)
    q = torch.randn(B, 1, H, dh, device=device, dtype=dt)
    k = torch.randn(B, M, N, H, dh, device=device, dtype=dt)
    v = torch.randn(B, M, N, H, dh, device=device, dtype=dt)
    idx = torch.full((B, 1), M - 1, dtype=torch.int32, device=device)
    shape = f"decode B{B} M{M} N{N} H{H} d{dh}"
    flops = 4 * B * N * H * dh
    nbytes = q.element_size() * (2 * q.numel() + 2 * B * N * H * dh)  # the one image's K/V
    for b in backends:
        add("xattn decode", b, shape, lambda b=b: ops.image_causal_attention(q, k, v, idx, backend=b), flops, nbytes)
        if device.type == "cuda":
            add("xattn decode", f"{b} (CUDA graph, per call)", shape,
                lambda b=b: ops.image_causal_attention(q, k, v, idx, backend=b), flops, nbytes, graph_reps=20,
                note="issue 3 target: decode kernel < 10 us per layer")
        profile_to_file(f"xattn decode {b} {shape}", lambda b=b: ops.image_causal_attention(q, k, v, idx, backend=b),
                        device, iters=20)
    add("xattn decode", "auto (the default)", shape, lambda: ops.image_causal_attention(q, k, v, idx), flops, nbytes)
    if "cuda" in backends:
        from flamingo_rt.ops import _cuda_xattn

        add("xattn decode", "cuda decode kernel (op)", shape,
            lambda: _cuda_xattn.image_causal_attention_decode(q, k, v, idx), flops, nbytes)
    img = torch.arange(M, device=device).repeat_interleave(N)
    mask = (img[None, None, :] == idx[:, :, None].long())[:, None]
    qh, kh, vh = q.transpose(1, 2), k.reshape(B, M * N, H, dh).transpose(1, 2), v.reshape(B, M * N, H, dh).transpose(1, 2)
    add("xattn decode", "sdpa dense mask (OF)", shape,
        lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), M * flops, nbytes,
        note="reads all M images")


def train_timings(device: torch.device, quick: bool, out: List["Timing"]) -> None:
    """Issue 7 on this device: ``flamingo-rt train``'s Trainer (the ``tiny`` preset, its
    vocabulary rows training, on a world mixture of 224 px PNG documents and pairs, batch 8 +
    8, fp32) for a few steps with the batches made in the loop and made ahead in a thread
    (``prefetch_steps`` 0 / 1): the median step time, the host time making a step's batches,
    and whether both runs gave the same finite losses (a row with NaN and the error in its
    note when the run fails)."""
    import statistics
    import tempfile

    from flamingo_rt.io.pretrained import save_pretrained
    from flamingo_rt.io.tokenizer import FlamingoTokenizer
    from flamingo_rt.models import Flamingo, get_preset
    from flamingo_rt.runtime.train import TrainConfig, Trainer, write_dataset
    from flamingo_rt.world import image_text_pairs, interleaved_documents, world_corpus

    steps = 4 if quick else 12
    shape = f"tiny preset, docs 8 + pairs 8 of 224 px PNG, {steps} steps"
    op = "train step (Trainer)"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            tok = FlamingoTokenizer.train_bpe(world_corpus(300), vocab_size=400)
            write_dataset(interleaved_documents(0, image_size=224, max_images=3, n=8 * steps), root / "docs",
                          "interleaved", shard_size=32)
            write_dataset(image_text_pairs(1, image_size=224, n=8 * steps), root / "pairs", "pairs", shard_size=32)
            cfg = get_preset("tiny")
            cfg.lm.vocab_size = tok.vocab_size
            cfg.vision.image_size = 64
            torch.manual_seed(0)
            save_pretrained(Flamingo(cfg), root / "model", tokenizer=tok)
            runs = {}
            for prefetch in (0, 1):
                d = dict(model=str(root / "model"), out_dir=str(root / f"run{prefetch}"), steps=steps, seed=0,
                         progress=False, checkpoint_every=10 ** 6, prefetch_steps=prefetch, device=str(device),
                         datasets=[dict(name="docs", kind="interleaved", path=str(root / "docs"), weight=1.0,
                                        batch_size=8, max_images=3, max_tokens=96),
                                   dict(name="pairs", kind="pairs", path=str(root / "pairs"), weight=0.2,
                                        batch_size=8)])
                tr = Trainer(TrainConfig.from_dict(d))
                make, made = tr._make_step, []

                def timed(make=make, made=made):
                    t0 = time.perf_counter()
                    r = make()
                    made.append(time.perf_counter() - t0)
                    return r

                tr._make_step = timed
                hist = tr.fit()
                tr.close()
                runs[prefetch] = ([h["loss"] for h in hist], [h["step_time_s"] for h in hist[1:]], made)
        same = runs[0][0] == runs[1][0]
        finite = all(math.isfinite(v) for losses in runs[0][0] for v in losses.values())
        for prefetch, (losses, times, made) in runs.items():
            out.append(Timing(op, f"prefetch_steps {prefetch}", "float32", shape,
                              1e3 * statistics.median(times), math.nan, math.nan, math.nan,
                              f"batches' host work {1e3 * statistics.median(made):.0f} ms a step; losses "
                              f"{'equal' if same else 'DIFFER'} across prefetch, {'finite' if finite else 'NOT finite'}"))
        RUN.progress(f"{op}: " + ", ".join(f"prefetch {p} {1e3 * statistics.median(r[1]):.1f} ms" for p, r in runs.items()))
    except Exception as e:  # a failed row, not a crash
        out.append(Timing(op, "setup or run", "float32", shape, math.nan, math.nan, math.nan, math.nan,
                          f"{type(e).__name__}: {str(e)[:120]}"))


def decode_step_timings(device: torch.device, quick: bool, add) -> None:
    """Issue 6: one whole-model decode step at batch 1 after a 32-shot prompt (33 images of
    64 tokens, ~20 text tokens per shot), ``flamingo-3b`` with random bf16 weights on GPU
    (the ``tiny`` preset, 4 shots, fp32 on the CPU dry run): eager, compiled, and compiled
    with CUDA graphs (what ``Generator(compile=True)`` runs on a GPU). Bytes = what a step
    must read: the LM's and cross-attention blocks' weights (one row of the embedding), the
    filled self-attention KV slots, and one image's K/V per block; "% copy BW" >= 67 means
    within 1.5x of the memory-bound limit (issue 6's GPU target)."""
    from flamingo_rt.models import Flamingo, get_preset
    from flamingo_rt.runtime import engine
    from flamingo_rt.runtime.cache import StaticCache

    preset, shots, per_shot = ("tiny", 4, 20) if quick else ("flamingo-3b", 32, 20)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    op = "decode step (whole model)"
    try:
        cfg = get_preset(preset)
        torch.manual_seed(0)
        with torch.device(device):
            model = Flamingo(cfg)
        model = model.to(dt).eval()
        M, T0 = shots + 1, (shots + 1) * per_shot
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, cfg.lm.vocab_size, (1, T0), generator=g)
        ids[0, ::per_shot] = cfg.image_token_id  # <image> opens each shot (and the query)
        cache = StaticCache(model, 1, T0 + 64, M, dtype=dt, device=device)
        media = torch.randn(1, M, cfg.resampler.num_latents, cfg.resampler.dim, device=device, dtype=dt)
        with torch.no_grad():
            cache.add_media(model, media, torch.tensor([M], device=device))
            engine.forward_chunk(model, cache, ids.to(device), torch.tensor([T0], device=device))
    except Exception as e:  # a failed row (NaN, the error in its note), not a crash
        err = e

        def fail():
            raise err

        add(op, "setup", preset, fail, 0, 0)
        return
    snap = cache.snapshot()
    el = torch.finfo(dt).bits // 8
    lm = model.lm
    weights = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel() + cfg.lm.dim
    kv = sum(k[:, :, :T0 + 1].numel() * 2 for k, _ in cache.kv)
    media_kv = sum(k[:, :1].numel() * 2 for k, _ in cache.media_kv.values())
    nbytes = (weights + kv + media_kv) * el
    flops = 2 * weights
    shape = f"{preset} B1, {T0} prompt tokens, {M} images"
    tok = torch.tensor([5], device=device)
    # (GPU: inductor compiles of a 24-layer model take minutes, so only the CUDA-graph one)
    variants = [("eager", engine.decode_tensors, False)]
    if device.type == "cuda":
        variants.append(("compiled + CUDA graphs", {"mode": "reduce-overhead"}, True))
    else:
        variants.append(("compiled (aot_eager)", {"backend": "aot_eager"}, False))
    for name, step, graphs in variants:
        if isinstance(step, dict):
            torch._dynamo.reset()  # each variant compiles on its own
            step = torch.compile(engine.decode_tensors, fullgraph=True, dynamic=False, **step)

        def fn(step=step, graphs=graphs):
            cache.restore(snap)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                return engine.decode_step(model, cache, tok, step=step, check_media=False)

        add(op, name, shape, fn, flops, nbytes,
            note="target (GPU): >= 67% of copy BW, i.e. within 1.5x of the memory-bound limit")
        profile_to_file(f"{op} {name} {shape}", fn, device, iters=10)
    del model, cache


# --------------------------------------------------------------------------- report


def table(device_name: str, ceil: Dict[str, float], checks: List[Check], timings: List[Timing]) -> str:
    lines = [f"# flamingo_rt GPU check — {device_name} — {time.strftime('%Y-%m-%d %H:%M')}", ""]
    lines.append(f"ceilings: copy {ceil['copy_tbps']:.3f} TB/s, GEMM bf16 {ceil['gemm_bf16_tflops']:.1f} TFLOP/s, "
                 f"fp32 {ceil['gemm_fp32_tflops']:.1f} TFLOP/s; torch {torch.__version__}")
    if RUN.skipped:
        lines.append(f"sections skipped for want of time (--budget-s): {', '.join(RUN.skipped)}")
    lines.append("")
    groups: Dict[tuple, List[Check]] = {}
    for c in checks:
        groups.setdefault((c.op, c.backend, c.dtype), []).append(c)
    lines.append("| op | backend | dtype | cases | worst fwd err | worst bwd err | tol | result |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for (op, b, dt), all_cs in groups.items():
        cs = [c for c in all_cs if not c.skipped]
        n_skip = len(all_cs) - len(cs)
        bad = [c for c in cs if not c.ok]
        res = 'PASS' if not bad else 'FAIL: ' + ', '.join(c.case + (' ' + c.note if c.note else '') for c in bad[:3])
        if n_skip:
            res += f" ({n_skip} skipped: time budget)"
        worst_f = max((c.fwd_err for c in cs), default=math.nan)
        worst_b = max((c.bwd_err for c in cs), default=math.nan)
        lines.append(f"| {op} | {b} | {dt} | {len(cs)} | {worst_f:.2e} | {worst_b:.2e} | {all_cs[0].tol:.0e} | {res} |")
    lines.append("")
    lines.append("| op | implementation | dtype | shape | ms | TFLOP/s | TB/s | % copy BW | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for t in timings:
        lines.append(f"| {t.op} | {t.impl} | {t.dtype} | {t.shape} | {t.ms:.4f} | {t.tflops:.2f} | {t.tbps:.3f} | "
                     f"{t.pct_copy:.1f} | {t.note} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu (dry run)")
    ap.add_argument("--quick", action="store_true", help="fewer cases (default on CPU)")
    ap.add_argument("--no-build", action="store_true", help="do not try to build flamingo_rt._C")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget of the whole run in seconds: what is left past it is skipped "
                         "(reported as skipped) and the table is still written")
    ap.add_argument("--only", default=None,
                    help="comma-separated sections to run, timings in the order given: "
                         + ", ".join(RunControl.SECTIONS)
                         + " ('checks' / 'time' for all of a kind; 'xattn' for both xattn sections)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes for the checks (each compiles its own Triton kernels; the timings "
                         "always run in this one)")
    ap.add_argument("--save-ext", action="store_true",
                    help="copy the built flamingo_rt._C library into --out (to carry it to a later run)")
    args = ap.parse_args(argv)
    RUN.configure(args.budget_s, args.only)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type == "cpu"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    RUN.out_dir = out_dir
    (out_dir / "profiles.txt").unlink(missing_ok=True)
    log: List[str] = []
    t0 = time.time()
    if args.no_build:
        try:
            import flamingo_rt._C  # noqa: F401

            built = True
        except ImportError:
            built, _ = False, log.append("flamingo_rt._C not built (--no-build): C++ backends skipped")
    else:
        built = ensure_built(log)
    import flamingo_rt  # noqa: F401  (registers ops, and the C++ backends when built)

    if built and args.save_ext:
        log.append(save_extension(out_dir))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU dry run ({platform.processor() or platform.machine()})"
    torch.manual_seed(int(time.time()) & 0xFFFF)  # fresh random inputs every run
    ceil = ceilings(device, quick)
    RUN.progress("ceilings: " + ", ".join(f"{k} {v:.3f}" for k, v in ceil.items()))

    def write(checks, timings) -> str:
        text = table(name, ceil, checks, timings)
        (out_dir / "table.md").write_text(text + "\n")
        (out_dir / "results.json").write_text(json.dumps({
            "device": name, "torch": torch.__version__, "extension_built": built, "log": log,
            "ceilings": ceil, "checks": [asdict(c) for c in checks], "timings": [asdict(t) for t in timings],
            "seconds": time.time() - t0, "budget_s": args.budget_s, "only": args.only,
        }, indent=1))
        return text

    checks = check_all_parallel(device, quick, args.jobs) if args.jobs > 1 else check_all(device, quick)
    timings: List[Timing] = []
    RUN.on_section = lambda: write(checks, timings)  # a run cut short leaves what it measured
    time_all(device, quick, ceil, timings)
    RUN.on_section = None
    text = write(checks, timings)
    failed = [c for c in checks if not c.ok]
    skipped = [c for c in checks if c.skipped]
    print("\n".join(log))
    print(text)
    print(f"\n{len(checks) - len(failed) - len(skipped)}/{len(checks) - len(skipped)} checks passed"
          + (f" ({len(skipped)} skipped: time budget)" if skipped else "")
          + f", {len(timings)} timings, {time.time() - t0:.0f} s; written to {out_dir}/table.md and results.json")
    return 1 if failed or (not built and not args.no_build) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
