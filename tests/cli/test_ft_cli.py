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


def _varied(n: int) -> list[str]:
    """n outputs with no repeated n-gram worth a token."""
    import random
    import string

    rng = random.Random(0)
    return ["".join(rng.choice(string.ascii_letters + string.digits) for _ in range(8)) for _ in range(n)]


def _corpus(path: Path, task_rows, n: int | None = None) -> Path:
    rows = task_rows[:n] if n else task_rows
    path.write_text("".join(json.dumps({"output": r["output"], "prompt": r["text"] + "\nMR:\n"}) + "\n" for r in rows))
    return path


def test_ft_recipe_json(tmp_path, tiny_model_dir, task_rows, capsys):
    """`ft-recipe --json`: the choice and every candidate's evidence on stdout, the table of candidates on stderr;
    with pilot fine-tunes, the probed candidates carry their likelihood evidence."""
    corpus = _corpus(tmp_path / "c.jsonl", task_rows)
    args = ["ft-recipe", "--model", str(tiny_model_dir), "--corpus", str(corpus), "--metric", "slot_f1", "--json"]
    assert main([*args, "--prompt-column", "prompt", "--no-likelihood"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["chosen"].startswith("key-end") and summary["corpus"]["key_end"] == "["
    assert summary["flags"][:2] == ["--budget", summary["chosen"].split("-")[-1]] and "--key-end" in summary["flags"]
    assert {c["status"] for c in summary["candidates"]} <= {"chosen", "eligible", "rejected"}
    assert "| candidate |" in captured.err and "chosen: key-end" in captured.err

    pilots = ["--prompt-column", "prompt", "--pilot-steps", "1", "--pilot-batch-size", "2", "--probe-rows", "8"]
    assert main([*args, *pilots, "--max-pilots", "1", "--quality-bound", "100"]) == 0
    summary = json.loads(capsys.readouterr().out)
    probed = [c for c in summary["candidates"] if c["likelihood"] is not None]
    assert len(probed) == 1 and probed[0]["status"] == "chosen" and summary["chosen"] == probed[0]["name"]
    assert probed[0]["likelihood"]["rows"] == 8 and probed[0]["predicted_delta"] is not None

    assert main([*args[:-1], "--corpus", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_finetune_recipe_auto(tmp_path, tiny_model_dir, task_rows, capsys):
    """`finetune --recipe auto` on the original model: the recipe chosen, the model enriched with it and
    fine-tuned; the summary carries the choice."""
    import pandas as pd

    train = tmp_path / "train.parquet"
    pd.DataFrame([{"prompt": r["text"] + "\nMR:\n", "output": r["output"]} for r in task_rows]).to_parquet(train)
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_model_dir), "--train", str(train), "--out", str(out), "--json"]
    local = ["--trainer", "local", "--epochs", "1", "--max-steps", "1", "--metric", "slot_f1"]
    assert main([*args, *local, "--recipe", "auto", "--no-likelihood"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    chosen = summary["recipe"]["chosen"]
    assert summary["status"] == "done" and chosen.startswith("key-end") and "| candidate |" in captured.err
    enriched = Path(f"{out}.enriched")
    vocab = json.loads((enriched / REPORT_FILE).read_text())
    assert vocab["config"]["key_end"] == ["["] and vocab["n_new_tokens"] > 0 and summary["model"] == str(enriched)
    assert (out / "config.json").is_file() and summary["steps"] == 1
    # a corpus too varied to enrich: a no-op, nothing trained
    varied = tmp_path / "varied.parquet"
    pd.DataFrame([{"prompt": f"p{i}", "output": o} for i, o in enumerate(_varied(40))]).to_parquet(varied)
    out2 = tmp_path / "ft2"
    code = main(["finetune", "--model", str(tiny_model_dir), "--train", str(varied), "--out", str(out2), "--json",
                 *local, "--recipe", "auto", "--no-likelihood", "--probe-rows", "8"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "no-op" and "too small or too varied" in summary["message"]
    assert not out2.exists() and not Path(f"{out2}.enriched").exists()


def test_ft_pipeline_recipe_auto_no_op(tmp_path, tiny_model_dir, capsys):
    """`ft-pipeline --recipe auto`: the recipe stage writes recipe.json before any enrichment; a corpus the choice
    finds nothing in ends the job as a no-op (no Ray, nothing enriched), and a rerun skips the stage."""
    import pandas as pd

    corpus, work = tmp_path / "corpus.parquet", tmp_path / "run"
    pd.DataFrame([{"prompt": f"p{i}", "output": o} for i, o in enumerate(_varied(60))]).to_parquet(corpus)
    args = ["ft-pipeline", "--model", str(tiny_model_dir), "--input", str(corpus), "--work-dir", str(work)]
    args += ["--eval-size", "4", "--recipe", "auto", "--no-likelihood", "--probe-rows", "8", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["status"] == "no-op" and summary["recipe"]["no_op"] and "too small or too varied" in summary["message"]
    )
    assert summary["stages"]["recipe"]["status"] == "done" and summary["stages"]["enrich"]["status"] == "not run"
    assert (work / "recipe.json").is_file() and not (work / "enriched").exists()
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["status"] == "no-op" and again["stages"]["recipe"]["status"] == "skipped"
    settings = json.loads((work / "settings.json").read_text())
    assert settings["recipe"]["probe_rows"] == 8 and "recipe" not in settings["finetune"]
