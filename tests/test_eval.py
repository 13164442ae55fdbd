"""flamingo_rt.eval on a random tiny model: RICES picks the truly nearest pool items by
vision features (computed once), the runner asks the right queries and scores them the
right way round (oracle / anti-oracle generators), complete tables and JSON, determinism
under the seed, prompts that do not fit, the ``flamingo-rt eval`` command."""
from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flamingo_rt import cli
from flamingo_rt.eval import (
    EvalResults, RicesIndex, TaskSuite, build_prompt, cider_d_scores, draw_episode, evaluate, pooled_features,
    random_support,
)
from flamingo_rt.eval.runner import _references
from flamingo_rt.runtime import Generator
from flamingo_rt.runtime.prompt import preprocess_media
from flamingo_rt.world import few_shot_episode, render_clip, render_scene, sample_clip, sample_scene
from world_models import tiny_world_model


pytestmark = pytest.mark.usefixtures("one_torch_thread", "malloc_calls")  # (the CLI tunes malloc)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_world_model(tmp_path_factory.mktemp("eval") / "tiny")


@pytest.fixture(scope="module")
def gen(model_dir):
    return Generator.from_pretrained(model_dir, max_media=41)


def _brute_features(model, media):
    """Pooled features the long way: encoder per medium, mean over cells and frames, unit norm."""
    out = []
    with torch.no_grad():
        for m in media:
            x = preprocess_media(m, model.config.vision)
            out.append(model.vision_encoder(x).mean(1).mean(0))
    return F.normalize(torch.stack(out), dim=-1)


def test_rices_selects_the_truly_nearest_and_encodes_the_pool_once(gen):
    g = np.random.default_rng(0)
    pool = [render_scene(sample_scene(g, "train"), 64) for _ in range(12)]
    query = render_scene(sample_scene(g, "train"), 64)
    want_sim = _brute_features(gen.model, pool) @ _brute_features(gen.model, [query])[0]
    top = [int(i) for i in torch.argsort(want_sim, descending=True)]
    calls = []
    hook = gen.model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        index = RicesIndex(gen.model, pool, labels=[i % 2 for i in range(12)])
        assert len(calls) == 1  # the whole pool in one batch, once
        assert torch.allclose(index.similarities(query), want_sim, atol=1e-5)
        assert index.select(query, 3) == top[:3][::-1]  # most similar last
        per_class = index.select(query, 2, per_class=True)
        assert sorted(per_class) == sorted([i for i in top if i % 2 == 0][:2] + [i for i in top if i % 2 == 1][:2])
        assert per_class == sorted(per_class, key=lambda i: float(want_sim[i]))
        assert len(calls) == 1 + 3  # later selections encode only the query
        # a copy of a pool image is its own nearest neighbour, right before the query
        assert index.select(pool[7].clone(), 4)[-1] == 7
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="expected k <= pool size 12, got 13"):
        index.select(query, 13)


def test_pooled_features_of_a_clip_average_its_frames(gen):
    clip = render_clip(sample_clip(np.random.default_rng(1), "train", 4), 64)  # (4, 3, 64, 64)
    f = pooled_features(gen.model, [clip, clip[0]])
    assert f.shape == (2, gen.model.config.vision.width) and f.dtype == torch.float32
    with torch.no_grad():
        per_frame = gen.model.vision_encoder(preprocess_media(clip, gen.model.config.vision)).mean(1)
    assert torch.allclose(f[0], F.normalize(per_frame.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(f.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_random_support_is_seeded_and_balanced():
    labels = [c for c in range(5) for _ in range(4)]
    a = random_support(np.random.default_rng(3), 20, 2, labels)
    assert a == random_support(np.random.default_rng(3), 20, 2, labels)
    assert Counter(labels[i] for i in a) == {c: 2 for c in range(5)}
    assert random_support(np.random.default_rng(3), 20, 2, labels) != random_support(np.random.default_rng(4), 20, 2, labels)
    assert sorted(random_support(np.random.default_rng(0), 6, 6)) == list(range(6))
    with pytest.raises(ValueError, match="expected k <= 4 pool items of class 0, got 5"):
        random_support(np.random.default_rng(0), 20, 5, labels)


def test_build_prompt_has_the_world_episode_layout():
    ep = few_shot_episode("qa", 3, 5, "heldout")
    p = build_prompt(ep, range(3))
    assert [x for x in p if isinstance(x, str)] == [x for x in ep.prompt if isinstance(x, str)]
    assert all(a is b for a, b in zip([x for x in p if not isinstance(x, str)], [x for x in ep.prompt if not isinstance(x, str)]))
    assert build_prompt(ep, []) == [ep.query, ep.query_prefix]


class _Oracle(Generator):
    """Knows every query's answer (looked up by the query image); ``wrong`` inverts it."""

    def __init__(self, base: Generator, answers: dict, wrong: bool = False):
        super().__init__(base.model, base.tok, max_media=base.max_media)
        self.answers, self.wrong = answers, wrong

    def _answer(self, prompt):
        return self.answers[hashlib.sha1(self.encode(prompt).media[-1].numpy().tobytes()).hexdigest()]

    def score_batch(self, prompts, candidates, prefix=None):
        assert len(prompts) == len(candidates) and len(prompts) > 1, "the runner scores its queries as one batch"
        return [[float((c.strip() == self._answer(p)) != self.wrong) for c in cands]
                for p, cands in zip(prompts, candidates)]

    def generate(self, prompts, config=None, prefix=None, **kwargs):
        return [" zzz" if self.wrong else " " + self._answer(p) for p in prompts]


def test_runner_asks_the_right_queries_and_scores_the_right_way_round(gen):
    suite = TaskSuite(tasks=("classify", "qa.colour", "caption"), shots=(0, 1, 2), episodes=3, seed=5)
    vision = gen.model.config.vision
    answers, eps = {}, {}
    for task in suite.tasks:
        for i in range(suite.episodes):
            ep = eps[task, i] = draw_episode(suite, task, i)
            answers[hashlib.sha1(preprocess_media(ep.query, vision).numpy().tobytes()).hexdigest()] = ep.answer
    right = evaluate(_Oracle(gen, answers), suite)
    wrong = evaluate(_Oracle(gen, answers, wrong=True), suite)
    perfect_cider = float(np.mean(cider_d_scores(
        [eps["caption", i].answer for i in range(3)], [_references(suite, eps["caption", i], i) for i in range(3)])))
    assert perfect_cider > 1.0
    for k in suite.shots:
        assert right.score("classify", k) == 1.0 and wrong.score("classify", k) == 0.0
        for m in ("vqa_accuracy", "exact_match", "ranked_accuracy"):
            assert right.score("qa.colour", k, m) == 1.0 and wrong.score("qa.colour", k, m) == 0.0
        assert right.score("caption", k) == pytest.approx(perfect_cider) and wrong.score("caption", k) == 0.0


def test_runner_complete_table_and_json(gen, tmp_path):
    suite = TaskSuite(tasks=("classify", "qa", "caption", "video_qa"), shots=(0, 1, 2), episodes=2, seed=1)
    res = evaluate(gen, suite)
    rows = [("classify", "accuracy"), ("qa", "vqa_accuracy"), ("qa", "exact_match"), ("qa", "ranked_accuracy"),
            ("caption", "cider"), ("video_qa", "vqa_accuracy"), ("video_qa", "exact_match"),
            ("video_qa", "ranked_accuracy")]
    assert res.rows() == rows
    for task, metric in rows:
        for k in suite.shots:
            c = next(c for c in res.cells if (c.task, c.metric, c.shots) == (task, metric, k))
            assert c.n == 2 and c.skipped is None and 0.0 <= c.score
            recs = [r for r in res.records if r["task"] == task and r["shots"] == k]
            assert c.score == pytest.approx(np.mean([r[metric] for r in recs]))
    assert len(res.records) == 4 * 2 * 3
    # classify: k examples of each class, the prediction is the best-scored candidate
    for r in (r for r in res.records if r["task"] == "classify"):
        ep = draw_episode(suite, "classify", r["episode"])
        assert Counter(ep.meta["support_classes"][j] for j in r["support"]) == (
            {c: r["shots"] for c in range(5)} if r["shots"] else {})
    r = next(r for r in res.records if r["task"] == "classify" and r["shots"] == 2)
    ep = draw_episode(suite, "classify", r["episode"])
    scores = gen.score(build_prompt(ep, r["support"]), [" " + c for c in ep.candidates])
    # (scored as a batch: the scores of score() on the query alone, up to float rounding)
    assert r["scores"] == pytest.approx(scores, rel=0, abs=1e-4)
    assert r["prediction"] == ep.candidates[int(np.argmax(r["scores"]))]
    # QA: the generated answer, and the answer set ranked the same way (chance: 1 / answers)
    for task in ("qa", "video_qa"):
        r = next(r for r in res.records if r["task"] == task and r["shots"] == 1)
        ep = draw_episode(suite, task, r["episode"])
        assert r["candidates"] == list(ep.candidates) and ep.answer in r["candidates"]
        scores = gen.score(build_prompt(ep, r["support"]), [" " + c for c in ep.candidates])
        assert r["scores"] == pytest.approx(scores, rel=0, abs=1e-4)
        assert r["ranked_prediction"] == ep.candidates[int(np.argmax(r["scores"]))]
        assert r["ranked_accuracy"] == float(r["ranked_prediction"] == ep.answer)
        cell = next(c for c in res.cells if (c.task, c.metric, c.shots) == (task, "ranked_accuracy", 1))
        recs = [x for x in res.records if x["task"] == task and x["shots"] == 1]
        assert cell.chance == pytest.approx(np.mean([1 / len(x["candidates"]) for x in recs]))
        assert next(c for c in res.cells if (c.task, c.metric, c.shots) == (task, "exact_match", 1)).chance is None
    table = res.table()
    for word in ("classify (5-way)", "qa", "caption", "video_qa", "CIDEr", "VQA acc", "ranked acc", "0-shot", "2-shot",
                 "20.0"):
        assert word in table
    path = res.save_json(tmp_path / "r" / "eval.json")
    back = EvalResults.from_dict(json.loads(path.read_text()))
    assert back.cells == res.cells and back.records == res.records and back.suite["split"] == "heldout"


def test_evaluation_is_deterministic_under_the_seed(gen):
    suite = TaskSuite(tasks=("classify", "qa"), shots=(0, 2), episodes=2, seed=11, selection="rices")
    a, b = evaluate(gen, suite).to_dict(), evaluate(gen, suite).to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    c = evaluate(gen, TaskSuite(tasks=("classify", "qa"), shots=(0, 2), episodes=2, seed=12)).to_dict()
    assert [r["answer"] for r in c["records"]] != [r["answer"] for r in a["records"]]


def test_runner_encodes_each_support_image_once_per_batch(gen, monkeypatch):
    """The runner encodes a batch of queries' media once across its shot counts (a
    media_memo per batch): the same records as encoding every prompt's media, with as many
    frames encoded as the batch has distinct media."""
    import contextlib

    suite = TaskSuite(tasks=("classify",), shots=(0, 1, 2), episodes=2, seed=3)
    n0 = gen.vision_calls
    a = evaluate(gen, suite).to_dict()
    memo_frames = gen.vision_calls - n0
    eps = [draw_episode(suite, "classify", i) for i in range(2)]
    used = {(i, j) for r in a["records"] for i, j in [(r["episode"], j) for j in r["support"]]}
    distinct = len(used) + len(eps)  # the support images used, and each query image
    assert memo_frames == distinct
    monkeypatch.setattr(Generator, "media_memo", lambda self, max_items=4096: contextlib.nullcontext())
    n0 = gen.vision_calls
    b = evaluate(gen, suite).to_dict()
    assert gen.vision_calls - n0 == sum(len(r["support"]) + 1 for r in b["records"]) > memo_frames
    a.pop("seconds"), b.pop("seconds")
    for ra, rb in zip(a["records"], b["records"]):
        assert ra["prediction"] == rb["prediction"]
        assert ra["scores"] == pytest.approx(rb["scores"], rel=0, abs=1e-4)


def test_runner_rices_support_is_the_nearest_of_each_class(gen):
    suite = TaskSuite(tasks=("classify",), shots=(1, 2), episodes=1, seed=2, n_way=3, selection="rices")
    assert suite.pool_size == 8
    res = evaluate(gen, suite)
    ep = draw_episode(suite, "classify", 0)
    assert len(ep.support) == 3 * 8
    index = RicesIndex(gen.model, [m for m, _ in ep.support], ep.meta["support_classes"])
    for r in res.records:
        assert r["support"] == index.select(ep.query, r["shots"], per_class=True)


def test_prompts_that_do_not_fit_are_reported_not_truncated(gen):
    short = Generator(gen.model, gen.tok, max_seq_len=48, max_media=41)
    res = evaluate(short, TaskSuite(tasks=("classify",), shots=(0, 4), episodes=2))
    assert res.score("classify", 0) is not None and res.score("classify", 4) is None
    cell = next(c for c in res.cells if c.shots == 4)
    assert cell.n == 0 and "the model's context is 48" in cell.skipped
    assert "n/a" in res.table() and "context is 48" in res.table()
    assert all(r["shots"] == 0 for r in res.records)


def test_suite_errors_say_expected_and_got():
    with pytest.raises(ValueError, match="expected tasks from .* got 'nope'"):
        TaskSuite(tasks=("nope",))
    with pytest.raises(ValueError, match="expected pool >= the largest shot count 8, got 4"):
        TaskSuite(pool=4)
    with pytest.raises(ValueError, match="expected selection in"):
        TaskSuite(selection="nearest")
    assert TaskSuite().split == "heldout" and TaskSuite().shots == (0, 1, 2, 4, 8)
    # one task or shot count alone ("caption" was iterated as 'c', 'a', ... and refused as 'c')
    one = TaskSuite(tasks="caption", shots=2)
    assert one.tasks == ("caption",) and one.shots == (2,)


def test_cli_eval(model_dir, tmp_path, capsys, malloc_calls):
    out, png = tmp_path / "e.json", tmp_path / "curve.png"
    rc = cli.main(["eval", str(model_dir), "--tasks", "classify,qa", "caption", "--shots", "0,1", "--episodes", "2",
                   "--json", str(out), "--plot", str(png), "--no-progress", "--threads", "1", "--seed", "3",
                   "--batch-size", "1", "--num-beams", "2", "--length-penalty", "0.5"])
    assert rc == 0
    assert malloc_calls == [1]  # the malloc tuning, unless --default-malloc
    printed = capsys.readouterr().out
    assert "classify (5-way)" in printed and "1-shot" in printed and str(out) in printed
    d = json.loads(out.read_text())
    assert {(c["task"], c["shots"]) for c in d["cells"]} == {(t, k) for t in ("classify", "qa", "caption") for k in (0, 1)}
    assert d["suite"]["seed"] == 3 and d["suite"]["batch_size"] == 1 and len(d["records"]) == 3 * 2 * 2
    assert (d["suite"]["num_beams"], d["suite"]["length_penalty"]) == (2, 0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["eval", str(tmp_path / "nothing"), "--no-progress", "--default-malloc"]) == 2
    assert malloc_calls == [1]
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", str(model_dir), "--shots", "0,x"])


@pytest.mark.parametrize("num_beams,length_penalty", [(1, 0.0), (2, 0.0), (2, 2.0)])
def test_open_ended_answers_are_the_generators_greedy_or_beam_output(gen, num_beams, length_penalty):
    """Answers are the generator's (beam search with the suite's length penalty: 0 by
    default, as open_flamingo's evaluation)."""
    suite = TaskSuite(tasks=("qa", "caption"), shots=(1,), episodes=2, num_beams=num_beams, seed=3,
                      length_penalty=length_penalty)
    res = evaluate(gen, suite)
    for r in res.records:
        ep = draw_episode(suite, r["task"], r["episode"])
        limit = suite.max_new_tokens_caption if r["task"] == "caption" else suite.max_new_tokens_answer
        want = gen.generate(build_prompt(ep, r["support"]), max_new_tokens=limit, num_beams=num_beams,
                            length_penalty=length_penalty)
        assert r["prediction"] == want.strip()
    assert TaskSuite().length_penalty == 0.0
