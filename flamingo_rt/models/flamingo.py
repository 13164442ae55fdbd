"""Flamingo: vision encoder -> Perceiver Resampler -> LM with gated cross-attention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._values import is_integer_tensor
from ..ops.linear_cross_entropy import linear_cross_entropy
from .config import FlamingoConfig, ResamplerConfig
from .lm import DecoderLM
from .media import num_media_tensor, resolve_media_index
from .mlp_resampler import MLPResampler
from .resampler import PerceiverResampler
from .xattn import GatedCrossAttentionBlock


class ExternalVisionEncoder(nn.Module):
    """Placeholder for ``vision.kind == "external"`` configs built without an encoder."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "this config expects an external vision encoder (kind='external') returning "
            f"(N, S, {self.width}) tokens; pass vision_encoder= to Flamingo(...)"
        )


def build_vision_encoder(config: FlamingoConfig) -> nn.Module:
    """The vision encoder a config describes (NFNet, or a placeholder for external)."""
    v = config.vision
    if v.kind == "nfnet":
        from .nfnet import NFNet

        return NFNet(v.nfnet)
    if v.kind == "external":
        return ExternalVisionEncoder(v.width)
    raise ValueError(f"unknown vision encoder kind {v.kind!r}; expected 'nfnet' or 'external'")


class OpenFlamingoVisionAdapter(nn.Module):
    """Wraps open_flamingo's vision encoder (an open_clip ``visual`` returning
    (pooled, tokens)) as an encoder returning the tokens (N, S, Dv). Kept as is."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual(images)
        return out[1] if isinstance(out, (tuple, list)) else out


@dataclass
class FlamingoOutput:
    """logits (B, T, vocab) (None when the forward was asked for the loss only); loss: the
    next-token cross-entropy over labels != -100 (mean, or sum with ``loss_reduction="sum"``)."""

    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None


def build_resampler(cfg: ResamplerConfig) -> nn.Module:
    """The connector ``cfg.kind`` names: a :class:`PerceiverResampler` (``"perceiver"``) or
    the paper's MLP ablation, :class:`MLPResampler` (``"mlp"``)."""
    return MLPResampler(cfg) if cfg.kind == "mlp" else PerceiverResampler(cfg)


class Flamingo(nn.Module):
    """A Flamingo model.

    Args:
        config: a :class:`~flamingo_rt.models.config.FlamingoConfig` (see ``get_preset``).
        vision_encoder: optional module mapping images (N, C, H, W) to tokens (N, S, Dv)
            with Dv = ``config.vision.width`` (e.g. a CLIP ViT); default: built from config.

    Submodules: ``vision_encoder``, ``resampler``, ``lm`` (a :class:`DecoderLM` whose
    ``lm.xattn`` holds the :class:`GatedCrossAttentionBlock` s).
    """

    def __init__(self, config: FlamingoConfig, vision_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        if config.resampler.dim != config.vision.width:
            raise ValueError(
                f"expected resampler dim equal to the vision width {config.vision.width}, "
                f"got {config.resampler.dim}"
            )
        self.vision_encoder = vision_encoder if vision_encoder is not None else build_vision_encoder(config)
        self.resampler = build_resampler(config.resampler)
        self.lm = DecoderLM(config.lm)
        xc = config.xattn
        self.lm.insert_xattn(
            lambda i: GatedCrossAttentionBlock(
                dim=config.lm.dim,
                dim_visual=config.resampler.dim,
                heads=xc.heads,
                dim_head=xc.dim_head,
                ff_mult=xc.ff_mult,
                ff_kind=xc.ff_kind,
                all_previous=xc.all_previous,
                gated=xc.gated,
            ),
            every=xc.every,
            placement=xc.placement,
        )

    # ------------------------------------------------------------------ media
    def check_media(self, media: torch.Tensor) -> torch.Tensor:
        """Validate and normalise media to (B, M, F, C, H, W).

        Accepts (B, M, F, C, H, W), or (B, M, C, H, W) for stills (F = 1).
        """
        c = self.config.vision.nfnet.in_chans if self.config.vision.nfnet is not None else 3
        if not torch.is_tensor(media):
            raise TypeError(f"expected media as a tensor, got {type(media).__name__}")
        if not media.is_floating_point():
            raise TypeError(f"expected floating-point media (normalised pixels), got {media.dtype}")
        if media.dim() == 5:
            media = media.unsqueeze(2)
        if media.dim() != 6 or media.shape[3] != c:
            raise ValueError(
                f"expected media of shape (B, M, F, {c}, H, W) or (B, M, {c}, H, W), got {tuple(media.shape)}"
            )
        return media

    def encode_media(self, media: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Images/clips (B, M, F, C, H, W) -> media tokens (B, M, num_latents, D).

        All frames of all media go through the vision encoder in one call.
        """
        media = self.check_media(media)
        B, M, Fr = media.shape[:3]
        frames = media.reshape(B * M * Fr, *media.shape[3:])
        feats = self.vision_encoder(frames)  # (B*M*F, S, Dv)
        if feats.dim() != 3 or feats.shape[-1] != self.config.vision.width:
            raise ValueError(
                f"expected the vision encoder to return (N, S, {self.config.vision.width}) tokens, "
                f"got {tuple(feats.shape)}"
            )
        feats = feats.reshape(B, M, Fr, feats.shape[1], feats.shape[2])
        return self.resampler(feats, backend=backend)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        media: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        num_media: Union[int, torch.Tensor, None] = None,
        media_tokens: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
    ) -> FlamingoOutput:
        """
        Args:
            input_ids: (B, T) int64 token ids with ``<image>`` tokens where images go.
            media: (B, M, F, C, H, W) (or (B, M, C, H, W)) float images; rows with fewer
                images are padded and say how many they have in ``num_media``.
            attention_mask: (B, T) 1 for real tokens, 0 for padding.
            labels: (B, T) int64 targets (-100 ignored); the loss predicts labels[t+1] from t.
            num_media: images supplied per row (int or (B,) tensor), default M.
            media_tokens: precomputed ``encode_media(media)`` (B, M, L, D), instead of media.
            backend: op backend for the resampler and cross-attention ops.
            return_logits: False (with labels) returns only the loss, computed by
                :func:`flamingo_rt.ops.linear_cross_entropy`: the LM head and the loss in
                chunks of tokens, so the (B, T, vocab) logits are never held (training).
            loss_reduction: ``"mean"`` over the target tokens, or ``"sum"``.
        Returns:
            :class:`FlamingoOutput` with logits (B, T, vocab) and the loss when labels are given.
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels (it returns only the loss)")
        if input_ids.dim() != 2:
            raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
        if not is_integer_tensor(input_ids):
            raise ValueError(f"expected integer input_ids (token ids, e.g. torch.long), got {input_ids.dtype}")
        B = input_ids.shape[0]
        if media_tokens is None and media is not None:
            media_tokens = self.encode_media(media, backend=backend)
        xkw = None
        locations = input_ids == self.config.image_token_id
        if media_tokens is not None:
            if media_tokens.dim() != 4 or media_tokens.shape[0] != B:
                raise ValueError(
                    f"expected media tokens of shape ({B}, M, L, {self.config.resampler.dim}), "
                    f"got {tuple(media_tokens.shape)}"
                )
            M = media_tokens.shape[1]
            idx = resolve_media_index(locations, None, num_media_tensor(num_media, B, M, input_ids.device))
            xkw = dict(media=media_tokens, media_index=idx, backend=backend, validate=False)
        else:
            if not torch.compiler.is_compiling() and bool(locations.any()):
                n = int(locations.sum(1).max())
                raise ValueError(
                    f"input_ids contain up to {n} <image> tokens per row but no media were supplied"
                )
            xkw = dict(media=None, backend=backend)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"expected labels of shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if labels is not None and not is_integer_tensor(labels):
            raise TypeError(f"expected integer labels (token ids, -100 for no loss), got {labels.dtype}")
        if not return_logits:
            h = self.lm(input_ids, attention_mask=attention_mask, xattn_kwargs=xkw, head=False)
            targets = labels[:, 1:].reshape(-1)
            loss = linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), self.lm.lm_head.weight, targets,
                                        **self.lm.head_row_kwargs())
            if loss_reduction == "mean":
                loss = loss / (targets != -100).sum()
            return FlamingoOutput(logits=None, loss=loss)
        logits = self.lm(input_ids, attention_mask=attention_mask, xattn_kwargs=xkw)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction=loss_reduction,
            )
        return FlamingoOutput(logits=logits, loss=loss)

    # ---------------------------------------------------------------- conversion
    @classmethod
    def from_open_flamingo(cls, of_model: nn.Module) -> "Flamingo":
        """Convert a whole open_flamingo ``Flamingo`` whose language model is a transformers
        LLaMA model. Its vision encoder module is kept as is (wrapped to return tokens);
        the resampler, the LM and its gated cross-attention blocks are copied."""
        from .config import VisionConfig, XAttnConfig
        from .lm import hf_key_to_ours, lm_config_from_hf

        lang = of_model.lang_encoder
        layers = lang._get_decoder_layers()
        blocks = {i: l.gated_cross_attn_layer for i, l in enumerate(layers) if l.gated_cross_attn_layer is not None}
        if not blocks:
            raise ValueError("expected an open_flamingo model with gated cross-attention layers, found none")
        every = min(blocks) + 1
        want = [i for i in range(len(layers)) if (i + 1) % every == 0]
        if sorted(blocks) != want:
            raise ValueError(f"unsupported cross-attention placement {sorted(blocks)}; expected every {every}: {want}")
        resampler = PerceiverResampler.from_open_flamingo(of_model.perceiver)
        first = GatedCrossAttentionBlock.from_open_flamingo(blocks[min(blocks)])
        a = first.attn
        lm_cfg = lm_config_from_hf(lang.config.to_dict())
        config = FlamingoConfig(
            vision=VisionConfig(kind="external", nfnet=None, width=resampler.config.dim),
            resampler=resampler.config,
            xattn=XAttnConfig(heads=a.heads, dim_head=a.dim_head, ff_mult=first.ff.fc1.out_features // lm_cfg.dim,
                              ff_kind=first.ff.kind, every=every, placement="openflamingo",
                              all_previous=first.all_previous),
            lm=lm_cfg,
            image_token_id=int(of_model.media_token_id),
            eoc_token_id=int(of_model.eoc_token_id),
        )
        dtype = next(of_model.parameters()).dtype
        ours = cls(config, vision_encoder=OpenFlamingoVisionAdapter(of_model.vision_encoder)).to(dtype)
        ours.resampler.load_state_dict(resampler.state_dict())
        sd = {}
        for name, t in lang.state_dict().items():
            if name.startswith(("gated_cross_attn_layers.", "old_decoder_blocks.")) or ".gated_cross_attn_layer." in name:
                continue  # aliases of the wrapped layers / the blocks, copied below
            name = name.replace(".decoder_layer.", ".")
            key = hf_key_to_ours(name)
            if key is not None and not key.endswith("rotary_emb.inv_freq"):
                sd[key] = t
        if lm_cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        missing, unexpected = ours.lm.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("xattn.") and not (lm_cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"open_flamingo LM weights do not match: missing {missing[:8]}, unexpected {unexpected[:8]}")
        for i, blk in blocks.items():
            ours.lm.xattn[str(i)].load_state_dict(GatedCrossAttentionBlock.from_open_flamingo(blk).state_dict())
        return ours

    # ---------------------------------------------------------------- freezing
    def xattn_blocks(self) -> Iterator[GatedCrossAttentionBlock]:
        return iter(self.lm.xattn.values())

    def freeze_backbones(self, vision: bool = True, lm: bool = True) -> "Flamingo":
        """Freeze the vision encoder and/or the LM (not its cross-attention blocks):
        no gradients, and the vision encoder in eval mode (an NFNet also folds its weight
        standardization once, exactly). The resampler and the
        cross-attention blocks stay trainable; gradients still flow through the LM's
        activations into them."""
        if vision:
            if hasattr(self.vision_encoder, "freeze"):
                self.vision_encoder.freeze()  # e.g. NFNet: standardization folded once (exact)
            for p in self.vision_encoder.parameters():
                p.requires_grad_(False)
            self.vision_encoder.eval()
        if lm:
            xattn_params = {id(p) for p in self.lm.xattn.parameters()}
            for p in self.lm.parameters():
                if id(p) not in xattn_params:
                    p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Flamingo":
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.vision_encoder.parameters()):
            self.vision_encoder.eval()  # a frozen encoder stays in eval mode
        return self

    def trainable_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def gate_values(self) -> dict:
        """{layer index: (tanh(attn_gate), tanh(ff_gate))} as floats (1.0 for ungated blocks).
        Gates sharded by FSDP2 (DTensors) are gathered first: then every process must call it."""
        def val(b, name: str) -> float:
            if not b.gated:
                return 1.0
            t = getattr(b, name).detach()
            return float((t.full_tensor() if hasattr(t, "full_tensor") else t).tanh())

        return {int(k): (val(b, "attn_gate"), val(b, "ff_gate")) for k, b in self.lm.xattn.items()}
