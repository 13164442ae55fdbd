"""The demo end to end on a random tiny model folder (PNGs, streamed answers, the table,
eval.json, the curve), terminal pictures, the missing-model message and exit code; and,
once the shipped model is in the repo, its 5-way 2-shot accuracy on the demo's episodes."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo_rt import cli, demo
from flamingo_rt.eval import evaluate
from flamingo_rt.runtime import Generator
from flamingo_rt.termimage import render, supports_color, to_rgb8
from world_models import tiny_world_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_world_model(tmp_path_factory.mktemp("demo") / "tiny", seed=1)


def test_demo_end_to_end_on_a_random_tiny_model(model_dir, tmp_path, capsys, monkeypatch):
    streamed = []
    real_stream = Generator.stream

    def spy(self, prompt, *a, **kw):
        pieces = []
        streamed.append(pieces)
        for p in real_stream(self, prompt, *a, **kw):
            pieces.append(p)
            yield p

    monkeypatch.setattr(Generator, "stream", spy)
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--model", str(model_dir), "--out", str(out), "--episodes", "1", "--color", "never",
                   "--seed", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "\x1b[" not in printed  # no colour asked
    # the shown prompts: pictures as PNGs, answers streamed, equal to greedy generation
    gen = Generator.from_pretrained(model_dir, max_media=41)
    shown = demo.demo_episodes(seed=4)
    assert len(streamed) == len(shown) == 4
    for n, ((title, ep, limit), pieces) in enumerate(zip(shown, streamed), 1):
        files = sorted(out.glob(f"prompt{n}_*.png"))
        assert len(files) == len(ep.support) + 1
        img = Image.open(out / f"prompt{n}_query.png")
        q = ep.query
        frames = q.shape[0] if q.dim() == 4 else 1
        assert img.size[1] == 2 * q.shape[-2] and img.size[0] == 2 * (frames * q.shape[-1] + 2 * (frames - 1))
        want = gen.generate(ep.prompt, max_new_tokens=limit)
        assert "".join(pieces) == want
        assert title in printed and f"query: {ep.query_prefix}{want}\n  expected: {ep.answer}" in printed
    # the evaluation: every task at 0, 1, 2, 4, 8 shots, in the table, the JSON and the curve
    d = json.loads((out / "eval.json").read_text())
    cells = {(c["task"], c["shots"]) for c in d["cells"] if c["score"] is not None and c["n"] == 1}
    assert cells == {(t, k) for t in demo.EVAL_TASKS for k in (0, 1, 2, 4, 8)}
    assert d["suite"]["split"] == "heldout" and d["suite"]["n_way"] == 5
    for word in ("classify (5-way)", "video_qa", "caption", "8-shot", "Demo done in", "log-likelihood of each word: "):
        assert word in printed
    curve = Image.open(out / "few_shot_curve.png")
    assert curve.format == "PNG" and curve.size[0] > 400


def test_demo_draws_colour_pictures_on_request(model_dir, tmp_path):
    buf = io.StringIO()
    rc = demo.run_demo(str(model_dir), out_dir=str(tmp_path), episodes=1, color=True, tasks=("classify",),
                       shots=(0, 1), out=buf)
    assert rc == 0
    text = buf.getvalue()
    assert "\x1b[38;2;" in text and "\x1b[48;2;" in text and "▀" in text


def test_missing_model_says_where_and_how(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEFAULT_MODEL", tmp_path / "assets" / "tiny-world")
    assert cli.main(["demo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "assets" / "tiny-world") in err
    assert "flamingo-rt train --preset tiny-world" in err and "--model DIR" in err
    assert cli.main(["demo", "--model", str(tmp_path / "elsewhere")]) == 2
    assert str(tmp_path / "elsewhere") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_terminal_pictures():
    img = torch.zeros(3, 2, 2)
    img[0, 0] = 1.0  # top row red
    img[2, 1] = 1.0  # bottom row blue
    assert render(img, width=2, color=True) == ["\x1b[38;2;255;0;0m\x1b[48;2;0;0;255m▀" * 2 + "\x1b[0m"]
    grey = torch.linspace(0, 1, 16).view(1, 1, 16).expand(3, 16, 16)
    plain = render(grey, width=8, color=False)
    assert len(plain) == 4 and all(len(line) == 8 for line in plain)
    assert plain[0][0] == " " and plain[0][-1] == "@"  # dark to light, contrast stretched
    clip = torch.rand(8, 3, 64, 64)
    strip = to_rgb8(clip, max_frames=3)
    assert strip.shape == (64, 3 * 64 + 2 * 2, 3) and strip.dtype == np.uint8
    assert np.array_equal(strip[:, :64], (clip[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    assert np.array_equal(strip[:, -64:], (clip[7].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def test_supports_color(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert supports_color(Tty()) and not supports_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not supports_color(Tty())


_SHIPPED = (demo.DEFAULT_MODEL / "config.json").is_file()


@pytest.mark.skipif(not _SHIPPED, reason="the shipped model (flamingo_rt/assets/tiny-world) is not in the repo")
def test_shipped_model_is_the_recipe_output_and_small():
    files = {p.name: p.stat().st_size for p in demo.DEFAULT_MODEL.iterdir() if p.is_file()}
    assert {"config.json", "tokenizer.json", "recipe.json"} <= set(files)
    assert any(n.endswith(".safetensors") for n in files)
    assert sum(files.values()) <= 25 * 2 ** 20
    log = json.loads((demo.DEFAULT_MODEL / "recipe.json").read_text())
    assert log["preset"] == "tiny-world"
    gen = Generator.from_pretrained(demo.DEFAULT_MODEL)
    ep = demo.demo_episodes()[0][1]
    scores = gen.score(ep.prompt, [" " + c for c in ep.candidates])
    assert len(scores) == 5 and all(np.isfinite(scores))


# Issue 8's target, on the demo's own naming episodes (5-way, classes are colours; held-out
# images and words, training phrasings, seed 0).
@pytest.mark.skipif(not _SHIPPED, reason="the shipped model (flamingo_rt/assets/tiny-world) is not in the repo")
def test_shipped_model_names_5_way_2_shot_at_least_80_percent():
    suite = demo.demo_suite(tasks=("classify",))  # the demo's own classify episodes (seed 0)
    res = evaluate(str(demo.DEFAULT_MODEL), suite)
    assert res.score("classify", 2) >= 0.8, res.table()


# Issue 8's other targets on the shipped model, at the settings of the README's numbers
# (held-out combinations, training phrasings, seed 100, 40 queries): it reads attributes out of
# the image, and answers a question about a held-out clip above chance. The thresholds sit
# well above chance and below the measured scores (colour 65%, count at 8 shots 35%, new
# colour of a clip 17.5-22.5%), which change only by float rounding between CPU kinds.
@pytest.mark.skipif(not _SHIPPED, reason="the shipped model (flamingo_rt/assets/tiny-world) is not in the repo")
def test_shipped_model_answers_questions_and_video_above_chance():
    from flamingo_rt.eval import TaskSuite

    suite = TaskSuite(tasks=("qa.colour", "qa.count", "video_qa.new_colour"), shots=(0, 8), episodes=40, seed=100,
                      split="heldout", format_split="train")
    res = evaluate(str(demo.DEFAULT_MODEL), suite)
    table = res.table()
    assert res.score("qa.colour", 0, "ranked_accuracy") >= 0.4, table  # chance 0.1
    assert res.score("qa.count", 8, "exact_match") >= res.score("qa.count", 0, "exact_match") + 0.1, table
    video = [res.score("video_qa.new_colour", k, "exact_match") for k in (0, 8)]
    assert sum(video) / 2 >= 0.15, table  # ranked chance 0.1; the generated answer must be the colour
