"""The n-gram index on disk: one parquet file per order and `manifest.json`, written last, holding the format
version, the tokenizer (name, fingerprint, vocab size), the orders, corpus statistics and each file's sha256; the
64-bit context hash (`hash_windows`) the files are keyed by is part of the format.

An index is complete exactly when its manifest exists: a writer removes the old manifest before it changes any
file and writes the new one after all of them. A reader refuses a missing manifest, another format or version,
a missing file, or a file whose checksum differs, with an error that names it. `s3://` paths take their
settings from the standard AWS environment (tasc_ray.io), updated with any `storage_options` given.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np

from tasc_ray.io import storage_options_for

FORMAT_NAME = "tasc_ray.ngram_index"  # the on-disk format's name, kept across code moves
FORMAT_VERSION = 2  # 2: an optional token store (suffix.parquet) for matches of any length
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)


def hash_windows(windows: np.ndarray) -> np.ndarray:
    """FNV-1a-style 64-bit hash of each row of an [n, m] int array of token ids (m is part of the hash)."""
    n, m = windows.shape
    h = np.full(n, _FNV_OFFSET ^ np.uint64(m), dtype=np.uint64)
    for j in range(m):
        h = (h ^ (windows[:, j].astype(np.uint64) * _MIX)) * _FNV_PRIME
    return h


class NgramIndexError(ValueError):
    """An index that cannot be read or used: missing or corrupt files, wrong tokenizer, bad format."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable digest of a tokenizer's vocabulary (token string -> id, added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:32]


def tokenizer_meta(tokenizer: Any) -> dict[str, Any]:
    """What an index records of the tokenizer that built it (empty without one)."""
    if tokenizer is None:
        return {}
    return {
        "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
    }


class IndexWriter:
    """Writes an index's files under a local directory or s3:// prefix, then `commit` writes the manifest."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(path, **storage_options_for(path, storage_options))
        self.fs.makedirs(self.root, exist_ok=True)
        if self.fs.exists(f"{self.root}/{MANIFEST}"):
            self.fs.rm(f"{self.root}/{MANIFEST}")  # the old index stops looking complete before its files change

    def write(self, name: str, data: bytes) -> dict[str, Any]:
        """Write one file; returns its size and checksum for the manifest."""
        with self.fs.open(f"{self.root}/{name}", "wb") as f:
            f.write(data)
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def commit(self, fields: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_at": time.time(), **fields}
        manifest["files"] = files
        with self.fs.open(f"{self.root}/{MANIFEST}", "w") as f:
            f.write(json.dumps(manifest, indent=2))


def read_manifest(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and validate an index's manifest.json."""
    fs, root = fsspec.core.url_to_fs(path, **storage_options_for(path, storage_options))
    try:
        with fs.open(f"{root}/{MANIFEST}", "r") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError as exc:
        raise NgramIndexError(f"{path} has no {MANIFEST}: not an index, or its build did not finish") from exc
    except json.JSONDecodeError as exc:
        raise NgramIndexError(f"{path}/{MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise NgramIndexError(f"{path}/{MANIFEST} is not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise NgramIndexError(
            f"{path}: index format version {manifest.get('format_version')} is not supported "
            f"(this tasc_ray reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return manifest


def read_index_files(
    path: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Each file the manifest lists, as (its manifest entry, its verified bytes)."""
    fs, root = fsspec.core.url_to_fs(path, **storage_options_for(path, storage_options))
    for name, info in manifest["files"].items():
        try:
            with fs.open(f"{root}/{name}", "rb") as f:
                data = f.read()
        except FileNotFoundError as exc:
            raise NgramIndexError(f"index {path}: file {name} listed in the manifest is missing") from exc
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise NgramIndexError(f"index {path}: file {name} is corrupt (checksum mismatch)")
        yield info, data
