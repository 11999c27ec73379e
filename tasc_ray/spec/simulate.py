"""Offline acceptance simulator: replay held-out outputs through the real Drafter, teacher-forced, with no model.

At each step the Drafter proposes a draft from the row's tokens so far (prompt + true output prefix); the
number n of leading draft tokens that equal the true next tokens is what a greedy target model that emits the
reference would accept, and one forward pass then yields n + 1 tokens (the accepted ones plus the target's own
next token). The row advances by n + 1 and the Drafter learns those tokens, exactly as in
SpeculativeGenerator. The headline is tokens per forward pass (llama.cpp's lookup-stats, Suffix Decoding's
simulator): the speedup ceiling of the draft, before the extra cost of verifying k tokens per pass.

Rows are simulated in lockstep batches, so the Drafter's batched index lookups are timed as in serving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasc_ray.spec.config import DrafterConfig
from tasc_ray.spec.drafter import Drafter
from tasc_ray.spec.index import NgramIndex


def simulate_acceptance(
    index: NgramIndex | None,
    sequences: Sequence[Sequence[int]],
    drafter_config: DrafterConfig | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Teacher-forced replay of `sequences` (token ids of true outputs) through a Drafter over `index`.

    `prompts` (optional, one token-id list per sequence) seed each row's context, as the prompt does when
    serving. Returns totals and ratios: `tokens_per_pass` (mean tokens per forward pass, the headline),
    `mean_accepted_per_pass`, `acceptance_rate` (accepted / drafted), the histogram of accepted lengths, the
    per-sequence mean of tokens per pass, and drafting time per pass."""
    config = drafter_config or DrafterConfig()
    if prompts is not None and len(prompts) != len(sequences):
        raise ValueError(f"got {len(prompts)} prompts for {len(sequences)} sequences")
    drafter = Drafter(index, config)
    seqs = [[int(t) for t in s] for s in sequences]
    tokens = passes = drafted = accepted = 0
    hist = np.zeros(config.max_draft + 1, dtype=np.int64)
    per_seq: list[float] = []
    draft_seconds = 0.0
    for start in range(0, len(seqs), batch_size):
        chunk = list(range(start, min(start + batch_size, len(seqs))))
        states = {i: drafter.new_row(list(prompts[i]) if prompts is not None else []) for i in chunk}
        pos = dict.fromkeys(chunk, 0)
        row_passes = dict.fromkeys(chunk, 0)
        active = [i for i in chunk if seqs[i]]
        while active:
            t0 = time.perf_counter()
            drafts = drafter.propose([states[i] for i in active], [len(seqs[i]) - pos[i] for i in active])
            draft_seconds += time.perf_counter() - t0
            still = []
            for i, draft in zip(active, drafts):
                seq, p = seqs[i], pos[i]
                n = 0
                while n < len(draft) and draft[n] == seq[p + n]:
                    n += 1
                advance = min(n + 1, len(seq) - p)  # the pass's own token; none past the end (that is EOS)
                states[i].extend(seq[p : p + advance])
                pos[i] = p + advance
                row_passes[i] += 1
                drafted += len(draft)
                accepted += n
                hist[min(n, config.max_draft)] += 1
                if pos[i] < len(seq):
                    still.append(i)
            active = still
        for i in chunk:
            if seqs[i]:
                tokens += len(seqs[i])
                passes += row_passes[i]
                per_seq.append(len(seqs[i]) / row_passes[i])
    return {
        "sequences": len(per_seq),
        "tokens": tokens,
        "passes": passes,
        "tokens_per_pass": tokens / passes if passes else 0.0,
        "mean_accepted_per_pass": accepted / passes if passes else 0.0,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_pass_per_sequence_mean": float(np.mean(per_seq)) if per_seq else 0.0,
        "accepted_hist": hist.tolist(),
        "draft_seconds": draft_seconds,
        "draft_ms_per_pass": 1000 * draft_seconds / passes if passes else 0.0,
        "drafter": config.model_dump(mode="json"),
    }
