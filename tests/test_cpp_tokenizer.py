"""The C++ tokenizer (csrc/tokenizer, bound as torch.classes.flamingo_rt_C.Tokenizer) against
the `tokenizers` library through FlamingoTokenizer: the same ids, the same decoded text, the
same incremental decoding, on a few thousand texts of our world and of random Unicode
(letters of many scripts, digits of other scripts, combining marks, emoji, CJK, whitespace of
every kind, contractions, special tokens glued to text, code points newer than Python's
unicodedata); the same pre-tokenization on a sweep of the code points; the tokenizer.json
options it implements; and clear errors for missing, corrupted and unsupported files.

Deterministic (fixed seeds).
"""
from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from pathlib import Path
from typing import List

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from flamingo_rt import _ext
from flamingo_rt.io.tokenizer import SPECIAL_TOKENS, FlamingoTokenizer, IncrementalDecoder
from flamingo_rt.world import world_corpus

pytestmark = pytest.mark.skipif(
    not _ext.load() or os.environ.get("FLAMINGO_RT_NO_EXT", "") not in ("", "0"),
    reason=f"flamingo_rt._C not loaded: {_ext.error()}",
)


def cpp_tokenizer(source, is_json: bool = False):
    return torch.classes.flamingo_rt_C.Tokenizer(str(source), is_json)


# ------------------------------------------------------------------------------ the corpus


def _chars(*parts) -> List[str]:
    out: List[str] = []
    for p in parts:
        out.extend(p if isinstance(p, str) else (chr(c) for c in range(p[0], p[1] + 1)))
    return out


POOLS = {
    "latin": _chars((0xC0, 0xFF), (0x100, 0x17F), (0x1E00, 0x1EFF)),
    "greek": _chars((0x391, 0x3A9), (0x3B1, 0x3C9), (0x1F00, 0x1F15)),
    "cyrillic": _chars((0x400, 0x44F), (0x1C80, 0x1C8A)),
    "arabic": _chars((0x621, 0x64A), (0x64B, 0x652)),
    "hebrew": _chars((0x5D0, 0x5EA), (0x591, 0x5C7)),
    "devanagari": _chars((0x905, 0x939), (0x93E, 0x94D)),
    "thai": _chars((0xE01, 0xE3A)),
    "hangul": _chars((0xAC00, 0xAC40), (0x1100, 0x1112)),
    "kana": _chars((0x3041, 0x3096), (0x30A1, 0x30FA), "ー"),
    "cjk": _chars((0x4E00, 0x4FFF), (0x3400, 0x3420), (0x20000, 0x20020), "。、「」"),
    "emoji": _chars((0x1F600, 0x1F64F), (0x1F300, 0x1F320), (0x1F3FB, 0x1F3FF), (0x1F1E6, 0x1F1FF),
                    "\u200d\ufe0f\u2764\u2600"),
    # Nd of other scripts, Nl (Roman numerals), No (superscripts, fractions, circled)
    "digits": _chars("0123456789", (0x660, 0x669), (0x6F0, 0x6F9), (0x966, 0x96F), (0xE50, 0xE59),
                     (0xFF10, 0xFF19), (0x2160, 0x216F), "²³¹¼½¾", (0x2460, 0x2473), (0x1D7CE, 0x1D7FF)),
    "marks": _chars((0x300, 0x36F), (0x20D0, 0x20F0), "\u093c\u0e31\u3099\u309a"),
    # every White_Space character, and look-alikes that are not \s
    "space": list(" \t\n\r\x0b\x0c\x85\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                  "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"),
    "not_space": list("\u200b\u180e\u2060\ufeff\x1c\x1d\x1e\x1f\x00\x01\x7f"),
    "punct": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»—–…‘’“”•·§¶†‡€£¥©®™°±×÷"),
    "apostrophe": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "’s", "'", "''",
                   "'x", "'l", "'r", "'v"],
    "special": list(SPECIAL_TOKENS) + ["<image", "image>", "<|endof", "chunk|>", "<|endoftext",
                                       "<<image>>", "<pad><pad>"],
    # letters and digits assigned in Unicode 15/16 (unknown to Python 3.11's unicodedata)
    "newer": _chars((0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0x10D4A, 0x10D65), (0x16D40, 0x16D6C),
                    (0x11F04, 0x11F10), (0x10D40, 0x10D49), (0x11F50, 0x11F59)),
    "private": _chars((0xE000, 0xE010), (0xF0000, 0xF0005), (0x10FFF0, 0x10FFFD)),
    "ascii": ["the", "a", "red", "square", "Question", "Answer", "what", "is", "it", "I", "don",
              "you", "hello", "world", "x", "ABC", "cat", "Hello", "IT", "42", "3.14"],
    "any": None,  # any scalar value
}
JOINERS = ["", " ", "  ", "\n", "\t", " \n", "\u00a0", "\u3000", "", "", " "]


def _piece(rng: random.Random, pool: str) -> str:
    if pool == "ascii":
        return rng.choice(POOLS["ascii"])
    if pool == "any":
        out = []
        while len(out) < rng.randint(1, 3):
            c = rng.randrange(0x110000)
            if not 0xD800 <= c <= 0xDFFF:
                out.append(chr(c))
        return "".join(out)
    if pool in ("apostrophe", "special"):
        return rng.choice(POOLS[pool])
    return "".join(rng.choice(POOLS[pool]) for _ in range(rng.randint(1, 4)))


def random_texts(n: int, seed: int) -> List[str]:
    """Texts of 0..14 pieces, mostly from 3 pools per text, joined by assorted whitespace."""
    rng = random.Random(seed)
    names = list(POOLS)
    out = []
    for _ in range(n):
        favour = rng.sample(names, 3)
        parts = []
        for _ in range(rng.randint(0, 14)):
            parts.append(_piece(rng, rng.choice(favour) if rng.random() < 0.6 else rng.choice(names)))
            parts.append(rng.choice(JOINERS))
        out.append("".join(parts))
    return out


EDGE_TEXTS = ["", " ", "  ", "a", "<image>", " <image> ", "x  <image>\t\tb", "a<image>b<|endofchunk|>",
              "<|endofchunk|><|endofchunk|>", "  hi  ", "hi \n", "\n\n\n", "it's I'll we've 'S", "\u3000\u3000a",
              "a\u00a0\u00a0b", "😀" * 5, "e\u0301\u0301", "<|endoftext|>" * 3 + "<pad>"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A FlamingoTokenizer with merges across scripts, saved; and the C++ tokenizer of its file."""
    ft = FlamingoTokenizer.train_bpe(world_corpus(600, seed=1) + random_texts(600, seed=123), vocab_size=1500)
    path = ft.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return ft, path, cpp_tokenizer(path)


@pytest.fixture(scope="module")
def corpus() -> List[str]:
    return EDGE_TEXTS + world_corpus(1000, seed=5) + random_texts(3000, seed=7)


def _mismatches(pairs, limit: int = 5) -> str:
    return "\n".join(f"  text {t!r}\n    tokenizers {e}\n    C++        {g}" for t, e, g in pairs[:limit])


# ------------------------------------------------------------------------------ encode / decode


def test_encode_equals_tokenizers(trained, corpus):
    ft, _, tok = trained
    bad = [(t, ft.encode(t), tok.encode(t)) for t in corpus]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"{len(bad)} of {len(corpus)} texts encode differently:\n" + _mismatches(bad)
    # the corpus exercises what it should: special tokens, non-ASCII merges, long texts
    ids = [i for t in corpus for i in ft.encode(t)]
    assert {ft.image_token_id, ft.eoc_token_id, ft.pad_token_id, ft.eos_token_id} <= set(ids)
    assert sum(1 for t in corpus if any(ord(c) > 0xFFFF for c in t)) > 300


def test_decode_equals_tokenizers(trained, corpus):
    ft, _, tok = trained
    rng = random.Random(3)
    seqs = [ft.encode(t) for t in corpus]
    # random ids: broken UTF-8 everywhere (lone continuation bytes, truncated characters)
    seqs += [[rng.randrange(ft.vocab_size) for _ in range(rng.randint(0, 12))] for _ in range(1500)]
    for skip in (False, True):
        bad = [(ids, ft.decode(ids, skip), tok.decode(ids, skip)) for ids in seqs]
        bad = [b for b in bad if b[1] != b[2]]
        assert not bad, f"skip_special_tokens={skip}: {len(bad)} sequences decode differently:\n" + _mismatches(bad)
    assert any("\ufffd" in ft.decode(s) for s in seqs)


def test_incremental_decoder_equals_python(trained, corpus):
    """Push by push the same pieces as flamingo_rt.io.tokenizer.IncrementalDecoder (whole
    characters only), and all of them together equal decode."""
    ft, _, tok = trained
    rng = random.Random(4)
    seqs = [ft.encode(t) for t in corpus[:1500]]
    seqs += [[rng.randrange(ft.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(800)]
    for skip in (False, True):
        py = IncrementalDecoder(ft, skip_special_tokens=skip)
        cc = torch.classes.flamingo_rt_C.IncrementalDecoder(tok, skip)
        for ids in seqs:
            py_pieces = [py.push(i) for i in ids] + [py.flush()]
            cc_pieces = [cc.push(i) for i in ids] + [cc.flush()]
            assert cc_pieces == py_pieces, (ids, py_pieces, cc_pieces)
            assert "".join(cc_pieces) == ft.decode(ids, skip)


def test_incremental_decoder_multibyte(trained):
    """A character whose bytes are split over byte tokens comes out with the last one."""
    ft, _, tok = trained
    for ch in ["é", "中", "😀", "\U00020000", "\u0915\u094d"]:
        ids = [tok.token_to_id(_byte_symbol(b)) for b in ch.encode("utf-8")]
        dec = torch.classes.flamingo_rt_C.IncrementalDecoder(tok, False)
        pieces = [dec.push(i) for i in ids]
        first_len = len(ch[0].encode("utf-8"))
        assert pieces[: first_len - 1] == [""] * (first_len - 1)
        assert "".join(pieces) == ch and dec.flush() == ""
    dec = torch.classes.flamingo_rt_C.IncrementalDecoder(tok, False)
    assert dec.push(tok.token_to_id(_byte_symbol(0xF0))) == ""
    assert dec.flush() == "\ufffd"
    assert dec.push(tok.token_to_id("a")) == "a"  # flush emptied it
    assert dec.push(tok.token_to_id(_byte_symbol(0xF0))) == ""
    dec.reset()  # drops the held-back byte
    assert dec.push(tok.token_to_id("a")) == "a" and dec.flush() == ""


# byte strings that are not UTF-8, beside their well-formed neighbours: surrogates (ED A0-BF),
# past U+10FFFF (F4 90+), overlong forms (E0 80-9F, F0 80-8F, C0, C1), a lone continuation
# byte, bytes that never occur (F5+), truncated characters at the end and in the middle
_ILL_FORMED = [b"\xed\xa0\x80", b"\xed\x9f\xbf", b"\xf4\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xe0\x80\x80",
               b"\xe0\xa0\x80", b"\xf0\x80\x80\x80", b"\xf0\x90\x80\x80", b"\xc0\x80", b"\xc1\xbf", b"\xc2\x80",
               b"\x80", b"\xf5\x80\x80\x80", b"\xff", b"a\xe2\x82", b"\xe2\x82a", b"\xf0\x9f\x98x\xed\xbf\xbf"]


def test_ill_formed_bytes_decode_as_tokenizers(trained):
    """Byte tokens that spell ill-formed UTF-8: each maximal ill-formed subpart is one U+FFFD
    (Unicode's substitution practice: tokenizers' from_utf8_lossy, Python's "replace"), in
    decode and through the incremental decoder alike."""
    ft, _, tok = trained
    for raw in _ILL_FORMED:
        ids = [tok.token_to_id(_byte_symbol(b)) for b in raw]
        want = raw.decode("utf-8", "replace")
        assert ft.decode(ids, False) == want, raw
        assert tok.decode(ids, False) == want, raw
        dec = torch.classes.flamingo_rt_C.IncrementalDecoder(tok, False)
        assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == want, raw


def _byte_symbols() -> List[str]:
    """The byte-level alphabet: byte -> the character that stands for it."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


_BYTE_SYMBOLS = _byte_symbols()


def _byte_symbol(b: int) -> str:
    return _BYTE_SYMBOLS[b]


def test_lookups_equal_tokenizers(trained):
    ft, path, tok = trained
    assert tok.vocab_size() == ft.vocab_size
    assert tok.num_added_tokens() == ft.num_added_tokens == 0
    assert [tok.image_token_id(), tok.eoc_token_id(), tok.pad_token_id(), tok.eos_token_id()] == [0, 1, 2, 3]
    assert set(tok.special_token_ids()) == set(ft.special_token_ids)
    for i in range(ft.vocab_size):
        t = ft.id_to_token(i)
        assert tok.id_to_token(i) == t
        assert tok.token_to_id(t) == i
        assert bytes(tok.token_bytes(i)) == ft.token_bytes(i)
        assert tok.is_special(i) == (i in ft.special_token_ids)
    assert tok.id_to_token(ft.vocab_size) is None and tok.token_to_id("not a token") is None
    by_dir = cpp_tokenizer(path.parent)
    assert by_dir.encode("a red square<image>") == ft.encode("a red square<image>")
    from_json = cpp_tokenizer(path.read_text(encoding="utf-8"), is_json=True)
    assert from_json.encode("Hello, world") == ft.encode("Hello, world")


# ------------------------------------------------------------------------------ pre-tokenization


def _pre_tokens(ft: FlamingoTokenizer, text: str) -> List[str]:
    return [p for p, _ in ft.tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def _to_symbols(s: str) -> str:
    return "".join(_BYTE_SYMBOLS[b] for b in s.encode("utf-8"))


def test_pre_tokenize_sweeps_the_code_points(trained):
    """Every code point of the BMP, every 7th above, in contexts that tell letter, number,
    whitespace and other apart: the C++ split equals the Oniguruma one (pieces compared by
    their lengths, as both cover the text)."""
    ft, _, tok = trained
    cps = [c for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF and c != ord("<")]
    cps += list(range(0x10000, 0x110000, 7))
    for lo in range(0, len(cps), 50000):
        chunk = cps[lo:lo + 50000]
        text = "".join(f"a{chr(c)}1{chr(c)}.{chr(c)} " for c in chunk)
        exp = [e - s for _, (s, e) in ft.tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        got = [len(p) for p in tok.pre_tokenize(text)]
        if got != exp:
            k = next((i for i, (a, b) in enumerate(zip(got, exp)) if a != b), min(len(got), len(exp)))
            at = sum(got[:k])
            pytest.fail(f"pre-tokenization differs at piece {k}, near {text[at - 4:at + 8]!r} "
                        f"(code point U+{ord(text[at + 1]) if at + 1 < len(text) else 0:04X}): "
                        f"tokenizers lengths {exp[k:k + 4]}, C++ {got[k:k + 4]}")


def test_unicode_tables_agree_with_unicodedata():
    """The committed tables (tools/gen_unicode_tables.py) on every scalar value: where Python's
    unicodedata assigns a category, letter = L*, number = N*; whitespace = White_Space."""
    header = (Path(__file__).resolve().parent.parent / "csrc" / "tokenizer" / "unicode_tables.h").read_text()
    tables = {}
    for name, body in re.findall(r"k(\w+)Ranges\[\] = \{(.*?)\};", header, re.S):
        tables[name] = set()
        for lo, hi in re.findall(r"\{0x([0-9A-F]+), 0x([0-9A-F]+)\}", body):
            tables[name].update(range(int(lo, 16), int(hi, 16) + 1))
    assert set(tables) == {"Letter", "Number", "Whitespace"}
    white = {0x85, *range(0x09, 0x0E)}
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        cat = unicodedata.category(chr(c))
        if cat in ("Zs", "Zl", "Zp"):
            white.add(c)
        if cat != "Cn":
            assert (c in tables["Letter"]) == (cat[0] == "L"), f"U+{c:04X} ({cat})"
            assert (c in tables["Number"]) == (cat[0] == "N"), f"U+{c:04X} ({cat})"
    assert tables["Whitespace"] == white


def test_pre_tokenize_corpus(trained, corpus):
    ft, _, tok = trained
    for t in corpus:
        if any(s in t for s in SPECIAL_TOKENS):
            continue
        assert [_to_symbols(p) for p in tok.pre_tokenize(t)] == _pre_tokens(ft, t), t


# ------------------------------------------------------------------------------ tokenizer.json options


def _variant(base_path, tmp_path, name, mutate=None, add=None, verbatim=False):
    """(tokenizers' tokenizer, ours) of the base file changed by ``mutate`` (the JSON) and
    ``add`` (the loaded tokenizer). Ours reads the file tokenizers writes back, or with
    ``verbatim`` the mutated JSON itself (what tokenizers would normalize away on writing,
    such as a merge listed twice)."""
    d = json.loads(base_path.read_text(encoding="utf-8"))
    if mutate:
        mutate(d)
    raw = Tokenizer.from_str(json.dumps(d))
    if add:
        add(raw)
    p = tmp_path / f"{name}.json"
    # before FlamingoTokenizer adds to `raw`
    p.write_text(json.dumps(d) if verbatim else raw.to_str(), encoding="utf-8")
    return FlamingoTokenizer(raw), cpp_tokenizer(p)


def _drop_symbols(d, symbols):
    """Remove byte-level symbols from the vocabulary (and every merge that needs them)."""
    vocab = d["model"]["vocab"]
    gone = {k for k in vocab if any(s in k for s in symbols) and k not in SPECIAL_TOKENS}
    d["model"]["merges"] = [m for m in d["model"]["merges"]
                            if not ({m[0], m[1], m[0] + m[1]} & gone)]
    kept = sorted(((k, v) for k, v in vocab.items() if k not in gone), key=lambda kv: kv[1])
    d["model"]["vocab"] = {k: i for i, (k, _) in enumerate(kept)}


def _unk(fuse):
    def mutate(d):
        _drop_symbols(d, [_BYTE_SYMBOLS[b] for b in range(0xA0, 0xC0)] + ["z", "Q"])
        d["model"]["vocab"]["[UNK]"] = len(d["model"]["vocab"])
        d["model"].update(unk_token="[UNK]", fuse_unk=fuse)
    return mutate


def _byte_fallback(d):
    _drop_symbols(d, [_BYTE_SYMBOLS[b] for b in range(0xA0, 0xC0)] + ["z"])
    n = len(d["model"]["vocab"])
    for b in range(256):
        d["model"]["vocab"][f"<0x{b:02X}>"] = n + b
    d["model"]["byte_fallback"] = True


def _ignore_merges(d):
    """ignore_merges with whole-word vocabulary entries that the merges cannot build: such a
    word is one token only when the model looks the word up before merging."""
    vocab = d["model"]["vocab"]
    for w in _UNMERGEABLE_WORDS:
        vocab.setdefault(w, len(vocab))
    d["model"]["ignore_merges"] = True


#: pre-tokenized words (byte-level symbols) that test_tokenizer_json_options' texts contain
_UNMERGEABLE_WORDS = ("\u0120qqzx", "qqzx", "\u0120zqzq")


def _duplicate_merges(d):
    """The first merges listed again at the end: a pair listed twice takes its last rank (a
    map insert in tokenizers), which moves these merges behind every other."""
    merges = d["model"]["merges"]
    d["model"]["merges"] = merges + merges[:8]


def _byte_fallback_partial(d):
    """Byte tokens for every byte but 0xA0-0xBF: the symbols of those bytes (U+00A0-U+00BF,
    UTF-8 C2 A0-BF) have their first byte's token but not their second's, and a character
    whose bytes are not all there takes no byte tokens (no unk token: it is dropped)."""
    _drop_symbols(d, [_BYTE_SYMBOLS[b] for b in range(0xA0, 0xC0)])
    n = len(d["model"]["vocab"])
    for b in [b for b in range(256) if not 0xA0 <= b < 0xC0]:
        d["model"]["vocab"][f"<0x{b:02X}>"] = n
        n += 1
    d["model"]["byte_fallback"] = True


def _added(raw):
    raw.add_tokens([AddedToken("red", lstrip=True, normalized=False),
                    AddedToken("square", rstrip=True, normalized=True),
                    AddedToken(" the", normalized=True),
                    AddedToken("ab", lstrip=True, rstrip=True, normalized=False),
                    AddedToken("日本", normalized=False)])
    raw.add_special_tokens([AddedToken("<|x|>", lstrip=True, rstrip=True)])


def _no_special(d):
    d["added_tokens"] = []
    kept = sorted(((k, v) for k, v in d["model"]["vocab"].items() if k not in SPECIAL_TOKENS),
                  key=lambda kv: kv[1])
    d["model"]["vocab"] = {k: i for i, (k, _) in enumerate(kept)}


def _gpt2_style(d):
    """Fields as in GPT-2's tokenizer.json: empty prefix/suffix strings, a ByteLevel
    post-processor, <|endoftext|> a normalized special token."""
    d["model"].update(continuing_subword_prefix="", end_of_word_suffix="")
    d["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True}
    for t in d["added_tokens"]:
        if t["content"] == "<|endoftext|>":
            t["normalized"] = True


VARIANTS = {
    "add_prefix_space": dict(mutate=lambda d: d["pre_tokenizer"].update(add_prefix_space=True)),
    "no_regex": dict(mutate=lambda d: d["pre_tokenizer"].update(use_regex=False)),
    "prefix_no_regex": dict(mutate=lambda d: d["pre_tokenizer"].update(use_regex=False, add_prefix_space=True)),
    "merges_as_strings": dict(mutate=lambda d: d["model"].update(merges=[a + " " + b for a, b in d["model"]["merges"]])),
    "ignore_merges": dict(mutate=_ignore_merges),
    "duplicate_merges": dict(mutate=_duplicate_merges, verbatim=True),
    "byte_fallback_partial": dict(mutate=_byte_fallback_partial),
    "added_tokens": dict(add=_added),
    "no_special_tokens": dict(mutate=_no_special),
    "unk": dict(mutate=_unk(False)),
    "unk_fused": dict(mutate=_unk(True)),
    "byte_fallback": dict(mutate=_byte_fallback),
    "gpt2_style": dict(mutate=_gpt2_style),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tokenizer_json_options(trained, corpus, tmp_path, name):
    _, path, _ = trained
    ft, tok = _variant(path, tmp_path, name, **VARIANTS[name])
    texts = corpus[::4] + ["qqzx qqzx zqzq", "a qqzx, zqzq."]
    bad = [(t, ft.encode(t), tok.encode(t)) for t in texts]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"{name}: {len(bad)} of {len(texts)} texts encode differently:\n" + _mismatches(bad)
    for t in texts[:300]:
        ids = ft.encode(t)
        assert tok.decode(ids, False) == ft.decode(ids, False) and tok.decode(ids, True) == ft.decode(ids, True)
    assert tok.vocab_size() == ft.vocab_size and tok.num_added_tokens() == ft.num_added_tokens
    assert [tok.image_token_id(), tok.eoc_token_id(), tok.pad_token_id(), tok.eos_token_id()] == \
        [ft.image_token_id, ft.eoc_token_id, ft.pad_token_id, ft.eos_token_id]
    if name == "no_special_tokens":
        assert ft.num_added_tokens == 4 and ft.image_token_id == ft.vocab_size - 4


def test_subword_prefix_and_suffix(corpus, tmp_path):
    """A BPE trained with continuing_subword_prefix and end_of_word_suffix."""
    raw = Tokenizer(models.BPE(continuing_subword_prefix="##", end_of_word_suffix="</w>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, continuing_subword_prefix="##", end_of_word_suffix="</w>",
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(world_corpus(400, seed=2) + random_texts(300, seed=9), trainer=trainer)
    p = tmp_path / "tokenizer.json"
    p.write_text(raw.to_str(), encoding="utf-8")
    ft, tok = FlamingoTokenizer(raw), cpp_tokenizer(p)
    bad = [(t, ft.encode(t), tok.encode(t)) for t in corpus[::3]]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"{len(bad)} texts encode differently:\n" + _mismatches(bad)


# ------------------------------------------------------------------------------ errors


def _error(source, is_json=False) -> str:
    with pytest.raises(RuntimeError) as ei:
        cpp_tokenizer(source, is_json)
    return str(ei.value)


def test_errors_missing_corrupted_unsupported(trained, tmp_path):
    _, path, tok = trained
    text = path.read_text(encoding="utf-8")
    missing = tmp_path / "nope" / "tokenizer.json"
    assert str(missing) in _error(missing) and "expected a readable tokenizer.json" in _error(missing)
    assert "tokenizer.json" in _error(tmp_path)  # a folder without the file

    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2], encoding="utf-8")
    msg = _error(cut)
    assert str(cut) in msg and "invalid JSON at line" in msg and "end of input" in msg

    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b'{"version": "1.0", "model": "\xff\xfe"}')
    assert "expected valid UTF-8 in a string" in _error(garbage)

    def with_(old, new):
        assert old in text
        return text.replace(old, new, 1)

    assert "normalizer" in _error(with_('"normalizer": null', '"normalizer": {"type": "NFKC"}'), True)
    assert "WordPiece" in _error(with_('"type": "BPE"', '"type": "WordPiece"'), True)
    assert "model.dropout" in _error(with_('"dropout": null', '"dropout": 0.1'), True)
    assert "single_word" in _error(with_('"single_word": false', '"single_word": true'), True)
    assert "gets id 1" in _error(with_('"id": 1,', '"id": 9,'), True)
    msg = _error(with_('"merges": [', '"merges": [["no", "such"], '), True)
    assert "model.merges[0]" in msg and '"no"' in msg
    assert "twice" in _error('{"model": 1, "model": 2}', True)
    assert "empty" in _error("", True)

    with pytest.raises(RuntimeError, match=r"expected a token id in \[0, \d+\) that has a token, found 99999"):
        tok.decode([5, 99999], False)
    with pytest.raises(RuntimeError, match="IncrementalDecoder::push: expected a token id"):
        torch.classes.flamingo_rt_C.IncrementalDecoder(tok, False).push(-3)
