"""Response regeneration: sampling defaults, reasoning split, resumable output, and real regeneration of
multi-turn conversations with SmolLM2 (one shared engine), plus `spec regenerate` killed and resumed."""

import json
import os
import signal
import subprocess
import time

import pytest

from spec_datagen.conversations import Conversation, normalise
from spec_datagen.regenerate import (
    ReasoningTags,
    Regenerator,
    RegenStats,
    complete_rows,
    default_sampling,
    reasoning_tags,
    split_reasoning,
    write_regenerated,
)
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError

REGEN_KEY = "regen-smol"
REGEN_MAX_LEN = 384


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(question, reply="ORIGINAL REPLY"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


# ---------------------------------------------------------------------------------------------
# No engine.


def test_sampling_follows_the_generation_config_unless_flags_say_otherwise(tmp_path, demo_model):
    smol = default_sampling(demo_model)  # SmolLM2's config sets no sampling values
    assert (smol.temperature, smol.max_tokens) == (0.0, 1024) and "greedy" in smol.describe()
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 300})
    )
    s = default_sampling(tmp_path)
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens) == (0.6, 0.95, 20, 300)
    assert s.origin == "generation_config.json"
    s = default_sampling(tmp_path, temperature=0.0, top_p=None, max_tokens=64)
    assert (s.temperature, s.top_p, s.max_tokens) == (0.0, 0.95, 64)
    assert s.origin.endswith("flags set max_tokens, temperature")
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert default_sampling(tmp_path).temperature == 0.0
    (tmp_path / "generation_config.json").unlink()
    assert default_sampling(tmp_path).origin.startswith("the target has no generation_config.json")


def test_reasoning_is_split_where_the_template_keeps_it_apart(demo_model, style_model):
    assert reasoning_tags(ChatRenderer.for_model(demo_model)) is None  # SmolLM2: no reasoning field
    assert reasoning_tags(ChatRenderer.for_model(style_model("llama3"))) is None
    qwen = reasoning_tags(ChatRenderer.for_model(style_model("qwen3")))
    assert qwen == ReasoningTags("<think>", "</think>", prompt_opens=False)
    assert split_reasoning("<think>\nadd 2 and 2\n</think>\n\nIt is 4.", qwen) == ("add 2 and 2", "It is 4.")
    assert split_reasoning("It is 4.", qwen) == (None, "It is 4.")
    assert split_reasoning("<think>\nstill thinking", qwen) == ("still thinking", "")  # cut by max_tokens
    # enable_thinking=false: the generation prompt closes an empty block itself, the reply is all content.
    off = ChatRenderer.for_model(style_model("qwen3"), template_kwargs={"enable_thinking": False})
    assert split_reasoning("It is 4.", reasoning_tags(off)) == (None, "It is 4.")
    # A template whose generation prompt opens the block: the reply starts inside the reasoning.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(style_model("qwen3"))
    opening = tok.chat_template.replace(
        "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    )
    tags = reasoning_tags(ChatRenderer.for_model(style_model("qwen3"), opening))
    assert tags == ReasoningTags("<think>", "</think>", prompt_opens=True)
    assert split_reasoning("add\n</think>\n\n4", tags) == ("add", "4")
    assert split_reasoning("add and add", tags) == ("add and add", "")


def test_complete_rows_drop_a_partial_last_line_and_refuse_a_broken_one(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "compl')
    assert complete_rows(out) == (2, 32, {"prompt": "b"})
    out.write_bytes(b'{"prompt": "a"}\n{"prompt": \n{"prompt": "c"}\n')
    with pytest.raises(SpecError, match=rf"^{out}:2: not a complete JSON row"):
        complete_rows(out)


# ---------------------------------------------------------------------------------------------
# The command, killed and resumed (first: no engine of this module is alive yet when run alone).


def test_cli_refuses_an_existing_output_before_starting_the_engine(tmp_path, demo_model, spec_cli):
    data = write_jsonl(tmp_path / "in.jsonl", [chat("Hi")])
    out = tmp_path / "out.jsonl"
    out.write_text("")
    res = subprocess.run(
        [spec_cli, "regenerate", str(demo_model), "--data", str(data), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "already exists; pass --resume" in res.stderr


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1800)  # two engine starts: 2 x 40 s on a quiet machine, minutes on a busy one
def test_cli_killed_mid_run_resumes_without_losing_or_repeating_rows(tmp_path, demo_model, spec_cli):
    rows = [chat(f"Tell me one fact about the number {i}.") for i in range(40)]
    rows.insert(5, "{broken")
    rows.insert(30, {"messages": "not a list"})
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [spec_cli, "regenerate", str(demo_model), "--data", str(data), "--out", str(out),
           "--max-tokens", "16", "--max-model-len", "256", "--no-progress"]  # fmt: skip
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.read_bytes().count(b"\n") >= 1:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its engine process
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    kept = out.read_bytes()
    written = kept.count(b"\n")
    assert 1 <= written < 40, f"the run was not killed mid-way ({written} rows written)"
    assert f"{data}:6: not valid JSON" in (tmp_path / "first.log").read_text()
    # Resume (a kill leaves whole lines only, since each row is flushed whole; add a partial one).
    with open(out, "ab") as f:
        f.write(b'{"messages": [{"ro')
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming: {written} of 40 rows already in {out}" in res.stderr
    assert f"{data}:31: 'messages' must be a list of messages" in res.stderr
    assert f"conversations: {40 - written} (after {written} rows already written)" in res.stdout
    assert "truncated turns:" in res.stdout and "sampling: greedy, max_tokens=16" in res.stdout
    final = out.read_bytes()
    assert final.startswith(kept)
    got = [json.loads(line) for line in final.decode().splitlines()]
    assert [r["messages"][0]["content"] for r in got] == [
        f"Tell me one fact about the number {i}." for i in range(40)
    ]
    assert all(len(r["messages"]) == 2 and r["messages"][1]["content"] != "ORIGINAL REPLY" for r in got)


# ---------------------------------------------------------------------------------------------
# The real target on one shared engine.


@pytest.fixture(scope="module")
def regen(vllm_engine, demo_model):
    llm = vllm_engine(REGEN_KEY, demo_model, max_model_len=REGEN_MAX_LEN)
    return Regenerator(demo_model, llm=llm, max_tokens=24)


def prompt_token_total(renderer, conv):
    """Prompt tokens of every assistant turn of `conv`, each prompted with the messages before it."""
    return sum(
        len(renderer.prompt_ids(Conversation(conv.messages[:i], raw_text=conv.raw_text)))
        for i, m in enumerate(conv.messages)
        if m.role == "assistant" and not m.tool_calls
    )


@pytest.mark.e2e
def test_regenerates_every_layout_turn_by_turn_on_the_regenerated_history(regen):
    rows = [
        {
            "id": 7,
            "messages": [
                {"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "ORIGINAL REPLY"},
                {"role": "user", "content": "And another one?"},
                {"role": "assistant", "content": "ORIGINAL REPLY"},
            ],
        },
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},  # a prompt without a reply
        {
            "conversations": [
                {"from": "human", "value": "Say hello."},
                {"from": "gpt", "value": "ORIGINAL REPLY"},
            ]
        },
        {"prompt": "Write a haiku about snow.", "completion": "ORIGINAL REPLY"},
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "w"}}],
                },
                {"role": "tool", "content": "sunny, 21 C"},
            ]
        },
    ]
    stats = RegenStats()
    out = list(regen.regenerate(rows, stats=stats))
    assert len(out) == len(rows)
    first = out[0]
    assert first.extra == {"id": 7}
    assert [m.role for m in first.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.content for m in first.messages if m.role != "assistant"] == [
        "You answer in one sentence.", "Name a colour.", "And another one?",
    ]  # fmt: skip
    assert all(m.content != "ORIGINAL REPLY" for c in out for m in c.messages if m.role == "assistant")
    assert [m.role for m in out[1].messages] == ["user", "assistant"]
    assert (out[2].layout, out[3].layout, out[3].raw_text) == ("sharegpt", "prompt_completion", True)
    # The tool-call turn and the tool message are kept; the conversation gets its final reply.
    tool = out[4].messages
    assert [m.role for m in tool] == ["user", "assistant", "tool", "assistant"] and tool[1].tool_calls
    # 2 + 1 + 1 + 1 + 1 turns generated; each prompt was rendered from the *regenerated* history, so the
    # prompt tokens counted equal those of the output conversations (the originals differ in length).
    assert stats.turns == 6 and stats.kept_tool_call_turns == 1 and stats.conversations == 5
    assert sum(stats.finish_reasons.values()) == 6 and stats.truncated == stats.finish_reasons.get(
        "length", 0
    )
    assert stats.prompt_tokens == sum(prompt_token_total(regen.renderer, c) for c in out)
    assert first.messages[2].content and first.messages[4].content


@pytest.mark.e2e
def test_a_turn_that_does_not_fit_cuts_the_conversation_before_it(regen):
    long_question = "Tell me more about " + "the history of the world " * 80  # ~400 tokens > max_model_len
    conv = normalise(
        {
            "messages": [
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "ORIGINAL REPLY"},
                {"role": "user", "content": long_question},
                {"role": "assistant", "content": "ORIGINAL REPLY"},
            ]
        }
    )
    stats = RegenStats()
    (out,) = regen.regenerate([conv], stats=stats)
    assert [m.role for m in out.messages] == ["user", "assistant", "user"]
    assert out.messages[2].content == long_question
    assert stats.cut == {"context_full": 1} and stats.turns == 1


@pytest.mark.e2e
def test_file_run_resumes_in_input_order_and_reports_malformed_lines(tmp_path, regen):
    data = write_jsonl(
        tmp_path / "in.jsonl",
        [
            chat("What is the capital of France?"),
            "{not json",
            chat("Name three fruits."),
            {"messages": [{"role": "robot", "content": "x"}]},
            chat("Count to five."),
            chat("What colour is the sky?"),
        ],
    )
    out = tmp_path / "out.jsonl"
    reports = []
    first = write_regenerated(regen, data, out, max_rows=2, progress=False, report=reports.append)
    assert first.stats.conversations == 2 and first.stats.malformed == 1
    assert reports == [
        f"{data}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    ]
    before = out.read_bytes()
    with pytest.raises(SpecError, match="already exists; pass --resume"):
        write_regenerated(regen, data, out, progress=False)
    with open(out, "ab") as f:  # a run killed in the middle of a line
        f.write(b'{"messages": [{"role": "user", "cont')
    reports.clear()
    second = write_regenerated(regen, data, out, resume=True, progress=False, report=reports.append)
    assert second.resumed_rows == 2 and second.stats.conversations == 2
    assert any(r.startswith(f"{data}:4: messages[0].role is 'robot'") for r in reports)
    text = out.read_bytes()
    assert text.startswith(before)
    rows = [json.loads(line) for line in text.decode().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == [
        "What is the capital of France?", "Name three fruits.", "Count to five.", "What colour is the sky?",
    ]  # fmt: skip
    assert all(r["messages"][1]["content"] != "ORIGINAL REPLY" for r in rows)
    done = write_regenerated(regen, data, out, resume=True, progress=False, report=None)
    assert done.stats.conversations == 0 and out.read_bytes() == text
    # A file made from other data is not continued.
    other = write_jsonl(tmp_path / "other.jsonl", [chat("Something else entirely."), chat("More.")] * 3)
    with pytest.raises(SpecError, match=rf"{out}:4: this row does not start like input row {other}:4"):
        write_regenerated(regen, other, out, resume=True, progress=False)
