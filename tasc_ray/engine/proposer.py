"""Proposer: per pass, which rows draft and how much, and what the engine learns from the verdict.

The drafter says what each row could draft (a token tree with estimated path probabilities); the proposer
decides what a pass can afford, from the measured cost of passes of that shape (cost.py): trees where verifying a
full tree costs at most two plain steps, chains elsewhere, each draft cut where the expected tokens per second of
the pass is highest (zero: no draft). A speculation gate watches the outcome and turns drafting off for a batch
size where passes with drafts measurably emit fewer tokens per second than passes without; the passes that draft
only to measure drafting (its probes) are kept to PROBE_COST_RATIO plain steps. After the pass it
feeds the verdict back: the drafter's calibration, the gate, and the cost table.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasc_ray.engine.cost import PROBE_COST_RATIO, SpeculationGate, StepCostTable, cut_trees, trees_pay
from tasc_ray.engine.drafts.drafter import DraftContext, Drafter
from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.request import Request
from tasc_ray.engine.verify import Verdict


class Proposer:
    """The engine's drafting policy around a swappable `drafter` (None: plain decoding)."""

    def __init__(self, drafter: Drafter | None, ragged: bool, speculation_gate: bool = True) -> None:
        """`ragged`: the verifier runs only real tokens through its products, so rows may draft different lengths
        (the fast forward); else every row is padded to the longest draft and all are cut to one length."""
        self.drafter = drafter
        self.ragged = ragged
        self.step_cost = StepCostTable()
        self.gate = SpeculationGate() if speculation_gate else None

    def new_row(self, request: Request) -> DraftContext | None:
        """The drafter's state for a joining row; None for a row that does not speculate."""
        if self.drafter is None or not request.params.speculative:
            return None
        return self.drafter.new_row(request.prompt_ids)

    def propose(self, rows: Sequence[Request]) -> list[DraftTree]:
        """Each row's draft for this pass, cut to what the pass can afford (an empty tree: no draft)."""
        if not self._speculating(rows):
            return [DraftTree() for _ in rows]
        assert self.drafter is not None
        if self.gate is not None and not self.gate.allow(len(rows)):
            return [DraftTree() for _ in rows]
        limits = [r.max_new - len(r.generated) - 1 for r in rows]  # the pass also emits the target's own token
        probe = self.gate is not None and self.gate.probing
        branching = not probe and trees_pay(self.step_cost, len(rows), self.drafter.config.tree_nodes)
        trees = self.drafter.propose([r.draft_context for r in rows], limits, branching)
        max_cost = PROBE_COST_RATIO * self.step_cost(len(rows), 1) if probe else None
        return cut_trees(trees, self.step_cost, self.ragged, max_cost)

    def observe(self, rows: Sequence[Request], trees: Sequence[DraftTree], verdict: Verdict, seconds: float) -> None:
        """Learn from a pass that took `seconds` (drafting and verifying): calibration, the gate, the step costs."""
        emitted = sum(len(tokens) for tokens in verdict.tokens)
        if self.gate is not None and self._speculating(rows):
            self.gate.observe(len(rows), any(trees), emitted, seconds)
        if self.drafter is not None:
            self.drafter.observe(trees, verdict.paths)

    def observe_cost(self, trees: Sequence[DraftTree], seconds: float) -> None:
        """Refine the step-cost table with a timed verification pass: its cell where every row had the same query
        length (or the verifier pads rows to the longest), else the share of padding a ragged pass pays."""
        longest = max(len(t) for t in trees) + 1
        mean = sum(len(t) + 1 for t in trees) / len(trees)
        if not self.ragged or longest == mean:
            self.step_cost.observe(len(trees), longest, seconds)
        else:
            self.step_cost.observe_ragged(len(trees), mean, longest, seconds)

    def learn(self, request: Request) -> None:
        """A row finished: its output joins what the drafter knows."""
        if self.drafter is not None:
            self.drafter.learn(request.generated)

    def _speculating(self, rows: Sequence[Request]) -> bool:
        return self.drafter is not None and any(r.draft_context is not None for r in rows)
