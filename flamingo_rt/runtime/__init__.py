"""Generation runtime: prompts, static caches, decoding strategies, streaming, sessions."""
from .cache import StaticCache
from .generate import Generator, Prefix, Session
from .prompt import EncodedPrompt, PreprocessedMedia, encode_prompt, few_shot_prompt, preprocess_media
from .sampling import GenerationConfig

__all__ = [
    "EncodedPrompt",
    "GenerationConfig",
    "Generator",
    "Prefix",
    "PreprocessedMedia",
    "Session",
    "StaticCache",
    "encode_prompt",
    "few_shot_prompt",
    "preprocess_media",
]
