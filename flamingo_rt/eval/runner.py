"""Few-shot evaluation of a model on a :class:`~flamingo_rt.eval.suite.TaskSuite`.

For every task and episode, one world episode with a support *pool* and a query is drawn
from the suite's seed; each shot count k then prompts with k examples chosen from that pool
(at random or by RICES), so all shot counts are asked the same queries. Scoring:

* "classify": the nonsense words are ranked by the log-likelihood of ``" " + word`` after
  the prompt (:meth:`Generator.score`); accuracy.
* QA tasks: the answer is generated (greedy, or beam search with ``num_beams > 1``) up to
  ``<|endofchunk|>``; exact match and VQA accuracy after VQA normalization (the world's
  answer is unambiguous, so it stands for all 10 annotators and the two agree). With
  ``suite.rank_answers`` also ranked accuracy: the question type's answer set ranked by
  log-likelihood, as classify (chance: 1 / answers).
* captions: generated the same way; CIDEr-D against the episode's caption plus other
  captions of the same scene/clip, with document frequencies over the cell's queries.
"""
from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..io.tokenizer import EOC_TOKEN
from ..runtime.generate import Generator
from ..runtime.prompt import EncodedPrompt
from ..runtime.sampling import GenerationConfig
from ..world.episodes import Episode, few_shot_episode
from ..world.text import caption, video_caption
from .metrics import cider_d_scores, exact_match, vqa_accuracy
from .results import Cell, EvalResults
from .rices import RicesIndex, random_support
from .suite import TaskSuite, task_kind

__all__ = ["evaluate", "build_prompt", "select_support", "draw_episode", "media_needed"]

#: the world's answers are unambiguous: the ground truth stands for all VQA annotators
NUM_ANNOTATORS = 10


def _task_key(task: str) -> int:
    return zlib.crc32(task.encode())


def draw_episode(suite: TaskSuite, task: str, index: int) -> Episode:
    """Episode ``index`` of ``task``: a pool of ``suite.pool_size`` solved examples (per
    class for classify) and the query, a function of (suite.seed, task, index) only."""
    rng = np.random.default_rng([suite.seed, _task_key(task), index])
    return few_shot_episode(task, suite.pool_size, rng, suite.split, n_way=suite.n_way, by=suite.by,
                            image_size=suite.image_size, num_frames=suite.num_frames,
                            format_split=suite.format_split)


def select_support(suite: TaskSuite, ep: Episode, index: int, k: int, rices: Optional[RicesIndex]) -> List[int]:
    """Pool indices of the k support examples of episode ``index`` (k per class for classify)."""
    labels = ep.meta["support_classes"] if ep.task == "classify" else None
    if k == 0:
        return []
    if suite.selection == "rices":
        if rices is None:
            raise ValueError("expected a RicesIndex of the episode's pool for selection='rices', got None")
        return rices.select(ep.query, k, per_class=labels is not None)
    rng = np.random.default_rng([suite.seed, _task_key(ep.task), index, k, 1])
    return random_support(rng, len(ep.support), k, labels)


def build_prompt(ep: Episode, support: Sequence[int]) -> List[Any]:
    """``[media_i, "<prefix_i> <answer_i><|endofchunk|>", ..., query, "<query prefix>"]`` for
    the chosen pool indices, in the given order (the layout of the world's episodes)."""
    prompt: List[Any] = []
    for j in support:
        media, answer = ep.support[j]
        prompt += [media, f"{ep.support_prefixes[j]} {answer}{EOC_TOKEN}"]
    return prompt + [ep.query, ep.query_prefix]


def media_needed(suite: TaskSuite) -> int:
    """The most media one prompt of the suite holds."""
    k = max(suite.shots)
    return max((suite.n_way * k if t == "classify" else k) + 1 for t in suite.tasks)


def _references(suite: TaskSuite, ep: Episode, index: int) -> List[str]:
    """The episode's caption plus up to ``num_references - 1`` other captions of the query."""
    fsplit = suite.format_split or suite.split
    refs = [ep.answer]
    for j in range(suite.num_references - 1):
        rng = np.random.default_rng([suite.seed, _task_key(ep.task), index, 1000 + j])
        if ep.task == "video_caption":
            text, _ = video_caption(rng, ep.meta["query_clip"], fsplit)
        else:
            text, _ = caption(rng, ep.meta["query_scene"], fsplit)
        if text not in refs:
            refs.append(text)
    return refs


#: task kind -> metrics, in table order
METRICS = {"classify": ("accuracy",), "caption": ("cider",), "qa": ("vqa_accuracy", "exact_match")}


def _metrics(kind: str, suite: TaskSuite) -> Tuple[str, ...]:
    return METRICS[kind] + (("ranked_accuracy",) if kind == "qa" and suite.rank_answers else ())


def _cells(task: str, kind: str, recs: List[Dict[str, Any]], suite: TaskSuite,
           skipped: Dict[int, str]) -> List[Cell]:
    """One cell per (metric, shots) of a task; CIDEr-D is computed here per shot count (its
    document frequencies come from that cell's references) and stored in the records.
    Skipped shot counts get a cell with score None and the reason."""
    by_k = {k: sorted((r for r in recs if r["shots"] == k), key=lambda r: r["episode"]) for k in suite.shots}
    if kind == "caption":
        for k, rk in by_k.items():
            if k in skipped:
                continue
            for r, s in zip(rk, cider_d_scores([r["prediction"] for r in rk], [r["references"] for r in rk])):
                r["cider"] = s
    def chance(metric: str, k: int) -> Optional[float]:
        if kind == "classify":
            return 1.0 / suite.n_way
        if metric == "ranked_accuracy" and by_k[k]:
            return float(np.mean([1.0 / len(r["candidates"]) for r in by_k[k]]))
        return None

    return [Cell(task, metric, k, None, 0, chance(metric, k), skipped[k]) if k in skipped else
            Cell(task, metric, k, float(np.mean([r[metric] for r in by_k[k]])), len(by_k[k]), chance(metric, k))
            for metric in _metrics(kind, suite) for k in suite.shots]


def _rank_candidates(gen: Generator, encs: Dict[int, EncodedPrompt],
                     queries: Dict[int, Tuple[Episode, List[int]]]) -> List[List[float]]:
    """Each query's candidates (with their leading space) scored after its encoded prompt,
    the queries as one batch (:meth:`Generator.score_batch`)."""
    return gen.score_batch(list(encs.values()), [[" " + c for c in ep.candidates] for ep, _ in queries.values()])


def _run_queries(gen: Generator, suite: TaskSuite, task: str, kind: str, k: int,
                 queries: Dict[int, Tuple[Episode, List[int]]]) -> Union[str, List[Dict[str, Any]]]:
    """Answer the queries {episode index: (episode, support indices)} with k shots; returns
    their records, or why they cannot run (a prompt exceeds the model's context or media)."""
    encs = {i: gen.encode(build_prompt(ep, sup)) for i, (ep, sup) in queries.items()}
    if kind == "classify":
        new_tokens = max(len(gen.tok.encode(" " + c)) for ep, _ in queries.values() for c in ep.candidates)
    else:
        new_tokens = suite.max_new_tokens_caption if kind == "caption" else suite.max_new_tokens_answer
    for i, enc in encs.items():
        if len(enc.ids) + new_tokens > gen.max_seq_len:
            return (f"{k}-shot prompts do not fit: episode {i} has {len(enc.ids)} prompt tokens + {new_tokens} "
                    f"to score or generate, the model's context is {gen.max_seq_len}")
        if len(enc.media) > gen.max_media:
            return f"{k}-shot prompts have {len(enc.media)} media; the generator holds at most {gen.max_media}"
    recs = []
    if kind == "classify":
        for (i, (ep, sup)), scores in zip(queries.items(), _rank_candidates(gen, encs, queries)):
            pred = ep.candidates[int(np.argmax(scores))]
            recs.append({"task": task, "episode": i, "shots": k, "support": sup, "answer": ep.answer,
                         "prediction": pred, "candidates": list(ep.candidates), "scores": scores,
                         "accuracy": float(pred == ep.answer)})
        return recs
    outs = gen.generate(list(encs.values()), GenerationConfig(max_new_tokens=new_tokens, num_beams=suite.num_beams,
                                                                    length_penalty=suite.length_penalty))
    ranked = {}
    if kind == "qa" and suite.rank_answers:
        for i, (ep, _) in queries.items():
            if not ep.candidates or ep.answer not in ep.candidates:
                raise ValueError(f"rank_answers needs the episode's possible answers with the answer among "
                                 f"them; task {task!r} episode {i} has {ep.candidates!r}, answer {ep.answer!r}")
        ranked = dict(zip(queries, _rank_candidates(gen, encs, queries)))
    for (i, (ep, sup)), out in zip(queries.items(), outs):
        pred = out.strip()
        rec = {"task": task, "episode": i, "shots": k, "support": sup, "answer": ep.answer, "prediction": pred}
        if kind == "caption":
            rec["references"] = _references(suite, ep, i)
        else:
            rec["exact_match"] = exact_match(pred, ep.answer)
            rec["vqa_accuracy"] = vqa_accuracy(pred, [ep.answer] * NUM_ANNOTATORS)
            if suite.rank_answers:
                scores = ranked[i]
                rec["candidates"], rec["scores"] = list(ep.candidates), scores
                rec["ranked_prediction"] = ep.candidates[int(np.argmax(scores))]
                rec["ranked_accuracy"] = float(rec["ranked_prediction"] == ep.answer)
        recs.append(rec)
    return recs


def _load(model: Union[str, Path, Generator], suite: TaskSuite) -> Tuple[Generator, str]:
    if isinstance(model, Generator):
        return model, type(model.model).__name__
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"expected a model folder with config.json (save_pretrained), got {folder}")
    return Generator.from_pretrained(folder, max_media=media_needed(suite)), str(folder)


def evaluate(model: Union[str, Path, Generator], suite: Optional[TaskSuite] = None,
             progress: bool = False) -> EvalResults:
    """Evaluate a model folder (or a :class:`Generator`) on ``suite`` (default: ``TaskSuite()``).

    Returns :class:`EvalResults`: a cell per (task, metric, shots) and a record per query
    (support indices, answer, prediction or candidate scores, per-query scores).
    Deterministic under ``suite.seed``.
    """
    suite = (suite or TaskSuite()).validate()
    gen, name = _load(model, suite)
    t0 = time.perf_counter()
    total = len(suite.tasks) * suite.episodes * len(suite.shots)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="query", file=sys.stderr, leave=False)
    cells: List[Cell] = []
    records: List[Dict[str, Any]] = []
    for task in suite.tasks:
        kind = task_kind(task)
        recs: List[Dict[str, Any]] = []
        skipped: Dict[int, str] = {}  # shots -> why the cell was not evaluated
        for start in range(0, suite.episodes, suite.batch_size):
            chunk = list(range(start, min(start + suite.batch_size, suite.episodes)))
            eps = {i: draw_episode(suite, task, i) for i in chunk}
            indexes = {}
            if suite.selection == "rices" and suite.pool_size > 0 and max(suite.shots) > 0:
                for i, ep in eps.items():
                    labels = ep.meta["support_classes"] if kind == "classify" else None
                    indexes[i] = RicesIndex(gen.model, [m for m, _ in ep.support], labels)
            with gen.media_memo():  # the chunk's support images recur at every shot count: encoded once
                for k in suite.shots:
                    if k not in skipped:
                        support = {i: select_support(suite, eps[i], i, k, indexes.get(i)) for i in chunk}
                        new = _run_queries(gen, suite, task, kind, k, {i: (eps[i], support[i]) for i in chunk})
                        if isinstance(new, str):
                            skipped[k] = new
                        else:
                            recs += new
                    if bar is not None:
                        bar.update(len(chunk))
        recs = [r for r in recs if r["shots"] not in skipped]
        cells += _cells(task, kind, recs, suite, skipped)
        records += sorted(recs, key=lambda r: (r["episode"], suite.shots.index(r["shots"])))
    if bar is not None:
        bar.close()
    return EvalResults(name, suite.to_dict(), cells, records, time.perf_counter() - t0)
