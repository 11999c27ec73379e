"""Corpus indexing on Ray Data: identical to the in-process builder (parquet, and jsonl/csv/text inputs), S3 in and
out, append, index-stats, bad inputs, and a worker that dies mid-job. Real local Ray, real moto S3 server."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from tasc_ray.cli.index import index_stats
from tasc_ray.cli.main import main
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.io import split_texts
from tasc_ray.models import load_tokenizer
from tasc_ray.stages.index_job import IndexJobError, build_index_distributed, index_corpus

ARRAYS = ("hashes", "totals", "offsets", "next_tokens", "counts")


def assert_same_index(a: NgramIndex, b: NgramIndex) -> None:
    """Every array of every order, with dtypes, the token store's tokens, plus fingerprint and corpus statistics."""
    assert a.orders == b.orders
    assert (a.suffix is None) == (b.suffix is None)
    if a.suffix is not None:
        assert a.suffix.size == b.suffix.size > 1
        assert np.array_equal(a.suffix.tokens[: a.suffix.size], b.suffix.tokens[: b.suffix.size])
    for m in a.orders:
        for name in ARRAYS:
            x, y = getattr(a.tables[m], name), getattr(b.tables[m], name)
            assert x.dtype == y.dtype, (m, name)
            assert np.array_equal(x, y), (m, name)
    assert a.stats() == b.stats()
    assert (a.fingerprint, a.tokenizer_name, a.vocab_size) == (b.fingerprint, b.tokenizer_name, b.vocab_size)


@pytest.fixture(scope="module")
def outputs(task_rows) -> list[str]:
    return [r["output"] for r in task_rows]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, outputs) -> Path:
    """Three parquet files of outputs (plus a prompt column, ignored by projection) with null/empty/blank rows."""
    root = tmp_path_factory.mktemp("corpus")
    parts = [outputs[:150] + [None, ""], outputs[150:300] + ["   "], outputs[300:]]
    for i, part in enumerate(parts):
        pq.write_table(
            pa.table({"output": part, "other": [f"x{j}" for j in range(len(part))]}), root / f"part-{i}.parquet"
        )
    return root


def test_cli_index_matches_in_process_builder(
    ray_cluster, corpus_dir, outputs, tiny_model_dir, tiny_tokenizer, tmp_path, capsys
):
    out = tmp_path / "idx"
    # top_k=2 truncates many contexts: the cut must match the in-process builder's too.
    rc = main(
        [
            "index",
            "--input",
            str(corpus_dir / "*.parquet"),
            "--column",
            "output",
            "--tokenizer",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--top-k",
            "2",
            "--batch-size",
            "64",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    summary = json.loads(captured.out)
    assert summary["files"] == 3 and summary["rows"] == len(outputs) + 3
    assert (summary["skipped_null"], summary["skipped_empty"], summary["skipped_rows"]) == (1, 2, 3)
    assert summary["sequences"] == len(outputs) and summary["count_blocks"] >= 2
    built = NgramIndex.load(str(out))
    reference = NgramIndex.from_texts(outputs, load_tokenizer(str(tiny_model_dir)), top_k=2)
    assert_same_index(built, reference)
    assert sum(summary["orders"][str(m)]["contexts"] for m in built.orders) == sum(
        len(built.tables[m].hashes) for m in built.orders
    )

    # index-stats: H2 of the output tokens, computed here independently from the token ids.
    stats = index_stats(str(out))
    ids = tiny_tokenizer(outputs, add_special_tokens=False)["input_ids"]
    counter = Counter(t for seq in ids for t in seq[:-1])
    p = np.array(list(counter.values()), dtype=float) / sum(counter.values())
    assert stats["h2_bits"] == pytest.approx(-math.log2((p * p).sum()), rel=1e-12)
    assert stats["distinct_tokens"] == len(counter)
    assert stats["corpus_tokens"] == sum(len(s) for s in ids) and stats["corpus_sequences"] == len(outputs)
    assert stats["orders"][1]["contexts"] == len(counter)
    assert stats["orders"][1]["truncated_contexts"] > 0 and stats["exact_for_append"] is False
    assert stats["memory_bytes"] == built.nbytes and stats["disk_bytes"] > 0
    assert main(["index-stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["h2_bits"] == pytest.approx(stats["h2_bits"])


def test_other_formats_match_the_in_process_builder(ray_cluster, outputs, tiny_tokenizer, tmp_path):
    """jsonl, csv and text inputs (read by tasc_ray.io on the driver) next to parquet (read by Ray Data)."""
    import json

    corpus = tmp_path / "mixed"
    corpus.mkdir()
    pq.write_table(pa.table({"output": outputs[:100]}), corpus / "a.parquet")
    (corpus / "b.jsonl").write_text("".join(json.dumps({"output": o}) + "\n" for o in outputs[100:200]))
    (corpus / "c.csv").write_text("output\n" + "".join(f'"{o}"\n' for o in outputs[200:300]))
    text = tmp_path / "d.txt"
    text.write_text("\n".join(outputs[300:]) + "\n")
    result = build_index_distributed([str(corpus), str(text)], tiny_tokenizer, top_k=3, batch_size=64)
    assert result.summary["files"] == 4 and result.summary["sequences"] == len(outputs)
    assert_same_index(result.index, NgramIndex.from_texts(outputs, tiny_tokenizer, top_k=3))


def test_s3_index_and_append(ray_cluster, s3_server, s3_bucket, outputs, tiny_tokenizer, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    for i, part in enumerate([outputs[:120], outputs[120:200] + [None]]):
        with fs.open(f"{s3_bucket}/corpus/a-{i}.parquet", "wb") as f:
            pq.write_table(pa.table({"text": part}), f)
    with fs.open(f"{s3_bucket}/new/b.parquet", "wb") as f:
        pq.write_table(pa.table({"text": outputs[200:]}), f)
    out = f"s3://{s3_bucket}/index"
    first = index_corpus(
        f"s3://{s3_bucket}/corpus/",
        out,
        tiny_tokenizer,
        column="text",
        top_k=64,
        num_workers=1,
        num_reducers=2,
        batch_size=64,
    )
    assert first["files"] == 2 and first["skipped_null"] == 1
    assert fs.exists(f"{s3_bucket}/index/manifest.json")
    assert_same_index(NgramIndex.load(out), NgramIndex.from_texts(outputs[:200], tiny_tokenizer, top_k=64))

    # Append in place: counts add, exactly, because no context of the first index was truncated at top_k=64.
    second = index_corpus(
        f"s3://{s3_bucket}/new/*.parquet",
        out,
        tiny_tokenizer,
        column="text",
        top_k=64,
        append_to=out,
        num_workers=1,
        num_reducers=3,
        batch_size=64,
    )
    assert second["appended"] and second["append_exact"]
    appended = NgramIndex.load(out)
    assert_same_index(appended, NgramIndex.from_texts(outputs, tiny_tokenizer, top_k=64))
    assert index_stats(out)["exact_for_append"] is True


def test_bad_inputs_name_the_file_column_or_bucket(
    ray_cluster, s3_server, s3_bucket, corpus_dir, tiny_model_dir, tiny_tokenizer, tmp_path, capsys
):
    out = tmp_path / "idx"
    base = ["--tokenizer", str(tiny_model_dir), "--out", str(out)]
    # missing column: one line, exit 2, names the file and the column
    assert main(["index", "--input", str(corpus_dir), "--column", "nope", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "'nope'" in err and "part-0.parquet" in err and len(err.splitlines()) == 1
    # no such file
    assert main(["index", "--input", str(tmp_path / "missing.parquet"), *base]) == 2
    assert "missing.parquet" in capsys.readouterr().err
    # not parquet
    bad = tmp_path / "bad" / "garbage.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not parquet at all")
    assert main(["index", "--input", str(bad.parent), *base]) == 2
    assert "garbage.parquet" in capsys.readouterr().err
    # wrong bucket (input and output)
    assert main(["index", "--input", "s3://no-such-bucket-xyz/corpus/", *base]) == 2
    assert "no-such-bucket-xyz" in capsys.readouterr().err
    assert (
        main(
            [
                "index",
                "--input",
                str(corpus_dir),
                "--tokenizer",
                str(tiny_model_dir),
                "--out",
                "s3://no-such-bucket-out/idx",
            ]
        )
        == 2
    )
    assert "no-such-bucket-out" in capsys.readouterr().err
    # the job entry point takes the same arguments and fails the same way
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
    try:
        import index_corpus as job
    finally:
        sys.path.pop(0)
    assert job.main(["--input", str(corpus_dir), "--column", "nope", *base]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert not out.exists()
    # a column whose type is not text: every row is skipped as non-string, and an all-skipped corpus is an error
    texts, stats = split_texts(pa.chunked_array([pa.array([1, None, 3])]))
    assert texts == [] and stats == {"rows": 3, "skipped_null": 1, "skipped_empty": 0, "skipped_non_string": 2}
    with pytest.raises(IndexJobError, match="mixed|different types"):
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        pq.write_table(pa.table({"output": ["a b c"]}), mixed / "a.parquet")
        pq.write_table(pa.table({"output": [1]}), mixed / "b.parquet")
        build_index_distributed(str(mixed), tiny_tokenizer)


def _corrupt_data_page(path: Path) -> None:
    """Overwrite bytes inside the first column chunk, leaving the footer (schema, row counts) readable."""
    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(0).column(0)
    start = chunk.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start, start + min(64, chunk.total_compressed_size)):
        data[i] = 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_data_fails_cleanly_and_keeps_the_old_index(ray_cluster, outputs, tiny_tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"output": outputs[:100]}), corpus / "good.parquet")
    pq.write_table(pa.table({"output": outputs[100:200]}), corpus / "broken.parquet", compression="none")
    _corrupt_data_page(corpus / "broken.parquet")
    out = tmp_path / "idx"
    old = NgramIndex.from_texts(outputs[:50], tiny_tokenizer)
    old.save(str(out))
    with pytest.raises(IndexJobError, match="broken.parquet"):
        index_corpus(str(corpus), str(out), tiny_tokenizer, num_workers=1, num_reducers=1)
    assert_same_index(NgramIndex.load(str(out)), old)  # nothing was written over the old index


class DyingTokenizer:
    """Wraps a real tokenizer; the first call in any process (marker file absent) kills that worker process."""

    def __init__(self, tokenizer, marker: str) -> None:
        self.tokenizer, self.marker = tokenizer, marker

    def __call__(self, *args, **kwargs):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name):
        if name in ("tokenizer", "marker") or name.startswith("__"):  # unpickling looks these up before __dict__
            raise AttributeError(name)
        if name == "backend_tokenizer":  # so the job ships this object, not the Rust tokenizer inside it
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def test_worker_death_is_retried_and_result_is_exact(ray_cluster, corpus_dir, outputs, tiny_tokenizer, tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrapper travels by value to the workers
    marker = tmp_path / "died"
    result = build_index_distributed(
        str(corpus_dir),
        DyingTokenizer(tiny_tokenizer, str(marker)),
        top_k=3,
        batch_size=64,
        num_workers=1,
        num_reducers=1,
    )
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker process really died
    assert result.summary["sequences"] == len(outputs) and result.summary["skipped_rows"] == 3
    assert_same_index(result.index, NgramIndex.from_texts(outputs, tiny_tokenizer, top_k=3))
