"""Scores of few-shot answers: exact match, VQA accuracy, CIDEr-D. Written from the
metrics' definitions (VQA: Antol et al. 2015 and its official evaluation; CIDEr-D:
Vedantam et al. 2015 as computed by the coco-caption code), dependency-free.

* :func:`normalize_answer`: the VQA answer normalization — lower case, punctuation
  (a mark is removed when it touches a space in the input or the input has a thousands comma
  like "1,000", otherwise turned into a space; a period is kept only before a digit), number words to digits
  ("none"/"zero".."ten"), articles ("a", "an", "the") dropped, whitespace collapsed.
  (The official contraction table is not applied: apostrophes are removed like other
  punctuation on both sides, so "don't" and "dont" still match each other.)
* :func:`exact_match`: normalized prediction == normalized answer (1.0 or 0.0).
* :func:`vqa_accuracy`: ``min(#annotators who gave the prediction / 3, 1)`` averaged over
  the leave-one-out subsets of the annotators (the 10-choose-9 subsets for VQA's 10).
* :func:`cider_d`: corpus-level CIDEr-D (n-grams 1..4, tf-idf with document frequencies
  over the references of the evaluated corpus, clipped hypothesis weights, Gaussian length
  penalty with sigma 6, averaged over n and references, times 10).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Mapping, Sequence, Tuple

__all__ = ["normalize_answer", "exact_match", "vqa_accuracy", "caption_tokens", "cider_d", "cider_d_scores"]

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!", "'", ":", "*", "#", "$", "%", "^", "&", "~", "|")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))


def normalize_answer(text: str) -> str:
    """The VQA normalization of an answer string (see the module docstring).

    >>> normalize_answer("The Three red circles.")
    '3 red circles'
    """
    if not isinstance(text, str):
        raise TypeError(f"expected an answer string, got {type(text).__name__}")
    src = " ".join(text.replace("\n", " ").replace("\t", " ").strip().lower().split())
    t = src
    comma_in_number = _COMMA_IN_NUMBER.search(src) is not None
    for p in _PUNCT:  # decided on the input text, as the official code does
        if p + " " in src or " " + p in src or comma_in_number:
            t = t.replace(p, "")
        else:
            t = t.replace(p, " ")
    t = _PERIOD_NOT_BEFORE_DIGIT.sub("", t)
    words = [_NUMBER_WORDS.get(w, w) for w in t.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalized prediction equals the normalized answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 in VQA).

    For each annotator i, ``acc_i = min(#{j != i : answer_j == prediction} / 3, 1)``
    (normalized strings); the result is the mean of ``acc_i``. With a single annotator the
    subset is empty and the accuracy is 0, so pass at least 2 answers.
    """
    if isinstance(answers, str) or len(answers) < 2:
        got = repr(answers) if isinstance(answers, str) else f"{len(answers)}"
        raise ValueError(f"expected a list of at least 2 annotator answers, got {got}")
    p = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in answers]
    same = [a == p for a in norm]
    total = sum(same)
    return sum(min((total - s) / 3.0, 1.0) for s in same) / len(norm)


def caption_tokens(text: str) -> List[str]:
    """Caption -> lower-case word tokens with punctuation removed (what the coco-caption
    PTB tokenizer gives for plain English)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i:i + k])] += 1
    return c


def _tfidf(counts: Counter, df: Mapping[Tuple[str, ...], float], log_n_docs: float, n: int):
    """(per-order weight dicts, per-order norms, length in words)."""
    vec: List[Dict[Tuple[str, ...], float]] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        w = float(tf) * (log_n_docs - math.log(max(1.0, df.get(gram, 0.0))))
        vec[k][gram] = w
        norm[k] += w * w
        if k == 0:  # words (coco-caption counts bigrams, words - 1: the same length differences)
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
                   sigma: float = 6.0) -> List[float]:
    """Per-item CIDEr-D of ``predictions[i]`` against ``references[i]`` (a list of captions),
    with document frequencies over all items' references (the corpus is the evaluated set).

    Returns one float per item (the coco-caption scale: a perfect match of a single
    reference on a varied corpus is near 10 * mean_n(1 if that n-gram order exists)).
    """
    if len(predictions) != len(references):
        raise ValueError(f"expected one reference list per prediction, got {len(predictions)} predictions "
                         f"and {len(references)} reference lists")
    if not predictions:
        raise ValueError("expected at least one prediction, got none")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"expected a non-empty list of reference captions for item {i}, got {refs!r}")
    hyps = [_ngrams(caption_tokens(p), n) for p in predictions]
    refss = [[_ngrams(caption_tokens(r), n) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refss:
        for gram in set(g for r in refs for g in r):
            df[gram] += 1
    log_n = math.log(float(len(refss)))
    scores = []
    for hyp, refs in zip(hyps, refss):
        vh, nh, lh = _tfidf(hyp, df, log_n, n)
        total = [0.0] * n
        for ref in refs:
            vr, nr, lr = _tfidf(ref, df, log_n, n)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return scores


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores` (coco-caption's reported value)."""
    s = cider_d_scores(predictions, references, n, sigma)
    return sum(s) / len(s)
