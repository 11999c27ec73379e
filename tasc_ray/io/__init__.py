"""Input and output, one place each: where data lives (`storage`), reading columns of data files (`readers`) and
writing a directory atomically (`atomic`). Everything a caller needs is importable from `tasc_ray.io`."""

from __future__ import annotations

from tasc_ray.io.atomic import atomic_directory, is_free_directory
from tasc_ray.io.readers import (
    Corpus,
    CorpusError,
    CorpusNotFoundError,
    FileInfo,
    InputFiles,
    check_bucket,
    file_format,
    inspect_files,
    is_text_type,
    list_files,
    read_columns,
    read_file,
    read_texts,
    split_texts,
    text_rows,
)
from tasc_ray.io.storage import (
    DEFAULT_REGION,
    S3Settings,
    arrow_filesystem,
    fsspec_filesystem,
    is_remote,
    is_s3,
    local_path,
    storage_options_for,
)

__all__ = [
    "DEFAULT_REGION",
    "Corpus",
    "CorpusError",
    "CorpusNotFoundError",
    "FileInfo",
    "InputFiles",
    "S3Settings",
    "arrow_filesystem",
    "atomic_directory",
    "check_bucket",
    "file_format",
    "fsspec_filesystem",
    "inspect_files",
    "is_free_directory",
    "is_remote",
    "is_s3",
    "is_text_type",
    "list_files",
    "local_path",
    "read_columns",
    "read_file",
    "read_texts",
    "split_texts",
    "storage_options_for",
    "text_rows",
]
