"""tools/exp_onpolicy.py's data preparation: the chatterbot-corpus reader, decontamination against the
held-out prompts, supervised-token budgets, and (a), (b), (c) written on the real target with the shared
regeneration engine from a small package made here in chatterbot-corpus's layout."""

import json
import zipfile

import pytest

from spec_datagen.template import ChatRenderer

YAML_AI = """categories:
- AI
conversations:
- - What is AI?
  - Artificial Intelligence is the branch of engineering and science devoted to constructing machines that think.
- - Do you like music?
  - yes
  - What kind?
- - Is it raining?
  - no
  - Are you sure?
  - Yes, I looked outside a minute ago.
"""
YAML_FOOD = """categories:
- food
conversations:
- - What is your favourite fruit?
  - I like apples, especially the sour green ones.
- - Can you cook?
  - I can follow a recipe, but I cannot taste anything.
- - lonely
"""


@pytest.fixture(scope="module")
def tool(tool_module):
    return tool_module("exp_onpolicy")


@pytest.fixture
def package(tmp_path):
    """A wheel laid out like chatterbot-corpus 1.3.3's."""
    wheel = tmp_path / "chatterbot_corpus-1.3.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("chatterbot_corpus/data/english/ai.yml", YAML_AI)
        z.writestr("chatterbot_corpus/data/english/food.yml", YAML_FOOD)
        z.writestr("chatterbot_corpus/data/spanish/ai.yml", YAML_AI.replace("What is AI?", "Que es IA?"))
    return wheel


def test_chatterbot_dialogues_become_alternating_turns(tool, package, tmp_path):
    rows = tool.human_rows("chatterbot", tmp_path / "cache", package)
    assert len(rows) == 5  # English only; the lone utterance has no reply
    by_first = {r["messages"][0]["content"]: r["messages"] for r in rows}
    # "yes"/"no" stay text (YAML 1.1 would read booleans); an unanswered last utterance is dropped.
    assert [m["content"] for m in by_first["Do you like music?"]] == ["Do you like music?", "yes"]
    assert [m["role"] for m in by_first["Is it raining?"]] == ["user", "assistant", "user", "assistant"]
    assert by_first["Is it raining?"][1]["content"] == "no"
    assert rows[0]["source"] == "chatterbot_corpus/data/english/ai.yml#0"


def test_decontamination_and_supervised_token_budgets(tool):
    rows = [
        {"messages": [{"role": "user", "content": "Write a four-line poem about rain on a tin roof!"}]},
        {"messages": [{"role": "user", "content": "How do tides work?"}]},
    ]
    from spec_train.eval_prompts import decontaminate

    kept, dropped = decontaminate(rows, ["Write a four-line poem about rain on a tin roof."])
    assert dropped == 1 and kept == rows[1:]
    counts = [(10, 4), (12, 6), (9, 3)]
    assert tool.take_supervised(["x", "y", "z"], counts, 5) == ["x", "y"]
    assert tool.take_supervised(["x", "y", "z"], counts, 4) == ["x"]
    assert tool.take_supervised(["x", "y", "z"], counts, 100) == ["x", "y", "z"]


@pytest.mark.e2e
def test_prepare_writes_three_disjoint_data_sets_of_equal_supervised_size(
    tool, package, tmp_path, vllm_engine, demo_model
):
    llm = vllm_engine("regen-smol", demo_model, max_model_len=384)  # shared with spec-datagen's tests
    work = tmp_path / "work"
    kwargs = dict(n_synth=4, max_tokens=16, seed=0, human_package=package, llm=llm, chunk=2, progress=False)
    sizes = tool.prepare(demo_model, work, **kwargs)
    a, b, c = (tool.read_jsonl(work / f"{n}.jsonl") for n in "abc")
    human = {r["messages"][0]["content"] for r in tool.human_rows("chatterbot", tmp_path, package)}
    assert b and {r["messages"][0]["content"] for r in b} <= human
    # (c): the same prompts and turns as (b), every reply the target's own.
    assert [[m["content"] for m in r["messages"] if m["role"] == "user"] for r in c] == [
        [m["content"] for m in r["messages"] if m["role"] == "user"] for r in b
    ]
    b_replies = [m["content"] for r in b for m in r["messages"] if m["role"] == "assistant"]
    c_replies = [m["content"] for r in c for m in r["messages"] if m["role"] == "assistant"]
    assert len(c_replies) == len(b_replies) and c_replies != b_replies
    assert a and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in a)
    # Equal budgets: each set reaches the smaller total with its last row, not before.
    budget = min(sizes["a"]["supervised_tokens"], sizes["b"]["supervised_tokens"])
    renderer = ChatRenderer.for_model(demo_model)
    for rows in (a, b):
        counts = tool.token_counts(renderer, rows)
        assert tool.supervised(counts[:-1]) < budget <= tool.supervised(counts)
    # Held out: no evaluation prompt in any training set.
    eval_prompts = {json.loads(line)["prompt"] for line in (work / "eval.jsonl").read_text().splitlines()}
    assert len(eval_prompts) == 48
    train_prompts = {
        m["content"] for rows in (a, b, c) for r in rows for m in r["messages"] if m["role"] == "user"
    }
    assert not eval_prompts & train_prompts
    # A second run finds everything done and changes nothing.
    before = {n: (work / f"{n}.jsonl").read_bytes() for n in "abc"}
    assert tool.prepare(demo_model, work, **kwargs) == sizes
    assert {n: (work / f"{n}.jsonl").read_bytes() for n in "abc"} == before
    assert "| (a) synthesised prompts, regenerated replies |" in tool.table(sizes, None)
