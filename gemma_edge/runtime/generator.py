"""Text in, text out, from an export folder, on whichever backend its manifest names.

    from gemma_edge.runtime import Generator
    gen = Generator.load("out/gemma3-int4-onnx")
    print(gen.generate("The capital of France is", max_new_tokens=32))
    for piece in gen.stream(prompt, max_new_tokens=256, temperature=0.7, top_k=64, top_p=0.95, seed=0): ...
    reply = gen.chat([{"role": "user", "content": "Hi"}])
    gen.reset()
    logits = gen.forward(token_ids, start_pos)   # numpy float32 [len(token_ids), vocab]

The generator remembers which ids its backend's cache holds, so a prompt that starts with them
(the next turn of a chat) computes only what is new.

Loading checks the folder first: every file the manifest names must be a plain name inside it, and
of the size the export wrote (with verify_checksums=True, of its SHA-256 too), so a truncated copy
is named (DamagedExportError) before ONNX Runtime or ExecuTorch trips over it.

Threads: Generators of different exports work side by side in one process. One Generator holds one
KV cache, so it generates for one thread at a time: a call from a second thread while another
thread's generation is under way raises ConcurrentUseError (give each thread its own Generator).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from gemma_edge.errors import ConcurrentUseError, GemmaEdgeError
from gemma_edge.manifest import check_files, prompt_template, read_manifest
from gemma_edge.runtime.backend import Backend, open_backend
from gemma_edge.runtime.generation import GenerationResult, check_prompt, tokens
from gemma_edge.runtime.sampling import Sampler, SamplingConfig
from gemma_edge.runtime.templates import Messages, template
from gemma_edge.runtime.tokenizer import StreamDecoder, Tokenizer

TRUNCATE = (None, "left")


class Generator:
    def __init__(self, backend: Backend, tokenizer: Tokenizer):
        self.backend = backend
        self.tokenizer = tokenizer
        self.last: GenerationResult | None = None  # ids, finish reason and stats of the latest generation
        self._cache: list[int] = []  # the ids the backend's cache holds, at positions 0..
        self._guard = threading.Lock()  # guards _owner and _depth
        self._owner: int | None = None  # the thread whose call (or open stream) is using the cache
        self._depth = 0

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, verify_checksums: bool = False,
             runtime: str = "auto") -> "Generator":
        """The export in folder, its files checked first (sizes; SHA-256 with verify_checksums); runtime:
        how a .pte runs (backend.open_backend)."""
        _, tokenizer = open_export(folder, verify_checksums)
        return cls(open_backend(folder, threads=threads, runtime=runtime), tokenizer)

    @property
    def max_seq_len(self) -> int:
        return self.backend.max_seq_len

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The cache for this thread until the block ends; another thread's call meanwhile fails."""
        me = threading.get_ident()
        with self._guard:
            if self._owner not in (None, me):
                raise ConcurrentUseError("this Generator is generating in another thread; it holds one KV cache, so "
                                         "give each thread its own Generator (or wait for the other generation to end)")
            self._owner, self._depth = me, self._depth + 1
        try:
            yield
        finally:
            with self._guard:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None

    def reset(self) -> None:
        """Empty the KV cache."""
        with self._exclusive():
            self.backend.reset()
            self._cache = []

    def forward(self, token_ids: Sequence[int] | np.ndarray, start_pos: int) -> np.ndarray:
        """float32 logits [len(token_ids), vocab] for token_ids placed at positions start_pos.. of
        the cache (which must hold positions 0..start_pos-1 from earlier calls)."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise GemmaEdgeError(f"token_ids must be a non-empty list or 1-D array of ints, got shape {ids.shape} {ids.dtype}")
        vocab = self.backend.manifest["config"]["vocab_size"]
        if ids.min() < 0 or ids.max() >= vocab:
            raise GemmaEdgeError(f"token ids must be in 0..{vocab - 1}, got {ids.min()}..{ids.max()}")
        with self._exclusive():
            logits = np.asarray(self.backend.forward(ids.tolist(), int(start_pos)), dtype=np.float32)
        reusable = start_pos == len(self._cache) or (start_pos < len(self._cache) and self.backend.can_rewind)
        self._cache = self._cache[:start_pos] + ids.tolist() if reusable else []
        return logits

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256, **options) -> str:
        """The completion's text; self.last has its ids, finish reason and stats. Options: temperature,
        top_k, top_p, repetition_penalty, seed, stop (strings), truncate ("left"), ignore_eos (go on
        past eos and <end_of_turn>, to max_new_tokens)."""
        return "".join(self.stream(prompt, max_new_tokens, **options))

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, **options) -> Iterator[str]:
        """The completion as it is generated, in pieces of whole characters."""
        return self._run(prompt_ids(self.tokenizer, prompt), max_new_tokens, **options)

    def chat(self, messages: Messages, max_new_tokens: int = 256, template_name: str | None = None, **options) -> str:
        """The model's reply to a conversation, in template_name's format (default: the one the export
        was given, else Gemma's turns; see templates.py)."""
        return "".join(self.chat_stream(messages, max_new_tokens, template_name, **options))

    def chat_stream(self, messages: Messages, max_new_tokens: int = 256, template_name: str | None = None,
                    **options) -> Iterator[str]:
        template_name = template_name or prompt_template(self.backend.manifest, "gemma")
        return self._run(prompt_ids(self.tokenizer, messages, template_name), max_new_tokens, **options)

    def _run(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
             truncate: str | None = None, ignore_eos: bool = False) -> Iterator[str]:
        sampler = Sampler(SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed))  # checks them first
        check_max_new_tokens(max_new_tokens)
        ids = self._fit(ids, truncate)
        with self._exclusive():
            yield from self._generate(ids, max_new_tokens, sampler, stop, ignore_eos)

    def _generate(self, ids: list[int], max_new_tokens: int, sampler: Sampler, stop: Sequence[str],
                  ignore_eos: bool) -> Iterator[str]:
        cached = self._reusable(ids)
        if cached == 0:
            self.reset()
        result = self.last = GenerationResult()
        self._cache = []  # unknown until the loop ends (or is abandoned)
        stop_ids = () if ignore_eos else self.tokenizer.stop_ids
        steps = tokens(self.backend, ids, max_new_tokens, sampler, stop_ids, cached, result)
        try:
            yield from _text(steps, result, StreamDecoder(self.tokenizer), [s for s in stop if s])
        finally:
            steps.close()
            # the prompt and every drawn id but the last (drawn, not computed); nothing known if the
            # prefill never completed (a prompt refused, an error inside the backend)
            self._cache = ids + result.token_ids[:-1] if result.token_ids else []

    def _fit(self, ids: list[int], truncate: str | None) -> list[int]:
        if truncate not in TRUNCATE:
            raise GemmaEdgeError(f"unknown truncate {truncate!r}; valid: left (or none)")
        n = self.max_seq_len - 1  # room for at least one new token
        if truncate == "left" and len(ids) > n:
            keep_bos = bool(ids) and ids[0] == self.tokenizer.bos_id
            ids = ids[:1] + ids[len(ids) - n + 1:] if keep_bos else ids[len(ids) - n:]
        return ids

    def _reusable(self, ids: list[int]) -> int:
        """How many leading ids the cache already holds (0 when it cannot be reused)."""
        common = 0
        for a, b in zip(self._cache, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        if common < len(self._cache) and not self.backend.can_rewind:
            return 0  # the cache would have to go back: only exact when it is no ring
        return common


def open_export(folder: str | Path, verify_checksums: bool = False) -> tuple[dict, Tokenizer]:
    """The export's manifest and tokenizer, its files checked (all but loading the program, the slow
    part: a command checks its request with these before it loads anything)."""
    manifest = read_manifest(folder)
    check_files(folder, manifest, checksums=verify_checksums)
    return manifest, Tokenizer(folder, manifest["special_tokens"])


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int] | Messages, template_name: str | None = None) -> list[int]:
    """The ids a generation starts from: text (with <bos>), ids as given, or messages in a prompt format."""
    if template_name is None:
        return tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else [int(t) for t in prompt]
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for segment in template(template_name)(prompt):  # each alone: earlier turns keep their ids
        ids += tokenizer.encode(segment)
    return ids


def check_request(ids: list[int], max_seq_len: int, max_new_tokens: int, truncate: str | None = None) -> None:
    """What a generation would refuse, checked before anything is loaded."""
    check_max_new_tokens(max_new_tokens)
    if truncate not in TRUNCATE:
        raise GemmaEdgeError(f"unknown truncate {truncate!r}; valid: left (or none)")
    if truncate is None:
        check_prompt(ids, max_seq_len)


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise GemmaEdgeError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}")


def _text(steps: Iterator[int], result: GenerationResult, decoder: StreamDecoder, stop: list[str]) -> Iterator[str]:
    """Text pieces of the generated ids; cut at the first stop string, which is not released.
    Text that may be the start of a stop string is held back until it is known not to be."""
    emitted = ""
    for token in steps:
        if result.finish_reason == "stop" and token in decoder.tokenizer.stop_ids:
            break
        decoder.add(token)
        text = decoder.text
        hits = [i for i in (text.find(s, max(0, len(emitted) - len(s))) for s in stop) if i >= 0]
        if hits:
            text, result.finish_reason = text[:min(hits)], "stop"
            if len(text) > len(emitted):
                yield text[len(emitted):]
            result.text = text
            return
        safe = len(text) - _partial_stop(text, stop)
        if safe > len(emitted):
            yield text[len(emitted):safe]
            emitted = text[:safe]
    decoder.flush()  # the end: what was held back (a stop string's start that did not complete)
    if len(decoder.text) > len(emitted):
        yield decoder.text[len(emitted):]
    result.text = decoder.text


def _partial_stop(text: str, stop: list[str]) -> int:
    """Length of the longest end of text that begins some stop string."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)
