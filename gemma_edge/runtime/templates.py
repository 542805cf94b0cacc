"""Prompt formats: a conversation (a list of {"role", "content"} messages) -> the text segments a
model was trained to continue, ending where its reply starts.

Each message becomes its own segment and is tokenized alone, so the ids of a conversation's
earlier turns stay the same as it grows: the generator then reuses the cache for them.
The cases in tests/data/prompt_formats.json pin every format (the Android app's tests read the
same file).
"""

from __future__ import annotations

from typing import Callable

from gemma_edge.errors import GemmaEdgeError

Messages = list[dict]


def gemma_turns(messages: Messages) -> list[str]:
    """Gemma's instruction-tuned turns. Gemma has no system role: a system message is prepended to
    the first user turn, as its Hugging Face chat template does."""
    segments, system = [], None
    for m in _checked(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            system = content
            continue
        if role == "user" and system is not None:
            content, system = f"{system}\n\n{content}", None
        segments.append(f"<start_of_turn>{'user' if role == 'user' else 'model'}\n{content}<end_of_turn>\n")
    return segments + ["<start_of_turn>model\n"]


def instruction_response(messages: Messages) -> list[str]:
    """The Instruction / Context / Response format of models fine-tuned on databricks-dolly-style
    data. A user message's optional "context" becomes the Context block; a system message is not
    part of the format and is refused."""
    segments = []
    for m in _checked(messages):
        if m["role"] == "system":
            raise GemmaEdgeError("the instruction template has no system role; put it in the instruction")
        if m["role"] == "user":
            context = m.get("context")
            segments.append(f"Instruction:\n{m['content']}\n\n" + (f"Context:\n{context}\n\n" if context else "") + "Response:\n")
        else:
            segments.append(f"{m['content']}\n\n")
    if _checked(messages)[-1]["role"] != "user":
        raise GemmaEdgeError("the instruction template continues a user message: end the conversation with one")
    return segments


def dolly_records(path, what: str) -> list[dict]:
    """The records of a JSON lines file in the dolly layout: {"instruction", "context" (optional),
    "response"} per line (a "text" field instead is passed through as it is). what: the flag that
    named the file, for errors."""
    import json
    from pathlib import Path

    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GemmaEdgeError(f"{what} {path}: cannot read it as UTF-8 text ({e})") from None
    records = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GemmaEdgeError(f"{what} {path}:{number}: not a JSON object ({e.msg}); give one object per line, "
                                 'with "text" or "instruction"/"context"/"response"') from None
        if not isinstance(record, dict) or not ({"text", "instruction"} & record.keys()):
            raise GemmaEdgeError(f'{what} {path}:{number}: no "text" or "instruction" field')
        records.append(record)
    if not records:
        raise GemmaEdgeError(f"{what} {path}: no records; give one JSON object per line")
    return records


def dolly_prompt(record: dict) -> Messages:
    """A dolly record's instruction and context as the user message of the instruction format."""
    return [{"role": "user", "content": str(record["instruction"]), "context": record.get("context") or None}]


def dolly_text(record: dict) -> str:
    """A record as training saw it: the instruction format's prompt followed by the response."""
    if "instruction" not in record:
        return str(record["text"])
    return "".join(instruction_response(dolly_prompt(record))) + str(record.get("response") or "")


def plain(messages: Messages) -> list[str]:
    """The messages' contents one after the other: for base (not instruction-tuned) models."""
    return [m["content"] for m in _checked(messages)]


TEMPLATES: dict[str, Callable[[Messages], list[str]]] = {
    "gemma": gemma_turns,
    "instruction": instruction_response,
    "plain": plain,
}


def template(name: str) -> Callable[[Messages], list[str]]:
    if name not in TEMPLATES:
        raise GemmaEdgeError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _checked(messages: Messages) -> Messages:
    if not messages:
        raise GemmaEdgeError("the conversation is empty: give at least one {'role': 'user', 'content': ...} message")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "model") or not isinstance(m.get("content"), str):
            raise GemmaEdgeError(f"a message must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}")
    return messages
