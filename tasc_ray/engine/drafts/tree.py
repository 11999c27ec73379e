"""DraftTree: the one shape a draft takes. A chain is the tree whose node j has parent j - 1.

Node j is `tokens[j]`, the child of node `parents[j]` (-1: of the row's pending token). Parents come before their
children and a drafter adds nodes in falling estimated probability of acceptance (`scores`, the probability that
the path to the node is accepted), so any prefix of the nodes is a tree: cutting a draft to what a pass can afford
is `prefix(n)`. `shares` and `keys` are the drafter's evidence for each node (the raw share of its source's match
and its calibration key), kept with the tree so that the drafter learns from the verdict without remembering what
it proposed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)

    @classmethod
    def chain(cls, tokens: Sequence[int], scores: Sequence[float] = ()) -> DraftTree:
        """A chain of draft tokens (scores optional: a tree without scores is never cut)."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), list(scores))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == j - 1 for j, p in enumerate(self.parents))

    def depth(self, j: int) -> int:
        """1 for a child of the pending token."""
        d = 0
        while j != -1:
            j, d = self.parents[j], d + 1
        return d

    def path(self, j: int) -> list[int]:
        """The tokens from the first node after the pending token down to node j (inclusive); [] for j = -1."""
        out: list[int] = []
        while j != -1:
            out.append(self.tokens[j])
            j = self.parents[j]
        return out[::-1]

    def prefix(self, n: int) -> DraftTree:
        return DraftTree(self.tokens[:n], self.parents[:n], self.scores[:n], self.shares[:n], self.keys[:n])

    def accepted_path(self, target: Sequence[int]) -> list[int]:
        """The nodes verification accepts: from the pending token down, the child whose token is the target's own
        token at the current node (target[0] after the pending token, target[1 + j] after node j), while one is."""
        children: dict[tuple[int, int], int] = {}
        for j, (token, parent) in enumerate(zip(self.tokens, self.parents)):
            children.setdefault((parent, token), j)
        path: list[int] = []
        current = -1
        while (child := children.get((current, target[0 if current == -1 else 1 + current]))) is not None:
            path.append(child)
            current = child
        return path
