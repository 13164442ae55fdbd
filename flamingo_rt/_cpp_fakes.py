"""Fake (meta) kernels of the C++ ops in ``torch.ops.flamingo_rt_C``.

They live in Python, not C++, because they must work on symbolic shapes: ``torch.export``
with dynamic dimensions (the token count of a prefill chunk, the frames of a clip) traces
through them without specialising, while C++ meta kernels read concrete sizes. They
check what the C++ kernels check about shapes and dtypes, with the same messages, and
return outputs with the C++ kernels' shapes, dtypes and memory formats.
Registered by :func:`flamingo_rt._ext.load` right after the library loads.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_done = False


def _fmt(x: Tensor) -> torch.memory_format:
    return torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                   and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format


def _check_bga(op: str, x: Tensor, bias: Optional[Tensor], act: str) -> None:
    torch._check(x.dim() == 4, lambda: f"{op}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == x.shape[1],
                     lambda: f"{op}: expected bias of shape (C,) = ({x.shape[1]},) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(bias.shape)}")
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: expected bias of dtype {x.dtype}, got {bias.dtype}")
    torch._check(act in ("gelu", "relu", "silu"),
                 lambda: f"{op}: expected act to be one of 'gelu', 'relu', 'silu', got '{act}'")
    torch._check(x.dtype in _FLOATS, lambda: f"{op}: expected x of dtype float32, bfloat16, float16 or float64, "
                                            f"got {x.dtype}")


def register() -> None:
    """Register every fake kernel once (after ``flamingo_rt._C`` loaded)."""
    global _done
    if _done:
        return
    _done = True

    @torch.library.register_fake("flamingo_rt_C::bias_gamma_act")
    def _(x, bias, act, gamma):
        _check_bga("bias_gamma_act", x, bias, act)
        return torch.empty_like(x, memory_format=_fmt(x))

    @torch.library.register_fake("flamingo_rt_C::bias_gamma_act_backward")
    def _(grad_out, x, bias, act, gamma):
        _check_bga("bias_gamma_act_backward", x, bias, act)
        torch._check(grad_out.shape == x.shape, lambda: f"bias_gamma_act_backward: expected grad_out of shape "
                                                       f"{tuple(x.shape)}, got {tuple(grad_out.shape)}")
        return torch.empty_like(x, memory_format=_fmt(x)), x.new_empty((x.shape[1],))

    def _check_xattn(op, q, k, v, media_index):
        torch._check(q.dim() == 4 and k.dim() == 5 and v.shape == k.shape,
                     lambda: f"{op}: expected q (B, T, H, dh) and k, v (B, M, N, H, dh), got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        torch._check(media_index.dim() == 2 and media_index.shape[0] == q.shape[0]
                     and media_index.shape[1] == q.shape[1],
                     lambda: f"{op}: expected media_index of shape (B, T) = ({q.shape[0]}, {q.shape[1]}), "
                             f"got {tuple(media_index.shape)}")
        torch._check(q.dtype == k.dtype == v.dtype and q.dtype in _FLOATS,
                     lambda: f"{op}: expected q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")

    @torch.library.register_fake("flamingo_rt_C::image_causal_attention")
    def _(q, k, v, media_index, all_previous, scale):
        _check_xattn("image_causal_attention", q, k, v, media_index)
        return q.new_empty(q.shape)

    @torch.library.register_fake("flamingo_rt_C::image_causal_attention_backward")
    def _(grad_out, q, k, v, media_index, all_previous, scale):
        _check_xattn("image_causal_attention_backward", q, k, v, media_index)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("flamingo_rt_C::decode_attention")
    def _(q, k, v, mask, scale):
        torch._check(q.dim() == 4 and k.dim() == 4 and k.shape == v.shape,
                     lambda: f"decode_attention: expected q (B, H, 1, Dh) and k, v (B, Hkv, S, Dh), got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        return q.new_empty(q.shape)

    @torch.library.register_fake("flamingo_rt_C::decoder_layer_step_")
    def _(h, weights, biases, cos, sin, k_cache, v_cache, slot, mask, eps1, eps2, scale):
        torch._check(h.dim() == 2 and len(weights) == 9 and len(biases) == 7,
                     lambda: f"decoder_layer_step_: expected h (B, D), 9 weights and 7 biases, got "
                             f"{tuple(h.shape)}, {len(weights)}, {len(biases)}")
        return None

    @torch.library.register_fake("flamingo_rt_C::xattn_block_step_")
    def _(h, weights, gates, k, v, media_index, all_previous, squared_relu, attn_eps, ff_eps):
        torch._check(h.dim() == 2 and k.dim() == 5 and len(weights) == 8 and len(gates) == 2,
                     lambda: f"xattn_block_step_: expected h (B, D), k (B, M, N, H, Dh), 8 weights and 2 gates, "
                             f"got {tuple(h.shape)}, {tuple(k.shape)}, {len(weights)}, {len(gates)}")
        return None

    @torch.library.register_fake("flamingo_rt_C::small_linear")
    def _(x, w, bias):
        torch._check(x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1],
                     lambda: f"small_linear: expected x (B, K) and w (N, K), got {tuple(x.shape)}, {tuple(w.shape)}")
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("flamingo_rt_C::layer_norm_rows")
    def _(x, weight, bias, eps, out_dtype):
        torch._check(x.dim() == 2, lambda: f"layer_norm_rows: expected x (R, D), got shape {tuple(x.shape)}")
        R = x.shape[0]
        return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty((R, 1), dtype=torch.float32),
                x.new_empty((R, 1), dtype=torch.float32))

    @torch.library.register_fake("flamingo_rt_C::softmax_xent_rows_")
    def _(logits, targets, ignore_index, write_grad, scale):
        torch._check(logits.dim() == 2, lambda: f"softmax_xent_rows_: expected logits (N, V), got {tuple(logits.shape)}")
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("flamingo_rt_C::conv3x3_winograd_weight")
    def _(w, groups, transposed=False):
        torch._check(w.dim() == 4 and w.shape[2] == 3 and w.shape[3] == 3,
                     lambda: f"conv3x3_winograd_weight: expected a weight of shape (C_out, C_in/groups, 3, 3), "
                             f"got {tuple(w.shape)}")
        if transposed:
            return w.new_empty((36 * groups, w.shape[0] // groups, w.shape[1]))
        return w.new_empty((36 * groups, w.shape[1], w.shape[0] // groups))

    @torch.library.register_fake("flamingo_rt_C::conv3x3_winograd_weight_grad")
    def _(x, dy, groups, chunk_tiles=0, products="auto"):
        torch._check(x.dim() == 4 and dy.dim() == 4,
                     lambda: f"conv3x3_winograd_weight_grad: expected x (N, C_in, H, W) and dy (N, C_out, H, W), "
                             f"got {tuple(x.shape)} and {tuple(dy.shape)}")
        return x.new_empty((dy.shape[1], x.shape[1] // groups, 3, 3))

    @torch.library.register_fake("flamingo_rt_C::conv3x3_winograd")
    def _(x, u, bias, groups, act, gamma, chunk_tiles=0, products="auto"):
        torch._check(x.dim() == 4 and u.dim() == 3 and u.shape[0] == 36 * groups,
                     lambda: f"conv3x3_winograd: expected x (N, C_in, H, W) and u (36 * groups, C_in/groups, "
                             f"C_out/groups), got {tuple(x.shape)} and {tuple(u.shape)}")
        n, _, h, w = x.shape
        return x.new_empty((n, u.shape[2] * groups, h, w)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("flamingo_rt_C::conv3x3_winograd_bf16_weight_transpose")
    def _(u, groups):
        torch._check(u.dim() == 4 and u.shape[0] == 16 * groups and u.shape[3] == 2,
                     lambda: f"conv3x3_winograd_bf16_weight_transpose: expected u of shape (16 * groups, k_in/2, "
                             f"k_out, 2), got {tuple(u.shape)}")
        return u.new_empty((16 * groups, u.shape[2] // 2, u.shape[1] * 2, 2))

    @torch.library.register_fake("flamingo_rt_C::conv3x3_winograd_bf16_weight")
    def _(w, groups, transposed=False):
        torch._check(w.dim() == 4 and w.shape[2] == 3 and w.shape[3] == 3,
                     lambda: f"conv3x3_winograd_bf16_weight: expected a weight of shape (C_out, C_in/groups, 3, 3), "
                             f"got {tuple(w.shape)}")
        ci, cog = w.shape[1], w.shape[0] // groups
        if transposed:
            return w.new_empty((16 * groups, cog // 2, ci, 2), dtype=torch.bfloat16)
        return w.new_empty((16 * groups, ci // 2, cog, 2), dtype=torch.bfloat16)

    @torch.library.register_fake("flamingo_rt_C::conv3x3_winograd_bf16_weight_grad")
    def _(x, dy, groups, chunk_tiles=0, products="auto", bf16_out=False):
        torch._check(x.dim() == 4 and dy.dim() == 4,
                     lambda: f"conv3x3_winograd_bf16_weight_grad: expected x (N, C_in, H, W) and dy (N, C_out, H, W), "
                             f"got {tuple(x.shape)} and {tuple(dy.shape)}")
        return x.new_empty((dy.shape[1], x.shape[1] // groups, 3, 3),
                           dtype=torch.bfloat16 if bf16_out else torch.float32)

    @torch.library.register_fake("flamingo_rt_C::conv3x3_winograd_bf16")
    def _(x, u, bias, groups, act, gamma, chunk_tiles=0, products="auto"):
        torch._check(x.dim() == 4 and u.dim() == 4 and u.shape[0] == 16 * groups,
                     lambda: f"conv3x3_winograd_bf16: expected x (N, C_in, H, W) and u (16 * groups, C_in/groups/2, "
                             f"C_out/groups, 2), got {tuple(x.shape)} and {tuple(u.shape)}")
        n, _, h, w = x.shape
        return x.new_empty((n, u.shape[2] * groups, h, w)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("flamingo_rt_C::transpose_copy")
    def _(a):
        torch._check(a.dim() == 2, lambda: f"transpose_copy: expected a 2-D tensor, got shape {tuple(a.shape)}")
        return a.new_empty((a.shape[1], a.shape[0]))
