"""Where a row's output ends: EOS, a stop string (found in the decoded text), or its token budget."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from transformers import PreTrainedTokenizerBase


def cut_at_eos(tokens: list[int], eos_ids: Collection[int]) -> tuple[list[int], bool]:
    """The tokens up to and including the first EOS, and whether one was found."""
    for j, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: j + 1], True
    return tokens, False


def find_stop(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], stops: Sequence[str], start: int = 0
) -> tuple[int, int] | None:
    """(tokens up to the one completing the first stop string, where that string starts in the text), or None.

    Only cuts ending after token `start` are looked for (the earlier tokens were checked before)."""
    for end in range(start + 1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return end, min(hits)
    return None
