"""The GPU kernels of image_causal_attention build here, without a GPU (DESIGN.md section 3):
the CUDA C++ file compiles with the machine's nvcc for sm_90 without register spills, the
no-CUDA stubs compile, the Triton kernels compile to sm_90 machine code (Triton's own
ptxas, no device needed), and the `cuda` backend is registered exactly when the extension
has CUDA. They run on a GPU only through bench/gpu_check.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OP = "image_causal_attention"


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError("nvcc is not on PATH; CI compiles the CUDA sources")
        pytest.skip("nvcc not found")
    return nvcc


def test_cuda_xattn_compiles_for_sm90_without_spills(tmp_path):
    cmd = [_nvcc(), "-std=c++17", "-O3", "-arch=sm_90", "-I", str(ROOT / "csrc" / "include"),
           "-Xptxas", "-v", "-c", str(ROOT / "csrc" / "cuda" / "xattn.cu"), "-o", str(tmp_path / "xattn.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", log)
    assert any("xattn_fwd_tile_kernel" in e for e in entries) and any("xattn_decode_kernel" in e for e in entries)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) == 0, "register spills in the CUDA xattn kernels"


def test_cuda_stubs_compile_without_cuda(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    proc = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "csrc" / "include"),
                           "-c", str(ROOT / "csrc" / "cpu" / "xattn_cuda_stubs.cpp"), "-o", str(tmp_path / "s.o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _compile_script(script: str) -> str:
    """Run a Triton AOT-compile script in a fresh interpreter without TRITON_INTERPRET (the
    suite sets it); its stdout. Skips where triton's ptxas is missing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import inspect, sys
        sys.path.insert(0, {str(ROOT)!r})
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from kernels import xattn as kx

        ptr = {{"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"}}
        for fn in (kx._xattn_fwd_kernel, kx._xattn_bwd_dq_kernel, kx._xattn_bwd_dkdv_kernel):
            consts = dict(ALL_PREV=fn is kx._xattn_bwd_dq_kernel, BLOCK_T=64, BLOCK_N=64, BLOCK_D=64,
                          PREC="tf32", PREC2="tf32", UPCAST=False)
            if fn is kx._xattn_bwd_dkdv_kernel:
                consts["SCAN_T"] = 1024
            sig = {{}}
            for n in inspect.signature(fn.fn).parameters:
                sig[n] = ("constexpr" if n in consts else "*bf16" if n in ptr else "*fp32" if n in ("LSE", "DELTA")
                          else "*i32" if n == "IDX" else "fp32" if n == "scale" else "i32")
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options={{"num_warps": 4, "num_stages": 2}})
            assert k.asm.get("cubin"), fn
            print("ok", fn.fn.__name__)
    """)
    assert _compile_script(script).count("ok ") == 3


def test_cuda_backend_registered_iff_the_extension_has_cuda():
    from flamingo_rt import _ext
    from flamingo_rt.ops import _cuda_xattn
    from flamingo_rt.ops import backend as be

    assert _cuda_xattn.AVAILABLE == _ext.with_cuda()
    assert ("cuda" in be.implemented(OP)) == _ext.with_cuda()
    assert ("cuda" in be.implemented(OP + ".backward")) == _ext.with_cuda()
    if torch.version.cuda is not None and shutil.which("nvcc") and os.environ.get("FLAMINGO_RT_CUDA") != "0":
        assert _ext.with_cuda(), "torch has CUDA and nvcc exists, so the extension should have the CUDA kernels"
    if _ext.with_cuda():
        # the decode op's fake kernel: shapes without a device
        q = torch.empty(2, 1, 3, 64, device="meta", dtype=torch.bfloat16)
        k = torch.empty(2, 4, 64, 3, 64, device="meta", dtype=torch.bfloat16)
        idx = torch.empty(2, 1, device="meta", dtype=torch.int32)
        out = torch.ops.flamingo_rt_C.image_causal_attention_decode(q, k, k, idx, False, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype


def test_auto_takes_the_cuda_decode_kernel_for_few_tokens_on_the_gpu(monkeypatch):
    """``auto`` on a CUDA device: Triton, except T <= CUDA_DECODE_MAX_T, which goes to the
    CUDA C++ decode kernel when it is built; explicit requests and other devices untouched."""
    from flamingo_rt.ops import backend as be
    from flamingo_rt.ops import xattn as X

    monkeypatch.delenv("FLAMINGO_RT_BACKEND", raising=False)
    impls = dict(be._IMPLS[X.OP])
    monkeypatch.setitem(be._IMPLS, X.OP, {**impls, "cuda": lambda *a: None})
    pick = X.shape_backend
    assert pick("triton", None, "cuda", 1) == "cuda"
    assert pick("triton", "auto", "cuda", X.CUDA_DECODE_MAX_T) == "cuda"
    assert pick("triton", None, "cuda", X.CUDA_DECODE_MAX_T + 1) == "triton"
    assert pick("triton", "triton", "cuda", 1) == "triton"  # asked for by name
    assert pick("cpu", None, "cpu", 1) == "cpu"
    monkeypatch.setenv("FLAMINGO_RT_BACKEND", "triton")
    assert pick("triton", None, "cuda", 1) == "triton"  # asked for through the environment
    monkeypatch.delenv("FLAMINGO_RT_BACKEND")
    monkeypatch.setitem(be._IMPLS, X.OP, {k: f for k, f in impls.items() if k != "cuda"})
    assert pick("triton", None, "cuda", 1) == "triton"  # no CUDA C++ build


def test_resampler_triton_kernels_compile_for_sm90():
    """The resampler's Triton kernels lower to sm_90 (kernels/resampler_aot_check.py), and
    their shape arguments are not specialized (one compilation per head dim and dtype, not
    one per feature-count class)."""
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from kernels import resampler as K
        from kernels.resampler_aot_check import compile_kernel

        for fn, which in ((K._resampler_fwd, "fwd"), (K._resampler_bwd, "bwd")):
            assert {{p.name for p in fn.params if p.do_not_specialize}} == {{"H", "L", "S", "S_BUCKET"}}, fn
            for dh in (64, 128):  # the untuned (heuristic) configuration at 257 features
                c = K._heuristic(which, 257, 64, dh)
                k = compile_kernel(fn, "bf16", dh, 64, c["BLOCK_S"], c["num_warps"], c["num_stages"], 90)
                assert k.asm.get("cubin") and k.metadata.shared <= 227 * 1024, (fn, dh)
            print("ok", fn.fn.__name__)
    """)
    assert _compile_script(script).count("ok ") == 2
