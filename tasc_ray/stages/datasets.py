"""Ray Datasets over `tasc_ray.io` inputs: parquet files are read by Ray Data's parallel reader (column projection,
local or S3); the other formats (jsonl, csv, text) are read by `tasc_ray.io` on the driver and handed over."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from tasc_ray.io import FileInfo, InputFiles, file_format, read_file


def read_dataset(
    files: InputFiles,
    columns: Sequence[str],
    infos: Sequence[FileInfo] | None = None,
    num_cpus: float | None = None,
) -> Any:
    """A Ray Dataset of `columns` of every file (`infos`: the files' inspection, whose read tables are reused)."""
    import ray

    columns = list(columns)
    tables = {i.path: i.table for i in infos or () if i.table is not None}
    parquet = [p for p in files.paths if file_format(p) == "parquet" and p not in tables]
    others = [p for p in files.paths if p not in parquet]
    parts = []
    if parquet:
        kwargs = {"num_cpus": num_cpus} if num_cpus is not None else {}
        parts.append(ray.data.read_parquet(parquet, filesystem=files.arrow_filesystem(), columns=columns, **kwargs))
    if others:
        read = [tables[p].select(columns) if p in tables else read_file(files.fs, p, columns) for p in others]
        table = pa.concat_tables(read, promote_options="permissive")
        if parquet:  # one schema for every block: the parquet files' (e.g. large_string where the others have string)
            table = _cast_like(table, parquet[0], files, columns)
        parts.append(ray.data.from_arrow(table))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _cast_like(table: pa.Table, parquet_path: str, files: InputFiles, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    with files.fs.open(parquet_path, "rb") as f:
        schema = pq.read_schema(f)
    try:
        return table.cast(pa.schema([schema.field(c) for c in columns]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return table
