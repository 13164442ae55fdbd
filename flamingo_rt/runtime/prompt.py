"""Prompts: interleaved text and media -> token ids and preprocessed media.

A prompt is a list whose items are text (``str``) or media: an image as a tensor
(C, H, W) (float in [0, 1] or uint8: other float ranges and NaN are refused), a numpy
array (H, W, C) / (H, W), a PIL image, or a video clip as a tensor (F, C, H, W) / array
(F, H, W, C). Each media item becomes one ``<image>`` token at its place; text may also
contain literal ``<image>`` markers, which then take the prompt's media in order
(``Prompt.from_text``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..io.tokenizer import EOC_TOKEN, IMAGE_TOKEN, FlamingoTokenizer
from ..models.config import VisionConfig

MediaLike = Union[torch.Tensor, np.ndarray, "PIL.Image.Image", "PreprocessedMedia"]  # noqa: F821
PromptItem = Union[str, MediaLike]


# floating-point pixels may stray this far outside [0, 1] (rounding of an earlier resize or
# colour conversion) before they are refused as not being [0, 1] pixels at all
_PIXEL_SLACK = 1e-3


def check_unit_pixels(t: torch.Tensor, where: str = "") -> None:
    """Raise ValueError unless the floating-point pixels ``t`` are finite and in [0, 1]
    (within rounding slack): a 0-255 float image or NaN would otherwise be normalised into
    garbage silently. ``where`` (e.g. "record 3 'image'") prefixes the message."""
    if not t.numel():
        return
    at = f"{where}: " if where else ""
    lo, hi = (float(v) for v in torch.aminmax(t.detach().float()))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{at}expected finite pixel values, got NaN or infinity")
    if lo < -_PIXEL_SLACK or hi > 1.0 + _PIXEL_SLACK:
        raise ValueError(f"{at}expected float pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                         "pass uint8 pixels (0-255) or divide by 255")


def _to_frames(x: MediaLike) -> torch.Tensor:
    """Any supported media object -> (F, C, H, W) float32 in [0, 1]."""
    try:
        from PIL import Image  # optional

        if isinstance(x, Image.Image):
            x = np.asarray(x.convert("RGB"))
    except ImportError:
        pass
    if isinstance(x, np.ndarray):
        arr = x
        if arr.ndim == 2:
            arr = arr[..., None].repeat(3, -1)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"expected an image array (H, W, C) or clip (F, H, W, C) with C in (1, 3), got {x.shape}")
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # e.g. np.asarray of a PIL image: torch would warn
            arr = arr.copy()
        t = torch.from_numpy(arr).permute(0, 3, 1, 2)
    elif torch.is_tensor(x):
        t = x.detach().cpu()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"expected an image tensor (C, H, W) or clip (F, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    else:
        raise TypeError(f"expected text (str) or media (tensor, numpy array, PIL image), got {type(x).__name__}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.is_floating_point():
        t = t.float()
        check_unit_pixels(t)
    else:
        raise TypeError(f"expected uint8 or floating-point pixels, got {t.dtype}")
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t


@dataclass(frozen=True, eq=False)  # compared by identity (tensor fields have no truth value)
class PreprocessedMedia:
    """Media already through ``preprocess_media`` for one vision config: ``frames`` is
    (F, 3, S, S) float32, resized and normalised. A prompt item like any medium, passed
    through as is (so an image reused across prompts, e.g. a few-shot support set, is
    preprocessed once). Make it with ``PreprocessedMedia.of(x, vision)``."""

    frames: torch.Tensor
    image_size: int

    @staticmethod
    def of(x: MediaLike, vision: VisionConfig) -> "PreprocessedMedia":
        return PreprocessedMedia(preprocess_media(x, vision), vision.image_size)


def preprocess_media(x: MediaLike, vision: VisionConfig) -> torch.Tensor:
    """Media -> (F, 3, S, S) float32: resized to the encoder's image size (bilinear with
    antialiasing) and normalised with its mean and std. ``PreprocessedMedia`` passes
    through (its image size must be the encoder's)."""
    if isinstance(x, PreprocessedMedia):
        if x.image_size != vision.image_size:
            raise ValueError(f"expected media preprocessed for image size {vision.image_size}, "
                             f"got media preprocessed for {x.image_size}")
        return x.frames
    t = _to_frames(x)
    S = vision.image_size
    if t.shape[-2:] != (S, S):
        t = F.interpolate(t, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.image_std).view(1, 3, 1, 1)
    return (t - mean) / std


@dataclass
class EncodedPrompt:
    """Token ids (with one ``<image>`` per medium) and the media, preprocessed."""

    ids: List[int]
    media: List[torch.Tensor] = field(default_factory=list)  # each (F, 3, S, S)


def encode_prompt(prompt: Union[str, Sequence[PromptItem]], tokenizer: FlamingoTokenizer,
                  vision: VisionConfig, add_bos: bool = False) -> EncodedPrompt:
    """Tokenize an interleaved prompt. Raises ValueError for an empty prompt and when the
    text's literal ``<image>`` markers and the media given do not pair up."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError("expected a prompt: a string, or a list of text (str) and media (tensor, numpy array, "
                        f"PIL image), got {type(prompt).__name__}")
    ids: List[int] = [tokenizer.eos_token_id] if add_bos else []
    media: List[torch.Tensor] = []
    pending = [p for p in prompt if not isinstance(p, str)]
    texts_have_markers = any(isinstance(p, str) and IMAGE_TOKEN in p for p in prompt)
    if texts_have_markers:
        # literal markers take the media in order; media items do not add markers
        n_markers = sum(p.count(IMAGE_TOKEN) for p in prompt if isinstance(p, str))
        if n_markers != len(pending):
            raise ValueError(
                f"the prompt text has {n_markers} <image> markers but {len(pending)} media were given; "
                "expected one medium per marker"
            )
        for p in prompt:
            if isinstance(p, str):
                ids += tokenizer.encode(p)
        media = [preprocess_media(m, vision) for m in pending]
    else:
        for p in prompt:
            if isinstance(p, str):
                ids += tokenizer.encode(p)
            else:
                ids.append(tokenizer.image_token_id)
                media.append(preprocess_media(p, vision))
    if not ids:
        raise ValueError("expected a non-empty prompt, got no tokens")
    return EncodedPrompt(ids, media)


def encode_candidates(candidates: Sequence[str], tokenizer: FlamingoTokenizer) -> List[List[int]]:
    """Token ids of each candidate continuation to score (``Generator.score``,
    ``ExportedSession.score``). Raises TypeError unless ``candidates`` is a list of str
    (a bare str is refused: it would be scored character by character) and ValueError
    for no candidates, a candidate with no token, or one holding ``<image>``."""
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)) \
            or not all(isinstance(c, str) for c in candidates):
        what = "a str (wrap one candidate in a list)" if isinstance(candidates, str) else repr(candidates)
        raise TypeError(f"expected candidates to be a list of strings, got {what}")
    if not candidates:
        raise ValueError("expected at least one candidate, got none")
    ids = [tokenizer.encode(c) for c in candidates]
    for i, c in enumerate(ids):
        if not c:
            raise ValueError(f"expected non-empty candidates; candidate {i} ({candidates[i]!r}) has no token")
        if tokenizer.image_token_id in c:
            raise ValueError(f"expected text candidates; candidate {i} contains {IMAGE_TOKEN}")
    return ids


def few_shot_prompt(support: Sequence[Tuple[MediaLike, str]], query: MediaLike,
                    template: str = "{answer}", prefix: str = "") -> List[PromptItem]:
    """A few-shot prompt: for each support (image, answer) ``[image, prefix + template
    .format(answer=answer) + "<|endofchunk|>"]``, then ``[query, prefix]``.

    Example: ``few_shot_prompt([(img1, "a cat"), (img2, "a dog")], img3, prefix="Output:")``.
    """
    if query is None or isinstance(query, str):
        raise TypeError(f"expected the query to be media (an image or clip), got {type(query).__name__}")
    items: List[PromptItem] = []
    for i, pair in enumerate(support):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            what = f"a {type(pair).__name__} of {len(pair)}" if isinstance(pair, (tuple, list)) else type(pair).__name__
            raise ValueError(f"expected support as (image, answer) pairs; support[{i}] is {what}")
        image, answer = pair
        items += [image, prefix + template.format(answer=answer) + EOC_TOKEN]
    items += [query, prefix] if prefix else [query]
    return items
