"""Model configurations and named presets.

A :class:`FlamingoConfig` is four plain dataclasses (vision encoder, resampler,
cross-attention, language model) plus the special token ids. Every config round-trips
through ``to_dict`` / ``from_dict`` (stored as ``config.json`` beside checkpoints).

Presets (:func:`get_preset`, :data:`PRESETS`):

- ``tiny``: a few hundred thousand parameters; minutes-scale CPU training, tests, demo.
- ``tiny-world``: the shipped model trained by :mod:`flamingo_rt.recipe` on the world.
- ``open-flamingo-3b``: OpenFlamingo-3B shapes (vision width 1024 from an external
  CLIP-style encoder, resampler depth 6 / 8 heads x 64 / 64 latents / GELU, xattn
  8 heads x 64 before every decoder layer, LM 24 x 2048).
- ``flamingo-3b``, ``flamingo-9b``, ``flamingo-80b``: the paper's shapes (NFNet-F6,
  resampler 6 x 1536 with 16 heads and squared-ReLU FF; LM 24x2048 / 40x4096 / 80x8192;
  xattn every 1 / 4 / 7 layers with 16 / 32 / 64 heads of 128, squared-ReLU FF).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .._values import check_field_types, check_known_keys
from ..ops.feed_forward import FF_KINDS


def _check(obj: Any, where: str, positive: Tuple[str, ...] = ()) -> None:
    """The config section ``obj``: every field of its annotated type (``n_layers = "2"`` in a
    config.json was a TypeError deep in torch), and the sizes in ``positive`` >= 1 (or unset
    where Optional)."""
    check_field_types(obj, where)
    for name in positive:
        v = getattr(obj, name)
        for x in (v if isinstance(v, tuple) else (v,)):
            if x is not None and x < 1:
                raise ValueError(f"{where}expected {name} >= 1, got {v!r}")

#: timm's dm_nfnet_f* stage depths.
NFNET_DEPTHS = {
    "dm_nfnet_f0": (1, 2, 6, 3),
    "dm_nfnet_f1": (2, 4, 12, 6),
    "dm_nfnet_f2": (3, 6, 18, 9),
    "dm_nfnet_f3": (4, 8, 24, 12),
    "dm_nfnet_f4": (5, 10, 30, 15),
    "dm_nfnet_f5": (6, 12, 36, 18),
    "dm_nfnet_f6": (7, 14, 42, 21),
}


@dataclass
class NFNetConfig:
    """An NFNet as timm's ``dm_nfnet_f*`` builds it (deep-quad stem, grouped bottlenecks
    with an extra 3x3 conv, SE with gain 2, skipinit, SAME padding, exact-erf GELU).

    ``num_features`` is the width of the final 1x1 conv (timm: 2 x channels[-1]), which is
    the width Dv of the output tokens. ``channels``/``stem_chs``/``group_size`` may be
    shrunk for small models (``tiny``).
    """

    depths: Tuple[int, int, int, int] = (1, 2, 6, 3)
    channels: Tuple[int, int, int, int] = (256, 512, 1536, 1536)
    stem_chs: int = 128
    group_size: int = 128
    bottle_ratio: float = 0.5
    num_features: int = 3072
    alpha: float = 0.2
    se_ratio: float = 0.5
    attn_gain: float = 2.0
    std_conv_eps: float = 1e-5
    in_chans: int = 3

    def __post_init__(self):
        _check(self, "config.vision.nfnet: ", ("depths", "channels", "stem_chs", "group_size", "num_features",
                                               "in_chans"))

    @classmethod
    def timm(cls, name: str, num_features: Optional[int] = None) -> "NFNetConfig":
        """The config of timm's ``name`` (``dm_nfnet_f0`` ... ``dm_nfnet_f6``)."""
        if name not in NFNET_DEPTHS:
            raise ValueError(f"unknown NFNet variant {name!r}; expected one of {sorted(NFNET_DEPTHS)}")
        cfg = cls(depths=NFNET_DEPTHS[name])
        if num_features is not None:
            cfg.num_features = num_features
        return cfg


@dataclass
class VisionConfig:
    """The vision encoder: ``kind="nfnet"`` (built from ``nfnet``) or ``"external"`` (a
    module passed to :class:`~flamingo_rt.models.Flamingo`, e.g. a CLIP ViT, returning
    (N, tokens, width) features)."""

    kind: str = "nfnet"
    nfnet: Optional[NFNetConfig] = field(default_factory=NFNetConfig)
    width: int = 3072  # Dv: feature width of the encoder's output tokens
    image_size: int = 224
    image_mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)  # pixels in [0, 1] are
    image_std: Tuple[float, float, float] = (0.5, 0.5, 0.5)  # normalised (x - mean) / std

    def __post_init__(self):
        _check(self, "config.vision: ", ("width", "image_size"))
        if self.kind not in ("nfnet", "external"):
            raise ValueError(f"config.vision: expected kind 'nfnet' or 'external', got {self.kind!r}")
        if not all(x > 0 for x in self.image_std):
            raise ValueError(f"config.vision: expected image_std > 0, got {self.image_std}")


#: where the cross-attention blocks sit among the LM's layers (:class:`XAttnConfig`)
XATTN_PLACEMENTS = ("openflamingo", "first")

#: the connectors between vision features and media tokens (:func:`flamingo_rt.models.build_resampler`)
RESAMPLER_KINDS = ("perceiver", "mlp")


@dataclass
class ResamplerConfig:
    """Perceiver Resampler: ``num_latents`` latents of width ``dim`` (= vision width).

    ``kind="mlp"`` replaces it by the paper's MLP ablation (:class:`~flamingo_rt.models.MLPResampler`:
    ``depth`` residual feed-forward layers on each feature token, then the medium's tokens
    average-pooled to ``num_latents``); ``heads``/``dim_head`` are then unused."""

    kind: str = "perceiver"
    dim: int = 1024
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    ff_mult: int = 4
    ff_kind: str = "gelu"  # "gelu" (OpenFlamingo) or "sqrelu" (paper)
    max_num_frames: Optional[int] = None  # learned temporal embeddings for video
    max_num_media: Optional[int] = None  # OpenFlamingo's media_time_embs (optional)
    #: learned spatial position embeddings, one per feature position of a frame (a frame's S
    #: features must then be at most this many). Neither Flamingo nor OpenFlamingo has them
    #: (a large encoder's grid carries position implicitly); a 2 x 2 grid does not carry it
    #: well enough to tell where an object moved (FEASIBILITY.md). None: off.
    max_num_spatial: Optional[int] = None

    def __post_init__(self):
        _check(self, "config.resampler: ", ("dim", "depth", "heads", "dim_head", "num_latents", "ff_mult",
                                            "max_num_frames", "max_num_media", "max_num_spatial"))
        if self.ff_kind not in FF_KINDS:
            raise ValueError(f"config.resampler: expected ff_kind in {FF_KINDS}, got {self.ff_kind!r}")
        if self.kind not in RESAMPLER_KINDS:
            raise ValueError(f"unknown resampler kind {self.kind!r}; expected one of {RESAMPLER_KINDS}")
        if self.max_num_spatial is not None and self.max_num_spatial < 1:
            raise ValueError(f"expected max_num_spatial >= 1 or None, got {self.max_num_spatial}")


@dataclass
class XAttnConfig:
    """GATED XATTN-DENSE blocks inserted into the LM."""

    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    ff_kind: str = "gelu"
    every: int = 1  # one block every ``every`` decoder layers
    placement: str = "openflamingo"  # before layer i when (i+1)%every==0; "first": i%every==0
    all_previous: bool = False  # ablation: attend to all previous images
    gated: bool = True  # False (ablation): y = x + XAttn(x), z = y + FF(y), no tanh gates

    def __post_init__(self):
        _check(self, "config.xattn: ", ("heads", "dim_head", "ff_mult", "every"))
        if self.ff_kind not in FF_KINDS:
            raise ValueError(f"config.xattn: expected ff_kind in {FF_KINDS}, got {self.ff_kind!r}")
        if self.placement not in XATTN_PLACEMENTS:
            raise ValueError(f"config.xattn: expected placement in {XATTN_PLACEMENTS}, got {self.placement!r}")


@dataclass
class LMConfig:
    """LLaMA-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

    vocab_size: int = 32000
    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: Optional[int] = None  # None: = n_heads
    intermediate_size: Optional[int] = None  # None: LLaMA's rule from dim
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: Optional[int] = None  # None: dim // n_heads
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        _check(self, "config.lm: ", ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
                                     "max_seq_len", "head_dim"))
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ValueError(f"config.lm: expected rope_theta > 0 and norm_eps > 0, got {self.rope_theta}, "
                             f"{self.norm_eps}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.intermediate_size = 256 * ((hidden + 255) // 256)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"LM dim {self.dim} must be divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}"
            )


@dataclass
class FlamingoConfig:
    """A whole Flamingo model; ``*_token_id`` index the LM vocabulary."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token_id: int = 0
    eoc_token_id: int = 1  # <|endofchunk|>
    pad_token_id: int = 2
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        check_field_types(self, "config: ")
        for name in ("image_token_id", "eoc_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.lm.vocab_size:
                raise ValueError(f"config: expected {name} in [0, {self.lm.vocab_size}) (the LM's vocabulary), got {v}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FlamingoConfig":
        """The config of :meth:`to_dict`'s dict. Keys that are not fields (a config of another
        version, a typo) are a ValueError naming the section and the keys, not ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a Flamingo config: a dict of settings, got {type(d).__name__}")
        d = copy.deepcopy(d)
        check_known_keys(cls, d, "config: unknown keys")
        sections = {}
        for name, sub in (("vision", VisionConfig), ("resampler", ResamplerConfig), ("xattn", XAttnConfig),
                          ("lm", LMConfig)):
            v = d.get(name, {})
            if not isinstance(v, dict):
                raise ValueError(f"config.{name}: expected a dict of settings, got {type(v).__name__}")
            check_known_keys(sub, v, f"config.{name}: unknown keys")
            sections[name] = v
        v = sections["vision"]
        for k in ("image_mean", "image_std"):
            if k in v:
                v[k] = tuple(v[k])
        if v.get("nfnet") is not None:
            nf = v["nfnet"]
            if not isinstance(nf, dict):
                raise ValueError(f"config.vision.nfnet: expected a dict of settings, got {type(nf).__name__}")
            check_known_keys(NFNetConfig, nf, "config.vision.nfnet: unknown keys")
            for k in ("depths", "channels"):
                if k in nf:
                    nf[k] = tuple(nf[k])
            v["nfnet"] = NFNetConfig(**nf)
        return cls(
            vision=VisionConfig(**v),
            resampler=ResamplerConfig(**sections["resampler"]),
            xattn=XAttnConfig(**sections["xattn"]),
            lm=LMConfig(**sections["lm"]),
            **{k: d[k] for k in d if k not in sections},
        )


def _tiny() -> FlamingoConfig:
    nf = NFNetConfig(
        depths=(1, 1, 1, 1), channels=(16, 32, 48, 64), stem_chs=8, group_size=8, num_features=64
    )
    return FlamingoConfig(
        vision=VisionConfig(kind="nfnet", nfnet=nf, width=64, image_size=64),
        resampler=ResamplerConfig(dim=64, depth=2, heads=4, dim_head=16, num_latents=16, ff_mult=2),
        xattn=XAttnConfig(heads=4, dim_head=16, ff_mult=2, every=2),
        lm=LMConfig(vocab_size=512, dim=96, n_layers=4, n_heads=4, n_kv_heads=2,
                    intermediate_size=256, max_seq_len=512),
    )


def _tiny_world() -> FlamingoConfig:
    """The shipped model's shapes (``flamingo_rt.recipe`` preset ``tiny-world``): 64x64
    images, NFNet to a 2x2 grid of width 128, 8 latents, xattn before every LM layer, a
    4 x 128 LM. ``lm.vocab_size`` is the recipe tokenizer's (set when it is trained)."""
    # stem_chs 64: the deep stem's convs are 8/16/32/64 wide. With 16 they were 2/4/8/16 and RGB
    # went through a 2-channel first conv (held-out colour probe of the stage-1 features 0.77;
    # 0.99 with 64: FEASIBILITY.md)
    nf = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 64, 96, 128), stem_chs=64, group_size=16,
                     num_features=128)
    return FlamingoConfig(
        vision=VisionConfig(kind="nfnet", nfnet=nf, width=128, image_size=64),
        resampler=ResamplerConfig(dim=128, depth=2, heads=4, dim_head=32, num_latents=8, ff_mult=2,
                                  max_num_frames=8),
        xattn=XAttnConfig(heads=4, dim_head=32, ff_mult=2, every=1),
        lm=LMConfig(vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=4,
                    intermediate_size=384, max_seq_len=1024),
    )


def _open_flamingo_3b() -> FlamingoConfig:
    return FlamingoConfig(
        vision=VisionConfig(kind="external", nfnet=None, width=1024, image_size=224),
        resampler=ResamplerConfig(dim=1024, depth=6, heads=8, dim_head=64, num_latents=64),
        xattn=XAttnConfig(heads=8, dim_head=64, ff_mult=4, every=1),
        lm=LMConfig(vocab_size=50280, dim=2048, n_layers=24, n_heads=16, max_seq_len=2048),
    )


def _paper(lm_layers: int, lm_dim: int, every: int, xattn_heads: int) -> FlamingoConfig:
    return FlamingoConfig(
        vision=VisionConfig(
            kind="nfnet", nfnet=NFNetConfig.timm("dm_nfnet_f6", num_features=1536),
            width=1536, image_size=320,
        ),
        resampler=ResamplerConfig(dim=1536, depth=6, heads=16, dim_head=96, num_latents=64,
                                  ff_kind="sqrelu", max_num_frames=8),
        xattn=XAttnConfig(heads=xattn_heads, dim_head=128, ff_kind="sqrelu", every=every),
        lm=LMConfig(vocab_size=32000, dim=lm_dim, n_layers=lm_layers, n_heads=lm_dim // 128),
    )


PRESETS = {
    "tiny": _tiny,
    "tiny-world": _tiny_world,
    "open-flamingo-3b": _open_flamingo_3b,
    "flamingo-3b": lambda: _paper(24, 2048, 1, 16),
    "flamingo-9b": lambda: _paper(40, 4096, 4, 32),
    "flamingo-80b": lambda: _paper(80, 8192, 7, 64),
}


def get_preset(name: str) -> FlamingoConfig:
    """A fresh copy of the named preset (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
