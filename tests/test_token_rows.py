"""Trained vocabulary rows as their own parameters (models.token_rows.TokenRows): the same
training as the whole tables with the other rows' gradients masked (OpenFlamingo's rule),
through the embedding, the chunked loss and the logits path; the frozen tables kept in step;
state dicts, merging and the errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import use_bf16_products

from flamingo_rt.models.config import LMConfig
from flamingo_rt.models.lm import DecoderLM
from flamingo_rt.models.token_rows import TokenRows
from flamingo_rt.ops.linear_cross_entropy import linear_cross_entropy
from flamingo_rt.runtime.train.freeze import RowGradMask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, D = 96, 32
IDS = [3, 40, 95]


def _lm(tied: bool, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    lm = DecoderLM(LMConfig(vocab_size=V, dim=D, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                            tie_embeddings=tied))
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.2)
    lm.requires_grad_(False)
    return lm


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 12), generator=g)
    ids[0, 2], ids[1, 5], ids[1, 9] = IDS[0], IDS[1], IDS[0]  # trained tokens as inputs ...
    tgt = torch.randint(0, V, (2, 12), generator=g)
    tgt[0, 4], tgt[1, 1] = IDS[2], IDS[1]  # ... and as targets
    tgt[0, 0] = -100
    return ids, tgt


def _loss(lm: DecoderLM, ids, tgt, path: str):
    if path == "chunked":  # as Flamingo.forward(return_logits=False)
        h = lm(ids, head=False)
        return linear_cross_entropy(h.reshape(-1, D), lm.lm_head.weight, tgt.reshape(-1), chunk_rows=7,
                                    **lm.head_row_kwargs())
    logits = lm(ids)
    return F.cross_entropy(logits.reshape(-1, V).float(), tgt.reshape(-1), reduction="sum")


def _masked_full(lm: DecoderLM):
    """OpenFlamingo's way: the whole tables train, the other rows' gradients zeroed."""
    tables = {"embed_tokens.weight": lm.embed_tokens.weight}
    if lm.lm_head.weight is not lm.embed_tokens.weight:
        tables["lm_head.weight"] = lm.lm_head.weight
    for t in tables.values():
        t.requires_grad_(True)
    return list(tables.values()), RowGradMask(lm, {n: IDS for n in tables})


@pytest.mark.parametrize("in_tables", [True, False])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("path", ["chunked", "logits"])
def test_adamw_steps_equal_masked_full_tables(tied, path, in_tables):
    """in_tables=False (FSDP2's way: the tables are never written, every use corrects for the
    trained rows) trains the same rows while the tables keep their first values."""
    ids, tgt = _batch()
    ref = _lm(tied)
    ref_params, mask = _masked_full(ref)
    ours = _lm(tied)
    rows = ours.train_token_rows(IDS, in_tables=in_tables)
    assert [p.shape for p in rows.parameters()] == [(3, D)] * (1 if tied else 2)
    opt_ref = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.0)
    opt = torch.optim.AdamW(list(rows.parameters()), lr=0.05, weight_decay=0.0)
    for step in range(3):
        ids, tgt = _batch(step + 1)
        for lm, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad(set_to_none=True)
            _loss(lm, ids, tgt, path).backward()
            if lm is ref:
                mask()
                full_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref_params]))
            else:
                row_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in rows.parameters()]))
            o.step()
        torch.testing.assert_close(row_norm, full_norm, rtol=1e-5, atol=0)  # the clipping norm
        # the frozen tables follow the trained rows (copied in at the next forward), or
        # (in_tables=False) keep their first values while the rows train
        ours.sync_token_rows()
        trained = {"embed_tokens.weight": rows.embed, "lm_head.weight": rows.head_rows}
        for name in ("embed_tokens.weight",) + (() if tied else ("lm_head.weight",)):
            a, b = dict(ours.named_parameters())[name], dict(ref.named_parameters())[name]
            other = torch.ones(V, dtype=torch.bool)
            other[IDS] = False
            assert torch.equal(a[other], b[other]), name
            got = a[IDS] if in_tables else trained[name].detach()
            torch.testing.assert_close(got, b[IDS], rtol=1e-5, atol=1e-6)
            assert not torch.equal(got, _lm(tied).state_dict()[name][IDS])  # they did train
            if not in_tables:
                assert torch.equal(a, _lm(tied).state_dict()[name]), name  # never written
    assert not any(p.requires_grad for n, p in ours.named_parameters() if not n.startswith("token_rows."))


def test_the_head_rows_gradient_in_the_chunked_loss_is_the_masked_full_gradient():
    torch.manual_seed(0)
    N = 40
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    t[3] = -100
    rows = torch.tensor(IDS)
    rw = w[rows].clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, t, chunk_rows=9, rows=rows, row_weight=rw)
    gh, grw = torch.autograd.grad(loss * 0.5, (h, rw))
    wf = w.clone().requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h2, wf), t, reduction="sum")
    rgh, rgw = torch.autograd.grad(ref * 0.5, (h2, wf))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh, rgh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grw, rgw[rows], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_not_in_the_weight_give_the_loss_of_a_weight_holding_them(dtype):
    """rows_in_weight=False: weight[rows] is stale (an FSDP2 shard's table); the loss, the
    hidden states' gradient and the rows' gradient are those of the weight with the rows
    written in (the k logit columns from row_weight, the hidden gradient corrected)."""
    torch.manual_seed(0)
    N = 40
    h0 = torch.randn(N, D, dtype=dtype)
    stale = torch.randn(V, D, dtype=dtype)
    t = torch.randint(0, V, (N,))
    t[5], t[6], t[7] = IDS[0], IDS[2], -100
    rows = torch.tensor(IDS)
    rw0 = torch.randn(len(IDS), D, dtype=dtype)
    synced = stale.clone()
    synced[rows] = rw0
    out = []
    for weight, in_weight in ((synced, True), (stale, False)):
        h, rw = h0.clone().requires_grad_(True), rw0.clone().requires_grad_(True)
        loss = linear_cross_entropy(h, weight, t, chunk_rows=9, rows=rows, row_weight=rw, rows_in_weight=in_weight)
        out.append((loss.detach(), *torch.autograd.grad(loss, (h, rw))))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, **tol)
    with pytest.raises(ValueError, match="must hold row_weight"):  # the default checks it
        linear_cross_entropy(h0, stale, t, rows=rows, row_weight=rw0)


def test_head_rows_under_bf16_autocast_with_a_bf16_frozen_head():
    """The frozen head stored in bf16 (freeze.frozen_linear_dtype) holds the rounded rows; the
    loss is that of the float32 head under autocast, and the rows' gradient close to the
    masked full gradient."""
    torch.manual_seed(0)
    N = 64
    h = torch.randn(N, D)
    w = torch.randn(V, D) * 0.3
    t = torch.randint(0, V, (N,))
    rows = torch.tensor(IDS)
    rw = w[rows].clone().requires_grad_(True)
    w16 = w.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w16, t, rows=rows, row_weight=rw)
        wf = w.clone().requires_grad_(True)
        ref = linear_cross_entropy(h, wf, t)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(rw.grad, wf.grad[rows], rtol=2e-2, atol=2e-2)
    assert rw.grad.dtype == torch.float32


@pytest.mark.parametrize("products", ["widening", "rounded"])
def test_a_bf16_stored_head_gives_the_float32_heads_autocast_loss_bit_for_bit(monkeypatch, products):
    """A frozen head stored in bf16 (its trained rows then in token_rows.head) and its float32
    original under autocast: the same loss, hidden-state gradient and rows' gradient, bit for
    bit, with either kind of bf16 product with float32 results (the hidden-state gradient is
    summed over the same blocks of vocabulary rows whatever the weight's dtype)."""
    from flamingo_rt.ops import cast_blocks

    use_bf16_products(products, monkeypatch)
    monkeypatch.setattr(cast_blocks, "BLOCK_BYTES", 40 * D * 2)  # several blocks of rows
    torch.manual_seed(0)
    h0, w, t = torch.randn(70, D), torch.randn(V, D) * 0.3, torch.randint(0, V, (70,))
    w = w.bfloat16().float()  # the float32 table as the rows' copy leaves it ...
    rows = torch.tensor(IDS)
    out = []
    for table in (w, w.bfloat16()):  # ... and its bf16 storage
        h = h0.clone().requires_grad_(True)
        rw = w[rows].clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, table, t, chunk_rows=32, rows=rows, row_weight=rw)
        loss.backward()
        out.append((loss.detach(), h.grad, rw.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_errors_name_what_was_expected():
    w = torch.randn(V, D)
    h = torch.randn(5, D)
    t = torch.randint(0, V, (5,))
    rows = torch.tensor(IDS)
    with pytest.raises(ValueError, match="together"):
        linear_cross_entropy(h, w, t, rows=rows)
    with pytest.raises(ValueError, match="must hold row_weight"):
        linear_cross_entropy(h, w, t, rows=rows, row_weight=w[rows] + 1)
    with pytest.raises(ValueError, match=r"row_weight of shape \(3, 32\)"):
        linear_cross_entropy(h, w, t, rows=rows, row_weight=w[:2])
    with pytest.raises(ValueError, match="distinct"):
        linear_cross_entropy(h, w, t, rows=torch.tensor([3, 3]), row_weight=w[[3, 3]])
    with pytest.raises(IndexError, match=r"\[0, 96\)"):
        linear_cross_entropy(h, w, t, rows=torch.tensor([96]), row_weight=w[:1])
    with pytest.raises(ValueError, match="out of range"):
        TokenRows([1, 96], w)
    with pytest.raises(ValueError, match="distinct"):
        TokenRows([1, 1], w)
    with pytest.raises(ValueError, match="at least one"):
        TokenRows([], w)
    lm = _lm(False)
    lm.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen embedding table"):
        lm.train_token_rows(IDS)


def test_state_dict_merging_and_loading_rows_of_other_tokens():
    lm = _lm(False)
    rows = lm.train_token_rows(IDS)
    with torch.no_grad():
        rows.embed.add_(1.0)
        rows.head.sub_(1.0)
    sd = lm.state_dict()
    assert {k for k in sd if k.startswith("token_rows.")} == {"token_rows.ids", "token_rows.embed",
                                                              "token_rows.head"}
    with lm.token_rows_merged():  # a plain LM's state, with the trained rows in the tables
        plain = lm.state_dict()
        assert set(plain) == set(DecoderLM(lm.cfg).state_dict())
        torch.testing.assert_close(plain["embed_tokens.weight"][IDS], rows.embed.detach())
        torch.testing.assert_close(plain["lm_head.weight"][IDS], rows.head.detach())
    assert lm.token_rows is rows
    other = _lm(False)
    other.train_token_rows([3, 41, 95])
    with pytest.raises(ValueError, match=r"token ids \[3, 41, 95\].*\[3, 40, 95\]"):
        other.load_state_dict(sd)
    same = _lm(False)
    same.train_token_rows(IDS)
    same.load_state_dict(sd)
    x = torch.tensor([[3, 5, 40]])
    with torch.no_grad():  # the loaded rows reach the tables at the next forward
        torch.testing.assert_close(same(x), lm(x))
    lm.merge_token_rows()
    assert lm.token_rows is None and not any(k.startswith("token_rows") for k in lm.state_dict())


def test_inference_reads_the_tables_kept_in_step():
    lm = _lm(True)
    rows = lm.train_token_rows(IDS)
    opt = torch.optim.SGD(rows.parameters(), lr=1.0)
    ids, tgt = _batch()
    _loss(lm, ids, tgt, "logits").backward()
    opt.step()
    with torch.no_grad():
        out = lm(ids)  # no gradient: the tables alone, synced from the parameters
    assert torch.equal(lm.embed_tokens.weight[IDS], rows.embed.detach())
    lm.merge_token_rows()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), out, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_inference_with_rows_kept_out_of_the_tables(tied):
    """in_tables=False: without gradients too (evaluation during an FSDP run), the forward
    and the cached decoding forward take the trained rows while the tables stay stale; the
    logits equal those of the model with the rows merged in."""
    lm = _lm(tied)
    rows = lm.train_token_rows(IDS, in_tables=False)
    with torch.no_grad():
        for p in rows.parameters():
            p.add_(torch.randn_like(p))  # trained rows that the tables do not hold
    before = lm.embed_tokens.weight.detach().clone()
    ids, _ = _batch()
    ids[:, -1] = IDS[1]  # the last (decoded) position is a trained token too
    with torch.no_grad():
        full = lm(ids)
        kv = [(torch.zeros(2, 2, 12, D // 4), torch.zeros(2, 2, 12, D // 4)) for _ in lm.layers]
        pos = torch.arange(12).expand(2, 12)
        causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
        cached = lm.forward_cached(ids, pos, kv, torch.arange(12), causal)
    assert torch.equal(lm.embed_tokens.weight, before)  # never written
    merged = _lm(tied)
    merged.load_state_dict({k: v for k, v in lm.state_dict().items() if not k.startswith("token_rows.")})
    with torch.no_grad():
        merged.embed_tokens.weight[IDS] = rows.embed.detach()
        if not tied:
            merged.lm_head.weight[IDS] = rows.head.detach()
        want = merged(ids)
    torch.testing.assert_close(full, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-5)
