"""A CPU decode step's layers as fused ops: one call per decoder layer and one per gated
cross-attention block (``flamingo_rt_C::decoder_layer_step_`` / ``xattn_block_step_``,
csrc/cpu/decode_layer.cpp) instead of some 60 small torch ops each.

At one token per row a layer's products stream its weights once (the small-batch kernel,
at the memory bandwidth) and everything else is tiny; run as separate eager ops, the rest
(norms, rotary terms, cache writes, activations, residual adds, and the Python between
them) took about as long as the products themselves (the medium bench model's bf16 step:
~14 ms of 28). The fused ops run the same sequence in C++, rounding to the activation
dtype where the eager modules do (see csrc/include/flamingo_rt/decode_layer.h).

Used by :func:`~flamingo_rt.runtime.engine.decode_tensors` (and any one-token chunk) when
:func:`eligible` says so: an eager CPU step in float32 / bfloat16 / float64 without
gradients, autocast, compile or export, at most 16 rows, and a model made of the stock
modules (:class:`~flamingo_rt.models.lm.DecoderLayer`,
:class:`~flamingo_rt.models.xattn.GatedCrossAttentionBlock`) with weights of one dtype.
Otherwise the eager modules run. The export's decode package
(:class:`~flamingo_rt.export.modules.DecodeStep`) calls the same ops through :func:`layer_plan`
and :func:`run_layers` over the host's caches. ``FLAMINGO_RT_FUSED_DECODE=0`` in the
environment, or :func:`set_enabled` (False), turns the fused path off (for comparisons; at
export time it compiles the modules into the decode package).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import _ext
from ..models.lm import DecoderLayer, DecoderLM
from ..models.xattn import GatedCrossAttentionBlock
from ..ops import backend as _backend
from .cache import StaticCache

#: most rows a fused step takes (the small-batch product kernel's limit)
MAX_ROWS = 16
_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_enabled = os.environ.get("FLAMINGO_RT_FUSED_DECODE", "1") != "0"


def set_enabled(flag: bool) -> bool:
    """Turn the fused decode path on or off for this process; returns the previous setting."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


def enabled() -> bool:
    """Whether the fused decode path may run (see :func:`set_enabled`)."""
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The eager modules for every decode step inside the block."""
    old = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(old)


def _weights_ok(tensors, dtype: torch.dtype) -> bool:
    return all(t is not None and t.dtype == dtype and t.is_cpu and t.is_contiguous() for t in tensors)


# Submodules and parameters are read from the modules' own dicts (``_modules``,
# ``_parameters``), not through nn.Module.__getattr__: the plan is rebuilt at every step
# (weights may be replaced between steps), ~750 lookups for a 12-layer model.
def _sub(m, name: str):
    return m._modules[name]


def _w(m) -> Optional[torch.Tensor]:
    return m._parameters["weight"]


def _b(m) -> Optional[torch.Tensor]:
    return m._parameters.get("bias")


def _layer_args(layer: DecoderLayer, dtype: torch.dtype) -> Optional[Tuple[list, list, float, float, float]]:
    """(weights, biases, eps1, eps2, scale) of ``flamingo_rt_C::decoder_layer_step_`` for a
    stock decoder layer whose weights are all of ``dtype``; None for anything else."""
    if type(layer) is not DecoderLayer:
        return None
    a, m = _sub(layer, "self_attn"), _sub(layer, "mlp")
    n1, n2 = _sub(layer, "input_layernorm"), _sub(layer, "post_attention_layernorm")
    lin = [_sub(a, "q_proj"), _sub(a, "k_proj"), _sub(a, "v_proj"), _sub(a, "o_proj"),
           _sub(m, "gate_proj"), _sub(m, "up_proj"), _sub(m, "down_proj")]
    weights = [_w(n1), _w(lin[0]), _w(lin[1]), _w(lin[2]), _w(lin[3]), _w(n2), _w(lin[4]), _w(lin[5]), _w(lin[6])]
    biases = [_b(x) for x in lin]
    if not _weights_ok(weights, dtype) or not _weights_ok([b for b in biases if b is not None], dtype):
        return None
    return weights, biases, n1.eps, n2.eps, a.scale


def _block_args(block, dtype: torch.dtype) -> Optional[Tuple[list, list, bool, bool, float, float]]:
    """(weights, gates, all_previous, squared_relu, attn_eps, ff_eps) of
    ``flamingo_rt_C::xattn_block_step_`` for a stock gated cross-attention block; None otherwise."""
    if type(block) is not GatedCrossAttentionBlock:
        return None
    a, ff = _sub(block, "attn"), _sub(block, "ff")
    an, fn = _sub(a, "norm"), _sub(ff, "norm")
    q, out, fc1, fc2 = _sub(a, "to_q"), _sub(a, "to_out"), _sub(ff, "fc1"), _sub(ff, "fc2")
    if ff.kind not in ("gelu", "sqrelu") or any(_b(x) is not None for x in (q, out, fc1, fc2)):
        return None
    weights = [_w(an), _b(an), _w(q), _w(out), _w(fn), _b(fn), _w(fc1), _w(fc2)]
    gates = [block._parameters["attn_gate"], block._parameters["ff_gate"]] if block.gated else [None, None]
    if not _weights_ok(weights, dtype) or not _weights_ok([g for g in gates if g is not None], dtype):
        return None
    return weights, gates, block.all_previous, ff.kind == "sqrelu", an.eps, fn.eps


def eligible(lm: DecoderLM, cache: StaticCache, ids: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether the fused ops may run the layers of this chunk: one token per row, at most
    :data:`MAX_ROWS` rows, on the CPU, eager (no gradient, autocast, compile, export), the
    default or ``"cpu"`` backend, the path :func:`enabled` and the extension loaded.
    (The model's own structure and dtypes are checked by :func:`layer_plan`.)"""
    if torch.compiler.is_compiling() or _backend.exporting():  # first: nothing else is traced
        return False
    return (_enabled and ids.dim() == 2 and ids.shape[1] == 1 and 0 < ids.shape[0] <= MAX_ROWS
            and ids.device.type == "cpu" and cache.dtype in _DTYPES and backend in (None, "cpu")
            and not torch.is_grad_enabled() and not lm.training and not torch.is_autocast_enabled("cpu")
            and _ext.load())


def layer_plan(lm: DecoderLM, dtype: torch.dtype) -> Optional[List[tuple]]:
    """Per layer i: (block args or None, layer args) for the fused ops, or None when a layer
    or block is not a stock module with weights of ``dtype`` (the cache's; the eager modules
    then run)."""
    if _w(_sub(lm, "embed_tokens")).dtype != dtype:
        return None
    plan = []
    blocks = _sub(lm, "xattn")._modules
    for i, layer in enumerate(_sub(lm, "layers")._modules.values()):
        block = blocks.get(str(i))
        b = None if block is None else _block_args(block, dtype)
        la = _layer_args(layer, dtype)
        if la is None or (block is not None and b is None):
            return None
        plan.append((b, la))
    return plan


def run_layers(plan: List[tuple], kv: Sequence[Tuple[torch.Tensor, torch.Tensor]],
               media_kv: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], h: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, media_index: torch.Tensor) -> torch.Tensor:
    """The layers of one decode step through the fused ops.

    Args:
        plan: :func:`layer_plan`'s list.
        kv: per decoder layer the (k, v) caches, each (B, Hkv, S, Dh) (written at ``slots``).
        media_kv: per block (key ``str(i)``) the cached media (k, v), each (B, M, L, H, dh).
        h: (B, 1, D) embedded tokens; cos, sin: (B, 1, Dh) float32 rotary tables.
        slots: (1,) int64 cache slot of the token; mask: (B, 1, 1, E) bool over the
            cache's first E slots; media_index: (B, 1) int32 (-1: no image).
    Returns:
        (B, 1, D) hidden states after the last layer.
    """
    B, _, D = h.shape
    x = h.reshape(B, D).clone()
    c, s = cos[:, 0].contiguous(), sin[:, 0].contiguous()
    m = mask[:, 0, 0]
    if m.shape[-1] > 1 and m.stride(-1) != 1:
        m = m.contiguous()
    idx = media_index[:, 0].contiguous()
    step_layer = torch.ops.flamingo_rt_C.decoder_layer_step_
    step_block = torch.ops.flamingo_rt_C.xattn_block_step_
    for i, (b, la) in enumerate(plan):
        if b is not None:
            k, v = media_kv[str(i)]
            step_block(x, b[0], b[1], k, v, idx, b[2], b[3], b[4], b[5])
        kc, vc = kv[i]
        step_layer(x, la[0], la[1], c, s, kc, vc, slots, m, la[2], la[3], la[4])
    return x.view(B, 1, D)
