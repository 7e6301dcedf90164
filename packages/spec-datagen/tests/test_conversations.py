"""Reading the chat layouts, FILE:LINE errors, and writing rows back in their own layout."""

import json

import pytest

from spec_datagen.conversations import (
    BadRow,
    Message,
    RowError,
    expand_paths,
    iter_rows,
    normalise,
    read_conversations,
    to_row,
    write_rows,
)
from spec_format.errors import SpecError

MESSAGES_ROW = {
    "id": "a1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need the tool.",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "18 "}, {"type": "text", "text": "degrees."}],
        },
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
}
SHAREGPT_ROW = {
    "conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
    ],
    "source": "x",
}


def test_messages_layout_keeps_tools_reasoning_and_text_parts():
    conv = normalise(MESSAGES_ROW, "f.jsonl:1")
    assert conv.layout == "messages" and conv.key == "messages" and conv.source == "f.jsonl:1"
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[2].reasoning_content == "Need the tool."
    assert conv.messages[2].tool_calls[0]["function"]["name"] == "weather"
    assert conv.messages[3].tool_call_id == "c1"
    assert conv.messages[4].content == "18 degrees."
    assert conv.tools[0]["function"]["name"] == "weather"
    assert conv.extra == {"id": "a1"}


def test_sharegpt_layout_maps_speakers_to_roles():
    conv = normalise(SHAREGPT_ROW)
    assert conv.layout == "sharegpt"
    assert conv.messages == [Message("system", "S"), Message("user", "Hi"), Message("assistant", "Hello")]


def test_role_content_messages_under_conversations_key():
    conv = normalise(
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    assert conv.layout == "messages" and conv.key == "conversations"
    assert to_row(conv) == {
        "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }


def test_prompt_completion_plain_and_conversational():
    plain = normalise({"prompt": "2+2=", "completion": "4"})
    assert plain.raw_text and plain.messages == [Message("user", "2+2="), Message("assistant", "4")]
    chat = normalise(
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    )
    assert not chat.raw_text and [m.role for m in chat.messages] == ["user", "assistant"]
    prompt_only = normalise({"prompt": "just a prompt"})
    assert prompt_only.messages == [Message("user", "just a prompt")] and not prompt_only.has_assistant


@pytest.mark.parametrize(
    "row",
    [
        MESSAGES_ROW,
        SHAREGPT_ROW,
        {"prompt": "2+2=", "completion": "4", "id": 7},
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ],
)
def test_to_row_writes_the_layout_it_read(row):
    conv = normalise(row)
    assert normalise(to_row(conv)) == conv
    if row is not MESSAGES_ROW:  # the text parts of MESSAGES_ROW are written back joined
        assert to_row(conv) == row


@pytest.mark.parametrize(
    "row, message",
    [
        ([1, 2], "expected a JSON object per row, found list"),
        ({"text": "x"}, "no conversation found: expected a 'messages', 'conversations' or 'prompt' field"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": "hi"}, "'messages' must be a list of messages, found str"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role is 'robot'"),
        ({"messages": [{"role": "user"}]}, "messages[0] has no content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string, found int"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content has non-text parts ['image_url']",
        ),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from is 'alien'"),
        ({"conversations": [{"from": "human"}]}, "conversations[0] has no 'value'"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": "{"},
            "'tools' is a string that is not JSON",
        ),
    ],
)
def test_bad_rows_name_the_location_and_the_problem(row, message):
    with pytest.raises(BadRow) as e:
        normalise(row, "data.jsonl:12")
    assert str(e.value).startswith("data.jsonl:12: ") and message in str(e.value)


def test_jsonl_errors_carry_one_based_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n'
        b"\n"  # blank lines are not rows but still count as lines
        b"{not json}\n"
        b'{"messages": [{"role": "user", "content": "q"}]}\n'
        b'{"prompt": "\xff"}\n'
        b'{"oops": 1}\n'
    )
    got = [
        (c.source, str(c)) if isinstance(c, RowError) else (c.source, None) for c in read_conversations(path)
    ]
    assert [g[0] for g in got] == [f"{path}:{n}" for n in (1, 3, 4, 5, 6)]
    assert got[0][1] is None and got[2][1] is None
    assert got[1][1].startswith(f"{path}:3: not valid JSON")
    assert got[3][1].startswith(f"{path}:5: not UTF-8 text")
    assert got[4][1].startswith(f"{path}:6: no conversation found")


def test_json_array_rows_are_located_by_line(tmp_path):
    path = tmp_path / "d.json"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"bad": 1}]
    path.write_text(json.dumps(rows, indent=2))
    got = list(read_conversations(path))
    lines = path.read_text().splitlines()
    expected = [i + 1 for i, line in enumerate(lines) if line == "  {"]
    assert [c.source for c in got] == [f"{path}:{n}" for n in expected]
    assert isinstance(got[2], RowError) and "no conversation found" in got[2].message


def test_broken_json_array_ends_the_file_with_one_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": "c" "completion": "d"}\n]')
    got = list(iter_rows(path))
    assert got[0] == (f"{path}:2", {"prompt": "a", "completion": "b"})
    assert len(got) == 2 and isinstance(got[1][1], RowError) and got[1][1].source == f"{path}:3"


def test_directories_expand_in_name_order_and_bad_paths_say_so(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "b"}\n')
    (tmp_path / "a.json").write_text('[{"prompt": "a"}]')
    (tmp_path / "notes.txt").write_text("ignored")
    assert expand_paths([tmp_path]) == [tmp_path / "a.json", tmp_path / "b.jsonl"]
    assert [c.messages[0].content for c in read_conversations(tmp_path)] == ["a", "b"]
    with pytest.raises(SpecError, match="no such file or directory"):
        expand_paths([tmp_path / "missing.jsonl"])
    with pytest.raises(SpecError, match="unsupported file type"):
        expand_paths([tmp_path / "notes.txt"])


def test_write_rows_round_trips_through_the_reader(tmp_path):
    convs = [normalise(r) for r in (MESSAGES_ROW, SHAREGPT_ROW, {"prompt": "p", "completion": "c"})]
    out = tmp_path / "out.jsonl"
    assert write_rows(out, convs) == 3
    again = list(read_conversations(out))
    assert [c.messages for c in again] == [c.messages for c in convs]
    assert [c.layout for c in again] == ["messages", "sharegpt", "prompt_completion"]


def test_hugging_face_datasets_in_memory_parquet_and_saved(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        SHAREGPT_ROW,
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "source": "z"},
    ]
    ds = datasets.Dataset.from_list(rows)
    in_memory = list(read_conversations(ds))
    assert [c.source for c in in_memory] == ["<data>:1", "<data>:2"]
    assert [c.messages for c in in_memory] == [normalise(r).messages for r in rows]
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        got = list(read_conversations(path))
        assert [c.source for c in got] == [f"{path}:1", f"{path}:2"]
        assert [c.messages for c in got] == [c.messages for c in in_memory]
