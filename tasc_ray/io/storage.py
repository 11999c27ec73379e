"""Where data lives: local paths and `s3://` URLs, with S3 settings read once from the standard AWS environment.

Every reader and writer of the project resolves its filesystem here:

* `S3Settings.from_env()` reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, the region from
  AWS_REGION or AWS_DEFAULT_REGION (else `DEFAULT_REGION`), and the endpoint of an S3-compatible store (MinIO,
  moto) from AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL;
* `storage_options_for(path)` turns them into fsspec/s3fs options, `fsspec_filesystem(path)` into an fsspec
  filesystem, `arrow_filesystem(path)` into a pyarrow filesystem (what Ray Data and Ray Train take).

The settings are resolved in the calling process and travel explicitly with the (pickled) filesystem or options,
so Ray workers started with another environment (other nodes, a Ray started before the variables were set)
read and write with the same endpoint and credentials.

Errors say where and why in one line: `describe_storage_error(url, exc)` turns an fsspec/s3fs/pyarrow/botocore
error into "s3://bucket/key: bucket 'bucket' does not exist (NoSuchBucket)" (or "no such key ...", "access denied
..."), `storage_errors(url)` raises that as a `StorageError`, and `check_output_location(out)` refuses an output
that cannot be written (a parent that is a file, no permission, a missing bucket) before any work starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

DEFAULT_REGION = "us-east-1"
S3_SCHEMES = ("s3://", "s3a://")


@dataclass(frozen=True)
class S3Settings:
    """S3 endpoint, region and credentials; None where the environment does not say (the SDK's chain decides)."""

    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    endpoint: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        """The settings in `env` (default: this process's environment)."""
        env = os.environ if env is None else env
        key = env.get("AWS_ACCESS_KEY_ID") or None
        return cls(
            access_key=key,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY", "") if key else None,
            session_token=(env.get("AWS_SESSION_TOKEN") or None) if key else None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        )

    def fsspec_options(self) -> dict[str, Any]:
        """s3fs options (botocore follows a bucket's region redirect, so the default region is safe)."""
        opts: dict[str, Any] = {"client_kwargs": {"region_name": self.region or DEFAULT_REGION}}
        if self.endpoint:
            opts["endpoint_url"] = self.endpoint
        if self.access_key:
            opts.update(key=self.access_key, secret=self.secret_key or "")
            if self.session_token:
                opts["token"] = self.session_token
        return opts

    def arrow_filesystem(self, bucket: str | None = None) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem. Without a region in the environment, AWS's own endpoint is asked for the
        bucket's region (pyarrow does not follow redirects); a custom endpoint gets the default region."""
        kwargs: dict[str, Any] = {}
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key or "")
            if self.session_token:
                kwargs["session_token"] = self.session_token
        region = self.region
        if region is None and not self.endpoint and bucket:
            try:
                region = pafs.resolve_s3_region(bucket)
            except (OSError, ValueError):
                region = None
        kwargs["region"] = region or DEFAULT_REGION
        if self.endpoint:
            endpoint = urlparse(self.endpoint)
            kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
            kwargs["scheme"] = endpoint.scheme or "https"
        return pafs.S3FileSystem(**kwargs)


def is_remote(path: str) -> bool:
    """Whether `path` is a URL of a remote store (s3://, gs://, ...) rather than a local path or file:// URL."""
    return "://" in str(path) and not str(path).startswith("file://")


def is_s3(path: str) -> bool:
    return str(path).startswith(S3_SCHEMES)


def local_path(path: str | os.PathLike) -> str:
    """An absolute local path (file:// and ~ resolved)."""
    text = str(path)
    text = text[len("file://") :] if text.startswith("file://") else text
    return os.path.abspath(os.path.expanduser(text))


def storage_options_for(path: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for `path`: for s3://, the environment's S3 settings, updated with `overrides`."""
    if not is_s3(path):
        return dict(overrides or {})
    opts = S3Settings.from_env().fsspec_options()
    opts.update(overrides or {})
    return opts


def fsspec_filesystem(path: str, overrides: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local path or URL."""
    if not is_remote(path):
        return fsspec.filesystem("file"), local_path(path)
    return fsspec.core.url_to_fs(path, **storage_options_for(path, overrides))


def arrow_filesystem(path: str, overrides: Mapping[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it): pyarrow's own S3 client from the environment's settings, or, when
    fsspec `overrides` are given, the fsspec filesystem they describe wrapped for pyarrow."""
    if overrides and is_remote(path):
        fs, root = fsspec_filesystem(path, overrides)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root
    if is_s3(path):
        parsed = urlparse(path)
        return S3Settings.from_env().arrow_filesystem(parsed.netloc), (parsed.netloc + parsed.path).rstrip("/")
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), local_path(path)


# ----------------------------------------------------------------------------------------------------------------
# Errors that name the location and the reason
# ----------------------------------------------------------------------------------------------------------------
class StorageError(OSError):
    """A location that cannot be read or written; the message names it (s3://bucket/key or a path) and why."""


_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "RequestTimeTooSkewed",
}
# Packages whose own exceptions (not OSError) mean the store could not be asked: no credentials, no endpoint.
_CLIENT_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


def bucket_and_key(url: str) -> tuple[str, str]:
    """("bucket", "some/key") of "s3://bucket/some/key"."""
    rest = str(url).split("://", 1)[-1]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def url_of(fs: Any, path: str) -> str:
    """How a user writes `path` of the fsspec filesystem `fs`: s3://bucket/key, or the plain local path."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def error_code(exc: BaseException) -> tuple[str, str] | None:
    """(code, message) of the S3 error response (botocore's ClientError) in `exc` or among its causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            error = response["Error"]
            return str(error.get("Code") or ""), str(error.get("Message") or "")
        current = current.__cause__ or current.__context__
    return None


def is_storage_error(exc: BaseException) -> bool:
    """Whether `exc` comes from reaching the data (an S3 error response, a missing or forbidden file or bucket, no
    credentials, no connection) rather than from a file's content or a bug."""
    return (
        error_code(exc) is not None
        or isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError, ConnectionError, TimeoutError))
        or type(exc).__module__.split(".")[0] in _CLIENT_PACKAGES
    )


def describe_storage_error(url: str, exc: BaseException, *, bucket_only: bool = False) -> str:
    """One line naming `url` and why `exc` happened there, e.g. "s3://b/in: bucket 'b' does not exist (NoSuchBucket)".

    `bucket_only`: the failed request was about the bucket itself (a not-found means the bucket is missing)."""
    if not is_remote(url):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        return f"{url}: {reason}"
    bucket, key = bucket_and_key(url)
    code, message = error_code(exc) or ("", "")
    tag = f" ({code})" if code else ""
    missing = code in _MISSING_CODES or (not code and isinstance(exc, FileNotFoundError))
    denied = code in _DENIED_CODES or (not code and isinstance(exc, PermissionError))
    if code == "NoSuchBucket" or (missing and (bucket_only or not key)):
        reason = f"bucket {bucket!r} does not exist{tag}"
    elif missing:
        reason = f"no such key {key!r} in bucket {bucket!r}{tag}"
    elif denied:
        what = f"bucket {bucket!r}" if bucket_only or not key else f"key {key!r} in bucket {bucket!r}"
        reason = f"access denied to {what}{tag}; check the AWS credentials and the bucket's policy"
    elif code:
        reason = f"{message or 'S3 error'}{tag}"
    else:  # no answer from the store: no credentials, endpoint unreachable, ...
        reason = f"{type(exc).__name__}: {exc}"
    return f"{url}: {reason}"


@contextmanager
def storage_errors(url: str, *, bucket_only: bool = False) -> Iterator[None]:
    """Raise a storage failure inside the block as a StorageError naming `url` and the reason."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if not (isinstance(exc, OSError) or is_storage_error(exc)):
            raise
        raise StorageError(describe_storage_error(url, exc, bucket_only=bucket_only)) from exc


def bucket_problem(fs: Any, url: str) -> str | None:
    """Why the bucket of the remote `url` cannot be used (one line naming it), or None when it can."""
    bucket, _ = bucket_and_key(url)
    try:
        if fs.exists(bucket):
            return None
        # Not visible: ask once more, for the store's reason (a listing's error names it: NoSuchBucket, AccessDenied).
        if hasattr(fs, "call_s3"):
            fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        else:
            fs.info(bucket)
    except Exception as exc:
        if not (isinstance(exc, OSError) or is_storage_error(exc)):
            raise
        return describe_storage_error(url, exc, bucket_only=True)
    return None  # the second look found it


def check_output_location(out: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail with one line (StorageError) when `out` cannot be an output directory: locally, it or a parent is a
    file, or the directory that would hold it is not writable; remotely, its bucket is missing or denied, or it
    is an existing object. Nothing is created."""
    if is_remote(out):
        fs, root = fsspec_filesystem(out, storage_options)
        problem = bucket_problem(fs, out)
        if problem:
            raise StorageError(problem)
        with storage_errors(out):
            if bucket_and_key(out)[1] and fs.isfile(root):
                raise StorageError(f"{out}: is a file (an object), not a directory")
        return
    path = Path(local_path(out))
    existing = path
    while not existing.is_dir():
        if existing.exists() or existing.is_symlink():
            if existing == path:
                raise StorageError(f"{out}: exists and is not a directory")
            raise StorageError(f"{out}: {existing} is a file, not a directory")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{out}: permission denied: directory {existing} is not writable")
