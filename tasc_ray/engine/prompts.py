"""Prompts as token ids: text as is, chat messages through the chat template, token ids checked against the
vocabulary; a prompt the engine cannot decode (empty, too long for the context) is refused with PromptError.

One implementation for every caller: the generator, the label stage and the Serve replicas (which run it on
their request-side tokenizer, off the decode thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from transformers import PreTrainedTokenizerBase

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


class PromptError(ValueError):
    """A prompt the engine cannot decode (empty, token ids outside the vocabulary, too long for the context)."""

    code = "invalid_value"  # OpenAI's error code for it


class PromptTooLongError(PromptError):
    """A prompt that leaves no room for one new token in the model's context window."""

    code = "context_length_exceeded"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, max_context: int) -> list[int]:
    """Token ids of a prompt, checked with check_prompt."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif len(prompt) and isinstance(prompt[0], dict):
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("this model has no chat template; send a plain-text prompt")
        out = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    else:
        ids = [int(t) for t in cast(Sequence[int], prompt)]
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in ids):
            raise PromptError(f"token ids must lie in [0, {vocab})")
    check_prompt(ids, max_context)
    return ids


def check_prompt(ids: Sequence[int], max_context: int) -> None:
    """Refuse an empty prompt and one that leaves no room for a new token in the model's context."""
    if not ids:
        raise PromptError("the prompt is empty")
    if len(ids) >= max_context:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the model's context holds {max_context}")
