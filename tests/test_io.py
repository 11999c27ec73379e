"""tasc_ray.io without Ray: every format, directories and globs, S3 through a real (moto) server, the AWS
environment resolver (AWS_ENDPOINT_URL_S3 included), clear errors, and the atomic directory writer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tasc_ray.io import (
    DEFAULT_REGION,
    CorpusError,
    CorpusNotFoundError,
    S3Settings,
    arrow_filesystem,
    atomic_directory,
    fsspec_filesystem,
    is_free_directory,
    list_files,
    read_columns,
    read_texts,
    split_texts,
    storage_options_for,
)

OUTPUTS = ["name[Zizzi], food[Italian]", "name[Aromi], area[riverside]", "name[Cotto]"]


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """The same rows in every format, with null, empty and blank values; plus files a directory read skips."""
    root = tmp_path / "corpus"
    root.mkdir()
    pq.write_table(pa.table({"output": [OUTPUTS[0], None, ""], "prompt": ["p0", "p1", "p2"]}), root / "a.parquet")
    (root / "b.jsonl").write_text(
        json.dumps({"output": OUTPUTS[1], "prompt": "p3"})
        + "\n\n"
        + json.dumps({"output": "  ", "prompt": "p4"})
        + "\n"
    )
    (root / "c.csv").write_text(f'output,prompt\n"{OUTPUTS[2]}",p5\n')
    (root / "_SUCCESS").write_text("{}")
    (root / "_staging").mkdir()
    (root / "_staging" / "x.parquet").write_bytes(b"partial")
    (root / ".hidden.csv").write_text("output\nnot me\n")
    return root


def test_every_format_and_directory(corpus_dir):
    corpus = read_texts(str(corpus_dir), "output", ["prompt"])
    assert corpus.texts == [OUTPUTS[0], OUTPUTS[1], OUTPUTS[2]]  # files in sorted order
    assert corpus.extras["prompt"] == ["p0", "p3", "p5"]
    assert corpus.stats == {
        "rows": 6,
        "skipped_null": 1,
        "skipped_empty": 2,
        "skipped_non_string": 0,
        "sequences": 3,
    }
    assert corpus.skipped == 3
    text = corpus_dir.parent / "outputs.txt"
    text.write_text("\n".join(OUTPUTS) + "\n\n")
    assert read_texts(text, "anything").texts == OUTPUTS  # a text file: one output a line, any column name
    assert read_texts([str(corpus_dir / "*.csv"), str(text)]).texts == [OUTPUTS[2], *OUTPUTS]
    assert len(list_files(str(corpus_dir)).paths) == 3


def test_columns_and_types(tmp_path):
    pq.write_table(pa.table({"output": ["a", "b"], "n": [1, 2]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"output": "c", "n": 3}\n{"output": 4, "n": 5}\n')
    table = read_columns(str(tmp_path), ["output", "n"])
    assert table.column("output").to_pylist() == ["a", "b", "c", None]  # a non-string JSON value is left out
    texts, stats = split_texts(pa.chunked_array([pa.array([1, None, 3])]))
    assert texts == [] and stats == {"rows": 3, "skipped_null": 1, "skipped_empty": 0, "skipped_non_string": 2}
    (tmp_path / "c.jsonl").write_text('{"output": "d", "n": "six"}\n')
    with pytest.raises(CorpusError, match="'n' has different types across files"):
        read_columns(str(tmp_path), ["n"])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.parquet", None, "corpus file not found"),
        ("column.parquet", "parquet-text", "has no column 'output'; columns: text"),
        ("corrupt.parquet", b"PAR1 nonsense", "not a readable parquet file"),
        ("broken.jsonl", '{"output": "x"}\n{broken\n', "broken.jsonl:2 is not valid JSON"),
        ("field.jsonl", '{"output": "x"}\n{"text": "y"}\n', "field.jsonl:2 has no field 'output'"),
        ("empty.csv", "output\n\n", "no non-empty text rows"),
        ("bad.csv", "output,prompt\na,b,c\n", "not a readable CSV file"),
    ],
)
def test_errors_name_the_file_and_column(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "parquet-text":
        pq.write_table(pa.table({"text": ["a"]}), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CorpusError, match=message) as info:
        read_texts(path)
    assert len(str(info.value).splitlines()) == 1 or name == "broken.jsonl"


def test_missing_inputs_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="training file not found"):
        read_texts(tmp_path / "nope.parquet", what="training")
    with pytest.raises(CorpusNotFoundError, match="no corpus files found"):
        read_texts(str(tmp_path / "*.jsonl"))
    (tmp_path / "t.txt").write_text("a\n")
    with pytest.raises(CorpusError, match="text file .* has no column 'prompt'"):
        read_texts(tmp_path / "t.txt", "output", ["prompt"])
    with pytest.raises(CorpusError, match="mix filesystems"):
        list_files([str(tmp_path), "s3://bucket/x"])


# ----- S3 -----
def _put(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def test_s3_directories_and_globs(s3_server, s3_bucket):
    fs, _ = fsspec_filesystem(f"s3://{s3_bucket}")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"output": OUTPUTS[:2]}), sink)
    _put(fs, f"{s3_bucket}/corpus/a.parquet", sink.getvalue().to_pybytes())
    _put(fs, f"{s3_bucket}/corpus/b.jsonl", (json.dumps({"output": OUTPUTS[2]}) + "\n").encode())
    _put(fs, f"{s3_bucket}/corpus/_SUCCESS", b"{}")
    assert read_texts(f"s3://{s3_bucket}/corpus/").texts == OUTPUTS
    assert read_texts(f"s3://{s3_bucket}/corpus/*.jsonl").texts == [OUTPUTS[2]]
    files = list_files(f"s3://{s3_bucket}/corpus")
    assert files.urls == [f"s3://{s3_bucket}/corpus/a.parquet", f"s3://{s3_bucket}/corpus/b.jsonl"]
    assert pq.read_table(files.paths[0], filesystem=files.arrow_filesystem()).num_rows == 2
    with pytest.raises(CorpusError, match="no-such-bucket-io"):
        read_texts("s3://no-such-bucket-io/corpus/")
    with pytest.raises(CorpusNotFoundError, match="not-there"):
        read_texts(f"s3://{s3_bucket}/not-there.parquet")


def test_aws_environment_resolver():
    env = {
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_REGION": "eu-west-3",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-only:2",
    }
    settings = S3Settings.from_env(env)
    assert settings == S3Settings("key", "secret", "token", "eu-west-3", "http://s3-only:2")
    assert settings.fsspec_options() == {
        "client_kwargs": {"region_name": "eu-west-3"},
        "endpoint_url": "http://s3-only:2",
        "key": "key",
        "secret": "secret",
        "token": "token",
    }
    fs = settings.arrow_filesystem("bucket")
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-west-3"
    fallback = S3Settings.from_env({"AWS_DEFAULT_REGION": "us-west-2", "AWS_ENDPOINT_URL": "http://generic:1"})
    assert (fallback.region, fallback.endpoint, fallback.access_key) == ("us-west-2", "http://generic:1", None)
    bare = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://minio:9000"})
    assert bare.fsspec_options() == {"client_kwargs": {"region_name": DEFAULT_REGION}, "endpoint_url": bare.endpoint}
    assert bare.arrow_filesystem("bucket").region == DEFAULT_REGION
    assert storage_options_for("/local/path", {"x": 1}) == {"x": 1}


def test_s3_endpoint_from_aws_endpoint_url_s3(s3_server, s3_bucket, monkeypatch):
    """AWS_ENDPOINT_URL_S3 names the store and wins over AWS_ENDPOINT_URL, for fsspec and pyarrow alike."""
    fs, _ = fsspec_filesystem(f"s3://{s3_bucket}")
    _put(fs, f"{s3_bucket}/o.jsonl", b'{"output": "hello"}\n')
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    assert read_texts(f"s3://{s3_bucket}/o.jsonl").texts == ["hello"]
    arrow, path = arrow_filesystem(f"s3://{s3_bucket}/o.jsonl")
    assert path == f"{s3_bucket}/o.jsonl" and arrow.get_file_info(path).type == pafs.FileType.File
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert read_texts(f"s3://{s3_bucket}/o.jsonl").texts == ["hello"]


# ----- the atomic directory writer -----
def test_atomic_directory_local(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left aside
    with pytest.raises(FileExistsError):
        with atomic_directory(out) as tmp:
            (tmp / "other").write_text("x")
    with atomic_directory(out, if_exists="keep") as tmp:
        (tmp / "other").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    with atomic_directory(out, if_exists="replace") as tmp:
        (tmp / "other").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["other"]

    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        with atomic_directory(failed) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert not failed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_free_directory(empty) and is_free_directory(tmp_path / "absent") and not is_free_directory(out)
    with atomic_directory(empty) as tmp:
        (tmp / "f").write_text("x")
    assert (empty / "f").is_file()


def test_atomic_directory_s3(s3_server, s3_bucket):
    out = f"s3://{s3_bucket}/models/m"
    assert is_free_directory(out)
    with atomic_directory(out, last="DONE") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_bytes(b"w")
        (tmp / "DONE").write_text("ok")
    fs, root = fsspec_filesystem(out)
    assert sorted(fs.find(root)) == [f"{root}/DONE", f"{root}/sub/weights"]
    assert not is_free_directory(out)
    with pytest.raises(FileExistsError):
        with atomic_directory(out) as tmp:
            (tmp / "x").write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_directory(f"s3://{s3_bucket}/models/failed") as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("interrupted")
    assert is_free_directory(f"s3://{s3_bucket}/models/failed")
