"""A small few-shot check of a trained model on held-out world episodes, used by the recipe to
report what it reached (the full harness with retrieval, CIDEr and tables is
:mod:`flamingo_rt.eval`).

Tasks with candidates ("classify", "qa", "video_qa") are scored by ranking the candidates'
log-likelihoods (:meth:`flamingo_rt.runtime.Generator.score`, each candidate with its
leading space); captions by the mean word-overlap F1 between a greedy caption and the
reference (a cheap proxy that rises when captions get right words).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..runtime.generate import Generator
from ..runtime.sampling import GenerationConfig
from ..world import few_shot_episode


def _f1(pred: str, ref: str) -> float:
    p, r = pred.lower().replace(".", " ").split(), ref.lower().replace(".", " ").split()
    if not p or not r:
        return 0.0
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def episode_accuracy(gen: Generator, task: str, k: int, episodes: int, seed: int, split: str = "heldout",
                     batch_size: int = 8, **episode_kw) -> float:
    """Fraction of ``episodes`` fresh episodes of ``task`` (one with candidates) whose
    highest-likelihood candidate is the answer, scored ``batch_size`` episodes at a time
    (:meth:`Generator.score_batch`). Episodes come from ``numpy.random.default_rng([seed, k, i])``."""
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    hits = 0
    for start in range(0, episodes, batch_size):
        eps = [few_shot_episode(task, k, np.random.default_rng([seed, k, i]), split, **episode_kw)
               for i in range(start, min(episodes, start + batch_size))]
        if any(ep.candidates is None for ep in eps):
            raise ValueError(f"task {task!r} has no candidates to rank; use caption_f1")
        scores = gen.score_batch([ep.prompt for ep in eps], [[" " + c for c in ep.candidates] for ep in eps])
        hits += sum(ep.candidates[int(np.argmax(s))] == ep.answer for ep, s in zip(eps, scores))
    return hits / episodes


def caption_f1(gen: Generator, k: int, episodes: int, seed: int, split: str = "heldout", task: str = "caption",
               max_new_tokens: int = 24, batch_size: int = 8) -> float:
    """Mean word-overlap F1 of greedy captions against the references, ``batch_size``
    episodes generated at a time."""
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    total = 0.0
    for start in range(0, episodes, batch_size):
        eps = [few_shot_episode(task, k, np.random.default_rng([seed, k, i]), split)
               for i in range(start, min(episodes, start + batch_size))]
        total += sum(_f1(out, ep.answer) for ep, out in zip(eps, gen.generate([ep.prompt for ep in eps], cfg)))
    return total / episodes


def classify_curve(gen: Generator, shots: Sequence[int] = (0, 1, 2, 4, 8), n_way: int = 5, episodes: int = 50,
                   seed: int = 1234, by: str = "shape") -> Dict[int, float]:
    """{k: accuracy} of held-out ``n_way`` nonsense-word classification."""
    return {k: episode_accuracy(gen, "classify", k, episodes, seed, n_way=n_way, by=by) for k in shots}


def report(gen: Generator, episodes: int = 50, seed: int = 1234, shots: Sequence[int] = (0, 1, 2, 4, 8),
           by_kinds: Sequence[str] = ("shape", "colour", "shape_colour")) -> Dict[str, Dict[int, float]]:
    """The numbers TRAINING.md reports: 5-way classification by k for each class kind,
    2-way k = 1, QA and caption F1 by shots, video QA by shots (held-out split)."""
    out: Dict[str, Dict[int, float]] = {}
    for by in by_kinds:
        out[f"classify5.{by}"] = classify_curve(gen, shots, 5, episodes, seed, by)
    out["classify2.shape"] = {1: episode_accuracy(gen, "classify", 1, episodes, seed, n_way=2)}
    qa_shots: List[int] = [k for k in shots if k <= 4]
    out["qa"] = {k: episode_accuracy(gen, "qa", k, episodes, seed) for k in qa_shots}
    out["caption_f1"] = {k: caption_f1(gen, k, max(10, episodes // 5), seed) for k in qa_shots}
    out["video_qa"] = {k: episode_accuracy(gen, "video_qa", k, max(10, episodes // 2), seed) for k in qa_shots}
    return out
