"""Write a directory (or one file) so that it is either absent or whole: write it aside, then move it into place.

    with atomic_directory("models/enriched") as tmp:   # a fresh local directory next to the output
        model.save_pretrained(tmp)
    # here models/enriched exists, complete; after an exception it does not, and nothing is left behind

Locally the files are written to a hidden sibling (`.NAME.tmp-*`) and renamed onto the output in one step.
S3 has no rename: the files are written to a local temporary directory and uploaded with the file named by
`last` uploaded last (readers treat the output as complete once it exists); a failed upload is removed again,
and raises a `StorageError` naming the bucket, the key and the reason.

`atomic_write_bytes(out, data)` does the same for one file: locally a hidden sibling (`.NAME.tmp-*`) renamed onto
`out`; on S3 one upload (an object appears whole when its upload ends).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from tasc_ray.io.storage import (
    StorageError,
    bucket_problem,
    fsspec_filesystem,
    is_remote,
    local_path,
    storage_errors,
    url_of,
)

logger = logging.getLogger(__name__)

IfExists = Literal["error", "keep", "replace"]


def is_free_directory(out: str | Path, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether `out` can take a new directory: it does not exist or is empty (a local path or a remote prefix).
    A remote prefix whose bucket is missing or denied raises StorageError (naming the bucket and the reason)."""
    if not is_remote(str(out)):
        path = Path(local_path(out))
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    fs, root = fsspec_filesystem(str(out), storage_options)
    problem = bucket_problem(fs, str(out))
    if problem:
        raise StorageError(problem)
    with storage_errors(str(out)):
        return not fs.exists(root) or not fs.find(root)


@contextmanager
def atomic_directory(
    out: str | Path,
    *,
    if_exists: IfExists = "error",
    last: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield a fresh local directory; when the block ends without an exception, it becomes `out`.

    An existing empty `out` is replaced. A non-empty one raises FileExistsError (`if_exists="error"`), is kept
    and the new files dropped (`"keep"`: another writer of the same content, e.g. a cache, finished first), or is
    replaced (`"replace"`, local only: removed just before the rename)."""
    remote = is_remote(str(out))
    if remote:
        tmp = Path(tempfile.mkdtemp(prefix="tasc-upload-"))
    else:
        target = Path(local_path(out))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if remote:
            _upload(tmp, str(out), if_exists, last, storage_options)
        else:
            _rename(tmp, target, if_exists)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(
    out: str | Path, data: bytes, *, overwrite: bool = True, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Write `data` as the file `out` (local or remote) so that a reader sees the old file or the new one, never a
    part. An existing `out` is replaced, or, with `overwrite=False`, refused (FileExistsError) before anything is
    written. Returns `out`. A location that cannot be written raises StorageError naming it and why."""
    url = str(out)
    if is_remote(url):
        fs, root = fsspec_filesystem(url, storage_options)
        problem = bucket_problem(fs, url)
        if problem:
            raise StorageError(problem)
        with storage_errors(url):
            is_dir, exists = fs.isdir(root), fs.exists(root)
        if is_dir:
            raise StorageError(f"{url}: is a directory (a prefix), not a file")
        if exists and not overwrite:
            raise FileExistsError(f"{url} exists")
        with storage_errors(url):
            fs.pipe_file(root, data)  # an object store shows an upload only once it completes
        return url
    target = Path(local_path(url))
    if target.is_dir():
        raise StorageError(f"{url}: is a directory, not a file")
    if not overwrite and target.exists():
        raise FileExistsError(f"{url} exists")
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    with storage_errors(url):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return url


def _rename(tmp: Path, out: Path, if_exists: IfExists) -> None:
    if out.exists():
        if not is_free_directory(out):
            if if_exists == "keep":
                logger.info("%s was written meanwhile; keeping it", out)
                return
            if if_exists == "error":
                raise FileExistsError(f"output directory {out} exists and is not empty")
            shutil.rmtree(out)
        else:
            out.rmdir()
    try:
        tmp.rename(out)
    except OSError:
        if if_exists == "keep" and out.exists():  # another writer renamed its copy first
            return
        raise


def _upload(tmp: Path, out: str, if_exists: IfExists, last: str | None, storage_options: Any) -> None:
    fs, root = fsspec_filesystem(out, storage_options)
    if not is_free_directory(out, storage_options):
        if if_exists == "keep":
            return
        raise FileExistsError(f"output {out} exists and is not empty")  # "replace" too: no rename on S3
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(tmp).as_posix() == last)  # stable: `last` moves to the end
    written = []
    try:
        for path in files:
            remote = f"{root}/{path.relative_to(tmp).as_posix()}"
            with storage_errors(url_of(fs, remote)):  # names the bucket, the key and the reason
                fs.put_file(str(path), remote)
            written.append(remote)
    except BaseException:
        for remote in written:
            try:
                fs.rm_file(remote)
            except OSError:
                logger.warning("could not remove %s after a failed upload", remote)
        raise
