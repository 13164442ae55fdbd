"""The `cuda` backend of resampler_attention as far as a machine without a GPU can check
it: the op ``flamingo_rt_C::resampler_attention`` is defined (schema + fake kernel, so
compile/export trace it), the backend is registered when the extension has CUDA, and
`auto` prefers triton, then cuda, on CUDA tensors. The kernel itself runs in
bench/gpu_check.py."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flamingo_rt import _ext
from flamingo_rt.ops import backend as be
from flamingo_rt.ops import resampler as rs

pytestmark = pytest.mark.skipif(not _ext.load(), reason="flamingo_rt._C not built")


def test_schema_and_fake_kernel():
    op = torch.ops.flamingo_rt_C.resampler_attention
    with FakeTensorMode():
        q = torch.empty(3, 64, 2, 96, dtype=torch.bfloat16)
        kx = torch.empty(3, 257, 2, 96, dtype=torch.bfloat16)
        out = op(q, kx, kx, q, q, 96 ** -0.5)
    assert out.shape == (3, 64, 2, 96) and out.dtype == torch.bfloat16


def test_the_op_runs_on_cpu_too_and_bad_shapes_are_clear_errors():
    # one schema, two kernels: the CPU one (csrc/torch/xattn_ops.cpp) beside the CUDA one
    q = torch.randn(1, 4, 1, 8)
    out = torch.ops.flamingo_rt_C.resampler_attention(q, q, q, q, q, 0.5)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="resampler_attention: expected k_x and k_l"):
        torch.ops.flamingo_rt_C.resampler_attention(q, q[:, :, :, :4], q, q, q, 0.5)


def test_registration_follows_the_build():
    assert rs.CUDA_AVAILABLE == _ext.with_cuda()
    assert ("cuda" in be.implemented("resampler_attention")) == _ext.with_cuda()
    if _ext.with_cuda():
        assert "cuda" in be.implemented("resampler_attention.backward")
    order = [b for b in be.AUTO_ORDER["cuda"] if b in be.implemented("resampler_attention")]
    assert order[0] == ("triton" if "triton" in order else "cuda" if "cuda" in order else "reference")
