"""LiveNgrams: the n-grams of the engine's own recent outputs, an in-memory overlay of the corpus index.

Every finished output is counted as soon as it finishes, so a replica or a label actor with no corpus index warms
up on its task within a few hundred outputs and keeps up with drift (Suffix Decoding's cached responses, llama.cpp's
dynamic n-gram cache). The overlay is bounded: past `capacity` outputs the oldest one's counts are taken out again.
Lookups answer like `NgramIndex.longest_matches` (and, for matches of any length, like the corpus's TokenStore), so
the drafter treats the overlay as one more source; `outputs()`
returns what it holds, to be written out as the corpus of the next index build.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from tasc_ray.engine.drafts.index import Match
from tasc_ray.engine.drafts.suffix import TokenStore


class LiveNgrams:
    """Counts of (last m tokens) -> next token over the last `capacity` outputs, for m = 1 .. max_order - 1."""

    def __init__(self, max_order: int = 4, capacity: int = 1000, top_k: int = 8) -> None:
        """The outputs are also kept in a TokenStore, for suffix matches of any length."""
        if max_order < 2 or capacity < 1:
            raise ValueError(f"LiveNgrams needs max_order >= 2 and capacity >= 1, got {max_order}, {capacity}")
        self.max_order, self.capacity, self.top_k = max_order, capacity, top_k
        self.table: dict[tuple[int, ...], dict[int, int]] = {}
        self.store = TokenStore(capacity)
        self._outputs: deque[tuple[int, ...]] = deque()

    def __len__(self) -> int:
        return len(self._outputs)

    def add(self, tokens: Sequence[int]) -> None:
        """Count one finished output; evict the oldest past capacity."""
        output = tuple(int(t) for t in tokens)
        if len(output) < 2:
            return
        self._count(output, +1)
        self._outputs.append(output)
        self.store.append(output, new_sequence=True)
        while len(self._outputs) > self.capacity:
            self._count(self._outputs.popleft(), -1)

    def outputs(self) -> list[list[int]]:
        """The outputs the overlay holds, oldest first."""
        return [list(o) for o in self._outputs]

    def longest_matches(self, histories: Sequence[Sequence[int]]) -> list[Match | None]:
        """For each history, the continuations of its longest suffix (<= max_order - 1 tokens) seen in the overlay:
        the top_k next tokens with count / context total."""
        return [self._longest(h) for h in histories]

    def _longest(self, history: Sequence[int]) -> Match | None:
        found = longest_suffix(self.table, history, self.max_order)
        if found is None:
            return None
        m, nexts = found
        top = sorted(nexts.items(), key=lambda kv: -kv[1])[: self.top_k]
        total = sum(nexts.values())
        return Match(m, np.array([t for t, _ in top], dtype=np.int64), np.array([c / total for _, c in top]))

    def _count(self, output: tuple[int, ...], delta: int) -> None:
        for i in range(1, len(output)):
            for m in range(1, min(self.max_order - 1, i) + 1):
                key = output[i - m : i]
                nexts = self.table.setdefault(key, {})
                count = nexts.get(output[i], 0) + delta
                if count > 0:
                    nexts[output[i]] = count
                else:
                    nexts.pop(output[i], None)
                    if not nexts:
                        del self.table[key]


def longest_suffix(
    table: dict[tuple[int, ...], dict[int, int]], history: Sequence[int], max_order: int
) -> tuple[int, dict[int, int]] | None:
    """(m, continuation counts) of the longest suffix of `history`, at most max_order - 1 tokens, in `table`."""
    for m in range(min(max_order - 1, len(history)), 0, -1):
        nexts = table.get(tuple(history[len(history) - m :]))
        if nexts:
            return m, nexts
    return None
