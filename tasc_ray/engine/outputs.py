"""Where a row's output ends and what the caller gets: EOS, stop strings (found in the decoded text), the token
budget, log-probabilities, streamed tokens, and the detokenised result."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence

from transformers import PreTrainedTokenizerBase

from tasc_ray.engine.request import GenerationResult, Request
from tasc_ray.engine.sampling import TokenLogprob

logger = logging.getLogger(__name__)


class OutputProcessor:
    """Appends verified tokens to rows and turns finished rows into results, with the model's tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Collection[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def emit(self, row: Request, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> list[int]:
        """Append newly decoded tokens (and their log-probabilities), cut at EOS, a stop string or the row's token
        budget, setting its finish reason; stream them to the row's callback. Returns the tokens kept."""
        eos_ids: Collection[int] = () if row.params.ignore_eos else self.eos_ids
        tokens, hit_eos = cut_at_eos(tokens[: row.max_new - len(row.generated)], eos_ids)
        if hit_eos:
            row.finish_reason = "stop"
        start = len(row.generated)
        row.generated.extend(tokens)
        stop = row.params.stop
        if stop and row.finish_reason is None:
            cut = find_stop(self.tokenizer, row.generated, stop, start)
            if cut is not None:  # cut after the token completing the stop string; remember where the text ends
                del row.generated[cut[0] :]
                row.finish_reason, row.stop_text_end = "stop", cut[1]
        emitted = row.generated[start:]
        if logprobs is not None:
            row.logprobs = (row.logprobs or []) + logprobs[: len(emitted)]
        if emitted:
            if row.stats.first_token_s is None:
                row.stats.first_token_s = time.perf_counter() - row.submitted_at
            if row.on_tokens is not None:
                try:
                    row.on_tokens(emitted)
                except Exception:  # the row's consumer is broken: the row leaves, the others go on
                    logger.exception("a row's token callback failed; cancelling the row")
                    row.cancel()
        if row.finish_reason is None and len(row.generated) >= row.max_new:
            row.finish_reason = "length"
        return emitted

    def result(self, row: Request) -> GenerationResult:
        """The finished row's text (cut where a stop string ended it) and its token ids, reason and statistics."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if row.stop_text_end is not None:
            text = text[: row.stop_text_end]
        reason = row.finish_reason or "length"
        return GenerationResult(text, row.generated, row.prompt_len, reason, row.stats, row.logprobs)


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
