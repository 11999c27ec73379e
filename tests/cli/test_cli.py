"""The CLI: --help on every command, build-index and generate end to end on a tiny model, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasc_ray.cli.main import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"build-index", "generate", "models"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "tasc_ray", "--help"], capture_output=True, text=True, check=True)
    assert "build-index" in out.stdout


@pytest.fixture
def corpus_parquet(tmp_path, task_rows):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"output": [r["output"] for r in task_rows[:100]] + [None, ""]}), path)
    return path


def test_build_index_and_generate(tmp_path, corpus_parquet, tiny_model_dir, capsys, task_rows):
    out = tmp_path / "idx"
    assert (
        main(
            ["build-index", "--input", str(corpus_parquet), "--model", str(tiny_model_dir), "--out", str(out), "--json"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 100 and summary["skipped_rows"] == 2
    assert (out / "manifest.json").exists()
    prompt = task_rows[300]["prompt"][-120:]
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--index",
                str(out),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "12",
                "--json",
            ]
        )
        == 0
    )
    spec = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--index",
                str(out),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "12",
                "--json",
                "--no-spec",
            ]
        )
        == 0
    )
    plain = json.loads(capsys.readouterr().out)
    assert spec["text"] == plain["text"] and plain["drafted"] == 0 and spec["new_tokens"] >= 1


def test_generate_chat_messages(tiny_model_dir, capsys):
    messages = json.dumps([{"role": "user", "content": "Zizzi is a pub."}])
    assert (
        main(["generate", "--model", str(tiny_model_dir), "--messages", messages, "--max-new-tokens", "5", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > 5


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "corpus file not found"),
        ("column", "has no column 'output'; columns: text"),
        ("empty", "no non-empty text rows"),
        ("corrupt", "not a readable parquet file"),
        ("jsonl", "is not valid JSON"),
    ],
)
def test_build_index_bad_input(tmp_path, tiny_model_dir, capsys, case, message):
    path = tmp_path / "corpus.parquet"
    if case == "column":
        pq.write_table(pa.table({"text": ["a"]}), path)
    elif case == "empty":
        pq.write_table(pa.table({"output": pa.array([None, ""], pa.string())}), path)
    elif case == "corrupt":
        path.write_bytes(b"PAR1 nonsense")
    elif case == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text('{"output": "x"}\n{broken\n')
    code = main(["build-index", "--input", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "i")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "i" / "manifest.json").exists()


def test_unknown_model_and_bad_index(tmp_path, tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "x"]) == 2
    assert "cannot load model" in capsys.readouterr().err
    (tmp_path / "empty-dir").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty-dir"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--index", str(tmp_path), "--prompt", "x"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--messages", "[{oops", "--prompt", "x"][:5]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_build_index_reads_csv_directories_and_s3(tmp_path, task_rows, tiny_model_dir, s3_bucket, capsys):
    from tasc_ray.engine.drafts.index import NgramIndex
    from tasc_ray.io import fsspec_filesystem, storage_options_for
    from tasc_ray.models import load_tokenizer

    outputs = [r["output"] for r in task_rows[:60]]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.csv").write_text("output\n" + "".join(f'"{o}"\n' for o in outputs[:30]))
    (corpus / "b.txt").write_text("\n".join(outputs[30:]) + "\n")
    out = f"s3://{s3_bucket}/idx"
    assert main(["build-index", "--input", str(corpus), "--model", str(tiny_model_dir), "--out", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 60
    expected = NgramIndex.from_texts(outputs, load_tokenizer(str(tiny_model_dir)))
    assert NgramIndex.load(out, storage_options_for(out)).stats() == expected.stats()

    fs, _ = fsspec_filesystem(out)
    with fs.open(f"{s3_bucket}/corpus/c.jsonl", "w") as f:
        f.write("".join(json.dumps({"output": o}) + "\n" for o in outputs))
    local = tmp_path / "idx"
    args = ["build-index", "--input", f"s3://{s3_bucket}/corpus/*.jsonl", "--model", str(tiny_model_dir)]
    assert main([*args, "--out", str(local), "--json"]) == 0
    assert NgramIndex.load(str(local)).stats() == expected.stats()
