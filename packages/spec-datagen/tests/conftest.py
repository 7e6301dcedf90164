"""Fixtures of spec-datagen's tests: tokenizers of several chat-template families, and the shared capture
engine on the real SmolLM2 target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# Chat templates of real model families as their tokenizer configs ship them: Llama-3 and Gemma-2 verbatim,
# Qwen3's with its thinking and tool-call logic.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


# Special tokens, end-of-turn tokens and template of each family, on top of the SmolLM2 tokenizer.
STYLES = {
    "llama3": dict(
        special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        plain=[],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        end_of_turn=["<|eot_id|>"],
        template=LLAMA3_TEMPLATE,
    ),
    "gemma": dict(
        special=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        plain=[],
        bos="<bos>",
        eos="<eos>",
        end_of_turn=["<eos>", "<end_of_turn>"],
        template=GEMMA_TEMPLATE,
    ),
    "qwen3": dict(
        special=[],
        plain=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        bos=None,
        eos="<|im_end|>",
        end_of_turn=["<|im_end|>", "<|endoftext|>"],
        template=QWEN3_TEMPLATE,
    ),
    # A base model: no chat template, and a tokenizer that adds BOS to raw text.
    "base": dict(
        special=["<|begin_of_text|>"],
        plain=[],
        bos="<|begin_of_text|>",
        eos="<|endoftext|>",
        end_of_turn=[],
        template=None,
    ),
}

# The capture engine shared by all capture tests: fixed key and kwargs. Chunked prefill is on with a
# small token budget, so prompts longer than 96 tokens are prefilled in several chunks, and batches mix
# lengths; the layers cover both ends of the id range and EAGLE-3's defaults for SmolLM2 (2, 15, 27, 30).
CAPTURE_LAYERS = [0, 1, 2, 15, 27, 29, 30]
CAPTURE_MAX_LEN = 512
CAPTURE_KEY = "datagen-capture-smollm2"


@pytest.fixture(scope="session")
def style_model(tmp_path_factory, demo_model):
    """style_model(name) -> a directory with a tokenizer (and generation_config.json) of that family."""
    from transformers import AutoTokenizer

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in built:
            return built[name]
        style = STYLES[name]
        tok = AutoTokenizer.from_pretrained(demo_model)
        tok.add_special_tokens({"additional_special_tokens": style["special"]})
        tok.add_tokens(style["plain"])
        if style["bos"]:
            tok.bos_token = style["bos"]
        tok.eos_token = style["eos"]
        tok.chat_template = style["template"]
        if name == "base":
            tok.add_bos_token = True
        out = tmp_path_factory.mktemp(f"tok-{name}")
        tok.save_pretrained(out)
        eos_ids = tok.convert_tokens_to_ids(style["end_of_turn"])
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
        built[name] = out
        return out

    return get


@pytest.fixture(scope="session")
def capture_storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("capture-files")


@pytest.fixture
def capture_llm(vllm_engine, demo_model, capture_storage):
    """The shared capture engine, asked for per test: vllm_engine keeps two engines alive, so one held for
    the session would be shut down under a later test once two others had started."""
    from spec_datagen.capture import capture_engine_kwargs

    kwargs = capture_engine_kwargs(
        CAPTURE_LAYERS,
        capture_storage,
        max_model_len=CAPTURE_MAX_LEN + 1,
        enable_chunked_prefill=True,
        max_num_batched_tokens=96,
    )
    return vllm_engine(CAPTURE_KEY, demo_model, **kwargs)


def _conversations(n: int, seed: int = 0) -> list[dict]:
    """n multi-turn chats (1-3 exchanges) of random lengths: 15-400 tokens with the SmolLM2 template."""
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "dogs",
        "ran",
        "past",
        "three",
        "red",
        "cars",
        "and",
        "one",
        "blue",
        "bus",
    ]
    rows = []
    for i in range(n):
        turns = []
        for _ in range(1 + i % 3):
            turns.append({"role": "user", "content": " ".join(rng.choice(words, rng.integers(3, 40)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(2, 60)))})
        rows.append({"messages": turns})
    return rows


@pytest.fixture(scope="session")
def make_conversations():
    """make_conversations(n, seed=0) -> n chat rows in the `messages` layout (deterministic)."""
    return _conversations
