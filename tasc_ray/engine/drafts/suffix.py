"""Suffix matches of any length: the longest suffix of a row's history that occurs in a store of token sequences.

The n-gram tables (index.py, the row's context table, live.py) answer matches of 1..3 tokens with precomputed
counts. Long repeats (a FROM clause copied from the schema, a sentence the model repeats, a templated answer seen
before) need matches of any length, as Suffix Decoding's suffix trees give. `TokenStore` gets them without a tree:
it keeps the sequences concatenated (separated by -1) with the end positions of every `ANCHOR`-token window, finds
the occurrences of the history's last ANCHOR tokens, and extends them backwards (one vectorised comparison per
extra token) while any still agrees with the history. What follows the surviving occurrences is the continuation
distribution of the longest match; `SuffixMatch.advance` walks it forward as a draft grows, like descending a
suffix tree, so a draft costs one lookup per row and pass, not one per token.

Two kinds of store: `TokenStore` grows (a row's prompt and output, the live overlay of finished outputs) and may
drop its oldest sequences; `TokenStore.frozen(sequences)` is the corpus's, its anchor positions sorted once
(`np.searchsorted` per lookup) and saved with the index (index.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasc_ray.engine.drafts.index_format import hash_windows

ANCHOR = 4  # matches of at least this many tokens come from a TokenStore; shorter ones from the n-gram tables
MAX_MATCH = 64  # longest match measured (as Suffix Decoding's max depth): longer ones are all "very long"
MAX_OCCURRENCES = 1024  # occurrences of a common anchor extended (the latest ones): bounds a lookup's cost
_END = -1  # separates sequences; no token equals it


def _anchor_key(tokens: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    return tuple(int(t) for t in tokens)


@dataclass
class SuffixMatch:
    """A match of the history's last `length` tokens at `ends` (the positions of their last token) in `store`."""

    store: TokenStore
    length: int
    ends: np.ndarray  # int64, end positions of the matched occurrences that have a known continuation

    def continuations(self, top_k: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """The top_k next tokens after the occurrences and their shares of all occurrences (an occurrence that
        ends its sequence counts, drafting nothing)."""
        nxt = self.store.tokens[self.ends + 1]
        tokens, counts = np.unique(nxt[nxt != _END], return_counts=True)
        order = np.lexsort((tokens, -counts))[:top_k]
        return tokens[order].astype(np.int64), counts[order] / len(nxt)

    def advance(self, token: int) -> SuffixMatch | None:
        """The match after appending `token` to the history (one token longer), or None where no occurrence
        continues with it."""
        store = self.store
        ends = self.ends[store.tokens[self.ends + 1] == token] + 1
        ends = ends[ends + 1 < store.size]  # each must still have a continuation in the store
        return SuffixMatch(store, self.length + 1, ends) if len(ends) else None


class TokenStore:
    """Token sequences, concatenated with separators, and where every ANCHOR-token window of them ends."""

    def __init__(self, capacity: int | None = None) -> None:
        """`capacity`: the most sequences kept (oldest dropped first); None keeps all."""
        self.capacity = capacity
        self._tokens = np.full(256, _END, dtype=np.int64)
        self._size = 0
        self._anchors: dict[tuple[int, ...], deque[int]] = {}
        self._spans: deque[tuple[int, int]] = deque()  # (start, end) of each sequence, for eviction
        self._frozen: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # sorted keys, offsets, ends

    # ----- building -----
    @classmethod
    def frozen(cls, sequences: Sequence[Sequence[int] | np.ndarray]) -> TokenStore:
        """A read-only store of `sequences` with its anchor positions sorted once (the corpus's)."""
        store = cls()
        parts = [np.append(np.asarray(s, dtype=np.int64), _END) for s in sequences if len(s)]
        tokens = np.concatenate([[_END], *parts]) if parts else np.full(1, _END, dtype=np.int64)
        store._tokens, store._size = tokens, len(tokens)
        store._freeze()
        return store

    @classmethod
    def from_tokens(cls, tokens: np.ndarray) -> TokenStore:
        """A frozen store from its token array (as `tokens` returns it, e.g. read back from an index)."""
        store = cls()
        store._tokens, store._size = np.asarray(tokens, dtype=np.int64), len(tokens)
        store._freeze()
        return store

    def _freeze(self) -> None:
        windows = np.lib.stride_tricks.sliding_window_view(self._tokens, ANCHOR)
        ends = np.flatnonzero((windows != _END).all(axis=1)) + ANCHOR - 1
        keys = hash_windows(windows[ends - ANCHOR + 1])
        order = np.argsort(keys, kind="stable")  # stable: each key's ends stay in position order
        keys, ends = keys[order], ends[order]
        unique, first = np.unique(keys, return_index=True)
        self._frozen = (unique, np.r_[first, len(keys)].astype(np.int64), ends.astype(np.int64))

    def append(self, tokens: Sequence[int], new_sequence: bool = False) -> None:
        """Add tokens to the last sequence (or start a new one); a full store drops its oldest sequence."""
        if self._frozen is not None:
            raise TypeError("a frozen TokenStore is read-only")
        if new_sequence or not self._spans:
            if self._spans:
                self._push(_END)
            self._spans.append((self._size, self._size))
            if self.capacity is not None and len(self._spans) > self.capacity:
                self._evict()
        for tok in tokens:
            self._push(int(tok))
            if self._size - self._spans[-1][0] >= ANCHOR:
                key = _anchor_key(self._tokens[self._size - ANCHOR : self._size])
                self._anchors.setdefault(key, deque()).append(self._size - 1)
        start, _ = self._spans[-1]
        self._spans[-1] = (start, self._size)

    def _push(self, tok: int) -> None:
        if self._size == len(self._tokens):
            self._tokens = np.concatenate([self._tokens, np.full(len(self._tokens), _END, dtype=np.int64)])
        self._tokens[self._size] = tok
        self._size += 1

    def _evict(self) -> None:
        """Forget the oldest sequence's anchors (its tokens stay in the array as dead space until a rebuild)."""
        start, end = self._spans.popleft()
        for e in range(start + ANCHOR - 1, end):
            key = _anchor_key(self._tokens[e - ANCHOR + 1 : e + 1])
            ends = self._anchors[key]
            ends.popleft()  # anchors are appended in position order: the oldest is first
            if not ends:
                del self._anchors[key]
        if self._spans and self._spans[0][0] > self._size // 2:  # mostly dead space: rebuild from what is kept
            kept = [self._tokens[s:e].copy() for s, e in self._spans]
            self._tokens, self._size = np.full(len(self._tokens), _END, dtype=np.int64), 0
            self._anchors, self._spans = {}, deque()
            for seq in kept:
                self.append(seq.tolist(), new_sequence=True)

    # ----- reading -----
    @property
    def size(self) -> int:
        return self._size

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens

    @property
    def nbytes(self) -> int:
        """Memory of the token array and, when frozen, the anchor positions (a grown store's dict not counted)."""
        return self._tokens.nbytes + (sum(a.nbytes for a in self._frozen) if self._frozen is not None else 0)

    def __len__(self) -> int:
        """Sequences held."""
        return len(self._spans) if self._frozen is None else int((self._tokens[1:] == _END).sum())

    def sequences(self) -> list[list[int]]:
        """The sequences held, oldest first."""
        if self._frozen is None:
            return [self._tokens[s:e].tolist() for s, e in self._spans]
        cuts = np.flatnonzero(self._tokens == _END)
        return [self._tokens[a + 1 : b].tolist() for a, b in zip(cuts[:-1], cuts[1:])]

    def _anchor_ends(self, anchor: Sequence[int]) -> np.ndarray:
        if self._frozen is None:
            found = self._anchors.get(_anchor_key(anchor))
            return np.fromiter(found, dtype=np.int64, count=len(found)) if found else np.zeros(0, np.int64)
        keys, offsets, ends = self._frozen
        key = hash_windows(np.asarray([anchor], dtype=np.int64))[0]
        i = int(np.searchsorted(keys, key))
        if i == len(keys) or keys[i] != key:
            return np.zeros(0, np.int64)
        return ends[offsets[i] : offsets[i + 1]]  # 64-bit hashes: a collision is as unlikely as in the n-gram tables

    def longest_match(self, history: Sequence[int], max_match: int = MAX_MATCH) -> SuffixMatch | None:
        """The longest suffix of `history` (at least ANCHOR tokens, measured up to max_match) that occurs in the
        store with a known continuation, or None."""
        n = len(history)
        if n < ANCHOR or self._size <= ANCHOR:
            return None
        ends = self._anchor_ends(history[n - ANCHOR :])[-MAX_OCCURRENCES:]  # the latest, where the anchor is common
        ends = ends[ends + 1 < self._size]
        if len(ends) == 0:
            return None
        tail = np.asarray(history[max(0, n - max_match) :], dtype=np.int64)[::-1]  # tail[j] = history[-1 - j]
        length, tokens = ANCHOR, self._tokens
        while length < len(tail) and len(ends) > 1:
            before = ends - length
            ok = (before >= 0) & (tokens[np.maximum(before, 0)] == tail[length])
            if not ok.any():
                break
            ends, length = ends[ok], length + 1
        if len(ends) == 1 and length < len(tail):  # one occurrence left: its whole agreement in one comparison
            e = int(ends[0])
            span = min(len(tail), e + 1)
            agree = tokens[e - span + 1 : e + 1][::-1] == tail[:span]
            length = span if agree.all() else int(np.argmin(agree))
        return SuffixMatch(self, length, ends)
