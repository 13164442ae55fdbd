"""FlamingoTokenizer: training, special tokens, round trips, batching, streaming decode."""
from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flamingo_rt.io.tokenizer import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    FlamingoTokenizer,
    IncrementalDecoder,
)

MULTIBYTE = ["café", "naïve", "über", "straße", "☕", "漢字", "日本語", "한국어", "Ωμέγα", "🙂", "ñandú"]


def _corpus(seed: int = 0, n: int = 1500) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    words += MULTIBYTE
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(3, 14))]
        text = " ".join(ws)
        if rng.random() < 0.3:
            text = f"{IMAGE_TOKEN}{text}{EOC_TOKEN}"
        out.append(text)
    return out


@pytest.fixture(scope="module")
def tok() -> FlamingoTokenizer:
    return FlamingoTokenizer.train_bpe(_corpus(), vocab_size=512)


def _random_unicode(rng: random.Random, n: int) -> str:
    pools = [
        (0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
        (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x300, 0x36F),  # incl. combining marks
    ]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


# ----------------------------------------------------------------------------- training


def test_train_special_ids_and_vocab(tok):
    assert tok.image_token_id == 0 and tok.eoc_token_id == 1
    assert tok.pad_token_id == 2 and tok.eos_token_id == 3 == tok.bos_token_id
    assert tok.IMAGE_TOKEN == "<image>" and tok.EOC_TOKEN == "<|endofchunk|>"
    assert 260 < tok.vocab_size <= 512 and len(tok) == tok.vocab_size
    assert tok.num_added_tokens == 0
    assert tok.token_to_id("<image>") == 0 and tok.id_to_token(1) == "<|endofchunk|>"
    # all 256 bytes are tokens: ids of the single-byte tokens are all distinct and present
    for b in (0, 10, 32, 200, 255):
        ids = tok.encode(bytes([b]).decode("latin-1"))
        assert all(i is not None for i in ids)


def test_training_is_deterministic(tok):
    again = FlamingoTokenizer.train_bpe(_corpus(), vocab_size=512)
    assert again.tokenizer.to_str() == tok.tokenizer.to_str()


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size must be"):
        FlamingoTokenizer.train_bpe(["a b c"], vocab_size=100)


# ----------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize(
    "text",
    [
        "hello world, the quick brown fox.",
        "café ☕ 漢字",
        "  leading and trailing spaces  \n\ttabs\r\n",
        "emoji 🙂🐱👍🏽 and unseen ∮ ℵ ⅞",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(5)
    for _ in range(20):
        s = _random_unicode(rng, rng.randint(1, 40))
        assert tok.decode(tok.encode(s)) == s


def test_special_tokens_are_single_ids(tok):
    ids = tok.encode("<image>a cat<|endofchunk|>")
    assert ids[0] == tok.image_token_id and ids[-1] == tok.eoc_token_id
    assert ids.count(tok.image_token_id) == 1 and ids.count(tok.eoc_token_id) == 1
    assert tok.decode(ids) == "<image>a cat<|endofchunk|>"
    assert tok.decode(ids, skip_special_tokens=True) == "a cat"

    ids = tok.encode("x<image>y<image><image>z")
    assert ids.count(tok.image_token_id) == 3
    assert tok.decode(ids) == "x<image>y<image><image>z"

    assert tok.encode("a", add_eos=True)[-1] == tok.eos_token_id
    assert tok.encode("a", add_bos=True)[0] == tok.eos_token_id


# ----------------------------------------------------------------------------- batching


def test_batch_padding_left_and_right(tok):
    texts = ["<image>a cat", "hello world café and more words here", ""]
    lens = [len(tok.encode(t)) for t in texts]
    T = max(lens)
    for side in ("left", "right"):
        out = tok(texts, padding_side=side)
        ids, mask = out["input_ids"], out["attention_mask"]
        assert ids.dtype == torch.long and mask.dtype == torch.long
        assert ids.shape == mask.shape == (3, T)
        for b, (t, n) in enumerate(zip(texts, lens)):
            assert int(mask[b].sum()) == n
            real = ids[b][mask[b].bool()].tolist()
            assert real == tok.encode(t)
            pad = ids[b][~mask[b].bool()]
            assert (pad == tok.pad_token_id).all()
            expected = [0] * (T - n) + [1] * n if side == "left" else [1] * n + [0] * (T - n)
            assert mask[b].tolist() == expected


def test_batch_max_length(tok):
    text = "hello world café and more words here"
    full = tok.encode(text)
    out = tok([text, "a"], padding_side="right", max_length=4)
    assert out["input_ids"].shape == (2, 4)
    assert out["input_ids"][0].tolist() == full[:4]
    out = tok([text], max_length=4, truncation_side="left")
    assert out["input_ids"][0].tolist() == full[-4:]
    out = tok(["a"], max_length=6, pad_to_max_length=True)
    assert out["input_ids"].shape == (1, 6) and out["attention_mask"].tolist() == [[0] * 5 + [1]]
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding_side="middle")


# ----------------------------------------------------------------------------- from_file / save


def _plain_tokenizer(with_eos: bool) -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"] if with_eos else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(_corpus(1, 200), trainer=trainer)
    return t


def test_from_file_adds_missing_specials(tmp_path):
    raw = _plain_tokenizer(with_eos=False)
    raw.save(str(tmp_path / "tokenizer.json"))
    n0 = raw.get_vocab_size(with_added_tokens=True)
    assert raw.token_to_id("<image>") is None

    tok = FlamingoTokenizer.from_file(tmp_path)  # the folder
    assert tok.num_added_tokens == 4
    assert tok.vocab_size == n0 + 4
    ids = {tok.image_token_id, tok.eoc_token_id, tok.pad_token_id, tok.eos_token_id}
    assert ids == set(range(n0, n0 + 4))  # at the end of the vocabulary
    enc = tok.encode("<image>a cat<|endofchunk|>")
    assert enc[0] == tok.image_token_id and enc[-1] == tok.eoc_token_id
    assert tok.decode(enc) == "<image>a cat<|endofchunk|>"
    # ordinary text keeps its ids
    assert tok.encode("hello café") == raw.encode("hello café", add_special_tokens=False).ids

    # saving then loading again adds nothing, and keeps every id
    saved = tok.save(tmp_path / "out")
    assert saved.name == "tokenizer.json" and saved.parent.name == "out"
    assert not [p for p in saved.parent.iterdir() if p.name != "tokenizer.json"]  # no temp files
    again = FlamingoTokenizer.from_file(saved)
    assert again.num_added_tokens == 0
    assert again.tokenizer.get_vocab(with_added_tokens=True) == tok.tokenizer.get_vocab(with_added_tokens=True)


def test_from_file_counts_only_missing(tmp_path):
    raw = _plain_tokenizer(with_eos=True)
    path = tmp_path / "tok.json"
    raw.save(str(path))
    tok = FlamingoTokenizer.from_file(path)
    assert tok.num_added_tokens == 3
    assert tok.eos_token_id == raw.token_to_id("<|endoftext|>")


def test_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        FlamingoTokenizer.from_file(tmp_path)


# ----------------------------------------------------------------------------- streaming


def _stream(dec: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_decoder_matches_full_decode(tok, skip):
    rng = random.Random(11)
    texts = ["<image>a cat<|endofchunk|> café ☕ 漢字", "🐱🐶 ∮ ℵ unseen", "plain ascii text"]
    texts += [_random_unicode(rng, 30) for _ in range(10)]
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    for text in texts:
        ids = tok.encode(text)
        pieces = _stream(dec, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder_waits_for_whole_character(tok):
    cat = "🐱"  # not in the corpus: several byte-level tokens
    ids = tok.encode(cat)
    assert len(ids) >= 2
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids] == [""] * (len(ids) - 1) + [cat]
    assert dec.flush() == ""
    # an incomplete character is flushed as a replacement character
    dec.push(ids[0])
    assert dec.flush() == "\ufffd"


def test_incremental_decoder_generic_path():
    """A tokenizer that is not byte-level (Metaspace) uses the re-decoding fallback."""
    t = Tokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False)
    t.train_from_iterator(_corpus(2, 300), trainer=trainer)
    n0 = t.get_vocab_size(with_added_tokens=True)
    # the corpus contains "<image>" and "<|endofchunk|>" as plain text, so the BPE may have
    # learnt them as ordinary tokens: those keep their id, and only new ids are counted
    tok = FlamingoTokenizer(t)
    assert not tok.is_byte_level
    assert 2 <= tok.num_added_tokens == tok.vocab_size - n0 <= 4
    assert tok.encode("x<|endofchunk|>y").count(tok.eoc_token_id) == 1
    for text in ["café ☕ 漢字 words", "<image>abc def<|endofchunk|> ghi"]:
        ids = tok.encode(text)
        assert "".join(_stream(IncrementalDecoder(tok), ids)) == tok.decode(ids)


def test_incremental_decoder_reads_non_ascii_added_tokens_like_decode():
    """An added token with characters of the byte-level alphabet streams exactly as
    tokenizers' decode renders it (the C++ tokenizer does the same)."""
    from tokenizers import AddedToken

    from flamingo_rt.io.tokenizer import FlamingoTokenizer, IncrementalDecoder

    tok = FlamingoTokenizer.train_bpe(["a red square, a blue circle"] * 20, vocab_size=280)
    tok.tokenizer.add_tokens([AddedToken("café", special=False), AddedToken("日本", special=False)])
    tok._refresh()
    ids = tok.encode("x café y 日本 z")
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


def test_ids_out_of_range_are_errors(tok):
    """decode, token_bytes and the streaming decoder refuse ids outside [0, vocab_size)
    (the backends dropped unknown ids silently and overflowed on negative ones)."""
    n = tok.vocab_size
    assert tok.decode([n - 1]) == tok.decode(torch.tensor([n - 1]))
    for bad in (n, 10**6, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is out of range for this tokenizer \(expected 0 <= id < {n}\)"):
            tok.decode([1, bad])
        if tok.is_byte_level:
            with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
                IncrementalDecoder(tok).push(bad)
