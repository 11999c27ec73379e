"""The acceptance rule: which nodes of each row's draft tree the target takes, and what the row emits.

One rule for greedy and sampled rows, chains and trees. After one forward pass over [pending token + tree nodes],
query 0 holds the target's distribution after the pending token and query 1 + j its distribution after node j.
At each query take the target's own token x: the argmax for a greedy row, for a sampled row a draw from the warped
distribution with the generator seeded by (row seed, output position), exactly as plain decoding draws that
position. Walk from the pending token down the tree: while the current node has a child whose token is x, accept
that child and move to it; then emit the accepted tokens and the x of the last node reached.

Why this is exact: a draft is a point mass, so accepting a child iff its token equals x keeps x itself as the
emitted token at every position. The queries on the accepted path see exactly the tokens plain decoding would have
emitted before them (their ancestors), so each x is the token plain decoding draws there, greedy or seeded: the
output is identical to decoding without drafts, and drafts only change how many positions one pass reaches.
Logit bias and penalties are applied at each query as if its path had been emitted (sampling.adjust_logits), and
log-probabilities are the model's own, read at the queries on the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.request import Request
from tasc_ray.engine.sampling import TokenLogprob, adjust_logits, token_logprobs


@dataclass
class Verdict:
    """What one pass decided for each row."""

    paths: list[list[int]]  # the accepted nodes of each row's tree, from the root down
    tokens: list[list[int]]  # what each row emits: the accepted nodes' tokens, then the target's own token
    logprobs: dict[int, list[TokenLogprob]]  # by row, one per emitted token, for the rows that asked for them


def verify(logits: torch.Tensor, trees: Sequence[DraftTree], rows: Sequence[Request]) -> Verdict:
    """Apply the acceptance rule to [B, q, V] logits of a pass over [pending token + nodes] of every row (rows with
    smaller trees are padded on the right; a prefill's last position is a pass over empty trees)."""
    raw = {i: logits[i].clone() for i, r in enumerate(rows) if r.params.logprobs is not None}
    for i, (row, tree) in enumerate(zip(rows, trees)):
        if row.params.adjusts_logits:
            to_query: list[list[int]] = [[]] + [tree.path(j) for j in range(len(tree))]
            adjust_logits(logits[i, : 1 + len(tree)], row.params, row.generated, to_query)
    target = logits.argmax(dim=-1)
    for i, (row, tree) in enumerate(zip(rows, trees)):
        if row.sampler is not None:
            positions = [len(row.generated) + d for d in [0] + [tree.depth(j) for j in range(len(tree))]]
            target[i, : 1 + len(tree)] = row.sampler.sample(logits[i, : 1 + len(tree)], positions)
    target_lists = target.tolist()
    paths: list[list[int]] = []
    tokens: list[list[int]] = []
    logprobs: dict[int, list[TokenLogprob]] = {}
    for i, (row, tree) in enumerate(zip(rows, trees)):
        path = tree.accepted_path(target_lists[i])
        queries = [0] + [1 + j for j in path]  # the query whose token each emitted token is
        paths.append(path)
        tokens.append([target_lists[i][q] for q in queries])
        if i in raw:
            logprobs[i] = token_logprobs(raw[i][queries], target[i, queries], row.params.logprobs or 0)
    return Verdict(paths, tokens, logprobs)
