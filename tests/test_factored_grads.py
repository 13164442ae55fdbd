"""Weight gradients held as factors (flamingo_rt.ops.factored_grads) and the training step
that clips and applies them a block of rows at a time (runtime/train/factored_step.py):
against the dense gradients and the optimizer's own step."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flamingo_rt.ops import factored_grads as fg
from flamingo_rt.ops.feed_forward import feed_forward
from flamingo_rt.runtime.train import factored_step
from conftest import rel_err, use_bf16_products

sys.path.insert(0, str(Path(__file__).parent / "train"))
from world_fixture import make_world, train_config_dict  # noqa: E402


def _factors(dtype, R=(9, 5), out=24, inn=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, out, generator=g).to(dtype), torch.randn(r, inn, generator=g).to(dtype),
             None if k == 0 else torch.tensor(0.7 - k)) for k, r in enumerate(R)]


def _dense(pairs):
    return sum((1.0 if s is None else float(s)) * a.double().t() @ b.double() for a, b, s in pairs)


#: the two ways bf16 products with float32 results are made (conftest.use_bf16_products)
BF16_PRODUCTS = ["widening", "rounded"]


def _tol(dtype, exact: float, exact_products: bool) -> float:
    """Relative tolerance of a gradient made from factors against float64: ``exact`` (float32
    summation order) for float32 factors, and for bf16 ones whose products are exact float32
    sums (MKL's widening product); torch's bf16 products are each rounded to bf16 once (at
    most 2^-9 relative per element): 4e-3."""
    return exact if dtype == torch.float32 or exact_products else 4e-3


@pytest.mark.parametrize("dtype, products", [(torch.float32, None)] + [(torch.bfloat16, k) for k in BF16_PRODUCTS])
def test_store_norm_rows_scale_and_densify(dtype, products, monkeypatch):
    """sq_norm from Gram matrices equals the dense gradient's squared norm; rows_into gives
    its rows; scale_ multiplies it; densify writes it into .grad (adding to one there)."""
    exact_products = use_bf16_products(products, monkeypatch)
    w = torch.nn.Parameter(torch.zeros(24, 16))
    store = fg.FactoredGrads([w])
    pairs = _factors(dtype)
    for a, b, s in pairs:
        store.add(w, a, b, s)
    want = _dense(pairs)
    assert store.params() == [w] and w in store and len(store) == 1
    assert store.nbytes() == sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in pairs)
    sq = 2 * _tol(dtype, 5e-6, exact_products)  # a squared norm: twice the relative error
    assert abs(store.sq_norm(w).item() - want.norm().item() ** 2) <= sq * want.norm().item() ** 2
    # one pair: the symmetric-blocks path (4 blocks of rows here), with its scale
    one = fg.FactoredGrads([w])
    a, b, _ = _factors(dtype, R=(37,), seed=5)[0]
    one.add(w, a, b, torch.tensor(-1.5))
    want1 = -1.5 * a.double().t() @ b.double()
    for rows in (8, 16, 1000):  # 4, 2 and 1 blocks
        monkeypatch.setattr(fg, "GRAM_BLOCK_ROWS", rows)
        assert abs(one.sq_norm(w).item() - want1.norm().item() ** 2) <= sq * want1.norm().item() ** 2, rows
    # more rows than the Gram matrices pay for: the norm from the gradient's row blocks
    monkeypatch.setattr(fg, "NORM_BLOCK_BYTES", 5 * 16 * 4)
    many = fg.FactoredGrads([w])
    a, b, _ = _factors(dtype, R=(30, 25), seed=6)[0]
    many.add(w, a, b, torch.tensor(0.5))
    many.add(w, a[:25].clone(), b[:25].clone())
    want2 = 0.5 * a.double().t() @ b.double() + a[:25].double().t() @ b[:25].double()
    called = []
    orig = fg.FactoredGrads._sq_norm_by_rows
    monkeypatch.setattr(fg.FactoredGrads, "_sq_norm_by_rows", lambda self, p: called.append(1) or orig(self, p))
    assert abs(many.sq_norm(w).item() - want2.norm().item() ** 2) <= sq * want2.norm().item() ** 2
    assert called == [1]
    out = torch.empty(7, 16)
    assert rel_err(store.rows_into(w, 10, 17, out), want[10:17]) < _tol(dtype, 1e-6, exact_products)
    store.scale_(torch.tensor(0.25))
    assert rel_err(store.dense(w), 0.25 * want) < _tol(dtype, 1e-6, exact_products)
    w.grad = torch.ones(24, 16)
    store.densify(w)
    assert w not in store and rel_err(w.grad, 1 + 0.25 * want) < _tol(dtype, 1e-6, exact_products)
    with pytest.raises(ValueError, match=r"a \(R, 24\) and b \(R, 16\)"):
        store.add(w, torch.zeros(3, 16), torch.zeros(3, 24))


def test_wants_only_its_parameters_while_factors_are_under_half_the_gradient():
    assert fg.MAX_FRACTION == 0.5
    w = torch.nn.Parameter(torch.zeros(64, 32))  # 8 KiB float32: factors under 4 KiB
    other = torch.nn.Parameter(torch.zeros(64, 32))
    store = fg.FactoredGrads([w])
    assert store.wants(w, 1023, 4) and not store.wants(w, 1024, 4) and not store.wants(other, 10, 4)
    assert store.wants(w, 2047, 2) and not store.wants(w, 2048, 2)  # bf16 factors: twice the elements
    store.add(w, torch.zeros(10, 64).bfloat16(), torch.zeros(10, 32).bfloat16())  # 1920 bytes held
    assert store.wants(w, 1087, 2) and not store.wants(w, 1088, 2)
    w.grad = torch.zeros(64, 32)
    assert not store.wants(w, 1, 2)  # a dense gradient: no more factors


def _ff_inputs(dtype, R=12, D=16, inner=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, D, generator=g)
    gamma, beta = 1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)
    w1, w2 = torch.randn(inner, D, generator=g) / 4, torch.randn(D, inner, generator=g) / 8
    gate = torch.tensor([0.3])
    dy = torch.randn(R, D, generator=g)
    return [t.to(dtype) for t in (x, gamma, beta, w1, w2, gate)], dy


@pytest.mark.parametrize("cast_parts", [False, True])
@pytest.mark.parametrize("variant", ["plain", "residual", "gated"])
@pytest.mark.parametrize("precision, products", [("fp32", None)] + [("bf16", k) for k in BF16_PRODUCTS])
def test_feed_forward_hands_its_weight_gradients_as_factors(variant, precision, products, cast_parts, monkeypatch):
    """The FF's backward under a store: its weights get no .grad, the factors' product is the
    dense path's weight gradient, and every other gradient (input, LayerNorm, gate) equals
    the dense path's (also with the bf16 weight casts made in several blocks)."""
    import importlib

    monkeypatch.setattr(fg, "MAX_FRACTION", 1e6)
    exact_products = use_bf16_products(products, monkeypatch)
    if cast_parts:
        monkeypatch.setattr(importlib.import_module("flamingo_rt.ops.feed_forward"), "CAST_PART_BYTES", 700)
    ins, dy = _ff_inputs(torch.float32)
    ac = precision == "bf16"

    def run(dtype=torch.float32):
        x, gamma, beta, w1, w2, gate = [t.to(dtype).clone().requires_grad_() for t in ins]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac and dtype == torch.float32):
            y = feed_forward(x, gamma, beta, w1, w2, residual=variant != "plain",
                             gate=gate if variant == "gated" else None)
        y.backward(dy.to(y.dtype))
        return x, gamma, beta, w1, w2, gate

    dense, exact = run(), run(torch.float64)
    holder = {}

    def run_factored():
        x, gamma, beta, w1, w2, gate = [t.clone().requires_grad_() for t in ins]
        st = fg.FactoredGrads([w1, w2])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            y = feed_forward(x, gamma, beta, w1, w2, residual=variant != "plain",
                             gate=gate if variant == "gated" else None)
        with fg.collecting(st):
            y.backward(dy.to(y.dtype))
        holder["store"] = st
        return x, gamma, beta, w1, w2, gate

    fac = run_factored()
    st = holder["store"]
    assert fac[3].grad is None and fac[4].grad is None and set(map(id, st.params())) == {id(fac[3]), id(fac[4])}
    got = [fac[0].grad, fac[1].grad, fac[2].grad, st.dense(fac[3]), st.dense(fac[4]), fac[5].grad]
    for i, g in enumerate(got):
        if i == 5 and variant != "gated":
            continue
        if precision == "fp32":
            assert rel_err(g, dense[i].grad) < 1e-5, i
        else:  # bf16: the gate scales dh here, the bf16 dy there; its own gradient is sum(dy * f),
            # f = a W2^T, here, <W2, dy^T a> there: as accurate as the dense path against
            # float64. Where f is torch's bf16 product (rounded, see conftest.use_bf16_products) it is rounded
            # to bf16 before the scalar sum cancels: a floor of 1e-2 for the gate (measured
            # 9.5e-3, the dense path 3.5e-3, on a 2-core AMD EPYC)
            floor = 1e-2 if i == 5 and not exact_products else 2e-3
            assert rel_err(g, exact[i].grad) <= 2 * rel_err(dense[i].grad, exact[i].grad) + floor, i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_gate_gradient_takes_no_product_of_its_own(dtype, monkeypatch):
    """In float32 / float64 the factored backward's gate gradient is sum(a * da) from the input
    gradient's own da = dy W2: the gated FF makes as many products as the ungated one, and the
    gate's gradient equals float64's sum(dy * FF(x))."""
    import importlib

    ffm = importlib.import_module("flamingo_rt.ops.feed_forward")
    monkeypatch.setattr(fg, "MAX_FRACTION", 1e6)
    calls = []
    for name in ("_mm_parts", "mm"):  # the module's products
        real = getattr(ffm, name)
        monkeypatch.setattr(ffm, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    ins, dy = _ff_inputs(dtype)

    def backward_products(gated: bool):
        x, gamma, beta, w1, w2, gate = [t.clone().requires_grad_() for t in ins]
        y = feed_forward(x, gamma, beta, w1, w2, residual=True, gate=gate if gated else None)
        calls.clear()
        with fg.collecting(fg.FactoredGrads([w1, w2])):
            y.backward(dy.to(dtype))
        return len(calls), gate.grad

    n_plain, _ = backward_products(False)
    n_gated, dgate = backward_products(True)
    assert n_gated == n_plain
    x, gamma, beta, w1, w2, _ = [t.double() for t in ins]
    xn = torch.nn.functional.layer_norm(x, (x.shape[1],), gamma, beta)
    f = torch.nn.functional.gelu(xn @ w1.t()) @ w2.t()
    want = (dy.double() * f).sum()
    assert dgate is not None and abs(float(dgate) - float(want)) <= (1e-5 if dtype == torch.float32 else 1e-12) * float(
        (dy.double() * f).abs().sum())


def test_bf16_gate_gradient_from_the_forwards_branch(monkeypatch):
    """Under bf16 autocast with the store active in the forward (as in train_step), the gated
    FF keeps its branch f as the forward rounded it and the factored backward sums dy * f:
    no product remakes f (as many products as the ungated FF), and the gate's gradient is as
    accurate against float64 as autocast's module path (which also sums dy against bf16 f)."""
    import importlib

    ffm = importlib.import_module("flamingo_rt.ops.feed_forward")
    monkeypatch.setattr(fg, "MAX_FRACTION", 1e6)
    calls = []
    for mod, name in ((ffm, "_mm_parts"), (ffm, "mm"), (ffm.widening_gemm, "addmm_")):  # the products
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    ins, dy = _ff_inputs(torch.float32, R=64, D=32, inner=128)

    def backward_products(gated: bool):
        x, gamma, beta, w1, w2, gate = [t.clone().requires_grad_() for t in ins]
        with fg.collecting(fg.FactoredGrads([w1, w2])):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = feed_forward(x, gamma, beta, w1, w2, residual=True, gate=gate if gated else None)
            calls.clear()
            y.backward(dy)
        return len(calls), gate.grad

    n_plain, _ = backward_products(False)
    n_gated, dgate = backward_products(True)
    assert n_gated == n_plain
    x, gamma, beta, w1, w2, gate = [t.clone().requires_grad_() for t in ins]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the module path under autocast
        xn = torch.nn.functional.layer_norm(x, (32,), gamma, beta)
        f = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(xn, w1)), w2)
    (x + gate * f).backward(dy)
    d = [t.double() for t in ins]
    exact = (dy.double() * torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(
        torch.nn.functional.layer_norm(d[0], (32,), d[1], d[2]), d[3])), d[4])).sum()
    err, module_err = abs(float(dgate) - float(exact)), abs(float(gate.grad) - float(exact))
    assert err <= 2 * module_err + 2e-3 * float(exact.abs()), (err, module_err)


def test_accumulation_turns_dense_when_factors_outgrow_the_gradient():
    """Two backward passes whose factors together would outgrow the gradient: the first's are
    written into .grad when the second comes, which accumulates densely there."""
    ins, dy = _ff_inputs(torch.float32, R=20, D=16, inner=64)
    x, gamma, beta, w1, w2, _ = [t.clone().requires_grad_() for t in ins]
    st = fg.FactoredGrads([w1, w2])
    with fg.collecting(st):
        for k in range(2):
            feed_forward(x, gamma, beta, w1, w2).backward(dy * (k + 1))
    assert len(st) == 0 and w1.grad is not None
    x2, g2, b2, v1, v2, _ = [t.clone().requires_grad_() for t in ins]
    for k in range(2):
        feed_forward(x2, g2, b2, v1, v2).backward(dy * (k + 1))
    assert rel_err(w1.grad, v1.grad) < 1e-6 and rel_err(w2.grad, v2.grad) < 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_row_block_update_is_the_optimizers_step(fused, monkeypatch):
    """A factored parameter with optimizer state updated a block of rows at a time: bitwise
    the optimizer's own step on the same gradient (assembled from the same row blocks), over
    three steps, with weight decay; the step count advances once per step."""
    monkeypatch.setattr(factored_step, "ROW_BLOCK_BYTES", 5 * 16 * 4)  # 5-row blocks, ragged last
    w = torch.nn.Parameter(torch.randn(24, 16))
    twin = torch.nn.Parameter(w.detach().clone())
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1, fused=fused or None)
    ref = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1, fused=fused or None)
    for step in range(3):
        st = fg.FactoredGrads([w])
        for a, b, s in _factors(torch.float32, seed=step):
            st.add(w, a, b, s)
        buf = torch.empty(24, 16)
        for r0 in range(0, 24, 5):
            st.rows_into(w, r0, min(24, r0 + 5), buf[r0:r0 + 5])
        twin.grad = buf.clone()
        ref.step()
        factored_step.step_(opt, st)
        assert len(st) == 0 and w.grad is None
        assert torch.equal(w, twin), step
        assert torch.equal(opt.state[w]["exp_avg_sq"], ref.state[twin]["exp_avg_sq"])
        assert float(opt.state[w]["step"]) == float(ref.state[twin]["step"]) == step + 1


def test_parameters_share_one_block_buffer(monkeypatch):
    """Every factored parameter of a step writes its row blocks into one buffer (per dtype),
    not a fresh one each (first touches of 16 MiB per weight); each update is still bitwise
    the optimizer's own step on the same gradient."""
    monkeypatch.setattr(factored_step, "ROW_BLOCK_BYTES", 6 * 40 * 4)
    ws = [torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(10, 40))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    opt, ref = torch.optim.AdamW(ws, lr=1e-2), torch.optim.AdamW(twins, lr=1e-2)
    storages = []  # (held: a freed buffer's address cannot come back for another)
    real = fg.FactoredGrads.rows_into
    monkeypatch.setattr(fg.FactoredGrads, "rows_into",
                        lambda self, p, r0, r1, out: storages.append(out.untyped_storage())
                        or real(self, p, r0, r1, out))
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        st = fg.FactoredGrads(ws)
        for w, t in zip(ws, twins):
            a, b = torch.randn(7, w.shape[0], generator=g), torch.randn(7, w.shape[1], generator=g)
            st.add(w, a, b)
            # the first step has no optimizer state: the dense gradient; then the update's blocks
            rows = w.shape[0] if step == 0 else factored_step.ROW_BLOCK_BYTES // (w.shape[1] * 4)
            t.grad = st.dense(w) if step == 0 else torch.empty_like(w)
            for r0 in range(0, w.shape[0] if step else 0, rows):
                st.rows_into(w, r0, min(w.shape[0], r0 + rows), t.grad[r0:r0 + rows])
        storages.clear()
        ref.step()
        factored_step.step_(opt, st)
        for w, t in zip(ws, twins):
            assert torch.equal(w, t), step
    assert len({st.data_ptr() for st in storages}) == 1  # the second step (with optimizer state): one buffer


def test_supports_only_elementwise_adam():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert factored_step.supports(torch.optim.AdamW(p)) and factored_step.supports(torch.optim.Adam(p))
    assert not factored_step.supports(torch.optim.AdamW(p, amsgrad=True))
    assert not factored_step.supports(torch.optim.SGD(p, lr=0.1))


# ---------------------------------------------------------------------------- train_step


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("precision, products", [(None, None)] + [(torch.bfloat16, k) for k in BF16_PRODUCTS])
@pytest.mark.parametrize("max_fraction", [1e6, 6.2])  # every pass factored; some weights densified on a later dataset
def test_train_step_factored_equals_dense(world, tmp_path, precision, products, max_fraction, monkeypatch):
    """train_step with factored weight gradients against the dense step from the same
    weights: three datasets accumulated, clipping active, three AdamW steps (the first
    creates the optimizer state, the next update by row blocks): same losses and gradient
    norms, the gradients the optimizer applies equal, the parameters after equal."""
    from flamingo_rt.runtime.train import TrainConfig, Trainer, train_step
    from flamingo_rt.runtime.train.config import OptimConfig
    from flamingo_rt.runtime.train.optim import build_optimizer

    monkeypatch.setattr(fg, "MAX_FRACTION", max_fraction)
    monkeypatch.setattr(factored_step, "ROW_BLOCK_BYTES", 4096)
    use_bf16_products(products, monkeypatch)
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path / "run", 1))
    tr = Trainer(cfg)
    with torch.no_grad():
        for blk in tr.model.xattn_blocks():
            blk.attn_gate.fill_(0.5)
            blk.ff_gate.fill_(-0.4)
    start = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    batches, targets, _ = tr._batches()
    weights = {"docs": 1.0, "pairs": 0.2, "video": 0.03}
    ff_weights = {id(blk.ff.fc1.weight) for blk in tr.model.xattn_blocks()}
    current, factored_ids = {}, set()
    real_step = factored_step.step_

    def spy(opt, store):  # the factored gradients as the optimizer will apply them (clipped)
        factored_ids.update(id(p) for p in store.params())
        current.update({id(p): store.dense(p) for p in store.params()})
        return real_step(opt, store)

    monkeypatch.setattr(factored_step, "step_", spy)
    runs = {}
    for factored in (False, True):
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                p.copy_(start[n])
        opt = build_optimizer(tr.model, OptimConfig(lr=1e-3, weight_decay=0.1))
        orig = opt.step

        def cap_step(*a, _orig=orig, _opt=opt, **k):  # the dense gradients the optimizer applies
            current.update({id(p): p.grad.clone() for g in _opt.param_groups for p in g["params"]
                            if p.grad is not None})
            return _orig(*a, **k)

        opt.step = cap_step
        res, captured = [], []
        for step in range(3):
            current.clear()
            res.append(train_step(tr.model, batches, weights, targets, opt, grad_clip=0.05, autocast_dtype=precision,
                                  factored=factored))
            captured.append(dict(current))
        runs[factored] = (res, captured, {n: p.detach().clone() for n, p in tr.model.named_parameters()})
    if max_fraction > 100:
        assert ff_weights <= factored_ids  # the blocks' FF weights did go through factors
    (rd, gd, pd), (rf, gf, pf) = runs[False], runs[True]
    # float32: equal up to the products' summation order. bf16: dh one bf16 rounding apart (the
    # gate applied to it here, to the bf16 dy on the dense path), and the FF gate's gradient
    # sum(da * a) made with W2's bf16 copy (as autocast's module path makes it) where the dense
    # path sums against the float32 W2: a scalar sum with cancellation, ~2e-2 apart at worst.
    # AdamW's normalized updates carry that into the parameters over the three steps. In bf16
    # the parameters compared are those that start nonzero: a zero-initialized one (a bias)
    # is its updates alone, whose relative error is unbounded there (an element whose
    # gradient is near zero flips the sign of its ~lr update on one bf16 rounding: 6.5e-2 on
    # resampler.layers.0.ff.norm.bias on a 2-core AMD EPYC, whose bf16 weight gradients are
    # torch's bf16 products, rounded once as autocast's own); their gradients are compared
    # The tanh gates' gradients are single sums over every row with cancellation, compared
    # apart: in bf16 the two paths' roundings leave them further apart than whole matrices'
    # (lm.xattn.3.ff_gate 5.8e-2 apart with torch's rounded bf16 products on the 2-core Xeon
    # with AMX, where every matrix gradient stays within 5e-3).
    tol = dict(loss=1e-5, norm=1e-5, grad=1e-5, gate=1e-5, param=1e-5) if precision is None else \
        dict(loss=1e-3, norm=1e-3, grad=5e-2, gate=1e-1, param=1e-2)
    worst = dict(loss=0.0, norm=0.0, grad=0.0, gate=0.0, param=0.0)
    gates = {id(p) for n, p in tr.model.named_parameters() if n.endswith("_gate")}
    for a, b in zip(rd, rf):
        assert a.grad_norm > 0.05  # clipping was active
        worst["norm"] = max(worst["norm"], abs(a.grad_norm - b.grad_norm) / a.grad_norm)
        for name in a.losses:
            worst["loss"] = max(worst["loss"], abs(a.losses[name] - b.losses[name]) / abs(a.losses[name]))
    for cd, cf in zip(gd, gf):
        assert cd.keys() == cf.keys()
        for k in cd:
            kind = "gate" if k in gates else "grad"
            worst[kind] = max(worst[kind], rel_err(cf[k], cd[k]))
    for n in pd:
        if precision is None or start[n].any():
            worst["param"] = max(worst["param"], rel_err(pf[n], pd[n]))
    assert all(worst[k] <= tol[k] for k in tol), worst


@pytest.mark.parametrize("on", [True, False])
def test_trainer_follows_optim_factored_grads(world, tmp_path, on, monkeypatch):
    """`flamingo-rt train`'s step factors weight gradients unless optim.factored_grads is false."""
    from flamingo_rt.runtime.train import TrainConfig, Trainer

    monkeypatch.setattr(fg, "MAX_FRACTION", 1e6)
    calls = []
    real_step = factored_step.step_
    monkeypatch.setattr(factored_step, "step_", lambda opt, store: (calls.append(len(store)), real_step(opt, store))[1])
    d = train_config_dict(world["model"].parent, tmp_path / "run", 1, optim={"factored_grads": on})
    Trainer(TrainConfig.from_dict(d)).fit()
    assert (len(calls) == 1 and calls[0] > 0) if on else calls == []
