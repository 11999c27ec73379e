"""Drafter: context/corpus/mixed proposals, adaptive length, cost-aware draft length; the step cost model."""

from __future__ import annotations

import pytest

from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.drafter import Drafter
from tasc_ray.spec.index import NgramIndex
from tasc_ray.spec.simulate import simulate_acceptance


def test_context_mode_is_prompt_lookup():
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, max_draft=4, min_path_prob=0.0))
    row = drafter.new_row([1, 2, 3, 4, 5, 9, 1, 2])
    assert drafter.propose([row]) == [[3, 4, 5, 9]]
    row.extend([3, 4])  # the row learns what was accepted
    assert drafter.propose([row])[0][:2] == [5, 9]


def test_corpus_mode_follows_index_and_backs_off():
    index = NgramIndex.build([[10, 11, 12, 13, 14]] * 3, max_order=3)
    drafter = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, max_draft=8, min_path_prob=0.0))
    assert drafter.propose([drafter.new_row([7, 10])]) == [[11, 12, 13, 14]]
    assert drafter.propose([drafter.new_row([99])]) == [[]]
    with pytest.raises(ValueError, match="needs an n-gram index"):
        Drafter(None, DrafterConfig(mode=DraftMode.MIXED, live_outputs=0))


def test_mixing_weight_decides_between_matches_of_one_length():
    """The raw rule (calibrate off): lambda weighs corpus against context."""
    index = NgramIndex.build([[5, 6]] * 4, max_order=2)  # corpus says 5 -> 6
    prompt = [5, 7, 5, 7, 5]  # context says 5 -> 7
    for lam, expected in ((0.9, 6), (0.1, 7)):
        config = DrafterConfig(
            mode=DraftMode.MIXED, lam=lam, max_draft=1, min_path_prob=0.0, context_order=2, calibrate=False
        )
        drafter = Drafter(index, config)
        assert drafter.propose([drafter.new_row(prompt)]) == [[expected]]


def test_the_longer_match_wins():
    index = NgramIndex.build([[5, 6]] * 4, max_order=2)  # corpus: 5 -> 6, one token of context
    prompt = [7, 5, 8, 7, 5]  # the row: 7 5 -> 8, two tokens
    drafter = Drafter(index, DrafterConfig(mode=DraftMode.MIXED, lam=0.99, max_draft=1, min_path_prob=0.0))
    assert drafter.propose([drafter.new_row(prompt)]) == [[8]]


def test_adaptive_length_stops_on_unlikely_path():
    index = NgramIndex.build([[1, 2], [1, 3], [2, 4], [2, 4]], max_order=2)  # 1 -> 2 (p=.5), 2 -> 4 (p=1)
    sure = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.6))
    unsure = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.4))
    assert sure.propose([sure.new_row([1])]) == [[]]
    assert unsure.propose([unsure.new_row([1])]) == [[2, 4]]


def test_limits_respected():
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, max_draft=8, min_path_prob=0.0))
    rows = [drafter.new_row([1, 2, 3, 1, 2, 3, 1]) for _ in range(3)]
    assert [len(d) for d in drafter.propose(rows, [0, 2, 100])] == [0, 2, 8]


def test_trees_branch_where_the_continuation_is_uncertain():
    """After 1 2 the corpus continues 3 5 6 (3 times) or 4 7 8 (twice): a chain drafts the first branch, a tree of 6
    nodes holds both, parents before children and in order of falling probability."""
    index = NgramIndex.build([[1, 2, 3, 5, 6]] * 3 + [[1, 2, 4, 7, 8]] * 2, max_order=3)
    config = DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.05, live_outputs=0, calibrate=False, tree_nodes=6)
    drafter = Drafter(index, config)
    row = drafter.new_row([9, 1, 2])
    assert drafter.propose([row]) == [[3, 5, 6]]
    (tree,) = drafter.propose_trees([row], [8])
    assert sorted(tree.tokens) == [3, 4, 5, 6, 7, 8]
    assert all(p < j for j, p in enumerate(tree.parents)) and tree.scores == sorted(tree.scores, reverse=True)
    assert tree.accepted_path([4, 0, 0, 0, 7, 8, 0]) == [
        tree.tokens.index(4),
        tree.tokens.index(7),
        tree.tokens.index(8),
    ]
    drafter.observe([tree.accepted_path([4, 0, 0, 0, 7, 8, 0])])  # calibration learns from the tree's nodes
    assert sum(t for t, _ in drafter.calibration.by_bin) == 3 + 1  # both children of the root, then 7's line


def test_simulator_replays_trees():
    sequences = [[1, 2, 3, 5, 6]] * 3 + [[1, 2, 4, 7, 8]] * 2
    index = NgramIndex.build(sequences, max_order=3)
    held_out = [[1, 2, 4, 7, 8], [1, 2, 3, 5, 6]] * 4
    common = dict(mode=DraftMode.CORPUS, min_path_prob=0.05, live_outputs=0, calibrate=False)
    chain = simulate_acceptance(index, held_out, DrafterConfig(**common, tree_nodes=0), batch_size=1)
    tree = simulate_acceptance(index, held_out, DrafterConfig(**common, tree_nodes=6), batch_size=1)
    assert tree["tokens_per_pass"] > chain["tokens_per_pass"]
    assert tree["verified_per_pass"] > chain["verified_per_pass"]
