"""PromptGrounding: rank the corpus's draft continuations by how much of each token's text the row's prompt holds.

Extraction and slot filling copy values from the input into a templated output. The corpus index and the live
overlay only know outputs, so where the template branches on a value (`food[English],` or `food[Italian],`, a
column name, a number) their top continuation is the corpus's most frequent value, not this row's. Prompt lookup
sees the row's input, but only as token ids: once TASC-ft merges `food[English],` into one token, the prompt's
" English" no longer matches it. Grounding compares text instead: a token's pieces (lower-cased runs of 3+ letters,
and numbers) found in the prompt's text make the token more likely, and pieces the prompt lacks make it less.

A source's candidate with raw share s and a share f of its pieces in the prompt gets weight s * (0.1 + f)^2 (a
token without pieces counts as f = 1/2), renormalised over that source's candidates so their total share is kept.
Only pieces the task copies count: each finished row tells, per piece of its output, whether its prompt held it,
and a piece that at least 4 outputs held but fewer than half of their prompts did (a template's own words, such as
`FIELD` in WikiSQL's SQL) is left out of f.

On the bundled model's own outputs at batch 1 (`python -m benchmarks drafters`,
benchmarks/results/drafters_sim.md) it raises tokens per pass with the CPU's draft cut from 6.18 to 6.38 on E2E
text -> MR, 2.19 to 2.32 on MR -> text and 3.53 to 3.56 on few-shot WikiSQL, whose prompt's examples hold the
template's words. In the engine it raised tokens per pass but showed no wall-time gain beyond this CPU's noise
(benchmarks/results/grounding/README.md): grounded drafts are verified longer. So it is opt-in
(`DrafterConfig.prompt_grounding`, `--prompt-grounding`). It only reorders drafts: verification decides every
token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

PIECE = re.compile(r"[a-z]{3,}|[0-9]+")
FLOOR = 0.1  # the weight floor: a token none of whose pieces are in the prompt keeps (0.1 / 1.1)^2 of its share
NO_PIECES = 0.5  # f for a token with no pieces (punctuation, short words): neither for nor against
MIN_SEEN = 4  # outputs a piece must occur in before its copy share decides whether it counts
COPIED = 0.5  # a piece counts where at least this share of the outputs holding it had it in their prompt


class Scored(Protocol):
    token: int
    share: float


T = TypeVar("T", bound=Scored)


class PromptGrounding:
    """Token pieces (cached per token id), a row's prompt text, and per piece how often finished rows copied it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[int, tuple[str, ...]] = {}
        self._copies: dict[str, list[int]] = {}  # piece -> [outputs holding it, of which their prompt held it too]

    def prompt_text(self, prompt_ids: Sequence[int]) -> str:
        """The lower-cased text the pieces are looked up in."""
        return str(self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)).lower()

    def pieces(self, token: int) -> tuple[str, ...]:
        found = self._pieces.get(token)
        if found is None:
            found = self._pieces[token] = tuple(PIECE.findall(str(self.tokenizer.decode([token])).lower()))
        return found

    def copied(self, piece: str) -> bool:
        """Whether the task copies `piece` from its prompts (yes until MIN_SEEN outputs have held it)."""
        seen, copied = self._copies.get(piece, (0, 0))
        return seen < MIN_SEEN or copied >= COPIED * seen

    def learn(self, output: Sequence[int], text: str) -> None:
        """A finished row's output tokens and its prompt text: which of the output's pieces the prompt held."""
        for piece in {p for token in output for p in self.pieces(token)}:
            cell = self._copies.setdefault(piece, [0, 0])
            cell[0] += 1
            cell[1] += piece in text

    def weight(self, token: int, text: str) -> float:
        """(FLOOR + f)^2, f the share of the token's copied pieces found in `text`."""
        pieces = [p for p in self.pieces(token) if self.copied(p)]
        f = sum(p in text for p in pieces) / len(pieces) if pieces else NO_PIECES
        return (FLOOR + f) ** 2

    def rerank(self, candidates: list[T], text: str, cache: dict[int, float]) -> list[T]:
        """One source's candidates with their shares reweighted (same total), most probable first; `cache` holds
        the row's token weights."""
        weights = []
        for c in candidates:
            w = cache.get(c.token)
            if w is None:
                w = cache[c.token] = self.weight(c.token, text)
            weights.append(c.share * w)
        total, weighted = sum(c.share for c in candidates), sum(weights)
        if weighted <= 0:
            return candidates
        for c, w in zip(candidates, weights):
            c.share = w * total / weighted
        return sorted(candidates, key=lambda c: -c.share)
