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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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
