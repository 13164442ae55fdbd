"""Flamingo: vision encoder -> Perceiver Resampler -> LM with gated cross-attention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import FlamingoConfig
from .lm import DecoderLM
from .media import num_media_tensor, resolve_media_index
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


@dataclass
class FlamingoOutput:
    """logits (B, T, vocab); loss: mean next-token cross-entropy over labels != -100."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


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
        self.resampler = PerceiverResampler(config.resampler)
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
        Returns:
            :class:`FlamingoOutput` with logits (B, T, vocab) and the loss when labels are given.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
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
        logits = self.lm(input_ids, attention_mask=attention_mask, xattn_kwargs=xkw)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"expected labels of shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return FlamingoOutput(logits=logits, loss=loss)

    # ---------------------------------------------------------------- freezing
    def xattn_blocks(self) -> Iterator[GatedCrossAttentionBlock]:
        return iter(self.lm.xattn.values())

    def freeze_backbones(self, vision: bool = True, lm: bool = True) -> "Flamingo":
        """Freeze the vision encoder and/or the LM (not its cross-attention blocks):
        no gradients, and the vision encoder in eval mode. The resampler and the
        cross-attention blocks stay trainable; gradients still flow through the LM's
        activations into them."""
        if vision:
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
        """{layer index: (tanh(attn_gate), tanh(ff_gate))} as floats."""
        return {
            int(k): (float(b.attn_gate.tanh()), float(b.ff_gate.tanh())) for k, b in self.lm.xattn.items()
        }
