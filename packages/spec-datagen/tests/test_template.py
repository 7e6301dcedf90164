"""Loss masks token by token, for the real SmolLM2 template and Llama-3, Gemma and Qwen3 templates.

Each expectation is the sample's token sequence cut into runs of equal mask value, each run decoded: a
mask that is one token off at any boundary changes a run's text.
"""

from itertools import groupby

import numpy as np
import pytest

from spec_datagen.conversations import BadRow, normalise
from spec_datagen.template import ChatRenderer
from spec_format.errors import SpecError


def runs(renderer, sample):
    """[(text, supervised), ...] of consecutive tokens with the same mask value."""
    assert sample.token_ids.dtype == np.int32 and sample.loss_mask.dtype == np.bool_
    assert len(sample.token_ids) == len(sample.loss_mask)
    pairs = zip(sample.token_ids.tolist(), sample.loss_mask.tolist(), strict=True)
    return [(renderer.tok.decode([i for i, _ in g]), bool(k)) for k, g in groupby(pairs, key=lambda p: p[1])]


def msgs(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_smollm2_multi_turn_masks_every_assistant_turn_and_its_end_token(demo_model):
    r = ChatRenderer.for_model(demo_model)
    row = msgs(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4")
    )
    sample = r.tokenize(normalise(row, "f:1"), source_index=5)
    assert sample.source_index == 5 and sample.source == "f:1" and sample.unsupervised_turns == 0
    assert runs(r, sample) == [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>", True),
        ("\n", False),
    ]
    # The ids are exactly what the template renders, tokenized as transformers does for chat.
    assert sample.token_ids.tolist() == r.tok.apply_chat_template(
        row["messages"], tokenize=True, return_dict=False
    )


def test_smollm2_default_system_prompt_and_sharegpt_rows(demo_model):
    r = ChatRenderer.for_model(demo_model)
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    assert runs(r, r.tokenize(normalise(sharegpt))) == [
        (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hey<|im_end|>", True),
        ("\n", False),
    ]


def test_llama3_template(style_model):
    r = ChatRenderer.for_model(style_model("llama3"))
    row = msgs(
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", " Hello! "),
        ("user", "2+2?"),
        ("assistant", "4"),
    )
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert runs(r, r.tokenize(normalise(row))) == [
        ("<|begin_of_text|>" + h.format("system") + "Be brief.<|eot_id|>" + h.format("user") + "Hi<|eot_id|>"
         + h.format("assistant"), False),
        ("Hello!<|eot_id|>", True),  # the template trims the content
        (h.format("user") + "2+2?<|eot_id|>" + h.format("assistant"), False),
        ("4<|eot_id|>", True),
    ]  # fmt: skip


def test_gemma_template_and_its_refusals(style_model):
    r = ChatRenderer.for_model(style_model("gemma"))
    row = msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!"))
    assert runs(r, r.tokenize(normalise(row))) == [
        ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", False),
        ("Hello!<end_of_turn>", True),
        ("\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n", False),
        ("Bye!<end_of_turn>", True),
        ("\n", False),
    ]
    with pytest.raises(BadRow, match=r"^data.jsonl:3: the chat template failed: System role not supported"):
        r.tokenize(normalise(msgs(("system", "S"), ("user", "Hi"), ("assistant", "x")), "data.jsonl:3"))


QWEN_MULTI_QUERY = {
    "messages": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "c1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "reasoning_content": "r2", "content": "c2"},
    ]
}


def test_qwen3_thinking_dropped_from_earlier_turns_is_detected_and_unmasked(style_model):
    r = ChatRenderer.for_model(style_model("qwen3"))
    sample = r.tokenize(normalise(QWEN_MULTI_QUERY))
    # In the full rendering turn 1 has lost its <think> block: not what the target generated, so unmasked.
    assert runs(r, sample) == [
        ("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\nc1<|im_end|>\n"
         "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nr2\n</think>\n\nc2<|im_end|>", True),
        ("\n", False),
    ]  # fmt: skip
    assert sample.unsupervised_turns == 1
    strict = ChatRenderer.for_model(style_model("qwen3"), rewritten="error")
    with pytest.raises(BadRow, match=r"^x:9: the chat template renders assistant turn 1 differently"):
        strict.tokenize(normalise(QWEN_MULTI_QUERY, "x:9"))


def test_qwen3_tool_calls_within_one_query_keep_both_assistant_turns(style_model):
    r = ChatRenderer.for_model(style_model("qwen3"))
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning_content": "Use the tool.",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "18C"},
            {"role": "assistant", "reasoning_content": "Report it.", "content": "18 degrees."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    }
    got = runs(r, r.tokenize(normalise(row)))
    assert [t for t, k in got if k] == [
        '<think>\nUse the tool.\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>",
        "<think>\nReport it.\n</think>\n\n18 degrees.<|im_end|>",
    ]
    unmasked = [t for t, k in got if not k]
    assert unmasked[0].startswith("<|im_start|>system\n# Tools") and unmasked[0].endswith(
        "<|im_start|>assistant\n"
    )
    assert (
        unmasked[1]
        == "\n<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert unmasked[2] == "\n"


@pytest.mark.parametrize(
    "thinking, supervised", [(None, "<think>\n\n</think>\n\nc<|im_end|>"), (False, "c<|im_end|>")]
)
def test_qwen3_empty_think_block_belongs_to_the_prompt_only_without_thinking(
    style_model, thinking, supervised
):
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    r = ChatRenderer.for_model(style_model("qwen3"), template_kwargs=kwargs)
    got = runs(r, r.tokenize(normalise(msgs(("user", "q"), ("assistant", "c")))))
    assert [t for t, k in got if k] == [supervised]


def test_base_model_raw_text_gets_bos_and_eos(style_model):
    r = ChatRenderer.for_model(style_model("base"))
    assert r.raw_prefix == [r.tok.bos_token_id]
    sample = r.tokenize(normalise({"prompt": "2+2=", "completion": " 4"}))
    assert runs(r, sample) == [("<|begin_of_text|>2+2=", False), (" 4<|endoftext|>", True)]
    with pytest.raises(SpecError, match="no chat template") as e:
        r.tokenize(normalise(msgs(("user", "q"), ("assistant", "a"))))
    assert not isinstance(e.value, BadRow)  # a setup problem: fatal, not a skippable row


def test_chat_models_render_prompt_completion_as_a_chat(demo_model):
    r = ChatRenderer.for_model(demo_model)
    got = runs(r, r.tokenize(normalise({"prompt": "2+2=", "completion": "4"})))
    assert [t for t, k in got if k] == ["4<|im_end|>"]


def test_rendering_is_deterministic_and_rows_without_assistant_have_an_empty_mask(demo_model):
    row = normalise(msgs(("user", "Hi"), ("assistant", "Hello"), ("user", "More")))
    a = ChatRenderer.for_model(demo_model).tokenize(row)
    b = ChatRenderer.for_model(demo_model).tokenize(row)
    assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.loss_mask, b.loss_mask)
    none = ChatRenderer.for_model(demo_model).tokenize(normalise(msgs(("user", "Hi"))))
    assert len(none.token_ids) > 0 and not none.loss_mask.any()
