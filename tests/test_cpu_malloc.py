"""flamingo_rt.runtime.cpu_malloc: with glibc's malloc kept from mmapping (and trimming)
large blocks, a large tensor allocated again takes no page faults. Runs in a subprocess:
the tuning is process-wide."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from flamingo_rt.runtime import cpu_malloc

SCRIPT = r"""
import resource, torch
from flamingo_rt.runtime import cpu_malloc

def faults(n=4, mib=64):
    torch.empty(mib << 18).fill_(1.0)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(mib << 18).fill_(1.0)  # 64 MiB of float32, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

torch.set_num_threads(1)
d = faults()
assert cpu_malloc.keep_freed_memory()
k = faults()
assert cpu_malloc.restore_default_malloc()
r = faults()
print(d, k, r)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_takes_no_page_faults():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    default, kept, restored = map(int, out.stdout.split()[-3:])
    pages = 4 * (64 << 20) // 4096  # 4 x 64 MiB of 4 KiB pages
    assert default >= 0.9 * pages, (default, pages)  # every block mapped and faulted in anew
    assert kept < 0.05 * pages, (kept, pages)  # the same blocks reused
    assert restored >= 0.9 * pages, (restored, pages)


def test_bad_argument():
    with pytest.raises(ValueError, match="top_pad_mib >= 0"):  # checked before anything is applied
        cpu_malloc.keep_freed_memory(top_pad_mib=-1)
