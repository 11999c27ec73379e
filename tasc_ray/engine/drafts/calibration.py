"""AcceptanceCalibration: the chance a draft token is accepted, learned from the engine's own verification passes.

A draft token comes from one source (the row's own context, the corpus index, or the live overlay of finished
outputs) with a raw score: the share of the matched occurrences that continue with it. A raw share is not the
chance the target accepts the token once the tokens before it were accepted: a one-occurrence 30-token match says
1.0 and is usually right, a one-token match that says 1.0 on free text usually is not, and the same share means
more deep in a draft that has held so far. So the calibration counts, per (source, match length, draft depth) and
raw-score bin, how often a token that verification reached (every token before it accepted) was accepted itself.
A calibrated probability is that share, pulled toward the raw score's bin across all keys while the key has little
evidence, and that bin's share in turn toward the raw score: two levels of smoothing, so a new task starts from the
raw scores and moves to measured ones within a few dozen passes. The drafter picks continuations and cuts drafts on
these probabilities (drafter.py, draft_length.py), so a task whose drafts fail stops drafting and decodes plainly.
"""

from __future__ import annotations

from collections.abc import Sequence

Key = tuple[str, int, int]  # (source, match-length bucket, depth bucket)

_LENGTH_BUCKETS = (1, 2, 3, 4, 6, 9, 17, 33)  # bucket b holds match lengths from _LENGTH_BUCKETS[b]
_DEPTH_BUCKETS = (0, 1, 2, 3, 5, 9)


def _bucket(value: int, starts: Sequence[int]) -> int:
    b = 0
    while b + 1 < len(starts) and value >= starts[b + 1]:
        b += 1
    return b


def calibration_key(source: str, match_length: int, depth: int) -> Key:
    """The key a draft token is calibrated under: its source, its match length and depth, both bucketed."""
    return source, _bucket(match_length, _LENGTH_BUCKETS), _bucket(depth, _DEPTH_BUCKETS)


class AcceptanceCalibration:
    """(key, raw-score bin) -> measured share of reached draft tokens that were accepted."""

    def __init__(self, bins: int = 10, prior: float = 8.0) -> None:
        """`prior`: how many observations a cell needs before its measured share outweighs what it backs off to."""
        self.bins, self.prior = bins, prior
        self.by_bin = [[0, 0] for _ in range(bins)]  # [trials, accepted] per raw-score bin, all keys
        self.by_key: dict[tuple[Key, int], list[int]] = {}

    def _bin(self, p: float) -> int:
        return min(self.bins - 1, max(0, int(p * self.bins)))

    def __call__(self, p: float, key: Key | None = None) -> float:
        """Calibrated chance that a reached draft token with raw score p (and key) is accepted."""
        b = self._bin(p)
        trials, accepted = self.by_bin[b]
        share = (accepted + self.prior * p) / (trials + self.prior)
        if key is None:
            return share
        trials, accepted = self.by_key.get((key, b), (0, 0))
        return (accepted + self.prior * share) / (trials + self.prior)

    def observe(
        self, shares: Sequence[float], keys: Sequence[Key], parents: Sequence[int], accepted: Sequence[int]
    ) -> None:
        """One verified draft tree: node j (raw share shares[j], parent parents[j], -1 for the root) was reached
        iff its parent was accepted, and taken iff it is on the accepted path (`accepted`, node indices). A chain
        is the tree whose node j has parent j - 1."""
        taken = set(accepted)
        for j, (p, parent) in enumerate(zip(shares, parents)):
            if parent != -1 and parent not in taken:
                continue
            b, hit = self._bin(p), int(j in taken)
            self.by_bin[b][0] += 1
            self.by_bin[b][1] += hit
            cell = self.by_key.setdefault((keys[j], b), [0, 0])
            cell[0] += 1
            cell[1] += hit
