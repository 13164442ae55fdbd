"""Compile the resampler Triton kernels for a GPU target without a GPU.

    python -m flamingo_rt.kernels.resampler_aot_check [--arch 90] [--dtypes bf16,fp32] [--head-dims 64,96]

The CPU interpreter (the test suite) checks what the kernels compute; it does not lower
them. This runs Triton's whole compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for
``sm_<arch>`` on the autotuning configurations' shapes, so lowering errors (dot shapes,
layouts, types) and the shared memory each configuration needs are known before GPU
time is spent. fp32 builds are slow (IEEE products): minutes each on a small CPU.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

from . import resampler as K

_POINTERS = {"Q", "KX", "VX", "KL", "VL", "O", "DO", "DQ", "DKX", "DVX", "DKL", "DVL"}
_FLOATS = {"qk_scale", "sm_scale"}


def compile_kernel(fn, dtype: str, head_dim: int, block_l: int, block_s: int, num_warps: int,
                   num_stages: int, arch: int):
    """The compiled kernel (``.metadata.shared``: bytes of shared memory)."""
    names = list(inspect.signature(fn.fn).parameters)
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_S=block_s,
                  DOT_PREC="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    sig = {n: ("constexpr" if n in consts else "*" + dtype if n in _POINTERS else
               "fp32" if n in _FLOATS else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton_compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--head-dims", default="64,96")
    ap.add_argument("--latents", type=int, default=64)
    ap.add_argument("--all-configs", action="store_true", help="every autotuning config (default: one each)")
    args = ap.parse_args(argv)
    block_l = max(16, 1 << (args.latents - 1).bit_length())
    failed = 0
    for dtype in args.dtypes.split(","):
        for hd in (int(h) for h in args.head_dims.split(",")):
            todo = ([(K._resampler_fwd, c) for c in K._FWD_CONFIGS] + [(K._resampler_bwd, c) for c in K._BWD_CONFIGS]
                    if args.all_configs else [(K._resampler_fwd, K._FWD_CONFIGS[2]), (K._resampler_bwd, K._BWD_CONFIGS[2])])
            for fn, cfg in todo:
                bs, w, st = cfg.kwargs["BLOCK_S"], cfg.num_warps, cfg.num_stages
                t = time.time()
                tag = f"{fn.fn.__name__} {dtype} dh={hd} L-block={block_l} S-block={bs} warps={w} stages={st}"
                try:
                    k = compile_kernel(fn, dtype, hd, block_l, bs, w, st, args.arch)
                    fits = "" if k.metadata.shared <= 227 * 1024 else " (over the 227 KiB an H100/H200 block may use: autotuning skips it)"
                    print(f"{tag}: ok, shared {k.metadata.shared} B{fits} ({time.time() - t:.0f} s)", flush=True)
                except Exception as e:  # report every failure, then exit 1
                    failed += 1
                    print(f"{tag}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
