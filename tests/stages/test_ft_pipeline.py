"""The TASC-ft pipeline end to end (`tasc-ray ft-pipeline`) on the tiny Llama and a local Ray: from a Serve request
log to a fine-tuned model, its index and its evaluation; a rerun skips every stage and, with a quality bound the
model misses, refuses it (exit 1); a corpus too small to enrich is a no-op; a missing column names the columns."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tasc_ray.cli.main import main
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.serving.request_log import LoggedRequest, RequestLog
from tasc_ray.stages.ft_pipeline import split_rows


def _prompt(row: dict[str, str]) -> str:
    return row["text"] + "\nMR:\n"


def _write_request_log(directory, rows: list[dict[str, str]], truncated: int) -> None:
    """A Serve request log (the replicas' own writer): each row a finished request; `truncated` more hit the limit."""
    log = RequestLog(str(directory), "replica0", max_rows=40)
    entries = [(r, "stop") for r in rows] + [(r, "length") for r in rows[:truncated]]
    for i, (row, reason) in enumerate(entries):
        log.record(
            LoggedRequest(f"req-{i}", 0, 0.0, "tiny", _prompt(row), row["output"], reason, 20, 30, 10, 20, 0.1, "{}")
        )
    log.close()


def _run(capsys, *args: str) -> tuple[int, dict, str]:
    """`tasc-ray ft-pipeline --json ARGS`: the exit code, the JSON summary ({} when none) and stderr."""
    code = main(["ft-pipeline", "--json", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def test_split_holds_out_whole_prompts():
    prompts = ["a", "b", "a", "c", "d", "b", "e"]
    train, held = split_rows(prompts, 2, seed=3)
    held_prompts = {prompts[i] for i in held}
    assert len(held) == 2 and len(held_prompts) == 2
    assert not held_prompts & {prompts[i] for i in train}
    assert train == [i for i, p in enumerate(prompts) if p not in held_prompts]  # every row of the other prompts
    assert (train, held) == split_rows(prompts, 2, seed=3)


def test_pipeline_end_to_end_resumes_and_refuses(ray_cluster, tmp_path, tiny_model_dir, task_rows, capsys):
    logs, work = tmp_path / "logs", tmp_path / "run"
    _write_request_log(logs, task_rows[:72], truncated=2)
    common = [
        "--model", str(tiny_model_dir), "--request-log", str(logs), "--work-dir", str(work), "--eval-size", "8",
        "--max-new-tokens", "24", "--budget", "40", "--per-iteration", "20", "--epochs", "1", "--batch-size", "8",
        "--lr", "1e-2", "--index-workers", "1",
    ]  # fmt: skip
    code, summary, _ = _run(capsys, *common, "--quality-bound", "100")
    assert code == 0, summary
    assert summary["status"] == "ready" and not summary["deployed"]
    assert all(summary["stages"][s]["status"] == "done" for s in ("split", "enrich", "index", "finetune", "evaluate"))
    split = json.loads((work / "data" / "split.json").read_text())
    assert split["rows"] == 74 and split["skipped_unfinished"] == 2
    assert split["eval_rows"] == 8 and split["train_rows"] == 64
    assert pq.read_table(work / "data" / "train.parquet").column_names == ["prompt", "output"]
    vocab = json.loads((work / "enriched" / "tasc_ft_vocab.json").read_text())
    assert vocab["n_new_tokens"] > 0
    assert (work / "model" / "config.json").is_file() and (work / "model" / "finetune.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    assert len(tokenizer) == vocab["vocab_size_after"]
    NgramIndex.load(str(work / "model_index")).check_tokenizer(tokenizer)  # the index is the enriched tokenizer's
    NgramIndex.load(str(work / "index")).check_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    evaluation = summary["evaluation"]
    assert evaluation["rows"] == 8 and evaluation["metric"] == "exact_match"
    for side in ("original", "finetuned"):
        assert evaluation[side]["output_tokens_per_row"] > 0 and evaluation[side]["errors"] == 0
    predictions = pq.read_table(work / "eval" / "predictions.parquet").to_pandas()
    assert len(predictions) == 8 and set(predictions["prompt"]).isdisjoint(
        pq.read_table(work / "data" / "train.parquet").column("prompt").to_pylist()
    )
    assert json.loads((work / "pipeline.json").read_text())["status"] == "ready"

    # a rerun skips every stage; a bound the model misses by a point refuses it (exit 1, summary printed)
    bound = evaluation["quality_drop"] - 1.0
    code, again, err = _run(capsys, *common, "--quality-bound", str(bound))
    assert code == 1
    assert all(again["stages"][s]["status"] == "skipped" for s in ("split", "enrich", "index", "finetune", "evaluate"))
    assert again["status"] == "rejected" and not again["deployed"] and again["stages"]["deploy"]["status"] == "refused"
    assert again["evaluation"] == evaluation and (work / "model" / "config.json").is_file()
    assert "incomplete: not deployed: held-out exact_match fell" in err

    # other settings on the same work directory are refused, naming what changed
    code, _, err = _run(capsys, *common, "--eval-size", "9")
    assert code == 2 and "other settings (eval_size)" in err


def test_too_small_corpus_is_a_no_op(tmp_path, tiny_model_dir, task_rows, capsys):
    corpus, work = tmp_path / "corpus.parquet", tmp_path / "run"
    pd.DataFrame([{"q": _prompt(r), "a": r["output"]} for r in task_rows[:8]]).to_parquet(corpus)
    args = ["--model", str(tiny_model_dir), "--input", str(corpus), "--prompt-column", "q", "--output-column", "a"]
    code, summary, _ = _run(capsys, *args, "--work-dir", str(work), "--eval-size", "2")
    assert code == 0 and summary["status"] == "no-op" and not summary["deployed"]
    assert "too small or too varied" in summary["message"] and summary["enrichment"]["n_new_tokens"] == 0
    assert summary["stages"]["finetune"]["status"] == "not run"
    assert not (work / "model").exists() and not (work / "index").exists()
    code, again, _ = _run(capsys, *args, "--work-dir", str(work), "--eval-size", "2")  # the same verdict, resumed
    assert code == 0 and again["status"] == "no-op" and again["stages"]["enrich"]["status"] == "skipped"

    code, _, err = _run(capsys, *args[:-1], "answer", "--work-dir", str(tmp_path / "other"))
    assert code == 2 and "no column 'answer'" in err and "columns: q, a" in err


CLUSTER = """
import json, sys, time
import ray
ctx = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]),
               log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
print(json.dumps({"gcs": ctx.address_info["gcs_address"]}), flush=True)
try:
    while True:
        time.sleep(1)
except KeyboardInterrupt:
    ray.shutdown()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_running(dashboard: str, app: str, model: str) -> dict:
    """The app's status once it runs on `model` (polled through Serve's REST API)."""
    import time

    import httpx

    deadline = time.time() + 300  # generous: the CPU here is shared
    while time.time() < deadline:
        apps = httpx.get(f"{dashboard}/api/serve/applications/", timeout=30).json()
        status = apps["applications"].get(app) or {}
        assert status.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), status.get("message")
        args = (status.get("deployed_app_config") or {}).get("args") or {}
        if status.get("status") == "RUNNING" and (args.get("engine") or args).get("model") == model:
            return status
        time.sleep(1)
    raise AssertionError(f"{app} did not reach RUNNING on {model}")


@pytest.mark.slow
def test_pipeline_deploys_to_a_serve_app(tmp_path, tiny_model_dir, task_rows):
    """A Serve app deployed from its config (`serve deploy`'s path) on the original model; the pipeline, run as a Ray
    job would be (a subprocess joining the cluster through RAY_ADDRESS), redeploys it on the fine-tuned model and its
    index through Serve's REST API; the app then answers under its old model name with the new model."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tasc_ray.serving.app import deploy_config
    from tasc_ray.serving.config import ServeConfig

    dashboard_port, http_port = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    # Ray turns token authentication on when a token file exists; this test's cluster and its clients go without
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-c", CLUSTER, str(dashboard_port)]
    cluster = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        gcs = json.loads(cluster.stdout.readline())["gcs"]
        served = ServeConfig.model_validate(
            {"model": str(tiny_model_dir), "model_name": "tiny", "num_cpus": 0.25, "ingress_num_cpus": 0.05}
        )
        config = deploy_config(served, http_port=http_port, http_host="127.0.0.1", app_name="tasc")
        put = httpx.put(f"{dashboard}/api/serve/applications/", json=config, timeout=60)
        assert put.status_code == 200, put.text
        _wait_running(dashboard, "tasc", str(tiny_model_dir))

        logs, work = tmp_path / "logs", tmp_path / "run"
        _write_request_log(logs, task_rows[:72], truncated=0)
        command = [
            sys.executable, "-m", "tasc_ray", "ft-pipeline", "--json", "--model", str(tiny_model_dir),
            "--request-log", str(logs), "--work-dir", str(work), "--eval-size", "8", "--max-new-tokens", "16",
            "--budget", "40", "--per-iteration", "20", "--epochs", "1", "--lr", "1e-2", "--index-workers", "1",
            "--quality-bound", "100", "--deploy-app", "tasc", "--serve-address", dashboard,
        ]  # fmt: skip
        done = subprocess.run(command, env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=500)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout)
        assert (
            summary["status"] == "deployed" and summary["deployed"] and summary["stages"]["deploy"]["status"] == "done"
        )

        _wait_running(dashboard, "tasc", str(work / "model"))
        base = f"http://127.0.0.1:{http_port}"
        health = httpx.get(f"{base}/health", timeout=30).json()
        assert health["model"] == "tiny" and health["model_source"] == str(work / "model")
        assert health["index"] == str(work / "model_index")
        body = {"model": "tiny", "prompt": _prompt(task_rows[100]), "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200
    finally:
        cluster.send_signal(signal.SIGINT)
        cluster.wait(timeout=60)
