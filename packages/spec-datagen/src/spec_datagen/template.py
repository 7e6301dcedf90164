"""Conversation -> token ids + assistant-only loss mask, with the target's own chat template.

Mask rules (token-exact, for every assistant turn of a multi-turn conversation):
- The whole conversation is rendered once (F) and tokenized once, without adding special tokens (the
  template writes BOS and friends itself); those are the sample's ids.
- Assistant turn i covers the characters from the end of its role header to the end of its last
  end-of-turn token (the target's EOS ids: generation_config.json, config.json and the tokenizer),
  taken from A_i = render(messages[:i+1]): the header ends where A_i stops agreeing with
  render(messages[:i], add_generation_prompt=True), i.e. what the model is prompted with. Text after the
  end-of-turn token (ChatML's trailing newline) is the template's, not the model's, and stays unmasked.
- A token is supervised when its character span overlaps an assistant span.
- Some templates rewrite earlier turns once later ones are added (Qwen3 drops the <think> block of
  assistant turns before the last user message). Such a turn is detected (A_i is not a prefix of F) and,
  by default, left out of the mask (`rewritten="unmask"`, counted per sample): its tokens in F are not
  what the target generated at that point. `rewritten="error"` refuses the row instead.
- Base models without a chat template: `prompt`/`completion` rows become the tokenizer's own special
  prefix (e.g. BOS) + prompt + completion + EOS, with the mask on the completion and EOS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from spec_datagen.conversations import BadRow, Conversation, message_dicts
from spec_format.errors import SpecError

REWRITE_POLICIES = ("unmask", "error")
NO_TEMPLATE = (
    "the target's tokenizer has no chat template: give prompt/completion rows (rendered as raw text) or pass "
    "a template with --chat-template FILE"
)


class TokenizedSample(msgspec.Struct):
    """token_ids int32 [T] and loss_mask bool [T] of one conversation; source_index is its row in the
    full input stream, source its FILE:LINE."""

    source_index: int
    token_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""
    unsupervised_turns: int = 0  # assistant turns left out of the mask because the template rewrites them


def load_tokenizer(model: str | os.PathLike, chat_template: str | None = None):
    """The target's tokenizer (never remote code); `chat_template` (Jinja text) replaces the model's own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), trust_remote_code=False)
    if chat_template is not None:
        tok.chat_template = chat_template
    if not getattr(tok, "is_fast", False):
        raise SpecError(
            f"{model}: the tokenizer has no fast (Rust) version; loss masks need its character offsets"
        )
    return tok


def end_of_turn_ids(model: str | os.PathLike, tok) -> list[int]:
    """Token ids that end a turn: every EOS id the model's configs and tokenizer name."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return sorted(set(ids))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatRenderer:
    """Turns Conversations into (token ids, loss mask) for one target tokenizer; deterministic."""

    def __init__(
        self,
        tokenizer,
        end_of_turn: list[int],
        *,
        template_kwargs: dict[str, Any] | None = None,
        rewritten: str = "unmask",
    ):
        if rewritten not in REWRITE_POLICIES:
            raise SpecError(f"rewritten={rewritten!r}: choose one of {REWRITE_POLICIES}")
        self.tok = tokenizer
        self.end_ids = list(end_of_turn)
        self.end_strings = [s for s in tokenizer.convert_ids_to_tokens(self.end_ids) if s]
        self.template_kwargs = dict(template_kwargs or {})
        self.rewritten = rewritten
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        # The tokenizer's own special prefix for raw text (e.g. [BOS]); found from a probe string.
        probe = "a b"
        bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        k = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
        self.raw_prefix = full[:k]

    @classmethod
    def for_model(cls, model: str | os.PathLike, chat_template: str | None = None, **kwargs) -> ChatRenderer:
        tok = load_tokenizer(model, chat_template)
        return cls(tok, end_of_turn_ids(model, tok), **kwargs)

    def tokenize(self, conv: Conversation, source_index: int = 0) -> TokenizedSample:
        """Raises BadRow (naming conv.source) when the row cannot be rendered."""
        if conv.raw_text and not self.has_template:
            ids, mask, unsupervised = self._raw(conv)
        else:
            if not self.has_template:
                raise SpecError(NO_TEMPLATE)
            ids, mask, unsupervised = self._chat(conv)
        return TokenizedSample(
            source_index=source_index,
            token_ids=np.asarray(ids, dtype=np.int32),
            loss_mask=mask,
            source=conv.source,
            unsupervised_turns=unsupervised,
        )

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """The token ids that prompt the target for the next assistant turn after all of conv.messages: the
        template with its generation prompt (as vLLM's chat renders it), or, for a base model, the special
        prefix + the prompt text. Raises BadRow when the template fails."""
        if conv.raw_text and not self.has_template:
            prompt = conv.messages[0].content or ""
            return self.raw_prefix + self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not self.has_template:
            raise SpecError(NO_TEMPLATE)
        text = self._render(conv, len(conv.messages), True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def render(self, conv: Conversation, upto: int | None = None, generation_prompt: bool = False) -> str:
        """The template's text for conv.messages[:upto] (all by default). Raises BadRow when it fails."""
        return self._render(conv, len(conv.messages) if upto is None else upto, generation_prompt)

    def _render(self, conv: Conversation, upto: int, generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(
                message_dicts(conv.messages[:upto]),
                tools=conv.tools,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **self.template_kwargs,
            )
        except Exception as e:  # jinja raises its own types, and templates call raise_exception()
            raise BadRow(f"{conv.source}: the chat template failed: {e}") from None

    def _chat(self, conv: Conversation) -> tuple[list[int], np.ndarray, int]:
        full = self._render(conv, len(conv.messages), False)
        spans: list[tuple[int, int]] = []
        unsupervised = 0
        for i, m in enumerate(conv.messages):
            if m.role != "assistant":
                continue
            upto = self._render(conv, i + 1, False)
            if not full.startswith(upto):
                if self.rewritten == "error":
                    raise BadRow(
                        f"{conv.source}: the chat template renders assistant turn {i} differently once later "
                        "turns follow (e.g. Qwen3 drops earlier <think> blocks), so its tokens are not what the "
                        "target generated; use rewritten='unmask' to leave such turns out of the loss mask"
                    )
                unsupervised += 1
                continue
            prompt = self._render(conv, i, True)
            start = _common_prefix(upto, prompt)
            turn = upto[start:]
            # End after the last end-of-turn token of the turn; without one, after its last non-space.
            ends = [turn.rfind(s) + len(s) for s in self.end_strings if s in turn]
            end = start + (max(ends) if ends else len(turn.rstrip()))
            if end > start:
                spans.append((start, end))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=np.bool_)
        for s, e in spans:
            mask |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
        return ids, mask, unsupervised

    def _raw(self, conv: Conversation) -> tuple[list[int], np.ndarray, int]:
        """Base models: special prefix + prompt + completion + EOS, mask on completion and EOS."""
        prompt = conv.messages[0].content or ""
        completion = "".join(m.content or "" for m in conv.messages[1:])
        head = self.raw_prefix + self.tok(prompt, add_special_tokens=False)["input_ids"]
        tail = self.tok(completion, add_special_tokens=False)["input_ids"] if completion else []
        if tail and self.tok.eos_token_id is not None:
            tail.append(self.tok.eos_token_id)
        mask = np.zeros(len(head) + len(tail), dtype=np.bool_)
        mask[len(head) :] = True
        return head + tail, mask, 0
