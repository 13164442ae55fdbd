"""``flamingo-rt demo``: few-shot learning, shown, on the shipped model.

1. A few few-shot prompts on held-out episodes of the procedural world — naming with
   nonsense words bound in the prompt, a question, a caption, a question about a clip:
   the pictures are saved as PNG files under ``--out`` and drawn small in the terminal
   (24-bit colour half blocks on a terminal, ASCII otherwise), and the model's answer is
   streamed token by token (:meth:`Generator.stream`).
2. An evaluation on fresh held-out episodes (:func:`flamingo_rt.eval.evaluate`): score by
   task and by number of shots (0, 1, 2, 4, 8; for the 5-way naming, examples of each
   class), printed as a table, written as JSON and drawn as a curve (PNG).

Without the shipped model folder it says where it looked and how to make it (exit 2).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, TextIO

import numpy as np

__all__ = ["CLASSIFY_BY_DEMO", "DEFAULT_MODEL", "DEMO_PROMPTS", "EVAL_SHOTS", "EVAL_TASKS", "demo_episodes", "demo_suite", "run_demo"]

#: where the recipe (``flamingo-rt train --preset tiny-world``) puts the shipped model
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-world"

#: what a class of the demo's naming task is. Colour: the shipped model names held-out colours
#: in context; its small NFNet does not separate held-out shapes (FEASIBILITY.md), so naming
#: by shape stays at chance
CLASSIFY_BY_DEMO = "colour"

#: (title, world task, shots, episode options) of the prompts shown
DEMO_PROMPTS = (
    ("Naming colours with nonsense words, 5-way, 1 example of each (the words mean nothing outside this prompt)",
     "classify", 1, {"n_way": 5, "by": CLASSIFY_BY_DEMO}),
    ("Question answering, 2 examples", "qa", 2, {}),
    ("Captioning, 2 examples", "caption", 2, {}),
    ("A question about a video clip: the colour an object turned (frames left to right), 2 examples",
     "video_qa.new_colour", 2, {}),
)
#: ``video_qa`` draws a question type per query (most name a held-out colour-shape object or a
#: direction, which this model does not answer); ``video_qa.new_colour`` is the type it does
EVAL_TASKS = ("classify", "qa", "video_qa", "video_qa.new_colour", "caption")
EVAL_SHOTS = (0, 1, 2, 4, 8)


def demo_episodes(seed: int = 0, formats: str = "train") -> list:
    """The held-out episodes of :data:`DEMO_PROMPTS`: a list of (title, Episode, max new tokens)."""
    from .world import few_shot_episode

    out = []
    for n, (title, task, k, opts) in enumerate(DEMO_PROMPTS, 1):
        ep = few_shot_episode(task, k, np.random.default_rng([seed, 7, n]), "heldout", format_split=formats, **opts)
        out.append((title, ep, 24 if "caption" in task else 8))
    return out


def demo_suite(episodes: int = 12, seed: int = 0, formats: str = "train", tasks: Sequence[str] = EVAL_TASKS,
               shots: Sequence[int] = EVAL_SHOTS, by: str = CLASSIFY_BY_DEMO):
    """The evaluation the demo runs: held-out split, 5-way naming (classes: ``by``), random support."""
    from .eval import TaskSuite

    return TaskSuite(tasks=tuple(tasks), shots=tuple(shots), episodes=episodes, seed=seed, split="heldout",
                     format_split=formats, n_way=5, by=by, selection="random")


def missing_model_message(folder: Path) -> str:
    return (
        f"flamingo-rt demo: no model at {folder}\n"
        f"  (looked for {folder / 'config.json'}, the weights and tokenizer.json there).\n"
        f"  Make it with the training recipe:   flamingo-rt train --preset tiny-world --out-dir {folder}\n"
        "  or show the demo on another model folder (save_pretrained):   flamingo-rt demo --model DIR"
    )


def _print_prompt(out: TextIO, ep, index: int, folder: Path, color: bool, width: int) -> None:
    """Save the episode's media as PNGs and draw them with their texts."""
    from .termimage import render, save_png, side_by_side

    media = [m for m, _ in ep.support] + [ep.query]
    names = [f"{j + 1}" for j in range(len(ep.support))] + ["query"]
    for m, n in zip(media, names):
        save_png(m, folder / f"prompt{index}_{n}.png")
    is_clip = ep.query.dim() == 4
    blocks = [render(m, width=width - 2 if is_clip else width, color=color) for m in media]
    columns = shutil.get_terminal_size((100, 24)).columns - 2
    for line in side_by_side(blocks, names, max_width=max(columns, 40)):
        print("  " + line, file=out)
    for j, (prefix, (_, answer)) in enumerate(zip(ep.support_prefixes, ep.support)):
        print(f"  {j + 1}: {prefix} {answer}", file=out)
    print(f"  query: {ep.query_prefix}", file=out, end="", flush=True)


def show_prompts(gen, out: TextIO, folder: Path, seed: int, color: bool, formats: str = "train",
                 width: int = 12) -> List[bool]:
    """Stream the model's answers to the :data:`DEMO_PROMPTS` (held-out episodes with
    ``formats`` phrasings); returns whether each was right."""
    from .eval.metrics import exact_match

    right = []
    shown = demo_episodes(seed, formats)
    for n, (title, ep, limit) in enumerate(shown, 1):
        print(f"\n[{n}/{len(shown)}] {title}", file=out)
        _print_prompt(out, ep, n, folder, color, width)
        pieces = []
        for piece in gen.stream(ep.prompt, max_new_tokens=limit):
            pieces.append(piece)
            print(piece, end="", file=out, flush=True)
        ok = exact_match("".join(pieces), ep.answer) == 1.0
        right.append(ok)
        mark = ("\x1b[32m✓\x1b[0m" if ok else "\x1b[31m✗\x1b[0m") if color else ("right" if ok else "wrong")
        print(f"\n  expected: {ep.answer}   {mark}", file=out)
        if ep.task == "classify":  # what the evaluation does: rank the words by log-likelihood
            scores = gen.score(ep.prompt, [" " + c for c in ep.candidates])
            ranked = sorted(zip(scores, ep.candidates), reverse=True)
            print("  log-likelihood of each word: " + ", ".join(f"{c} {s:.1f}" for s, c in ranked), file=out)
        print(f"  (pictures: {folder}/prompt{n}_*.png)", file=out)
    return right


def run_demo(model: Optional[str] = None, out_dir: str = "demo_out", episodes: int = 12, seed: int = 0,
             color: Optional[bool] = None, formats: str = "train", threads: Optional[int] = 1,
             tasks: Sequence[str] = EVAL_TASKS, shots: Sequence[int] = EVAL_SHOTS,
             out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Run the demo; returns the exit status (0, or 2 when the model folder is missing).

    Args:
        model: model folder (default: the shipped :data:`DEFAULT_MODEL`).
        out_dir: where the PNGs (prompts, curve) and ``eval.json`` go.
        episodes: queries per task and shot count in the evaluation.
        seed: the prompts and the evaluation episodes are a function of it.
        color: 24-bit colour pictures (default: when ``out`` is a terminal).
        formats: phrasings of the held-out episodes: "train" (default; held-out attribute
            combinations and nonsense words asked in the training phrasings) or "heldout"
            (held-out phrasings too; longer prompts in tokens).
        threads: torch CPU threads (default 1: the tiny model's ops are too small to gain
            from more, and threads that wait on a busy machine cost much more); None keeps
            torch's setting.
    """
    import torch

    from .eval import evaluate
    from .eval.plot import plot_curve
    from .eval.runner import media_needed
    from .runtime import Generator
    from .termimage import supports_color

    out = out or sys.stdout
    err = err or sys.stderr
    t0 = time.perf_counter()
    folder = Path(model) if model is not None else DEFAULT_MODEL
    if not (folder / "config.json").is_file():
        print(missing_model_message(folder.resolve()), file=err)
        return 2
    if threads:
        torch.set_num_threads(threads)
    color = supports_color(out) if color is None else color
    dest = Path(out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    suite = demo_suite(episodes, seed, formats, tasks, shots)
    gen = Generator.from_pretrained(folder, max_media=media_needed(suite))
    n_params = sum(p.numel() for p in gen.model.parameters())
    print(f"Flamingo few-shot demo — model {folder} ({n_params / 1e6:.2f}M parameters), seed {seed}", file=out)
    never = "attribute combinations and nonsense words" + (" and phrasings" if formats == "heldout" else "")
    print(f"Every prompt below is a held-out episode: {never} the model never saw in training.", file=out)
    right = show_prompts(gen, out, dest, seed, color, formats)
    print(f"\n{sum(right)} of {len(right)} shown answers right. Now the evaluation on fresh held-out episodes "
          f"({episodes} queries per task and shot count; classify: 5-way naming of {suite.by}s with fresh "
          f"nonsense words, k examples of each, chance 20%) ...", file=out, flush=True)
    res = evaluate(gen, suite, progress=True)
    res.model = str(folder)
    print(res.table(), file=out)
    js = res.save_json(dest / "eval.json")
    png = plot_curve(res, dest / "few_shot_curve.png", title=f"few-shot curve of {folder.name}")
    print(f"\nCurve: {png}   table and per-query records: {js}   prompt pictures: {dest}/prompt*.png", file=out)
    print(f"Demo done in {time.perf_counter() - t0:.1f} s.", file=out)
    return 0
