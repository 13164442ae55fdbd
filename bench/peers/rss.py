"""Peak resident memory of a step, measured in a fresh process (CPU; no torch allocator stats).

Run the measured process with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=65536``,
:data:`ENV`): every tensor buffer is then mapped on allocation and unmapped on free, so the
resident set follows live memory. After warm-up, the kernel's RSS high-water mark is reset
(``/proc/self/clear_refs`` = 5) and the steps run: "peak" is the high-water RSS during them,
"step" the high-water minus the RSS just before (what a step adds to what stays resident:
saved activations, gradients, temporaries). tracemalloc does not see torch's allocations.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step: Callable[[], object], steps: int = 2,
            before_base: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """In this process (started with :data:`ENV`): ``step`` once (warm-up: lazily allocated
    state such as AdamW's), ``before_base`` (frees what the step keeps between steps but
    makes again: scratch buffers, allocator caches, so they count in the step, not in the
    base), then ``steps`` times under a reset high-water mark. Returns ``peak_mib``,
    ``base_mib``, ``step_mib`` and the mean ``step_s``."""
    step()
    if before_base is not None:
        before_base()
    gc.collect()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    peak = _status_kib("VmHWM")
    return dict(peak_mib=peak / 1024, base_mib=base / 1024, step_mib=(peak - base) / 1024, step_s=dt)


def release_ours_kept() -> None:
    """Frees what flamingo_rt keeps between steps and makes again (the per-thread scratch
    buffers, the CPU block cache's free list): a ``before_base`` for :func:`measure`, so the
    measured steps make them anew and they count in what a step adds, not in the base (kept
    in the base, they hid 84 MiB of the xattn block's fwd+bwd at B1 fp32)."""
    from flamingo_rt.ops import scratch
    from flamingo_rt.runtime import cpu_cache

    scratch.release()
    cpu_cache.empty()


def emit(result: dict) -> None:
    """Print ``result`` as the JSON line :func:`run` reads back."""
    print("JSON " + json.dumps(result), flush=True)


def run(script: Path, args: List[str], root: Path, timeout: float = 3600,
        malloc_env: Optional[Dict[str, str]] = ENV) -> dict:
    """Run ``script args`` in a fresh Python process with ``malloc_env`` (:data:`ENV` by
    default; None: the C library's defaults, for timings), from the folder ``root``; returns
    the dict its :func:`emit` printed last. flamingo_rt comes from its install (``./dev
    setup``'s editable one), not from ``root`` on the path: there the source folder kernels/
    (installed as flamingo_rt.kernels) would shadow the PyPI package ``kernels``, which
    transformers imports (the training bench's peer)."""
    env = dict(os.environ, **(malloc_env or {}))
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON ")][-1]
    return json.loads(line[5:])
