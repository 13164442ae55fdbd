"""Run an exported model folder from Python, exactly as the C API host does: the
reference for the C++ host and a check of every export.

    m = ExportedModel("exported/")
    s = m.session()
    s.append_media(img); s.append_text("Output:")
    s.generate(max_new_tokens=20)            # greedy, stops at <|endofchunk|> / <|endoftext|>

It decodes greedily; the C API's sampling and beam search are checked against the Python
runtime's ``Generator`` directly (tests/cpp/run_host_test.py, run_beam_search_test.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Union

import torch

from .._values import is_integer
from ..io.tokenizer import FlamingoTokenizer
from ..models.config import VisionConfig
from ..runtime.engine import check_pack_limit, pack_continuations
from ..runtime.prompt import MediaLike, encode_candidates, preprocess_media

__all__ = ["ExportedModel", "ExportedSession"]


class ExportedModel:
    """The packages, tokenizer and manifest of an export folder (loaded once, shared by
    sessions)."""

    def __init__(self, folder: Union[str, Path]):
        folder = Path(folder)
        mf = folder / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{folder} is not an exported model: {mf.name} is missing")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != "flamingo_rt-export":
            raise ValueError(f"{mf}: expected format 'flamingo_rt-export', got {self.manifest.get('format')!r}")
        from .package import MANIFEST_VERSION

        if self.manifest.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"{mf}: expected manifest_version {MANIFEST_VERSION}, got "
                             f"{self.manifest.get('manifest_version')!r}: the export is from another flamingo_rt "
                             "version (version 2 encodes a batch of media a call); re-export the model")
        exported = str(self.manifest.get("torch_version", "?"))
        ours = ".".join(torch.__version__.split(".")[:2])
        if ".".join(exported.split(".")[:2]) != ours:
            raise ValueError(f"{folder}: exported with torch {exported}, but this is torch {torch.__version__} "
                             "(AOTInductor packages are tied to the torch release that compiled them): re-export "
                             f"the model with torch {ours}")
        from .. import _ext

        _ext.load()  # the flamingo_rt_C ops the packages call
        self.encode = torch._inductor.aoti_load_package(str(folder / self.manifest["packages"]["encode_media"]))
        self.step = torch._inductor.aoti_load_package(str(folder / self.manifest["packages"]["token_step"]))
        self.decode = torch._inductor.aoti_load_package(str(folder / self.manifest["packages"]["decode_step"]))
        # exports made before the score step (2026-12-07) have none: candidates are then run
        # one token at a time through the decode step
        pkg = self.manifest["packages"].get("score_step")
        self.score = torch._inductor.aoti_load_package(str(folder / pkg)) if pkg else None
        self.tokenizer = FlamingoTokenizer.from_file(folder / "tokenizer.json")
        m = self.manifest
        self.vision = VisionConfig(kind="external", width=1, image_size=m["image_size"],
                                   image_mean=tuple(m["image_mean"]), image_std=tuple(m["image_std"]))
        self.dtype = getattr(torch, m["dtype"])
        self.device = torch.device(m["device"])

    def session(self) -> "ExportedSession":
        return ExportedSession(self)


class ExportedSession:
    """One conversation: its own KV and media caches."""

    def __init__(self, model: ExportedModel):
        self.m = model
        sh = model.manifest["shapes"]
        kw = dict(dtype=model.dtype, device=model.device)
        self.kv = torch.zeros(sh["kv_cache"], **kw)
        self.media = torch.zeros(sh["media_cache"], **kw)
        self.reset()

    def prefill(self) -> None:
        """Run the queued tokens through the model now (as ``flamingo_session_prefill``)."""
        if self.pending:
            self._flush()

    def score(self, candidates: List[str], max_pack_tokens: int = 256) -> List[float]:
        """Log-likelihood of each candidate continuation after the context, as
        ``flamingo_session_score``: the candidates packed past the context's end into runs of
        the score step (at most ``max_pack_tokens`` and the free slots each; an export
        without one runs them a token at a time), then forgotten: the context is unchanged."""
        ids = encode_candidates(candidates, self.m.tokenizer)
        check_pack_limit(max_pack_tokens)
        if not self.pending and self.logits is None:
            raise ValueError("nothing to score after: append text or media first")
        self._check_room(max(len(c) for c in ids) - 1, "the longest candidate (less its last token)",
                         "nothing was scored")
        first = self._flush()
        pos0 = self.pos
        lp0 = first.float().log_softmax(-1)[0]
        out = [float(lp0[c[0]]) for c in ids]
        try:
            if self.m.score is not None:
                self._score_packed(ids, out, max_pack_tokens)
            else:
                for i, c in enumerate(ids):
                    self.pos = pos0
                    for j in range(len(c) - 1):
                        self.pending = [c[j]]
                        out[i] += float(self._flush().float().log_softmax(-1)[0, c[j + 1]])
        finally:
            self.pos, self.logits, self.pending = pos0, first, []
        return out

    def _score_packed(self, ids: List[List[int]], out: List[float], max_pack_tokens: int) -> None:
        """Add to ``out[i]`` the log-probabilities of candidate i's tokens after its first,
        from packs of the candidates (less their last token) run by the score step, at most
        ``max_pack_tokens`` and the free slots each (as ``flamingo_session_score``)."""
        dev = self.m.device
        cap = min(max_pack_tokens, self.m.manifest["max_seq_len"] - self.pos)
        feeds = [(i, c[:-1]) for i, c in enumerate(ids) if len(c) > 1]
        index = self.seen_images - 1  # every candidate token attends to the context's last medium
        for pack in pack_continuations(feeds, cap):
            flat = [t for _, feed in pack for t in feed]
            offset = [j for _, feed in pack for j in range(len(feed))]
            logits = self.m.score(torch.tensor([flat], device=dev), torch.tensor([self.pos], device=dev),
                                  torch.tensor([offset], device=dev),
                                  torch.full((1, len(flat)), index, dtype=torch.int32, device=dev),
                                  self.kv, self.media)
            lp = logits[0].float().log_softmax(-1)
            t0 = 0
            for i, feed in pack:
                nxt = torch.tensor(ids[i][1:], device=lp.device)
                out[i] += float(lp[t0:t0 + len(feed)].gather(1, nxt[:, None]).sum())
                t0 += len(feed)

    def fork(self) -> "ExportedSession":
        """A new session holding a copy of this one's context (as ``flamingo_session_fork``):
        a support set encoded once, a fork per query."""
        f = ExportedSession.__new__(ExportedSession)
        f.m = self.m
        f.kv, f.media = self.kv.clone(), self.media.clone()
        f.pos, f.num_media, f.seen_images = self.pos, self.num_media, self.seen_images
        f.pending = list(self.pending)
        f.queued_media = list(self.queued_media)  # preprocessed pixels: never written, shared
        f.logits = None if self.logits is None else self.logits.clone()
        return f

    def reset(self) -> None:
        self.pos = 0
        self.num_media = 0
        self.seen_images = 0
        self.pending: List[int] = []
        self.queued_media: List[torch.Tensor] = []  # appended, not encoded yet: the last media slots
        self.logits = None

    def append_text(self, text: str) -> None:
        """Queue text; special tokens written in it become their ids (``<image>`` is refused:
        media are appended with ``append_media``)."""
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        ids = self.m.tokenizer.encode(text)
        if self.m.tokenizer.image_token_id in ids:
            raise ValueError("the text contains <image>; append images with append_media")
        self._check_room(len(ids), "the text")
        self.pending += ids

    def _check_room(self, n: int, what: str, outcome: str = "nothing was appended") -> None:
        """As the C API: ValueError unless ``n`` more tokens fit the context; a refused append
        leaves the session as it was."""
        held, cap = self.pos + len(self.pending), self.m.manifest["max_seq_len"]
        if held + n > cap:
            raise ValueError(f"{what} needs {n} token slot(s) and the context holds {held}; this export has "
                             f"max_seq_len = {cap} ({outcome})")

    def append_media(self, media: MediaLike) -> None:
        """Queue a medium (an image (3, H, W) or a clip (F, 3, H, W)) and its ``<image>``
        token. It is checked and preprocessed now and encoded at the next run of the model
        (prefill, generate, score), together with every medium queued since the last run:
        the media of a few-shot prompt go through the vision encoder in one batch."""
        if self.num_media >= self.m.manifest["max_media"]:
            raise ValueError(f"the session already holds max_media = {self.m.manifest['max_media']} media")
        self._check_room(1, "the medium's <image> token")
        px = preprocess_media(media, self.m.vision).to(self.m.device, self.m.dtype)
        if px.shape[0] > self.m.manifest["max_frames"]:
            raise ValueError(f"a clip of {px.shape[0]} frames; this export takes at most {self.m.manifest['max_frames']}")
        self.queued_media.append(px)
        self.num_media += 1
        self.pending.append(self.m.tokenizer.image_token_id)

    def _encode_queued(self) -> None:
        """Encode the queued media into their media-cache slots: runs of consecutive media
        with the same frame count, one encoder call each. A medium leaves the queue once its
        keys/values are written (a failed call keeps the rest queued)."""
        while self.queued_media:
            frames = self.queued_media[0].shape[0]
            n = 1
            while n < len(self.queued_media) and self.queued_media[n].shape[0] == frames:
                n += 1
            slot = self.num_media - len(self.queued_media)
            self.media[:, :, 0, slot:slot + n] = self.m.encode(torch.stack(self.queued_media[:n]))
            del self.queued_media[:n]

    def _flush(self) -> torch.Tensor:
        ids = self.pending
        if not ids:
            if self.logits is None:
                raise ValueError("nothing to generate from: append text or media first")
            return self.logits
        if self.pos + len(ids) > self.m.manifest["max_seq_len"]:
            raise ValueError(f"the prompt needs {self.pos + len(ids)} cache slots; this export has "
                             f"max_seq_len = {self.m.manifest['max_seq_len']}")
        self._encode_queued()
        img = self.m.tokenizer.image_token_id
        index, seen = [], self.seen_images  # the image count is committed only when the step ran
        for t in ids:
            if t == img:
                seen += 1
            index.append(seen - 1)
        dev = self.m.device
        args = (torch.tensor([ids], device=dev), torch.tensor([self.pos], device=dev),
                torch.tensor([index], dtype=torch.int32, device=dev))
        if len(ids) == 1:  # the decode step takes rows-first caches: one row, the same memory
            self.logits = self.m.decode(*args, self.kv.squeeze(2)[None], self.media.squeeze(2)[None])
        else:
            self.logits = self.m.step(*args, self.kv, self.media)
        self.seen_images = seen
        self.pos += len(ids)
        self.pending = []
        return self.logits

    def generate(self, max_new_tokens: int = 32) -> str:
        """Greedy continuation until ``<|endofchunk|>``, ``<|endoftext|>``, the limit or the
        end of the caches. As the C API (and the runtime's ``Session``), the answer stays in
        the context, its stop token included, so the conversation can continue with more
        appends; the last token is queued and runs at the next generate."""
        if not is_integer(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"expected max_new_tokens an integer >= 1, got {max_new_tokens!r}")
        tok = self.m.tokenizer
        stop = {tok.eoc_token_id, tok.eos_token_id}
        out: List[int] = []
        logits = self._flush()
        for i in range(max_new_tokens):
            logits = logits.float().clone()  # as the Python runtime: never <image> / <pad> / rows past the vocab
            if bool(logits.isnan().any()):
                raise FloatingPointError(f"the model's logits are NaN at generated token {i} (non-finite weights, "
                                         "or an overflow in a half dtype); reset the session")
            logits[:, [tok.image_token_id, tok.pad_token_id]] = float("-inf")
            logits[:, tok.vocab_size:] = float("-inf")
            nxt = int(logits[0].argmax())
            self.pending.append(nxt)  # the stop token too: it stays in the context
            if nxt in stop:
                break
            out.append(nxt)
            if i + 1 == max_new_tokens or self.pos + 1 > self.m.manifest["max_seq_len"]:
                break  # the limit, or the caches are full: the answer ends here
            logits = self._flush()
        return tok.decode(out)
