"""Shared test fixtures: seeds, peers (open_flamingo modules), tolerances."""
from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path

import pytest
import torch

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
    once (``FLAMINGO_RT_WIDENING_GEMM=0``; other CPUs' default, autocast's own precision).
    None leaves the default. Returns whether the products are exact (not rounded)."""
    from flamingo_rt.ops import widening_gemm

    if kind == "widening":
        if not widening_gemm.mkl_symbol():
            pytest.skip("MKL's float32-accumulating bf16 product is not in this torch / build")
        monkeypatch.setattr(widening_gemm, "_mkl_present", lambda: True)
        monkeypatch.setenv("FLAMINGO_RT_WIDENING_GEMM", "1")
    elif kind == "rounded":
        monkeypatch.setenv("FLAMINGO_RT_WIDENING_GEMM", "0")
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
