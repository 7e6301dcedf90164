"""Evaluation prompts: files in the layouts datagen reads, or the built-in held-out sets.

A conversation is cut before its last assistant turn (the target then writes that turn); a `prompt` row is a
user turn rendered with the chat template (raw text for a model without one).

Built-in sets (`chat`, `humaneval`), for measuring only: spec_datagen.heldout, which also keeps their
near-duplicates out of spec datagen's training data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from spec_datagen.conversations import Conversation, Message, RowError, read_conversations
from spec_datagen.heldout import BUILTIN_SETS, decontaminate, prompt_texts, resolve_source
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError

__all__ = ["BUILTIN_SETS", "EvalPrompt", "decontaminate", "load_prompts", "prompt_texts", "resolve_source"]


def _cut_before_last_assistant(conv: Conversation) -> Conversation:
    last = max((i for i, m in enumerate(conv.messages) if m.role == "assistant"), default=None)
    return conv if last is None else msgspec.structs.replace(conv, messages=conv.messages[:last])


class EvalPrompt(msgspec.Struct):
    ids: list[int]
    source: str  # FILE:LINE, for messages that name the prompt


# Warm-up prompts (first-call costs stay out of the timings); whichever is not in the measured set is used.
WARMUP_TEXTS = ("Describe a quiet morning in a small harbour town.", "List five uses of a paper clip.")


def load_prompts(
    sources: list[str], verifier: str | Path, limit: int | None = None, max_len: int | None = None
) -> list[EvalPrompt]:
    """Prompts from each source (up to `limit` per source), rendered for the verifier. Malformed rows are
    skipped with a FILE:LINE warning on stderr; prompts longer than max_len too. A source with no usable
    row is an error (one line, naming its first problem)."""
    renderer = ChatRenderer.for_model(verifier)
    prompts: list[EvalPrompt] = []
    for source in sources:
        taken, skipped = [], []
        for item in read_conversations([resolve_source(source)]):
            if limit is not None and len(taken) >= limit:
                break
            if isinstance(item, RowError):
                skipped.append(f"{item.source}: {item.message}")
                continue
            conv = _cut_before_last_assistant(item)
            if not conv.messages:
                skipped.append(f"{conv.source}: no prompt before the first assistant turn")
                continue
            ids = renderer.prompt_ids(conv)
            if max_len is not None and len(ids) > max_len:
                skipped.append(f"{conv.source}: prompt of {len(ids)} tokens exceeds {max_len}")
                continue
            taken.append(EvalPrompt(ids, conv.source))
        if not taken:
            first = f"; first: {skipped[0]}" if skipped else ""
            raise SpecError(f"{source}: no usable prompt ({len(skipped)} rows skipped{first})")
        for message in skipped:
            print(f"warning: {message} (skipped)", file=sys.stderr)
        prompts += taken
    return prompts


def warmup_prompt_ids(verifier: str | Path, measured: list[list[int]]) -> list[int]:
    """A chat prompt for the verifier that is not among the measured prompts."""
    renderer = ChatRenderer.for_model(verifier)
    for text in WARMUP_TEXTS:
        ids = renderer.prompt_ids(Conversation(messages=[Message(role="user", content=text)]))
        if ids not in measured:
            return ids
    raise SpecError(
        f"every warm-up prompt is also a measured prompt: remove '{WARMUP_TEXTS[0]}' from the data"
    )
