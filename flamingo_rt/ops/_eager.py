"""Plain eager calls of flamingo_rt's ``torch.library`` ops, without the custom-op machinery.

Each op is registered with ``torch.library`` (fake implementation and autograd), so that
``torch.compile`` and ``torch.export`` see one opaque op. In a plain eager call that
registration is host time only: argument defaults filled, two redispatches through the
autograd and backend keys, a second custom op for the backward. Measured on the 2-core
Xeon of MEASUREMENTS.md (torch 2.13, one thread), the image-causal attention at a tiny
shape, forward+backward through ``torch.autograd.grad``: 104 us through the registered op,
72 us through :class:`EagerOp`, 13.5 us for its two kernels called alone; the forward
without gradients 18.4 / 13.1 / 5.5 us. On a GPU that host time is the whole cost of a
small call.

:class:`EagerOp` wraps a registered op with its implementation (the function the
registration wraps) and its autograd formula (the ``setup_context`` / ``backward`` given to
``register_autograd``). A call runs

- the registered op whenever the call is not plain eager (:func:`plain`): under
  ``torch.compile`` or export, with fake or other tensor subclasses or meta tensors, under
  a dispatch or function mode (FakeTensorMode, profilers' flop counters, ``torch.device``
  contexts), under a functorch transform; and always with ``FLAMINGO_RT_EAGER_OPS=0``
  (read at each call);
- else the implementation itself when no tensor argument needs a gradient (or grad mode is
  off);
- else a ``torch.autograd.Function`` made from the same ``setup_context`` and ``backward``
  (its backward is once-differentiable, as the registered op's); an autograd.Function
  tracks top-level tensor arguments only, so a call with list arguments (``Tensor[]``)
  that needs gradients takes the registered op.

The same implementation runs in every case, so the results are the same, bit for bit.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backend as _backend

__all__ = ["EagerOp", "plain", "enabled"]

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def enabled() -> bool:
    """False when ``FLAMINGO_RT_EAGER_OPS=0``: every call then goes through the registered op."""
    return os.environ.get("FLAMINGO_RT_EAGER_OPS", "1") != "0"


def plain(args) -> bool:
    """Whether a call with ``args`` is plain eager: not compiling or exporting, no dispatch
    or function mode active, no functorch transform, and every tensor argument (in lists
    too) a ``torch.Tensor`` or ``nn.Parameter`` itself (no subclass), not on the meta device."""
    if torch.compiler.is_compiling() or _backend.exporting():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    for a in _tensors(args):
        if type(a) not in _PLAIN_TYPES or a.is_meta:
            return False
    return True


def _tensors(args):
    """The tensor arguments, those in list / tuple arguments (Tensor[] in a schema) included."""
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def _needs_grad(args) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args))


class EagerOp:
    """A registered op ``op`` (a ``torch.library`` custom op), its implementation ``impl``
    (same arguments, same results) and, for a differentiable op, the ``setup_context`` /
    ``backward`` registered as its autograd formula. Calling it is calling the op (see the
    module docstring for which path a call takes)."""

    def __init__(self, op: Callable, impl: Callable, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None):
        if (setup_context is None) != (backward is None):
            raise ValueError("EagerOp: give both setup_context and backward, or neither")
        self.op, self.impl = op, impl
        self.function = None
        if backward is not None:
            name = getattr(impl, "__name__", "op").strip("_") + "_function"

            # forward(ctx, ...) calling setup_context itself: a Function with a separate
            # setup_context binds its arguments through inspect.signature on every call
            # (~15 us here)
            def forward(ctx, *args):
                out = impl(*args)
                setup_context(ctx, args, out)
                return out

            self.function = type(name, (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(once_differentiable(backward)),
            })

    def __call__(self, *args):
        if not enabled() or not plain(args):
            return self.op(*args)
        if self.function is None or not _needs_grad(args):
            return self.impl(*args)
        if any(isinstance(a, (list, tuple)) for a in args):
            # an autograd.Function tracks top-level tensor arguments only
            return self.op(*args)
        return self.function.apply(*args)
