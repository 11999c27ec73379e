"""The commit protocol of a resumable output of parquet parts (local paths and s3:// alike); plain code, no Ray.

    out = PartsOutput("s3://bucket/labels", required_columns=["id", "output"])
    out.recover()                        # parts an interrupted run left in staging are committed (or dropped)
    done = out.committed_ids("id")       # what earlier runs wrote: skip those rows
    run = new_run_id()
    out.begin_run()                      # the output stops looking complete; this run's parts are written to
    ...write parquet files under out.staging(run)...
    out.finish_run(run)                  # staged parts become OUT/part-<run>-<name>.parquet
    out.mark_complete({...})             # OUT/_SUCCESS, a JSON manifest, written last

A part is a whole parquet file with the required columns, or it is dropped: an interrupted write leaves no
footer. `_SUCCESS` is removed before a run changes the output and written only when the caller has checked that
every row is committed, so a partial output never looks complete and a rerun never duplicates a row.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tasc_ray.io import arrow_filesystem

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
STAGING = "_staging"


def new_run_id() -> str:
    """A run id that sorts by start time: YYYYmmddHHMMSS-<6 hex>."""
    return time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]


def is_complete(output: str) -> bool:
    """Whether an output has its _SUCCESS marker."""
    fs, root = arrow_filesystem(output)
    return fs.get_file_info(f"{root}/{SUCCESS}").type == pafs.FileType.File


class PartsOutput:
    """An output directory of parquet parts committed by runs; complete when `_SUCCESS` exists."""

    def __init__(self, output: str, required_columns: Sequence[str]) -> None:
        self.output = output
        self.required_columns = list(required_columns)
        self.fs, self.root = arrow_filesystem(output)

    # ----- reading -----
    def parts(self) -> list[str]:
        """The committed parts (paths inside the filesystem), sorted."""
        return sorted(
            f.path
            for f in self._files(self.root)
            if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")
        )

    def read(self, columns: list[str] | None = None, parts: list[str] | None = None) -> pa.Table | None:
        """The committed rows (of `parts`, default all), or None when there are none."""
        parts = self.parts() if parts is None else parts
        if not parts:
            return None
        return pads.dataset(parts, filesystem=self.fs, format="parquet").to_table(columns=columns)

    def committed_ids(self, id_column: str = "id", id_type: pa.DataType | None = None) -> pa.Array:
        """The ids of every committed row (an empty array of `id_type` when there are none)."""
        table = self.read([id_column])
        if table is None:
            return pa.array([], id_type or pa.string())
        return table.column(id_column).combine_chunks()

    def is_complete(self) -> bool:
        return self.fs.get_file_info(self._success).type == pafs.FileType.File

    # ----- writing -----
    def recover(self) -> int:
        """Commit every readable part an interrupted run left in staging; drop unreadable ones. Returns how many
        parts were committed."""
        self.fs.create_dir(self.root, recursive=True)
        promoted = self._promote()
        if promoted:
            logger.info("recovered %d parts an interrupted run had written", promoted)
        return promoted

    def begin_run(self) -> None:
        """Before a run changes the output: it stops looking complete."""
        self.fs.create_dir(self.root, recursive=True)
        if self.is_complete():
            self.fs.delete_file(self._success)

    def staging(self, run_id: str) -> str:
        """Where the run writes its parts (a path inside the filesystem)."""
        return f"{self.root}/{STAGING}/{run_id}"

    def finish_run(self, run_id: str) -> list[str]:
        """Commit the run's staged parts. Returns the parts that are new."""
        before = set(self.parts())
        self._promote()
        return sorted(set(self.parts()) - before)

    def mark_complete(self, manifest: dict[str, Any]) -> None:
        """Write `_SUCCESS` (the manifest, as JSON, with the committed parts' names) aside, then move it in."""
        manifest = {**manifest, "parts": [p[len(self.root) + 1 :] for p in self.parts()]}
        tmp = f"{self._success}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(manifest, indent=2, default=str).encode())
        self.fs.move(tmp, self._success)

    # ----- internals -----
    @property
    def _success(self) -> str:
        return f"{self.root}/{SUCCESS}"

    def _files(self, root: str, recursive: bool = False) -> list[pafs.FileInfo]:
        info = self.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=recursive))
        return [f for f in info if f.type == pafs.FileType.File]

    def _readable(self, path: str) -> bool:
        """A whole parquet file with the required columns (an interrupted write leaves no footer)."""
        try:
            with self.fs.open_input_file(path) as f:
                schema = pq.read_schema(f)
        except (OSError, pa.ArrowInvalid):
            return False
        return set(self.required_columns) <= set(schema.names)

    def _promote(self) -> int:
        staging = f"{self.root}/{STAGING}"
        promoted = 0
        for info in self._files(staging, recursive=True):
            run = info.path[len(staging) + 1 :].split("/")[0]
            if not info.base_name.endswith(".parquet") or not self._readable(info.path):
                logger.warning("dropping incomplete staged file %s", info.path)
                self.fs.delete_file(info.path)
                continue
            self.fs.move(info.path, f"{self.root}/part-{run}-{info.base_name}")
            promoted += 1
        if self.fs.get_file_info(staging).type == pafs.FileType.Directory:
            self.fs.delete_dir(staging)
        return promoted
