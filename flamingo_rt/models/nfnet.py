"""NFNet vision encoder, structured as timm's ``dm_nfnet_f*`` so that timm state dicts
load by name (``stem.*``, ``stages.*``, ``final_conv.*``; timm's ``head.*`` is not used).

Structure (DESIGN.md section 1), for an :class:`~flamingo_rt.models.config.NFNetConfig`:

- stem ("deep_quad"): four 3x3 scaled-WS convs with widths stem/8, stem/4, stem/2, stem
  and strides 2, 1, 1, 2, a gamma-GELU between consecutive convs;
- four stages of :class:`NormFreeBlock` (stride 1 for the first stage, 2 for the others):
  ``out = gamma_gelu(x) * beta``; shortcut = x, or avgpool(2, ceil) + 1x1 conv of ``out``
  when the width or stride changes; residual = conv1 (1x1) -> gamma-GELU -> conv2 (3x3,
  grouped, strided) -> gamma-GELU -> conv2b (3x3, grouped) -> gamma-GELU -> conv3 (1x1)
  -> SE (gain ``attn_gain``); block output = shortcut + alpha * skipinit_gain * residual;
- final 1x1 scaled-WS conv to ``num_features`` and a gamma-GELU.

All convs are scaled weight-standardized with TF-style SAME padding
(:func:`flamingo_rt.ops.ws_conv2d`); each conv followed by an activation feeds its bias
into :func:`flamingo_rt.ops.bias_gamma_act`; each block ends in
:func:`flamingo_rt.ops.se_residual`.

Frozen fast path (:meth:`NFNet.freeze`, the default for a frozen Flamingo): every scalar
applied to a conv's input (the block pre-activation's gamma * beta, each inner
gamma-GELU's gamma) is folded into that conv's standardized weight once (exact: a conv is
linear in its input, SAME zero padding and average pooling commute with a scalar), so each
conv's tail is ``gelu(conv + bias)``: one fused call (:func:`flamingo_rt.ops.nfconv.conv2d_bias_act`:
oneDNN conv + bias + GELU post-op on the CPU with prepacked weights, the Triton
implicit-GEMM NHWC conv with the epilogue fused on the GPU), activations channels-last,
SE logits in float32, and many frames encoded in chunks (``chunk_size``).

On the CPU the forward (fast or not) runs in a :func:`flamingo_rt.runtime.cpu_cache.scope`:
its large activations come from blocks that stay mapped between calls instead of fresh
``mmap``s that fault every page in (``FLAMINGO_RT_CPU_CACHE=0`` turns it off).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import half_widening
from ..ops import nfconv as _ops
from ..ops import winograd_conv as _wino
from ..ops.linear import linear as _linear
from ..ops.linear import linear_bf16_weight as _linear_bf16_weight
from ..runtime import cpu_cache
from .config import NFNetConfig

#: timm's (and DeepMind's) signal-preserving gamma of the exact-erf GELU.
GELU_GAMMA = 1.7015043497085571
#: timm rounds every width to a multiple of this.
CH_DIV = 8


def make_divisible(v: float, divisor: int = CH_DIV, round_limit: float = 0.9) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``divisor``), going up
    one step when rounding would lose more than ``1 - round_limit`` of ``v`` (timm's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ScaledStdConv2d(nn.Module):
    """Conv2d with scaled weight standardization and TF-style SAME padding.

    Parameters (timm's names and shapes): ``weight`` (O, I/groups, k, k), ``bias`` (O,),
    ``gain`` (O, 1, 1, 1).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        eps: float = 1e-5,
        gain_init: float = 1.0,
    ):
        super().__init__()
        if in_chs % groups or out_chs % groups:
            raise ValueError(f"expected channels {in_chs} -> {out_chs} divisible by groups {groups}")
        self.in_chs, self.out_chs = in_chs, out_chs
        self.kernel_size, self.stride, self.groups, self.eps = kernel_size, stride, groups, eps
        self.gain_init = gain_init
        self.weight = nn.Parameter(torch.empty(out_chs, in_chs // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_chs))
        self.gain = nn.Parameter(torch.empty(out_chs, 1, 1, 1))
        # the standardized weight, computed once by fold() for frozen inference (not saved)
        self.register_buffer("folded_weight", None, persistent=False)
        self._folded_versions = None
        #: exact scalar the frozen fast path folds into this conv's weight: the scale of the
        #: conv's input that the preceding op no longer applies (see NFNet.freeze)
        self.in_scale = 1.0
        self._fast = None  # (folded_weight it was made from, fast weight)
        self._packed = None  # (fast weight it was made from, packed weight)
        self._mk = None  # (fast weight it was made from, {(input shape, dtype): oneDNN weight})
        self._wino = None  # (fast weight it was made from, Winograd-transformed weight)
        self._wino16 = None  # the same for the bfloat16 F(2x2, 3x3) Winograd convolution
        self.reset_parameters()

    def fold(self) -> None:
        """Compute the standardized weight once (exact: the same op as every forward) and
        use it while no gradient to the weight or gain is needed. Recomputed by itself
        when the weight or gain change in place (e.g. ``load_state_dict``)."""
        with torch.no_grad():
            self.folded_weight = _ops.ws_standardize(self.weight, self.gain, self.eps).detach()
        self._folded_versions = (self.weight._version, self.gain._version)

    def unfold(self) -> None:
        self.folded_weight = None
        self._folded_versions = None
        self._fast = None
        self._packed = None
        self._mk = None
        self._wino = None
        self._wino16 = None

    def fast_weight(self, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """The frozen fast path's weight: ``ws_standardize(weight, gain) * in_scale``,
        computed in float32 (float64 for float64) and rounded once to the weight's dtype,
        stored in ``memory_format`` (channels-last for channels-last activations: oneDNN
        then reads it without a per-call reorder). Refreshed when the folded weight is
        (weights changed in place, moved, recast)."""
        fw = self._standardized()
        if fw is None:
            fw = _ops.ws_standardize(self.weight.detach(), self.gain.detach(), self.eps)
        if self._fast is None or self._fast[0] is not fw:
            with torch.no_grad():
                ct = torch.promote_types(fw.dtype, torch.float32)
                w = _ops.ws_standardize(self.weight.to(ct), self.gain.to(ct), self.eps)
                w = (w * self.in_scale).to(fw.dtype)
            self._fast = (fw, {torch.contiguous_format: w.detach()})
        cache = self._fast[1]
        if memory_format not in cache:
            cache[memory_format] = cache[torch.contiguous_format].contiguous(memory_format=memory_format)
        return cache[memory_format]

    def mkldnn_weight(self, x_shape, dtype: torch.dtype) -> Optional[Tensor]:
        """fast_weight reordered once for oneDNN (CPU) and inputs of ``x_shape``; a few
        input shapes are cached (e.g. full batches and the last chunk)."""
        w = self.fast_weight()
        if self._mk is None or self._mk[0] is not w:
            self._mk = (w, {})
        cache = self._mk[1]
        key = (tuple(x_shape), dtype)
        if key not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = _ops.mkldnn_pack_conv_weight(w.to(dtype), x_shape, self.stride, self.groups)
        return cache[key]

    def winograd_weight(self) -> Tensor:
        """fast_weight transformed once for the CPU Winograd convolution
        (:func:`flamingo_rt.ops.winograd_conv.winograd_weight`; 3x3 float32 weights), cached."""
        w = self.fast_weight()
        if self._wino is None or self._wino[0] is not w:
            self._wino = (w, _wino.winograd_weight(w, self.groups))
        return self._wino[1]

    def winograd_weight_bf16(self) -> Tensor:
        """fast_weight transformed once for the bfloat16 F(2x2, 3x3) Winograd convolution
        (:func:`flamingo_rt.ops.winograd_conv.winograd_weight_bf16`), cached."""
        w = self.fast_weight()
        if self._wino16 is None or self._wino16[0] is not w:
            self._wino16 = (w, _wino.winograd_weight_bf16(w, self.groups))
        return self._wino16[1]

    def __getstate__(self):
        # derived caches (opaque oneDNN tensors among them) are not copied or pickled
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_fast"] = state["_packed"] = state["_mk"] = state["_wino"] = state["_wino16"] = None
        return state

    def packed_weight(self, dtype: torch.dtype) -> Tensor:
        """fast_weight in the Triton NHWC conv's layout and ``dtype``, cached."""
        w = self.fast_weight()
        if self._packed is None or self._packed[0] is not w or self._packed[1].dtype != dtype:
            self._packed = (w, _ops.pack_conv_weight(w.to(dtype)))
        return self._packed[1]

    def _standardized(self) -> Optional[Tensor]:
        """The folded weight when it may be used now, else None (standardize in the graph)."""
        if self.folded_weight is None:
            return None
        if torch.is_grad_enabled() and (self.weight.requires_grad or self.gain.requires_grad):
            return None  # training the encoder: exact gradients through the standardization
        if torch.compiler.is_compiling():
            return self.folded_weight
        if self._folded_versions != (self.weight._version, self.gain._version) or (
            self.folded_weight.device != self.weight.device or self.folded_weight.dtype != self.weight.dtype
        ):
            self.fold()  # weights changed (or moved) since folding
        return self.folded_weight

    def reset_parameters(self) -> None:
        """timm's init: Kaiming-normal (fan_in, linear) weight, zero bias, constant gain."""
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.bias)
        nn.init.constant_(self.gain, self.gain_init)

    def _conv(self, x: Tensor, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
        w = self._standardized()
        if w is not None:
            return _ops.conv2d_padded(x, w, bias, self.stride, self.groups, "same")
        return _ops.ws_conv2d(x, self.weight, self.gain, bias, self.stride, self.groups, self.eps, "same", backend)

    def forward(self, x: Tensor, backend: Optional[str] = None) -> Tensor:
        """(N, I, H, W) -> (N, O, ceil(H / stride), ceil(W / stride)), bias included."""
        return self._conv(x, self.bias, backend)

    def forward_act(self, x: Tensor, gamma: float, backend: Optional[str] = None) -> Tensor:
        """``gamma * gelu(conv(x) + bias)``: the conv without bias, then the fused
        bias + GELU + gamma op."""
        y = self._conv(x, None, backend)
        bias = self.bias
        if bias is not None and bias.dtype != y.dtype:  # autocast: the conv ran in lower precision
            bias = bias.to(y.dtype)
        return _ops.bias_gamma_act(y, bias, "gelu", gamma, backend=backend)

    def extra_repr(self) -> str:
        return (
            f"{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, eps={self.eps}"
        )


def fast_conv(x: Tensor, conv: "ScaledStdConv2d", act: bool, backend: Optional[str] = None) -> Tensor:
    """One conv of the frozen fast path: ``gelu(conv(x, fast_weight) + bias)`` when ``act``
    (no gamma: it is folded into the next conv's weight), else ``conv(x, fast_weight) + bias``,
    through :func:`flamingo_rt.ops.nfconv.conv2d_bias_act` (GPU: the Triton NHWC conv with
    bias + GELU in its epilogue; CPU: one oneDNN conv + bias + GELU primitive, or for float32
    3x3 stride-1 convs the Winograd convolution with bias + GELU in its output transform,
    bfloat16 ones F(2x2, 3x3) Winograd where :func:`~flamingo_rt.ops.winograd_conv.eligible_bf16`
    says so, :mod:`flamingo_rt.ops.winograd_conv`)."""
    if (x.device.type == "cpu" and conv.kernel_size == 3 and all(isinstance(d, int) for d in x.shape)
            and not (torch.is_grad_enabled() and x.requires_grad)):
        w_raw, tail = conv.weight.detach(), "gelu" if act else "none"
        if _wino.eligible(x, w_raw, conv.stride, conv.groups):
            return _wino.conv3x3_winograd(x, conv.winograd_weight(), conv.bias.detach(), conv.groups, tail)
        if _wino.eligible_bf16(x, w_raw, conv.stride, conv.groups):
            return _wino.conv3x3_winograd_bf16(x, conv.winograd_weight_bf16(), conv.bias.detach(), conv.groups, tail)
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    w = conv.fast_weight(torch.channels_last if cl else torch.contiguous_format)
    packed = None
    if torch.compiler.is_compiling() or not all(isinstance(d, int) for d in x.shape):
        pass  # traced (compile / export): plain weights, the graph holds no opaque tensors
    elif x.device.type == "cuda":
        packed = conv.packed_weight(x.dtype)
    elif x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        packed = conv.mkldnn_weight(x.shape, x.dtype)
    return _ops.conv2d_bias_act(x, w, conv.bias, conv.stride, conv.groups, "gelu" if act else "none",
                                1.0, packed=packed, backend=backend)


class Stem(nn.Module):
    """timm's "deep_quad" stem: conv1..conv4 (3x3; strides 2, 1, 1, 2), gamma-GELU between."""

    def __init__(self, in_chans: int, out_chs: int, eps: float):
        super().__init__()
        widths = (out_chs // 8, out_chs // 4, out_chs // 2, out_chs)
        strides = (2, 1, 1, 2)
        prev = in_chans
        for i, (c, s) in enumerate(zip(widths, strides)):
            self.add_module(f"conv{i + 1}", ScaledStdConv2d(prev, c, 3, stride=s, eps=eps))
            prev = c
        for name in ("conv2", "conv3", "conv4"):  # each follows a gamma-GELU
            getattr(self, name).in_scale = GELU_GAMMA

    def forward(self, x: Tensor, backend: Optional[str] = None) -> Tensor:
        """(N, in_chans, H, W) -> (N, stem_chs, H / 4, W / 4) (ceil at each stride)."""
        x = self.conv1.forward_act(x, GELU_GAMMA, backend)
        x = self.conv2.forward_act(x, GELU_GAMMA, backend)
        x = self.conv3.forward_act(x, GELU_GAMMA, backend)
        return self.conv4(x, backend)

    def forward_fast(self, x: Tensor, backend: Optional[str] = None) -> Tensor:
        """Frozen fast path (gammas folded into conv2..conv4): same result as forward."""
        x = fast_conv(x, self.conv1, True, backend)
        x = fast_conv(x, self.conv2, True, backend)
        x = fast_conv(x, self.conv3, True, backend)
        return fast_conv(x, self.conv4, False, backend)


class DownsampleAvg(nn.Module):
    """Shortcut projection: 2x2 average pool (ceil mode, padding excluded) when strided,
    then a 1x1 scaled-WS conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, eps: float):
        super().__init__()
        self.stride = stride
        self.conv = ScaledStdConv2d(in_chs, out_chs, 1, eps=eps)

    def forward(self, x: Tensor, backend: Optional[str] = None) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, 2, self.stride, ceil_mode=True, count_include_pad=False)
        return self.conv(x, backend)

    def forward_fast(self, x: Tensor, backend: Optional[str] = None) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, 2, self.stride, ceil_mode=True, count_include_pad=False)
        return fast_conv(x, self.conv, False, backend)


class _MeanHW(torch.autograd.Function):
    """``x.mean(dim=(2, 3))`` (N, C, H, W) -> (N, C), whose gradient is an expanded view of
    ``dy / (H W)`` (the same values as mean's backward, which writes them out as a full
    contiguous (N, C, H, W) tensor). Autograd adds the view into the block's other gradient of
    x in one pass and in that gradient's memory format; the written-out quotient cost a pass
    more, and in channels-last bfloat16 training a mixed-layout add of 1.4-4.6 ms per block
    (~25 ms of an F0 bf16 step)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:
        n, c, h, w = ctx.shape
        return (dy / (h * w))[:, :, None, None].expand(n, c, h, w)


class SqueezeExcite(nn.Module):
    """SE gate logits: mean over H, W -> fc1 (1x1 conv, bias) -> ReLU -> fc2 (1x1 conv, bias).

    Kept as 1x1 ``nn.Conv2d`` parameters (timm's names and shapes), applied as matrix
    products on the pooled (N, C) vector. The sigmoid and product happen in
    :func:`flamingo_rt.ops.se_residual`.
    """

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        for m in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(m.bias)

    def _fast_params(self):
        """fc1 / fc2 as (out, in) matrices and biases for the frozen fast path, cached until a
        parameter changes: bfloat16 weights stay bfloat16 (read as they are by
        :func:`~flamingo_rt.ops.linear.linear_bf16_weight`: half the bytes of a widened copy,
        the same products) with float32 biases; other dtypes as float32 (float64 for
        float64)."""
        ct = torch.promote_types(self.fc1.weight.dtype, torch.float32)
        ps = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        keep_bf16 = self.fc1.weight.dtype == torch.bfloat16 and self.fc2.weight.dtype == torch.bfloat16

        def cast(p: Tensor) -> Tensor:  # (out, in, 1, 1) weights -> (out, in); biases as they are
            if p.dim() > 1:
                return p.flatten(1) if keep_bf16 else p.flatten(1).to(ct)
            return p.to(ct)

        if torch.compiler.is_compiling():  # traced: the casts go in the graph, no cache
            return tuple(cast(p) for p in ps)
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in ps)
        cache = getattr(self, "_fast_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, tuple(cast(p).contiguous() for p in ps))
            self._fast_cache = cache
        return cache[1]

    def forward_fast(self, x: Tensor) -> Tensor:
        """Frozen fast path: the same logits, pooled and computed in float32 (float64 for
        float64; a batch-1 bfloat16 GEMV is slow on the CPU and less accurate), returned
        in x's dtype. The few pooled rows go through :func:`flamingo_rt.ops.linear.linear`
        (the C++ small-batch kernel on the CPU: the products stream the weights once), or
        with bfloat16 weights :func:`~flamingo_rt.ops.linear.linear_bf16_weight`."""
        w1, b1, w2, b2 = self._fast_params()
        pooled = _ops.spatial_mean(x)
        if w1.dtype == torch.bfloat16:
            h = torch.relu(_linear_bf16_weight(pooled, w1, b1))
            return _linear_bf16_weight(h, w2, b2).to(x.dtype)
        h = torch.relu(_linear(pooled, w1, b1))
        return _linear(h, w2, b2).to(x.dtype)

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_fast_cache", None)
        return state

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C) pre-sigmoid gate logits."""
        pooled = _MeanHW.apply(x)
        lin = _linear if half_widening.wanted(pooled) else F.linear  # bf16 where torch's kernels are slow
        h = F.relu(lin(pooled, self.fc1.weight.flatten(1), self.fc1.bias))
        return lin(h, self.fc2.weight.flatten(1), self.fc2.bias)


class NormFreeBlock(nn.Module):
    """timm's ``NormFreeBlock`` as dm_nfnet builds it (pre-activation bottleneck with an
    extra 3x3 conv, SE after conv3, skipinit gain)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        alpha: float,
        beta: float,
        group_size: int,
        bottle_ratio: float,
        se_ratio: float,
        attn_gain: float,
        eps: float,
    ):
        super().__init__()
        mid_chs = make_divisible(out_chs * bottle_ratio)
        groups = mid_chs // group_size
        if groups < 1:
            raise ValueError(
                f"expected group_size <= bottleneck width {mid_chs} (out {out_chs} x bottle_ratio "
                f"{bottle_ratio}), got group_size {group_size}"
            )
        if group_size % CH_DIV == 0:
            mid_chs = group_size * groups
        self.alpha, self.beta, self.attn_gain = alpha, beta, attn_gain
        if in_chs != out_chs or stride != 1:
            self.downsample: Optional[DownsampleAvg] = DownsampleAvg(in_chs, out_chs, stride, eps)
        else:
            self.downsample = None
        self.conv1 = ScaledStdConv2d(in_chs, mid_chs, 1, eps=eps)
        self.conv2 = ScaledStdConv2d(mid_chs, mid_chs, 3, stride=stride, groups=groups, eps=eps)
        self.conv2b = ScaledStdConv2d(mid_chs, mid_chs, 3, groups=groups, eps=eps)
        self.conv3 = ScaledStdConv2d(mid_chs, out_chs, 1, eps=eps, gain_init=1.0)
        self.attn_last = SqueezeExcite(out_chs, make_divisible(out_chs * se_ratio, CH_DIV, round_limit=0.0))
        self.skipinit_gain = nn.Parameter(torch.tensor(0.0))
        # frozen fast path: the pre-activation's gamma * beta moves into the convs reading
        # it (conv1 and the shortcut conv, through the linear average pool); each later
        # gamma-GELU's gamma into the conv after it
        self.conv1.in_scale = GELU_GAMMA * beta
        if self.downsample is not None:
            self.downsample.conv.in_scale = GELU_GAMMA * beta
        for conv in (self.conv2, self.conv2b, self.conv3):
            conv.in_scale = GELU_GAMMA

    def forward(self, x: Tensor, backend: Optional[str] = None) -> Tensor:
        """(N, in_chs, H, W) -> (N, out_chs, ceil(H / stride), ceil(W / stride))."""
        out = _ops.bias_gamma_act(x, None, "gelu", GELU_GAMMA * self.beta, backend=backend)
        shortcut = x if self.downsample is None else self.downsample(out, backend)
        h = self.conv1.forward_act(out, GELU_GAMMA, backend)
        h = self.conv2.forward_act(h, GELU_GAMMA, backend)
        h = self.conv2b.forward_act(h, GELU_GAMMA, backend)
        h = self.conv3(h, backend)
        gate_logits = self.attn_last(h)
        scale = self.skipinit_gain * (self.alpha * self.attn_gain)
        return _ops.se_residual(h, gate_logits, shortcut, scale, backend=backend)

    def forward_fast(self, x: Tensor, backend: Optional[str] = None) -> Tensor:
        """Frozen fast path: the same block with gamma * beta and the gammas folded into
        the convs' weights (see NFNet.freeze); the GELUs run as conv post-ops."""
        out = _ops.bias_gamma_act(x, None, "gelu", 1.0, backend=backend)
        shortcut = x if self.downsample is None else self.downsample.forward_fast(out, backend)
        h = fast_conv(out, self.conv1, True, backend)
        h = fast_conv(h, self.conv2, True, backend)
        h = fast_conv(h, self.conv2b, True, backend)
        h = fast_conv(h, self.conv3, False, backend)
        gate_logits = self.attn_last.forward_fast(h)
        scale = self.skipinit_gain * (self.alpha * self.attn_gain)
        if scale.dtype != h.dtype:
            scale = scale.to(h.dtype)
        return _ops.se_residual(h, gate_logits, shortcut, scale, backend=backend)


class NFNet(nn.Module):
    """NFNet feature extractor (timm ``dm_nfnet_f*`` layout, no classifier head).

    Args:
        config: the :class:`NFNetConfig`. Widths are rounded to multiples of 8 exactly as
            timm rounds them.
        backend: default backend of every op (``None``: ``FLAMINGO_RT_BACKEND`` or auto);
            may be changed later through the ``backend`` attribute.

    ``forward(images)`` returns (N, S, Dv) tokens; ``forward_features`` the (N, Dv, h, w)
    grid with h = ceil(H / 32), w = ceil(W / 32).
    """

    def __init__(self, config: NFNetConfig, backend: Optional[str] = None):
        super().__init__()
        cfg = config
        if len(cfg.depths) != 4 or len(cfg.channels) != 4:
            raise ValueError(
                f"expected 4 stage depths and 4 channel counts, got depths {tuple(cfg.depths)} "
                f"and channels {tuple(cfg.channels)}"
            )
        if cfg.num_features <= 0:
            raise ValueError(f"expected num_features > 0, got {cfg.num_features}")
        self.config = cfg
        self.backend = backend
        #: frozen fast path on (set by freeze(fast=True); see freeze for the folds)
        self.fast = False
        #: channels-last activations (None: auto = yes; measured faster on the CPU with
        #: oneDNN, frozen and training, and on the GPU with cuDNN / bf16)
        self.channels_last: Optional[bool] = None
        #: encode at most this many images per pass (bounds activation memory when a
        #: batch holds many frames, e.g. every frame of every clip of a video batch);
        #: None: all at once. Not applied to symbolic batch sizes (torch.export / compile).
        self.chunk_size: Optional[int] = 256
        eps = cfg.std_conv_eps
        stem_chs = make_divisible(cfg.stem_chs)
        self.stem = Stem(cfg.in_chans, stem_chs, eps)
        prev = stem_chs
        expected_var = 1.0
        stages: List[nn.Sequential] = []
        for si, depth in enumerate(cfg.depths):
            stride = 1 if si == 0 else 2  # the deep_quad stem already has stride 4
            out_chs = make_divisible(cfg.channels[si])
            blocks = []
            for bi in range(depth):
                blocks.append(
                    NormFreeBlock(
                        prev, out_chs, stride if bi == 0 else 1, cfg.alpha, expected_var ** -0.5,
                        cfg.group_size, cfg.bottle_ratio, cfg.se_ratio, cfg.attn_gain, eps,
                    )
                )
                if bi == 0:
                    expected_var = 1.0
                expected_var += cfg.alpha ** 2
                prev = out_chs
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = make_divisible(cfg.num_features)
        self.final_conv = ScaledStdConv2d(prev, self.num_features, 1, eps=eps)

    # ---------------------------------------------------------------- forward

    def _check_images(self, images: Tensor) -> Tensor:
        c = self.config.in_chans
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != c:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (N, {c}, H, W), got {got}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"expected floating-point images, got {images.dtype}")
        dtype = self.final_conv.weight.dtype
        return images if images.dtype == dtype else images.to(dtype)

    def forward_features(self, images: Tensor) -> Tensor:
        """Feature grid.

        Args:
            images: (N, in_chans, H, W) float images (converted to the parameters' dtype).

        Returns:
            (N, num_features, ceil(H / 32), ceil(W / 32)) in the parameters' dtype: the
            output of final_conv and its gamma-GELU (timm's ``forward_features``). Unless
            ``channels_last`` is False the result is channels-last (same values and shape).

        With ``chunk_size`` set, the images go through in chunks of at most that many
        (the result is the same; activation memory is bounded by one chunk).
        """
        x = self._check_images(images)
        n = x.shape[0]
        cs = self.chunk_size
        if cs is not None and cs < 1:
            raise ValueError(f"expected chunk_size >= 1 or None, got {cs}")
        if cs is None or not isinstance(n, int) or n <= cs:
            return self._features(x)
        parts = [self._features(x[i:i + cs]) for i in range(0, n, cs)]
        return torch.cat(parts, dim=0)

    def _use_fast(self) -> bool:
        if not self.fast:
            return False
        # training the encoder (gradients to its parameters): the exact, unfolded graph
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.final_conv.parameters()))

    def _features(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self._features_in_scope(x)
        # activations (and, training, the tensors saved for backward) from the CPU block
        # cache: no page faults on fresh outputs
        with cpu_cache.scope():
            return self._features_in_scope(x)

    def _features_in_scope(self, x: Tensor) -> Tensor:
        be = self.backend
        if self._use_fast():
            return self._features_fast(x, be)
        if self.channels_last is not False:
            # channels-last activations here too: oneDNN's strided 3x3 backward runs 2.5-3x
            # faster on them, and ws_conv2d hands the convs channels-last weights
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x, be)
        for stage in self.stages:
            for block in stage:
                x = block(x, be)
        return self.final_conv.forward_act(x, GELU_GAMMA, be)

    def _features_fast(self, x: Tensor, be: Optional[str]) -> Tensor:
        if self.channels_last is not False:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem.forward_fast(x, be)
        for stage in self.stages:
            for block in stage:
                x = block.forward_fast(x, be)
        y = fast_conv(x, self.final_conv, True, be)
        return y.mul_(GELU_GAMMA) if not y.requires_grad else y * GELU_GAMMA

    def forward(self, images: Tensor) -> Tensor:
        """Visual tokens.

        Args:
            images: (N, in_chans, H, W) float images.

        Returns:
            (N, S, num_features) with S = h * w, the feature grid flattened row-major
            (a transposed view of :meth:`forward_features`' output).
        """
        return self.forward_features(images).flatten(2).transpose(1, 2)

    def freeze(self, fast: bool = True) -> "NFNet":
        """Eval mode, no parameter gradients, and every weight standardization folded once
        (exact; a frozen Flamingo vision encoder). ``unfreeze()`` undoes it.

        With ``fast`` (the default) the forward also takes the folded fast path:

        - exact folds (each conv is linear in its input, and SAME zero padding and the
          shortcut's average pool commute with a scalar): every scalar applied to a conv's
          *input* moves into that conv's weight. The block pre-activation
          ``gamma * beta * gelu(x)`` becomes ``gelu(x)`` with ``gamma * beta`` in conv1's
          and the shortcut conv's weights; each ``gamma * gelu(conv + b)`` inside the stem
          and the residual branch becomes ``gelu(conv + b)`` with gamma in the next conv's
          weight. The folded weights are standardized and scaled in float32 and rounded
          once, so features agree with the unfolded model within rounding.
        - not folded: the final gamma (nothing after it), the skipinit ``scale`` of
          ``se_residual`` (moving it into conv3 would need dividing SE's fc1 by it: not
          exact in floating point, and singular at the skipinit init of 0), and gamma
          into the *bias* or across a GELU (a positive scale does not commute with GELU).
        - with every gamma gone, a conv's tail is ``gelu(conv + bias)``: on the CPU one
          oneDNN primitive (conv, bias and GELU post-op), channels-last; elsewhere the
          conv and the fused bias + GELU op. Fewer passes: no separate bias/gamma pass.

        ``fast=False`` keeps the plain graph with only the standardization folded
        (bitwise equal to the unfrozen forward).
        """
        self.eval()
        self.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, ScaledStdConv2d):
                m.fold()
        self.fast = bool(fast)
        return self

    def unfreeze(self) -> "NFNet":
        """Trainable again: gradients on, standardization back in the graph."""
        self.requires_grad_(True)
        for m in self.modules():
            if isinstance(m, ScaledStdConv2d):
                m.unfold()
        self.fast = False
        return self.train()

    # ---------------------------------------------------------------- timm interop

    def load_timm_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load a timm ``dm_nfnet_f*`` state dict by name, ignoring ``head.*``.

        With ``strict``, any missing or unexpected key is an error that lists them.
        """
        sd = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        own = self.state_dict()
        missing = sorted(k for k in own if k not in sd)
        unexpected = sorted(k for k in sd if k not in own)
        if strict and (missing or unexpected):
            raise ValueError(
                f"timm state dict does not match this NFNet: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        bad = [
            f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
            for k, v in sd.items()
            if k in own and tuple(own[k].shape) != tuple(v.shape)
        ]
        if bad:
            raise ValueError("timm state dict shapes do not match: " + "; ".join(bad))
        self.load_state_dict(sd, strict=False)

    @staticmethod
    def config_from_timm(timm_model: nn.Module) -> NFNetConfig:
        """Infer the :class:`NFNetConfig` of a timm ``NormFreeNet`` built like ``dm_nfnet_f*``
        (deep_quad stem, SAME padding, gamma in the activations, extra conv, SE, skipinit)."""
        try:
            stem, stages, final_conv = timm_model.stem, timm_model.stages, timm_model.final_conv
            first = stages[0][0]
        except (AttributeError, IndexError, TypeError) as e:
            raise ValueError(
                f"expected a timm NormFreeNet (dm_nfnet_f*), got {type(timm_model).__name__}"
            ) from e
        problems = []
        names = [n for n, _ in stem.named_children()]
        if [n for n in names if n.startswith("conv")] != ["conv1", "conv2", "conv3", "conv4"]:
            problems.append(f"a deep_quad stem (conv1..conv4), got stem children {names}")
        if type(stem.conv1).__name__ != "ScaledStdConv2dSame":
            problems.append(f"ScaledStdConv2dSame convs (SAME padding), got {type(stem.conv1).__name__}")
        act = getattr(stem, "act2", None)
        if type(act).__name__ != "GammaAct" or abs(getattr(act, "gamma", 0.0) - GELU_GAMMA) > 1e-12:
            problems.append(f"gamma-GELU activations (gamma_in_act), got {type(act).__name__}")
        elif getattr(act.act_fn, "__name__", "") != "gelu":
            problems.append(f"GELU activations, got {getattr(act.act_fn, '__name__', act.act_fn)}")
        if type(final_conv).__name__ != "ScaledStdConv2dSame":
            problems.append(f"a final_conv, got {type(final_conv).__name__}")
        for attr in ("conv2b", "attn_last", "skipinit_gain"):
            if getattr(first, attr, None) is None:
                problems.append(f"blocks with {attr}")
        if getattr(first, "attn", None) is not None:
            problems.append("SE after conv3 (not RegNet-style)")
        if not problems:
            fan_in = stem.conv1.weight[0].numel()
            if abs(stem.conv1.scale - fan_in ** -0.5) > 1e-9 * fan_in ** -0.5:
                problems.append("convs without gamma in their scale (gamma_in_act=True)")
        if problems:
            raise ValueError(
                "expected a timm dm_nfnet_f*-style NormFreeNet with " + "; ".join(problems)
            )
        channels = tuple(int(s[0].conv3.weight.shape[0]) for s in stages)
        mid = int(first.conv1.weight.shape[0])
        return NFNetConfig(
            depths=tuple(len(s) for s in stages),
            channels=channels,
            stem_chs=int(stem.conv4.weight.shape[0]),
            group_size=int(first.conv2.weight.shape[1]),
            bottle_ratio=mid / channels[0],
            num_features=int(final_conv.weight.shape[0]),
            alpha=float(first.alpha),
            se_ratio=int(first.attn_last.fc1.weight.shape[0]) / channels[0],
            attn_gain=float(first.attn_gain),
            std_conv_eps=float(stem.conv1.eps),
            in_chans=int(stem.conv1.weight.shape[1]),
        )

    @classmethod
    def from_timm(cls, timm_model: nn.Module, backend: Optional[str] = None) -> "NFNet":
        """An NFNet with the config and weights of a timm ``dm_nfnet_f*`` model.

        The config is inferred (:meth:`config_from_timm`), the weights copied strictly
        (``head.*`` excluded; a mismatch lists missing / unexpected keys), onto the timm
        model's device and dtype.
        """
        cfg = cls.config_from_timm(timm_model)
        ref = next(timm_model.parameters())
        model = cls(cfg, backend=backend).to(device=ref.device, dtype=ref.dtype)
        model.load_timm_state_dict(timm_model.state_dict(), strict=True)
        return model

    def config_dict(self) -> Dict[str, Any]:
        """The config as a plain dict."""
        return dataclasses.asdict(self.config)
