"""NgramIndex: the task's corpus statistics, i.e. next-token counts after every context of 1..N-1 tokens.

Layout per context length m (vectorised): a sorted array of 64-bit context hashes, each
context's total count, and CSR offsets into flat `next_tokens`/`counts` arrays holding its top-K
continuations by count. A whole batch of lookups is one `np.searchsorted` per order.

Counts are additive: `NgramCounts` from shards merge by summing, and an index can absorb new outputs. On
disk (local or `s3://`) an index is one parquet file per order plus `manifest.json`, written last, with the
format version, the tokenizer's name and fingerprint, the orders, corpus statistics and file checksums. An index
also keeps the corpus's tokens (`suffix`, a TokenStore, suffix.py; `suffix.parquet` on disk) for matches longer
than its orders; a version-1 index, without it, still loads and drafts from its orders.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasc_ray.engine.drafts.index_format import (
    MANIFEST,
    IndexWriter,
    NgramIndexError,
    hash_windows,
    read_index_files,
    read_manifest,
    tokenizer_fingerprint,
    tokenizer_meta,
)
from tasc_ray.engine.drafts.suffix import TokenStore

__all__ = [
    "MANIFEST",
    "Match",
    "NgramCounts",
    "NgramIndex",
    "NgramIndexError",
    "OrderTable",
    "hash_windows",
    "read_manifest",
    "tokenize_texts",
    "tokenizer_fingerprint",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_ORDER = 4
DEFAULT_TOP_K = 8
SUFFIX_FILE = "suffix.parquet"  # the corpus's tokens, for matches of any length (format version 2)


@dataclass
class NgramCounts:
    """Full (untruncated) n-gram counts: per context length m, rows of (context hash, next token, count)."""

    max_order: int
    keys: dict[int, np.ndarray] = field(default_factory=dict)  # uint64 context hashes
    next_tokens: dict[int, np.ndarray] = field(default_factory=dict)  # int32
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # int64
    n_sequences: int = 0
    n_tokens: int = 0

    @property
    def orders(self) -> list[int]:
        return list(range(1, self.max_order))

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int] | np.ndarray], max_order: int) -> NgramCounts:
        """Count every (context of m tokens, next token) pair, m = 1..max_order-1, in the sequences."""
        if max_order < 2:
            raise ValueError(f"max_order must be >= 2, got {max_order}")
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        counts = cls(max_order=max_order, n_sequences=len(seqs), n_tokens=int(sum(len(s) for s in seqs)))
        for m in counts.orders:
            # Concatenating sequences with a -1 separator lets one sliding window cover them all; windows that
            # straddle a separator are dropped.
            windows = _windows([s for s in seqs if len(s) > m], m + 1)
            counts.keys[m], counts.next_tokens[m], counts.counts[m] = _sum_by_key(
                hash_windows(windows[:, :m]), windows[:, m].astype(np.int32), np.ones(len(windows), np.int64)
            )
        return counts

    def merge(self, other: NgramCounts) -> NgramCounts:
        """Sum two sets of counts (e.g. from two shards of a corpus)."""
        if other.max_order != self.max_order:
            raise ValueError(f"cannot merge counts of max_order {self.max_order} and {other.max_order}")
        merged = NgramCounts(
            self.max_order, n_sequences=self.n_sequences + other.n_sequences, n_tokens=self.n_tokens + other.n_tokens
        )
        for m in self.orders:
            merged.keys[m], merged.next_tokens[m], merged.counts[m] = _sum_by_key(
                np.concatenate([self.keys[m], other.keys[m]]),
                np.concatenate([self.next_tokens[m], other.next_tokens[m]]),
                np.concatenate([self.counts[m], other.counts[m]]),
            )
        return merged


def _windows(seqs: list[np.ndarray], width: int) -> np.ndarray:
    if not seqs:
        return np.zeros((0, width), dtype=np.int64)
    flat = np.concatenate([np.append(s, -1) for s in seqs])
    windows = np.lib.stride_tricks.sliding_window_view(flat, width)
    return windows[(windows >= 0).all(axis=1)]


def _sum_by_key(keys: np.ndarray, nxt: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate rows with equal (key, next) by summing counts; result sorted by (key, next)."""
    if len(keys) == 0:
        return keys.astype(np.uint64), nxt.astype(np.int32), cnt.astype(np.int64)
    order = np.lexsort((nxt, keys))
    keys, nxt, cnt = keys[order], nxt[order], cnt[order]
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (nxt[1:] != nxt[:-1])])
    return keys[starts], nxt[starts].astype(np.int32), np.add.reduceat(cnt, starts).astype(np.int64)


@dataclass
class OrderTable:
    """Contexts of one length m: sorted hashes, totals, and CSR top-K continuations sorted by count."""

    hashes: np.ndarray  # uint64 [C], sorted
    totals: np.ndarray  # int64 [C], how often the context occurred (all continuations)
    offsets: np.ndarray  # int64 [C + 1]
    next_tokens: np.ndarray  # int32 [offsets[-1]]
    counts: np.ndarray  # int64 [offsets[-1]]

    @classmethod
    def from_counts(
        cls,
        keys: np.ndarray,
        nxt: np.ndarray,
        cnt: np.ndarray,
        totals_keys: np.ndarray | None,
        totals: np.ndarray | None,
        top_k: int,
        min_count: int,
    ) -> OrderTable:
        """Keep each context's top_k continuations with count >= min_count (ties broken by lower token id)."""
        if totals_keys is None:  # totals from the full counts themselves
            totals_keys, _, totals = _sum_by_key(keys, np.zeros(len(keys), np.int32), cnt)
        assert totals is not None, "totals_keys comes with totals"
        keep = cnt >= min_count
        keys, nxt, cnt = keys[keep], nxt[keep], cnt[keep]
        order = np.lexsort((nxt, -cnt, keys))
        keys, nxt, cnt = keys[order], nxt[order], cnt[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(keys)]))
        rank = np.arange(len(keys)) - starts[group] if len(keys) else np.zeros(0, np.int64)
        keep = rank < top_k
        keys, nxt, cnt = keys[keep], nxt[keep], cnt[keep]
        hashes, first = np.unique(keys, return_index=True)
        offsets = np.r_[first, len(keys)].astype(np.int64)
        ctx_totals = totals[np.searchsorted(totals_keys, hashes)] if len(hashes) else np.zeros(0, np.int64)
        return cls(
            hashes.astype(np.uint64), ctx_totals.astype(np.int64), offsets, nxt.astype(np.int32), cnt.astype(np.int64)
        )

    def to_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expand to (context hash, next token, count) rows."""
        return np.repeat(self.hashes, np.diff(self.offsets)), self.next_tokens, self.counts

    def to_arrow(self) -> pa.Table:
        return pa.table(
            {
                "context_hash": pa.array(self.hashes, pa.uint64()),
                "total": pa.array(self.totals, pa.int64()),
                "next_tokens": pa.ListArray.from_arrays(
                    pa.array(self.offsets.astype(np.int32)), pa.array(self.next_tokens, pa.int32())
                ),
                "counts": pa.ListArray.from_arrays(
                    pa.array(self.offsets.astype(np.int32)), pa.array(self.counts, pa.int64())
                ),
            }
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> OrderTable:
        nxt = table.column("next_tokens").combine_chunks()
        cnt = table.column("counts").combine_chunks()
        offsets = nxt.offsets.to_numpy().astype(np.int64)
        return cls(
            table.column("context_hash").to_numpy().astype(np.uint64),
            table.column("total").to_numpy().astype(np.int64),
            offsets - offsets[0],
            nxt.flatten().to_numpy().astype(np.int32),
            cnt.flatten().to_numpy().astype(np.int64),
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.hashes, self.totals, self.offsets, self.next_tokens, self.counts))


@dataclass
class Match:
    """The continuations of one row's longest matching context."""

    order: int  # context length that matched
    next_tokens: np.ndarray
    probs: np.ndarray  # count / context total


class NgramIndex:
    """Top-K next-token statistics of a corpus of outputs, for contexts of 1..max_order-1 tokens."""

    def __init__(
        self,
        tables: dict[int, OrderTable],
        max_order: int,
        top_k: int,
        min_count: int = 1,
        tokenizer_name: str = "",
        fingerprint: str = "",
        vocab_size: int = 0,
        n_sequences: int = 0,
        n_tokens: int = 0,
        suffix: TokenStore | None = None,
    ) -> None:
        self.tables, self.max_order, self.top_k, self.min_count = tables, max_order, top_k, min_count
        self.tokenizer_name, self.fingerprint, self.vocab_size = tokenizer_name, fingerprint, vocab_size
        self.n_sequences, self.n_tokens = n_sequences, n_tokens
        self.suffix = suffix  # the corpus's tokens, for matches of any length (None: the n-gram orders only)

    # ----- building -----
    @classmethod
    def from_counts(
        cls,
        counts: NgramCounts,
        top_k: int = DEFAULT_TOP_K,
        min_count: int = 1,
        tokenizer: Any = None,
        suffix: TokenStore | None = None,
    ) -> NgramIndex:
        tables = {
            m: OrderTable.from_counts(
                counts.keys[m], counts.next_tokens[m], counts.counts[m], None, None, top_k, min_count
            )
            for m in counts.orders
        }
        return cls(
            tables,
            counts.max_order,
            top_k,
            min_count,
            n_sequences=counts.n_sequences,
            n_tokens=counts.n_tokens,
            suffix=suffix,
            **tokenizer_meta(tokenizer),
        )

    @classmethod
    def build(
        cls,
        sequences: Iterable[Sequence[int] | np.ndarray],
        max_order: int = DEFAULT_MAX_ORDER,
        top_k: int = DEFAULT_TOP_K,
        min_count: int = 1,
        tokenizer: Any = None,
        suffix: bool = True,
    ) -> NgramIndex:
        """Build from token-id sequences (outputs tokenised with the target model's tokenizer); with `suffix`, keep
        the sequences too, as a TokenStore for matches of any length."""
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        store = corpus_store(seqs) if suffix else None
        return cls.from_counts(NgramCounts.from_sequences(seqs, max_order), top_k, min_count, tokenizer, store)

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        tokenizer: Any,
        max_order: int = DEFAULT_MAX_ORDER,
        top_k: int = DEFAULT_TOP_K,
        min_count: int = 1,
        batch_size: int = 1024,
        suffix: bool = True,
    ) -> NgramIndex:
        """Tokenise output texts (no special tokens) and build."""
        sequences = tokenize_texts(texts, tokenizer, batch_size)
        return cls.build(sequences, max_order, top_k, min_count, tokenizer, suffix)

    def merge(self, other: NgramIndex) -> NgramIndex:
        """Add another index's counts to this one's. Exact where neither side truncated a context to top_k."""
        if other.max_order != self.max_order:
            raise NgramIndexError(f"cannot merge indexes of max_order {self.max_order} and {other.max_order}")
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise NgramIndexError(
                f"cannot merge indexes built with different tokenizers ({self.tokenizer_name!r} "
                f"{self.fingerprint} vs {other.tokenizer_name!r} {other.fingerprint})"
            )
        tables = {}
        for m in self.orders:
            a, b = self.tables[m], other.tables[m]
            keys, nxt, cnt = _sum_by_key(*(np.concatenate(pair) for pair in zip(a.to_rows(), b.to_rows())))
            tkeys, _, totals = _sum_by_key(
                np.concatenate([a.hashes, b.hashes]),
                np.zeros(len(a.hashes) + len(b.hashes), np.int32),
                np.concatenate([a.totals, b.totals]),
            )
            tables[m] = OrderTable.from_counts(
                keys, nxt, cnt, tkeys, totals, max(self.top_k, other.top_k), max(self.min_count, other.min_count)
            )
        suffix = None
        if self.suffix is not None and other.suffix is not None:
            suffix = corpus_store(self.suffix.sequences() + other.suffix.sequences())
        elif self.suffix is not None or other.suffix is not None:
            logger.warning("merging an index with a token store and one without: the merged index has none")
        return NgramIndex(
            tables,
            self.max_order,
            max(self.top_k, other.top_k),
            max(self.min_count, other.min_count),
            self.tokenizer_name or other.tokenizer_name,
            self.fingerprint or other.fingerprint,
            self.vocab_size or other.vocab_size,
            self.n_sequences + other.n_sequences,
            self.n_tokens + other.n_tokens,
            suffix,
        )

    # ----- querying -----
    @property
    def orders(self) -> list[int]:
        return list(range(1, self.max_order))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values()) + (self.suffix.nbytes if self.suffix is not None else 0)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one the index was built with (vocabulary size, then fingerprint)."""
        if self.vocab_size and self.vocab_size != len(tokenizer):
            raise NgramIndexError(
                f"index was built for a vocabulary of {self.vocab_size} tokens ({self.tokenizer_name!r}), but the "
                f"model's tokenizer has {len(tokenizer)}; rebuild the index with this model's tokenizer"
            )
        fingerprint = tokenizer_fingerprint(tokenizer)
        if self.fingerprint and fingerprint != self.fingerprint:
            raise NgramIndexError(
                f"index was built for tokenizer {self.tokenizer_name!r} (fingerprint {self.fingerprint}), "
                f"but the model's tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has fingerprint "
                f"{fingerprint}; rebuild the index with this model's tokenizer"
            )

    def longest_matches(self, histories: Sequence[Sequence[int]]) -> list[Match | None]:
        """For each history, the continuations of its longest suffix (<= max_order-1 tokens) seen in the corpus."""
        result: list[Match | None] = [None] * len(histories)
        pending = np.arange(len(histories))
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        for m in reversed(self.orders):
            rows = pending[lengths[pending] >= m]
            if len(rows) == 0:
                continue
            table = self.tables[m]
            if len(table.hashes) == 0:
                continue
            windows = np.array([histories[r][len(histories[r]) - m :] for r in rows], dtype=np.int64)
            keys = hash_windows(windows)
            pos = np.minimum(np.searchsorted(table.hashes, keys), len(table.hashes) - 1)
            found = table.hashes[pos] == keys
            for r, p in zip(rows[found], pos[found]):
                lo, hi = table.offsets[p], table.offsets[p + 1]
                result[r] = Match(m, table.next_tokens[lo:hi], table.counts[lo:hi] / table.totals[p])
            pending = np.setdiff1d(pending, rows[found], assume_unique=True)
            if len(pending) == 0:
                break
        return result

    # ----- statistics -----
    def stats(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer_name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "max_order": self.max_order,
            "top_k": self.top_k,
            "min_count": self.min_count,
            "corpus_sequences": self.n_sequences,
            "corpus_tokens": self.n_tokens,
            "orders": {
                m: {"contexts": int(len(t.hashes)), "continuations": int(len(t.next_tokens))}
                for m, t in self.tables.items()
            },
            "suffix_tokens": self.suffix.size if self.suffix is not None else 0,
            "memory_bytes": self.nbytes,
        }

    # ----- persistence -----
    def save(self, path: str, storage_options: dict[str, Any] | None = None) -> str:
        """Write the order files, then manifest.json last, to a local directory or s3:// prefix."""
        writer = IndexWriter(path, storage_options)
        files = {}
        for m, table in self.tables.items():
            buf = io.BytesIO()
            pq.write_table(table.to_arrow(), buf)
            files[f"order-{m}.parquet"] = {
                "order": m,
                **writer.write(f"order-{m}.parquet", buf.getvalue()),
                "contexts": int(len(table.hashes)),
                "continuations": int(len(table.next_tokens)),
            }
        if self.suffix is not None:
            buf = io.BytesIO()
            pq.write_table(pa.table({"token": pa.array(self.suffix.tokens[: self.suffix.size], pa.int32())}), buf)
            files[SUFFIX_FILE] = {"kind": "suffix", **writer.write(SUFFIX_FILE, buf.getvalue())}
        writer.commit(
            {
                "tokenizer": {
                    "name": self.tokenizer_name,
                    "fingerprint": self.fingerprint,
                    "vocab_size": self.vocab_size,
                },
                "max_order": self.max_order,
                "orders": self.orders,
                "top_k": self.top_k,
                "min_count": self.min_count,
                "corpus": {"sequences": self.n_sequences, "tokens": self.n_tokens},
                "suffix": {"tokens": self.suffix.size} if self.suffix is not None else None,
            },
            files,
        )
        logger.info("saved index (%d orders, %.1f MB in memory) to %s", len(self.tables), self.nbytes / 1e6, path)
        return path

    @classmethod
    def load(cls, path: str, storage_options: dict[str, Any] | None = None) -> NgramIndex:
        """Read an index, verifying the manifest and each file's checksum."""
        manifest = read_manifest(path, storage_options)
        tables, suffix = {}, None
        for info, data in read_index_files(path, manifest, storage_options):
            table = pq.read_table(io.BytesIO(data))
            if info.get("kind") == "suffix":
                suffix = TokenStore.from_tokens(table.column("token").to_numpy())
            else:
                tables[int(info["order"])] = OrderTable.from_arrow(table)
        missing = set(manifest["orders"]) - set(tables)
        if missing:
            raise NgramIndexError(f"index {path}: manifest lists no file for orders {sorted(missing)}")
        tok = manifest["tokenizer"]
        return cls(
            tables,
            manifest["max_order"],
            manifest["top_k"],
            manifest.get("min_count", 1),
            tok["name"],
            tok["fingerprint"],
            tok["vocab_size"],
            manifest["corpus"]["sequences"],
            manifest["corpus"]["tokens"],
            suffix,
        )


def corpus_store(sequences: Iterable[Sequence[int] | np.ndarray]) -> TokenStore:
    """The corpus's TokenStore: its sequences in a canonical (sorted) order, so that any build of the same corpus,
    in one process or sharded over a Ray cluster, stores the same bytes."""
    return TokenStore.frozen(sorted(tuple(np.asarray(s).tolist()) for s in sequences if len(s)))


def tokenize_texts(texts: Iterable[str], tokenizer: Any, batch_size: int = 1024) -> list[np.ndarray]:
    """Token ids of each text, without special tokens."""
    texts = list(texts)
    out: list[np.ndarray] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], add_special_tokens=False)["input_ids"]
        out.extend(np.asarray(ids, dtype=np.int32) for ids in enc)
    return out
