"""Tokenizer for Flamingo-style prompts, over the Hugging Face ``tokenizers`` library.

Special tokens (always single tokens, also when glued to text as in
``"<image>a cat<|endofchunk|>"``):

* ``<image>``         marks where an image goes (the model's media locations),
* ``<|endofchunk|>``  ends the text that belongs to an image,
* ``<pad>``           padding (masked out by ``attention_mask``),
* ``<|endoftext|>``   end of sequence, also used as beginning of sequence.

A tokenizer trained by :meth:`FlamingoTokenizer.train_bpe` gives them the ids
``<image>`` = 0, ``<|endofchunk|>`` = 1, ``<pad>`` = 2, ``<|endoftext|>`` = 3, the defaults of
:class:`flamingo_rt.models.config.FlamingoConfig`. A tokenizer loaded with
:meth:`FlamingoTokenizer.from_file` keeps the ids it has and appends the ones it lacks at the
end of its vocabulary (:attr:`FlamingoTokenizer.num_added_tokens` says how many, so that a
model can grow its embeddings).
"""
from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import atomic_write_bytes

__all__ = [
    "FlamingoTokenizer",
    "IncrementalDecoder",
    "IMAGE_TOKEN",
    "EOC_TOKEN",
    "PAD_TOKEN",
    "EOS_TOKEN",
    "SPECIAL_TOKENS",
]

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
#: In id order for a freshly trained tokenizer.
SPECIAL_TOKENS = (IMAGE_TOKEN, EOC_TOKEN, PAD_TOKEN, EOS_TOKEN)

TOKENIZER_FILE = "tokenizer.json"

PathLike = Union[str, "os.PathLike[str]"]


def _special(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False,
                      normalized=False, special=True)


def _byte_to_char() -> Dict[int, str]:
    """The byte-level BPE alphabet: each byte value maps to one printable character.

    Bytes that are printable Latin-1 characters map to themselves; the others (control
    characters, space, ...) map, in increasing order, to U+0100, U+0101, ...
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(0xA1, 0xAC + 1))
    printable |= set(range(0xAE, 0xFF + 1))
    table: Dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


class FlamingoTokenizer:
    """A ``tokenizers.Tokenizer`` with the Flamingo special tokens.

    Construct with :meth:`from_file` or :meth:`train_bpe` (or wrap a ``Tokenizer`` directly:
    missing special tokens are added).
    """

    IMAGE_TOKEN = IMAGE_TOKEN
    EOC_TOKEN = EOC_TOKEN
    PAD_TOKEN = PAD_TOKEN
    EOS_TOKEN = EOS_TOKEN

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        # We pad and truncate ourselves; settings stored in a tokenizer.json would interfere.
        self._tok.no_padding()
        self._tok.no_truncation()
        before = self._vocab_size_raw()
        added = self._tok.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
        #: How many ids the special tokens added past the original vocabulary.
        self.num_added_tokens = max(0, self._vocab_size_raw() - before) if added else 0
        self._refresh()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: PathLike) -> "FlamingoTokenizer":
        """Load a ``tokenizer.json`` (the file, or a folder holding it).

        Special tokens the file lacks are added as special tokens at the end of the
        vocabulary; :attr:`num_added_tokens` counts the new ids.
        """
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer file at {p}")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception
            raise ValueError(f"{p}: not a valid tokenizer.json: {e}") from None
        return cls(tok)

    @classmethod
    def train_bpe(
        cls,
        corpus: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
    ) -> "FlamingoTokenizer":
        """Train a byte-level BPE tokenizer (GPT-2 style) on ``corpus``.

        All 256 byte values are in the alphabet, so any text encodes without unknown tokens.
        The special tokens take ids 0..3 (see the module docstring). Deterministic for a
        given corpus.

        Args:
            corpus: the training texts.
            vocab_size: the size to reach (at least 260: 256 bytes + 4 special tokens); a
                small corpus may give fewer merges, hence a smaller vocabulary.
            min_frequency: pairs seen fewer times are not merged.
        """
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
            )
        if isinstance(corpus, str):
            raise TypeError("corpus must be an iterable of texts, not one string")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[_special(t) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer=trainer)
        return cls(tok)

    def _vocab_size_raw(self) -> int:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return (max(vocab.values()) + 1) if vocab else 0

    def _refresh(self) -> None:
        self._vocab_size = self._vocab_size_raw()
        ids = {}
        for t in SPECIAL_TOKENS:
            i = self._tok.token_to_id(t)
            if i is None:  # pragma: no cover - add_special_tokens guarantees it
                raise RuntimeError(f"special token {t!r} missing after adding it")
            ids[t] = i
        self._special_ids = ids
        self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self._special_id_set = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        )
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        self._token_bytes: Dict[int, bytes] = {}

    # ---------------------------------------------------------------- properties

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def image_token_id(self) -> int:
        return self._special_ids[IMAGE_TOKEN]

    @property
    def eoc_token_id(self) -> int:
        return self._special_ids[EOC_TOKEN]

    @property
    def pad_token_id(self) -> int:
        return self._special_ids[PAD_TOKEN]

    @property
    def eos_token_id(self) -> int:
        return self._special_ids[EOS_TOKEN]

    @property
    def bos_token_id(self) -> int:
        return self._special_ids[EOS_TOKEN]

    @property
    def special_token_ids(self) -> frozenset:
        """Ids of all special tokens (ours and any the file defines)."""
        return self._special_id_set

    @property
    def vocab_size(self) -> int:
        """Number of ids (largest id + 1, added tokens included): the embedding size needed."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return (f"FlamingoTokenizer(vocab_size={self.vocab_size}, image={self.image_token_id}, "
                f"eoc={self.eoc_token_id}, pad={self.pad_token_id}, eos={self.eos_token_id})")

    # ---------------------------------------------------------------- encode / decode

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str, add_eos: bool = False, add_bos: bool = False) -> List[int]:
        """Token ids of ``text`` (special tokens written in the text become their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"expected text as str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids = [self.bos_token_id] + ids
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False,
                     add_bos: bool = False) -> List[List[int]]:
        """:meth:`encode` of each text (in parallel)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"expected texts as str, got {type(t).__name__}")
        out = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        if add_bos:
            out = [[self.bos_token_id] + ids for ids in out]
        if add_eos:
            out = [ids + [self.eos_token_id] for ids in out]
        return out

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); an id outside [0, vocab_size) is a
        ValueError (a padded LM vocabulary's extra rows have no text)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"expected a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        n = self._vocab_size
        bad = next((i for i in ids if i < 0 or i >= n), None)
        if bad is not None:  # the backends drop unknown ids silently (or overflow on negatives)
            raise self._id_error(bad)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _id_error(self, token_id: int) -> ValueError:
        return ValueError(f"token id {token_id} is out of range for this tokenizer "
                          f"(expected 0 <= id < {self._vocab_size})")

    def __call__(
        self,
        texts: Union[str, Sequence[str]],
        padding_side: str = "left",
        max_length: Optional[int] = None,
        *,
        truncation_side: str = "right",
        pad_to_max_length: bool = False,
        add_eos: bool = False,
        add_bos: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Tokenize a batch and pad it into rectangles.

        Args:
            texts: B texts (a single str is a batch of one).
            padding_side: "left" (for generation: the last tokens line up) or "right".
            max_length: longer sequences are cut to this many tokens (from the end when
                ``truncation_side == "right"``, from the start when "left").
            pad_to_max_length: pad to ``max_length`` instead of to the longest sequence.
            add_eos / add_bos: append / prepend ``<|endoftext|>`` (before truncation).

        Returns:
            ``input_ids``: int64 (B, T), padded with ``pad_token_id``;
            ``attention_mask``: int64 (B, T), 1 on real tokens, 0 on padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding_side not in ("left", "right"):
            raise ValueError(f"expected padding_side 'left' or 'right', got {padding_side!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"expected truncation_side 'left' or 'right', got {truncation_side!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
            raise ValueError(f"expected max_length a non-negative int or None, got {max_length!r}")
        if pad_to_max_length and max_length is None:
            raise ValueError("pad_to_max_length=True needs max_length")
        seqs = self.encode_batch(texts, add_eos=add_eos, add_bos=add_bos)
        if max_length is not None:
            if truncation_side == "right":
                seqs = [s[:max_length] for s in seqs]
            else:
                seqs = [s[max(0, len(s) - max_length):] for s in seqs]
        T = max_length if pad_to_max_length else max((len(s) for s in seqs), default=0)
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, s in enumerate(seqs):
            n = len(s)
            if n == 0:
                continue
            sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
            input_ids[b, sl] = torch.tensor(s, dtype=torch.long)
            attention_mask[b, sl] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---------------------------------------------------------------- saving

    def save(self, path: PathLike) -> Path:
        """Write ``tokenizer.json`` atomically. ``path`` is the file, or a folder (existing, or
        any path not ending in ``.json``) to write ``tokenizer.json`` into. Returns the file."""
        p = Path(path)
        if p.is_dir() or p.suffix.lower() != ".json":
            p = p / TOKENIZER_FILE
        data = self._tok.to_str(pretty=True).encode("utf-8")
        return atomic_write_bytes(p, data)

    # ---------------------------------------------------------------- streaming support

    @property
    def is_byte_level(self) -> bool:
        """Whether the decoder is byte-level (then every token maps to a fixed byte string)."""
        return self._byte_level

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token decodes to (byte-level tokenizers only)."""
        if not self._byte_level:
            raise ValueError("token_bytes needs a byte-level tokenizer")
        token_id = int(token_id)
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        if token_id < 0 or token_id >= self._vocab_size:
            raise self._id_error(token_id)
        # Added tokens too are read the way tokenizers' ByteLevel decoder reads them: when
        # every character is in the byte-level alphabet, the bytes they stand for (so an added
        # "café" streams as tokenizers decodes it, "caf\ufffd"); otherwise its UTF-8 bytes.
        tok = self._added.get(token_id)
        if tok is None:
            tok = self._tok.id_to_token(token_id)
        if tok is None:  # an id inside the range that names no token
            raise self._id_error(token_id)
        try:
            out = bytes(_CHAR_TO_BYTE[c] for c in tok)
        except KeyError:
            out = tok.encode("utf-8")
        self._token_bytes[token_id] = out
        return out


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get the newly completed text.

    ``"".join(push(i) for i in ids) + flush()`` equals ``tokenizer.decode(ids)`` (with the
    same ``skip_special_tokens``). A character whose UTF-8 bytes are split over several
    byte-level tokens is returned whole by the push that completes it ("" before).
    """

    def __init__(self, tokenizer: FlamingoTokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget everything pushed so far."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Generic path (tokenizers that are not byte-level): re-decode a short window.
        self._ids: List[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        token_id = int(token_id)
        tok = self.tokenizer
        if self.skip_special_tokens and token_id in tok.special_token_ids:
            return ""
        if tok.is_byte_level:
            return self._utf8.decode(tok.token_bytes(token_id))
        self._ids.append(token_id)
        prefix_text = tok.decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
        new_text = tok.decode(self._ids[self._prefix:], self.skip_special_tokens)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return out
        return ""

    def flush(self) -> str:
        """Return whatever is pending (an incomplete character becomes U+FFFD) and reset."""
        tok = self.tokenizer
        if tok.is_byte_level:
            out = self._utf8.decode(b"", final=True)
        else:
            prefix_text = tok.decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
            new_text = tok.decode(self._ids[self._prefix:], self.skip_special_tokens)
            out = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
        self.reset()
        return out
