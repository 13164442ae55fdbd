"""The training step: freezing, weighted accumulation over datasets, the kernels' gradients
against the reference's, bf16 autocast, activation checkpointing, the non-finite guard,
the schedule, and a short run whose loss goes down while the gates open."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
from world_fixture import make_world, train_config_dict  # noqa: E402

from flamingo_rt.io.pretrained import load_pretrained  # noqa: E402
from flamingo_rt.runtime.train import (  # noqa: E402
    NonFiniteLossError, OptimConfig, TrainConfig, Trainer, load_train_config, lr_factor, param_groups,
    train_step, write_dataset,
)
from flamingo_rt.runtime.train.step import loss_sum  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trainer(world, tmp_path, steps=4, open_gates=False, **over):
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path / "run", steps, **over))
    tr = Trainer(cfg)
    if open_gates:  # at init tanh(0) = 0 blocks every gradient but the gates'; open them
        with torch.no_grad():
            for blk in tr.model.xattn_blocks():
                blk.attn_gate.fill_(0.5)
                blk.ff_gate.fill_(-0.4)
    return tr


class _GradCapture(torch.optim.SGD):
    """An optimizer that records the gradients it is asked to apply."""

    def step(self, closure=None):
        self.captured = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                         if p.grad is not None}
        return super().step(closure)


def test_freezing_keeps_backbones_bit_identical(world, tmp_path):
    tr = _trainer(world, tmp_path, steps=3)
    m = tr.model
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    # the vocabulary rows of <image> / <|endofchunk|> train as their own (k, D) parameters,
    # the embedding table and the untied head stay frozen and follow them in those rows
    assert trainable and all(n.startswith(("resampler.", "lm.xattn.", "lm.token_rows.")) for n in trainable)
    assert {n for n in trainable if n.startswith("lm.token_rows.")} == {"lm.token_rows.embed", "lm.token_rows.head"}
    assert not m.lm.embed_tokens.weight.requires_grad and not m.lm.lm_head.weight.requires_grad
    assert not any(p.requires_grad for p in m.vision_encoder.parameters())
    assert not m.vision_encoder.training
    tr.fit()
    rows = [tr.tokenizer.image_token_id, tr.tokenizer.eoc_token_id]
    for n, p in m.named_parameters():
        if n in ("lm.embed_tokens.weight", "lm.lm_head.weight"):
            other = torch.ones(p.shape[0], dtype=torch.bool)
            other[rows] = False
            assert torch.equal(p[other], before[n][other]), n  # every other row bit-identical
            assert not torch.equal(p[rows], before[n][rows]), n  # the special rows train
        elif n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_rows_kept_out_of_the_tables_train_the_same(world, tmp_path, monkeypatch):
    """strategy "fsdp" trains the vocabulary rows as (k, D) parameters that never enter the
    frozen tables (TokenRows.in_tables False: FSDP2's sharded tables cannot be written from a
    forward; the embedding, the head's columns and the loss's hidden gradient correct for
    them instead): in one process the same losses and trained model as strategy "none", no
    (V, D) table trains, and the tables keep their first values through the steps."""
    monkeypatch.setattr(Trainer, "save_final", lambda self, folder: None)  # it merges the rows in
    out = {}
    for strat in ("none", "fsdp"):
        tr = _trainer(world, tmp_path / strat, steps=3, open_gates=True, strategy=strat)
        m = tr.model
        assert m.lm.token_rows.in_tables == (strat == "none") and tr.rows == {}
        assert not m.lm.embed_tokens.weight.requires_grad and not m.lm.lm_head.weight.requires_grad
        tables = [m.lm.embed_tokens.weight.detach().clone(), m.lm.lm_head.weight.detach().clone()]
        tr.fit()
        now = [m.lm.embed_tokens.weight, m.lm.lm_head.weight]
        # fsdp: never written; none: the trained rows copied in at each forward
        assert all(torch.equal(a, b) == (strat == "fsdp") for a, b in zip(now, tables))
        log = [json.loads(r) for r in (tmp_path / strat / "run" / "log.jsonl").read_text().splitlines()]
        with m.lm.token_rows_merged():
            out[strat] = ([r["loss"] for r in log], {k: v.clone() for k, v in m.state_dict().items()})
    (l1, w1), (l2, w2) = out["none"], out["fsdp"]
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):  # {dataset: loss} per step
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * abs(a[k]) for k in a), (a, b)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)


def test_the_run_says_what_trains(world, tmp_path, capsys):
    tr = _trainer(world, tmp_path, steps=1)
    t = tr.trainable_summary()
    m = tr.model
    D = m.lm.cfg.dim
    assert t["resampler"] == sum(p.numel() for p in m.resampler.parameters())
    assert t["xattn"] == sum(p.numel() for p in m.lm.xattn.parameters())
    assert t["token_rows"] == 2 * 2 * D and t["vocab_rows"] == 0 and t["other"] == 0  # untied: embed + head rows
    assert t["total"] == sum(p.numel() for p in m.parameters()) and t["frozen"] > t["total"] // 2
    tr.fit()
    out = capsys.readouterr().out
    ids = [tr.tokenizer.image_token_id, tr.tokenizer.eoc_token_id]
    assert (f"[train] {t['total'] - t['frozen']:,} of {t['total']:,} parameters train: resampler "
            f"{t['resampler']:,}, cross-attention {t['xattn']:,}, vocabulary rows {4 * D:,} (token ids "
            f"{sorted(ids)})") in out


def test_accumulation_equals_weighted_sum_of_dataset_gradients(world, tmp_path):
    tr = _trainer(world, tmp_path, steps=1, open_gates=True)
    batches, targets, _ = tr._batches()
    weights = {"docs": 1.0, "pairs": 0.2, "video": 0.03}
    params = [p for p in tr.model.parameters() if p.requires_grad]
    opt = _GradCapture(params, lr=0.0)
    train_step(tr.model, batches, weights, targets, opt, grad_clip=None)
    expect = {id(p): torch.zeros_like(p) for p in params}
    for name, b in batches.items():
        tr.model.zero_grad(set_to_none=True)
        (loss_sum(tr.model, b) / targets[name]).backward()
        for p in params:
            if p.grad is not None:
                expect[id(p)] += weights[name] * p.grad
    for p in params:
        got = opt.captured.get(id(p), torch.zeros_like(p))
        torch.testing.assert_close(got, expect[id(p)], rtol=1e-5, atol=1e-7)
    # the temporal embeddings only get gradient from clips
    assert opt.captured[id(tr.model.resampler.frame_embs)].abs().sum() > 0


def test_kernel_backends_gradients_equal_reference(world, tmp_path):
    tr = _trainer(world, tmp_path, steps=1, open_gates=True)
    batches, targets, _ = tr._batches()
    params = [p for p in tr.model.parameters() if p.requires_grad]
    grads = {}
    for backend in ("reference", None):  # None: "auto", the C++ kernels where registered
        opt = _GradCapture(params, lr=0.0)
        train_step(tr.model, batches, {"docs": 1.0, "pairs": 0.2, "video": 0.03}, targets, opt, backend=backend)
        grads[backend] = opt.captured
    for p in params:
        torch.testing.assert_close(grads[None][id(p)], grads["reference"][id(p)], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_same_gradients(world, tmp_path):
    tr = _trainer(world, tmp_path, steps=1, open_gates=True)
    batches, targets, _ = tr._batches()
    params = [p for p in tr.model.parameters() if p.requires_grad]
    out = []
    for ckpt in (False, True):
        tr.model.lm.activation_checkpointing = ckpt
        opt = _GradCapture(params, lr=0.0)
        train_step(tr.model, batches, {"docs": 1.0, "pairs": 1.0, "video": 1.0}, targets, opt)
        out.append(opt.captured)
    for p in params:
        torch.testing.assert_close(out[1][id(p)], out[0][id(p)], rtol=1e-6, atol=1e-8)


def test_cpu_block_cache_same_step(world, tmp_path):
    """train_step(cpu_block_cache=True): the step's large tensors come from the CPU block cache
    (its hits grow; the scope is closed after the step), and the step is the same: equal
    losses, gradients and updated weights."""
    from flamingo_rt.runtime import cpu_cache

    tr = _trainer(world, tmp_path, steps=1, open_gates=True)
    batches, targets, _ = tr._batches()
    params = [p for p in tr.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    out = []
    for cached in (False, True, True):
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        opt = _GradCapture(params, lr=0.1)
        hits = cpu_cache.stats().hits
        res = train_step(tr.model, batches, {"docs": 1.0, "pairs": 0.2, "video": 0.03}, targets, opt,
                         cpu_block_cache=cached)
        assert cpu_cache.depth() == 0
        if cached and cpu_cache.enabled():
            assert cpu_cache.stats().hits > hits
        out.append((res.losses, opt.captured, [p.detach().clone() for p in params]))
    for losses, grads, after in out[1:]:
        assert losses == out[0][0]
        for p, a, b in zip(params, after, out[0][2]):
            assert torch.equal(grads[id(p)], out[0][1][id(p)]) and torch.equal(a, b)
    with pytest.raises(ValueError, match="expected cpu_block_cache: true or false, got 'yes'"):
        TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path / "bad", 1, cpu_block_cache="yes"))


def test_bf16_autocast_step_close_to_fp32(world, tmp_path):
    tr = _trainer(world, tmp_path, steps=1, open_gates=True)
    batches, targets, _ = tr._batches()
    params = [p for p in tr.model.parameters() if p.requires_grad]
    res = {}
    for dt in (None, torch.bfloat16):
        opt = _GradCapture(params, lr=0.0)
        res[dt] = (train_step(tr.model, batches, {"docs": 1.0, "pairs": 0.2, "video": 0.03}, targets, opt,
                              autocast_dtype=dt), opt.captured)
    for name in batches:
        assert abs(res[torch.bfloat16][0].losses[name] - res[None][0].losses[name]) < 0.05
    g32 = torch.cat([res[None][1][id(p)].flatten() for p in params])
    g16 = torch.cat([res[torch.bfloat16][1][id(p)].flatten() for p in params])
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_non_finite_loss_names_dataset_and_step_and_keeps_checkpoint(world, tmp_path):
    tr = _trainer(world, tmp_path, steps=6)
    tr.cfg.steps = 2
    tr.fit()  # checkpoint at step 2
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    files = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints" / latest.strip()).iterdir()}
    tr.cfg.steps = 6
    with torch.no_grad():
        tr.model.resampler.latents[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"dataset 'docs'.* at step 3"):
        tr.fit()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == latest
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints" / latest.strip()).iterdir()} == files
    assert all(p.grad is None for p in tr.model.parameters())  # nothing half-applied


def test_loss_goes_down_and_gates_open(world, tmp_path):
    tr = _trainer(world, tmp_path, steps=30, checkpoint_every=100,
                  optim=dict(lr=5e-3, warmup_steps=3, min_lr_ratio=0.5))
    hist = tr.fit()
    first = sum(hist[0]["loss"].values())
    last = sum(sum(h["loss"].values()) for h in hist[-5:]) / 5
    assert last < first - 0.5, (first, last)
    gates = hist[-1]["gates"]
    assert max(abs(v) for g in gates.values() for v in g) > 0.02  # tanh gates started at exactly 0
    assert all(v == 0 for g in model_gates_at_init(world).values() for v in g)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert set(log[0]) >= {"lr", "loss", "loss_weighted", "grad_norm", "tokens_per_s", "gates", "bad_records"}
    m, tok = load_pretrained(tmp_path / "run" / "final")  # the final model folder loads
    torch.testing.assert_close(m.resampler.latents, tr.model.resampler.latents)


def model_gates_at_init(world):
    m, _ = load_pretrained(world["model"])
    return {k: list(v) for k, v in m.gate_values().items()}


def test_param_groups_and_schedule(world):
    m, _ = load_pretrained(world["model"])
    m.freeze_backbones()
    groups = param_groups(m, 0.1)
    decay = set(groups[0]["names"])
    assert "lm.xattn.1.attn.to_q.weight" in decay and "resampler.layers.0.ff.fc1.weight" in decay
    no = set(groups[1]["names"])
    assert {"lm.xattn.1.attn_gate", "resampler.latents", "resampler.frame_embs",
            "lm.xattn.1.attn.norm.weight"} <= no
    assert groups[1]["weight_decay"] == 0.0
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    f = [lr_factor(s, 14, cfg) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert abs(f[9] - (0.1 + 0.9 * 0.5)) < 1e-12  # half way through the cosine
    assert all(a >= b for a, b in zip(f[3:], f[4:])) and f[-1] > 0.1


def test_config_files_and_errors(world, tmp_path):
    d = train_config_dict(world["model"].parent, "run", 3)
    (tmp_path / "c.json").write_text(json.dumps(d))
    cfg = load_train_config(tmp_path / "c.json")
    assert cfg.out_dir == str(tmp_path / "run") and cfg.datasets[2].num_frames == 3
    toml = f'''model = "{d["model"]}"\nout_dir = "r"\nsteps = 2\n[[datasets]]\nname = "p"\nkind = "pairs"\npath = "{d["datasets"][1]["path"]}"\nweight = 0.2\n[optim]\nlr = 0.01\n'''
    (tmp_path / "c.toml").write_text(toml)
    cfg = load_train_config(tmp_path / "c.toml")
    assert cfg.optim.lr == 0.01 and cfg.datasets[0].weight == 0.2 and cfg.out_dir == str(tmp_path / "r")
    with pytest.raises(ValueError, match="kind in"):
        TrainConfig.from_dict(dict(d, datasets=[dict(d["datasets"][0], kind="audio")]))
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict(dict(d, stepz=3))
    from flamingo_rt.runtime.train.distributed import DistInfo, row_range

    with pytest.raises(ValueError, match="divisible"):
        row_range(3, DistInfo(0, 2), "docs")
    # unparsable files name themselves; a JSON list is not a table of settings
    (tmp_path / "bad.toml").write_text('model = "x"\n[[datasets]\n')
    with pytest.raises(ValueError, match=r"cannot parse training config .*bad\.toml: "):
        load_train_config(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_text('{"steps": 2,')
    with pytest.raises(ValueError, match=r"cannot parse training config .*bad\.json: "):
        load_train_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="to hold a table of settings, got list"):
        load_train_config(tmp_path / "list.json")
    # sections: unknown keys and non-tables name the section; a mixture needs a positive weight
    ds0 = d["datasets"][0]
    for bad, msg in [(dict(d, optim={"lrr": 1}), r"optim: unknown keys \['lrr'\]"),
                     (dict(d, freeze=3), "freeze: expected a table of settings, got int"),
                     (dict(d, datasets=[dict(ds0, wieght=1.0)]), r"datasets\[0\]: unknown keys \['wieght'\]"),
                     (dict(d, datasets=["x"]), r"datasets\[0\]: expected a table of settings, got str"),
                     (dict(d, datasets=dict(ds0)), r"expected datasets: a list of tables \(\[\[datasets\]\] in TOML\), got dict"),
                     (dict(d, datasets=[dict(ds0, weight=0.0)]), "at least one dataset with weight > 0"),
                     (dict(d, optim={"factored_grads": "yes"}), "optim: expected factored_grads: true or false"),
                     # missing required keys and values of the wrong type name the field
                     ({k: v for k, v in d.items() if k not in ("out_dir", "datasets")},
                      r"training config: missing required keys \['datasets', 'out_dir'\]"),
                     (dict(d, datasets=[{"name": "x", "kind": "pairs"}]), r"datasets\[0\]: missing required keys \['path'\]"),
                     (dict(d, steps="100"), "expected steps: an integer, got '100'"),
                     (dict(d, steps=True), "expected steps: an integer, got True"),
                     (dict(d, seed=1.5), "expected seed: an integer, got 1.5"),
                     (dict(d, progress="no"), "expected progress: true or false, got 'no'"),
                     (dict(d, datasets=[dict(ds0, batch_size=2.5)]), r"dataset 'docs': expected batch_size: an integer, got 2.5"),
                     (dict(d, datasets=[dict(ds0, weight="1")]), r"dataset 'docs': expected weight: a number, got '1'"),
                     (dict(d, datasets=[dict(ds0, num_frames="8")]), r"expected num_frames: an integer \(or unset\), got '8'"),
                     (dict(d, optim={"lr": "1e-4"}), "optim: expected lr: a number, got '1e-4'"),
                     (dict(d, optim={"betas": [0.9, "x"]}), "optim: expected betas: a list of numbers"),
                     (dict(d, optim={"grad_clip": "1"}), r"optim: expected grad_clip: a number \(or unset\), got '1'"),
                     (dict(d, freeze={"vision": "no"}), "freeze: expected vision: true or false, got 'no'"),
                     (dict(d, freeze={"trainable_token_ids": [1, "2"]}), "freeze: expected trainable_token_ids: a list of integers"),
                     (dict(d, model=3), r"expected model: a string \(or unset\), got 3")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig.from_dict(bad)
    # integers where numbers are expected become floats; paths may be os.PathLike
    ok = TrainConfig.from_dict(dict(d, out_dir=tmp_path / "p", optim={"lr": 1, "betas": [0, 0.5]},
                                    datasets=[dict(ds0, weight=2, path=tmp_path / "docs")]))
    assert ok.optim.lr == 1.0 and type(ok.optim.lr) is float and ok.optim.betas == (0.0, 0.5)
    assert type(ok.datasets[0].weight) is float and ok.datasets[0].path == str(tmp_path / "docs")
    assert ok.out_dir == str(tmp_path / "p")
    import numpy as np  # numpy scalars (a config built in code) are numbers, kept as plain ones

    ok = TrainConfig.from_dict(dict(d, steps=np.int64(3), datasets=[dict(ds0, batch_size=np.int32(2),
                                                                        weight=np.float32(0.5))]))
    assert type(ok.steps) is int and type(ok.datasets[0].batch_size) is int and type(ok.datasets[0].weight) is float
    (tmp_path / "single.toml").write_text(toml.replace("[[datasets]]", "[datasets]"))
    with pytest.raises(ValueError, match=r"a list of tables \(\[\[datasets\]\] in TOML\), got dict"):
        load_train_config(tmp_path / "single.toml")


def test_cli_train_reports_a_missing_dataset_or_model_in_one_line(world, tmp_path, capsys):
    """`flamingo-rt train` with a config whose dataset folder or model folder is missing:
    exit code 2 and one line naming it (the Trainer raised it through a traceback before)."""
    from flamingo_rt import cli

    d = train_config_dict(world["model"].parent, "run", 3)
    gone = dict(d, datasets=[dict(d["datasets"][0], path=str(tmp_path / "no-data"))])
    (tmp_path / "a.json").write_text(json.dumps(gone))
    assert cli.main(["train", str(tmp_path / "a.json"), "--no-progress", "--default-malloc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flamingo-rt train: ") and "no-data" in err and "does not exist" in err, err
    (tmp_path / "b.json").write_text(json.dumps(dict(d, model=str(tmp_path / "no-model"))))
    assert cli.main(["train", str(tmp_path / "b.json"), "--no-progress", "--default-malloc"]) == 2
    err = capsys.readouterr().err
    assert "no-model: no such model folder" in err and "save_pretrained" in err, err
    assert "Traceback" not in err


def test_cli_train_reports_a_dataset_without_usable_records_in_one_line(world, tmp_path, capsys, caplog):
    """A dataset whose every record is bad (here: no image file decodes): exit code 1 and one
    line naming the dataset and the counts (a RuntimeError traceback before); a non-.npy file
    is named as such (numpy said "contains pickled (object) data")."""
    from flamingo_rt import cli

    d = train_config_dict(world["model"].parent, "run", 3)
    data = tmp_path / "junk"
    write_dataset([{"image": torch.rand(3, 8, 8), "text": f"caption {i}."} for i in range(3)], data, "pairs",
                  image_format="npy")
    for f in (data / "media").iterdir():
        f.write_bytes(b"garbage")
    junk = dict(d["datasets"][0], name="junk", kind="pairs", path=str(data))
    (tmp_path / "c.json").write_text(json.dumps(dict(d, datasets=[d["datasets"][0], junk])))
    assert cli.main(["train", str(tmp_path / "c.json"), "--no-progress", "--default-malloc"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("flamingo-rt train: dataset 'junk': a whole epoch over"), err
    assert "{'undecodable_image': 3}" in err and "Traceback" not in err, err
    assert "0000001.npy: ValueError: not an .npy file (it does not start with the NUMPY header)" in caplog.text


def test_frozen_linears_in_bf16_give_the_same_step(world, tmp_path):
    """freeze.frozen_linear_dtype = "bf16": the frozen LM's linear weights stored in bfloat16
    give the same losses and gradients as autocast's casts of the float32 weights, the
    trainable parameters (cross-attention, the trained vocabulary rows) stay float32, and the
    stored weights do not change over steps but for the output projection's trained rows."""
    plain = _trainer(world, tmp_path / "a", steps=1, open_gates=True, precision="bf16",
                     freeze={"frozen_linear_dtype": "none"})
    assert not plain.lowp_frozen and plain.frozen_linear_dtype is None
    tr = _trainer(world, tmp_path / "b", steps=2, open_gates=True, precision="bf16",
                  freeze={"frozen_linear_dtype": "bf16"})
    m = tr.model
    frozen16 = {n for n, p in m.named_parameters() if p.dtype == torch.bfloat16}
    assert frozen16 and all(n.startswith(("lm.layers.", "lm.lm_head.")) for n in frozen16)
    assert "lm.lm_head.weight" in frozen16  # frozen: its trained rows are lm.token_rows.head
    assert all(not p.requires_grad for n, p in m.named_parameters() if n in frozen16)
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    assert m.lm.token_rows.head.dtype == torch.float32 and m.lm.embed_tokens.weight.dtype == torch.float32
    bytes16 = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n in frozen16)
    bytes32 = sum(p.numel() * p.element_size() for n, p in plain.model.named_parameters() if n in frozen16)
    assert bytes16 * 2 == bytes32
    batches, targets, _ = tr._batches()
    res = []
    for t in (plain, tr):
        params = [p for p in t.model.parameters() if p.requires_grad]
        opt = _GradCapture(params, lr=0.0)
        r = train_step(t.model, batches, {"docs": 1.0, "pairs": 0.2, "video": 0.03}, targets, opt,
                       autocast_dtype=torch.bfloat16)
        res.append((r.losses, [opt.captured.get(id(p)) for p in params]))
    assert res[0][0] == res[1][0]
    for a, b in zip(res[0][1], res[1][1]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n in frozen16}
    tr.fit()
    ids = m.lm.token_rows.ids
    other = torch.ones(m.lm.cfg.vocab_size, dtype=torch.bool)
    other[ids] = False
    for n, p in m.named_parameters():
        if n == "lm.lm_head.weight":  # all but the trained rows, which follow lm.token_rows.head
            assert torch.equal(p[other], before[n][other]) and not torch.equal(p[ids], before[n][ids])
            assert torch.equal(p[ids], m.lm.token_rows.head.detach().bfloat16())
        elif n in frozen16:
            assert torch.equal(p, before[n]), n
    # the final model folder holds the frozen weights as loaded (float32), not their bf16
    # rounding, and the trained rows unrounded
    final, _ = load_pretrained(tmp_path / "b" / "run" / "final")
    source = dict(plain.model.named_parameters())
    for n, p in final.named_parameters():
        if n == "lm.lm_head.weight":
            assert p.dtype == torch.float32 and torch.equal(p[other], source[n][other])
            assert torch.equal(p[ids], m.lm.token_rows.head.detach())
        elif n in frozen16:
            assert p.dtype == torch.float32 and torch.equal(p, source[n]), n


def test_frozen_linears_of_an_in_memory_model_are_saved_rounded_and_said_so(world, tmp_path, capsys):
    """Without a source folder the originals are gone: the final folder holds the bf16 values
    (widened to float32) and the run says so."""
    model, tok = load_pretrained(world["model"])
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path / "run", 1, precision="bf16",
                                                  freeze={"frozen_linear_dtype": "bf16"}))
    tr = Trainer(cfg, model=model, tokenizer=tok)
    assert tr.lowp_frozen
    tr.save_final(tmp_path / "final")
    assert "frozen LM linear tensors hold their bf16-rounded values" in capsys.readouterr().out
    final, _ = load_pretrained(tmp_path / "final")
    params = dict(final.named_parameters())
    ids = tr.model.lm.token_rows.ids
    for n in tr.lowp_frozen:
        p = params[n]
        assert p.dtype == torch.float32
        if n == "lm.lm_head.weight":  # its trained rows are written unrounded
            assert torch.equal(p[ids], tr.model.lm.token_rows.head.detach())
            p = p[[i for i in range(p.shape[0]) if i not in ids.tolist()]]
        assert torch.equal(p, p.bfloat16().float()), n  # exactly representable in bf16


def test_frozen_linear_dtype_auto_follows_precision_and_strategy(world):
    """The default "auto": bf16 storage under bf16 autocast (not with FSDP2), none in fp32;
    "none" and None keep the weights' dtype; the Trainer stores what the config resolves to."""
    d = train_config_dict(world["model"].parent, "run", 3)
    for prec in ("fp32", "bf16"):
        for strat in ("auto", "ddp", "fsdp"):
            for f in ("default", "auto", "none", None):
                freeze = {} if f == "default" else {"frozen_linear_dtype": f}
                r = TrainConfig.from_dict(dict(d, precision=prec, strategy=strat, freeze=freeze)).resolved_frozen_linear_dtype()
                want = "bf16" if prec == "bf16" and strat != "fsdp" and f in ("default", "auto") else None
                assert r == want, (prec, strat, f, r)
    bf = TrainConfig.from_dict(dict(d, precision="bf16"))
    assert bf.resolved_frozen_linear_dtype(has_source_folder=False) is None  # nothing saved gets rounded
    explicit = TrainConfig.from_dict(dict(d, precision="bf16", freeze={"frozen_linear_dtype": "bf16"}))
    assert explicit.resolved_frozen_linear_dtype() == explicit.resolved_frozen_linear_dtype(False) == "bf16"


def test_trainer_default_stores_frozen_linears_in_bf16_only_under_bf16(world, tmp_path):
    bf = _trainer(world, tmp_path / "a", steps=1, precision="bf16")
    assert bf.frozen_linear_dtype == "bf16" and bf.lowp_frozen
    assert all(p.dtype == torch.bfloat16 for n, p in bf.model.named_parameters() if n in set(bf.lowp_frozen))
    fp = _trainer(world, tmp_path / "b", steps=1, precision="fp32")
    assert fp.frozen_linear_dtype is None and not fp.lowp_frozen
    assert all(p.dtype == torch.float32 for p in fp.model.parameters())
    # an in-memory model has no folder to restore the originals from: "auto" leaves it float32
    model, tok = load_pretrained(world["model"])
    cfg = TrainConfig.from_dict(train_config_dict(world["model"].parent, tmp_path / "c", 1, precision="bf16"))
    mem = Trainer(cfg, model=model, tokenizer=tok)
    assert mem.frozen_linear_dtype is None and not mem.lowp_frozen
    assert all(p.dtype == torch.float32 for p in mem.model.parameters())


def test_frozen_linear_dtype_config_errors(world):
    d = train_config_dict(world["model"].parent, "run", 3)
    with pytest.raises(ValueError, match="frozen_linear_dtype 'auto', 'bf16', 'none' or None, got 'fp16'"):
        TrainConfig.from_dict(dict(d, precision="bf16", freeze={"frozen_linear_dtype": "fp16"}))
    with pytest.raises(ValueError, match="needs precision = 'bf16'.*got 'fp32'"):
        TrainConfig.from_dict(dict(d, precision="fp32", freeze={"frozen_linear_dtype": "bf16"}))
    with pytest.raises(ValueError, match="got 'fsdp'"):
        TrainConfig.from_dict(dict(d, precision="bf16", strategy="fsdp", freeze={"frozen_linear_dtype": "bf16"}))


def test_close_distributed_destroys_only_the_group_it_made():
    """close_distributed destroys a process group init_distributed created and leaves one
    the caller made (a one-process gloo group stands in for torchrun's)."""
    import torch.distributed as dist

    from flamingo_rt.runtime.train.distributed import DistInfo, close_distributed

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        close_distributed(DistInfo())  # not ours: untouched
        assert dist.is_initialized()
        info = DistInfo(initialized_here=True)
        close_distributed(info)
        assert not dist.is_initialized() and not info.initialized_here
        close_distributed(info)  # idempotent
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
