"""Corpus indexing on Ray Data: distributed n-gram counting of a text column (local disk or S3) into an NgramIndex.

The pipeline, for a corpus of logged outputs in many files:

1. `tasc_ray.io` lists the input files, directories and globs, local or `s3://` (endpoint, region and credentials
   from the standard AWS environment or `storage_options`), and checks every file has the column, with one type;
   parquet files are then read by `ray.data.read_parquet` (column projection), other formats (jsonl, csv, text)
   are read by `tasc_ray.io` on the driver and handed to Ray Data;
2. per block, in an actor pool of `num_workers` actors with fractional CPUs: tokenise (the tokenizer is
   shipped once per actor) and count with `NgramCounts.from_sequences` (vectorised, pre-aggregated per block);
3. a hash-partitioned shuffle by context hash: each count block goes to `num_reducers` reducer actors, each
   keeping the rows whose `hash % num_reducers` is its own and summing them (periodic compaction, so its memory
   is bounded by the number of distinct n-grams of its partition, not by the corpus size);
4. each reducer cuts its partition to the top-K per context (`OrderTable.from_counts`, totals from the full
   counts); partitions hold disjoint contexts, so the driver only concatenates and sorts them;
5. `NgramIndex.save`, whose manifest is written last: an interrupted job never leaves a manifest pointing at
   missing or partial files.

The result is identical (every array of every order, fingerprint, corpus statistics) to the in-process
`NgramIndex.from_texts` on the same rows. `append_to` merges new outputs into an existing index, exactly
where the existing index did not truncate (see `index_truncation`). Null, empty and non-string rows are
skipped and counted. Bad input (missing file, column or bucket, unreadable file) raises `IndexJobError`
(a ValueError) or FileNotFoundError naming the file, column or bucket, before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tasc_ray.engine.drafts.index import (
    DEFAULT_MAX_ORDER,
    DEFAULT_TOP_K,
    NgramCounts,
    NgramIndex,
    OrderTable,
    _sum_by_key,
    corpus_store,
)
from tasc_ray.engine.drafts.index_format import tokenizer_meta
from tasc_ray.io import (
    CorpusError,
    CorpusNotFoundError,
    FileInfo,
    InputFiles,
    check_bucket,
    fsspec_filesystem,
    inspect_files,
    is_remote,
    list_files,
    read_file,
    split_texts,
    storage_options_for,
)
from tasc_ray.stages.datasets import read_dataset

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8192  # rows per map batch: big enough to pre-aggregate, small enough to balance 2 workers
DEFAULT_CPUS_PER_WORKER = 0.5  # fractional, so a 2-CPU cluster still has room for listing and reading files
# Reducers reserve no logical CPU: Ray Data budgets the whole cluster for its own operators, and actors it does
# not know about holding CPUs can starve its file-listing task (1 CPU) and stall the job. They use real CPU, of
# course, while they sum; the OS shares it.
DEFAULT_CPUS_PER_REDUCER = 0.0
DEFAULT_READ_CPUS = 0.25
_LIST_FILES_CPUS = 1.0  # Ray Data's ListFiles task

# Statistics travel through the shuffle as rows of order -1, keyed by these ids, and are summed like counts.
_STATS = ("rows", "sequences", "tokens", "skipped_null", "skipped_empty", "skipped_non_string")
_STATS_ORDER = -1
# With a token store, each sequence's tokens travel as rows of order -2: key = the sequence's id (random per block,
# so the reducers' partitions split sequences evenly), next = the token, count = its position.
_SEQUENCE_ORDER = -2


class IndexJobError(ValueError):
    """An indexing job that cannot run or finish: bad input path, column, bucket, corrupt file, failed workers."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs and output, checked before any work starts
# ----------------------------------------------------------------------------------------------------------------


def open_inputs(
    inputs: str | Sequence[str], column: str, storage_options: dict[str, Any] | None = None
) -> tuple[InputFiles, list[FileInfo]]:
    """The input files (files, directories, globs; local or one remote store) and their inspection: every file
    is readable and has `column`, of one type across files."""
    try:
        files = list_files(inputs, storage_options)
        return files, inspect_files(files, [column])
    except CorpusNotFoundError:
        raise
    except CorpusError as exc:
        raise IndexJobError(str(exc)) from exc


def check_output(out: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The output's fsspec options, after checking its bucket exists (s3://)."""
    opts = storage_options_for(out, overrides)
    if is_remote(out):
        try:
            check_bucket(fsspec_filesystem(out, overrides)[0], out)
        except CorpusError as exc:
            raise IndexJobError(str(exc)) from exc
    return opts


def _find_unreadable(files: InputFiles, column: str) -> str | None:
    """After a failed job: the first file whose column cannot be fully read, with the reason (diagnosis only)."""
    for path in files.paths:
        try:
            read_file(files.fs, path, [column])
        except Exception as exc:  # noqa: BLE001 - any reason to fail is what we report
            return f"{files.url(path)}: {type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Ray: the cluster, the map actors and the reducers
# ----------------------------------------------------------------------------------------------------------------


def _count_rows_table(counts: NgramCounts, stats: dict[str, int]) -> pa.Table:
    """Flatten NgramCounts (and the stats rows) to the shuffle's row format: order, key, next, count."""
    orders, keys, nxts, cnts = [], [], [], []
    for m in counts.orders:
        n = len(counts.keys[m])
        orders.append(np.full(n, m, np.int8))
        keys.append(counts.keys[m])
        nxts.append(counts.next_tokens[m])
        cnts.append(counts.counts[m])
    orders.append(np.full(len(_STATS), _STATS_ORDER, np.int8))
    keys.append(np.arange(len(_STATS), dtype=np.uint64))
    nxts.append(np.zeros(len(_STATS), np.int32))
    cnts.append(np.array([stats.get(s, 0) for s in _STATS], np.int64))
    return pa.table(
        {
            "order": np.concatenate(orders),
            "key": np.concatenate(keys).astype(np.uint64),
            "next": np.concatenate(nxts).astype(np.int32),
            "count": np.concatenate(cnts).astype(np.int64),
        }
    )


def _sequence_rows_table(ids: Sequence[Sequence[int]], rng: np.random.Generator) -> pa.Table:
    """A block's token sequences as shuffle rows: order -2, key = sequence id, next = token, count = position."""
    block_id = np.uint64(rng.integers(1 << 43)) << np.uint64(20)  # unique per block; 2^20 sequences per block
    lengths = np.array([len(s) for s in ids], dtype=np.int64)
    seq = np.repeat(np.arange(len(ids), dtype=np.uint64), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return pa.table(
        {
            "order": np.full(int(lengths.sum()), _SEQUENCE_ORDER, np.int8),
            "key": block_id + seq,
            "next": np.concatenate([np.asarray(s, np.int32) for s in ids]).astype(np.int32),
            "count": np.arange(int(lengths.sum()), dtype=np.int64) - starts,
        }
    )


class CountBatch:
    """Ray Data map_batches UDF (one per actor): tokenise a block's texts and count its n-grams.

    A fast tokenizer travels as its `tokenizers` JSON and is rebuilt with the Rust library alone, so an actor
    starts without importing transformers; the ids are the same (the wrapper calls the same `encode_batch`)."""

    def __init__(self, tokenizer: Any, column: str, max_order: int, keep_tokens: bool = True) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker; scale with workers
        if isinstance(tokenizer, str):
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(tokenizer)
            self.encode = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            self.encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.column, self.max_order, self.keep_tokens = column, max_order, keep_tokens
        self.rng = np.random.default_rng()

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, stats = split_texts(batch.column(self.column))
        ids = self.encode(texts) if texts else []
        counts = NgramCounts.from_sequences(ids, self.max_order)
        stats.update(sequences=counts.n_sequences, tokens=counts.n_tokens)
        table = _count_rows_table(counts, stats)
        return pa.concat_tables([table, _sequence_rows_table(ids, self.rng)]) if self.keep_tokens and ids else table


def portable_tokenizer(tokenizer: Any) -> Any:
    """What CountBatch gets: the Rust tokenizer's JSON for a fast tokenizer, else the tokenizer object itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else tokenizer


class Reducer:
    """Sums the count rows of one hash partition of the context keys (a Ray actor; see `_reducer_actor`)."""

    def __init__(self, partition: int, num_partitions: int, max_order: int, compact_rows: int = 2_000_000) -> None:
        self.partition, self.num_partitions, self.max_order = partition, num_partitions, max_order
        self.compact_rows = compact_rows
        self.orders = list(range(1, max_order))
        self.full: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
            m: (np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int64)) for m in self.orders
        }
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {m: [] for m in self.orders}
        self.pending_rows = 0
        self.stats = np.zeros(len(_STATS), np.int64)
        self.sequence_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.blocks = 0
        self.peak_rows = 0

    def add(self, block: pa.Table) -> int:
        """Keep this partition's rows of a count block; returns the rows kept."""
        order = block.column("order").to_numpy()
        key = block.column("key").to_numpy()
        nxt = block.column("next").to_numpy()
        cnt = block.column("count").to_numpy()
        stat_rows = order == _STATS_ORDER
        mine = (key % np.uint64(self.num_partitions)) == np.uint64(self.partition)
        s = stat_rows & mine
        np.add.at(self.stats, key[s].astype(np.int64), cnt[s])
        seq = mine & (order == _SEQUENCE_ORDER)
        if seq.any():
            self.sequence_rows.append((key[seq], nxt[seq], cnt[seq]))
        kept = 0
        for m in self.orders:
            sel = mine & (order == m)
            if sel.any():
                self.pending[m].append((key[sel], nxt[sel], cnt[sel]))
                kept += int(sel.sum())
        self.pending_rows += kept
        self.blocks += 1
        if self.pending_rows >= max(self.compact_rows, self._full_rows()):
            self._compact()
        return kept

    def _full_rows(self) -> int:
        return sum(len(k) for k, _, _ in self.full.values())

    def _compact(self) -> None:
        for m in self.orders:
            if self.pending[m]:
                parts = [self.full[m], *self.pending[m]]
                self.full[m] = _sum_by_key(*(np.concatenate(cols) for cols in zip(*parts)))
                self.pending[m] = []
        self.pending_rows = 0
        self.peak_rows = max(self.peak_rows, self._full_rows())

    def finish(
        self, top_k: int, min_count: int, base: dict[int, tuple[np.ndarray, ...]] | None = None
    ) -> dict[str, Any]:
        """Cut each order to its top-K per context (adding `base` rows and totals of an existing index first)."""
        self._compact()
        tables = {}
        for m in self.orders:
            keys, nxt, cnt = self.full[m]
            tkeys, _, totals = _sum_by_key(keys, np.zeros(len(keys), np.int32), cnt)
            if base is not None and m in base:
                bkeys, bnxt, bcnt, bhashes, btotals = base[m]
                keys, nxt, cnt = _sum_by_key(
                    np.concatenate([keys, bkeys]), np.concatenate([nxt, bnxt]), np.concatenate([cnt, bcnt])
                )
                tkeys, _, totals = _sum_by_key(
                    np.concatenate([tkeys, bhashes]),
                    np.zeros(len(tkeys) + len(bhashes), np.int32),
                    np.concatenate([totals, btotals]),
                )
            tables[m] = OrderTable.from_counts(keys, nxt, cnt, tkeys, totals, top_k, min_count)
        return {
            "tables": tables,
            "sequences": self._sequences(),
            "stats": dict(zip(_STATS, self.stats.tolist())),
            "blocks": self.blocks,
            "full_rows": self._full_rows(),
            "peak_full_rows": self.peak_rows,
            "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def _sequences(self) -> list[np.ndarray]:
        """This partition's token sequences, reassembled from their rows."""
        if not self.sequence_rows:
            return []
        key, tok, pos = (np.concatenate(cols) for cols in zip(*self.sequence_rows))
        order = np.lexsort((pos, key))
        key, tok = key[order], tok[order]
        cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
        return np.split(tok, cuts)


def _partition_table(table: OrderTable, num_partitions: int) -> list[tuple[np.ndarray, ...]]:
    """Split an index order table into (keys, next, counts, hashes, totals) rows per hash partition."""
    keys, nxt, cnt = table.to_rows()
    row_part = (keys % np.uint64(num_partitions)).astype(np.int64)
    ctx_part = (table.hashes % np.uint64(num_partitions)).astype(np.int64)
    return [
        (
            keys[row_part == p],
            nxt[row_part == p],
            cnt[row_part == p],
            table.hashes[ctx_part == p],
            table.totals[ctx_part == p],
        )
        for p in range(num_partitions)
    ]


def _concat_partitions(parts: Sequence[OrderTable], top_k: int, min_count: int) -> OrderTable:
    """Join the top-K tables of disjoint key partitions into one sorted table (a no-op re-cut)."""
    rows = [p.to_rows() for p in parts]
    keys, nxt, cnt = (np.concatenate([r[i] for r in rows]) for i in range(3))
    hashes = np.concatenate([p.hashes for p in parts])
    totals = np.concatenate([p.totals for p in parts])
    order = np.argsort(hashes, kind="stable")
    return OrderTable.from_counts(keys, nxt, cnt, hashes[order], totals[order], top_k, min_count)


def index_truncation(index: NgramIndex) -> dict[int, int]:
    """Per order, how many contexts lost continuations to top_k/min_count (their kept counts sum below the total).

    Merging into an index is exact only where this is 0 for every order."""
    out = {}
    for m, t in index.tables.items():
        if len(t.hashes) == 0:
            out[m] = 0
            continue
        kept = np.add.reduceat(t.counts, t.offsets[:-1]) if len(t.counts) else np.zeros(len(t.hashes), np.int64)
        kept[np.diff(t.offsets) == 0] = 0
        out[m] = int((kept < t.totals).sum())
    return out


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class IndexJobResult:
    index: NgramIndex
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Reduced:
    """What the reducers returned, and when: map (start-up, read, count, shuffle) and reduce (top-K) times."""

    results: list[dict[str, Any]]
    blocks: int
    first_block_seconds: float | None
    map_seconds: float
    reduce_seconds: float


def _append_settings(
    append_to: NgramIndex | None, tokenizer: Any, max_order: int, top_k: int, min_count: int
) -> tuple[int, int, dict[int, int]]:
    """(top_k, min_count, truncated contexts of the base index) for appending; the base must match."""
    if append_to is None:
        return top_k, min_count, {}
    if append_to.max_order != max_order:
        raise IndexJobError(f"cannot append: the index has max_order {append_to.max_order}, not {max_order}")
    append_to.check_tokenizer(tokenizer)
    return max(top_k, append_to.top_k), max(min_count, append_to.min_count), index_truncation(append_to)


def count_dataset(
    files: InputFiles,
    infos: list[FileInfo],
    tokenizer: Any,
    column: str,
    max_order: int,
    num_workers: int,
    batch_size: int,
    cpus_per_worker: float | None,
    keep_tokens: bool = True,
) -> Any:
    """The Ray Dataset of count blocks: read the column, cut it into batch-sized blocks, tokenise and count (and,
    with `keep_tokens`, pass the token sequences on for the index's token store)."""
    import ray

    if cpus_per_worker is None:  # leave room for Ray Data's listing and read tasks, or the job can stall
        cluster_cpus = float(ray.cluster_resources().get("CPU", 2.0))
        cpus_per_worker = min(
            DEFAULT_CPUS_PER_WORKER, max(0.05, (cluster_cpus - _LIST_FILES_CPUS - DEFAULT_READ_CPUS) / num_workers)
        )
    # Ray Data coalesces small files into few read blocks (one busy worker); a streaming repartition (no
    # barrier, no shuffle) cuts them into batch-sized blocks that spread over the actor pool.
    ds = read_dataset(files, [column], infos, num_cpus=DEFAULT_READ_CPUS)
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.map_batches(
        CountBatch,
        fn_constructor_kwargs={
            "tokenizer": portable_tokenizer(tokenizer),
            "column": column,
            "max_order": max_order,
            "keep_tokens": keep_tokens,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=cpus_per_worker,
    )


def reduce_counts(
    counted: Any,
    num_reducers: int,
    max_order: int,
    top_k: int,
    min_count: int,
    append_to: NgramIndex | None,
    cpus_per_reducer: float,
    max_in_flight: int,
) -> _Reduced:
    """Stream the count blocks to `num_reducers` reducer actors (at most `max_in_flight` adds pending), then cut
    each partition to its top-K (with the base index's rows when appending). Reducers are killed at the end."""
    import ray

    t0 = time.perf_counter()
    reducer_cls = ray.remote(Reducer)
    reducers = [
        reducer_cls.options(num_cpus=cpus_per_reducer, max_restarts=0).remote(p, num_reducers, max_order)
        for p in range(num_reducers)
    ]
    base = [None] * num_reducers
    if append_to is not None:
        split = {m: _partition_table(append_to.tables[m], num_reducers) for m in append_to.orders}
        base = [{m: split[m][p] for m in split} for p in range(num_reducers)]
    blocks, first_block_seconds, pending = 0, None, []
    try:
        for bundle in counted.iter_internal_ref_bundles():
            if first_block_seconds is None:  # start-up: planning, listing, reading, starting the actors
                first_block_seconds = time.perf_counter() - t0
            for ref in bundle.block_refs:
                pending.extend(r.add.remote(ref) for r in reducers)
                blocks += 1
            if len(pending) > max_in_flight:
                done, pending = ray.wait(pending, num_returns=len(pending) - max_in_flight)
                ray.get(done)
        ray.get(pending)
        map_seconds = time.perf_counter() - t0
        results = ray.get([r.finish.remote(top_k, min_count, base[p]) for p, r in enumerate(reducers)])
    finally:
        for r in reducers:
            ray.kill(r)
    return _Reduced(results, blocks, first_block_seconds, map_seconds, time.perf_counter() - t0 - map_seconds)


def _run_job(counted: Any, files: InputFiles, column: str, **reduce_args: Any) -> _Reduced:
    """reduce_counts, with failures turned into one IndexJobError that says nothing was written and why."""
    import ray

    try:
        return reduce_counts(counted, **reduce_args)
    except ray.exceptions.RayActorError as exc:
        raise IndexJobError(
            f"a reducer died while indexing {len(files.paths)} files; nothing was written "
            f"(rerun the job): {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:
        if isinstance(exc, IndexJobError):
            raise
        culprit = _find_unreadable(files, column)
        detail = f"unreadable input {culprit}" if culprit else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise IndexJobError(f"indexing failed; nothing was written: {detail}") from exc


def build_index_distributed(
    inputs: str | Sequence[str],
    tokenizer: Any,
    column: str = "output",
    max_order: int = DEFAULT_MAX_ORDER,
    top_k: int = DEFAULT_TOP_K,
    min_count: int = 1,
    num_workers: int = 2,
    num_reducers: int | None = None,
    append_to: NgramIndex | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cpus_per_worker: float | None = None,
    cpus_per_reducer: float = DEFAULT_CPUS_PER_REDUCER,
    max_in_flight: int | None = None,
    suffix: bool = True,
) -> IndexJobResult:
    """Count a corpus's n-grams on Ray Data and build the top-K index (Ray must be initialised).

    `tokenizer` is a Hugging Face tokenizer object (shipped once to each worker). With `append_to`, the new
    counts are added to that index's (same tokenizer and max_order); the summary says whether that was exact.
    With `suffix`, the index keeps the corpus's tokens too (a TokenStore, for matches of any length), the same as
    the in-process build's; appending to an index without one builds none."""
    import ray

    if max_order < 2:
        raise IndexJobError(f"max_order must be >= 2, got {max_order}")
    if top_k < 1 or min_count < 1 or num_workers < 1:
        raise IndexJobError("top_k, min_count and num_workers must be >= 1")
    if not ray.is_initialized():
        raise IndexJobError("Ray is not initialised; call ensure_ray() first")
    top_k, min_count, base_truncated = _append_settings(append_to, tokenizer, max_order, top_k, min_count)
    t0 = time.perf_counter()
    files, infos = open_inputs(inputs, column, storage_options)
    logger.info(
        "indexing column %r of %d files (%d rows) with %d workers",
        column,
        len(files.paths),
        sum(i.rows for i in infos),
        num_workers,
    )
    num_reducers = num_reducers or num_workers
    if suffix and append_to is not None and append_to.suffix is None:
        logger.warning("the index appended to has no token store (format version 1): the result has none either")
        suffix = False
    counted = count_dataset(
        files, infos, tokenizer, column, max_order, num_workers, batch_size, cpus_per_worker, keep_tokens=suffix
    )
    reduced = _run_job(
        counted,
        files,
        column,
        num_reducers=num_reducers,
        max_order=max_order,
        top_k=top_k,
        min_count=min_count,
        append_to=append_to,
        cpus_per_reducer=cpus_per_reducer,
        max_in_flight=max_in_flight or 4 * num_reducers,
    )
    index, stats = _assemble(reduced, files, column, tokenizer, max_order, top_k, min_count, append_to, suffix)
    summary = _job_summary(stats, reduced, len(files.paths), num_workers, num_reducers, time.perf_counter() - t0)
    if append_to is not None:
        summary.update(appended=True, append_exact=not any(base_truncated.values()))
        if not summary["append_exact"]:
            logger.warning(
                "the existing index had truncated contexts %s (top_k/min_count): the merged counts "
                "of those contexts are lower bounds",
                base_truncated,
            )
    return IndexJobResult(index, summary)


def _assemble(
    reduced: _Reduced,
    files: InputFiles,
    column: str,
    tokenizer: Any,
    max_order: int,
    top_k: int,
    min_count: int,
    append_to: NgramIndex | None,
    suffix: bool = True,
) -> tuple[NgramIndex, dict[str, int]]:
    """The index from the reducers' disjoint partitions, and the corpus statistics summed over them."""
    results = reduced.results
    stats = {s: sum(res["stats"][s] for res in results) for s in _STATS}
    if stats["sequences"] == 0 and append_to is None:
        raise IndexJobError(
            f"column {column!r} of {len(files.paths)} files has no non-empty text rows "
            f"({stats['rows']} rows: {stats['skipped_null']} null, {stats['skipped_empty']} empty, "
            f"{stats['skipped_non_string']} non-string)"
        )
    tables = {
        m: _concat_partitions([res["tables"][m] for res in results], top_k, min_count) for m in range(1, max_order)
    }
    n_sequences, n_tokens = stats["sequences"], stats["tokens"]
    if append_to is not None:
        n_sequences += append_to.n_sequences
        n_tokens += append_to.n_tokens
    store = None
    if suffix:
        sequences = [seq for res in results for seq in res["sequences"]]
        if append_to is not None and append_to.suffix is not None:
            sequences += append_to.suffix.sequences()
        store = corpus_store(sequences)
    meta = tokenizer_meta(tokenizer)
    index = NgramIndex(
        tables, max_order, top_k, min_count, n_sequences=n_sequences, n_tokens=n_tokens, suffix=store, **meta
    )
    skipped = stats["skipped_null"] + stats["skipped_empty"] + stats["skipped_non_string"]
    if skipped:
        logger.warning(
            "skipped %d of %d rows (%d null, %d empty, %d non-string)",
            skipped,
            stats["rows"],
            stats["skipped_null"],
            stats["skipped_empty"],
            stats["skipped_non_string"],
        )
    return index, stats


def _job_summary(
    stats: dict[str, int], reduced: _Reduced, n_files: int, num_workers: int, num_reducers: int, elapsed: float
) -> dict[str, Any]:
    skipped = stats["skipped_null"] + stats["skipped_empty"] + stats["skipped_non_string"]
    summary = {
        "files": n_files,
        "rows": stats["rows"],
        "sequences": stats["sequences"],
        "tokens": stats["tokens"],
        "skipped_rows": skipped,
        "skipped_null": stats["skipped_null"],
        "skipped_empty": stats["skipped_empty"],
        "skipped_non_string": stats["skipped_non_string"],
        "num_workers": num_workers,
        "num_reducers": num_reducers,
        "count_blocks": reduced.blocks,
        "seconds": elapsed,
        "map_seconds": reduced.map_seconds,
        "first_block_seconds": reduced.first_block_seconds,
        "reduce_seconds": reduced.reduce_seconds,
        "tokens_per_s": stats["tokens"] / elapsed if elapsed else 0.0,
        "full_count_rows": sum(res["full_rows"] for res in reduced.results),
        "reducer_maxrss_bytes": [res["maxrss_bytes"] for res in reduced.results],
    }
    logger.info(
        "indexed %d sequences (%d tokens) in %.1f s (%.0f tokens/s)",
        stats["sequences"],
        stats["tokens"],
        elapsed,
        summary["tokens_per_s"],
    )
    return summary


def index_corpus(
    inputs: str | Sequence[str],
    out: str,
    tokenizer: Any,
    column: str = "output",
    max_order: int = DEFAULT_MAX_ORDER,
    top_k: int = DEFAULT_TOP_K,
    min_count: int = 1,
    num_workers: int = 2,
    append_to: str | None = None,
    storage_options: dict[str, Any] | None = None,
    **job_options: Any,
) -> dict[str, Any]:
    """Build (or, with `append_to`, extend) an index from a corpus on Ray Data and save it to `out`.

    The output location (and its bucket) is checked before the job runs; the index is written only after the
    job succeeded, manifest last. Returns a summary dict."""
    out_opts = check_output(out, storage_options)
    base = None
    if append_to is not None:
        base = NgramIndex.load(append_to, check_output(append_to, storage_options))
    result = build_index_distributed(
        inputs,
        tokenizer,
        column,
        max_order,
        top_k,
        min_count,
        num_workers,
        append_to=base,
        storage_options=storage_options,
        **job_options,
    )
    t0 = time.perf_counter()
    result.index.save(out, out_opts)
    summary = {"out": out, **result.summary, "save_seconds": time.perf_counter() - t0, **result.index.stats()}
    if append_to is not None:
        summary["append_to"] = append_to
    logger.info("wrote index %s", out)
    return json.loads(json.dumps(summary, default=str))
