"""The KV cache helpers: the attention mask, compaction of masked slots, and the shared prompt-prefix cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tasc_ray.engine.kv_cache import PrefixCache, PrefixKV, attention_mask, common_prefix_length, compact


def _cache(rows: int, slots: int) -> DynamicCache:
    """A one-layer cache whose key at (row, slot) is row * 100 + slot (value the same, negated)."""
    cache = DynamicCache()
    keys = (torch.arange(rows)[:, None] * 100 + torch.arange(slots)[None, :]).float()[:, None, :, None]
    cache.update(keys, -keys, 0)
    return cache


def test_attention_mask_is_causal_over_valid_slots():
    valid = torch.tensor([[False, True, True, True], [True, True, False, True]])
    mask = attention_mask(valid, q=2, dtype=torch.float32)
    assert mask.shape == (2, 1, 2, 4)
    allowed = mask[:, 0] == 0
    # query 0 sits in slot 2, query 1 in slot 3: each sees valid slots up to its own
    assert allowed[0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert allowed[1].tolist() == [[True, True, False, False], [True, True, False, True]]


def test_compact_keeps_each_rows_valid_slots_in_order():
    cache = _cache(rows=2, slots=5)
    valid = torch.tensor([[True, False, True, False, True], [False, False, True, True, False]])
    new_valid = compact(cache, valid)
    assert new_valid.tolist() == [[True, True, True], [False, True, True]]
    keys = cache.layers[0].keys[:, 0, :, 0]
    assert keys[0].tolist() == [0, 2, 4]
    assert keys[1, 1:].tolist() == [102, 103]
    assert torch.equal(cache.layers[0].values, -cache.layers[0].keys)


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
    assert common_prefix_length([[1, 2], [1, 2]]) == 2


def _prefill_counter(calls: list[list[int]]):
    def prefill(tokens: list[int]) -> PrefixKV:
        calls.append(tokens)
        return PrefixKV(tuple(tokens), [(torch.zeros(1, 1, len(tokens), 1), torch.zeros(1, 1, len(tokens), 1))])

    return prefill


def test_prefix_cache_shares_and_cuts_a_prefix():
    calls: list[list[int]] = []
    cache = PrefixCache(min_tokens=3)
    header = [7, 7, 7, 7, 7]
    first = cache.lookup([header + [1, 2], header + [3]], _prefill_counter(calls))
    assert first is not None and first.tokens == tuple(header) and calls == [header]
    again = cache.lookup([header + [9], header + [8, 8]], _prefill_counter(calls))
    assert again is first and len(calls) == 1  # reused, not recomputed
    shorter = cache.lookup([header[:3] + [1], header[:4] + [2]], _prefill_counter(calls))
    assert shorter is not None and shorter.tokens == tuple(header[:3]) and len(calls) == 1  # cut, not recomputed
    assert shorter.layers[0][0].shape[2] == 3


def test_prefix_cache_single_prompts_compare_with_the_previous_call_and_respect_the_minimum():
    calls: list[list[int]] = []
    cache = PrefixCache(min_tokens=3)
    assert cache.lookup([[1, 2, 3, 4, 5]], _prefill_counter(calls)) is None  # nothing to compare with yet
    found = cache.lookup([[1, 2, 3, 4, 9]], _prefill_counter(calls))
    assert found is not None and found.tokens == (1, 2, 3, 4)
    assert PrefixCache(min_tokens=3).lookup([[1, 2, 9], [1, 2, 8]], _prefill_counter(calls)) is None  # too short
    assert PrefixCache(min_tokens=0).lookup([[1] * 20, [1] * 20], _prefill_counter(calls)) is None  # turned off


def test_prefix_cache_keeps_several_prefixes_and_evicts_the_least_recently_used():
    """Rows of two tasks admitted in turn (continuous batching mixes them): each task's template is prefilled
    once, not every time the other task's rows come in between."""
    calls: list[list[int]] = []
    cache = PrefixCache(min_tokens=3, capacity=2)
    a, b, c = [1] * 6, [2] * 6, [3] * 6
    prefill = _prefill_counter(calls)
    for _ in range(3):
        for header in (a, b):
            cache.lookup([header + [5], header + [6]], prefill)
    assert calls == [a, b]
    single = cache.lookup([a + [4]], prefill)  # one row alone finds its template among the kept ones
    assert single is not None and single.tokens == tuple(a) and len(calls) == 2
    cache.lookup([c + [5], c + [6]], prefill)  # a third template evicts the least recently used (b)
    assert [e.tokens for e in cache.entries] == [tuple(c), tuple(a)]
    cache.lookup([b + [7], b + [8]], prefill)
    assert calls == [a, b, c, b]
