"""Shared test fixtures: seeds, peers (open_flamingo modules), tolerances."""
from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path

import pytest
import torch

# The Triton kernels run on the CPU only in Triton's interpreter, which must be chosen before
# triton's first import (by any test module): without a CUDA device the suite turns it on
# itself, as ./dev test does, so that a plain `pytest tests` runs the same tests
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/cpp/run_host_test.py is ctest's script (its name matches pytest's *_test.py): not a
# pytest module, and importing it would run its module-level set-up
collect_ignore = ["cpp/run_host_test.py"]


@pytest.fixture(autouse=True)
def _seed(request):
    """Deterministic per-test seed (override all with FLAMINGO_RT_TEST_SEED)."""
    base = int(os.environ.get("FLAMINGO_RT_TEST_SEED", "0"))
    torch.manual_seed(base + zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: the tiny models' ops are too small for threads, and
    on a shared 2-core machine extra threads only wait. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists every one of these CPU flags (False where it is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            listed = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return False
    return all(flag in listed for flag in flags)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere gives inf."""
    a64, b64 = a.detach().double(), b.detach().double()
    if torch.isnan(a64).any() or torch.isnan(b64).any():
        return float("inf")
    denom = b64.norm().item()
    num = (a64 - b64).norm().item()
    return num / denom if denom > 0 else num


def use_bf16_products(kind, monkeypatch) -> bool:
    """Makes bf16 products with float32 results (:mod:`flamingo_rt.ops.widening_gemm`) one
    way for a test: ``"widening"``, MKL's float32-accumulating product (Intel CPUs' default;
    forced on here wherever torch carries its symbol, so both ways are tested on every x86
    CPU; skips where it does not), or ``"rounded"``, torch's bf16 product rounded to bf16
    once (``FLAMINGO_RT_WIDENING_GEMM=0``; other CPUs' default, autocast's own precision; with
    ``FLAMINGO_RT_WIDEN_HALF=0``, so torch's product even on a CPU without bf16 kernels, where
    flamingo_rt's would be widened and not rounded). None leaves the default. Returns whether
    the products are exact (not rounded)."""
    from flamingo_rt.ops import widening_gemm

    if kind == "widening":
        if not widening_gemm.mkl_symbol():
            pytest.skip("MKL's float32-accumulating bf16 product is not in this torch / build")
        monkeypatch.setattr(widening_gemm, "_mkl_present", lambda: True)
        monkeypatch.setenv("FLAMINGO_RT_WIDENING_GEMM", "1")
    elif kind == "rounded":
        monkeypatch.setenv("FLAMINGO_RT_WIDENING_GEMM", "0")
        monkeypatch.setenv("FLAMINGO_RT_WIDEN_HALF", "0")
    elif kind is not None:
        raise ValueError(f"expected 'widening', 'rounded' or None, got {kind!r}")
    return widening_gemm.available()


def _load_of_helpers():
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "src" / "helpers.py"
    mspec = importlib.util.spec_from_file_location("_open_flamingo_helpers", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def of_helpers():
    """open_flamingo's src/helpers.py (PerceiverResampler, GatedCrossAttentionBlock),
    imported from its file so the package __init__ (which needs open_clip) is skipped.
    In CI the peer is installed; a missing peer fails unless FLAMINGO_RT_ALLOW_SKIP=1."""
    mod = _load_of_helpers()
    if mod is None:
        if os.environ.get("FLAMINGO_RT_ALLOW_SKIP") == "1":
            pytest.skip("open_flamingo not installed")
        raise RuntimeError("open_flamingo (test-only peer) is not installed; run ./dev setup")
    return mod


def pytest_sessionstart(session):
    """In CI (CI=true) the peers and the C++ extension must be present, so the parity and
    kernel tests run instead of skipping."""
    if os.environ.get("CI", "").lower() != "true":
        return
    missing = []
    for mod in ("timm", "transformers", "open_flamingo"):
        if importlib.util.find_spec(mod) is None:
            missing.append(mod)
    try:
        import flamingo_rt._C  # noqa: F401
    except ImportError:
        missing.append("flamingo_rt._C (the C++ extension)")
    if missing:
        raise pytest.UsageError(f"CI needs {', '.join(missing)} installed; parity/kernel tests would be skipped")


@pytest.fixture
def malloc_calls(monkeypatch):
    """The CLI's malloc tuning (flamingo_rt.runtime.cpu_malloc.keep_freed_memory) is
    process-wide: recorded here instead of applied (tests/test_cpu_malloc.py applies it in a
    subprocess). The list of calls."""
    from flamingo_rt.runtime import cpu_malloc

    calls = []
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda *a, **k: calls.append(1) or True)
    return calls


def small_nfnet(width: int, seed: int, *, random_bias: bool = False):
    """A 4-stage NFNet of one block a stage whose 3x3 convs have `width`-channel groups
    (channels 2w, 2w, 4w, 4w; stem w), made after ``torch.manual_seed(seed)``: every skip-init
    gain 0.7 (so every residual branch computes), with ``random_bias`` the biases N(0, 0.1^2)."""
    from flamingo_rt.models.config import NFNetConfig
    from flamingo_rt.models.nfnet import NFNet

    cfg = NFNetConfig(depths=(1, 1, 1, 1), channels=(2 * width, 2 * width, 4 * width, 4 * width), stem_chs=width,
                      group_size=width, num_features=4 * width)
    torch.manual_seed(seed)
    net = NFNet(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("skipinit_gain"):
                p.fill_(0.7)
            elif random_bias and name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return net


def stride1_3x3_convs(net, least: int) -> list:
    """net's 3x3 stride-1 convs with at least `least` input and output channels per group."""
    return [m for m in net.modules() if getattr(m, "kernel_size", None) == 3 and m.stride == 1
            and m.in_chs // m.groups >= least and m.out_chs // m.groups >= least]


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records the shape of each call's first argument;
    the list of records."""
    calls = []
    orig = getattr(module, name)

    def counting(*a, **k):
        calls.append(tuple(a[0].shape))
        return orig(*a, **k)

    monkeypatch.setattr(module, name, counting)
    return calls


def every_other_row(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """t's values (N, C, H, W) in a view of every other row (H) of a tensor twice as tall,
    stored NCHW (W runs dense, H*W planes not) or channels-last (pixels C apart within a row,
    rows 2*W*C apart): a layout that passes every check of a dense layout but the row stride."""
    N, C, H, W = t.shape
    if channels_last:
        tall = torch.empty(N, 2 * H, W, C, dtype=t.dtype, device=t.device).permute(0, 3, 1, 2)
    else:
        tall = torch.empty(N, C, 2 * H, W, dtype=t.dtype, device=t.device)
    v = tall[:, :, ::2]
    v.copy_(t)
    return v
