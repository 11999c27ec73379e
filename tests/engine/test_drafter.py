"""Drafter: context/corpus/mixed proposals, adaptive length, cost-aware draft length; the step cost model."""

from __future__ import annotations

import pytest

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.simulate import simulate_acceptance


def drafts(drafter, rows, limits=None, branching=False):
    """The proposed drafts' tokens (chains unless branching)."""
    return [tree.tokens for tree in drafter.propose(rows, limits, branching)]


def test_context_mode_is_prompt_lookup():
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, max_draft=4, min_path_prob=0.0))
    row = drafter.new_row([1, 2, 3, 4, 5, 9, 1, 2])
    assert drafts(drafter, [row]) == [[3, 4, 5, 9]]
    row.extend([3, 4])  # the row learns what was accepted
    assert drafts(drafter, [row])[0][:2] == [5, 9]


def test_corpus_mode_follows_index_and_backs_off():
    index = NgramIndex.build([[10, 11, 12, 13, 14]] * 3, max_order=3)
    drafter = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, max_draft=8, min_path_prob=0.0))
    assert drafts(drafter, [drafter.new_row([7, 10])]) == [[11, 12, 13, 14]]
    assert drafts(drafter, [drafter.new_row([99])]) == [[]]
    with pytest.raises(ValueError, match="needs an n-gram index"):
        Drafter(None, DrafterConfig(mode=DraftMode.MIXED, live_outputs=0))


def test_sources_compete_on_calibrated_acceptance():
    """Corpus (5 -> 6) against the row's context (7 5 -> 8): with no evidence both are certain and the row's own
    context is asked first; once verification shows that the context's drafts fail and the corpus's hold, the corpus
    wins."""
    index = NgramIndex.build([[5, 6]] * 4, max_order=2)
    prompt = [7, 5, 8, 7, 5]
    drafter = Drafter(index, DrafterConfig(mode=DraftMode.MIXED, max_draft=1, min_path_prob=0.0))
    assert drafts(drafter, [drafter.new_row(prompt)]) == [[8]]
    for _ in range(50):
        (tree,) = drafter.propose([drafter.new_row(prompt)])
        drafter.observe([tree], [[0] if tree.tokens == [6] else []])  # the target says 6
    assert drafts(drafter, [drafter.new_row(prompt)]) == [[6]]


def test_adaptive_length_stops_on_unlikely_path():
    index = NgramIndex.build([[1, 2], [1, 3], [2, 4], [2, 4]], max_order=2)  # 1 -> 2 (p=.5), 2 -> 4 (p=1)
    sure = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.6))
    unsure = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.4))
    assert drafts(sure, [sure.new_row([1])]) == [[]]
    assert drafts(unsure, [unsure.new_row([1])]) == [[2, 4]]


def test_limits_respected():
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, max_draft=8, min_path_prob=0.0))
    rows = [drafter.new_row([1, 2, 3, 1, 2, 3, 1]) for _ in range(3)]
    assert [len(d) for d in drafts(drafter, rows, [0, 2, 100])] == [0, 2, 8]


def test_trees_branch_where_the_continuation_is_uncertain():
    """After 1 2 the corpus continues 3 5 6 (3 times) or 4 7 8 (twice): a chain drafts the first branch, a tree of 6
    nodes holds both, parents before children and in order of falling probability."""
    index = NgramIndex.build([[1, 2, 3, 5, 6]] * 3 + [[1, 2, 4, 7, 8]] * 2, max_order=3)
    config = DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.05, live_outputs=0, tree_nodes=6)
    drafter = Drafter(index, config)
    row = drafter.new_row([9, 1, 2])
    assert drafts(drafter, [row]) == [[3, 5, 6]]
    (tree,) = drafter.propose([row], [8], branching=True)
    assert sorted(tree.tokens) == [3, 4, 5, 6, 7, 8]
    assert all(p < j for j, p in enumerate(tree.parents)) and tree.scores == sorted(tree.scores, reverse=True)
    assert tree.accepted_path([4, 0, 0, 0, 7, 8, 0]) == [
        tree.tokens.index(4),
        tree.tokens.index(7),
        tree.tokens.index(8),
    ]
    drafter.observe([tree], [tree.accepted_path([4, 0, 0, 0, 7, 8, 0])])  # calibration learns from the tree's nodes
    assert sum(t for t, _ in drafter.calibration.by_bin) == 3 + 1  # both children of the root, then 7's line


def test_simulator_replays_trees():
    sequences = [[1, 2, 3, 5, 6]] * 3 + [[1, 2, 4, 7, 8]] * 2
    index = NgramIndex.build(sequences, max_order=3)
    held_out = [[1, 2, 4, 7, 8], [1, 2, 3, 5, 6]] * 4
    common = dict(mode=DraftMode.CORPUS, min_path_prob=0.05, live_outputs=0)
    chain = simulate_acceptance(index, held_out, DrafterConfig(**common, tree_nodes=0), batch_size=1)
    tree = simulate_acceptance(index, held_out, DrafterConfig(**common, tree_nodes=6), batch_size=1)
    assert tree["tokens_per_pass"] > chain["tokens_per_pass"]
    assert tree["verified_per_pass"] > chain["verified_per_pass"]
