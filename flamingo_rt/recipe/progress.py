"""Progress bars for the recipe's stages."""
from __future__ import annotations

from typing import Iterable

from tqdm.auto import tqdm


def progress_bar(it: Iterable, desc: str, enabled: bool = True) -> Iterable:
    """``tqdm(it, desc=desc)`` when ``enabled``, else ``it`` unchanged."""
    return tqdm(it, desc=desc, dynamic_ncols=True, leave=True) if enabled else it
