"""TokenStore: longest suffix matches of any length (against brute force), walking them, eviction; the index's
token store on disk; the drafter following a repeat longer than its n-gram orders."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.drafts.index_format import MANIFEST
from tasc_ray.engine.drafts.suffix import ANCHOR, TokenStore


def brute_force(
    sequences: list[list[int]], history: list[int], open_last: bool, max_match: int = 64
) -> tuple[int, list[int]]:
    """(longest match length >= ANCHOR, sorted continuations of its occurrences, -1 for a sequence's end) by
    scanning every position; `open_last`: the last sequence may still grow, so its last token has no continuation."""
    best, nexts = 0, []
    for i, seq in enumerate(sequences):
        last = len(seq) - 1 if open_last and i == len(sequences) - 1 else len(seq)
        for e in range(last):
            length = 0
            while length < min(len(history), max_match) and e - length >= 0 and seq[e - length] == history[-1 - length]:
                length += 1
            follow = seq[e + 1] if e + 1 < len(seq) else -1
            if length > best:
                best, nexts = length, [follow]
            elif length == best and length:
                nexts.append(follow)
    return (best, sorted(nexts)) if best >= ANCHOR else (0, [])


@pytest.mark.parametrize("frozen", [False, True])
def test_longest_match_agrees_with_brute_force(frozen):
    rng = random.Random(0)
    sequences = [[rng.randrange(6) for _ in range(rng.randrange(5, 60))] for _ in range(30)]
    if frozen:
        store = TokenStore.frozen(sequences)
    else:
        store = TokenStore()
        for seq in sequences:
            store.append(seq, new_sequence=True)
    for _ in range(300):
        history = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        length, nexts = brute_force(sequences, history, open_last=not frozen)
        match = store.longest_match(history)
        if length == 0:
            assert match is None
            continue
        assert match is not None and match.length == length, history
        assert sorted(store.tokens[match.ends + 1].tolist()) == nexts


def test_walking_a_match_follows_the_repeat():
    store = TokenStore.frozen([[1, 2, 3, 4, 5, 6, 7, 8], [9, 2, 3, 4, 5, 0]])
    match = store.longest_match([2, 3, 4, 5])
    assert match is not None and match.length == 4
    tokens, shares = match.continuations()
    assert tokens.tolist() == [0, 6] and shares.tolist() == [0.5, 0.5]  # ties: lower token first
    walked = match.advance(6)
    assert walked is not None and walked.length == 5 and walked.continuations()[0].tolist() == [7]
    assert match.advance(99) is None
    end = store.longest_match([1, 2, 3, 4, 5, 6, 7, 8])  # matches up to the end of a sequence: nothing follows
    assert end is not None and len(end.continuations()[0]) == 0


def test_a_store_with_capacity_forgets_its_oldest_sequences():
    store = TokenStore(capacity=2)
    store.append([1, 2, 3, 4, 5], new_sequence=True)
    store.append([6, 7, 8, 9, 10], new_sequence=True)
    assert store.longest_match([1, 2, 3, 4]).continuations()[0].tolist() == [5]
    store.append([11, 12, 13, 14, 15], new_sequence=True)  # evicts the first
    assert store.longest_match([1, 2, 3, 4]) is None
    assert store.sequences() == [[6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    for i in range(50):  # many evictions: the dead space is reclaimed, matches stay right
        store.append([100 + i, 1, 2, 3, 4, 5 + i], new_sequence=True)
    assert store.size < 40 and len(store) == 2
    assert store.longest_match([1, 2, 3, 4]).continuations()[0].tolist() == [53, 54]


def test_index_keeps_its_token_store_on_disk(tmp_path):
    sequences = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [8, 9]]
    index = NgramIndex.build(sequences, max_order=3)
    assert index.suffix is not None and index.stats()["suffix_tokens"] == index.suffix.size
    index.save(str(tmp_path / "idx"))
    loaded = NgramIndex.load(str(tmp_path / "idx"))
    assert loaded.suffix is not None and loaded.suffix.sequences() == sorted(sequences)
    assert loaded.suffix.longest_match([0, 2, 3, 4, 5]).continuations()[0].tolist() == [6, 7]
    merged = loaded.merge(index)
    assert merged.suffix is not None and len(merged.suffix) == 6
    without = NgramIndex.build(sequences, max_order=3, suffix=False)
    without.save(str(tmp_path / "plain"))
    assert NgramIndex.load(str(tmp_path / "plain")).suffix is None


def test_a_format_1_index_still_loads(tmp_path):
    """Indexes written before the token store (format version 1, order files only) load and draft from orders."""
    NgramIndex.build([[1, 2, 3]], max_order=3, suffix=False).save(str(tmp_path / "v1"))
    manifest_path = tmp_path / "v1" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    del manifest["suffix"]
    manifest_path.write_text(json.dumps(manifest))
    index = NgramIndex.load(str(tmp_path / "v1"))
    drafter = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.0, live_outputs=0))
    assert drafter.propose([drafter.new_row([1])])[0].tokens == [2, 3]


def test_drafter_follows_a_repeat_longer_than_its_orders():
    """Two corpus outputs share a 4-token stretch then differ: orders <= 3 cannot tell them apart after it, a
    suffix match of the row's longer history can."""
    shared = [20, 21, 22, 23]
    corpus = [[1, 2, *shared, 30, 31, 32, 33], [5, 6, *shared, 40, 41, 42, 43]] + [[5, 6, *shared, 40, 41, 42, 43]]
    index = NgramIndex.build(corpus, max_order=4)
    drafter = Drafter(index, DrafterConfig(mode=DraftMode.CORPUS, min_path_prob=0.0, max_draft=4, live_outputs=0))
    prompt = [9, 1, 2, *shared]  # the row repeats the first output's start; orders <= 3 would say 40 41 42 43
    assert drafter.propose([drafter.new_row(prompt)])[0].tokens == [30, 31, 32, 33]


def test_context_long_match_in_the_row_itself():
    row_text = [7, 8, 9, 10, 11, 12, 13, 50, 51, 7, 8, 9, 10, 11]
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, min_path_prob=0.0, max_draft=3))
    row = drafter.new_row(row_text)
    assert drafter.propose([row])[0].tokens == [12, 13, 50]
    assert np.array_equal(row.store.tokens[: row.store.size], row_text)
