"""Stage 2's signature-binding rows (flamingo_rt.recipe.binding) and the LM's embed_offsets."""
import numpy as np
import pytest
import torch

from flamingo_rt.io import FlamingoTokenizer
from flamingo_rt.io.tokenizer import EOC_TOKEN
from flamingo_rt.models.config import LMConfig
from flamingo_rt.models.lm import DecoderLM
from flamingo_rt.recipe.binding import binding_accuracy, binding_rows, naming_chunks


@pytest.fixture(scope="module")
def tok():
    texts = ["This is a blicket.", "It is called a dax", "a red square at the top."] * 30
    return FlamingoTokenizer.train_bpe(texts, vocab_size=300)


def test_naming_chunks_layout(tok):
    ids, classes, q, words = naming_chunks(tok, np.random.default_rng(0), 4, 2)
    img = tok.image_token_id
    assert len(ids) == len(classes) and len(words) == 4 and 0 <= q < 4
    starts = [i for i, t in enumerate(ids) if t == img]
    assert len(starts) == 4 * 2 + 1 and starts[0] == 0
    bounds = starts + [len(ids)]
    seen = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert len(set(classes[a:b])) == 1  # one class per chunk
        seen.append(classes[a])
    assert sorted(seen[:-1]) == sorted([c for c in range(4) for _ in range(2)]) and seen[-1] == q
    text = tok.decode(ids)
    for c in range(4):  # each support chunk names its class's word
        assert text.count(words[c] + EOC_TOKEN) == 2
    assert not text.endswith(EOC_TOKEN)  # the query chunk ends at the format


def test_binding_rows_offsets_follow_classes_and_chunks(tok):
    x, off, y = binding_rows(tok, 3, 96, 16, np.random.default_rng(1), max_ways=3, max_shots=2,
                             scale=0.5, noise=0.0)
    assert x.shape == y.shape == (3, 96) and off.shape == (3, 96, 16) and x.dtype == torch.long
    for r in range(3):
        n = int((y[r] != -100).sum())
        assert torch.equal(x[r, 1:n], y[r, :n - 1])  # labels are the inputs shifted
        assert (x[r, n:] == tok.eos_token_id).all() and (off[r, n:] == 0).all()
        # with noise 0, positions of one chunk carry one vector, and each vector is a class's
        starts = (x[r, :n] == tok.image_token_id).nonzero().flatten().tolist() + [n]
        vecs = [off[r, a] for a in starts[:-1]]
        for a, b in zip(starts[:-1], starts[1:]):
            assert torch.equal(off[r, a:b], off[r, a].expand(b - a, -1))
        distinct = {tuple(v.tolist()) for v in vecs}
        assert len(distinct) <= 3  # at most max_ways classes
        if len(vecs) > 3:  # then some class repeats: the same vector again
            assert len(distinct) < len(vecs)
        assert abs(float(off[r, :n].std()) - 0.5) < 0.3
    # deterministic under the generator; noise makes chunks of one class differ
    x2, off2, y2 = binding_rows(tok, 3, 96, 16, np.random.default_rng(1), max_ways=3, max_shots=2,
                                scale=0.5, noise=0.0)
    assert torch.equal(x, x2) and torch.equal(off, off2) and torch.equal(y, y2)
    _, offn, _ = binding_rows(tok, 1, 96, 16, np.random.default_rng(2), max_ways=2, max_shots=3, scale=1.0, noise=0.3)
    starts = (x2[0] == tok.image_token_id).nonzero().flatten()
    assert not torch.equal(offn[0, 0], offn[0, int(starts[1])])


def test_embed_offsets_add_to_the_embeddings():
    torch.manual_seed(0)
    lm = DecoderLM(LMConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=32,
                            max_seq_len=32)).eval()
    ids = torch.randint(0, 50, (2, 7))
    off = torch.randn(2, 7, 16)
    h = lm.embed_tokens.register_forward_hook(lambda m, i, o: o + off)
    ref = lm(ids)
    h.remove()
    torch.testing.assert_close(lm(ids, embed_offsets=off), ref)
    assert not torch.allclose(lm(ids), ref)
    with pytest.raises(ValueError, match=r"embed_offsets of shape \(B, T, D\)"):
        lm(ids, embed_offsets=torch.zeros(2, 7, 8))


class _OracleLM(torch.nn.Module):
    """Reads the binding from the offsets: the word after the earlier chunk whose offset is
    nearest the last position's (or, with ``blind``, always the first chunk's word)."""

    def __init__(self, tok, dim, blind=False):
        super().__init__()
        self.cfg = LMConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=1, n_heads=1, n_kv_heads=1,
                            intermediate_size=8, max_seq_len=1024)
        self.embed_tokens = torch.nn.Embedding(tok.vocab_size, dim)
        self.tok, self.blind = tok, blind

    def forward(self, ids, embed_offsets):
        return torch.cat([self._row(r.tolist(), o) for r, o in zip(ids, embed_offsets)])

    def _row(self, ids, off):
        starts = [i for i, t in enumerate(ids) if t == self.tok.image_token_id]
        q = starts[-1]
        sims = [float(torch.nn.functional.cosine_similarity(off[s], off[q], dim=0)) for s in starts[:-1]]
        best = starts[0] if self.blind else starts[int(np.argmax(sims))]
        end = ids.index(self.tok.eoc_token_id, best)
        fmt, word = self.tok.decode(ids[best + 1:end]).rsplit(" ", 1)
        prompt_end = q + 1 + len(self.tok.encode(fmt))  # the query chunk: <image> + format
        logits = torch.zeros(1, len(ids), self.cfg.vocab_size)
        for j, t in enumerate(self.tok.encode(" " + word)):  # predict the word's tokens in order
            if prompt_end - 1 + j < len(ids):
                logits[0, prompt_end - 1 + j, t] = 20.0
        return logits


@pytest.mark.parametrize("blind", [False, True])
def test_binding_accuracy_scores_the_bound_word(tok, blind):
    acc = binding_accuracy(_OracleLM(tok, 16, blind), tok, 5, 1, 40, seed=0, noise=0.3)
    if blind:
        assert acc < 0.5  # the first chunk's word is right only when it is the query's class
    else:
        assert acc == 1.0


def test_binding_rows_amplitude_and_common_part(tok):
    def chunk_vectors(off, x):
        starts = (x == tok.image_token_id).nonzero().flatten().tolist()
        return off[starts]

    # a fixed amplitude scales the class vectors; no shared part: chunk vectors uncorrelated
    x, off, _ = binding_rows(tok, 4, 160, 64, np.random.default_rng(3), scale=1.0, noise=0.0, amplitude=(0.5, 0.5))
    v = torch.cat([chunk_vectors(off[r], x[r]) for r in range(4)])
    assert abs(float(v.std()) - 0.5) < 0.1
    # a shared part (its size uniform in [0, common) per row): chunks of a row point the same way
    def mean_cos(common):
        x, off, _ = binding_rows(tok, 16, 160, 64, np.random.default_rng(4), scale=1.0, noise=0.0,
                                 amplitude=(0.1, 0.1), common=common)
        cos = []
        for r in range(16):
            c = torch.nn.functional.normalize(chunk_vectors(off[r], x[r]), dim=-1)
            cos += [float(a) for i, a in enumerate((c @ c.T).flatten()) if i % (len(c) + 1)]
        return float(np.mean(cos))

    assert mean_cos(20.0) > 0.7 and abs(mean_cos(0.0)) < 0.3
    with pytest.raises(ValueError, match="max_ways >= 2"):
        binding_rows(tok, 1, 32, 8, np.random.default_rng(0), max_ways=1)


def test_random_formats_are_new_phrasings_of_training_words(tok):
    from flamingo_rt.recipe.binding import _train_words, random_format
    from flamingo_rt.world import CLASSIFY_FORMATS
    from flamingo_rt.world.text import heldout_markers

    g = np.random.default_rng(5)
    fmts = [random_format(g) for _ in range(400)]
    words = set(_train_words())
    markers = [m.lower() for m in heldout_markers()]
    assert "here" not in words  # a word only the held-out naming phrasing has
    for f in fmts:
        parts = f.lower().split()
        assert 2 <= len(parts) <= 4 and parts[-1] == "a" and f[0].isupper()
        assert set(parts[:-1]) <= words and not any(m in f.lower() for m in markers)
    assert len(set(fmts)) > 300
    # rows phrased that way: every chunk of a row has the row's (random) phrasing
    x, _, y = binding_rows(tok, 6, 128, 8, np.random.default_rng(6), max_ways=3, max_shots=2, random_formats=1.0)
    train = {t.text for t in CLASSIFY_FORMATS if t.split == "train"}
    for r in range(6):
        n = int((y[r] != -100).sum())
        text = tok.decode(x[r, :n].tolist())
        chunks = [c for c in text.split("<image>") if c]
        phrase = chunks[0].replace(EOC_TOKEN, "").rsplit(" ", 1)[0]
        assert phrase.endswith(" a") and phrase not in train and all(c.startswith(phrase) for c in chunks)
    # a share of 0 draws nothing extra: the rows are those of the default
    a = binding_rows(tok, 3, 96, 16, np.random.default_rng(1), max_ways=3, max_shots=2, random_formats=0.0)
    b = binding_rows(tok, 3, 96, 16, np.random.default_rng(1), max_ways=3, max_shots=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
