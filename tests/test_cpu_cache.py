"""The CPU block cache (csrc/torch/cpu_block_cache.cpp, flamingo_rt.runtime.cpu_cache): large
tensors allocated in a scope come from a free list of blocks that stay mapped, nothing changes
outside scopes, and the frozen NFNet's forward runs in one."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt.runtime import cpu_cache

pytestmark = pytest.mark.skipif(not cpu_cache.available(), reason="flamingo_rt._C not built")

MIB = 1 << 20


def _delta(before: cpu_cache.CacheStats) -> dict:
    now = cpu_cache.stats()
    return {k: getattr(now, k) - getattr(before, k) for k in ("hits", "misses", "releases")}


@pytest.fixture
def fresh_cache():
    """An empty free list with the default limit, restored after the test."""
    cpu_cache.empty()
    limit = cpu_cache.stats().limit_bytes
    yield
    cpu_cache.set_limit(limit)
    cpu_cache.empty()


def test_installed_and_forwarding_outside_scopes(fresh_cache):
    st = cpu_cache.stats()
    assert st.installed and st.limit_bytes > 0
    before = cpu_cache.stats()
    t = torch.empty(3 * MIB // 4, dtype=torch.float32)  # 3 MiB, no scope: malloc as before
    del t
    assert _delta(before) == {"hits": 0, "misses": 0, "releases": 0}
    assert cpu_cache.stats().cached_bytes == 0


def test_scope_reuses_blocks(fresh_cache):
    n = MIB // 4  # 1 MiB of float32
    before = cpu_cache.stats()
    with cpu_cache.scope():
        a = torch.full((n,), 3.0)
        pa = a.data_ptr()
        assert cpu_cache.stats().in_use_bytes >= 4 * n
        del a
        b = torch.empty(n)  # the same block again
        assert b.data_ptr() == pa
        b.fill_(1.5)
        c = torch.ones(n)  # a second block while b lives
        assert c.data_ptr() != pa
    assert _delta(before) == {"hits": 1, "misses": 2, "releases": 0}
    assert float(b.sum()) == 1.5 * n and float(c.sum()) == n
    del b, c
    st = cpu_cache.stats()
    assert st.cached_bytes >= 8 * n and st.in_use_bytes == before.in_use_bytes


def test_small_tensors_bypass_the_cache(fresh_cache):
    before = cpu_cache.stats()
    with cpu_cache.scope():
        t = torch.empty(16 * 1024)  # 64 KiB: below the cache's 128 KiB
        del t
    assert _delta(before) == {"hits": 0, "misses": 0, "releases": 0}


def test_best_fit_takes_at_most_twice_the_request(fresh_cache):
    with cpu_cache.scope():
        big = torch.empty(2 * MIB // 4)
        p = big.data_ptr()
        del big
        half = torch.empty(MIB // 4)  # 1 MiB from the 2 MiB block
        assert half.data_ptr() == p
        del half
        quarter = torch.empty(MIB // 16)  # 256 KiB: the 2 MiB block is too large for it
        assert quarter.data_ptr() != p


def _footprint() -> int:
    st = cpu_cache.stats()
    return st.in_use_bytes + st.cached_bytes


def test_live_bytes_and_their_peak(fresh_cache):
    live0 = cpu_cache.stats().live_bytes
    with cpu_cache.scope():
        a = torch.empty(MIB // 4 + 10)  # bytes asked, not the page-rounded block
        b = torch.empty(MIB // 2)
    st = cpu_cache.stats()
    assert st.live_bytes - live0 == MIB + 40 + 2 * MIB
    del a
    st2 = cpu_cache.stats()
    assert st2.live_bytes - live0 == 2 * MIB and st2.live_peak_bytes == st.live_peak_bytes >= st.live_bytes
    cpu_cache.empty()  # the peak restarts from what is live
    assert cpu_cache.stats().live_peak_bytes == cpu_cache.stats().live_bytes
    del b


def test_bounded_scope_keeps_the_footprint_within_the_live_peak(fresh_cache):
    """A new block in a bounded scope releases cached blocks first (largest first) so that the
    blocks in use plus the free list stay within the peak of live bytes; a plain scope keeps
    them all."""
    for bounded in (False, True):
        cpu_cache.empty()
        base = cpu_cache.stats()
        with cpu_cache.scope(bounded=bounded):
            a, b = torch.empty(MIB), torch.empty(MIB)  # 4 MiB each
            del a, b  # 8 MiB cached; the live peak is 8 MiB above the base
            rel = cpu_cache.stats().releases
            c = torch.empty(3 * MIB // 2)  # 6 MiB: no cached block fits, a new one
            st = cpu_cache.stats()
            if bounded:
                # room for the 6 MiB block within the 8 MiB peak: both 4 MiB blocks released
                assert st.releases - rel == 2 and st.cached_bytes == base.cached_bytes == 0
                assert _footprint() - (base.in_use_bytes + base.cached_bytes) <= 8 * MIB
            else:
                assert st.releases == rel and st.cached_bytes == 8 * MIB
            c.fill_(1.0)
            del c


def test_bounded_scope_reuses_a_repeating_loop_within_its_peak(fresh_cache):
    """A loop allocating the same tensors each pass (a training step): after the first pass
    every allocation is a hit, and the footprint never passes the live peak."""
    sizes = [5 * MIB // 4, 3 * MIB // 4, 5 * MIB // 4, 3 * MIB // 4]
    base = _footprint()
    worst, before = 0, None
    for it in range(4):
        if it == 1:
            before = cpu_cache.stats()
        with cpu_cache.scope(bounded=True):
            held = []
            for k, n in enumerate(sizes):
                held.append(torch.empty(n).fill_(k))
                if k % 2:
                    held.pop(0)  # some die while others are made, as activations do
                worst = max(worst, _footprint() - base)
            del held
    st = cpu_cache.stats()
    assert st.misses == before.misses and st.hits - before.hits == 3 * len(sizes)
    assert worst <= st.live_peak_bytes


def test_bounded_best_fit_takes_at_most_an_eighth_more(fresh_cache):
    with cpu_cache.scope(bounded=True):
        big = torch.empty(2 * MIB // 4)  # a 2 MiB block
        p = big.data_ptr()
        pad = torch.empty(MIB)  # a live peak of 6 MiB: room for the blocks below
        del big, pad
        half = torch.empty(MIB // 4)  # 1 MiB: the 2 MiB block is too large in a bounded scope
        assert half.data_ptr() != p
        del half
        near = torch.empty(15 * MIB // 32)  # 1.875 MiB: within an eighth
        assert near.data_ptr() == p


def test_innermost_scope_decides(fresh_cache):
    with cpu_cache.scope(bounded=True):
        big = torch.empty(2 * MIB // 4)
        p = big.data_ptr()
        del big
        with cpu_cache.scope():  # plain inside bounded: a block up to twice the request serves
            half = torch.empty(MIB // 4)
            assert half.data_ptr() == p and cpu_cache.depth() == 2


def test_blocks_aligned_and_staggered(fresh_cache):
    with cpu_cache.scope():
        ts = [torch.empty(MIB // 4 + 1024 * k) for k in range(8)]  # distinct sizes: 8 new blocks
    ptrs = [t.data_ptr() for t in ts]
    assert all(p % 64 == 0 for p in ptrs)
    assert len({p % 4096 for p in ptrs}) > 1  # not all at the same offset within a page


def test_freed_on_another_thread_and_outside_the_scope(fresh_cache):
    in_use = cpu_cache.stats().in_use_bytes  # blocks of tensors other tests left alive
    with cpu_cache.scope():
        t = torch.randn(MIB // 4)
    assert cpu_cache.stats().in_use_bytes >= in_use + MIB
    box = [t]
    del t
    th = threading.Thread(target=box.clear)
    th.start()
    th.join()
    st = cpu_cache.stats()
    assert st.cached_bytes >= MIB and st.in_use_bytes == in_use


def test_scopes_are_per_thread():
    seen = []

    def other():
        seen.append(cpu_cache.depth())

    with cpu_cache.scope():
        assert cpu_cache.depth() == 1
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert seen == [0] and cpu_cache.depth() == 0


def test_limit_and_empty(fresh_cache):
    cpu_cache.set_limit(0)
    before = cpu_cache.stats()
    with cpu_cache.scope():
        t = torch.empty(MIB // 4)
    del t  # nothing may be kept: released
    assert _delta(before)["releases"] == 1 and cpu_cache.stats().cached_bytes == 0
    cpu_cache.set_limit(64 * MIB)
    with cpu_cache.scope():
        ts = [torch.empty(MIB // 4 * (k + 1)) for k in range(3)]
    del ts
    assert cpu_cache.stats().cached_bytes >= 6 * MIB
    cpu_cache.set_limit(3 * MIB)  # lowering the limit releases the largest blocks first
    assert 0 < cpu_cache.stats().cached_bytes <= 3 * MIB
    cpu_cache.empty()
    assert cpu_cache.stats().cached_bytes == 0


def test_nesting_and_errors(monkeypatch):
    with cpu_cache.scope():
        with cpu_cache.scope():
            assert cpu_cache.depth() == 2
        assert cpu_cache.depth() == 1
    assert cpu_cache.depth() == 0
    with pytest.raises(RuntimeError, match="expected an open scope on this thread"):
        torch.ops.flamingo_rt_C.cpu_block_cache_exit()
    with pytest.raises(ValueError, match="expected a limit in bytes >= 0, got -1"):
        cpu_cache.set_limit(-1)
    with pytest.raises(RuntimeError, match="expected a limit of bytes >= 0"):
        torch.ops.flamingo_rt_C.cpu_block_cache_set_limit(-5)
    monkeypatch.setenv("FLAMINGO_RT_CPU_CACHE", "maybe")
    with pytest.raises(ValueError, match="FLAMINGO_RT_CPU_CACHE: expected 0 or 1, got 'maybe'"):
        cpu_cache.scope()
    monkeypatch.setenv("FLAMINGO_RT_CPU_CACHE", "0")
    with cpu_cache.scope():
        assert cpu_cache.depth() == 0  # turned off: a plain nullcontext


def test_scope_closed_after_an_exception():
    with pytest.raises(KeyError):
        with cpu_cache.scope():
            raise KeyError("x")
    assert cpu_cache.depth() == 0


def test_onednn_convolution_in_and_out_of_scope(fresh_cache):
    """oneDNN allocates its scratchpads through the CPU allocator's raw_allocate /
    raw_deallocate, which must work for blocks of either origin."""
    x = torch.randn(2, 64, 40, 40).contiguous(memory_format=torch.channels_last)
    w = torch.randn(96, 64, 3, 3)
    ref = F.conv2d(x, w, padding=1)
    with cpu_cache.scope():
        y = F.conv2d(x, w, padding=1)
        y2 = torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    y3 = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y3, ref, rtol=0, atol=0)


def test_frozen_nfnet_forward_runs_in_a_scope(monkeypatch, fresh_cache):
    from conftest import small_nfnet

    net = small_nfnet(32, seed=0).freeze()
    x = torch.randn(2, 3, 64, 64)
    monkeypatch.setenv("FLAMINGO_RT_CPU_CACHE", "0")
    with torch.no_grad():
        ref = net.forward_features(x)
    before = cpu_cache.stats()
    assert _delta(before) == {"hits": 0, "misses": 0, "releases": 0}
    monkeypatch.setenv("FLAMINGO_RT_CPU_CACHE", "1")
    with torch.no_grad():
        net.forward_features(x)
        mid = cpu_cache.stats()
        out = net.forward_features(x)
    assert mid.misses > before.misses  # the first pass maps its blocks ...
    d = _delta(mid)
    assert d["misses"] == 0 and d["hits"] > 0  # ... the second takes them all from the list
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_limit_from_environment():
    code = ("import torch, flamingo_rt._ext as e; e.load(); from flamingo_rt.runtime import cpu_cache as c; "
            "print(c.stats().limit_bytes)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FLAMINGO_RT_CPU_CACHE_MIB="3", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 3 * MIB
    env["FLAMINGO_RT_CPU_CACHE_MIB"] = "lots"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "FLAMINGO_RT_CPU_CACHE_MIB: expected a number of MiB >= 0, got 'lots'" in out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_can_use_the_cache(fresh_cache):
    """The lock is held across fork (pthread_atfork), so a child (a DataLoader worker) frees
    and allocates cached blocks like its parent."""
    with cpu_cache.scope():
        t = torch.ones(MIB // 4)
    pid = os.fork()
    if pid == 0:  # child: free the inherited tensor, take its block again
        code = 1
        try:
            torch.set_num_threads(1)  # GNU OpenMP's pool does not survive fork (DataLoader does the same)
            del t
            with cpu_cache.scope():
                u = torch.full((MIB // 4,), 2.0)
            code = 0 if float(u.sum()) == 2.0 * (MIB // 4) and cpu_cache.stats().hits >= 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert float(t.sum()) == MIB // 4


def test_attention_ops_make_their_outputs_in_a_bounded_scope(fresh_cache, monkeypatch):
    """The C++ attention ops' CPU outputs come from the cache (csrc/torch/xattn_ops.cpp's
    fresh_outputs): a second call reuses the first call's freed blocks, no scope stays open,
    the values are the same; FLAMINGO_RT_CPU_CACHE=0 turns it off."""
    from flamingo_rt import _ext
    from flamingo_rt.ops import resampler_attention_kvpacked

    _ext.load()
    g = torch.Generator().manual_seed(0)
    n, S, L, H, dh = 4, 40, 8, 4, 32  # d[K | V] of the features: 160 KiB
    q = torch.randn(n, L, H, dh, generator=g, requires_grad=True)
    kv_x = torch.randn(n, S, 2, H, dh, generator=g, requires_grad=True)
    kv_l = torch.randn(n, L, 2, H, dh, generator=g, requires_grad=True)
    go = torch.randn(n, L, H, dh, generator=g)

    def grads():
        out = resampler_attention_kvpacked(q, kv_x, kv_l, backend="cpu")
        return torch.autograd.grad(out, (q, kv_x, kv_l), go)

    first = grads()
    del first
    before = cpu_cache.stats()
    second = grads()
    d = _delta(before)
    assert d["hits"] >= 1 and d["misses"] == 0 and cpu_cache.depth() == 0
    monkeypatch.setenv("FLAMINGO_RT_CPU_CACHE", "0")
    before = cpu_cache.stats()
    third = grads()
    assert _delta(before) == {"hits": 0, "misses": 0, "releases": 0}
    for a, b in zip(second, third):
        assert torch.equal(a, b)


def test_inference_scope_opens_only_for_cpu_inference_of_enough_rows():
    """cpu_cache.inference_scope: a scope for a CPU forward without gradients whose input has at
    least ``min_rows`` rows (the product of its leading sizes); none with gradients enabled,
    off the CPU, or for fewer rows."""
    def depth_in(x, **kw):
        with cpu_cache.inference_scope(x, **kw):
            return cpu_cache.depth()

    x = torch.zeros(4, 16, 8)  # 64 rows
    base = cpu_cache.depth()
    with torch.no_grad():
        assert depth_in(x) == base + 1
        assert depth_in(x, min_rows=64) == base + 1
        assert depth_in(x, min_rows=65) == base
        assert depth_in(x[:, :1], min_rows=8) == base
        assert depth_in(torch.zeros(4, 16, 8, device="meta")) == base
    assert depth_in(x) == base
    assert cpu_cache.depth() == base


def _scope_depths(monkeypatch, cls) -> list:
    """The cache scope depth at each call of ``cls._forward`` from now on (spied)."""
    depths = []
    real = cls._forward

    def spy(self, *args):
        depths.append(cpu_cache.depth())
        return real(self, *args)
    monkeypatch.setattr(cls, "_forward", spy)
    return depths


def test_resampler_forward_runs_in_a_bounded_scope(fresh_cache, monkeypatch):
    """The Perceiver Resampler's CPU inference forward takes its large tensors (each layer's
    features [K | V], the FF's pre-activation and chunks) from the cache in a bounded scope:
    later calls reuse earlier calls' blocks within the live peak. A forward for training
    (grad enabled) opens none."""
    from flamingo_rt.models import resampler as resampler_mod
    from flamingo_rt.models.config import ResamplerConfig

    torch.manual_seed(0)
    m = resampler_mod.PerceiverResampler(ResamplerConfig(dim=64, depth=2, heads=2, dim_head=32, num_latents=16))
    x = torch.randn(1, 8, 1, 512, 64)  # features [K | V]: 8 x 512 x 128 floats (2 MiB)
    with torch.no_grad():
        for _ in range(2):
            m(x)
        before = cpu_cache.stats()
        m(x)
        d = _delta(before)
    assert d["hits"] >= 2 and d["hits"] > d["misses"], d
    st = cpu_cache.stats()
    assert st.cached_bytes + st.in_use_bytes <= st.live_peak_bytes
    depths = _scope_depths(monkeypatch, resampler_mod.PerceiverResampler)
    with torch.no_grad():
        m(x)
    m(x.requires_grad_()).sum().backward()
    assert depths == [1, 0]


def test_xattn_block_forward_runs_in_a_bounded_scope(fresh_cache, monkeypatch):
    """GatedCrossAttentionBlock's CPU inference forward with at least CACHE_MIN_ROWS rows takes
    its large tensors (the FF's pre-activation and chunks) from the cache in a bounded scope;
    a decode-sized call (fewer rows) and a forward for training (grad enabled) open none.

    Its 8 large tensors per call: 2 of 128 KiB live at once early on, 2 of 256 KiB and 1 MiB
    later, so reusing every block would need 1792 KiB of blocks against the forward's live
    peak of 1664: the bounded scope releases and maps 2 blocks per call (6 of 8 served from
    the cache). No packed weights (FLAMINGO_RT_MKL_PACK=0): packed on the first call inside
    the scope, they would stay live in the cache and lift the peak (0 misses; Intel's default)."""
    from flamingo_rt.models import xattn as xattn_mod

    monkeypatch.setenv("FLAMINGO_RT_MKL_PACK", "0")
    torch.manual_seed(0)
    blk = xattn_mod.GatedCrossAttentionBlock(dim=64, dim_visual=32, heads=2, dim_head=16)
    media = torch.randn(1, 2, 4, 32)
    loc = torch.zeros(1, 1024, dtype=torch.bool)
    loc[0, 0] = loc[0, 500] = True
    x = torch.randn(1, 1024, 64)  # FF pre-activation 1024 x 256 floats (1 MiB)
    with torch.no_grad():
        for _ in range(2):
            blk(x, media, loc)
        before = cpu_cache.stats()
        blk(x, media, loc)
        d = _delta(before)
    assert d["hits"] >= 6 and d["misses"] <= 2, d
    st = cpu_cache.stats()
    assert st.cached_bytes + st.in_use_bytes <= st.live_peak_bytes
    depths = _scope_depths(monkeypatch, xattn_mod.GatedCrossAttentionBlock)
    with torch.no_grad():
        blk(x, media, loc)
        rows = xattn_mod.CACHE_MIN_ROWS - 1
        blk(x[:, :rows], media, loc[:, :rows])
    blk(x.requires_grad_(), media, loc).sum().backward()
    assert depths == [1, 0, 0]
