"""open_flamingo's ``src/helpers.py`` (the peer modules: ``PerceiverResampler``,
``GatedCrossAttentionBlock``), loaded from its file: the package's ``__init__`` needs
open_clip, which the benchmarks do not."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def installed() -> bool:
    """open_flamingo (the peer) can be imported."""
    return importlib.util.find_spec("open_flamingo") is not None


def load(module_name: str = "_of_helpers") -> ModuleType:
    """The helpers module, loaded anew under ``module_name``; ImportError when open_flamingo is
    not installed."""
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None:
        raise ImportError("open_flamingo (peer) not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "src" / "helpers.py"
    mspec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod
