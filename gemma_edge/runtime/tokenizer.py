"""The export folder's tokenizer (tokenizer.json through `tokenizers`, or a SentencePiece
tokenizer.model), with the special ids the manifest records, and a decoder that streams text.

Gemma's vocabulary falls back to bytes for characters it lacks (<0xC3><0xA9> for "é"), so the
text of a prefix of the generated ids may end in half a character. The stream decoder only
releases text once it no longer ends in U+FFFD (the replacement of an incomplete UTF-8 sequence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from gemma_edge.errors import DamagedExportError, GemmaEdgeError, MissingDependencyError
from gemma_edge.manifest import damaged

INCOMPLETE = "\ufffd"


class Tokenizer:
    def __init__(self, folder: str | Path, special_tokens: dict):
        folder = Path(folder)
        self.bos_id: int | None = special_tokens.get("bos_token_id")
        self.stop_ids: list[int] = list(special_tokens.get("stop_token_ids") or special_tokens.get("eos_token_ids") or [])
        self.end_of_turn_id: int | None = special_tokens.get("end_of_turn_id")
        if (folder / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise MissingDependencyError("reading tokenizer.json needs tokenizers: pip install tokenizers") from None
            try:
                self._hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on a file it cannot parse
                raise DamagedExportError(damaged(folder, "tokenizer.json", f"tokenizers cannot read it: {e}")) from None
            self._sp = None
        elif (folder / "tokenizer.model").is_file():
            try:
                import sentencepiece
            except ImportError:
                raise MissingDependencyError("reading tokenizer.model needs sentencepiece: pip install sentencepiece") from None
            self._hf = None
            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            except (RuntimeError, OSError) as e:
                raise DamagedExportError(damaged(folder, "tokenizer.model", f"sentencepiece cannot read it: {e}")) from None
            # left out of text, as tokenizers' skip_special_tokens does: control pieces and the turn markers
            turn = {self._sp.piece_to_id(p) for p in ("<start_of_turn>", "<end_of_turn>")} - {self._sp.unk_id()}
            self._sp_special = {i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)} | turn
        else:
            raise GemmaEdgeError(f"{folder} has no tokenizer.json or tokenizer.model; re-export it, or copy the "
                                 "checkpoint's tokenizer files into it")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Ids of text; special tokens written in it (<start_of_turn>, ...) become their ids."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.encode(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens left out."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.decode([i for i in ids if i not in self._sp_special])

    def token_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() else i


class StreamDecoder:
    """Text of a growing list of ids, released in pieces that are whole characters.

    Each new id is decoded together with the few ids before it (from the start of the last
    released piece), so the tokenizer's joining rules (leading spaces, byte fallback) apply, each
    step costs the same however long the text, and released text is never taken back, even when
    the model emits bytes that are no valid UTF-8 (a whole-list decode would then rewrite earlier
    characters as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # released so far
        self._prefix = 0  # ids[_prefix:_read] decode to the last released piece ...
        self._read = 0
        self._before = ""  # ... which is this text

    def add(self, token_id: int) -> str:
        """The new complete text after one more id ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(self._before) or after.endswith(INCOMPLETE):
            return ""
        return self._release(after)

    def flush(self) -> str:
        """Whatever remains at the end (an incomplete character stays U+FFFD)."""
        return self._release(self.tokenizer.decode(self.ids[self._prefix:]))

    def _release(self, after: str) -> str:
        """Release the window's text past what was already shown; the new window starts at the last piece."""
        piece = after[len(self._before):]
        self._before = self.tokenizer.decode(self.ids[self._read:])
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece
