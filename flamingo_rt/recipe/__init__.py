"""The Flamingo recipe in miniature, on the procedural world (:mod:`flamingo_rt.world`).

1. :mod:`.contrastive`: an NFNet pretrained contrastively on image-caption pairs
   (CLIP-style InfoNCE with a small text encoder of our own);
2. :mod:`.lm_pretrain`: a byte-level BPE tokenizer on ``world_corpus`` and a
   :class:`~flamingo_rt.models.DecoderLM` pretrained on the world's text;
3. :mod:`.connectors`: both frozen; the resampler and gated cross-attention layers (and the
   ``<image>`` / ``<|endofchunk|>`` embedding rows) trained on the weighted mixture of
   interleaved documents, image-text pairs and video-text pairs (:mod:`.batching` makes the
   batches).

:func:`run_recipe` runs all three and saves a model folder; :mod:`.presets` holds the sizes
(``tiny-world``: the shipped model; ``toy``: CI).
"""
from .batching import Batch, collate, doc_record, normalize_pixels, pair_record, video_record  # noqa: F401
from .connectors import ConnectorStats, build_flamingo, build_pools, train_connectors, train_special_rows  # noqa: F401
from .contrastive import ContrastiveModel, TextEncoder, info_nce, pretrain_vision  # noqa: F401
from .lm_pretrain import pack_corpus, pretrain_lm, train_tokenizer  # noqa: F401
from .presets import (  # noqa: F401
    RECIPE_PRESETS, ConnectorConfig, ContrastiveConfig, LMPretrainConfig, RecipeConfig, get_recipe_preset,
)
from .recipe import RECIPE_LOG, RecipeResult, run_recipe, run_stage3  # noqa: F401
