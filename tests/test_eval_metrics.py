"""Evaluation metrics against hand-computed values: VQA normalization / exact match, VQA
accuracy (leave-one-annotator-out), CIDEr-D (tf-idf, clipping, length penalty, x10)."""
from __future__ import annotations

import math

import pytest

from flamingo_rt.eval import caption_tokens, cider_d, cider_d_scores, exact_match, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, want", [
    ("The Three red circles.", "3 red circles"),   # case, article, number word, final period
    ("yes!", "yes"),                               # mark not next to a space -> space, then stripped
    ("left-of", "left of"),
    ("top - left", "top left"),                    # mark next to a space -> removed
    ("  An \t apple\n", "apple"),
    ("1,000", "1000"),                             # thousands comma
    ("3.5", "3.5"),                                # period before a digit kept
    ("2.", "2"),
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("a", ""),
])
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def test_exact_match():
    assert exact_match(" The Circle.", "circle") == 1.0
    assert exact_match("two", "2") == 1.0
    assert exact_match("red square", "square") == 0.0
    assert exact_match("", "no") == 0.0
    with pytest.raises(TypeError, match="expected an answer string"):
        exact_match(None, "no")


@pytest.mark.parametrize("n_match, want", [
    (10, 1.0),
    (4, 1.0),                            # every leave-one-out subset keeps >= 3 matches
    (3, (3 * 2 / 3 + 7 * 1) / 10),       # 0.9: matchers see 2 others, the rest see 3
    (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),   # 0.6
    (1, (1 * 0 + 9 * 1 / 3) / 10),       # 0.3
    (0, 0.0),
])
def test_vqa_accuracy_hand_computed(n_match, want):
    answers = ["red"] * n_match + ["blue"] * (10 - n_match)
    assert vqa_accuracy("Red.", answers) == pytest.approx(want, abs=1e-12)


def test_vqa_accuracy_normalizes_annotators_and_needs_two():
    assert vqa_accuracy("3", ["three"] * 10) == 1.0
    assert vqa_accuracy("yes", ["yes", "no"]) == pytest.approx((0 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="at least 2 annotator answers, got 1"):
        vqa_accuracy("yes", ["yes"])
    with pytest.raises(ValueError, match="at least 2"):
        vqa_accuracy("yes", "yes")


def test_caption_tokens():
    assert caption_tokens("There are two shapes: a Red circle, and a blue star.") == \
        "there are two shapes a red circle and a blue star".split()


L2 = math.log(2.0)  # ln(#images) for the two-image corpora below; every unique n-gram has idf ln 2


def test_cider_d_exact_and_shorter_hypothesis():
    # image 0: hyp "a b" == ref "a b": cosine 1 for n = 1, 2; no 3/4-grams -> 0; (1+1+0+0)/4*10 = 5
    # image 1: hyp "c" vs ref "c d": n=1 cosine L^2 / (L * sqrt(2) L) = 1/sqrt(2); length penalty
    #          exp(-(1-2)^2 / (2*6^2)); n=2..4: 0
    per = cider_d_scores(["a b", "c"], [["a b"], ["c d"]])
    want1 = (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert per == pytest.approx([5.0, want1], abs=1e-12)
    assert cider_d(["a b", "c"], [["a b"], ["c d"]]) == pytest.approx((5.0 + want1) / 2, abs=1e-12)


def test_cider_d_clips_repeated_ngrams():
    # hyp "a a b" vs ref "a b": n=1 hyp weights {a: 2L, b: L}, ref {a: L, b: L}; clipped dot
    # min(2L, L) L + L L = 2 L^2 (3 L^2 unclipped); norms sqrt(5) L and sqrt(2) L -> 2/sqrt(10).
    # n=2: hyp {"a a": L (df 0 counts as 1), "a b": L}, ref {"a b": L} -> 1/sqrt(2).
    # n=3: ref has no 3-gram -> 0. Length 3 vs 2 -> penalty exp(-1/72).
    per = cider_d_scores(["a a b", "c d"], [["a b"], ["c d"]])
    want0 = (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72) * 10
    assert per[0] == pytest.approx(want0, abs=1e-12)
    assert per[1] == pytest.approx(5.0, abs=1e-12)


def test_cider_d_averages_over_references_and_uses_idf():
    # image 0 refs "a b" (cosines 1, 1, 0, 0) and "x y" (0): (2/4 + 0) / 2 refs * 10 = 2.5
    assert cider_d_scores(["a b", "c d"], [["a b", "x y"], ["c d"]])[0] == pytest.approx(2.5, abs=1e-12)
    # "a" is in every image's references: idf ln(2/2) = 0, so matching it alone scores 0;
    # "b" (in one image's references) scores: cosine 1 at n=1, penalty exp(-1/72)
    assert cider_d_scores(["a", "c"], [["a b"], ["a c"]])[0] == 0.0
    assert cider_d_scores(["b", "c"], [["a b"], ["a c"]])[0] == pytest.approx(
        1 / 4 * math.exp(-1 / 72) * 10, abs=1e-12)
    # case and punctuation do not matter; an empty hypothesis scores 0
    assert cider_d_scores(["A B.", ""], [["a b"], ["c d"]]) == pytest.approx([5.0, 0.0])


def test_cider_d_errors():
    with pytest.raises(ValueError, match="one reference list per prediction, got 2 predictions and 1"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list of reference captions for item 0"):
        cider_d(["a"], ["a"])
