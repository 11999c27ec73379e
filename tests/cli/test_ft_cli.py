"""The TASC-ft commands: enrich-vocab end to end (jsonl, and a corpus on S3), finetune's clear errors, the job
entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasc_ray.cli.main import main
from tasc_ray.ft.enrich import REPORT_FILE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outputs(task_rows) -> list[str]:
    return [r["output"] for r in task_rows]


def test_enrich_vocab_cli(tmp_path, tiny_model_dir, outputs, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"output": o}) + "\n" for o in outputs))
    out = tmp_path / "enriched"
    assert (
        main(
            [
                "enrich-vocab",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus),
                "--budget",
                "20",
                "--per-iteration",
                "10",
                "--out",
                str(out),
                "--untie-embeddings",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_new_tokens"] == 20 and (out / REPORT_FILE).is_file() and (out / "config.json").is_file()
    assert summary["untied_embeddings"] and not json.loads((out / "config.json").read_text())["tie_word_embeddings"]


def test_finetune_refuses_use_gpu_without_gpus(ray_cluster, tmp_path, enriched_dir, train_file, capsys):
    if ray_cluster.cluster_resources().get("GPU", 0):
        pytest.skip("this cluster has GPUs")
    out = tmp_path / "ft"
    capsys.readouterr()
    assert (
        main(["finetune", "--model", str(enriched_dir), "--train", str(train_file), "--out", str(out), "--use-gpu"])
        == 2
    )
    assert "no GPU" in capsys.readouterr().err and not out.exists()
    assert (
        main(
            [
                "finetune",
                "--model",
                str(enriched_dir),
                "--train",
                str(train_file),
                "--out",
                str(out),
                "--output-column",
                "mr",
            ]
        )
        == 2
    )
    assert "no column 'mr'" in capsys.readouterr().err and not out.exists()


def test_job_entry_point(tmp_path, enriched_dir):
    import subprocess
    import sys

    root = ROOT
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "jobs" / "finetune.py"),
            "--model",
            str(enriched_dir),
            "--train",
            str(tmp_path / "missing.parquet"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "training file not found" in proc.stderr and not (tmp_path / "out").exists()


def test_enrich_vocab_reads_s3(tmp_path, tiny_model_dir, outputs, s3_bucket, capsys):
    from tasc_ray.io import fsspec_filesystem

    fs, _ = fsspec_filesystem(f"s3://{s3_bucket}")
    with fs.open(f"{s3_bucket}/corpus/outputs.txt", "w") as f:
        f.write("\n".join(outputs))
    out = tmp_path / "enriched"
    args = ["enrich-vocab", "--model", str(tiny_model_dir), "--corpus", f"s3://{s3_bucket}/corpus/"]
    assert main([*args, "--budget", "10", "--per-iteration", "10", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_new_tokens"] == 10 and (out / REPORT_FILE).is_file()


def test_finetune_reads_s3(tmp_path, enriched_dir, train_file, s3_bucket, capsys):
    """`finetune --train s3://...` end to end (local trainer, one step): rows read from the bucket, model saved."""
    from tasc_ray.io import fsspec_filesystem

    fs, _ = fsspec_filesystem(f"s3://{s3_bucket}")
    fs.put(str(train_file), f"{s3_bucket}/train/part-0.parquet")
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(enriched_dir), "--train", f"s3://{s3_bucket}/train/", "--out", str(out)]
    assert (
        main(
            [*args, "--trainer", "local", "--epochs", "1", "--max-steps", "1", "--new-token-align-steps", "1", "--json"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 32 and summary["steps"] == 1 and (out / "config.json").is_file()
    assert summary["new_token_alignment"]["steps"] == 1
    assert main([*args[:-1], str(tmp_path / "ft2"), "--train", f"s3://{s3_bucket}/missing/"]) == 2
    assert "no such key" in capsys.readouterr().err and not (tmp_path / "ft2").exists()


def test_enrich_vocab_keeps_copied_values_out(tmp_path, tiny_model_dir, task_rows, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"output": r["output"], "prompt": r["text"]}) + "\n" for r in task_rows))
    args = ["enrich-vocab", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--max-copied", "0.5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "needs --prompt-column" in capsys.readouterr().err
    out = tmp_path / "b"
    assert main([*args, "--prompt-column", "prompt", "--budget", "20", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["max_copied"] == 0.5 and sum(it["dropped_copied"] for it in summary["iterations"]) > 0
