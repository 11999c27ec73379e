"""Read columns of data files: parquet, jsonl, csv or text (one row a line), local or S3, files, directories or
globs, with one-line errors that name the file and the column.

    corpus = read_texts("s3://bucket/outputs/", column="output")      # the usable texts, skip counts
    pairs = read_texts("train.jsonl", "output", extra_columns=["prompt"]).extras["prompt"]

The format is a file's suffix: `.parquet`, `.jsonl`/`.ndjson`, `.csv`; any other file is text, one row a line,
its only column named as asked. A directory means every data file below it (`.parquet`, `.jsonl`, `.ndjson`,
`.csv`, `.txt`); directories and globs leave out names that start with `_` or `.` (`_SUCCESS`, `_staging/`), as
Spark and pyarrow do.
Null, empty (or blank) and non-string values of the text column are skipped and counted.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasc_ray.io.storage import (
    arrow_filesystem,
    bucket_problem,
    describe_storage_error,
    error_code,
    fsspec_filesystem,
    is_remote,
    is_storage_error,
    url_of,
)

logger = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "text"}
SKIP_STATS = ("skipped_null", "skipped_empty", "skipped_non_string")


class CorpusError(ValueError):
    """Input that cannot be read: a corrupt file, a missing column or bucket, no usable rows."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """An input path that matches no file."""


def file_format(path: str) -> str:
    """parquet, jsonl, csv, or text (any other suffix)."""
    return FORMATS.get(posixpath.splitext(path)[1].lower(), "text")


# ----------------------------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class InputFiles:
    """The files an input names, on one filesystem."""

    paths: list[str]  # inside `fs`
    fs: Any  # fsspec filesystem
    protocol: str | None  # "s3", ...; None for local files
    storage_options: dict[str, Any] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.protocol}://{path}" if self.protocol else path

    @property
    def urls(self) -> list[str]:
        return [self.url(p) for p in self.paths]

    def arrow_filesystem(self) -> Any:
        """The pyarrow filesystem that reads `paths` (Ray Data takes it)."""
        return arrow_filesystem(self.urls[0], self.storage_options)[0]


def list_files(
    inputs: str | Sequence[str], storage_options: dict[str, Any] | None = None, what: str = "corpus"
) -> InputFiles:
    """Expand files, directories and globs (local or on one remote store) into a sorted list of files."""
    inputs = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs]
    if not inputs:
        raise CorpusError(f"no {what} input given")
    protocols = {i.split("://", 1)[0] if is_remote(i) else "file" for i in inputs}
    if len(protocols) > 1:
        raise CorpusError(f"{what} inputs mix filesystems ({', '.join(sorted(protocols))}); read them separately")
    fs, _ = fsspec_filesystem(inputs[0], storage_options)
    remote = is_remote(inputs[0])
    found: set[str] = set()
    for raw in inputs:
        if remote:
            check_bucket(fs, raw)
        found.update(_expand(fs, raw, storage_options, what))
    protocol = inputs[0].split("://", 1)[0] if remote else None
    return InputFiles(sorted(found), fs, protocol, dict(storage_options or {}))


def _expand(fs: Any, raw: str, storage_options: dict[str, Any] | None, what: str) -> list[str]:
    _, root = fsspec_filesystem(raw, storage_options)
    glob = any(c in root for c in "*?[")
    try:
        if glob:
            found = [f for f in fs.glob(root) if not posixpath.basename(f).startswith(("_", ".")) and fs.isfile(f)]
        elif fs.isdir(root):
            found = [f for f in fs.find(root) if _is_data_file(f[len(root.rstrip("/")) + 1 :])]
        else:
            found = [root] if fs.isfile(root) else []
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        raise _unreadable(fs, root, exc, what) from exc
    if not found:
        if glob or fs.isdir(root):
            raise CorpusNotFoundError(f"no {what} files found at {raw}")
        if is_remote(raw):  # "s3://b/k: no such key 'k' in bucket 'b'"
            raise CorpusNotFoundError(describe_storage_error(raw, FileNotFoundError(root)))
        raise CorpusNotFoundError(f"{what} file not found: {raw}")
    return found


def _is_data_file(relative: str) -> bool:
    parts = relative.split("/")
    return not any(p.startswith(("_", ".")) for p in parts) and posixpath.splitext(relative)[1].lower() in FORMATS


def check_bucket(fs: Any, url: str) -> None:
    """Fail with the URL, the bucket's name and the reason when the bucket does not exist or cannot be reached
    with these credentials ("s3://b/in: bucket 'b' does not exist (NoSuchBucket)")."""
    problem = bucket_problem(fs, url)
    if problem:
        raise CorpusError(problem)


def _unreadable(fs: Any, path: str, exc: BaseException, what: str) -> CorpusError:
    """The error for a file that cannot be reached (missing, forbidden, no connection): remotely it names the
    bucket, the key and the store's reason; CorpusNotFoundError when the file (or bucket) is missing."""
    url = url_of(fs, path)
    code = (error_code(exc) or ("", ""))[0]
    missing = isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "NoSuchBucket", "404")
    if is_remote(url):
        message = describe_storage_error(url, exc)
    elif missing:
        message = f"{what} file not found: {url}"
    else:
        message = f"{url}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    return CorpusNotFoundError(message) if missing else CorpusError(message)


# ----------------------------------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FileInfo:
    """A file's columns and rows; `table` holds the columns read when the format has no footer to inspect."""

    path: str
    format: str
    rows: int
    schema: pa.Schema
    table: pa.Table | None = None


def inspect_file(fs: Any, path: str, columns: Sequence[str], what: str = "corpus") -> FileInfo:
    """The file's schema and row count (a parquet footer; other formats are read), checking it has `columns`."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            info = FileInfo(path, fmt, meta.num_rows, meta.schema.to_arrow_schema())
        else:
            table = _read_other(fs, path, fmt, columns, what)
            info = FileInfo(path, fmt, len(table), table.schema, table)
    except CorpusError:
        raise
    except Exception as exc:
        if is_storage_error(exc):  # missing, forbidden, unreachable
            raise _unreadable(fs, path, exc, what) from exc
        # ArrowInvalid, OSError, UnicodeDecodeError: not this format, truncated
        raise CorpusError(f"{url_of(fs, path)} is not a readable {_FORMAT_NAMES[fmt]} file: {exc}") from exc
    missing = [c for c in columns if c not in info.schema.names]
    if missing:
        columns_found = ", ".join(info.schema.names)
        raise CorpusError(f"{url_of(fs, path)} has no column {missing[0]!r}; columns: {columns_found}")
    return info


_FORMAT_NAMES = {"parquet": "parquet", "jsonl": "JSON lines", "csv": "CSV", "text": "UTF-8 text"}


def read_file(fs: Any, path: str, columns: Sequence[str], what: str = "corpus") -> pa.Table:
    """`columns` of one file, in any format."""
    info = inspect_file(fs, path, columns, what)
    if info.table is not None:
        return info.table.select(list(columns))
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=list(columns))
    except Exception as exc:
        if is_storage_error(exc):
            raise _unreadable(fs, path, exc, what) from exc
        raise CorpusError(f"{url_of(fs, path)} is not a readable parquet file: {exc}") from exc


def _read_other(fs: Any, path: str, fmt: str, columns: Sequence[str], what: str) -> pa.Table:
    if fmt == "csv":
        import pyarrow.csv as pacsv

        with fs.open(path, "rb") as f:
            return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    if fmt == "jsonl":
        return _parse_jsonl(text, url_of(fs, path), columns)
    if len(columns) > 1:
        raise CorpusError(f"{url_of(fs, path)} is a text file (one {what} a line): it has no column {columns[1]!r}")
    return pa.table({columns[0] if columns else "text": pa.array(text.splitlines(), pa.string())})


def _parse_jsonl(text: str, path: str, columns: Sequence[str]) -> pa.Table:
    values: dict[str, list[Any]] = {c: [] for c in columns}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
        for c in columns:
            if not isinstance(record, dict) or c not in record:
                raise CorpusError(f"{path}:{lineno} has no field {c!r}")
            values[c].append(record[c])
    return pa.table({c: _column(v) for c, v in values.items()})


def _column(values: list[Any]) -> pa.Array:
    """An arrow column; mixed strings and other JSON values keep the strings (the rest become nulls)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


# ----------------------------------------------------------------------------------------------------------------
# Many files
# ----------------------------------------------------------------------------------------------------------------
def inspect_files(files: InputFiles, columns: Sequence[str], what: str = "corpus", threads: int = 16) -> list[FileInfo]:
    """Inspect every file (in parallel threads); the columns must exist everywhere, with one type each."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files.paths)))) as pool:
        infos = list(pool.map(lambda p: inspect_file(files.fs, p, columns, what), files.paths))
    for column in columns:
        types = {_type_name(i.schema.field(column).type): files.url(i.path) for i in reversed(infos)}
        if len(types) > 1:
            listed = "; ".join(f"{t} in {p}" for t, p in sorted(types.items()))
            raise CorpusError(f"column {column!r} has different types across files: {listed}")
    return infos


def _type_name(t: pa.DataType) -> str:
    """A column's type as compared across files: every text type (string, large_string, dictionary) is "string"."""
    return "string" if is_text_type(t) else str(t)


def read_columns(
    inputs: str | Sequence[str] | InputFiles,
    columns: Sequence[str],
    storage_options: dict[str, Any] | None = None,
    what: str = "corpus",
    infos: Sequence[FileInfo] | None = None,
) -> pa.Table:
    """`columns` of every file of the inputs, concatenated in file order (`infos`: the files' inspection)."""
    files = inputs if isinstance(inputs, InputFiles) else list_files(inputs, storage_options, what)
    infos = inspect_files(files, columns, what) if infos is None else infos
    tables = [read_file(files.fs, i.path, columns, what) if i.table is None else i.table.select(columns) for i in infos]
    return pa.concat_tables(tables, promote_options="permissive")


# ----------------------------------------------------------------------------------------------------------------
# Text columns
# ----------------------------------------------------------------------------------------------------------------
def is_text_type(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or (pa.types.is_dictionary(t) and is_text_type(t.value_type))
    )


def text_rows(column: pa.ChunkedArray | pa.Array) -> tuple[list[int], dict[str, int]]:
    """Positions of the usable texts of a column, and how many rows were skipped as null, empty (or blank), or
    non-string."""
    n = len(column)
    stats = {"rows": n, "skipped_null": column.null_count, "skipped_empty": 0, "skipped_non_string": 0}
    if not is_text_type(column.type):
        stats["skipped_non_string"] = n - column.null_count
        return [], stats
    values = column.to_pylist()
    keep = [i for i, v in enumerate(values) if v is not None and v.strip()]
    stats["skipped_empty"] = n - column.null_count - len(keep)
    return keep, stats


def split_texts(column: pa.ChunkedArray | pa.Array) -> tuple[list[str], dict[str, int]]:
    """The usable texts of a column and the skip statistics of `text_rows`."""
    keep, stats = text_rows(column)
    values = column.to_pylist() if keep else []
    return [values[i] for i in keep], stats


@dataclass
class Corpus:
    """The usable texts of a column, the skip statistics, and extra columns of the same rows."""

    texts: list[str]
    stats: dict[str, int]
    extras: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.stats[k] for k in SKIP_STATS)


def read_texts(
    inputs: str | Sequence[str],
    column: str = "output",
    extra_columns: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
    what: str = "corpus",
) -> Corpus:
    """The non-empty texts of `column` (and `extra_columns` of the same rows); an error when there are none."""
    inputs = [str(inputs)] if isinstance(inputs, str) or not isinstance(inputs, Sequence) else list(inputs)
    columns = list(dict.fromkeys([column, *extra_columns]))
    table = read_columns(inputs, columns, storage_options, what)
    keep, stats = text_rows(table.column(column))
    values = table.column(column).to_pylist() if keep else []
    extras = {}
    for c in extra_columns:
        extra = table.column(c).to_pylist()
        extras[c] = [extra[i] for i in keep]
    corpus = Corpus([values[i] for i in keep], {**stats, "sequences": len(keep)}, extras)
    name = ", ".join(inputs)
    if corpus.skipped:
        logger.warning("%s: skipped %d null, empty or non-string rows of %d", name, corpus.skipped, stats["rows"])
    if not corpus.texts:
        raise CorpusError(
            f"{name}: column {column!r} has no non-empty text rows (empty {what}; {stats['rows']} rows: "
            f"{stats['skipped_null']} null, {stats['skipped_empty']} empty, {stats['skipped_non_string']} non-string)"
        )
    return corpus
