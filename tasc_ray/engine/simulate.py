"""Offline acceptance simulator: replay held-out outputs through the real Drafter, teacher-forced, with no model.

At each step the Drafter proposes a draft from the row's tokens so far (prompt + true output prefix); the
number n of leading draft tokens that equal the true next tokens is what a greedy target model that emits the
reference would accept, and one forward pass then yields n + 1 tokens (the accepted ones plus the target's own
next token). The row advances by n + 1 and the Drafter learns those tokens, exactly as in
SpeculativeGenerator. The headline is tokens per forward pass (llama.cpp's lookup-stats, Suffix Decoding's
simulator): the speedup ceiling of the draft, before the extra cost of verifying k tokens per pass.

Rows are simulated in lockstep batches, so the Drafter's batched index lookups are timed as in serving. With live
learning on (`DrafterConfig.live_outputs`), each replayed output joins the drafter's overlay when it ends, as a
finished request does in the engine; `score_from` then leaves the warm-up sequences out of the totals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasc_ray.engine.config import DrafterConfig
from tasc_ray.engine.cost import StepCost, cut_trees, trees_pay
from tasc_ray.engine.drafts.drafter import DraftContext, Drafter
from tasc_ray.engine.drafts.index import NgramIndex


@dataclass
class _Tally:
    """Totals of a replay: drafted/accepted tokens, the accepted-length histogram, per-row passes, drafting time."""

    max_draft: int
    score_from: int = 0  # rows before this one are warm-up: not counted
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    hist: np.ndarray = field(init=False)
    row_passes: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hist = np.zeros(self.max_draft + 1, dtype=np.int64)

    def record(self, row: int, drafted: int, accepted: int) -> None:
        if row < self.score_from:
            return
        self.row_passes[row] = self.row_passes.get(row, 0) + 1
        self.drafted += drafted
        self.accepted += accepted
        self.hist[min(accepted, self.max_draft)] += 1


def simulate_acceptance(
    index: NgramIndex | None,
    sequences: Sequence[Sequence[int]],
    drafter_config: DrafterConfig | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    batch_size: int = 64,
    score_from: int = 0,
    drafter: Drafter | None = None,
    step_cost: StepCost | None = None,
) -> dict[str, Any]:
    """Teacher-forced replay of `sequences` (token ids of true outputs) through a Drafter over `index`.

    `prompts` (optional, one token-id list per sequence) seed each row's context, as the prompt does when
    serving. Returns totals and ratios: `tokens_per_pass` (mean tokens per forward pass, the headline),
    `mean_accepted_per_pass`, `acceptance_rate` (accepted / drafted), the histogram of accepted lengths, the
    per-sequence mean of tokens per pass, and drafting time per pass, over the sequences from `score_from` on.
    `drafter`: replay this drafter (anything with the Drafter interface) instead of one built from the config;
    `step_cost`: cut drafts (and trees) as the engine does, on the cost of a verification pass at batch 1."""
    config = drafter_config or DrafterConfig()
    if prompts is not None and len(prompts) != len(sequences):
        raise ValueError(f"got {len(prompts)} prompts for {len(sequences)} sequences")
    drafter = drafter if drafter is not None else Drafter(index, config)
    seqs = [[int(t) for t in s] for s in sequences]
    tally = _Tally(config.max_draft, score_from)
    for start in range(0, len(seqs), batch_size):
        chunk = [i for i in range(start, min(start + batch_size, len(seqs))) if seqs[i]]
        contexts = {i: drafter.new_row(list(prompts[i]) if prompts is not None else []) for i in chunk}
        _replay(drafter, {i: seqs[i] for i in chunk}, contexts, tally, step_cost)
    done = [i for i, s in enumerate(seqs) if s and i >= score_from]
    tokens = sum(len(seqs[i]) for i in done)
    passes = sum(tally.row_passes[i] for i in done)
    per_seq = [len(seqs[i]) / tally.row_passes[i] for i in done]
    return {
        "sequences": len(per_seq),
        "tokens": tokens,
        "passes": passes,
        "tokens_per_pass": tokens / passes if passes else 0.0,
        "mean_accepted_per_pass": tally.accepted / passes if passes else 0.0,
        "drafted": tally.drafted,
        "verified_per_pass": tally.drafted / passes if passes else 0.0,
        "accepted": tally.accepted,
        "acceptance_rate": tally.accepted / tally.drafted if tally.drafted else 0.0,
        "tokens_per_pass_per_sequence_mean": float(np.mean(per_seq)) if per_seq else 0.0,
        "accepted_hist": tally.hist.tolist(),
        "draft_seconds": tally.draft_seconds,
        "draft_ms_per_pass": 1000 * tally.draft_seconds / passes if passes else 0.0,
        "drafter": config.model_dump(mode="json"),
    }


def _replay(
    drafter: Drafter,
    seqs: dict[int, list[int]],
    contexts: dict[int, DraftContext],
    tally: _Tally,
    step_cost: StepCost | None = None,
) -> None:
    """Replay a batch of rows in lockstep: each pass accepts the draft's prefix (a tree's path) that equals the true
    output, plus the pass's own token, until every row has reached its end."""
    pos = dict.fromkeys(seqs, 0)
    active = list(seqs)
    branching = trees_pay(step_cost, 1, drafter.config.tree_nodes)  # as the engine decides, at batch 1
    while active:
        t0 = time.perf_counter()
        limits = [len(seqs[i]) - pos[i] for i in active]
        trees = drafter.propose([contexts[i] for i in active], limits, branching)
        trees = cut_trees(trees, step_cost, ragged=True)
        tally.draft_seconds += time.perf_counter() - t0
        paths = []
        for i, tree in zip(active, trees):
            seq, p = seqs[i], pos[i]
            target = [seq[p]] + [
                seq[p + tree.depth(j)] if p + tree.depth(j) < len(seq) else -1 for j in range(len(tree))
            ]
            path = tree.accepted_path(target)  # what a target emitting the reference accepts
            paths.append(path)
            advance = min(len(path) + 1, len(seq) - p)  # the pass's own token; none past the end (that is EOS)
            contexts[i].extend(seq[p : p + advance])
            pos[i] = p + advance
            tally.record(i, len(tree), len(path))
        drafter.observe(trees, paths)  # as the engine does after each verification pass
        for i in active:
            if pos[i] >= len(seqs[i]):
                drafter.learn(seqs[i])  # a finished output, as the engine's live overlay learns it
        active = [i for i in active if pos[i] < len(seqs[i])]
