"""A `worker_process_setup_hook` for the cluster test (tests/cluster/test_two_nodes.py): in each worker process of
the job it is given to, `LabelActor.__init__` is wrapped so that a label actor, once its engine is loaded, writes
one JSON report to the s3:// prefix in $TASC_TEST_THREAD_REPORT: the node it runs on, that node's CPUs as Ray
counts them, the `replicas_per_node` the driver passed it and `torch.get_num_threads()`. The job itself is the
unchanged `jobs/batch_label.py`; the hook only observes.

    ray job submit --runtime-env-json '{"working_dir": ".", "worker_process_setup_hook":
        "tests.cluster.thread_report.install", "env_vars": {"TASC_TEST_THREAD_REPORT": "s3://bucket/threads"}}' \
        -- python jobs/batch_label.py ...
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

REPORT_ENV = "TASC_TEST_THREAD_REPORT"


def install() -> None:
    """Wrap LabelActor.__init__ (once per process) when $TASC_TEST_THREAD_REPORT names where to report."""
    url = os.environ.get(REPORT_ENV)
    if not url:
        return
    from tasc_ray.stages import labeling

    init = labeling.LabelActor.__init__
    if getattr(init, "_thread_report", False):
        return

    def reporting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        report(url, kwargs)

    reporting_init._thread_report = True  # type: ignore[attr-defined]
    labeling.LabelActor.__init__ = reporting_init  # type: ignore[method-assign]


def report(url: str, kwargs: dict[str, Any]) -> None:
    import ray
    import torch

    from tasc_ray.io import arrow_filesystem

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU") for n in ray.nodes() if n["NodeID"] == node), None)
    body = {
        "node_id": node,
        "node_cpus": cpus,
        "pid": os.getpid(),
        "replicas_per_node": kwargs.get("replicas_per_node"),
        "num_threads": kwargs.get("num_threads"),
        "torch_threads": torch.get_num_threads(),
    }
    fs, path = arrow_filesystem(f"{url.rstrip('/')}/{uuid.uuid4().hex}.json")
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(body).encode())
