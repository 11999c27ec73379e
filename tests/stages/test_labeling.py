"""Batch labeling on Ray Data: the Dataset -> Dataset stage, the job over local and S3 parquet (and jsonl), error
rows, the commit marker and resume after a stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasc_ray.engine.config import EngineConfig
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.generator import SamplingParams
from tasc_ray.engine.load import load_engine
from tasc_ray.io import arrow_filesystem
from tasc_ray.stages.commit import SUCCESS, is_complete
from tasc_ray.stages.labeling import (
    OUTPUT_COLUMNS,
    LabelActor,
    LabelError,
    label_dataset,
    label_parquet,
    node_cpu_share,
)

MAX_NEW = 24
STOP = ["]"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, task_rows, tiny_tokenizer):
    path = tmp_path_factory.mktemp("label-index") / "index"
    return NgramIndex.from_texts([r["output"] for r in task_rows[:300]], tiny_tokenizer).save(str(path))


@pytest.fixture(scope="module")
def engine(tiny_model_dir, index_dir):
    return EngineConfig(model=str(tiny_model_dir), index=index_dir)


def _rows(task_rows, n, bad=True):
    rows = [{"id": r["id"], "text": r["text"], "prompt": r["prompt"]} for r in task_rows[300 : 300 + n]]
    if bad:  # an empty prompt and one longer than the tiny model's 1024-token context
        rows += [
            {"id": "bad-empty", "text": "", "prompt": ""},
            {"id": "bad-long", "text": "x", "prompt": "Blue Spice is a pub. " * 400},
        ]
    return rows


@pytest.fixture(scope="module")
def reference(engine, task_rows):
    """What the engine itself emits for each prompt (greedy), to compare the job's outputs against."""
    generator = load_engine(engine)
    rows = _rows(task_rows, 40, bad=False)
    results = generator.generate([r["prompt"] for r in rows], SamplingParams(max_new_tokens=MAX_NEW, stop=STOP))
    return {r["id"]: res.text for r, res in zip(rows, results)}


def _read(output: str) -> pa.Table:
    fs, root = arrow_filesystem(output)
    parts = [
        f.path
        for f in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(root))
        if f.base_name.startswith("part-")
    ]
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts])


def _check_output(output: str, rows: list[dict], reference: dict[str, str]) -> pa.Table:
    table = _read(output)
    assert table.column_names[: len(OUTPUT_COLUMNS)] == OUTPUT_COLUMNS
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row exactly once
    by_id = {r["id"]: r for r in table.to_pylist()}
    for rid, text in reference.items():
        if rid in by_id:
            assert by_id[rid]["error"] is None and by_id[rid]["output"] == text, rid
            assert by_id[rid]["output_tokens"] > 0 and by_id[rid]["latency_s"] > 0
    return table


def test_label_errors_limit_and_resume(ray_cluster, tmp_path, task_rows, engine, reference):
    rows = _rows(task_rows, 40)
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = str(tmp_path / "labels")

    # the first run decodes plainly (no drafts); the rows must match the speculative reference exactly
    first = label_parquet(
        str(src),
        out,
        engine,
        max_new_tokens=MAX_NEW,
        stop=STOP,
        batch_size=8,
        limit=15,
        speculative=False,
        num_replicas=2,
        num_cpus_per_replica=0.25,
    )
    assert first["rows_labeled"] == 15 and not first["complete"] and first["rows_remaining"] == 27
    assert first["drafted_tokens"] == 0
    assert not is_complete(out) and not (Path(out) / SUCCESS).exists()

    second = label_parquet(str(src), out, engine, max_new_tokens=MAX_NEW, stop=STOP, batch_size=8)
    assert second["rows_already_done"] == 15 and second["rows_labeled"] == 27 and second["complete"]
    manifest = json.loads((Path(out) / SUCCESS).read_text())
    assert manifest["rows"] == 42 and len(manifest["parts"]) >= 2
    table = _check_output(out, rows, reference)
    errors = {r["id"]: r["error"] for r in table.to_pylist() if r["error"]}
    assert set(errors) == {"bad-empty", "bad-long"} and "context" in errors["bad-long"]
    assert sum(table.column("drafted_tokens").to_pylist()[i] or 0 for i in range(len(table))) > 0

    third = label_parquet(str(src), out, engine, max_new_tokens=MAX_NEW, stop=STOP, batch_size=8)
    assert third["rows_labeled"] == 0 and third["complete"] and len(_read(out)) == 42


def test_label_dataset_is_a_dataset_stage(ray_cluster, task_rows, engine, reference):
    """The stage alone: rows in, label rows out; the caller owns reading and writing (here: in memory)."""
    rows = _rows(task_rows, 6)
    ds = ray_cluster.data.from_items(rows)
    labeled = label_dataset(ds, engine, "{prompt}", SamplingParams(max_new_tokens=MAX_NEW, stop=STOP), batch_size=4)
    out = {r["id"]: r for r in labeled.take_all()}
    assert sorted(out) == sorted(r["id"] for r in rows)
    assert set(next(iter(out.values()))) == set(OUTPUT_COLUMNS)
    for rid, text in reference.items():
        if rid in out:
            assert out[rid]["output"] == text and out[rid]["error"] is None
    assert out["bad-empty"]["error"].startswith("PromptError") and out["bad-empty"]["output"] is None
    assert out["bad-long"]["error"].startswith("PromptTooLongError")


def test_jsonl_input(ray_cluster, tmp_path, task_rows, engine, reference):
    rows = _rows(task_rows, 5, bad=False)
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = label_parquet(str(src), str(tmp_path / "labels"), engine, max_new_tokens=MAX_NEW, stop=STOP)
    assert summary["complete"] and summary["rows_labeled"] == 5
    _check_output(str(tmp_path / "labels"), rows, reference)


def test_kept_input_columns_make_the_output_a_training_corpus(ray_cluster, tmp_path, task_rows, engine, reference):
    """--keep-columns copies input columns beside the outputs (with their types), so the labeled output is a
    (prompt, output) corpus `finetune --train` reads; a rerun must keep the same columns."""
    from tasc_ray.ft.train import read_pairs

    rows = [r | {"score": i} for i, r in enumerate(_rows(task_rows, 6, bad=False))]
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = str(tmp_path / "labels")
    kw = dict(max_new_tokens=MAX_NEW, stop=STOP, batch_size=4)
    first = label_parquet(str(src), out, engine, keep_columns=["prompt", "score", "id"], limit=3, **kw)
    assert first["rows_labeled"] == 3
    with pytest.raises(LabelError, match=r"kept input columns \['prompt', 'score'\]"):
        label_parquet(str(src), out, engine, keep_columns=["prompt"], **kw)
    with pytest.raises(LabelError, match="output has columns of those names"):
        label_parquet(str(src), str(tmp_path / "other"), engine, keep_columns=["output"], **kw)
    assert label_parquet(str(src), out, engine, keep_columns=["prompt", "score"], **kw)["complete"]
    table = _check_output(out, rows, reference)
    assert table.column_names == OUTPUT_COLUMNS + ["prompt", "score"] and table.schema.field("score").type == pa.int64()
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert all(by_id[r["id"]]["prompt"] == r["prompt"] and by_id[r["id"]]["score"] == r["score"] for r in rows)
    assert json.loads((Path(out) / SUCCESS).read_text())["columns"] == OUTPUT_COLUMNS + ["prompt", "score"]
    pairs = read_pairs(out, "prompt", "output")
    assert sorted(p["prompt"] for p in pairs) == sorted(r["prompt"] for r in rows if by_id[r["id"]]["output"])


def test_replicas_share_their_node_cpus(ray_cluster):
    """Inside the cluster (one node with 2 CPUs), each replica's torch threads are its share of its node's CPUs."""
    share = ray_cluster.remote(num_cpus=0)(node_cpu_share)
    assert ray_cluster.get([share.remote(k) for k in (1, 2, 3)]) == [2, 1, 1]


def test_template_and_column_errors(ray_cluster, tmp_path, task_rows, engine):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(task_rows, 4, bad=False)), src)
    with pytest.raises(LabelError, match="'mr'"):
        label_parquet(str(src), str(tmp_path / "o1"), engine, prompt_template="Sentence: {text}\nMR: {mr}")
    with pytest.raises(LabelError, match="'key'"):
        label_parquet(str(src), str(tmp_path / "o2"), engine, id_column="key")
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(task_rows, 2, bad=False) * 2), dup)
    with pytest.raises(LabelError, match="duplicate"):
        label_parquet(str(dup), str(tmp_path / "o3"), engine)


def test_s3_input_and_output_through_the_job_script(ray_cluster, s3_bucket, tmp_path, task_rows, engine, reference):
    import pyarrow.fs as pafs

    rows = _rows(task_rows, 12, bad=False)
    for r in rows:  # the template rebuilds the prompt from two columns
        r["intro"] = r["prompt"][: r["prompt"].rindex("Sentence: ")]
    fs, _ = arrow_filesystem(f"s3://{s3_bucket}/in")
    with fs.open_output_stream(f"{s3_bucket}/in/prompts.parquet") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    out = f"s3://{s3_bucket}/labels"
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import batch_label
    finally:
        sys.path.pop(0)
    rc = batch_label.main(
        [
            "--input",
            f"s3://{s3_bucket}/in",
            "--output",
            out,
            "--model",
            engine.model,
            "--index",
            engine.index,
            "--prompt-template",
            "{intro}Sentence: {text}\\nMR:",
            "--max-new-tokens",
            str(MAX_NEW),
            "--stop",
            "]",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0 and is_complete(out)
    assert fs.get_file_info(f"{s3_bucket}/labels/_staging").type == pafs.FileType.NotFound
    _check_output(out, rows, reference)


def test_killed_run_resumes_without_duplicates(ray_cluster, tmp_path, task_rows, engine, reference):
    import ray

    rows = _rows(task_rows, 40, bad=False)
    src = tmp_path / "prompts.parquet"  # one file: --rows-per-part splits it, parts are written as the job runs
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "labels"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "tasc_ray",
        "label",
        "--input",
        str(src),
        "--output",
        str(out),
        "--model",
        engine.model,
        "--index",
        engine.index,
        "--max-new-tokens",
        str(MAX_NEW),
        "--stop",
        "]",
        "--batch-size",
        "2",
        "--rows-per-part",
        "4",
        "--num-cpus",
        "0.25",
    ]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    staged = out / "_staging"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if staged.exists() and any(p.suffix == ".parquet" for p in staged.rglob("*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (out / SUCCESS).exists()
    summary = label_parquet(str(src), str(out), engine, max_new_tokens=MAX_NEW, stop=STOP, batch_size=8)
    assert summary["complete"] and summary["rows_already_done"] + summary["rows_labeled"] == 40
    assert summary["rows_already_done"] > 0  # the killed run's finished parts were kept
    _check_output(str(out), rows, reference)


def test_null_in_a_template_column_is_a_row_error(engine, task_rows, reference):
    """A null cell of a column the template names is that row's error (naming the column), not the prompt "None";
    the other rows are labeled as usual. Runs the stage's actor in this process (no Ray)."""
    rows = [{"id": r["id"], "question": r["prompt"], "prompt": r["prompt"]} for r in task_rows[300:302]]
    rows += [
        {"id": "null-question", "question": None, "prompt": "x"},
        {"id": "null-prompt", "question": "x", "prompt": None},
    ]
    batch = pa.Table.from_pylist(rows)
    sampling = SamplingParams(max_new_tokens=MAX_NEW, stop=STOP)
    for template, null_id, column in (
        ("{question}", "null-question", "question"),
        ("{prompt}", "null-prompt", "prompt"),
    ):
        out = {r["id"]: r for r in LabelActor(engine, template, "id", sampling)(batch).to_pylist()}
        assert out[null_id]["output"] is None and out[null_id]["output_tokens"] is None
        assert out[null_id]["error"].startswith("LabelError") and repr(column) in out[null_id]["error"]
        for r in rows[:2]:
            assert out[r["id"]]["error"] is None and out[r["id"]]["output"] == reference[r["id"]]


def test_a_label_actor_killed_mid_run_loses_and_duplicates_nothing(ray_cluster, tmp_path, task_rows, engine, reference):
    """kill -9 of a label actor while the job runs: Ray Data restarts it and retries its batch; the job ends
    complete with every row exactly once and each output the engine's own."""
    import threading

    import ray

    def label_actor_pids() -> list[int]:  # Ray Data runs the stage's actors as its map workers
        actors = ray._private.state.actors().values()
        names = ("LabelActor", "MapWorker")
        return [a["Pid"] for a in actors if a["State"] == "ALIVE" and any(n in a["ActorClassName"] for n in names)]

    rows = _rows(task_rows, 40, bad=False)
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "labels"
    summary: dict = {}
    failures: list[BaseException] = []

    def run() -> None:
        kwargs = dict(max_new_tokens=MAX_NEW, stop=STOP, batch_size=1, rows_per_part=2)  # 10 calls of 4 rows
        try:
            summary.update(label_parquet(str(src), str(out), engine, **kwargs))
        except BaseException as exc:  # reported below
            failures.append(exc)

    job = threading.Thread(target=run)
    job.start()
    killed = None
    first_seen: float | None = None
    deadline = time.time() + 180
    while killed is None and job.is_alive() and time.time() < deadline:
        staged = out / "_staging"
        started = staged.exists() and any(p.suffix == ".parquet" for p in staged.rglob("*"))
        pids = label_actor_pids()
        if pids and first_seen is None:
            first_seen = time.time()
        # kill once the actor has written a part, or has been up long enough to be decoding its first batch
        if pids and (started or time.time() - first_seen > 2.0):
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    job.join(timeout=300)
    assert not failures, failures
    assert killed is not None, f"the job ended before an actor could be killed: {summary}"
    assert summary["complete"] and summary["rows_labeled"] == 40 and summary["errors"] == 0, summary
    table = _check_output(str(out), rows, reference)
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)  # each row exactly once
