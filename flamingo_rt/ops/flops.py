"""FLOP formulas of the flamingo_rt ops for ``torch.utils.flop_counter.FlopCounterMode``.

These make model FLOP counts (also on the meta device) include our custom ops. The
image-causal attention counts the work it must do: each token scores against the N
tokens of its own image (immediate mode) or, as an upper bound, against all M*N
(all-previous mode); a matrix product of (a x b) by (b x c) is 2abc FLOPs.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

_REGISTERED = False


def _shape(t):
    return tuple(t.shape)


def register() -> None:
    """Register the formulas once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    ops = torch.ops.flamingo_rt

    @register_flop_formula(ops.image_causal_attention, get_raw=True)
    def _xattn_fwd(q, k, v, media_index, all_previous, scale, backend, *args, out_val=None, **kw):
        B, T, H, dh = _shape(q)
        M, N = _shape(k)[1:3]
        keys = M * N if all_previous else N
        return 4 * B * T * keys * H * dh

    @register_flop_formula(ops.image_causal_attention_backward, get_raw=True)
    def _xattn_bwd(grad_out, q, k, v, media_index, all_previous, scale, backend, *args, out_val=None, **kw):
        B, T, H, dh = _shape(q)
        M, N = _shape(k)[1:3]
        keys = M * N if all_previous else N
        return 10 * B * T * keys * H * dh  # recompute S, then dV, dP, dQ, dK

    @register_flop_formula(ops.resampler_attention, get_raw=True)
    def _res_fwd(q, k_x, v_x, k_l, v_l, scale, backend, *args, out_val=None, **kw):
        n, L, H, dh = _shape(q)
        keys = _shape(k_x)[1] + L
        return 4 * n * L * keys * H * dh

    @register_flop_formula(ops.resampler_attention_backward, get_raw=True)
    def _res_bwd(grad_out, q, k_x, v_x, k_l, v_l, scale, backend, *args, out_val=None, **kw):
        n, L, H, dh = _shape(q)
        keys = _shape(k_x)[1] + L
        return 10 * n * L * keys * H * dh

    @register_flop_formula(ops.norm_project, get_raw=True)
    def _np_fwd(x, gammas, betas, weights, eps, compute_dtype, *args, out_val=None, **kw):
        R, D = _shape(x)
        return sum(2 * R * D * _shape(w)[0] for w in weights)

    @register_flop_formula(ops.norm_project_backward, get_raw=True)
    def _np_bwd(grads, x, gammas, betas, weights, eps, compute_dtype, need_dx, *args, out_val=None, **kw):
        R, D = _shape(x)
        return sum(2 * R * D * _shape(w)[0] for w in weights) * (2 if need_dx else 1)

    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        # oneDNN's products (ops.cpu_gemm's float32 ones, ops.fused_linear's), counted as the
        # mm / addmm they replace. One formula serves both overloads: (x, w, bias, ...) and
        # binary (x, other, w, bias, ...), told apart by the 2-D weight after ``other``
        # (a bias is 1-D)
        @register_flop_formula(torch.ops.mkldnn._linear_pointwise, get_raw=True)
        def _onednn_linear(x, w, *args, out_val=None, **kw):
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
                w = args[0]  # binary: the second argument was the addend
            return 2 * (x.numel() // _shape(x)[-1]) * _shape(x)[-1] * _shape(w)[0]

    @register_flop_formula(ops.feed_forward, get_raw=True)
    def _ff_fwd(x, gamma, beta, w1, w2, *args, out_val=None, **kw):
        D = _shape(x)[-1]  # x (..., D): the op takes rows or (B, T, D)
        return 4 * (x.numel() // D) * D * _shape(w1)[0]

    @register_flop_formula(ops.gated_linear_residual, get_raw=True)
    def _glr_fwd(x, o, weight, *args, out_val=None, **kw):
        R, K = _shape(o)
        return 2 * R * K * _shape(weight)[0]

    @register_flop_formula(ops.gated_linear_residual_backward, get_raw=True)
    def _glr_bwd(dz, o, weight, *args, out_val=None, **kw):
        R, K = _shape(o)
        return 4 * R * K * _shape(weight)[0]  # dW, d(o)

    @register_flop_formula(ops.feed_forward_backward, get_raw=True)
    def _ff_bwd(dy, x, gamma, beta, w1, w2, h, *args, out_val=None, **kw):
        R, D = _shape(x)
        return 8 * R * D * _shape(w1)[0]  # dW2, dA, dW1, d(norm input)

    cpp = getattr(torch.ops, "flamingo_rt_C", None)
    if cpp is not None and hasattr(cpp, "conv3x3_winograd"):
        # the Winograd 3x3 convolutions (ops.winograd_conv), counted as the direct convolution
        # they compute (as FlopCounterMode counts a convolution), not the 36-point products
        @register_flop_formula(cpp.conv3x3_winograd, get_raw=True)
        def _wino_fwd(x, u, bias, groups, *args, out_val=None, **kw):
            n, c, h, w = _shape(x)
            return 2 * n * h * w * c * _shape(u)[2] * 9  # (C_in/g) * C_out = C_in * (C_out/g)

        if hasattr(cpp, "conv3x3_winograd_bf16"):
            @register_flop_formula(cpp.conv3x3_winograd_bf16, get_raw=True)
            def _wino_bf16_fwd(x, u, bias, groups, *args, out_val=None, **kw):
                n, c, h, w = _shape(x)
                return 2 * n * h * w * c * _shape(u)[2] * 9

            @register_flop_formula(cpp.conv3x3_winograd_bf16_weight_grad, get_raw=True)
            def _wino_bf16_wgrad(x, dy, groups, *args, out_val=None, **kw):
                n, c, h, w = _shape(x)
                return 2 * n * h * w * c * _shape(dy)[1] * 9 // groups

        @register_flop_formula(cpp.conv3x3_winograd_weight_grad, get_raw=True)
        def _wino_wgrad(x, dy, groups, *args, out_val=None, **kw):
            n, c, h, w = _shape(x)
            return 2 * n * h * w * c * _shape(dy)[1] * 9 // groups
