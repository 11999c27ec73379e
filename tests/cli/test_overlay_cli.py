"""`tasc-ray overlay`: export's client side against a small real HTTP server (canned answers of the endpoint's shape;
the real Serve app is tests/serving/test_serve_app.py), and merge into an index on the tiny tokenizer."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasc_ray.cli.main import main
from tasc_ray.cli.overlay import METADATA_KEY, overlay_table
from tasc_ray.engine.drafts.index import NgramIndex, hash_windows, tokenizer_fingerprint
from tasc_ray.io import atomic_write_bytes
from tasc_ray.serving.config import OVERLAY_ROUTE
from tests.conftest import build_tiny_tokenizer

NEW_TEXT = "Quixotic zebras juggle velvet kumquats."  # in no task output: its contexts are new to the index


# ----- a tiny HTTP server answering GET /v1/tasc/overlay -----
Answer = Callable[[int, dict[str, str]], tuple[int, object]]  # (call number, headers) -> (status, JSON body)


@pytest.fixture
def http_server() -> Iterator[Callable[[Answer], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Answer) -> str:
        calls = {"n": 0}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path != OVERLAY_ROUTE:
                    status, body = 404, {"detail": "Not Found"}
                else:
                    status, body = answer(calls["n"], dict(self.headers))
                    calls["n"] += 1
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _body(replica: str, outputs: list[list[int]], tokenizer: dict | None = None, live: bool = True) -> dict:
    return {
        "replica": replica,
        "model": "tiny",
        "live": live,
        "capacity": 1000 if live else None,
        "tokenizer": tokenizer or {"name": "tiny", "fingerprint": "f" * 32, "vocab_size": 400},
        "outputs": outputs,
        "texts": [f"text {i} of {replica}" for i in range(len(outputs))],
    }


def _export(base: str, out, *extra: str) -> int:
    return main(["overlay", "export", "--url", base, "--out", str(out), "--timeout", "10", *extra, "--json"])


def test_export_writes_every_output_of_each_replica(http_server, tmp_path, capsys):
    replicas = ["aaa", "aaa", "bbb"]  # the router reaches one replica per call, sometimes the same one twice
    outputs = {"aaa": [[5, 6, 7], [5, 6, 7]], "bbb": [[8, 9]]}  # a repeated output is two rows: counts matter
    base = http_server(lambda n, headers: (200, _body(replicas[n % 3], outputs[replicas[n % 3]])))
    out = tmp_path / "sub" / "corpus.parquet"
    assert _export(base, out, "--replicas", "2") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outputs"] == 3 and summary["replicas"] == 2 and summary["out"] == str(out)
    assert summary["per_replica"] == {"aaa": 2, "bbb": 1}
    table = pq.read_table(out)
    assert table.schema.field("token_ids").type == pa.list_(pa.int32())
    assert table.column_names == ["output", "token_ids", "replica"]
    assert table.column("token_ids").to_pylist() == [[5, 6, 7], [5, 6, 7], [8, 9]]
    assert table.column("replica").to_pylist() == ["aaa", "aaa", "bbb"]
    assert table.column("output").to_pylist()[2] == "text 0 of bbb"
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["tokenizer"]["fingerprint"] == "f" * 32 and meta["source"] == base
    assert [p.name for p in out.parent.iterdir()] == ["corpus.parquet"]  # no temporary file left
    # an existing file is kept unless --overwrite
    assert _export(base, out) == 2
    assert "exists" in capsys.readouterr().err
    assert _export(base, out, "--overwrite") == 0


def test_export_sends_the_api_key(http_server, tmp_path, capsys, monkeypatch):
    def answer(n, headers):
        if headers.get("Authorization") != "Bearer sk-1":
            return 401, {"error": {"message": "invalid API key", "type": "x", "param": None, "code": "invalid_api_key"}}
        return 200, _body("aaa", [[1, 2]])

    base = http_server(answer)
    assert _export(base, tmp_path / "c.parquet") == 2
    err = capsys.readouterr().err
    assert "401" in err and "--api-key" in err and len(err.strip().splitlines()) == 1
    assert _export(base, tmp_path / "c.parquet", "--api-key", "sk-1") == 0
    monkeypatch.setenv("TASC_API_KEY", "sk-1")
    assert _export(base, tmp_path / "d.parquet") == 0


@pytest.mark.parametrize(
    "case,needle",
    [
        ("unreachable", "cannot reach"),
        ("not tasc_ray", "not a tasc_ray server"),
        ("empty", "is empty"),
        ("no overlay", "keep no live overlay"),
        ("too few replicas", "heard from 1 of 2 replicas in 8 requests"),
        ("wrong shape", "not a tasc_ray overlay response"),
        ("not json", "not JSON"),
        ("server error", "HTTP 500"),
        ("unavailable", "heard from 0 of 1 replicas in 4 requests; an engine replica was unavailable"),
        ("bad url", "not an http(s) URL"),
    ],
)
def test_export_errors_are_one_line_and_write_nothing(case, needle, http_server, tmp_path, capsys):
    answers = {
        "empty": (200, _body("aaa", [])),
        "no overlay": (200, _body("aaa", [], live=False)),
        "too few replicas": (200, _body("aaa", [[1, 2]])),
        "wrong shape": (200, {"replica": "aaa", "outputs": [[1, "x"]], "texts": ["a"]}),
        "not json": (200, b"<html>hello</html>"),
        "server error": (500, {"error": {"message": "generation failed: boom"}}),
        "unavailable": (503, {"error": {"message": "engine unavailable"}}),
    }
    if case == "unreachable":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    elif case == "not tasc_ray":
        base = http_server(lambda n, h: (200, _body("aaa", [[1, 2]]))) + "/elsewhere"
    elif case == "bad url":
        base = "127.0.0.1:8000"
    else:
        base = http_server(lambda n, h, a=answers[case]: a)
    extra = ["--replicas", "2"] if case == "too few replicas" else []
    out = tmp_path / "corpus.parquet"
    assert _export(base, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_atomic_write_bytes_replaces_whole_files(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in target.parent.iterdir()] == ["f.bin"]
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"three", overwrite=False)
    assert target.read_bytes() == b"two"


def test_atomic_write_bytes_to_s3(s3_bucket):
    import s3fs

    url = f"s3://{s3_bucket}/corpus/overlay.parquet"
    atomic_write_bytes(url, b"data")
    s3fs.S3FileSystem.clear_instance_cache()
    assert s3fs.S3FileSystem().cat_file(url) == b"data"
    with pytest.raises(FileExistsError):
        atomic_write_bytes(url, b"again", overwrite=False)


# ----- merge -----
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from tasc_ray.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))  # its name_or_path, in the manifest, is the model directory


@pytest.fixture
def base_index(tmp_path, tokenizer, task_rows) -> str:
    index = NgramIndex.from_texts([r["output"] for r in task_rows[:200]], tokenizer, max_order=4, top_k=6)
    return index.save(str(tmp_path / "idx"))


def _corpus(tmp_path, tokenizer, texts: list[str], name="corpus.parquet", fingerprint=None) -> str:
    """A corpus as `overlay export` writes it."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tok = {"name": "tiny", "fingerprint": fingerprint or tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}
    body = {"replica": "r1", "model": "tiny", "tokenizer": tok, "outputs": ids, "texts": texts}
    path = tmp_path / name
    pq.write_table(overlay_table({"r1": body}, "http://test"), path)
    return str(path)


def _merge(*args: str) -> int:
    return main(["overlay", "merge", *args, "--json"])


def test_merge_adds_the_corpus_counts(tmp_path, tokenizer, base_index, task_rows, capsys):
    base = NgramIndex.load(base_index)
    new_ids = tokenizer(NEW_TEXT, add_special_tokens=False)["input_ids"]
    context = new_ids[:3]
    before = base.longest_matches([context])[0]
    assert before is None or before.order < 3  # the index has not seen this context
    corpus = _corpus(tmp_path, tokenizer, [NEW_TEXT, NEW_TEXT, task_rows[300]["output"]])  # a repeat counts twice
    manifest_before = (tmp_path / "idx" / "manifest.json").read_text()
    out = tmp_path / "idx-v2"
    assert _merge("--corpus", corpus, "--index", base_index, "--out", str(out)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["added_sequences"] == 3 and summary["rows"] == 3 and summary["in_place"] is False
    assert summary["corpus_sequences"] == 203 and summary["top_k"] == 6 and summary["max_order"] == 4
    merged = NgramIndex.load(str(out))
    match = merged.longest_matches([context])[0]
    assert match is not None and match.order == 3 and match.next_tokens[0] == new_ids[3] and match.probs[0] == 1.0
    table = merged.tables[3]
    key = hash_windows(np.array([context]))[0]
    assert table.totals[table.hashes.searchsorted(key)] == 2  # both copies counted
    assert merged.n_tokens == base.n_tokens + summary["added_tokens"]
    assert (tmp_path / "idx" / "manifest.json").read_text() == manifest_before  # --index untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left

    # the same merge from the token ids the replicas generated
    ids_out = tmp_path / "idx-ids"
    assert _merge("--corpus", corpus, "--index", base_index, "--out", str(ids_out), "--token-ids") == 0
    assert json.loads(capsys.readouterr().out)["column"] == "token_ids"
    assert NgramIndex.load(str(ids_out)).longest_matches([context])[0].order == 3


def test_merge_in_place_only_when_asked(tmp_path, tokenizer, base_index, capsys):
    corpus = _corpus(tmp_path, tokenizer, [NEW_TEXT])
    other = tmp_path / "other"
    shutil.copytree(base_index, other)
    assert _merge("--corpus", corpus, "--index", base_index, "--out", str(other)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _merge("--corpus", corpus, "--index", base_index, "--out", str(other), "--overwrite") == 0
    capsys.readouterr()
    assert NgramIndex.load(str(other)).n_sequences == 201
    # --out equal to --index (spelled differently) replaces it, through a sibling directory renamed into place
    assert _merge("--corpus", corpus, "--index", base_index, "--out", base_index + "/") == 0
    assert json.loads(capsys.readouterr().out)["in_place"] is True
    assert NgramIndex.load(base_index).n_sequences == 201
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.parquet", "idx", "other"]


def test_merge_takes_the_tokenizer_from_model_when_the_manifest_names_none(
    tmp_path, tiny_tokenizer, tiny_model_dir, tokenizer, task_rows, capsys
):
    unnamed = NgramIndex.from_texts([r["output"] for r in task_rows[:50]], tiny_tokenizer)  # no name_or_path
    path = unnamed.save(str(tmp_path / "unnamed"))
    corpus = _corpus(tmp_path, tokenizer, [NEW_TEXT])
    assert _merge("--corpus", corpus, "--index", path, "--out", str(tmp_path / "o")) == 2
    assert "names no tokenizer; pass --model" in capsys.readouterr().err
    args = ["--corpus", corpus, "--index", path, "--out", str(tmp_path / "o")]
    assert _merge(*args, "--model", str(tiny_model_dir)) == 0
    assert json.loads(capsys.readouterr().out)["corpus_sequences"] == 51


def test_merge_refuses_bad_input(tmp_path, tokenizer, tiny_model_dir, base_index, task_rows, capsys):
    out = str(tmp_path / "out")

    def refused(*args: str) -> str:
        assert _merge(*args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
        return err

    good = _corpus(tmp_path, tokenizer, [NEW_TEXT])
    err = refused("--corpus", good, "--index", base_index, "--out", out, "--column", "reference")
    assert "no column 'reference'" in err
    foreign = _corpus(tmp_path, tokenizer, [NEW_TEXT], "foreign.parquet", fingerprint="0" * 32)
    err = refused("--corpus", foreign, "--index", base_index, "--out", out)
    assert "exported from a server whose tokenizer" in err and "0" * 32 in err
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"output": [NEW_TEXT], "token_ids": [[1, 2, 3]]}), plain)
    assert "--token-ids needs a corpus written by" in refused(
        "--corpus", str(plain), "--index", base_index, "--out", out, "--token-ids"
    )
    assert "not an index" in refused("--corpus", good, "--index", str(tmp_path / "missing"), "--out", out)
    assert "not found" in refused("--corpus", str(tmp_path / "none.parquet"), "--index", base_index, "--out", out)
    # a --model whose tokenizer is not the index's
    other = tmp_path / "other-model"
    other.mkdir()
    shutil.copy(tiny_model_dir / "config.json", other / "config.json")
    build_tiny_tokenizer([r["output"] for r in task_rows], vocab_size=300).save_pretrained(other)
    assert "vocabulary" in refused("--corpus", good, "--index", base_index, "--out", out, "--model", str(other))
    # the plain text corpus (no overlay metadata) of the same tokenizer merges
    assert _merge("--corpus", str(plain), "--index", base_index, "--out", out) == 0
