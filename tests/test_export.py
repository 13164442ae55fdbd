"""AOTInductor export (issue 9, Python side): the exported packages, run as the C API host
runs them, give the Python runtime's greedy answers token for token; dynamic chunk lengths
and clip lengths; clear errors for what does not fit."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
from world_fixture import FRAMES, make_world  # noqa: E402

from flamingo_rt import _ext  # noqa: E402
from flamingo_rt.io.pretrained import load_pretrained  # noqa: E402
from flamingo_rt.runtime import GenerationConfig, Generator  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.load(), reason="needs the C++ extension (the packages call its ops)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from flamingo_rt.export import export_model

    root = tmp_path_factory.mktemp("export")
    p = make_world(root / "world")
    model, tok = load_pretrained(p["model"])
    with torch.no_grad():  # open the gates so the media matter
        for i, b in enumerate(model.xattn_blocks()):
            b.attn_gate.fill_(0.8 - 0.3 * i)
            b.ff_gate.fill_(0.5)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        man = export_model(model, root / "out", tokenizer=tok, max_seq_len=96, max_media=4)
    finally:
        torch.set_num_threads(n)
    return model, tok, root / "out", man


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 32, generator=g) for _ in range(n)]


def test_manifest(exported):
    model, tok, out, man = exported
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == man
    assert man["special_tokens"] == {"image": 0, "endofchunk": 1, "pad": 2, "eos": 3}
    assert man["shapes"]["kv_cache"] == [model.config.lm.n_layers, 2, 1, model.config.lm.n_kv_heads, 96,
                                         model.config.lm.head_dim]
    assert man["max_frames"] == FRAMES and man["image_size"] == 32
    assert man["manifest_version"] == 2  # the media encoder takes a batch of media
    assert man["decode_step_fused"] is True  # a CPU export of stock modules decodes through the fused ops
    for pkg in ("encode_media.pt2", "token_step.pt2", "decode_step.pt2", "score_step.pt2"):
        assert (out / pkg).stat().st_size > 0
    assert (out / "tokenizer.json").read_text() == (Path(tok.save(out.parent / "t.json"))).read_text()


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_python_runtime(exported, seed):
    from flamingo_rt.export import ExportedModel

    model, tok, out, _ = exported
    em = ExportedModel(out)
    imgs = _images(3, seed)
    clip = torch.rand(FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 10))
    prompt = [imgs[0], "a red circle.<|endofchunk|>", clip, "a square moves.<|endofchunk|>", imgs[1], "a blue"]
    s = em.session()
    for item in prompt:
        s.append_text(item) if isinstance(item, str) else s.append_media(item)
    got = s.generate(12)
    gen = Generator(model.eval(), tok, max_seq_len=96, max_media=4)
    want = gen.generate(prompt, GenerationConfig(max_new_tokens=12))
    assert got == want and len(want) > 0
    # a second session on the same loaded packages is independent of the first
    s2 = em.session()
    s2.append_media(imgs[2])
    s2.append_text("a")
    assert s2.generate(6) == gen.generate([imgs[2], "a"], GenerationConfig(max_new_tokens=6))


@pytest.mark.parametrize("max_new", [3, 12])
def test_conversation_equals_runtime_session(exported, max_new):
    """Three turns: the answer (its stop token, or its last token at the limit) stays in the
    context as in the runtime's Session, so later turns equal the Session's token for token
    (the stop token and the last token were dropped from the context before)."""
    from flamingo_rt.export import ExportedModel

    model, tok, out, _ = exported
    em = ExportedModel(out)
    imgs = _images(3, 7)
    turns = [[imgs[0], "a red circle.<|endofchunk|>", imgs[1], "a"], [" and", imgs[2], "a"], [" then"]]
    s = em.session()
    ref = Generator(model.eval(), tok, max_seq_len=96, max_media=4).session()
    answers = []
    for items in turns:
        for item in items:
            s.append_text(item) if isinstance(item, str) else s.append_media(item)
        ref.append(*items)
        answers.append(s.generate(max_new))
        assert answers[-1] == ref.generate(max_new_tokens=max_new)
        assert s.pos + len(s.pending) == len(ref.token_ids)  # the same context, answers included
    assert any(answers)


def test_prefilled_support_set_forks_per_query(exported):
    """prefill + fork (flamingo_session_prefill / _fork): a support set run once, a fork per
    query; each fork's answer equals the runtime's on the whole prompt, the original stays."""
    from flamingo_rt.export import ExportedModel

    model, tok, out, _ = exported
    em = ExportedModel(out)
    imgs = _images(3, 11)
    gen = Generator(model.eval(), tok, max_seq_len=96, max_media=4)
    support = em.session()
    support.append_media(imgs[0])
    support.append_text("a red circle.<|endofchunk|>")
    support.prefill()
    assert support.pending == [] and support.pos > 0
    held = support.pos
    for q, text in ((imgs[1], "a"), (imgs[2], "the")):
        f = support.fork()
        f.append_media(q)
        f.append_text(text)
        want = gen.generate([imgs[0], "a red circle.<|endofchunk|>", q, text], GenerationConfig(max_new_tokens=8))
        assert f.generate(8) == want
    assert support.pos == held and support.num_media == 1 and support.pending == []


def test_score_equals_runtime_and_keeps_the_context(exported):
    """score (flamingo_session_score): the candidates' log-likelihoods equal Generator.score's;
    the context is unchanged (the next answer is a non-scoring session's); clear errors."""
    from flamingo_rt.export import ExportedModel

    model, tok, out, _ = exported
    em = ExportedModel(out)
    imgs = _images(2, 13)
    prompt = [imgs[0], "a red circle.<|endofchunk|>", imgs[1], "a"]
    cands = ["a red circle.", " blue", "a", " green star."]
    gen = Generator(model.eval(), tok, max_seq_len=96, max_media=4)
    s, plain = em.session(), em.session()
    for x in (s, plain):
        for item in prompt:
            x.append_text(item) if isinstance(item, str) else x.append_media(item)
    got = s.score(cands)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(gen.score(prompt, cands)), rtol=1e-4, atol=1e-3)
    assert s.score(cands[:2]) == pytest.approx(got[:2], abs=1e-5)
    # packed by the score step (all in one run, or one candidate a run) or, for an export made
    # without one, a token at a time through the decode step: the same scores
    assert s.score(cands, max_pack_tokens=1) == pytest.approx(got, abs=1e-4)
    em.score, packed = None, em.score
    try:
        assert s.score(cands) == pytest.approx(got, abs=1e-4)
    finally:
        em.score = packed
    assert s.generate(6) == plain.generate(6)
    with pytest.raises(ValueError, match="non-empty"):
        s.score([""])
    with pytest.raises(TypeError, match="got a str"):
        s.score("a red circle.")
    with pytest.raises(ValueError, match="<image>"):
        s.score(["x <image>"])
    with pytest.raises(ValueError, match="nothing was scored"):
        s.score(["a" + " a" * 96])
    with pytest.raises(ValueError, match="nothing to score after"):
        em.session().score(["a"])


def test_media_are_encoded_together_at_the_run(exported):
    """Appended media are queued and encoded at the next run, in runs of consecutive media
    with one frame count (one encoder call each: a few-shot prompt's images in one batch);
    the answer equals the runtime's, each medium's keys/values lie in its slot. The batched
    encoder equals one medium a call. A failed
    encoder call keeps the media queued (a retry equals a session where it never failed);
    a fork encodes its own copy of the queue."""
    from flamingo_rt.export import ExportedModel

    model, tok, out, _ = exported
    em = ExportedModel(out)
    imgs = _images(3, 19)
    clip = torch.rand(FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(20))
    prompt = [imgs[0], "a red circle.<|endofchunk|>", clip, "a square.<|endofchunk|>", imgs[1], imgs[2], "a"]
    real, calls = em.encode, []

    def counting(px):
        calls.append(tuple(px.shape[:2]))
        return real(px)

    em.encode = counting
    s = em.session()
    for item in prompt:
        s.append_text(item) if isinstance(item, str) else s.append_media(item)
    assert calls == [] and len(s.queued_media) == 4 and s.num_media == 4  # nothing encoded at append
    f = s.fork()
    got = s.generate(10)
    assert calls == [(1, 1), (1, FRAMES), (2, 1)] and s.queued_media == []
    gen = Generator(model.eval(), tok, max_seq_len=96, max_media=4)
    want = gen.generate(prompt, GenerationConfig(max_new_tokens=10))
    assert got == want and len(want) > 0
    assert len(f.queued_media) == 4 and f.generate(10) == want  # the fork encodes its own queue
    # each slot holds its medium's keys/values: a session that runs after every append
    # (one medium a call) has the same media cache
    em.encode = real
    one = em.session()
    for item in prompt:
        one.append_text(item) if isinstance(item, str) else one.append_media(item)
        one.prefill()
    torch.testing.assert_close(s.media[:, :, :, :4], one.media[:, :, :, :4], rtol=1e-4, atol=1e-5)
    assert one.generate(10) == want
    # the batched encoder against one medium a call (the vision encoder's batch changes the
    # order of its sums only)
    px = torch.randn(3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    torch.testing.assert_close(real(px), torch.cat([real(px[k:k + 1]) for k in range(3)], dim=2),
                               rtol=1e-4, atol=1e-5)

    # a failed encoder call: the media stay queued; the retry equals an unbroken session
    def broken(px):
        raise RuntimeError("the encoder failed")

    a, b = em.session(), em.session()
    for x in (a, b):
        x.append_media(imgs[0])
        x.append_text("a")
    em.encode = broken
    with pytest.raises(RuntimeError, match="the encoder failed"):
        a.prefill()
    em.encode = real
    assert len(a.queued_media) == 1 and (a.pos, a.pending) == (b.pos, b.pending)
    assert a.generate(8) == b.generate(8)


def test_decode_step_takes_beam_rows(exported):
    """The decode package takes B rows at one position (a host's beams, B <= max_beams): each
    row's logits and written cache slot equal the one-row step's."""
    from flamingo_rt.export import ExportedModel
    from flamingo_rt.export.package import decode_row_shape

    _, _, out, man = exported
    assert man["max_beams"] == 8
    em = ExportedModel(out)
    sh = man["shapes"]
    g = torch.Generator().manual_seed(23)
    B = 3
    kv = torch.randn([B, *decode_row_shape(sh["kv_cache"])], generator=g)  # rows-first (B, n_layers, 2, ...)
    mc = torch.randn([B, *decode_row_shape(sh["media_cache"])], generator=g)
    ids = torch.randint(4, 40, (B, 1), generator=g)
    start = torch.tensor([7])
    index = torch.tensor([[0], [2], [-1]], dtype=torch.int32)
    kv_rows = kv.clone()
    logits = em.decode(ids, start, index, kv_rows, mc)
    assert logits.shape == (B, man["vocab_size"])
    for b in range(B):
        kv1 = kv[b:b + 1].clone()
        one = em.decode(ids[b:b + 1], start, index[b:b + 1], kv1, mc[b:b + 1])
        torch.testing.assert_close(logits[b:b + 1], one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kv_rows[b:b + 1], kv1, rtol=1e-6, atol=1e-6)
    # every layer's keys/values land in that layer's slots (AOTInductor once dropped the
    # offsets of views into a dynamic-batch cache: all layers wrote into layer 0)
    assert all(not torch.equal(kv_rows[:, i, :, :, 7], kv[:, i, :, :, 7]) for i in range(kv.shape[1]))
    assert torch.equal(kv_rows[:, :, :, :, :7], kv[:, :, :, :, :7]) and torch.equal(kv_rows[:, :, :, :, 8:], kv[:, :, :, :, 8:])


def test_failed_step_commits_nothing(exported):
    """A step that fails (here: the package raises) leaves the queued tokens, the position
    and the image count as they were, so a retry equals a session where it never failed
    (the image count was advanced before the step ran, shifting every later media index)."""
    from flamingo_rt.export import ExportedModel

    _, _, out, _ = exported
    em = ExportedModel(out)
    imgs = _images(2, 17)
    s, ref = em.session(), em.session()
    for x in (s, ref):
        x.append_media(imgs[0])
        x.append_text("a red circle.<|endofchunk|>")
        x.prefill()
        x.append_media(imgs[1])
        x.append_text("a")
    real = em.step

    def broken(*args):
        raise RuntimeError("the package failed")

    em.step = broken
    with pytest.raises(RuntimeError, match="the package failed"):
        s.prefill()
    em.step = real
    assert (s.pos, s.seen_images, s.pending) == (ref.pos, ref.seen_images, ref.pending)
    assert s.generate(8) == ref.generate(8)


def test_chunked_prefill_equals_one_chunk(exported):
    from flamingo_rt.export import ExportedModel

    _, tok, out, _ = exported
    em = ExportedModel(out)
    img = _images(1, 5)[0]
    a = em.session()
    a.append_media(img)
    a.append_text("a small green star.")
    la = a._flush().clone()
    b = em.session()
    b.append_media(img)
    b._flush()
    for piece in ("a small", " green", " star."):  # chunks of several sizes, incl. 1 token
        b.append_text(piece)
        lb = b._flush()
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-5)


def test_errors(exported):
    from flamingo_rt.export import ExportedModel

    _, _, out, _ = exported
    em = ExportedModel(out)
    s = em.session()
    for im in _images(4, 3):
        s.append_media(im)
    with pytest.raises(ValueError, match="max_media = 4"):
        s.append_media(_images(1, 4)[0])
    s = em.session()
    s.append_text("a b")
    held = s.pos + len(s.pending)
    with pytest.raises(ValueError, match="max_seq_len = 96 \\(nothing was appended\\)"):
        s.append_text("a " * 200)
    assert s.pos + len(s.pending) == held
    assert s.generate(2) is not None  # the session goes on
    s.append_text(" a" * (96 - s.pos - len(s.pending)))
    with pytest.raises(ValueError, match="<image> token needs 1"):
        s.append_media(_images(1, 4)[0])
    s = em.session()
    s.append_media(_images(1, 4)[0])
    s.prefill()  # the medium is encoded at the run
    s.append_text("a")
    s.media.fill_(float("nan"))  # a NaN in the model: the logits are NaN
    with pytest.raises(FloatingPointError, match="logits are NaN"):
        s.generate(2)
    with pytest.raises(ValueError, match="at most 3"):
        em.session().append_media(torch.rand(FRAMES + 1, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ExportedModel(out.parent)
    v1 = out.parent / "version_1"
    v1.mkdir(exist_ok=True)
    (v1 / "manifest.json").write_text(json.dumps(dict(json.loads((out / "manifest.json").read_text()),
                                                      manifest_version=1)))
    with pytest.raises(ValueError, match="expected manifest_version 2, got 1.*re-export"):
        ExportedModel(v1)
    other = out.parent / "other_torch"
    other.mkdir(exist_ok=True)
    man = json.loads((out / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(dict(man, torch_version="1.13.1")))
    with pytest.raises(ValueError, match="exported with torch 1.13.1, but this is torch .*re-export"):
        ExportedModel(other)
    with pytest.raises(ValueError, match="nothing to generate"):
        em.session().generate(2)
    with pytest.raises(ValueError, match="<image>"):
        em.session().append_text("a <image> b")
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.generate(0)


def test_cli_export_rejects_a_non_model_folder(tmp_path, capsys):
    from flamingo_rt import cli

    assert cli.main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_exported_graphs_call_no_python_op(exported):
    """Every package calls only aten ops and C++ ops (flamingo_rt_C), never a Python-defined
    flamingo_rt op (a C++ host could not run it); the export refuses such a graph."""
    import types

    from flamingo_rt.export.package import _check_no_python_ops

    fake = types.SimpleNamespace(graph=types.SimpleNamespace(nodes=[types.SimpleNamespace(
        op="call_function", target=torch.ops.flamingo_rt.image_causal_attention.default)]))
    with pytest.raises(RuntimeError, match="Python-defined ops"):
        _check_no_python_ops(fake, "x.pt2")


def test_smallest_sizes_export(tmp_path, monkeypatch, max_seq_len=1, max_frames=1):
    """max_seq_len = 1 and max_frames = 1 export static shapes (a torch.export.Dim needs
    min < max; both crashed with an AssertionError from torch). The exported programs
    (AOTInductor compile skipped) equal the eager step modules."""
    from flamingo_rt.export import package
    from flamingo_rt.export.modules import DecodeStep, MediaEncoderStep, ScoreStep, TokenStep

    programs = {}
    monkeypatch.setattr(package, "_compile", lambda ep, path: programs.setdefault(path.name, ep) and 0.0)
    p = make_world(tmp_path / "world")
    model, tok = load_pretrained(p["model"])
    man = package.export_model(model, tmp_path / "out", tokenizer=tok, max_seq_len=max_seq_len, max_media=1,
                               max_frames=max_frames)
    assert (man["max_seq_len"], man["max_frames"]) == (max_seq_len, max_frames)
    assert sorted(programs) == ["decode_step.pt2", "encode_media.pt2", "score_step.pt2", "token_step.pt2"]
    g = torch.Generator().manual_seed(0)
    # the decode step takes B rows (a host's beams, up to max_beams = 8): each row its one-row step
    shapes = package.cache_shapes(model, max_seq_len, 1)
    g = torch.Generator().manual_seed(1)
    B = 3
    kv = torch.randn([B, *package.decode_row_shape(shapes["kv_cache"])], generator=g)
    mc = torch.randn([B, *package.decode_row_shape(shapes["media_cache"])], generator=g)
    ids, index = torch.randint(4, 40, (B, 1), generator=g), torch.tensor([[0], [-1], [0]], dtype=torch.int32)
    with torch.no_grad():
        rows = programs["decode_step.pt2"].module()(ids, torch.zeros(1, dtype=torch.long), index, kv.clone(), mc)
        for b in range(B):
            one = DecodeStep(model)(ids[b:b + 1], torch.zeros(1, dtype=torch.long), index[b:b + 1],
                                    kv[b:b + 1].clone(), mc[b:b + 1])
            torch.testing.assert_close(rows[b:b + 1], one)
    with torch.no_grad():
        for f in range(1, max_frames + 1):
            px = torch.randn(1, f, 3, 32, 32, generator=g)
            torch.testing.assert_close(programs["encode_media.pt2"].module()(px), MediaEncoderStep(model)(px))
        shapes = package.cache_shapes(model, max_seq_len, 1)
        for t in range(1, max_seq_len + 1):
            ids = torch.randint(4, 40, (1, t), generator=g)
            args = (torch.zeros(1, dtype=torch.long), torch.full((1, t), -1, dtype=torch.int32))
            kv_a, kv_b = torch.zeros(shapes["kv_cache"]), torch.zeros(shapes["kv_cache"])
            mc = torch.zeros(shapes["media_cache"])
            out = programs["token_step.pt2"].module()(ids, *args, kv_a, mc)
            ref = TokenStep(model)(ids, *args, kv_b, mc)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(kv_a, kv_b)
            offset = torch.arange(t)[None]
            out = programs["score_step.pt2"].module()(ids, args[0], offset, args[1], kv_a, mc)
            torch.testing.assert_close(out, ScoreStep(model)(ids, args[0], offset, args[1], kv_b, mc))


@pytest.mark.parametrize("kw,match", [({"max_frames": 0}, "max_frames"), ({"max_frames": 2.5}, "max_frames"),
                                      ({"max_beams": 0}, "max_beams"),
                                      ({"max_media": "4"}, "max_media"), ({"max_seq_len": 0}, "max_seq_len")])
def test_export_refuses_bad_sizes(tmp_path, kw, match):
    """max_frames = 0 silently meant the default, -1 failed inside torch.export."""
    from flamingo_rt.export import export_model

    p = make_world(tmp_path / "world")
    model, tok = load_pretrained(p["model"])
    with pytest.raises(ValueError, match=match):
        export_model(model, tmp_path / "out", tokenizer=tok, **kw)


def _fused_calls(ep) -> dict:
    """Counts of the fused decode ops an exported graph calls (directly, or wrapped by
    export's functionalization as auto_functionalized(op, ...))."""
    counts = {"decoder_layer_step_": 0, "xattn_block_step_": 0}
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        targets = [n.target] + [a for a in n.args if hasattr(a, "_schema")]
        for t in targets:
            name = str(t)
            for op in counts:
                if f"flamingo_rt_C.{op}" in name:
                    counts[op] += 1
    return counts


@pytest.mark.parametrize("fused,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_decode_step_runs_the_fused_ops(tmp_path, monkeypatch, fused, dtype):
    """On the CPU the exported decode step runs its layers as the fused decode ops (one call
    per decoder layer and per block, as the Python runtime decodes) unless the fused path is
    off; either way it equals the token step through the modules: the logits and the keys /
    values it writes, over steps that see no image, then media slot 0, then slot 1, with the media
    slots a token may not read filled with values that would show; in bfloat16 bit for bit
    (the exported graph, run eagerly, rounds where the modules round)."""
    from flamingo_rt.export import package
    from flamingo_rt.export.modules import TokenStep
    from flamingo_rt.runtime import fused_decode

    programs = {}
    monkeypatch.setattr(package, "_compile", lambda ep, path: programs.setdefault(path.name, ep) and 0.0)
    p = make_world(tmp_path / "world")
    model, tok = load_pretrained(p["model"])
    model = model.to(dtype)
    with torch.no_grad():
        for i, b in enumerate(model.xattn_blocks()):
            b.attn_gate.fill_(0.8 - 0.3 * i)
            b.ff_gate.fill_(0.5)
    with fused_decode.disabled() if not fused else contextlib.nullcontext():
        man = package.export_model(model, tmp_path / "out", tokenizer=tok, max_seq_len=24, max_media=3)
    assert man["decode_step_fused"] is fused
    calls = _fused_calls(programs["decode_step.pt2"])
    n_layers, n_blocks = model.config.lm.n_layers, len(model.lm.xattn)
    assert calls == ({"decoder_layer_step_": n_layers, "xattn_block_step_": n_blocks} if fused
                     else {"decoder_layer_step_": 0, "xattn_block_step_": 0})
    assert _fused_calls(programs["token_step.pt2"])["decoder_layer_step_"] == 0
    g = torch.Generator().manual_seed(1)
    shapes = package.cache_shapes(model, 24, 3)
    kv_a = torch.randn(shapes["kv_cache"], generator=g).to(dtype)
    kv_b = kv_a.clone()
    mc = torch.randn(shapes["media_cache"], generator=g).to(dtype)  # slot 2 never indexed: would show if read
    tol = 1e-5 if dtype == torch.float32 else 0  # bf16: the fused ops round where the modules do
    decode, ref = programs["decode_step.pt2"].module(), TokenStep(model).eval()
    with torch.no_grad():
        for start, m in [(3, -1), (4, 0), (9, 0), (10, 1), (17, 1)]:
            ids = torch.randint(4, 40, (1, 1), generator=g)
            args = (ids, torch.tensor([start]), torch.tensor([[m]], dtype=torch.int32))
            out = decode(*args, kv_a.squeeze(2)[None], mc.squeeze(2)[None])  # rows-first: one row, in place
            want = ref(*args, kv_b, mc)
            torch.testing.assert_close(out, want, rtol=tol, atol=tol)
            torch.testing.assert_close(kv_a, kv_b, rtol=tol, atol=tol)
        # the step reads image m's keys/values: another image's there changes the logits
        mc2 = mc.clone()
        mc2[:, :, :, 1] = mc[:, :, :, 0]
        assert not torch.allclose(decode(*args, kv_a.squeeze(2)[None].clone(), mc2.squeeze(2)[None]),
                                  decode(*args, kv_a.squeeze(2)[None].clone(), mc.squeeze(2)[None]))
