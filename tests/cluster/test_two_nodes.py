"""The jobs on a real two-node Ray cluster (tests/cluster/conftest.py): the index job and the label job (actor pool
and `--serve-app`) submitted with `ray job submit`, data on S3 (the nodes share no directory). Checked: work runs on
both nodes (the state API's actors and actor tasks by node; the Serve app's engine replicas by node), outputs equal
the single-process builder's and engine's, each node's label actors size their torch threads from that node's
CPUs, and a worker node killed mid-label loses no row (the job finishes, or a rerun resumes from the parts staged
before the kill; every id once). The bundled smollm2-135m labels; the index it drafts from is the cluster's own
index job's output. Marked slow; see docs/multinode.md.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.io import arrow_filesystem
from tasc_ray.models import load_tokenizer

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"  # the bundled model (converted once into ~/.cache/tasc_ray/models, read by every node)
TOP_K = 8
N_PROMPTS = 32
MAX_NEW = 16
STOP = "\n"
APP = "tasc-mn"
# The label command of the actor-pool tests: 2 actors (Ray Data spreads them: one per node), blocks of 4 rows,
# calls of 4 x batch-size = 8 rows, so 32 prompts are 4 calls and at least 4 staged parts.
POOL_FLAGS = ["--num-replicas", "2", "--batch-size", "2", "--rows-per-part", "4"]
# The killed run's command: calls of 4 rows decoded one at a time, so parts are staged one by one while the rest
# is still being labeled (8 calls over the 2 actors).
KILL_FLAGS = ["--num-replicas", "2", "--batch-size", "1", "--rows-per-part", "2"]
SAME = ["id", "output", "prompt_tokens", "output_tokens", "finish_reason", "error"]  # passes depend on the drafts
HEAD_ALONE_S = 120  # how long the killed run may go on with the head alone before it is stopped
THREAD_REPORT = "tests.cluster.thread_report.install"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(url: str, table: pa.Table) -> None:
    fs, path = arrow_filesystem(url)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def _files(url: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, root, the paths of every file under `url`, relative to it)."""
    fs, root = arrow_filesystem(url)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return fs, root, sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def _committed(url: str) -> dict[str, pa.Table]:
    """{committed part name: its rows} of a label output, which must be complete (_SUCCESS, no staging left)."""
    fs, root, files = _files(url)
    assert "_SUCCESS" in files, files
    assert not [f for f in files if f.startswith("_staging")], files
    parts = [f for f in files if f.startswith("part-") and f.endswith(".parquet")]
    return {p: pq.read_table(f"{root}/{p}", filesystem=fs) for p in parts}


def _rows(parts: dict[str, pa.Table]) -> dict[Any, dict[str, Any]]:
    """{id: row} of every committed row, checking that no id is written twice."""
    rows = pa.concat_tables(parts.values()).to_pylist()
    counts = Counter(r["id"] for r in rows)
    assert not [i for i, n in counts.items() if n > 1], f"ids written more than once: {counts.most_common(3)}"
    return {r["id"]: r for r in rows}


def _check_labels(rows: dict[Any, dict[str, Any]], data: dict[str, Any], reference: dict[Any, str]) -> None:
    """Every input id exactly once, no error, each output the single-process engine's."""
    assert sorted(rows) == sorted(r["id"] for r in data["rows"])
    errors = {i: r["error"] for i, r in rows.items() if r["error"]}
    assert not errors, errors
    differ = {i: (rows[i]["output"], text) for i, text in reference.items() if rows[i]["output"] != text}
    assert not differ, f"{len(differ)} outputs differ from the engine's own: {list(differ.items())[:3]}"


def _by_node(
    cluster, what: str, submission_id: str | None = None, roles: dict[str, str] | None = None, alive: bool = False
) -> dict[str, Counter]:
    """{actor class or task name: Counter(node role)} from the state API (list_actors / list_tasks), of one job
    (or of every job), only alive actors with alive=True. `roles` maps node ids to "head"/"worker" (default:
    the cluster's nodes now; pass the old map for a node since killed)."""
    code = f"""
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_tasks
filters, rows = [], []
job = JobSubmissionClient({cluster.dashboard!r}).get_job_info({submission_id!r}).job_id if {submission_id!r} else None
if job:
    filters.append(("job_id", "=", job))
if {alive!r}:
    filters.append(("state", "=", "ALIVE"))
if job or not {submission_id!r}:  # a job still pending has no job id yet (nor actors)
    rows = list_{what}(address={cluster.dashboard!r}, filters=filters, limit=10000, raise_on_missing_output=False)
print(json.dumps([[r.class_name if {what!r} == "actors" else r.name, r.node_id] for r in rows]))
"""
    roles = roles or {v: k for k, v in cluster.node_ids.items()}
    found: dict[str, Counter] = {}
    for name, node in cluster.query(code):
        found.setdefault(name, Counter())[roles.get(node, node)] += 1
    return found


def _nodes_of(found: dict[str, Counter], part: str) -> Counter:
    return sum((c for name, c in found.items() if part in name), Counter())


@pytest.fixture(scope="module")
def data(two_nodes, s3_server, task_rows):
    """A bucket with the corpus (3 files of outputs) and the prompts (N_PROMPTS rows of the sample task)."""
    import s3fs

    bucket = f"mn-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    outputs = [r["output"] for r in task_rows[:300]]
    for i in range(3):
        _write(f"s3://{bucket}/corpus/part-{i}.parquet", pa.table({"output": outputs[i * 100 : (i + 1) * 100]}))
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in task_rows[300 : 300 + N_PROMPTS]]
    _write(f"s3://{bucket}/prompts/prompts.parquet", pa.Table.from_pylist(rows))
    return {"bucket": bucket, "outputs": outputs, "rows": rows, "model": MODEL, "prompts": f"s3://{bucket}/prompts/"}


@pytest.fixture(scope="module")
def index(two_nodes, data):
    """The index job on the cluster: S3 corpus -> S3 index (smollm2-135m's tokens), 2 count actors."""
    out = f"s3://{data['bucket']}/index"
    sid = f"index-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    summary = two_nodes.run_job(
        [
            "jobs/index_corpus.py",
            "--input",
            f"s3://{data['bucket']}/corpus/",
            "--column",
            "output",
            "--tokenizer",
            data["model"],
            "--out",
            out,
            "--num-workers",
            "2",
            "--top-k",
            str(TOP_K),
        ],
        sid,
    )
    print(f"index job: {time.perf_counter() - t0:.1f} s")
    return {"url": out, "summary": summary, "submission_id": sid}


@pytest.fixture(scope="module")
def reference(data, index) -> dict[Any, str]:
    """What the engine itself emits for each prompt in this (the pytest) process, greedy, with the same model and
    the cluster-built index: the single-process run every cluster output must equal."""
    from tasc_ray.engine.config import EngineConfig
    from tasc_ray.engine.generator import SamplingParams
    from tasc_ray.engine.load import load_engine

    t0 = time.perf_counter()
    generator = load_engine(EngineConfig(model=MODEL, index=index["url"]))
    prompts = [r["prompt"] for r in data["rows"]]
    results = generator.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, stop=[STOP]))
    print(f"single-process reference: {time.perf_counter() - t0:.1f} s")
    assert all(res.text for res in results)
    return {r["id"]: res.text for r, res in zip(data["rows"], results)}


def _label_args(data: dict[str, Any], index: dict[str, Any], output: str, *flags: str) -> list[str]:
    """`python jobs/batch_label.py ...` over the S3 prompts into `output` (the label command of these tests)."""
    return [
        "jobs/batch_label.py",
        "--input",
        data["prompts"],
        "--output",
        output,
        "--model",
        MODEL,
        "--index",
        index["url"],
        "--prompt-template",
        "{prompt}",
        "--max-new-tokens",
        str(MAX_NEW),
        "--stop",
        "\\n",  # the CLI reads \n as a newline
        *flags,
    ]


@pytest.fixture(scope="module")
def pool_labels(two_nodes, data, index):
    """The label job on the actor pool (jobs/batch_label.py by `ray job submit`), S3 prompts -> S3 labels, with
    tests/cluster/thread_report.py as the job's worker_process_setup_hook (each label actor reports its threads)."""
    out = f"s3://{data['bucket']}/labels-pool"
    threads = f"s3://{data['bucket']}/threads"
    sid = f"label-pool-{uuid.uuid4().hex[:8]}"
    runtime_env = {"worker_process_setup_hook": THREAD_REPORT, "env_vars": {"TASC_TEST_THREAD_REPORT": threads}}
    t0 = time.perf_counter()
    summary = two_nodes.run_job(_label_args(data, index, out, *POOL_FLAGS), sid, 480, runtime_env)
    print(f"actor-pool label job: {time.perf_counter() - t0:.1f} s")
    return {"url": out, "threads": threads, "summary": summary, "submission_id": sid}


def test_index_job_counts_on_both_nodes_and_equals_the_single_process_index(two_nodes, data, index):
    assert index["summary"]["sequences"] == len(data["outputs"]) and index["summary"]["files"] == 3
    built = NgramIndex.load(index["url"])
    reference = NgramIndex.from_texts(data["outputs"], load_tokenizer(data["model"]), top_k=TOP_K)
    assert built.orders == reference.orders and built.stats() == reference.stats()
    for m in built.orders:
        for name in ("hashes", "totals", "offsets", "next_tokens", "counts"):
            assert np.array_equal(getattr(built.tables[m], name), getattr(reference.tables[m], name)), (m, name)
    actors = _by_node(two_nodes, "actors", index["submission_id"])
    print("index job actors by node:", actors)
    counted = [c for name, c in actors.items() if "MapWorker" in name]
    assert counted and set(sum(counted, Counter())) == {"head", "worker"}, actors


@pytest.mark.timeout(900)
def test_label_job_labels_on_both_nodes_and_equals_the_engine(two_nodes, data, pool_labels, reference):
    """Actor pool: the job succeeds, every id once, each output the single-process engine's, and the label actors
    (and their calls) ran on both nodes."""
    summary = pool_labels["summary"]
    assert summary["complete"] and summary["rows_labeled"] == N_PROMPTS and summary["errors"] == 0, summary
    assert summary["rows_committed"] == N_PROMPTS and summary["rows_remaining"] == 0
    parts = _committed(pool_labels["url"])
    _check_labels(_rows(parts), data, reference)
    fs, root = arrow_filesystem(pool_labels["url"])
    with fs.open_input_stream(f"{root}/_SUCCESS") as f:
        manifest = json.loads(f.read())
    assert manifest["rows"] == N_PROMPTS and sorted(manifest["parts"]) == sorted(parts)
    actors = _by_node(two_nodes, "actors", pool_labels["submission_id"])
    tasks = _by_node(two_nodes, "tasks", pool_labels["submission_id"])
    print("label job actors by node:", actors)
    print("label job tasks by node:", tasks)
    assert set(_nodes_of(actors, "LabelActor")) == {"head", "worker"}, actors
    calls = _nodes_of({k: v for k, v in tasks.items() if k.endswith(".submit")}, "LabelActor")
    assert set(calls) == {"head", "worker"}, tasks  # both nodes' actors labeled rows


def test_each_label_actor_sizes_its_threads_from_its_own_node(two_nodes, pool_labels):
    """The label actors of that job reported (tests/cluster/thread_report.py) their node, its CPUs as Ray counts
    them, and torch.get_num_threads(): the head's actor 1 thread, the worker's 3, neither the driver machine's."""
    fs, root, files = _files(pool_labels["threads"])
    reports = []
    for name in files:
        with fs.open_input_stream(f"{root}/{name}") as f:
            reports.append(json.loads(f.read()))
    print("label actor thread reports:", reports)
    roles = {v: k for k, v in two_nodes.node_ids.items()}
    assert reports and {roles.get(r["node_id"]) for r in reports} == {"head", "worker"}, reports
    for r in reports:
        role = roles[r["node_id"]]
        assert r["node_cpus"] == two_nodes.cpus[role], r
        assert r["num_threads"] is None and r["replicas_per_node"] == 1, r  # 2 replicas over 2 CPU nodes
        assert r["torch_threads"] == two_nodes.cpus[role], r


@pytest.mark.timeout(900)
def test_serve_app_label_job_equals_the_actor_pool(two_nodes, data, index, pool_labels, reference):
    """`serve deploy` of the tasc_ray app (2 engine replicas, spread over the nodes), then the label job with
    --serve-app by `ray job submit`: every id once, the outputs the actor pool's (and the engine's)."""
    from tasc_ray.serving.app import deploy_config
    from tasc_ray.serving.config import ServeConfig

    config = ServeConfig.model_validate(
        {
            "model": MODEL,
            "index": index["url"],
            "num_replicas": 2,
            "num_cpus": 0.5,
            "num_threads": 1,
            "ingress_num_cpus": 0.05,
        }
    )
    spec = deploy_config(config, http_port=_free_port(), http_host="127.0.0.1", app_name=APP)
    spec["proxy_location"] = "HeadOnly"  # both nodes are on one host: a proxy per node would share the port
    path = two_nodes.root / "serve.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = f"s3://{data['bucket']}/labels-serve"
    sid = f"label-serve-{uuid.uuid4().hex[:8]}"
    flags = ["--serve-app", APP, "--num-replicas", "2", "--batch-size", "8", "--rows-per-part", "4"]
    try:
        t0 = time.perf_counter()
        two_nodes.serve("deploy", str(path))
        two_nodes.wait_serve_app(APP, timeout=360)
        print(f"serve deploy until RUNNING: {time.perf_counter() - t0:.1f} s")
        replicas = _nodes_of(_by_node(two_nodes, "actors", alive=True), "TascEngine")
        print("engine replicas by node:", replicas)
        t0 = time.perf_counter()
        summary = two_nodes.run_job(_label_args(data, index, out, *flags), sid, 480)
        print(f"--serve-app label job: {time.perf_counter() - t0:.1f} s")
        workers = _by_node(two_nodes, "actors", sid)
        print("--serve-app label job actors by node:", workers)
    finally:
        two_nodes.serve("shutdown", "-y", check=False)
    assert replicas == Counter({"head": 1, "worker": 1}), replicas
    assert _nodes_of(workers, "ServeLabelWorker"), workers
    assert summary["complete"] and summary["rows_labeled"] == N_PROMPTS and summary["errors"] == 0, summary
    assert summary["serve_app"] == APP
    rows = _rows(_committed(out))
    _check_labels(rows, data, reference)
    pool = _rows(_committed(pool_labels["url"]))
    for i, row in rows.items():
        assert {c: row[c] for c in SAME} == {c: pool[i][c] for c in SAME}, i


def _staged(fs: pafs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/_staging", recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("stop_after_kill", [False, True], ids=["job-goes-on", "job-stopped-too"])
def test_worker_node_killed_mid_label_then_the_rerun_resumes(two_nodes, data, index, reference, stop_after_kill):
    """SIGKILL of the whole worker node once the actor-pool job has staged a part. job-goes-on: the job goes on
    with the head alone until it finishes or fails (or, past HEAD_ALONE_S, is stopped). job-stopped-too: the job
    is stopped (`ray job stop`) right after the kill, so its staged parts are left uncommitted. Then a new worker
    node joins and the same command resumes: every id once, the parts staged before the kill committed as they
    were, not relabeled, and (job-stopped-too) the rest labeled by the rerun."""
    out = f"s3://{data['bucket']}/labels-kill-{'stopped' if stop_after_kill else 'on'}"
    args = _label_args(data, index, out, *KILL_FLAGS)
    fs, root = arrow_filesystem(out)
    sid = f"label-kill-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    two_nodes.submit(args, sid)
    # Kill once the job has label actors alive on both nodes (the state API, asked every few seconds: each
    # question is a new driver) and has staged a part (S3, polled often).
    deadline, next_check, actors_alive = time.time() + 300, 0.0, Counter()
    while not ((staged := _staged(fs, root)) and set(actors_alive) == {"head", "worker"}):
        if time.time() > next_check:
            status = two_nodes.job_status(sid)
            assert status in ("RUNNING", "PENDING"), f"{status} before the kill:\n{two_nodes.job_logs(sid)[-4000:]}"
            if set(actors_alive) != {"head", "worker"}:
                actors_alive = _nodes_of(_by_node(two_nodes, "actors", sid, alive=True), "LabelActor")
            next_check = time.time() + 4
        assert time.time() < deadline, f"no part staged, or label actors {actors_alive}, after 300 s"
        time.sleep(0.5)
    staged_ids = {p: pq.read_table(p, filesystem=fs, columns=["id"]).column("id").to_pylist() for p in staged}
    t_staged = time.perf_counter() - t0
    assert sum(map(len, staged_ids.values())) < N_PROMPTS, "every row was staged before the kill"
    killed = two_nodes.kill_worker_node()
    assert killed > 0
    if stop_after_kill:
        status = first_outcome = two_nodes.stop_job(sid)
        assert status == "STOPPED", status
    two_nodes.wait_nodes(1, timeout=120)  # the GCS has marked the worker node dead
    t_dead = time.perf_counter() - t0
    if not stop_after_kill:
        status = first_outcome = two_nodes.wait_job(sid, timeout=HEAD_ALONE_S, stop=False)
        if status in ("RUNNING", "PENDING"):
            status = two_nodes.stop_job(sid)
            first_outcome = f"still {first_outcome} {HEAD_ALONE_S} s after the node's death, then {status}"
    logs = two_nodes.job_logs(sid)
    print(
        f"staged {len(staged)} part(s), {sum(map(len, staged_ids.values()))} rows, {t_staged:.1f} s after submit;"
        f" killed {killed} processes of the worker node; node dead at {t_dead:.1f} s; first run: {first_outcome}"
        f" at {time.perf_counter() - t0:.1f} s"
    )
    print("killed run's label actors alive by node just before the kill:", actors_alive)
    print("killed run's log tail:\n", logs[-2500:])
    assert status in ("SUCCEEDED", "FAILED", "STOPPED")

    t1 = time.perf_counter()
    two_nodes.restart_worker()
    print(f"worker node restarted in {time.perf_counter() - t1:.1f} s")
    t1 = time.perf_counter()
    rerun_sid = f"label-kill-rerun-{uuid.uuid4().hex[:8]}"
    summary = two_nodes.run_job(args, rerun_sid, 480)
    rerun_logs = two_nodes.job_logs(rerun_sid)
    print(f"rerun: {time.perf_counter() - t1:.1f} s; summary:", {k: summary[k] for k in summary if "rows" in k})

    assert summary["complete"] and summary["rows_total"] == N_PROMPTS and summary["errors"] == 0, summary
    assert summary["rows_already_done"] + summary["rows_labeled"] == N_PROMPTS, summary
    parts = _committed(out)
    _check_labels(_rows(parts), data, reference)
    first_run = staged[0][len(f"{root}/_staging/") :].split("/")[0]
    assert first_run != summary["run_id"]
    for path, ids in staged_ids.items():  # committed under the first run's name, with the same rows
        name = f"part-{first_run}-{path.rsplit('/', 1)[1]}"
        assert name in parts and sorted(parts[name].column("id").to_pylist()) == sorted(ids), name
    before = [i for ids in staged_ids.values() for i in ids]

    def ids_of(run: str) -> list[Any]:
        return [i for p, t in parts.items() if p.startswith(f"part-{run}-") for i in t.column("id").to_pylist()]

    first, again = ids_of(first_run), ids_of(summary["run_id"])
    assert len(first) + len(again) == N_PROMPTS  # every part is one of the two runs'
    assert not set(before) & set(again), "rows staged before the kill were labeled again"
    assert summary["rows_already_done"] == len(first) >= len(before) and summary["rows_labeled"] == len(again)
    assert f"{len(first)} already labeled" in rerun_logs  # the rerun's plan, as it logs it
    if status != "SUCCEEDED":  # the killed run committed nothing: the rerun recovered its staged parts
        assert "parts an interrupted run had written" in rerun_logs
    if stop_after_kill:  # stopped seconds after the kill, with rows left: the rerun labeled them
        assert summary["rows_labeled"] > 0
