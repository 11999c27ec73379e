"""The commit protocol of resumable parquet-part outputs, without Ray: staging, recovery of an interrupted run's
parts (whole ones kept, torn ones dropped), _SUCCESS written last and removed before a run changes the output,
resume without duplicates; locally and on S3 (moto)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasc_ray.stages.commit import STAGING, SUCCESS, PartsOutput, is_complete, new_run_id

COLUMNS = ["id", "output"]


def _write_part(out: PartsOutput, run: str, name: str, ids: list[str]) -> None:
    path = f"{out.staging(run)}/{name}"
    out.fs.create_dir(out.staging(run), recursive=True)
    with out.fs.open_output_stream(path) as f:
        pq.write_table(pa.table({"id": ids, "output": [f"o-{i}" for i in ids]}), f)


def _write_bytes(out: PartsOutput, path: str, data: bytes) -> None:
    with out.fs.open_output_stream(path) as f:
        f.write(data)


def _files(out: PartsOutput) -> list[str]:
    import pyarrow.fs as pafs

    infos = out.fs.get_file_info(pafs.FileSelector(out.root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(out.root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def _run_protocol(output: str) -> None:
    ids = [f"r{i}" for i in range(10)]
    out = PartsOutput(output, COLUMNS)
    assert out.recover() == 0 and len(out.committed_ids("id", pa.string())) == 0 and not out.is_complete()

    # run 1 is interrupted: one whole part, one torn part (no footer), one stray file
    first = new_run_id()
    out.begin_run()
    _write_part(out, first, "0.parquet", ids[:4])
    whole = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ids[4:8], "output": ids[4:8]}), whole)
    _write_bytes(out, f"{out.staging(first)}/1.parquet", whole.getvalue().to_pybytes()[:-20])
    _write_bytes(out, f"{out.staging(first)}/notes.txt", b"x")
    _write_part(out, first, "2.parquet", ids[8:])  # the required columns are checked too:
    _write_bytes(out, f"{out.staging(first)}/3.parquet", _parquet_bytes(pa.table({"id": ["zz"]})))

    # the rerun keeps what was whole and labels the rest
    again = PartsOutput(output, COLUMNS)
    assert again.recover() == 2
    assert sorted(again.committed_ids("id").to_pylist()) == ids[:4] + ids[8:]
    assert _files(again) == [f"part-{first}-0.parquet", f"part-{first}-2.parquet"]  # staging is gone
    second = new_run_id()
    again.begin_run()
    _write_part(again, second, "0.parquet", ids[4:8])
    new = again.finish_run(second)
    assert [p.rsplit("/", 1)[1] for p in new] == [f"part-{second}-0.parquet"]
    assert sorted(again.read(["id"]).column("id").to_pylist()) == ids  # every row once
    assert not is_complete(output)
    again.mark_complete({"rows": 10})
    assert is_complete(output) and again.is_complete()
    manifest = json.loads(again.fs.open_input_stream(f"{again.root}/{SUCCESS}").read())
    assert manifest["rows"] == 10 and len(manifest["parts"]) == 3
    assert _files(again) == sorted([SUCCESS, *manifest["parts"]])  # no temporary manifest left

    # a run that changes the output removes the marker before writing anything
    again.begin_run()
    assert not is_complete(output) and STAGING not in "".join(_files(again))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_commit_protocol_local(tmp_path):
    _run_protocol(str(tmp_path / "labels"))


def test_commit_protocol_s3(s3_server, s3_bucket):
    _run_protocol(f"s3://{s3_bucket}/labels")


def test_run_ids_sort_by_start_time():
    a, b = new_run_id(), new_run_id()
    assert len(a) == len("20250101000000-abcdef") and a[:14] <= b[:14] and a != b


def test_read_of_no_parts(tmp_path):
    out = PartsOutput(str(tmp_path / "empty"), COLUMNS)
    assert out.read() is None and out.parts() == []
    with pytest.raises(FileNotFoundError):
        out.fs.open_input_stream(f"{out.root}/{SUCCESS}")
