"""The acceptance rule (verify.py): one walk down each row's tree for greedy and sampled rows, chains included."""

from __future__ import annotations

import torch

from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.request import Request
from tasc_ray.engine.sampling import SamplingParams, token_logprobs
from tasc_ray.engine.verify import verify

V = 12


def one_hot_logits(rows: list[list[int]], width: int) -> torch.Tensor:
    """[B, width, V] logits whose argmax at query j of row i is rows[i][j]."""
    logits = torch.zeros(len(rows), width, V)
    for i, tokens in enumerate(rows):
        for j, t in enumerate(tokens):
            logits[i, j, t] = 5.0
    return logits


def greedy(n: int = 1, **params) -> list[Request]:
    return [Request.new([1, 2], SamplingParams(**params), row) for row in range(n)]


def test_a_chain_accepts_its_longest_agreeing_prefix_and_the_targets_token():
    trees = [
        DraftTree.chain([5, 6, 7]),
        DraftTree.chain([5, 9, 7]),
        DraftTree.chain([1, 1, 1]),
        DraftTree.chain([5, 6]),
    ]
    target = [[5, 6, 7, 8], [5, 6, 7, 8], [2, 1, 1, 1], [5, 6, 0, 3]]  # the last row is padded after 2 nodes
    verdict = verify(one_hot_logits(target, 4), trees, greedy(4))
    assert [len(p) for p in verdict.paths] == [3, 1, 0, 2]
    assert verdict.tokens == [[5, 6, 7, 8], [5, 6], [2], [5, 6, 0]]


def test_a_tree_follows_the_child_equal_to_the_targets_token():
    # pending -> {4 (node 0), 5 (node 1)}; node 1 -> {7 (node 2), 8 (node 3)}; node 3 -> 9 (node 4)
    tree = DraftTree([4, 5, 7, 8, 9], [-1, -1, 1, 1, 3])
    target = [[5, 0, 3, 0, 9, 2]]  # after pending: 5 (node 1); after node 1: 3?  no child -> stop
    verdict = verify(one_hot_logits(target, 6), [tree], greedy())
    assert verdict.paths == [[1]] and verdict.tokens == [[5, 3]]
    target = [[5, 0, 8, 0, 9, 2]]  # 5 (node 1), then 8 (node 3), then 9 (node 4), then the target's own 2
    verdict = verify(one_hot_logits(target, 6), [tree], greedy())
    assert verdict.paths == [[1, 3, 4]] and verdict.tokens == [[5, 8, 9, 2]]


def test_sampled_rows_emit_what_their_seeded_draws_are_at_each_depth():
    """A sampled row's node at depth d draws with the seed of output position len(generated) + d: the tokens it
    emits are the draws plain decoding makes at those positions, whatever the tree holds."""
    torch.manual_seed(0)
    logits = torch.randn(1, 4, V)
    [row] = greedy(temperature=1.0, seed=11)
    row.generated = [3, 3]
    plain = row.sampler.sample(logits[0, [0]].clone(), [2])[0].item()
    chain = DraftTree.chain([plain, 0, 0])  # the first node is right, so query 1 draws position 3
    verdict = verify(logits.clone(), [chain], [row])
    assert verdict.tokens[0][0] == plain and verdict.paths[0][:1] == [0]
    after = row.sampler.sample(logits[0, [1]].clone(), [3])[0].item()
    assert verdict.tokens[0][1] == after


def test_penalties_count_the_path_to_each_query_and_logprobs_are_read_on_the_path():
    tree = DraftTree([4, 5, 4], [-1, -1, 1])  # pending -> 4 | 5 -> 4
    logits = torch.zeros(1, 4, V)
    logits[0, 0, 5] = 3.0  # after pending: 5
    logits[0, 2, 4] = 2.0  # after node 1 (5): 4, unless a penalty on 5... 4 was not emitted on this path
    logits[0, 2, 5] = 1.5
    [row] = greedy(presence_penalty=1.0, logprobs=1)
    raw = logits.clone()
    verdict = verify(logits, [tree], [row])
    assert verdict.paths == [[1, 2]]  # 5, then 4: the path to query 2 holds 5, so 5's logit there drops to 0.5
    expected = token_logprobs(raw[0, [0, 2, 3]], torch.tensor(verdict.tokens[0]), 1)
    assert verdict.logprobs[0] == expected  # the model's own log-probabilities, before the penalty
