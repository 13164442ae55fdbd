"""The finished hypotheses of one prompt's beam search, and when the search may stop: the
rules of Hugging Face's beam search (``BeamHypotheses`` of transformers 4.36, the version
open_flamingo's ``generate`` runs), so that our answers are open_flamingo's."""
from __future__ import annotations

from typing import List, Tuple, Union

EarlyStopping = Union[bool, str]


class BeamHypotheses:
    """The best ``num_beams`` finished sequences of one prompt.

    A hypothesis is (score, tokens) with score = sum of the tokens' log-probabilities over
    len(tokens) ** length_penalty (its tokens include the stop token that ended it). Adding
    to a full list drops the worst one; :attr:`worst` is then the lowest score kept.
    """

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: EarlyStopping,
                 max_new_tokens: int):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_new_tokens = max_new_tokens
        self.items: List[Tuple[float, List[int]]] = []

    def __len__(self) -> int:
        return len(self.items)

    @property
    def worst(self) -> float:
        return min(s for s, _ in self.items)

    def add(self, tokens: List[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (len(tokens) ** self.length_penalty)
        if len(self.items) < self.num_beams or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.num_beams:  # drop the worst (the first of equal ones)
                del self.items[min(range(len(self.items)), key=lambda i: (self.items[i][0], i))]

    def is_done(self, best_sum_logprobs: float, generated: int) -> bool:
        """Whether no live beam can still beat the worst kept hypothesis. ``best_sum_logprobs``:
        the best candidate's score this step (finished or not), ``generated``: the tokens
        generated so far, this step's included. ``early_stopping`` True: done once there are
        num_beams hypotheses; False (HF's default): done when the best candidate's score over
        its current length is no better than the worst kept; "never": over the longest length
        it could reach when length_penalty > 0 (the canonical rule)."""
        if len(self.items) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        length = generated
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens
        return self.worst >= best_sum_logprobs / (length ** self.length_penalty)

    def best(self) -> List[int]:
        """The tokens of the best hypothesis (of equal scores, the one added last, as HF's
        sort-and-pop picks)."""
        return max(reversed(self.items), key=lambda it: it[0])[1]
