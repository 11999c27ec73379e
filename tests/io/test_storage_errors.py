"""Storage errors name the location and the reason: S3 errors say the bucket, the key and why (missing bucket, no
such key, access denied), and an output that cannot be written is refused up front (a parent that is a file, a
missing bucket, an existing object)."""

from __future__ import annotations

import os

import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from tasc_ray.io import (
    CorpusError,
    CorpusNotFoundError,
    InputFiles,
    StorageError,
    atomic_directory,
    check_output_location,
    describe_storage_error,
    fsspec_filesystem,
    inspect_files,
    is_free_directory,
    read_texts,
    storage_errors,
)


def _s3_error(code: str, message: str, operation: str = "GetObject") -> OSError:
    """What s3fs raises for an S3 error response: a Python OSError caused by botocore's ClientError."""
    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": message}}, operation))


# ----- the messages -----
@pytest.mark.parametrize(
    "url, code, message, reason",
    [
        ("s3://nosuchbucket/in", "NoSuchBucket", "No bucket", "bucket 'nosuchbucket' does not exist (NoSuchBucket)"),
        ("s3://b/data/x.parquet", "NoSuchKey", "No key", "no such key 'data/x.parquet' in bucket 'b' (NoSuchKey)"),
        ("s3://b/d/x", "AccessDenied", "Denied", "access denied to key 'd/x' in bucket 'b' (AccessDenied);"),
        ("s3://b", "403", "Forbidden", "access denied to bucket 'b' (403);"),
        ("s3://b/k", "SlowDown", "Please reduce your request rate.", "Please reduce your request rate. (SlowDown)"),
    ],
)  # fmt: skip
def test_s3_errors_name_bucket_key_and_reason(url, code, message, reason):
    assert describe_storage_error(url, _s3_error(code, message)).startswith(f"{url}: {reason}")


def test_errors_without_a_response_still_name_the_location():
    assert describe_storage_error("s3://b/k", FileNotFoundError("b/k")) == "s3://b/k: no such key 'k' in bucket 'b'"
    assert describe_storage_error("s3://b/k", FileNotFoundError("b"), bucket_only=True).startswith(
        "s3://b/k: bucket 'b' does not exist"
    )
    assert "access denied to key 'k' in bucket 'b'" in describe_storage_error("s3://b/k", PermissionError("denied"))
    local = describe_storage_error("/tmp/f/out", NotADirectoryError(20, "Not a directory"))
    assert local == "/tmp/f/out: Not a directory"


def test_storage_errors_wraps_store_errors_only():
    with pytest.raises(StorageError, match=r"^s3://b/k: access denied to key 'k' in bucket 'b' \(AccessDenied\)"):
        with storage_errors("s3://b/k"):
            raise _s3_error("AccessDenied", "Access Denied")
    with pytest.raises(KeyError):  # a bug is not a storage error
        with storage_errors("s3://b/k"):
            raise KeyError("x")


class _DeniedS3:
    """An fsspec-like S3 filesystem that lists a file but may not read it."""

    protocol = ("s3", "s3a")

    def unstrip_protocol(self, path: str) -> str:
        return f"s3://{path}"

    def open(self, path: str, mode: str = "rb"):
        raise _s3_error("AccessDenied", "Access Denied")


def test_reading_a_forbidden_s3_file_names_bucket_key_and_reason():
    denied = InputFiles(["b/prompts/x.parquet"], _DeniedS3(), "s3")
    with pytest.raises(CorpusError, match=r"^s3://b/prompts/x.parquet: access denied to key 'prompts/x.parquet'"):
        inspect_files(denied, ["prompt"], what="input")


# ----- against an S3 server (moto) -----
def test_missing_bucket_and_key_on_s3(s3_server, s3_bucket):
    missing_bucket = r"^s3://nosuchbucket-io/in: bucket 'nosuchbucket-io' does not exist \(NoSuchBucket\)$"
    with pytest.raises(CorpusError, match=missing_bucket):
        read_texts("s3://nosuchbucket-io/in")
    with pytest.raises(CorpusNotFoundError, match=rf"^s3://{s3_bucket}/in/x.jsonl: no such key 'in/x.jsonl' in "):
        read_texts(f"s3://{s3_bucket}/in/x.jsonl")
    # a file that goes missing between listing and reading: s3fs's bare FileNotFoundError("bucket/key")
    fs, _ = fsspec_filesystem(f"s3://{s3_bucket}")
    with pytest.raises(CorpusNotFoundError, match=rf"^s3://{s3_bucket}/gone.jsonl: no such key 'gone.jsonl'"):
        inspect_files(InputFiles([f"{s3_bucket}/gone.jsonl"], fs, "s3"), ["output"])


def test_output_to_a_missing_bucket_fails_up_front(s3_server, s3_bucket, tmp_path):
    with pytest.raises(StorageError, match=r"^s3://nosuchbucket-io/out: bucket 'nosuchbucket-io' does not exist"):
        check_output_location("s3://nosuchbucket-io/out")
    with pytest.raises(StorageError, match="bucket 'nosuchbucket-io' does not exist"):
        is_free_directory("s3://nosuchbucket-io/models/m")
    fs, _ = fsspec_filesystem(f"s3://{s3_bucket}")
    fs.pipe_file(f"{s3_bucket}/taken", b"x")
    with pytest.raises(StorageError, match="is a file"):
        check_output_location(f"s3://{s3_bucket}/taken")
    check_output_location(f"s3://{s3_bucket}/new/out")  # a fresh prefix of an existing bucket is fine


def test_an_upload_that_fails_names_the_bucket(s3_server, monkeypatch):
    import tasc_ray.io.atomic as atomic

    monkeypatch.setattr(atomic, "is_free_directory", lambda out, storage_options=None: True)  # skip the up-front check
    with pytest.raises(StorageError, match=r"^s3://nosuchbucket-io/m/a.txt: bucket 'nosuchbucket-io' does not exist"):
        with atomic_directory("s3://nosuchbucket-io/m") as tmp:
            (tmp / "a.txt").write_text("a")


# ----- local outputs -----
def test_local_output_under_a_file_or_a_file_itself(tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"^{blocker}/out/deeper: {blocker} is a file, not a directory$"):
        check_output_location(str(blocker / "out" / "deeper"))
    with pytest.raises(StorageError, match="exists and is not a directory"):
        check_output_location(str(blocker))
    check_output_location(str(tmp_path / "new" / "out"))  # missing directories will be created
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_local_output_in_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            check_output_location(str(locked / "out"))
    finally:
        locked.chmod(0o700)
