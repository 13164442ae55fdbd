"""flamingo_rt.ops.cast_blocks: products with a weight cast a block at a time into a reused
buffer give the whole cast's products (each output element is one dot product over the whole
reduction: equal up to the order the product's kernel sums in, which can depend on its
number of columns), for ragged blocks, strided weights and both products; bad arguments say
what was expected."""
import pytest
import torch

from flamingo_rt.ops import cast_blocks


def _inputs(n, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K, generator=g).to(dtype)
    gy = torch.randn(n, N, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) * 0.1
    b = torch.randn(N, generator=g)
    return x, gy, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block_bytes", [None, 5 * 48 * 2, 3])
def test_blocks_give_the_whole_casts_products(dtype, block_bytes, monkeypatch):
    if block_bytes is not None:  # 5-row / ragged blocks; 3 bytes: one row or column a block
        monkeypatch.setattr(cast_blocks, "BLOCK_BYTES", block_bytes)
    x, gy, w, b = _inputs(13, 37, 48, dtype)
    wc = w.to(dtype)
    # float64: the kernels' summation orders; bf16: float32 sums rounded once (one bf16 ulp)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2 ** -7, atol=1e-3)

    def same(a, b):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, **tol)

    same(cast_blocks.linear(x, w, dtype), torch.nn.functional.linear(x, wc))
    same(cast_blocks.linear(x, w, dtype, b), torch.nn.functional.linear(x, wc, b.to(dtype)))
    same(cast_blocks.mm(gy, w, dtype), gy @ wc)
    # a transposed (strided) weight: the products of its contiguous cast
    wt = torch.randn(48, 37, generator=torch.Generator().manual_seed(1)).t()
    same(cast_blocks.mm(gy, wt, dtype), gy @ wt.to(dtype).contiguous())
    same(cast_blocks.linear(x, wt, dtype), torch.nn.functional.linear(x, wt.to(dtype).contiguous()))
    # and against float64 products of the cast weight, as close as the whole cast's products
    exact = x.double() @ wc.double().t()
    err = (cast_blocks.linear(x, w, dtype).double() - exact).abs().max()
    assert err <= (torch.nn.functional.linear(x, wc).double() - exact).abs().max() * 2 + 1e-12
    got = list(cast_blocks.row_blocks(w, dtype))
    assert got[0][0] == 0 and got[-1][1] == 37 and all(a[1] == c[0] for a, c in zip(got, got[1:]))


def test_empty_and_single_rows():
    x, gy, w, _ = _inputs(0, 37, 48, torch.bfloat16)
    assert cast_blocks.linear(x, w, torch.bfloat16).shape == (0, 37)
    assert cast_blocks.mm(gy, w, torch.bfloat16).shape == (0, 48)
    x, gy, w, _ = _inputs(1, 1, 48, torch.bfloat16)
    assert torch.equal(cast_blocks.linear(x, w, torch.bfloat16), x @ w.bfloat16().t())


def test_errors_say_what_was_expected():
    x, gy, w, _ = _inputs(4, 37, 48, torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected x \(n, K\) and weight \(N, K\), got \(4, 37\)"):
        cast_blocks.linear(gy, w, torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected g \(n, N\) and weight \(N, K\), got \(4, 48\)"):
        cast_blocks.mm(x, w, torch.bfloat16)
    with pytest.raises(TypeError, match="expected the activations in torch.bfloat16, got torch.float32"):
        cast_blocks.linear(x.float(), w, torch.bfloat16)
