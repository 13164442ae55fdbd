"""What a user-given value is: the predicates and the unknown-key check that the configs
(model, training, generation) and the model's inputs validate with.

Numbers may be Python's or numpy's scalars; a bool is never a number (``True`` is an int to
Python, but ``max_new_tokens = true`` in a config is a mistake, not 1).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["is_integer", "is_number", "is_integer_tensor", "check_known_keys"]


def is_integer(v: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def is_integer_tensor(t: torch.Tensor) -> bool:
    """A tensor of an integer dtype (not floating, complex or bool): token ids, counts."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_known_keys(cls, d: Mapping[str, Any], what: str) -> None:
    """ValueError ``what [keys]; expected some of [fields]`` when ``d`` has keys that are not
    fields of the dataclass ``cls`` (a config of another version, a typo)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what} {unknown}; expected some of {sorted(known)}")
