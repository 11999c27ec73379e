"""The endpoint's log of finished requests: parquet files a later index is built from.

The realistic corpus of a served task is its own outputs. With `ServeConfig.log_dir` set, each replica appends
one row per finished completion (prompt, output, sampling parameters, model, finish reason, token counts, time)
to a buffer that a background thread writes out as a parquet file when it holds `log_max_rows` rows or its
oldest row is `log_max_seconds` old, and once more when the replica shuts down. Files are named
`part-<replica>-<UTC time>-<seq>.parquet`; a local file is written under a hidden name and renamed, an S3
object appears whole when its upload ends, so a reader never sees half a file. Then:

    tasc-ray index --input <log_dir> --column output --append-to <index> --out <index-v2>

and a `user_config` update (`index: <index-v2>`) gives every replica the new index without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasc_ray.io import fsspec_filesystem, is_remote

logger = logging.getLogger(__name__)

_CLOSE = object()  # queued by close()

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("row", pa.int32()),
        ("created", pa.float64()),  # Unix time the request finished
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("output", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("forward_passes", pa.int32()),
        ("accepted_tokens", pa.int32()),
        ("latency_s", pa.float64()),
        ("params", pa.string()),  # the sampling parameters as JSON
    ]
)


@dataclass
class LoggedRequest:
    request_id: str
    row: int
    created: float
    model: str
    prompt: str
    output: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    forward_passes: int
    accepted_tokens: int
    latency_s: float
    params: str

    @staticmethod
    def params_json(params: Any) -> str:
        return json.dumps(asdict(params), sort_keys=True)


class RequestLog:
    """A buffered, rotating parquet writer on its own thread; `record` never blocks on I/O."""

    def __init__(
        self,
        directory: str,
        writer_id: str,
        max_rows: int = 1000,
        max_seconds: float = 300.0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.fs, self.root = fsspec_filesystem(directory, storage_options)
        self.directory, self.writer_id = directory, writer_id
        self.max_rows, self.max_seconds = max_rows, max_seconds
        self.remote = is_remote(directory)
        self.fs.makedirs(self.root, exist_ok=True)
        self.files_written = 0
        self.rows_written = 0
        self.rows_lost = 0
        self._queue: queue.Queue[LoggedRequest | object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tasc-request-log", daemon=True)
        self._thread.start()

    def record(self, entry: LoggedRequest) -> None:
        self._queue.put(entry)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is buffered and stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join(timeout)

    def _run(self) -> None:
        buffer: list[LoggedRequest] = []
        oldest = 0.0
        while True:
            wait = None if not buffer else max(0.0, oldest + self.max_seconds - time.monotonic())
            try:
                entry = self._queue.get(timeout=wait)
            except queue.Empty:
                entry = None  # nothing new: the oldest buffered row is due
            if entry is _CLOSE:
                self._write(buffer)
                return
            if isinstance(entry, LoggedRequest):
                if not buffer:
                    oldest = time.monotonic()
                buffer.append(entry)
            if buffer and (len(buffer) >= self.max_rows or time.monotonic() - oldest >= self.max_seconds):
                self._write(buffer)
                buffer = []

    def _write(self, rows: list[LoggedRequest]) -> None:
        if not rows:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"part-{self.writer_id}-{stamp}-{self.files_written:05d}.parquet"
        table = pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)
        target = posixpath.join(self.root, name)
        try:
            if self.remote:  # an object store shows an upload only once it completes
                with self.fs.open(target, "wb") as f:
                    pq.write_table(table, f)
            else:
                hidden = posixpath.join(self.root, f".{name}.tmp")
                pq.write_table(table, hidden)
                os.replace(hidden, target)
        except Exception:
            self.rows_lost += len(rows)
            logger.exception("could not write %d logged requests to %s", len(rows), self.directory)
            return
        self.files_written += 1
        self.rows_written += len(rows)
        logger.info("logged %d requests to %s", len(rows), target)

    def stats(self) -> dict[str, Any]:
        return {
            "dir": self.directory,
            "files_written": self.files_written,
            "rows_written": self.rows_written,
            "rows_lost": self.rows_lost,
            "rows_pending": self._queue.qsize(),
        }
