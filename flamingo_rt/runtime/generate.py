"""Few-shot generation: batched, streaming, beam search, prefix reuse, scoring, sessions.

Every request encodes each medium once (vision encoder + resampler), computes each
cross-attention layer's keys and values once per medium (the media cache), and decodes
against static caches — nothing is recomputed per token or per beam.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..io.tokenizer import FlamingoTokenizer, IncrementalDecoder
from ..models.flamingo import Flamingo
from .beams import BeamHypotheses
from .cache import StaticCache
from .engine import (check_pack_limit, decode_step, decode_tensors, encode_rows, forward_chunk,
                     forward_packed_rows, left_pad, pack_continuations)
from .media_memo import MediaMemo
from .prompt import EncodedPrompt, PreprocessedMedia, PromptItem, encode_candidates, encode_prompt
from .sampling import GenerationConfig, apply_repetition_penalty, choose_next

PromptLike = Union[str, Sequence[PromptItem], EncodedPrompt]


@dataclass
class Prefix:
    """A prompt prefix (e.g. a support set) whose caches were computed once; queries
    continue from it (:meth:`Generator.generate` with ``prefix=``)."""

    cache: StaticCache  # one row
    last_logits: torch.Tensor  # (1, V)
    num_tokens: int
    num_media: int
    ids: Tuple[int, ...] = ()  # its token ids (what a repetition penalty counts as seen)


def _config(config: Optional[GenerationConfig], overrides: dict) -> GenerationConfig:
    """``config`` (default: GenerationConfig()) with keyword ``overrides``, validated."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"expected config to be a GenerationConfig (or None), got {type(config).__name__}; "
                        "pass settings as GenerationConfig(...) or as keyword arguments")
    try:
        return replace(config or GenerationConfig(), **overrides).validate()
    except TypeError as e:  # an unknown keyword
        raise TypeError(f"unknown generation setting: {e}") from None


def _score_after(gen: "Generator", cache: StaticCache, logits: torch.Tensor, cand_ids: List[List[List[int]]],
                 max_pack_tokens: int) -> List[List[float]]:
    """Each candidate's log-likelihood after the context of each row of ``cache``, whose
    last logits are ``logits`` (B, V); ``cand_ids[b]`` are row b's candidates. The first
    tokens come from those logits, the rest from packs of the candidates (less their last
    token), at most ``max_pack_tokens`` and the cache's free slots per row each (a longer
    candidate runs alone), the rows' packs side by side in one chunk
    (:func:`forward_packed_rows`). The cache's context is unchanged."""
    first = logits.float().log_softmax(-1)
    out = [[float(first[b, ids[0]]) for ids in row] for b, row in enumerate(cand_ids)]
    cap = min(max_pack_tokens, cache.max_seq_len - cache.length)
    packers = [pack_continuations([(i, ids[:-1]) for i, ids in enumerate(row) if len(ids) > 1], cap)
               for row in cand_ids]
    while True:
        packs = [next(p, []) for p in packers]
        if not any(packs):
            return out
        lgs = forward_packed_rows(gen.model, cache, [[feed for _, feed in pack] for pack in packs],
                                  backend=gen.backend)
        for b, pack in enumerate(packs):
            for (i, _), lg in zip(pack, lgs[b]):
                lp = lg.float().log_softmax(-1)
                nxt = torch.tensor(cand_ids[b][i][1:], device=lp.device)
                out[b][i] += float(lp.gather(1, nxt[:, None]).sum())


class Generator:
    """Generation over a :class:`~flamingo_rt.models.flamingo.Flamingo` and its tokenizer.

    Args:
        model: the model (put in eval mode; its device and dtype are used).
        tokenizer: a :class:`~flamingo_rt.io.tokenizer.FlamingoTokenizer`.
        max_seq_len: cache length in tokens (prompt + generated), default the LM's.
        max_media: media per row the caches hold, default 32.
        backend: op backend for the attention ops (default: auto).
        compile: run the decode step (:func:`~flamingo_rt.runtime.engine.decode_tensors`)
            through ``torch.compile(fullgraph=True, dynamic=False)``: ``True`` for inductor, or
            a torch.compile backend name such as ``"aot_eager"``. The step reads its position
            from a device tensor, so one graph serves every position of a batch size.
        cuda_graphs: replay the compiled step as a CUDA graph (inductor's
            ``mode="reduce-overhead"``; the caches live at fixed addresses). Default: on when
            ``compile`` is ``True`` and the model is on a CUDA device. Needs ``compile=True``.
    """

    def __init__(self, model: Flamingo, tokenizer: FlamingoTokenizer, max_seq_len: Optional[int] = None,
                 max_media: int = 32, backend: Optional[str] = None, compile: Union[bool, str] = False,
                 cuda_graphs: Optional[bool] = None):
        for name, v, lo in (("max_seq_len", max_seq_len, 1), ("max_media", max_media, 0)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise ValueError(f"expected {name} to be an integer >= {lo}{' (or None)' if name == 'max_seq_len' else ''}, "
                                 f"got {v!r}")
        if tokenizer.vocab_size > model.config.lm.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary of "
                             f"{model.config.lm.vocab_size}: expected the model's tokenizer (or a model with room for "
                             "its ids)")
        self.model = model.eval()
        self.tok = tokenizer
        self.max_seq_len = max_seq_len or model.config.lm.max_seq_len
        if self.max_seq_len > model.config.lm.max_seq_len:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the LM's {model.config.lm.max_seq_len}")
        self.max_media = max_media
        self.backend = backend
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._caches = {}
        self.vision_calls = 0  # media frames encoded (for tests and stats)
        self._memo: Optional[MediaMemo] = None  # set inside media_memo()
        self._banned = [tokenizer.image_token_id, tokenizer.pad_token_id]
        if cuda_graphs is None:
            cuda_graphs = compile is True and self.device.type == "cuda"
        if cuda_graphs and (compile is not True or self.device.type != "cuda"):
            raise ValueError(
                f"cuda_graphs=True needs compile=True (inductor) and a model on a CUDA device; got "
                f"compile={compile!r} on {self.device}"
            )
        self.cuda_graphs = bool(cuda_graphs)
        self._decode_tensors = decode_tensors
        if compile:
            kw = {"mode": "reduce-overhead"} if self.cuda_graphs else {}
            if compile is not True:
                kw["backend"] = compile
            self._decode_tensors = torch.compile(decode_tensors, fullgraph=True, dynamic=False, **kw)

    def _decode(self, cache: StaticCache, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step (B,) tokens -> (B, V) logits, through the (compiled) step. Under
        CUDA graphs the logits live in the graph's memory until the next step: callers use
        them before the next call (they do: the next token is chosen from them first)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # <image> is banned from sampling, so a decoded token never needs a medium
        return decode_step(self.model, cache, tokens, self.backend, step=self._decode_tensors, check_media=False)

    @classmethod
    def from_pretrained(cls, folder, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                        **kwargs) -> "Generator":
        """Load a model folder (safetensors weights, ``config.json``, ``tokenizer.json``)
        on ``device`` / ``dtype`` and wrap it; ``kwargs`` go to :class:`Generator`."""
        from ..io.pretrained import load_pretrained

        model, tok = load_pretrained(folder, device=device, dtype=dtype)
        if tok is None:
            raise FileNotFoundError(f"{folder} has no tokenizer.json; expected a model folder with one")
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------ helpers
    def encode(self, prompt: PromptLike) -> EncodedPrompt:
        if isinstance(prompt, EncodedPrompt):
            return prompt
        return encode_prompt(prompt, self.tok, self.model.config.vision)

    def _cache(self, batch: int) -> StaticCache:
        c = self._caches.get(batch)
        if c is None:
            c = self._caches[batch] = StaticCache(self.model, batch, self.max_seq_len, self.max_media,
                                                  dtype=self.dtype, device=self.device)
        c.reset()
        return c

    def _stop_ids(self, cfg: GenerationConfig) -> List[int]:
        ids = []
        if cfg.stop_on_eoc:
            ids.append(self.tok.eoc_token_id)
        if cfg.stop_on_eos:
            ids.append(self.tok.eos_token_id)
        return ids

    def _check_fits(self, lengths: Sequence[int], counts: Sequence[int], cfg: GenerationConfig,
                    base_tokens: int = 0, base_media: int = 0, what: str = "max_new_tokens") -> None:
        """Raise before any memory is allocated when a request cannot fit (``what``: the name
        of ``cfg.max_new_tokens`` in the message)."""
        need = base_tokens + max(lengths) + cfg.max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(
                f"prompt ({base_tokens + max(lengths)} tokens) plus {what} ({cfg.max_new_tokens}) = {need} "
                f"exceeds the cache length {self.max_seq_len}"
            )
        if base_media + max(counts, default=0) > self.max_media:
            raise ValueError(
                f"a prompt has {base_media + max(counts)} media; this generator holds at most {self.max_media} "
                "per prompt (max_media)"
            )

    def _encode_media(self, rows: List[List[torch.Tensor]]):
        tokens, counts, frames = encode_rows(self.model, rows, self.device, self.dtype, self.backend, self._memo)
        self.vision_calls += frames
        return tokens, counts

    @contextlib.contextmanager
    def media_memo(self, max_items: int = 4096) -> Iterator[MediaMemo]:
        """Inside this block, a medium equal to one already encoded in it (the same
        preprocessed pixels) is not encoded again: its resampled tokens are reused
        (:class:`~flamingo_rt.runtime.media_memo.MediaMemo`, at most ``max_items`` media,
        least recently used dropped first; forgotten if the vision encoder's or resampler's
        weights change). For evaluations, where a query's support images recur at every
        shot count. Yields the memo (``hits`` / ``misses``); blocks may nest (the inner
        one's memo is used inside it)."""
        memo, outer = MediaMemo(max_items), self._memo
        self._memo = memo
        try:
            yield memo
        finally:
            self._memo = outer

    def _prefill(self, cache: StaticCache, encs: List[EncodedPrompt]) -> torch.Tensor:
        tokens, counts = self._encode_media([e.media for e in encs])
        cache.add_media(self.model, tokens, counts)
        ids, lengths = left_pad([e.ids for e in encs], self.tok.pad_token_id, self.device)
        return forward_chunk(self.model, cache, ids, lengths, last_only=True, backend=self.backend)

    def _mask_banned(self, logits: torch.Tensor, cfg: Optional[GenerationConfig] = None,
                     step: int = 0) -> torch.Tensor:
        """(B, V) logits -> float32 copy with the never-generated tokens at -inf, and the stop
        tokens too while ``step`` (the index of the token being chosen) is below
        ``cfg.min_new_tokens``. NaN logits raise FloatingPointError (greedy argmax would take
        the NaN as the maximum: a banned token or a silent stop)."""
        logits = logits.float().clone()
        nan = logits.isnan().any(-1)
        if bool(nan.any()):
            raise FloatingPointError(f"the model's logits are NaN in prompt row(s) {nan.nonzero().flatten().tolist()} "
                                     "(non-finite weights or media features, or an overflow in a half dtype)")
        logits[:, self._banned] = float("-inf")
        logits[:, self.tok.vocab_size:] = float("-inf")  # padded LM vocab rows beyond the tokenizer's
        if cfg is not None and step < cfg.min_new_tokens:
            logits[:, self._stop_ids(cfg)] = float("-inf")
        return logits

    # ------------------------------------------------------------------ prefix
    @torch.no_grad()
    def prefix(self, prompt: PromptLike) -> Prefix:
        """Compute a prompt prefix's caches once (e.g. a few-shot support set)."""
        enc = self.encode(prompt)
        self._check_fits([len(enc.ids)], [len(enc.media)], GenerationConfig(max_new_tokens=1), what="a new token")
        cache = StaticCache(self.model, 1, self.max_seq_len, self.max_media, dtype=self.dtype, device=self.device)
        logits = self._prefill(cache, [enc])
        return Prefix(cache, logits, len(enc.ids), len(enc.media), tuple(enc.ids))

    def _from_prefix(self, prefix: Prefix, batch: int) -> StaticCache:
        cache = self._cache(batch)
        cache.broadcast_from(prefix.cache)
        return cache

    def _start(self, prompts: Sequence[PromptLike], cfg: GenerationConfig, prefix: Optional[Prefix],
               what: str = "max_new_tokens"):
        """Encode, check (``what``: see :meth:`_check_fits`), prefill. Returns (cache, encoded
        prompts, last logits (B, V))."""
        encs = [self.encode(p) for p in prompts]
        if not encs:
            raise ValueError("expected at least one prompt, got none")
        base_t = prefix.cache.length if prefix else 0
        base_m = prefix.num_media if prefix else 0
        self._check_fits([len(e.ids) for e in encs], [len(e.media) for e in encs], cfg, base_t, base_m, what)
        if prefix is None:
            cache = self._cache(len(encs))
        else:
            cache = self._from_prefix(prefix, len(encs))
        logits = self._prefill(cache, encs)
        return cache, encs, logits

    # ------------------------------------------------------------------ token streams
    def _seen(self, encs: List[EncodedPrompt], prefix: Optional[Prefix], V: int) -> torch.Tensor:
        """(B, V) bool: the tokens of each prompt (its prefix's included), which a repetition
        penalty counts as already seen."""
        seen = torch.zeros(len(encs), V, dtype=torch.bool, device=self.device)
        for b, e in enumerate(encs):
            ids = list(prefix.ids if prefix is not None else ()) + list(e.ids)
            if ids:
                seen[b, torch.tensor(ids, device=self.device)] = True
        return seen

    def _token_stream(self, cache: StaticCache, encs: List[EncodedPrompt], logits: torch.Tensor,
                      cfg: GenerationConfig, prefix: Optional[Prefix] = None) -> Iterator[torch.Tensor]:
        """Yield (B,) next tokens step by step (pad for finished rows) until every row
        stopped or max_new_tokens; the caller may stop iterating at any time."""
        B = len(encs)
        V = logits.shape[-1]
        stop_ids = torch.tensor(self._stop_ids(cfg), device=self.device, dtype=torch.long)
        gen = None
        if cfg.do_sample:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        seen = self._seen(encs, prefix, V) if cfg.repetition_penalty != 1.0 else None
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for step in range(cfg.max_new_tokens):
            nxt = choose_next(self._mask_banned(logits, cfg, step), cfg, seen, gen)
            nxt = torch.where(done, torch.full_like(nxt, self.tok.pad_token_id), nxt)
            yield nxt
            if seen is not None:
                seen[torch.arange(B, device=self.device), nxt] = True
            done = done | torch.isin(nxt, stop_ids)
            if bool(done.all()) or step == cfg.max_new_tokens - 1:
                return
            logits = self._decode(cache, nxt)

    def _finish_text(self, ids: List[int], cfg: GenerationConfig) -> str:
        stop = set(self._stop_ids(cfg))
        out = []
        for t in ids:
            if t in stop:
                break
            out.append(t)
        text = self.tok.decode(out)
        for s in cfg.stop_strings:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, prompts: Union[PromptLike, Sequence[PromptLike]], config: Optional[GenerationConfig] = None,
                 prefix: Optional[Prefix] = None, **kwargs) -> Union[str, List[str]]:
        """Generate a continuation for one prompt (returns str) or a batch (returns a list).

        ``config`` or keyword overrides (``max_new_tokens=...``) set the decoding; rows of
        a batch may differ in length and image count and give what they give alone. With
        ``num_beams`` = K > 1 the batch's beams decode together: its caches hold
        len(prompts) x K rows.
        """
        single = isinstance(prompts, (str, EncodedPrompt)) or (
            isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], (list, tuple, EncodedPrompt))
        )
        if not single and not isinstance(prompts, (list, tuple)):
            raise TypeError("expected a prompt (a string, or a list of text and media) or a list of prompts, "
                            f"got {type(prompts).__name__}")
        batch = [prompts] if single else list(prompts)
        cfg = _config(config, kwargs)
        if cfg.num_beams > 1:
            outs = self._beam_search(batch, cfg, prefix)
            return outs[0] if single else outs
        cache, encs, logits = self._start(batch, cfg, prefix)
        toks = [[] for _ in batch]
        for nxt in self._token_stream(cache, encs, logits, cfg, prefix):
            for b, t in enumerate(nxt.tolist()):
                toks[b].append(t)
            if cfg.stop_strings and all(
                any(s in self.tok.decode(t) for s in cfg.stop_strings) for t in toks
            ):
                break
        outs = [self._finish_text(t, cfg) for t in toks]
        return outs[0] if single else outs

    def stream(self, prompt: PromptLike, config: Optional[GenerationConfig] = None,
               prefix: Optional[Prefix] = None, **kwargs) -> Iterator[str]:
        """Yield the generated text piece by piece (whole characters only; text that could
        still become a stop string is held back). Concatenated, the pieces equal
        :meth:`generate`'s result. Stopping the iteration stops the work."""
        cfg = _config(config, kwargs)
        if cfg.num_beams > 1:
            raise ValueError("stream() decodes token by token; beam search (num_beams > 1) is not streamable")
        with torch.no_grad():
            cache, encs, logits = self._start([prompt], cfg, prefix)
        stop = set(self._stop_ids(cfg))
        dec = IncrementalDecoder(self.tok)
        text, emitted = "", 0
        hold = max((len(s) for s in cfg.stop_strings), default=1) - 1
        stream = self._token_stream(cache, encs, logits, cfg, prefix)
        while True:
            with torch.no_grad():
                nxt = next(stream, None)
            if nxt is None:
                break
            t = int(nxt[0])
            if t in stop:
                break
            text += dec.push(t)
            cut = min((i for i in (text.find(s) for s in cfg.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text += dec.flush()
        cut = min((i for i in (text.find(s) for s in cfg.stop_strings) if i >= 0), default=len(text))
        if cut > emitted:
            yield text[emitted:cut]

    def generate_with_callback(self, prompt: PromptLike, callback: Callable[[str], Optional[bool]],
                               config: Optional[GenerationConfig] = None, **kwargs) -> str:
        """Call ``callback(piece)`` for each streamed piece; a callback returning True stops
        the generation. Returns the text generated."""
        out = []
        for piece in self.stream(prompt, config, **kwargs):
            out.append(piece)
            if callback(piece):
                break
        return "".join(out)

    # ------------------------------------------------------------------ beam search
    def _beam_search(self, prompts: List[PromptLike], cfg: GenerationConfig, prefix: Optional[Prefix]) -> List[str]:
        """Beam search for a batch of prompts at once. Prompt b's K beams are rows
        b*K .. b*K+K-1 of one cache (its prefilled row copied K times: media K/V copied, not
        recomputed), every step decodes all beams of all prompts together, and each prompt
        keeps the best K continuations of its own beams (of its 2K best candidates). A
        candidate ending in a stop token becomes a finished hypothesis if it ranks among the
        K best (the best K hypotheses are kept: :class:`~flamingo_rt.runtime.beams.BeamHypotheses`).
        A hypothesis scores its log-likelihood (the model's log-probabilities, banned tokens
        excluded but not renormalized away) over its length to the ``length_penalty``. A
        prompt is done when ``cfg.early_stopping``'s rule says no live beam can do better,
        when nothing is left, or at ``max_new_tokens`` (where, unless done, the beams still
        alive are hypotheses too); a done prompt idles on its rows until every prompt is.
        Each prompt's result is its search alone, up to float rounding, and open_flamingo's
        (Hugging Face's beam search with its eos, the end of chunk, as stop token)."""
        K = cfg.num_beams
        cache_b, encs, logits = self._start(prompts, cfg, prefix)  # media encoded once
        B = len(encs)
        cache = self._cache(B * K)
        cache.broadcast_from(cache_b, repeats=K)
        stop = set(self._stop_ids(cfg))
        V = logits.shape[-1]
        ninf = float("-inf")
        scores = [[0.0] + [ninf] * (K - 1) for _ in range(B)]  # each prompt's live beams
        seqs: List[List[List[int]]] = [[[] for _ in range(K)] for _ in range(B)]
        finished = [BeamHypotheses(K, cfg.length_penalty, cfg.early_stopping, cfg.max_new_tokens) for _ in range(B)]
        last: List[Optional[tuple]] = [None] * B  # when done: (live scores, seqs, last candidates, add them)
        logits = logits.repeat_interleave(K, 0)  # (B*K, V)
        # each beam's tokens so far (its prompt's included), for a repetition penalty
        seen = self._seen(encs, prefix, V).repeat_interleave(K, 0) if cfg.repetition_penalty != 1.0 else None
        for step in range(cfg.max_new_tokens):
            # the model's log-probabilities, banned tokens then set to -inf (not renormalized over
            # the rest: a beam's score is its log-likelihood, as score() gives it and as HF's beam
            # search, open_flamingo's, computes it); a repetition penalty scales the log-
            # probabilities of seen tokens, as HF's processors do after its log-softmax
            logp = self._mask_banned(logits.float().log_softmax(-1), cfg, step)
            if seen is not None:
                logp = apply_repetition_penalty(logp, seen, cfg.repetition_penalty)
            logp = logp.view(B, K, V)
            logp = logp + torch.tensor(scores, device=logp.device)[:, :, None]
            top, flat = logp.view(B, K * V).topk(2 * K, dim=-1)
            top, flat = top.tolist(), flat.tolist()
            rows, tokens = [], []
            for b in range(B):
                if last[b] is not None:  # done: idle rows
                    rows += [b * K + j for j in range(K)]
                    tokens += [self.tok.pad_token_id] * K
                    continue
                new_rows, new_tokens, new_scores, new_seqs = [], [], [], []
                for rank, (sc, f) in enumerate(zip(top[b], flat[b])):
                    if sc == ninf:
                        break
                    row, tok = divmod(f, V)
                    if tok in stop:
                        if rank < K:  # (HF: a stop ranked below the K best candidates is dropped)
                            finished[b].add(seqs[b][row] + [tok], sc)
                    else:
                        new_rows.append(row)
                        new_tokens.append(tok)
                        new_scores.append(sc)
                        new_seqs.append(seqs[b][row] + [tok])
                    if len(new_rows) == K:
                        break
                done = finished[b].is_done(top[b][0], step + 1)
                if done or not new_rows or step == cfg.max_new_tokens - 1:
                    last[b] = (scores[b], seqs[b], new_scores, new_seqs, not done)
                    rows += [b * K + j for j in range(K)]
                    tokens += [self.tok.pad_token_id] * K
                    continue
                while len(new_rows) < K:  # keep K rows; extra ones are dead
                    new_rows.append(new_rows[0])
                    new_tokens.append(new_tokens[0])
                    new_scores.append(ninf)
                    new_seqs.append(new_seqs[0])
                rows += [b * K + r for r in new_rows]
                tokens += new_tokens
                scores[b], seqs[b] = new_scores, new_seqs
            if all(d is not None for d in last):
                break
            rows_t, tokens_t = torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device)
            cache.select_rows(rows_t, media=False)  # within each prompt's rows
            if seen is not None:
                seen = seen[rows_t]
                seen[torch.arange(B * K, device=self.device), tokens_t] = True
            logits = self._decode(cache, tokens_t)

        def add_beams(hyps: BeamHypotheses, beam_scores, beam_seqs, nonempty: bool = False) -> None:
            for sc, seq in zip(beam_scores, beam_seqs):
                if sc > ninf and (seq or not nonempty):
                    hyps.add(seq, sc)

        outs = []
        for b in range(B):
            hyps = finished[b]
            live_scores, live_seqs, new_scores, new_seqs, add_live = last[b]
            if add_live:  # not done (max_new_tokens reached): the beams alive at the end are hypotheses too
                add_beams(hyps, new_scores, new_seqs)
            if not len(hyps):  # (no candidate at all: the live beams, as a last resort)
                add_beams(hyps, live_scores, live_seqs, nonempty=True)
            outs.append(self._finish_text(hyps.best() if len(hyps) else [], cfg))
        return outs

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, prompt: PromptLike, candidates: Sequence[str], prefix: Optional[Prefix] = None,
              max_pack_tokens: int = 256) -> List[float]:
        """Log-likelihood (sum of token log-probabilities) of each candidate continuation
        after the prompt. The prompt is computed once; the candidates then run together,
        packed into chunks of at most ``max_pack_tokens`` tokens and of the cache's free
        slots past the prompt (``max_seq_len`` less the prompt; a longer candidate runs
        alone; each sees the prompt and itself only:
        :func:`~flamingo_rt.runtime.engine.forward_packed`), so the weights are read once
        per chunk, not once per candidate. :meth:`score_batch` scores several prompts
        at once."""
        return self._score_rows([prompt], [encode_candidates(candidates, self.tok)], prefix, max_pack_tokens)[0]

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[PromptLike], candidates: Sequence, prefix: Optional[Prefix] = None,
                    max_pack_tokens: int = 256) -> List[List[float]]:
        """:meth:`score` for several prompts as one batch: ``[score(p, c) for p, c in ...]``
        up to float rounding, with every prompt's media through the vision encoder in one
        call, the prompts prefilled as one left-padded chunk, and the rows' candidate packs
        side by side (:func:`~flamingo_rt.runtime.engine.forward_packed_rows`; each row's
        pack holds at most ``max_pack_tokens``), so the weights are read once per batch.
        A few-shot evaluation classifies its queries this way.

        Args:
            prompts: a list of prompts (each a string, a list of text and media, or an
                :class:`EncodedPrompt`).
            candidates: one list of strings scored after every prompt, or a list of such
                lists, one per prompt.
            prefix: a :class:`Prefix` every prompt continues.

        Returns the log-likelihoods per prompt, ``[b][i]`` for candidate i of prompt b."""
        if isinstance(prompts, (str, EncodedPrompt)) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"expected a list of prompts, got {type(prompts).__name__}; score one prompt with score()")
        if not prompts:
            raise ValueError("expected at least one prompt, got none")
        for b, p in enumerate(prompts):
            if not isinstance(p, (str, list, tuple, EncodedPrompt)):
                raise TypeError(f"expected a list of prompts (each a string, a list of text and media, or an "
                                f"EncodedPrompt), got {type(p).__name__} at index {b}; score one prompt with score()")
        per_prompt = isinstance(candidates, (list, tuple)) and bool(candidates) and all(
            isinstance(c, (list, tuple)) for c in candidates)
        if per_prompt and len(candidates) != len(prompts):
            raise ValueError(f"expected one list of candidates per prompt ({len(prompts)}), got {len(candidates)}")
        if per_prompt:
            cand_ids = [encode_candidates(c, self.tok) for c in candidates]
        else:
            cand_ids = [encode_candidates(candidates, self.tok)] * len(prompts)
        return self._score_rows(list(prompts), cand_ids, prefix, max_pack_tokens)

    def _score_rows(self, prompts: List[PromptLike], cand_ids: List[List[List[int]]], prefix: Optional[Prefix],
                    max_pack_tokens: int) -> List[List[float]]:
        """score_batch on encoded candidates (``cand_ids[b]``: prompt b's)."""
        check_pack_limit(max_pack_tokens)
        cfg = GenerationConfig(max_new_tokens=max(len(c) for row in cand_ids for c in row))
        cache, encs, logits = self._start(prompts, cfg, prefix, "the longest candidate's tokens")
        return _score_after(self, cache, logits, cand_ids, max_pack_tokens)

    def session(self) -> "Session":
        """A multi-turn conversation (one row) to which text and media are appended."""
        return Session(self)


class Session:
    """A dialogue: ``append(...)`` text and media, ``generate()`` replies; each new image
    gets the next media index and every later token attends to it. The caches persist
    across turns, so earlier turns are never recomputed.

    As the C API's session (``flamingo_session_prefill`` / ``_fork`` / ``_score``):
    ``prefill()`` runs the appended items now, ``fork()`` copies the conversation (a
    support set prefilled once, a fork per query), ``score(candidates)`` gives the
    log-likelihood of continuations after it without changing it.

    An item that is not text or usable media is refused by ``append`` (nothing is queued).
    A ``generate`` that is refused (the turn does not fit the caches, marker mismatch) keeps
    the items appended since the last answer, so it can be retried with fewer
    ``max_new_tokens``; ``discard()`` drops them, ``reset()`` starts the dialogue over."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.cache = StaticCache(gen.model, 1, gen.max_seq_len, gen.max_media, dtype=gen.dtype, device=gen.device)
        self._pending: List[Tuple[PromptItem, PromptItem]] = []  # (as given, preprocessed), not yet run
        self._carry: List[int] = []  # last generated token, not yet fed to the model
        self._turn_ids: List[int] = []  # the tokens run since the last answer (repetition penalty)
        self._logits: Optional[torch.Tensor] = None  # (1, V) after the last token run
        self.history: List[str] = []
        self.token_ids: List[int] = []  # every token of the conversation so far
        self.media: List[torch.Tensor] = []  # every medium, preprocessed, in order

    def append(self, *items: PromptItem) -> "Session":
        """Queue text and media for the next ``generate``. Each item is checked now: a value
        that is neither text nor media, or media that cannot be used (shape, NaN, 0-255
        floats), is an error and nothing of this call is queued."""
        vision = self.gen.model.config.vision
        # preprocessed once, here (raises TypeError / ValueError); generate uses the result
        ready = [it if isinstance(it, str) else PreprocessedMedia.of(it, vision) for it in items]
        self._pending += list(zip(items, ready))
        return self

    def discard(self) -> List[PromptItem]:
        """Drop (and return) the items appended and not yet run, as they were given."""
        items, self._pending = [orig for orig, _ in self._pending], []
        return items

    def reset(self) -> None:
        """Forget the whole dialogue (the caches are kept and emptied)."""
        self.cache.reset()
        self._pending, self._carry, self._turn_ids, self._logits = [], [], [], None
        self.history, self.token_ids, self.media = [], [], []

    def fork(self) -> "Session":
        """A new session holding a copy of this one's conversation (its caches copied up to
        the tokens run; queued items and history too). The two then go on independently."""
        f = Session(self.gen)
        f.cache.broadcast_from(self.cache)
        f._pending, f._carry, f._turn_ids = list(self._pending), list(self._carry), list(self._turn_ids)
        f._logits = None if self._logits is None else self._logits.clone()
        f.history, f.token_ids, f.media = list(self.history), list(self.token_ids), list(self.media)
        return f

    def _queue_that_fits(self, new_tokens: int, what: str, retry: str,
                         nothing: Optional[str] = None) -> Tuple[List[int], EncodedPrompt]:
        """The tokens the next run feeds (the carried token, then the queued items') and the
        queued items encoded, checked to fit the caches with ``new_tokens`` more (named
        ``what``) when there is something to feed or ``nothing`` is given (the message when
        there is neither something queued nor a context to go on from). Raises ValueError,
        the session unchanged and ``retry`` advised when items are kept: a marker mismatch,
        ``nothing``, or no room."""
        g = self.gen
        try:
            enc = (encode_prompt([ready for _, ready in self._pending], g.tok, g.model.config.vision)
                   if self._pending else EncodedPrompt([]))
            ids = self._carry + enc.ids
            if nothing is not None and not ids and self._logits is None:
                raise ValueError(nothing)
            if ids or nothing is not None:
                g._check_fits([len(ids)], [len(enc.media)], GenerationConfig(max_new_tokens=new_tokens),
                              self.cache.length, int(self.cache.num_media[0]), what)
        except ValueError as e:
            if self._pending:  # say how to go on: the session itself is as before this call
                e.args = (f"{e.args[0]} (the items appended since the last answer are kept: {retry}"
                          "discard() them; reset() starts over)",) + e.args[1:]
            raise
        return ids, enc

    def _run(self, ids: List[int], enc: EncodedPrompt) -> torch.Tensor:
        """Feed ``ids`` (from :meth:`_queue_that_fits`) and return the last logits."""
        g = self.gen
        if ids:
            tokens, counts = g._encode_media([enc.media])
            self.cache.add_media(g.model, tokens, counts)
            t = torch.tensor([ids], device=g.device)
            self._logits = forward_chunk(g.model, self.cache, t, torch.tensor([len(ids)], device=g.device),
                                         last_only=True, backend=g.backend)
            self._pending, self._carry = [], []
            self._turn_ids += ids
            self.token_ids += enc.ids
            self.media += enc.media
        return self._logits

    @torch.no_grad()
    def prefill(self) -> "Session":
        """Run the queued items through the model now (a support set before ``fork()``, or
        to move the prompt's compute ahead of the first ``generate``). Raises ValueError
        (the items kept) when they do not fit the caches."""
        self._run(*self._queue_that_fits(1, "a new token", ""))
        return self

    @torch.no_grad()
    def score(self, candidates: Sequence[str], max_pack_tokens: int = 256) -> List[float]:
        """Log-likelihood of each candidate continuation after the conversation (the queued
        items are run first, as by :meth:`prefill`), as :meth:`Generator.score`; the
        conversation is unchanged by the candidates. Raises ValueError when there is nothing
        to score after, or the longest candidate does not fit the caches."""
        g = self.gen
        cand_ids = encode_candidates(candidates, g.tok)
        check_pack_limit(max_pack_tokens)
        logits = self._run(*self._queue_that_fits(
            max(map(len, cand_ids)), "the longest candidate's tokens", "score shorter candidates, or ",
            "expected text or media to score after, got an empty session"))
        return _score_after(g, self.cache, logits, [cand_ids], max_pack_tokens)[0]

    @torch.no_grad()
    def generate(self, config: Optional[GenerationConfig] = None, **kwargs) -> str:
        cfg = _config(config, kwargs)
        if cfg.num_beams > 1:
            raise ValueError("Session.generate decodes greedily or by sampling (num_beams must be 1)")
        g = self.gen
        logits = self._run(*self._queue_that_fits(
            cfg.max_new_tokens, "max_new_tokens", "retry with fewer max_new_tokens, or ",
            "expected new text or media before generate(), got nothing"))
        out: List[int] = []
        for nxt in g._token_stream(self.cache, [EncodedPrompt(self._turn_ids)], logits, cfg):
            out.append(int(nxt[0]))
        self._carry = out[-1:]
        self._turn_ids, self._logits = [], None
        self.token_ids += out
        text = g._finish_text(out, cfg)
        self.history.append(text)
        return text
