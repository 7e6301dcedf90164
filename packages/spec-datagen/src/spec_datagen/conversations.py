"""Conversations in the common chat layouts: reading, normalising, and writing them back.

Layouts (one row = one conversation):
- `messages`: {"messages": [{"role", "content", ...}]} (OpenAI / Hugging Face); the same message form
  under "conversations" is accepted too.
- `sharegpt`: {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}.
- `prompt_completion`: {"prompt": str, "completion": str} (plain text), or TRL's conversational form where
  both are lists of messages.
A row may carry "tools" (a list of tool schemas, passed to the chat template); messages may carry
`reasoning_content`, `tool_calls`, `name` and `tool_call_id`. Other row fields are kept in `extra` so that
`to_row()` writes the row back in the layout it came from.

Sources are JSONL files, JSON files (an array of rows), directories of those, Parquet/Arrow files and
`datasets.save_to_disk` directories (through the `datasets` package), Hugging Face datasets named
`hf:ORG/NAME[:CONFIG][:SPLIT]` or by preset (spec_datagen.hub, streamed), or any iterable of dicts such as
an already-loaded `datasets.Dataset`. Every row keeps where it came from: "FILE:LINE" (1-based) for JSON
text, "FILE:ROW" (1-based) for tabular files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from spec_format.errors import SpecError

ROLES = ("system", "user", "assistant", "tool")
LAYOUTS = ("messages", "sharegpt", "prompt_completion")
# ShareGPT speaker names -> roles; to_row() writes the first name listed for each role.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
_SHAREGPT_NAMES = {"user": "human", "assistant": "gpt", "system": "system", "tool": "tool"}
_MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "name", "tool_call_id")
TEXT_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")


class Message(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class Conversation(msgspec.Struct, omit_defaults=True):
    """One normalised conversation. For `prompt_completion` rows in plain text, `messages` is
    [user(prompt), assistant(completion)] and `raw_text` is True (a base model renders them as raw text)."""

    messages: list[Message]
    layout: str = "messages"
    key: str = "messages"  # the row field that held the messages (for to_row)
    tools: list[dict] | None = None
    raw_text: bool = False
    extra: dict | None = None
    source: str = ""

    @property
    def has_assistant(self) -> bool:
        return any(m.role == "assistant" for m in self.messages)


class RowError(msgspec.Struct):
    """A row that could not be read or normalised: `source` is FILE:LINE, `message` says what is wrong."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class BadRow(SpecError):
    """A row that cannot become a sample; the message starts with the row's FILE:LINE."""


class _Bad(Exception):
    pass


def _text(value: Any, what: str) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type", "text") != "text" for p in value):
            kinds = sorted({str(p.get("type")) for p in value} - {"text"})
            raise _Bad(f"{what} has non-text parts {kinds}; only text is supported")
        return "".join(str(p.get("text", "")) for p in value)
    raise _Bad(f"{what} must be a string, found {type(value).__name__}")


def _message(raw: Any, where: str) -> Message:
    if not isinstance(raw, dict):
        raise _Bad(f"{where} must be an object, found {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        raise _Bad(f"{where}.role is {role!r}; expected one of {list(ROLES)}")
    content = raw.get("content")
    tool_calls = raw.get("tool_calls")
    if content is None and not tool_calls:
        raise _Bad(f"{where} has no content")
    if tool_calls is not None and not (
        isinstance(tool_calls, list) and all(isinstance(c, dict) for c in tool_calls)
    ):
        raise _Bad(f"{where}.tool_calls must be a list of objects")
    reasoning = raw.get("reasoning_content", raw.get("reasoning"))
    return Message(
        role=role,
        content=None if content is None else _text(content, f"{where}.content"),
        reasoning_content=None if reasoning is None else _text(reasoning, f"{where}.reasoning_content"),
        tool_calls=tool_calls or None,
        name=raw.get("name") if isinstance(raw.get("name"), str) else None,
        tool_call_id=raw.get("tool_call_id") if isinstance(raw.get("tool_call_id"), str) else None,
    )


def _sharegpt_message(raw: Any, where: str) -> Message:
    if not isinstance(raw, dict):
        raise _Bad(f"{where} must be an object, found {type(raw).__name__}")
    speaker = raw.get("from")
    role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
    if role is None:
        raise _Bad(f"{where}.from is {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
    if "value" not in raw:
        raise _Bad(f"{where} has no 'value'")
    return Message(role=role, content=_text(raw["value"], f"{where}.value"))


def _message_list(raw: Any, key: str) -> tuple[list[Message], str]:
    """Messages of a row field and its layout ("messages" or "sharegpt", decided by the first message)."""
    if not isinstance(raw, list):
        raise _Bad(f"'{key}' must be a list of messages, found {type(raw).__name__}")
    if not raw:
        raise _Bad(f"'{key}' is empty")
    sharegpt = isinstance(raw[0], dict) and "from" in raw[0] and "role" not in raw[0]
    parse = _sharegpt_message if sharegpt else _message
    return [parse(m, f"{key}[{i}]") for i, m in enumerate(raw)], "sharegpt" if sharegpt else "messages"


def normalise(row: Any, source: str = "") -> Conversation:
    """One row in any supported layout -> Conversation. Raises BadRow("SOURCE: what is wrong")."""
    try:
        return _normalise(row, source)
    except _Bad as e:
        raise BadRow(f"{source}: {e}") from None


def _normalise(row: Any, source: str) -> Conversation:
    if not isinstance(row, dict):
        raise _Bad(f"expected a JSON object per row, found {type(row).__name__}")
    tools = row.get("tools")
    if isinstance(tools, str):  # some datasets store the schema list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise _Bad("'tools' is a string that is not JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _Bad("'tools' must be a list of objects")
    for key in ("messages", "conversations"):
        if key in row:
            messages, layout = _message_list(row[key], key)
            extra = {k: v for k, v in row.items() if k not in (key, "tools")}
            return Conversation(messages, layout, key, tools or None, extra=extra or None, source=source)
    if "prompt" in row:
        prompt, completion = row["prompt"], row.get("completion")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "tools")}
        if isinstance(prompt, list):  # TRL's conversational prompt/completion
            messages, _ = _message_list(prompt, "prompt")
            if completion is not None:
                messages += _message_list(completion, "completion")[0]
            return Conversation(
                messages, "prompt_completion", "prompt", tools or None, False, extra or None, source
            )
        messages = [Message("user", _text(prompt, "'prompt'"))]
        if completion is not None:
            messages.append(Message("assistant", _text(completion, "'completion'")))
        return Conversation(
            messages, "prompt_completion", "prompt", tools or None, True, extra or None, source
        )
    raise _Bad(
        f"no conversation found: expected a 'messages', 'conversations' or 'prompt' field, found {sorted(row)}"
    )


def message_dicts(messages: Iterable[Message]) -> list[dict]:
    """Messages as the plain dicts chat templates take (absent fields left out)."""
    return [msgspec.to_builtins(m) for m in messages]


def to_row(conv: Conversation) -> dict:
    """The conversation as a row in the layout it was read from (other fields kept)."""
    row: dict[str, Any] = dict(conv.extra or {})
    if conv.layout == "sharegpt":
        row[conv.key] = [{"from": _SHAREGPT_NAMES[m.role], "value": m.content or ""} for m in conv.messages]
    elif conv.layout == "prompt_completion":
        head = conv.messages
        tail_start = next(
            (i for i, m in enumerate(head) if m.role == "assistant"),
            len(head),
        )
        prompt, completion = head[:tail_start], head[tail_start:]
        if conv.raw_text:
            row["prompt"] = prompt[0].content if prompt else ""
            if completion:
                row["completion"] = "".join(m.content or "" for m in completion)
        else:
            row["prompt"] = message_dicts(prompt)
            if completion:
                row["completion"] = message_dicts(completion)
    else:
        row[conv.key] = message_dicts(conv.messages)
    if conv.tools:
        row["tools"] = conv.tools
    return row


# ---------------------------------------------------------------------------------------------
# Reading rows with their locations.


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[str, Any | RowError]]:
    """Elements of a top-level JSON array with the 1-based line where each starts. A syntax error ends
    the file with one RowError (nothing after it can be located reliably)."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        # A single object is one row.
        where = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            yield where, RowError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg})")
        return
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield (
                f"{path}:{line}",
                RowError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg}); rest of file skipped"),
            )
            return
        yield f"{path}:{line}", value
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        where = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        yield where, RowError(where, "expected ',' or ']' in the JSON array; rest of file skipped")
        return


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any | RowError]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield where, RowError(where, f"not UTF-8 text ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield where, RowError(where, f"not valid JSON ({e.msg} at column {e.colno})")


def _table_rows(path: Path) -> Iterator[tuple[str, Any]]:
    datasets = _import_datasets(path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise SpecError(f"{path}: holds splits {list(ds)}; pass one split's directory")
    else:
        kind = "parquet" if path.suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    for i, row in enumerate(ds):
        yield f"{path}:{i + 1}", row


def _import_datasets(path: Path):
    try:
        import datasets
    except ImportError:
        raise SpecError(
            f"{path}: reading this needs the `datasets` package: pip install 'spec-datagen[datasets]'"
        ) from None
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files to read, in a fixed order: each path as given; directories expand to their supported files,
    sorted by name (a `datasets.save_to_disk` directory is one source)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if _is_saved_dataset(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES
            )
            if not found:
                raise SpecError(f"{p}: no .jsonl, .json, .parquet or .arrow files in this directory")
            out.extend(found)
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES + TABLE_SUFFIXES:
                raise SpecError(f"{p}: unsupported file type; use .jsonl, .json, .parquet or .arrow")
            out.append(p)
        else:
            raise SpecError(f"{p}: no such file or directory")
    return out


def _sources(source: Any) -> list | None:
    """`source` as a list of paths and `hf:` sources, or None when it is an iterable of rows."""
    from spec_datagen.hub import is_hub

    one = isinstance(source, str | os.PathLike) or is_hub(source)
    if one or (isinstance(source, list | tuple) and source and all(
        isinstance(s, str | os.PathLike) or is_hub(s) for s in source
    )):  # fmt: skip
        return [source] if one else list(source)
    return None


def iter_rows(source: Any) -> Iterator[tuple[str, Any]]:
    """(location, row) for every row of `source`: a path, an `hf:` source (spec_datagen.hub), a list of
    those, or an iterable of dicts (e.g. a loaded `datasets.Dataset`, located as "<data>:ROW"). A malformed
    row comes as a RowError in its place (a JSON syntax error ends its file: nothing after it can be
    located). Every path and Hub source is checked before the first row is read."""
    from spec_datagen.hub import is_hub, resolve

    sources = _sources(source)
    if sources is None:
        name = getattr(source, "info", None) and getattr(source.info, "dataset_name", None) or "<data>"
        for i, row in enumerate(source):
            yield f"{name}:{i + 1}", row
        return
    resolved = [[resolve(s)] if is_hub(s) else expand_paths([s]) for s in sources]
    for path in (p for group in resolved for p in group):
        if is_hub(path):
            yield from path.rows()
        elif path.is_dir() or path.suffix in TABLE_SUFFIXES:
            yield from _table_rows(path)
        elif path.suffix == ".jsonl":
            yield from _jsonl_rows(path)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise SpecError(f"{path}: not UTF-8 text ({e.reason})") from None
            yield from _json_array_rows(path, text)


def read_conversations(source: Any) -> Iterator[Conversation | RowError]:
    """Every row of `source` normalised, in order; a row that cannot be read or normalised comes as a
    RowError (its index in the stream is kept, so row indices do not depend on which rows are broken)."""
    for where, row in iter_rows(source):
        if isinstance(row, RowError):
            yield row
            continue
        try:
            yield _normalise(row, where)
        except _Bad as e:
            yield RowError(where, str(e))


def write_rows(path: str | os.PathLike, conversations: Iterable[Conversation]) -> int:
    """Write conversations as JSONL rows in their own layouts (atomically: a temp file renamed). Returns rows."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps(to_row(conv), ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n
