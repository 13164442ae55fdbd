"""Next-token choice (runtime/sampling.py) and the beam search's stopping rule
(runtime/beams.py) on hand-made logits: each setting does what Hugging Face's processors
and warpers of the same name do."""
from __future__ import annotations

import math

import torch

from flamingo_rt.runtime import GenerationConfig
from flamingo_rt.runtime.beams import BeamHypotheses
from flamingo_rt.runtime.sampling import apply_repetition_penalty, choose_next, filter_top_k_top_p


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 1.0)).all()  # 0: off
    assert torch.isfinite(filter_top_k_top_p(logits, 9, 1.0)).all()  # more than the vocabulary


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(filter_top_k_top_p(logits, 0, p))[0].tolist()  # noqa: E731
    assert keep(0.8) == [False, True, False, True]  # 0.5 + 0.3 reach 0.8: the rest go
    assert keep(0.81) == [False, True, True, True]
    assert keep(0.4) == [False, True, False, False]  # the top token always stays
    assert keep(1.0) == [True, True, True, True]


def test_temperature_sharpens_sampling():
    """At a temperature near 0 sampling is the argmax; at 1 the runner-up (47%) is drawn."""
    logits = torch.tensor([[2.0, 1.9, -5.0]])
    cold = GenerationConfig(do_sample=True, temperature=1e-3).validate()
    warm = GenerationConfig(do_sample=True, temperature=1.0).validate()
    draws = {"cold": set(), "warm": set()}
    for seed in range(40):
        for name, cfg in (("cold", cold), ("warm", warm)):
            g = torch.Generator().manual_seed(seed)
            draws[name].add(int(choose_next(logits, cfg, None, g)))
    assert draws["cold"] == {0} and draws["warm"] == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_beam_hypotheses_done_when_the_best_can_only_tie_the_worst():
    """HF's rule: done when worst >= best candidate's score over its length (a tie ends it)."""
    hyps = BeamHypotheses(2, 1.0, False, 10)
    hyps.add([5, 6], -4.0)  # score -2
    hyps.add([7, 8], -3.0)  # score -1.5: worst -2
    assert hyps.is_done(-8.0, 4)  # -8 / 4 = -2: a tie
    assert not hyps.is_done(-7.9, 4)
    assert hyps.best() == [7, 8]
    never = BeamHypotheses(2, 1.0, "never", 10)
    never.add([5, 6], -4.0)
    never.add([7, 8], -3.0)
    assert not never.is_done(-8.0, 4) and never.is_done(-20.0, 4)  # "never": over max_new_tokens (10)
    assert math.isclose(never.worst, -2.0)
