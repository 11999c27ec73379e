"""AcceptanceCalibration: what the drafter's raw path probabilities are worth, learned from verification.

The drafter scores a draft prefix by a product of n-gram frequencies, one factor per token. A factor is not the
chance the target accepts that token once the tokens before it were accepted: it is overconfident on free text
(many continuations are plausible, the model picks another) and may be underconfident on templated output. The
calibration bins the per-token factors and counts, per bin, how often a token reached by verification (every
token before it accepted) was accepted itself; a calibrated factor is the bin's accepted share, pulled toward the
raw factor while the bin has little evidence, and a prefix's calibrated probability is the product of its
calibrated factors. Draft lengths are chosen on those (`best_draft_length`), so a task whose drafts fail stops
drafting and decodes plainly.
"""

from __future__ import annotations

from collections.abc import Sequence


class AcceptanceCalibration:
    """Raw per-token factor -> measured chance the token is accepted given its prefix was, by bins on [0, 1]."""

    def __init__(self, bins: int = 10, prior: float = 8.0) -> None:
        """`prior`: how many observations a bin needs before its measured share outweighs the raw score."""
        self.bins, self.prior = bins, prior
        self.trials = [0] * bins
        self.accepted = [0] * bins

    def _bin(self, p: float) -> int:
        return min(self.bins - 1, max(0, int(p * self.bins)))

    def __call__(self, p: float) -> float:
        b = self._bin(p)
        return (self.accepted[b] + self.prior * p) / (self.trials[b] + self.prior)

    def path(self, raw_path: Sequence[float]) -> list[float]:
        """Calibrated probabilities that each prefix of a draft is accepted, from its raw path probabilities."""
        out: list[float] = []
        for factor in _factors(raw_path):
            out.append(self(factor) * (out[-1] if out else 1.0))
        return out

    def observe(self, raw_path: Sequence[float], accepted: int) -> None:
        """One verified draft with raw path probabilities `raw_path`, of which `accepted` tokens were taken: token j
        was tried iff every token before it was accepted (j <= accepted), and taken iff j < accepted."""
        for j, factor in enumerate(_factors(raw_path)[: accepted + 1]):
            b = self._bin(factor)
            self.trials[b] += 1
            self.accepted[b] += j < accepted

    def table(self) -> list[dict[str, float]]:
        """Per bin: its raw range, trials and measured share (for logs and /health)."""
        return [
            {
                "raw_from": b / self.bins,
                "trials": self.trials[b],
                "accepted_share": self.accepted[b] / self.trials[b] if self.trials[b] else float("nan"),
            }
            for b in range(self.bins)
        ]


def _factors(raw_path: Sequence[float]) -> list[float]:
    """Per-token factors of a path: raw_path[j] / raw_path[j - 1]."""
    return [p / prev if prev > 0 else 0.0 for p, prev in zip(raw_path, [1.0, *raw_path])]
