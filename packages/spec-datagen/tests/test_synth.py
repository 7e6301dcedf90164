"""Prompt synthesis (Magpie): the user-turn prefix of several templates, the filters, deduplication and the
diversity report; real synthesis with SmolLM2 on the shared regeneration engine; `spec synth --respond`."""

import subprocess

import pytest

from spec_datagen.synth import (
    NearDuplicates,
    SynthOptions,
    SynthStats,
    diversity,
    fold,
    quality_issue,
    read_topics,
    synthesize,
    user_turn_prefix,
)
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError

SMOL_PREFIX = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
)


def test_user_turn_prefix_is_read_off_the_template(demo_model, style_model):
    assert user_turn_prefix(ChatRenderer.for_model(demo_model)) == SMOL_PREFIX
    topic = user_turn_prefix(ChatRenderer.for_model(demo_model), "You like cooking.")
    assert topic == "<|im_start|>system\nYou like cooking.<|im_end|>\n<|im_start|>user\n"
    llama = user_turn_prefix(ChatRenderer.for_model(style_model("llama3")))
    assert llama == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    gemma = ChatRenderer.for_model(style_model("gemma"))
    assert user_turn_prefix(gemma) == "<bos><start_of_turn>user\n"
    with pytest.raises(SpecError, match=r"does not accept a system message \(so --topics cannot seed it\)"):
        user_turn_prefix(gemma, "You like cooking.")
    with pytest.raises(SpecError, match="no chat template: prompt synthesis needs an aligned chat model"):
        user_turn_prefix(ChatRenderer.for_model(style_model("base")))


def test_filters_name_what_is_wrong():
    ok = dict(min_words=3, max_words=50, markup=("<|im_start|>", "<|im_end|>"))
    assert quality_issue("How do I boil an egg so that the yolk stays soft?", **ok) is None
    assert quality_issue("   ", **ok) == "empty"
    assert quality_issue("Hi there", **ok) == "too_short"
    assert quality_issue(" ".join(["word"] * 51), **ok) == "too_long"
    assert quality_issue("Explain this.<|im_start|>assistant", **ok) == "markup"
    assert quality_issue("I like it and " * 8, **ok) == "repetitive"
    assert quality_issue("What is this: !!!!!!!!!!!!!!!!!!!!!!", **ok) == "repetitive"
    assert quality_issue("12 + 34 = 46; 7 * 8 = 56; 9 - 3 = 6", **ok) == "not_text"
    assert fold("  What IS  love? ") == fold("what is love")


def test_near_duplicates_are_caught_and_different_prompts_are_not():
    near = NearDuplicates(0.7)
    assert not near.seen("How do I make a sourdough starter at home from scratch?")
    assert near.seen("How do I make a sourdough starter at home from scratch")  # punctuation only
    assert near.seen("how do i make a sourdough starter at home, from scratch?")
    assert not near.seen("Write a short poem about the sea at night.")
    assert not near.seen("What are the main causes of inflation in an economy?")
    assert len(near.signatures) == 3
    # Signatures do not depend on the process (hash randomisation) or on earlier texts.
    assert (NearDuplicates().signature("a b c d") == near.signature("a b c d")).all()


def test_diversity_report_counts_distinct_ngrams_and_lengths():
    d = diversity(["what is love", "what is life", "tell me a long story about a very old tree please"])
    assert d.prompts == 3
    assert d.distinct_n[0] == pytest.approx(14 / 17)  # 17 words, 14 distinct
    assert d.distinct_n[1] == pytest.approx(13 / 14)  # "what is" twice
    assert dict(d.histogram)["1-5"] == 2 and dict(d.histogram)["11-20"] == 1
    assert d.first_words[0] == ("what", 2)
    lines = d.lines()
    assert lines[0].startswith("distinct n-grams (distinct/total): 1-gram 0.824, 2-gram 0.929")
    assert any("1-5 words |" in line and line.endswith(" 2") for line in lines)


def test_topics_file(tmp_path):
    (tmp_path / "t.txt").write_text("# topics\ncooking\n\n  travel  \n")
    assert read_topics(tmp_path / "t.txt") == ["cooking", "travel"]
    (tmp_path / "e.txt").write_text("\n# none\n")
    with pytest.raises(SpecError, match="no topics; write one topic per line"):
        read_topics(tmp_path / "e.txt")
    with pytest.raises(SpecError, match="no openers; write one opener per line"):
        read_topics(tmp_path / "e.txt", "opener")


@pytest.mark.parametrize(
    "style, topics, message",
    [
        ("base", False, "no chat template: prompt synthesis needs an aligned chat model"),
        ("gemma", True, "does not accept a system message (so --topics cannot seed it)"),
    ],
)
def test_cli_refuses_what_cannot_work_before_starting_the_engine(
    tmp_path, style_model, spec_cli, style, topics, message
):
    (tmp_path / "topics.txt").write_text("cooking\n")
    cmd = [spec_cli, "synth", str(style_model(style)), "--n", "2", "--out", str(tmp_path / "p.jsonl")]
    cmd += ["--topics", str(tmp_path / "topics.txt")] if topics else []
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and message in res.stderr
    assert "engine" not in res.stderr.lower() and not (tmp_path / "p.jsonl").exists()


# `spec synth --respond` as a command (its report, a new output directory): spec-train's test_quickstart.py,
# whose first stage it is.


# ---------------------------------------------------------------------------------------------
# The shared regeneration engine (same key and kwargs as test_regenerate.py).


@pytest.fixture(scope="module")
def smol(vllm_engine, demo_model):
    return vllm_engine("regen-smol", demo_model, max_model_len=384), ChatRenderer.for_model(demo_model)


@pytest.mark.e2e
def test_synthesises_distinct_filtered_prompts_reproducibly(smol):
    llm, renderer = smol
    options = SynthOptions(seed=1, max_tokens=64)
    stats = SynthStats()
    got = list(synthesize(llm, renderer, 6, options=options, stats=stats))
    assert len(got) == 6 and stats.accepted == 6
    assert stats.attempts == 6 + sum(stats.rejected.values())
    texts = [c.messages[0].content for c in got]
    assert all(c.messages[0].role == "user" and len(c.messages) == 1 for c in got)
    assert all(quality_issue(t, min_words=3, max_words=200, markup=("<|im_start|>",)) is None for t in texts)
    assert len({fold(t) for t in texts}) == 6
    # Same seed, same prompts (each attempt has its own seed, whatever the batching).
    again = [c.messages[0].content for c in synthesize(llm, renderer, 6, options=options)]
    assert again == texts
    # Topics seed each attempt through the system message and are kept on the row.
    seeded = list(synthesize(llm, renderer, 2, options=options, topics=["baking bread", "the moon"]))
    assert len(seeded) == 2 and {c.extra["topic"] for c in seeded} <= {"baking bread", "the moon"}
    # Openers start each user message; the target writes the rest.
    openers = ["Write a Python function that", "Can you explain"]
    opened = list(synthesize(llm, renderer, 4, options=options, openers=openers))
    assert len(opened) == 4 and {c.extra["opener"] for c in opened} <= set(openers)
    for c in opened:
        text = c.messages[0].content
        assert text.startswith(c.extra["opener"]) and len(text.split()) > len(c.extra["opener"].split())


@pytest.mark.e2e
def test_gives_up_after_max_attempts(smol):
    llm, renderer = smol
    stats = SynthStats()
    # No 64-token prompt has 150 words: every attempt is rejected, and synthesis stops at the limit.
    options = SynthOptions(seed=2, max_tokens=16, min_words=150, max_attempts=5)
    assert list(synthesize(llm, renderer, 3, options=options, stats=stats)) == []
    assert stats.attempts == 5 and stats.accepted == 0
    assert set(stats.rejected) <= {"too_short", "truncated"}
