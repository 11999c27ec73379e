"""Read a corpus of texts (one column of parquet, jsonl or csv, or lines of a text file) with clear errors on bad
input."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

logger = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A corpus that cannot be read: missing or corrupt file, missing column, no usable rows."""


@dataclass
class Corpus:
    texts: list[str]
    skipped: int  # null, empty or non-string rows, left out and counted


def read_texts(path: str | Path, column: str = "output") -> Corpus:
    """Texts of `column` in a .parquet, .jsonl or .csv file, or the non-empty lines of any other file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv"):
        values = _table_column(path, column)
    elif suffix in (".jsonl", ".ndjson"):
        values = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
                if not isinstance(record, dict) or column not in record:
                    raise CorpusError(f"{path}:{lineno} has no field {column!r}")
                values.append(record[column])
    else:
        values = path.read_text(encoding="utf-8").splitlines()
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    skipped = len(values) - len(texts)
    if skipped:
        logger.warning("%s: skipped %d null, empty or non-string rows of %d", path, skipped, len(values))
    if not texts:
        raise CorpusError(f"{path}: column {column!r} has no non-empty text rows (empty corpus)")
    return Corpus(texts, skipped)


def _table_column(path: Path, column: str) -> list:
    """One column of a parquet file (read alone) or of a CSV file."""
    import pyarrow.csv as pacsv

    parquet = path.suffix.lower() == ".parquet"
    try:
        table = None if parquet else pacsv.read_csv(path)
        names = pq.read_schema(path).names if parquet else table.column_names
    except Exception as exc:
        raise CorpusError(f"{path} is not a readable {'parquet' if parquet else 'CSV'} file: {exc}") from exc
    if column not in names:
        raise CorpusError(f"{path} has no column {column!r}; columns: {', '.join(names)}")
    if parquet:
        table = pq.read_table(path, columns=[column])
    return table.column(column).to_pylist()
