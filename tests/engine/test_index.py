"""NgramIndex: counting, top-K, lookups, merge, save/load (local and S3 over HTTP), refusal of bad indexes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasc_ray.engine.drafts.index import NgramCounts, NgramIndex, NgramIndexError, hash_windows


def brute_force_counts(seqs, m):
    counts = {}
    for s in seqs:
        for i in range(len(s) - m):
            key = tuple(s[i : i + m])
            counts.setdefault(key, {}).setdefault(s[i + m], 0)
            counts[key][s[i + m]] += 1
    return counts


def test_counts_match_brute_force(rng):
    seqs = [[rng.randrange(6) for _ in range(rng.randint(0, 30))] for _ in range(50)]
    index = NgramIndex.build(seqs, max_order=4, top_k=100)
    assert index.n_tokens == sum(map(len, seqs))
    for m in (1, 2, 3):
        expected = brute_force_counts(seqs, m)
        table = index.tables[m]
        assert len(table.hashes) == len(expected)
        for context, nexts in expected.items():
            match = index.longest_matches([list(context)])[0]
            assert match is not None
            if match.order == m:
                got = dict(zip(match.next_tokens.tolist(), np.round(match.probs * sum(nexts.values())).astype(int)))
                assert got == nexts


def test_top_k_keeps_most_frequent_and_totals():
    seqs = [[1, 2]] * 5 + [[1, 3]] * 3 + [[1, 4]] * 1
    index = NgramIndex.build(seqs, max_order=2, top_k=2)
    match = index.longest_matches([[1]])[0]
    assert match.next_tokens.tolist() == [2, 3]
    assert np.allclose(match.probs, [5 / 9, 3 / 9])  # totals count the truncated continuation too


def test_min_count_prunes():
    index = NgramIndex.build([[1, 2]] * 3 + [[1, 3]], max_order=2, min_count=2)
    assert index.longest_matches([[1]])[0].next_tokens.tolist() == [2]


def test_longest_match_backs_off():
    index = NgramIndex.build([[1, 2, 3, 4], [9, 3, 5]], max_order=4)
    assert index.longest_matches([[1, 2, 3]])[0].order == 3
    m = index.longest_matches([[7, 7, 3]])[0]
    assert m.order == 1 and sorted(m.next_tokens.tolist()) == [4, 5]
    assert index.longest_matches([[8]])[0] is None
    assert index.longest_matches([[]])[0] is None


def test_hash_is_order_and_length_sensitive():
    h = hash_windows(np.array([[1, 2], [2, 1]]))
    assert h[0] != h[1]
    assert hash_windows(np.array([[1]]))[0] != hash_windows(np.array([[0, 1]]))[0]


def test_merge_adds_counts(rng):
    a = [[rng.randrange(8) for _ in range(20)] for _ in range(30)]
    b = [[rng.randrange(8) for _ in range(20)] for _ in range(30)]
    merged = NgramIndex.build(a, 3, top_k=50).merge(NgramIndex.build(b, 3, top_k=50))
    whole = NgramIndex.build(a + b, 3, top_k=50)
    for m in merged.orders:
        for x, y in zip(merged.tables[m].__dict__.values(), whole.tables[m].__dict__.values()):
            assert np.array_equal(x, y)
    assert merged.n_tokens == whole.n_tokens
    counts = NgramCounts.from_sequences(a, 3).merge(NgramCounts.from_sequences(b, 3))
    assert np.array_equal(NgramIndex.from_counts(counts, 50).tables[2].counts, whole.tables[2].counts)


def _assert_same(x: NgramIndex, y: NgramIndex) -> None:
    assert x.orders == y.orders and x.fingerprint == y.fingerprint and x.n_tokens == y.n_tokens
    for m in x.orders:
        for name in ("hashes", "totals", "offsets", "next_tokens", "counts"):
            assert np.array_equal(getattr(x.tables[m], name), getattr(y.tables[m], name)), name


def test_save_load_round_trip_local(tmp_path, tiny_tokenizer, task_rows):
    index = NgramIndex.from_texts([r["output"] for r in task_rows], tiny_tokenizer)
    index.save(str(tmp_path / "idx"))
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["tokenizer"]["fingerprint"] == index.fingerprint
    assert manifest["corpus"]["tokens"] == index.n_tokens
    _assert_same(index, NgramIndex.load(str(tmp_path / "idx")))


def test_save_load_round_trip_s3(s3_bucket, tiny_tokenizer, task_rows):
    index = NgramIndex.from_texts([r["output"] for r in task_rows], tiny_tokenizer)
    url = f"s3://{s3_bucket}/indexes/task"
    index.save(url)
    _assert_same(index, NgramIndex.load(url))


def test_load_refuses_bad_indexes(tmp_path, tiny_tokenizer):
    index = NgramIndex.build([[1, 2, 3]] * 3, tokenizer=tiny_tokenizer)
    with pytest.raises(NgramIndexError, match="no manifest.json"):
        NgramIndex.load(str(tmp_path / "nothing"))
    path = tmp_path / "idx"
    index.save(str(path))
    (path / "order-2.parquet").write_bytes(b"garbage")
    with pytest.raises(NgramIndexError, match="order-2.parquet is corrupt"):
        NgramIndex.load(str(path))
    index.save(str(path))
    (path / "order-1.parquet").unlink()
    with pytest.raises(NgramIndexError, match="order-1.parquet .* missing"):
        NgramIndex.load(str(path))
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(NgramIndexError, match="not valid JSON"):
        NgramIndex.load(str(path))


def test_fingerprint_mismatch_refused(tiny_tokenizer):
    index = NgramIndex.build([[1, 2, 3]], tokenizer=tiny_tokenizer)
    other = type(tiny_tokenizer)(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    other.add_tokens(["name["])
    with pytest.raises(NgramIndexError, match="rebuild the index"):
        index.check_tokenizer(other)
    index.check_tokenizer(tiny_tokenizer)


def test_manifest_vocab_size_must_match_the_tokenizer(tiny_tokenizer, tmp_path):
    """A manifest whose vocab_size disagrees with the tokenizer is refused, whatever its fingerprint says."""
    path = tmp_path / "idx"
    NgramIndex.build([[1, 2, 3]], tokenizer=tiny_tokenizer).save(str(path))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 32000
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NgramIndexError, match=f"32000 tokens .* has {len(tiny_tokenizer)}"):
        NgramIndex.load(str(path)).check_tokenizer(tiny_tokenizer)
