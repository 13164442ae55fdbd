"""Reading image and clip arrays from ``.npy`` files, with messages that say what is wrong.

``np.load(allow_pickle=False)`` on a file that is not an ``.npy`` at all (a PNG renamed, a
truncated download) reports that it "contains pickled (object) data": it falls back to
pickle for anything without the NUMPY magic. :func:`load_npy` tells the cases apart.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

__all__ = ["load_npy"]

_MAGIC = b"\x93NUMPY"


def load_npy(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array of an ``.npy`` file. ValueError saying why when it is not one (no NUMPY
    header), holds Python objects (never unpickled) or is truncated (callers name the file);
    OSError when it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC))
    if head != _MAGIC:
        raise ValueError("not an .npy file (it does not start with the NUMPY header)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:  # object arrays, a truncated file
        raise ValueError(str(e)) from None
