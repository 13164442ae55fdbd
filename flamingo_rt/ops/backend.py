"""Backend selection for flamingo_rt ops.

Every op has the same backends:

- ``reference``: plain torch, any dtype (float64 included); the specification.
- ``cpu``: C++ kernels from ``flamingo_rt._C`` (CPU tensors).
- ``cuda``: CUDA C++ kernels from ``flamingo_rt._C`` (CUDA tensors).
- ``triton``: Triton kernels from ``flamingo_rt.kernels`` (GPU default; CPU under
  ``TRITON_INTERPRET=1``).

``auto`` picks, from the tensor's device, the first implemented backend in
:data:`AUTO_ORDER` for that device. A backend can be forced per call (``backend=``
argument) or process-wide with the environment variable ``FLAMINGO_RT_BACKEND``.

Each op registers the backends it implements with :func:`register`; asking an op
for a backend it does not implement is an error that lists what it does implement.

Inside :func:`export_mode` the ops call their backend's kernel directly instead of going
through their Python ``torch.library`` op: a C++ backend is then a ``flamingo_rt_C`` op
(implemented in C++, so an AOTInductor package can call it with no Python present) and
the reference backend is plain aten ops (which Inductor compiles into the package).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Dict, Iterator

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

#: Preference order used by ``auto``, by device type.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

_IMPLS: Dict[str, Dict[str, Callable]] = {}
_EXPORT = threading.local()


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """Within this context, ops run their backend's kernel directly (see module doc)."""
    prev = getattr(_EXPORT, "on", False)
    _EXPORT.on = True
    try:
        yield
    finally:
        _EXPORT.on = prev


def exporting() -> bool:
    """True inside :func:`export_mode`."""
    return getattr(_EXPORT, "on", False)


def register(op: str, backend: str, fn: Callable) -> Callable:
    """Register ``fn`` as the implementation of ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = fn
    return fn


def implemented(op: str) -> tuple:
    """Backends that implement ``op``, in :data:`BACKENDS` order."""
    impls = _IMPLS.get(op, {})
    return tuple(b for b in BACKENDS if b in impls)


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (
            device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        )
    return False


def requested(backend: str | None) -> str:
    """The backend asked for: ``backend``, or for None the ``FLAMINGO_RT_BACKEND``
    environment variable if set, else ``"auto"``."""
    if backend is None:
        backend = os.environ.get("FLAMINGO_RT_BACKEND", "auto") or "auto"
    return backend


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """Turn ``backend`` (``None``/``"auto"``/a name) into a concrete backend for ``op``.

    ``None`` means: the ``FLAMINGO_RT_BACKEND`` environment variable if set, else ``auto``.
    A forced backend that ``op`` does not implement, or that cannot run on ``device``,
    is an error naming what was asked and what is available.
    """
    backend = requested(backend)
    impls = _IMPLS.get(op, {})
    if backend == "auto":
        for cand in AUTO_ORDER.get(device.type, ("reference",)):
            if cand in impls and _device_ok(cand, device):
                return cand
        if "reference" in impls:
            return "reference"
        raise RuntimeError(f"op {op!r} has no implementation registered")
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} for op {op!r}; expected 'auto' or one of {BACKENDS}"
        )
    if backend not in impls:
        raise NotImplementedError(
            f"op {op!r} has no {backend!r} backend yet; implemented: {implemented(op)}"
        )
    if not _device_ok(backend, device):
        raise ValueError(
            f"backend {backend!r} of op {op!r} cannot run on device {device}; "
            f"implemented: {implemented(op)}"
        )
    return backend


def get(op: str, backend: str) -> Callable:
    """The registered implementation of ``op`` on a concrete ``backend``."""
    try:
        return _IMPLS[op][backend]
    except KeyError:
        raise NotImplementedError(
            f"op {op!r} has no {backend!r} backend; implemented: {implemented(op)}"
        ) from None
