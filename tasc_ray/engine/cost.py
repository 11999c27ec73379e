"""What a verification pass costs, and so how many draft nodes to verify: the expected tokens per second of a pass.

`StepCostTable` holds what a verification pass costs by (rows, query tokens per row), measured at start-up and
refined by the engine's own timings. Two ways to cut a batch's drafts so that the expected tokens emitted per
second is highest (zero, no draft, where nothing beats a plain step): `best_draft_length`, one length for every
row, where the verifier pads each row to the longest draft (the model's own forward); and `ragged_draft_lengths`,
a length per row, where padding costs nothing (the fast forward runs only real tokens through its products) and a
pass costs what its total of query tokens costs.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from tasc_ray.engine.drafts.tree import DraftTree

StepCost = Callable[[int, float], float]  # seconds of one verification pass over `rows` rows of `q` query tokens each
TREE_COST_RATIO = 2.0  # token trees where a pass over a full tree costs at most this many plain steps
PROBE_COST_RATIO = 1.5  # a pass that drafts to measure drafting (the gate's probe) costs at most this many plain steps


def trees_pay(step_cost: StepCost | None, rows: int, nodes: int) -> bool:
    """Whether token trees of `nodes` nodes are worth building at this batch size: verifying a full tree per row
    costs at most TREE_COST_RATIO plain steps (where a chain's few tokens are all a pass can afford, building trees
    would cost drafting time for nothing). Without a cost model: yes."""
    return nodes > 0 and (step_cost is None or step_cost(rows, 1 + nodes) <= TREE_COST_RATIO * step_cost(rows, 1))


class StepCostTable:
    """Seconds of one verification pass by (rows, query tokens per row q).

    The cost is not linear in q: on 2 CPU cores a pass over 2 tokens costs ~1.6x one token and then grows slowly;
    on a GPU it is nearly flat up to many tokens. So each measured (rows, q) cell is kept: filled by
    `SpeculativeGenerator.profile_step_costs` at start-up and refined by every pass the engine times (a moving
    average per cell). A cell never measured is read off its neighbours: piecewise linear in q within a measured
    row count, linear in rows between two; outside the measured range, and with nothing measured at all, the
    prior's shape (`prior_tokens` extra query tokens double a pass) scales the nearest measurement.

    A ragged pass (rows with drafts of different lengths, verified by the fast forward) costs between the cell
    of its mean query tokens per row (its products see only real tokens) and the cell of its longest row (its
    attention pads every row to the longest): `padding_share` says where, measured at start-up and refined by
    every ragged pass (`observe_ragged`).
    """

    def __init__(self, prior_tokens: float = 20.0, smoothing: float = 0.2, padding_share: float = 0.5) -> None:
        self.prior_tokens, self.smoothing, self.padding_share = prior_tokens, smoothing, padding_share
        self.cells: dict[int, dict[int, float]] = {}  # rows -> {q: seconds}

    def set(self, rows: int, q: int, seconds: float) -> None:
        """Record a measured cost for (rows, q), replacing what the cell held."""
        self.cells.setdefault(rows, {})[q] = seconds

    def observe(self, rows: int, q: int, seconds: float) -> None:
        """Refine (rows, q) with one timed pass: a moving average, or the first value of a new cell."""
        row = self.cells.setdefault(rows, {})
        old = row.get(q)
        row[q] = seconds if old is None else old + self.smoothing * (seconds - old)

    def ragged(self, rows: int, mean_q: float, longest: int) -> float:
        """Seconds of a pass over `rows` rows with `mean_q` query tokens per row on average, the longest `longest`."""
        low, high = self(rows, mean_q), self(rows, longest)
        return low + self.padding_share * max(0.0, high - low)

    def observe_ragged(self, rows: int, mean_q: float, longest: int, seconds: float, replace: bool = False) -> None:
        """Refine `padding_share` with one timed ragged pass, or set it from this pass (`replace`); a pass whose
        rows all had one length refines its cell with `observe` instead."""
        low, high = self(rows, mean_q), self(rows, longest)
        if high - low > 0.05 * low:  # else too close to tell the two apart
            share = min(1.0, max(0.0, (seconds - low) / (high - low)))
            self.padding_share += (1.0 if replace else self.smoothing) * (share - self.padding_share)

    def table(self) -> dict[int, dict[int, float]]:
        """The measured cells, rows -> {q: seconds}, sorted."""
        return {r: dict(sorted(self.cells[r].items())) for r in sorted(self.cells)}

    def __call__(self, rows: int, q: float) -> float:
        if q == int(q) and int(q) in self.cells.get(rows, {}):
            return self.cells[rows][int(q)]
        if not self.cells:
            return self._prior(rows, q)
        # Prefer row counts measured around q (the start-up grid) over one seen only at a few other q online.
        covering = sorted(r for r, cells in self.cells.items() if min(cells) <= q <= max(cells))
        return self._across_rows(covering or sorted(self.cells), rows, q)

    def _across_rows(self, measured: list[int], rows: int, q: float) -> float:
        k = bisect.bisect_left(measured, rows)
        if k < len(measured) and measured[k] == rows:
            return self._in_row(rows, q)
        if 0 < k < len(measured):  # between two measured row counts
            lo, hi = measured[k - 1], measured[k]
            w = (rows - lo) / (hi - lo)
            return (1 - w) * self._in_row(lo, q) + w * self._in_row(hi, q)
        near = measured[min(k, len(measured) - 1)]
        return self._in_row(near, q) * self._prior(rows, q) / self._prior(near, q)

    def _in_row(self, rows: int, q: float) -> float:
        cells = self.cells[rows]
        if q == int(q) and int(q) in cells:
            return cells[int(q)]
        qs = sorted(cells)
        k = bisect.bisect_left(qs, q)
        if 0 < k < len(qs):
            lo, hi = qs[k - 1], qs[k]
            return cells[lo] + (cells[hi] - cells[lo]) * (q - lo) / (hi - lo)
        near = qs[min(k, len(qs) - 1)]
        return cells[near] * self._prior(rows, q) / self._prior(rows, near)

    def _prior(self, rows: int, q: float) -> float:
        return 1.0 + rows * q / self.prior_tokens


def best_draft_length(path_probs: Sequence[Sequence[float]], step_cost: StepCost, max_cost: float | None = None) -> int:
    """The common draft length K maximising expected tokens per second of one batched pass (a pass costing at
    most `max_cost` seconds, where given).

    A pass over B rows with drafts cut to K costs step_cost(B, K + 1) (every row is padded to K + 1 query
    tokens) and yields, in expectation, sum_i (1 + sum_{j < K} q_ij) tokens, q_ij being the estimated
    probability that row i's first j + 1 draft tokens are all accepted.
    """
    batch = len(path_probs)
    expected = float(batch)  # each pass emits at least the target's own token per row
    best_k, best_rate = 0, expected / step_cost(batch, 1)
    for k in range(1, max(len(p) for p in path_probs) + 1):
        expected += sum(p[k - 1] for p in path_probs if len(p) >= k)
        cost = step_cost(batch, k + 1)
        if max_cost is not None and cost > max_cost:
            break
        rate = expected / cost
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k


def ragged_draft_lengths(
    path_probs: Sequence[Sequence[float]],
    step_cost: StepCost,
    padding_share: float = 0.0,
    max_cost: float | None = None,
) -> list[int]:
    """Per-row draft lengths maximising expected tokens per second of one pass (costing at most `max_cost` seconds,
    where given) where rows may draft different lengths: over B rows verifying n draft tokens in all, the longest
    row L query tokens, a pass costs c(m) + padding_share * (c(L) - c(m)), c(q) = step_cost(B, q),
    m = (B + n) / B the mean query tokens per row.

    Every draft slot (row i, depth j) yields q_ij expected tokens, q_ij being the estimated probability that row
    i's first j + 1 draft tokens are all accepted, and q_ij does not grow with j; so the n slots worth most are
    the n most probable ones (each row's slots taken in order), as vLLM's adaptive verification admits slots by
    survival probability against one budget, and only n is left to choose.
    """
    batch = len(path_probs)
    slots = []
    for i, probs in enumerate(path_probs):
        running = 1.0
        for j, p in enumerate(probs):
            running = min(running, p)  # survival cannot grow with depth; guards a non-monotone estimate
            slots.append((-running, j, i))
    slots.sort()
    lengths = [0] * batch
    expected, longest, best_n, best_rate = float(batch), 1, 0, batch / step_cost(batch, 1)
    for n, (neg_p, j, _) in enumerate(slots, start=1):
        expected -= neg_p
        longest = max(longest, j + 2)
        mean = (batch + n) / batch
        low = step_cost(batch, mean)
        cost = low + padding_share * max(0.0, step_cost(batch, longest) - low)
        if max_cost is not None and cost > max_cost:
            break
        if expected / cost > best_rate:
            best_n, best_rate = n, expected / cost
    for _, _, i in slots[:best_n]:
        lengths[i] += 1
    return lengths


class SpeculationGate:
    """Whether drafting pays, measured: tokens per second of passes with drafts against passes without, per batch
    size (row counts in powers-of-two buckets: 1, 2-3, 4-7, 8-15, ...), from the engine's own passes.

    The cost table and the calibrated acceptance say how long a draft to verify; they are estimates, and where a
    pass is compute-bound (many rows on a CPU) a small error in them turns speculation into a loss. The gate
    watches the result instead: each side's rate is its decayed sum of tokens over its decayed sum of seconds
    (`memory` per pass of that side), trusted once it has `min_passes` passes; until then drafting is the default
    and plain passes are interleaved to measure them. Where passes with drafts emit fewer tokens per second,
    drafts are switched off for that batch size; the losing side is retried every `explore_every` passes (every
    4 x `explore_every` once one side leads by more than `clear_margin`), so the gate follows changes in the task,
    the batch and the context length. A pass allowed to draft only to measure drafting (before it is measured, or
    retried while it loses) is a probe (`probing`): the proposer keeps it cheap (PROBE_COST_RATIO), so that
    learning where drafting loses never costs more than a few plain passes.
    """

    def __init__(
        self, memory: float = 0.95, min_passes: int = 4, explore_every: int = 16, clear_margin: float = 0.3
    ) -> None:
        self.memory, self.min_passes = memory, min_passes
        self.explore_every, self.clear_margin = explore_every, clear_margin
        self.sums: dict[int, dict[bool, list[float]]] = {}  # bucket -> {drafted: [tokens, seconds, passes]}
        self._passes: dict[int, int] = {}
        self.probing = False  # whether the last pass allow() let draft is a probe

    def rate(self, rows: int, drafted: bool) -> float | None:
        """Measured tokens per second of passes over `rows` rows with (or without) drafts; None before min_passes."""
        side = self.sums.get(rows.bit_length(), {}).get(drafted)
        return side[0] / side[1] if side is not None and side[2] >= self.min_passes and side[1] > 0 else None

    def allow(self, rows: int) -> bool:
        """Whether this pass over `rows` rows may draft."""
        bucket = rows.bit_length()
        n = self._passes.get(bucket, 0)
        self._passes[bucket] = n + 1
        spec, plain = self.rate(rows, True), self.rate(rows, False)
        self.probing = spec is None or plain is None or spec < plain
        if spec is None:
            return True  # drafting is the default until it is measured
        if plain is None:
            return n % 2 == 0  # interleave plain passes until they are measured
        lead = abs(spec - plain) / min(spec, plain)
        every = self.explore_every * (4 if lead > self.clear_margin else 1)
        explore = n % every == every - 1
        return (spec >= plain) != explore

    def observe(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        """One timed pass over `rows` rows that emitted `tokens` tokens in all, with drafts or without."""
        if seconds <= 0:
            return
        side = self.sums.setdefault(rows.bit_length(), {}).setdefault(drafted, [0.0, 0.0, 0])
        side[0] = self.memory * side[0] + tokens
        side[1] = self.memory * side[1] + seconds
        side[2] += 1


def cut_trees(
    trees: Sequence[DraftTree], step_cost: StepCost | None, ragged: bool, max_cost: float | None = None
) -> list[DraftTree]:
    """The drafts cut to what a pass can afford (`cut_lengths` on their nodes' path probabilities); drafts that
    carry no scores (a drafter that does not estimate them) are verified whole."""
    if any(len(t.scores) != len(t) for t in trees):
        return list(trees)
    lengths = cut_lengths([t.scores for t in trees], step_cost, ragged, max_cost)
    return [t.prefix(n) for t, n in zip(trees, lengths)]


def cut_lengths(
    scores: Sequence[Sequence[float]], step_cost: StepCost | None, ragged: bool, max_cost: float | None = None
) -> list[int]:
    """How many of each row's draft nodes to verify, given the estimated probabilities that each prefix is accepted:
    where expected tokens per second of the pass is highest (within `max_cost` seconds a pass, where given), per
    row where the verifier does not pad rows to the longest draft (`ragged`), else one length for all; everything
    without a step cost."""
    if step_cost is None or not scores:
        return [len(s) for s in scores]
    if ragged:
        share = getattr(step_cost, "padding_share", 0.0)  # a StepCostTable's measured share
        return ragged_draft_lengths(scores, step_cost, share, max_cost)
    return [best_draft_length(scores, step_cost, max_cost)] * len(scores)
