"""Decoding settings and next-token choice: greedy, temperature / top-k / top-p sampling,
repetition penalty."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch

from .._values import is_integer, is_number


@dataclass
class GenerationConfig:
    """How to decode.

    max_new_tokens: tokens to generate at most (>= 1).
    min_new_tokens: the stop tokens (``<|endofchunk|>`` / end of sequence, as stop_on_eoc /
        stop_on_eos choose) are never chosen before this many tokens (0 <= min_new_tokens
        <= max_new_tokens; open_flamingo's evaluation's ``min_generation_length``).
    do_sample: sample (with temperature, top_k, top_p) instead of greedy / beam search.
    temperature > 0; top_k >= 0 (0: off); 0 < top_p <= 1 (1: off).
    repetition_penalty >= 1 (1: off): logits of tokens already in the prompt or output are
        divided (if positive) or multiplied (if negative) by it, as in CTRL.
    num_beams >= 1: beam search when > 1 (the paper's choice for open-ended tasks);
        length_penalty: finished beams are ranked by sum(logprob) / length ** length_penalty.
        early_stopping: when a prompt's search ends once num_beams beams have finished, as in
        Hugging Face's generate: False (its default, and open_flamingo's): when the best live
        candidate's score over its current length is no better than the worst finished;
        True: at once; "never": when no live beam can do better at any length.
    seed: makes sampling repeatable.
    stop_on_eoc / stop_on_eos: stop at ``<|endofchunk|>`` / end of sequence.
    stop_strings: stop as soon as the output text contains one (it is cut there).
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    seed: Optional[int] = None
    stop_on_eoc: bool = True
    stop_on_eos: bool = True
    stop_strings: Tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> "GenerationConfig":
        def bad(name, want):
            raise ValueError(f"expected {name} {want}, got {getattr(self, name)!r}")

        reals = ("temperature", "top_p", "repetition_penalty", "length_penalty")
        for name in reals:
            if not is_number(getattr(self, name)):
                bad(name, "to be a number")
        for name in ("do_sample", "stop_on_eoc", "stop_on_eos"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "to be True or False")
        if self.seed is not None and not is_integer(self.seed):
            bad("seed", "to be an integer (or None)")
        if not is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "to be an integer >= 1")
        if not is_integer(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", f"to be an integer in [0, max_new_tokens = {self.max_new_tokens}]")
        if not self.temperature > 0:
            bad("temperature", "> 0")
        if not is_integer(self.top_k) or self.top_k < 0:
            bad("top_k", "to be an integer >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not self.repetition_penalty >= 1:
            bad("repetition_penalty", ">= 1")
        if not is_integer(self.num_beams) or self.num_beams < 1:
            bad("num_beams", "to be an integer >= 1")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            bad("early_stopping", 'to be True, False or "never"')
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("expected either sampling (do_sample) or beam search (num_beams > 1), got both")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        # numpy scalars as plain Python numbers from here on
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams") + (("seed",) if self.seed is not None else ()):
            setattr(self, name, int(getattr(self, name)))
        for name in reals:
            setattr(self, name, float(getattr(self, name)))
        if not isinstance(self.stop_strings, (list, tuple)) or not all(isinstance(s, str) for s in self.stop_strings):
            bad("stop_strings", "to be a string or a list of strings")
        self.stop_strings = tuple(self.stop_strings)
        if any(not s for s in self.stop_strings):
            bad("stop_strings", "non-empty strings")
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool: tokens already in each row's context."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus of mass top_p to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (keep at least one)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, cfg: GenerationConfig, seen: Optional[torch.Tensor],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 next tokens (greedy or sampled per ``cfg``)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" and probs.device.type != "cpu" else probs,
                             1, generator=generator).view(-1).to(logits.device)
