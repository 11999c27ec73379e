"""How many draft tokens to verify: the expected tokens per second of a pass, from the measured cost of passes.

`StepCostModel` learns what a verification pass costs from the engine's own timings; `best_draft_length` cuts a
batch's drafts to the length that maximises expected tokens emitted per second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

StepCost = Callable[[int], float]  # estimated seconds of one verification pass over n query tokens (whole batch)


class StepCostModel:
    """Seconds of one verification pass as a function of its query tokens n (all rows): cost(n) = a + b * n.

    Fitted online by least squares over the latest passes. Until the observed n vary enough to fit a slope,
    the slope comes from a prior: `prior_tokens` extra query tokens double a pass's cost (on 2 CPU cores a
    pass over 8 new tokens costs ~1.4x one token; a GPU has far more room, which the fit then finds).
    """

    def __init__(self, prior_tokens: float = 20.0, window: int = 128) -> None:
        self.prior_tokens, self.window = prior_tokens, window
        self.obs: list[tuple[int, float]] = []
        self.a, self.b = 1.0, 1.0 / prior_tokens

    def observe(self, n_tokens: int, seconds: float) -> None:
        self.obs.append((n_tokens, seconds))
        if len(self.obs) > self.window:
            del self.obs[0]
        n = np.array([o[0] for o in self.obs], dtype=float)
        s = np.array([o[1] for o in self.obs], dtype=float)
        if len(self.obs) >= 8 and n.std() > 0.25 * n.mean():
            b, a = np.polyfit(n, s, 1)
            if a > 0 and b >= 0:
                self.a, self.b = a, b
                return
        self.a = float(s.mean() / (1 + n.mean() / self.prior_tokens))
        self.b = self.a / self.prior_tokens

    def __call__(self, n_tokens: int) -> float:
        return self.a + self.b * n_tokens


def best_draft_length(path_probs: Sequence[Sequence[float]], step_cost: StepCost) -> int:
    """The common draft length K maximising expected tokens per second of one batched pass.

    A pass over B rows with drafts cut to K costs step_cost(B * (K + 1)) (every row is padded to K + 1 query
    tokens) and yields, in expectation, sum_i (1 + sum_{j < K} q_ij) tokens, q_ij being the estimated
    probability that row i's first j + 1 draft tokens are all accepted.
    """
    batch = len(path_probs)
    expected = float(batch)  # each pass emits at least the target's own token per row
    best_k, best_rate = 0, expected / step_cost(batch)
    for k in range(1, max(len(p) for p in path_probs) + 1):
        expected += sum(p[k - 1] for p in path_probs if len(p) >= k)
        rate = expected / step_cost(batch * (k + 1))
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
