"""What a user-given value is: the predicates, the unknown-key check and the typed-field check
that the configs (model, training, generation) and the model's inputs validate with.

Numbers may be Python's or numpy's scalars; a bool is never a number (``True`` is an int to
Python, but ``max_new_tokens = true`` in a config is a mistake, not 1).
"""
from __future__ import annotations

import dataclasses
import numbers
import os
import typing
from typing import Any, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["is_integer", "is_number", "is_integer_tensor", "check_known_keys", "check_field_types"]


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


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _typed(value: Any, tp: Any, path_like: bool) -> Tuple[bool, Any]:
    """(ok, the value as the field keeps it) for one value against a field's annotation:
    int (not bool; kept as int), float (an integer or real, kept as float), bool, str (or
    os.PathLike where ``path_like``: kept as str), Optional[X], List[int], tuple (a list of
    numbers, kept as a tuple of floats), Tuple[X, ...] / Tuple[X, X, X] (a list of X of that
    length, kept as a tuple); sections (dataclasses) are checked by their own class."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return True, None
        return _typed(value, next(a for a in args if a is not type(None)), path_like)
    if tp is bool:
        ok = isinstance(value, (bool, np.bool_))
        return ok, bool(value) if ok else value
    if tp is int:
        return is_integer(value), int(value) if is_integer(value) else value
    if tp is float:
        return is_number(value), float(value) if is_number(value) else value
    if tp is str:
        if path_like and isinstance(value, os.PathLike):
            return True, os.fspath(value)
        return isinstance(value, str), value
    if tp is tuple:
        ok = isinstance(value, (list, tuple)) and all(is_number(v) for v in value)
        return ok, tuple(float(v) for v in value) if ok else value
    if origin is tuple and args:
        elem = args[0]
        if not isinstance(value, (list, tuple)):
            return False, value
        if not (len(args) == 2 and args[1] is Ellipsis) and len(value) != len(args):
            return False, value
        kept = [_typed(v, elem, False) for v in value]
        return (all(k[0] for k in kept), tuple(k[1] for k in kept)) if kept else (True, ())
    if origin in (list, List) and args and args[0] is int:
        ok = isinstance(value, (list, tuple)) and all(is_integer(v) for v in value)
        return ok, [int(v) for v in value] if ok else value
    return True, value  # sections and lists of sections: their own classes check them


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " (or unset)"
    if tp is tuple:
        return "a list of numbers"
    if origin is tuple and args:
        n = "" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} "
        return f"a list of {n}{_describe(args[0]).replace('an ', '').replace('a ', '')}s"
    if origin in (list, List):
        return "a list of integers"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def check_field_types(obj: Any, where: str, path_fields: Sequence[str] = ()) -> None:
    """ValueError naming the field, the type expected and the value received for every field
    of the dataclass ``obj`` whose value does not fit its annotation (TOML and JSON give
    strings, numbers and booleans: ``steps = "100"`` or ``batch_size = 2.5`` are refused, not
    converted); floats given as integers become floats, lists become tuples where the field
    is one. ``path_fields`` also take os.PathLike (kept as str)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, kept = _typed(value, hints[f.name], f.name in path_fields)
        if not ok:
            raise ValueError(f"{where}expected {f.name}: {_describe(hints[f.name])}, got {value!r}")
        setattr(obj, f.name, kept)
