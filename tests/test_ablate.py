"""The ablations (flamingo_rt.recipe.ablate, ``flamingo-rt ablate``) and the model options they
switch: ungated blocks, the MLP resampler, cross-attention every 2nd layer, all previous images."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from flamingo_rt import cli
from flamingo_rt.io import load_pretrained, save_pretrained
from flamingo_rt.models import Flamingo, GatedCrossAttentionBlock, MLPResampler, PerceiverResampler, build_resampler
from flamingo_rt.models.config import ResamplerConfig
from flamingo_rt.recipe import get_recipe_preset
from flamingo_rt.recipe.ablate import ABLATIONS, format_table, load_backbones, run_ablations
from flamingo_rt.recipe.lm_pretrain import train_tokenizer
from flamingo_rt.runtime import Generator


# ----------------------------------------------------------------------------- ungated blocks
def test_ungated_block_has_no_gates_and_adds_both_branches():
    torch.manual_seed(0)
    gated = GatedCrossAttentionBlock(16, 8, heads=2, dim_head=4, ff_mult=2).double()
    plain = GatedCrossAttentionBlock(16, 8, heads=2, dim_head=4, ff_mult=2, gated=False).double()
    assert not any("gate" in n for n, _ in plain.named_parameters())
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["attn_gate", "ff_gate"]
    with torch.no_grad():  # tanh(20) rounds to 1 in float64: the gated block is then the ungated one
        gated.attn_gate.fill_(20.0)
        gated.ff_gate.fill_(20.0)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    media = torch.randn(2, 2, 3, 8, dtype=torch.float64)
    idx = torch.tensor([[-1, 0, 0, 1, 1], [0, 0, 0, 0, -1]])
    out = plain(x, media, media_index=idx)
    torch.testing.assert_close(out, gated(x, media, media_index=idx), rtol=0, atol=1e-12)
    # and it is x + XAttn + FF, no factor in between
    y = x + plain.attn(x, plain.attn.media_kv(media), idx)
    torch.testing.assert_close(out, y + plain.ff(y), rtol=1e-12, atol=1e-12)


def _toy_flamingo(**xattn):
    cfg = get_recipe_preset("toy").model
    for k, v in xattn.items():
        setattr(cfg.xattn, k, v)
    torch.manual_seed(0)
    return Flamingo(cfg)


def test_ungated_flamingo_reports_open_gates_and_round_trips(tmp_path):
    m = _toy_flamingo(gated=False)
    assert m.gate_values() == {i: (1.0, 1.0) for i in m.gate_values()} and m.gate_values()
    save_pretrained(m, tmp_path / "m")
    m2, _ = load_pretrained(tmp_path / "m")
    ids = torch.tensor([[0, 5, 6, 7, 0, 8, 9]])
    media = torch.rand(1, 2, 3, 32, 32)
    torch.testing.assert_close(m2(ids, media).logits, m.eval()(ids, media).logits)


def test_xattn_every_and_all_previous_reach_the_blocks():
    assert len(_toy_flamingo(every=1).lm.xattn) == 2 and len(_toy_flamingo(every=2).lm.xattn) == 1
    assert all(b.all_previous for b in _toy_flamingo(all_previous=True).xattn_blocks())


# ----------------------------------------------------------------------------- MLP resampler
def _mlp_cfg(**kw):
    base = dict(kind="mlp", dim=16, depth=2, num_latents=4, ff_mult=2, max_num_frames=3)
    base.update(kw)
    return ResamplerConfig(**base)


def _reference_mlp_resampler(r: MLPResampler, x: torch.Tensor) -> torch.Tensor:
    """Plain torch: frame embeddings, per-token residual FF layers, mean of token groups."""
    if x.dim() == 4:
        x = x.unsqueeze(2)
    B, M, Fr, S, D = x.shape
    x = x + r.frame_embeddings(Fr)[None, None, :, None, :]
    x = x.reshape(B * M, Fr * S, D)
    for ff in r.layers:
        h = F.layer_norm(x, (D,), ff.norm.weight, ff.norm.bias, ff.norm.eps)
        x = x + F.gelu(h @ ff.fc1.weight.t()) @ ff.fc2.weight.t()
    N, L = Fr * S, r.config.num_latents
    if N >= L:  # N a multiple of L here: equal groups of N / L neighbouring tokens
        pooled = x.reshape(B * M, L, N // L, D).mean(2)
    else:  # L a multiple of N: each token repeated
        pooled = x.repeat_interleave(L // N, dim=1)
    return F.layer_norm(pooled, (D,), r.norm.weight, r.norm.bias, r.norm.eps).reshape(B, M, L, D)


@pytest.mark.parametrize("shape", [(2, 3, 2, 4, 16), (2, 3, 2, 16), (1, 2, 5, 4, 16)],
                         ids=["clips-2x4", "stills-2", "clips-5x4-interpolated"])
def test_mlp_resampler_matches_plain_torch_forward_and_backward(shape):
    torch.manual_seed(1)
    r = MLPResampler(_mlp_cfg()).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = r(x)
    assert out.shape == (shape[0], shape[1], 4, 16)
    ref = _reference_mlp_resampler(r, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *r.parameters()], g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [x, *r.parameters()], g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert grads[0].abs().sum() > 0 and all(p is not None for p in grads[2:])


def test_mlp_resampler_gradcheck():
    torch.manual_seed(2)
    r = MLPResampler(_mlp_cfg(depth=1, dim=8, num_latents=3, max_num_frames=None)).double()
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(r, (x,))


def test_resampler_kind_builds_and_is_checked():
    assert isinstance(build_resampler(_mlp_cfg()), MLPResampler)
    assert isinstance(build_resampler(_mlp_cfg(kind="perceiver", heads=2, dim_head=8)), PerceiverResampler)
    with pytest.raises(ValueError, match="unknown resampler kind 'conv'"):
        ResamplerConfig(kind="conv")
    with pytest.raises(ValueError, match="expected media features of shape"):
        MLPResampler(_mlp_cfg())(torch.randn(2, 3, 4, 15))


def test_flamingo_with_mlp_resampler_generates_through_the_caches():
    cfg = get_recipe_preset("toy").model
    cfg.resampler.kind = "mlp"
    torch.manual_seed(0)
    m = Flamingo(cfg).eval()
    assert isinstance(m.resampler, MLPResampler)
    tok = _toy_tokenizer()
    gen = Generator(m, tok, max_media=2)
    img = torch.rand(3, 32, 32)
    prompt = [img, "a red square.", img, "a"]
    cached = gen.score(prompt, [" blue", " red"])
    # the same log-likelihoods from one plain forward over the whole text
    full = []
    enc = gen.encode(prompt)
    media = torch.stack(enc.media)[None]  # (1, M, F, 3, S, S)
    for c in (" blue", " red"):
        cand = tok.encode(c)
        ids = enc.ids + cand
        with torch.no_grad():
            logits = m(torch.tensor([ids]), media).logits[0].float().log_softmax(-1)
        n = len(enc.ids)
        full.append(sum(float(logits[n - 1 + j, t]) for j, t in enumerate(cand)))
    assert cached == pytest.approx(full, abs=1e-4)


# ----------------------------------------------------------------------------- the runner
_TOK = {}


def _toy_tokenizer():
    if "tok" not in _TOK:
        _TOK["tok"] = train_tokenizer(get_recipe_preset("toy").lm, 0)
    return _TOK["tok"]


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    """A toy model folder as the recipe writes one (random weights, the toy tokenizer),
    with a gated block before every LM layer (so every 2nd layer still leaves one)."""
    tok = _toy_tokenizer()
    cfg = get_recipe_preset("toy").model
    cfg.lm.vocab_size = tok.vocab_size
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.xattn.every = 1
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("abl") / "toy"
    save_pretrained(Flamingo(cfg), folder, tokenizer=tok)
    return folder


@pytest.fixture(scope="module")
def toy_rows(toy_folder):
    backbones = load_backbones(toy_folder)
    nfnet, lm = backbones[:2]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (nfnet, lm)]
    rows = run_ablations(None, preset="toy", steps=3, episodes=2, shots=(0, 1), progress=False,
                         backbones=backbones)
    return rows, before, (nfnet, lm)


def test_every_ablation_runs_with_its_change(toy_rows):
    rows, _, _ = toy_rows
    by = {r.name: r for r in rows}
    assert [r.name for r in rows] == list(ABLATIONS)
    base = by["baseline"]
    for r in rows:
        assert r.steps == 3 and r.train_seconds > 0 and math.isfinite(r.loss_first) and math.isfinite(r.loss_last)
        assert set(r.naming) == {0, 1} and set(r.qa) == {0, 1}
        assert all(0.0 <= v <= 1.0 for v in (*r.naming.values(), *r.qa.values()))
        assert r.score == pytest.approx(r.naming[1])
    # what each change does to the trained parts
    n_blocks = len(base.gates)
    assert n_blocks == 2
    assert by["no_tanh_gating"].gates == {i: (1.0, 1.0) for i in range(n_blocks)}
    assert by["no_tanh_gating"].trainable_parameters == base.trainable_parameters - 2 * n_blocks
    assert by["all_previous_images"].trainable_parameters == base.trainable_parameters
    assert by["mlp_resampler"].trainable_parameters != base.trainable_parameters
    assert len(by["xattn_every_2nd_layer"].gates) == 1
    assert by["xattn_every_2nd_layer"].trainable_parameters < base.trainable_parameters
    assert by["unfrozen_lm"].trainable_parameters > base.trainable_parameters
    assert all(v != 1.0 for g in base.gates.values() for v in g)


def test_ablations_leave_the_backbones_untouched_and_table_prints(toy_rows):
    rows, before, models = toy_rows
    # every row (unfrozen_lm too) trained copies: the shared backbones are bit-identical
    for b, m in zip(before, models):
        after = m.state_dict()
        assert set(b) == set(after) and all(torch.equal(b[k], after[k]) for k in b)
    table = format_table(rows)
    for r in rows:
        assert r.name in table
    assert "vs base" in table and "+0.0" in table.splitlines()[2]


def test_run_ablations_rejects_bad_requests(toy_folder, tmp_path):
    with pytest.raises(ValueError, match="expected ablation names"):
        run_ablations(toy_folder, preset="toy", names=["no_gates"], steps=1, episodes=1, progress=False)
    with pytest.raises(ValueError, match="at least one >= 1"):
        run_ablations(toy_folder, preset="toy", steps=1, episodes=1, shots=(0,), progress=False)
    one_layer = load_backbones(toy_folder)
    one_layer[3].xattn.every = 2  # 2 LM layers: every 4th leaves none
    with pytest.raises(ValueError, match="leaves no block"):
        run_ablations(None, preset="toy", names=["xattn_every_2nd_layer"], steps=1, episodes=1, progress=False,
                      backbones=one_layer)
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_ablations(tmp_path / "nothing", preset="toy", steps=1, episodes=1, progress=False)


def test_cli_ablate_prints_the_table_and_writes_json(toy_folder, tmp_path, capsys):
    out = tmp_path / "abl.json"
    rc = cli.main(["ablate", "--model", str(toy_folder), "--preset", "toy", "--only", "baseline,mlp_resampler",
                   "--steps", "2", "--episodes", "2", "--shots", "0,1", "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mlp_resampler" in text and "name k=1" in text
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["baseline", "mlp_resampler"]
    assert data["meta"]["preset"] == "toy" and data["rows"][0]["steps"] == 2
    assert cli.main(["ablate", "--model", str(toy_folder), "--preset", "toy", "--only", "bogus", "--steps", "1",
                     "--no-progress"]) == 2
    assert "expected ablation names" in capsys.readouterr().err


def test_each_ablation_changes_exactly_its_setting():
    import dataclasses

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    base = get_recipe_preset("tiny-world")
    want = {"baseline": {}, "no_tanh_gating": {"model.xattn.gated": False},
            "all_previous_images": {"model.xattn.all_previous": True},
            "mlp_resampler": {"model.resampler.kind": "mlp"}, "xattn_every_2nd_layer": {"model.xattn.every": 2},
            "unfrozen_lm": {"connectors.freeze_lm": False}}
    assert set(want) == set(ABLATIONS)
    before = flat(dataclasses.asdict(base))
    for name, (_, apply) in ABLATIONS.items():
        cfg = get_recipe_preset("tiny-world")
        apply(cfg)
        after = flat(dataclasses.asdict(cfg))
        assert {k: v for k, v in after.items() if before[k] != v} == want[name], name
