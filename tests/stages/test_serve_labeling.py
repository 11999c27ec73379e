"""Batch labeling through a running Serve app (`label_parquet(..., serve_app=...)`): a real local Ray, `serve.run`
of the tasc_ray app on the tiny model, the same outputs as the actor pool, resume, the replica's live overlay, and
the one-line errors for an app that is not there or not a tasc_ray engine."""

from __future__ import annotations

import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasc_ray.engine.config import EngineConfig
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.stages.commit import is_complete
from tasc_ray.stages.labeling import OUTPUT_COLUMNS, label_parquet
from tasc_ray.stages.serve_labeling import ServeAppError

APP = "tasc-label"
MAX_NEW = 24
STOP = ["]"]
SAME = ["id", "output", "prompt_tokens", "output_tokens", "finish_reason", "error"]  # passes depend on the drafts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir, task_rows, tiny_tokenizer) -> EngineConfig:
    path = tmp_path_factory.mktemp("serve-label-index") / "index"
    index = NgramIndex.from_texts([r["output"] for r in task_rows[:300]], tiny_tokenizer).save(str(path))
    return EngineConfig(model=str(tiny_model_dir), index=index)


@pytest.fixture(scope="module")
def app(ray_cluster, engine):
    """The tasc_ray app on the tiny model, and an app that is not a tasc_ray one."""
    from ray import serve

    from tasc_ray.serving.app import build_app
    from tasc_ray.serving.config import ServeConfig

    @serve.deployment(name="Echo", ray_actor_options={"num_cpus": 0})
    def echo(text: str) -> str:
        return text

    config = {"model": engine.model, "index": engine.index, "num_cpus": 0.25, "ingress_num_cpus": 0.05}
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    serve.run(build_app(ServeConfig.model_validate(config)), name=APP, route_prefix="/label-test")
    serve.run(echo.bind(), name="echo", route_prefix="/echo")
    yield serve.get_deployment_handle("TascEngine", app_name=APP)
    serve.shutdown()


def _input(tmp_path: Path, task_rows, n: int) -> str:
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in task_rows[300 : 300 + n]]
    rows += [{"id": "bad-empty", "prompt": ""}, {"id": "bad-long", "prompt": "Blue Spice is a pub. " * 400}]
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    return str(src)


def _rows(output: str) -> dict[str, dict]:
    parts = sorted(Path(output).glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.column_names == OUTPUT_COLUMNS
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)  # every row once
    return {r["id"]: {c: r[c] for c in SAME} for r in rows}


def test_labels_through_serve_as_the_actor_pool_does_and_resumes(app, tmp_path, task_rows, engine):
    src = _input(tmp_path, task_rows, 12)
    kw = dict(max_new_tokens=MAX_NEW, stop=STOP, batch_size=4)
    before = app.overlay.remote().result()["outputs"]

    out = str(tmp_path / "through-serve")
    first = label_parquet(src, out, None, serve_app=APP, limit=5, **kw)
    assert first["rows_labeled"] == 5 and not first["complete"] and first["serve_app"] == APP
    second = label_parquet(src, out, None, serve_app=APP, **kw)
    assert second["rows_already_done"] == 5 and second["rows_labeled"] == 9 and second["complete"]
    assert is_complete(out)

    pool = str(tmp_path / "actor-pool")
    assert label_parquet(src, pool, engine, num_cpus_per_replica=0.25, **kw)["complete"]
    served, pooled = _rows(out), _rows(pool)
    assert served == pooled and len(served) == 14
    assert "context" in served["bad-long"]["error"] and served["bad-empty"]["error"].startswith("PromptError")

    # the batch rows went through the replica's engine, so its live overlay learned them as it learns online rows
    overlay = app.overlay.remote().result()
    learned = overlay["texts"][len(before) :]
    outputs = [r["output"] for r in served.values() if r["output_tokens"] and r["output_tokens"] >= 2]
    assert len(learned) == len(overlay["outputs"]) - len(before) == len(outputs)
    assert all(any(text.startswith(o) for text in learned) for o in outputs)


def test_an_unknown_app_or_one_without_a_tasc_engine_is_refused_before_reading(app, tmp_path, task_rows):
    src = _input(tmp_path, task_rows, 2)
    with pytest.raises(ServeAppError, match=rf"no Serve app 'nope' .*'echo', '{APP}'"):
        label_parquet(src, str(tmp_path / "o1"), None, serve_app="nope")
    with pytest.raises(ServeAppError, match="'echo' is not a tasc_ray app: it has no TascEngine deployment"):
        label_parquet(src, str(tmp_path / "o2"), None, serve_app="echo")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_a_replica_killed_mid_batch_costs_retries_not_rows(app, tmp_path, task_rows, engine):
    """kill -9 of the engine replica while rows are in flight: Serve restarts it, the rows' calls are sent again,
    and the job ends complete with every row once, no errors, each output the engine's own. Last in the module
    (the restarted replica's overlay starts empty)."""
    import os
    import signal
    import threading
    import time

    from tasc_ray.engine.generator import SamplingParams
    from tasc_ray.engine.load import load_engine

    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in task_rows[300:330]]
    src = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    expected = load_engine(engine).generate(
        [r["prompt"] for r in rows], SamplingParams(max_new_tokens=MAX_NEW, stop=STOP)
    )
    out = tmp_path / "labels"
    summary: dict = {}
    job = threading.Thread(
        target=lambda: summary.update(
            label_parquet(str(src), str(out), None, serve_app=APP, max_new_tokens=MAX_NEW, stop=STOP, batch_size=2)
        )
    )
    before = app.info.remote().result()
    pid = before["pid"]
    job.start()
    deadline = time.time() + 120
    while job.is_alive() and time.time() < deadline:  # kill once the replica is decoding batch rows
        engine_state = app.info.remote().result()["engine"]
        if engine_state["running"] > 0 and engine_state["finished"] >= before["engine"]["finished"] + 2:
            break
        time.sleep(0.02)
    assert job.is_alive(), "the job ended before the replica could be killed"
    os.kill(pid, signal.SIGKILL)
    job.join(timeout=240)
    assert summary["complete"] and summary["rows_labeled"] == 30 and summary["errors"] == 0, summary
    labeled = _rows(str(out))
    assert {r["id"]: labeled[r["id"]]["output"] for r in rows} == {r["id"]: e.text for r, e in zip(rows, expected)}
    assert app.info.remote().result()["pid"] != pid
