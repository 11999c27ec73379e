"""Drafter: context/corpus/mixed proposals, adaptive length, cost-aware draft length; the step cost model."""

from __future__ import annotations

import pytest

from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.drafter import Drafter
from tasc_ray.spec.index import NgramIndex


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
