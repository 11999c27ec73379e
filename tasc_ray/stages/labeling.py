"""Batch labeling over parquet with Ray Data and TASC-spec: read -> actor pool of generators -> write, resumable.

    label_parquet("prompts.parquet", "out/", EngineConfig(model=..., index=...), prompt_template="{prompt}")

`ray.data.read_parquet` feeds `map_batches` over an `ActorPoolStrategy` of `LabelActor`s (each loads the shared
engine once: fractional CPUs, one GPU each when the cluster has GPUs) and `write_parquet` writes the rows
(id, output, prompt_tokens, output_tokens, forward_passes, accepted_tokens, drafted_tokens, finish_reason,
latency_s, error). A row that fails gets its `error` and the others go on.

Commit protocol (local paths and s3:// alike): a run writes its parts under `OUT/_staging/<run>/`; when the
write ends they move to `OUT/part-<run>-*.parquet`, and `OUT/_SUCCESS` (a JSON manifest) is written only once
every input id has a committed row, so a partial output never looks complete. A rerun first promotes the
readable parts an interrupted run left in staging (a part is a whole parquet file or it is dropped), then labels
only the ids not yet committed: nothing is duplicated and nothing is lost. Ids must be unique and non-null.
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tasc_ray.spec.engine import EngineConfig
from tasc_ray.stages.runtime import ensure_ray

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
STAGING = "_staging"
OUTPUT_COLUMNS = [
    "id",
    "output",
    "prompt_tokens",
    "output_tokens",
    "forward_passes",
    "accepted_tokens",
    "drafted_tokens",
    "finish_reason",
    "latency_s",
    "error",
]


class LabelError(ValueError):
    """A labeling request that cannot run as given (missing column, duplicate ids, bad template)."""


# ----------------------------------------------------------------------------------------------------------------
# Filesystems and Ray
# ----------------------------------------------------------------------------------------------------------------
def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; s3:// settings come from the AWS_* environment explicitly,
    so that the (pickled) filesystem works the same inside Ray workers started with another environment."""
    if path.startswith("s3://"):
        parsed = urlparse(path)
        kwargs: dict[str, Any] = {}
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
            if os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        return pafs.S3FileSystem(**kwargs), (parsed.netloc + parsed.path).rstrip("/")
    if "://" in path and not path.startswith("file://"):
        return pafs.FileSystem.from_uri(path)
    local = path[len("file://") :] if path.startswith("file://") else path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


def template_columns(template: str) -> list[str]:
    """The input columns a Python format string refers to ("{prompt}" -> ["prompt"])."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise LabelError(f"bad prompt template {template!r}: {exc}") from exc
    names = []
    for field in fields:
        root = field.split(".")[0].split("[")[0]
        if not root or root.isdigit():
            raise LabelError(f"prompt template {template!r} must name columns, as in '{{prompt}}'")
        if root not in names:
            names.append(root)
    if not names:
        raise LabelError(f"prompt template {template!r} names no column (use e.g. '{{prompt}}')")
    return names


# ----------------------------------------------------------------------------------------------------------------
# The actor
# ----------------------------------------------------------------------------------------------------------------
def node_cpu_share(replicas_per_node: int) -> int:
    """Torch threads for one replica: the CPUs of the node it runs on (as Ray counts them, so a container's limit
    rather than the host's cores) shared among the replicas placed there."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node_id), 1.0)
    return max(1, int(cpus // replicas_per_node))


class LabelActor:
    """One pool member: loads the engine once, turns a batch of input rows into output rows."""

    def __init__(
        self,
        engine: dict[str, Any],
        template: str,
        id_column: str,
        sampling: dict[str, Any],
        num_threads: int | None = None,
        replicas_per_node: int | None = None,
    ) -> None:
        import torch

        from tasc_ray.spec.engine import load_engine
        from tasc_ray.spec.generator import SamplingParams

        if num_threads is None and replicas_per_node:
            num_threads = node_cpu_share(replicas_per_node)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.generator = load_engine(EngineConfig.model_validate(engine))
        self.template, self.id_column = template, id_column
        self.params = SamplingParams(**sampling)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from tasc_ray.spec.generator import PromptTooLongError

        rows = batch.to_pylist()
        n = len(rows)
        out: dict[str, list[Any]] = {c: [None] * n for c in OUTPUT_COLUMNS}
        out["id"] = [r[self.id_column] for r in rows]
        encoded: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            try:
                ids = self.generator.encode(self.template.format(**row))
                if not ids:
                    raise ValueError("the prompt is empty")
                if len(ids) >= self.generator.max_context:
                    raise PromptTooLongError(
                        f"the prompt has {len(ids)} tokens; the model's context holds {self.generator.max_context}"
                    )
                encoded[i] = ids
            except Exception as exc:
                out["error"][i] = f"{type(exc).__name__}: {exc}"
        order = list(encoded)
        start = time.perf_counter()
        last = {i: start for i in order}

        def stream(k: int, _ids: list[int]) -> None:
            last[order[k]] = time.perf_counter()

        try:
            results = self.generator.generate([encoded[i] for i in order], self.params, stream=stream)
        except Exception as exc:  # find the culprit: decode the rows one at a time
            logger.warning("batch of %d rows failed (%s); decoding them one by one", len(order), exc)
            results = []
            for i in order:
                t0 = time.perf_counter()
                try:
                    results.append(self.generator.generate([encoded[i]], self.params)[0])
                except Exception as row_exc:
                    results.append(row_exc)
                last[i] = time.perf_counter() - t0 + start
        for i, r in zip(order, results):
            if isinstance(r, Exception):
                out["error"][i] = f"{type(r).__name__}: {r}"
                continue
            out["output"][i] = r.text
            out["prompt_tokens"][i] = r.prompt_tokens
            out["output_tokens"][i] = r.new_tokens
            out["forward_passes"][i] = r.stats.forward_passes
            out["accepted_tokens"][i] = r.stats.accepted
            out["drafted_tokens"][i] = r.stats.drafted
            out["finish_reason"][i] = r.finish_reason
            out["latency_s"][i] = last[i] - start
        return pa.Table.from_pydict(out, schema=output_schema(batch.schema.field(self.id_column).type))


def output_schema(id_type: pa.DataType) -> pa.Schema:
    ints = ["prompt_tokens", "output_tokens", "forward_passes", "accepted_tokens", "drafted_tokens"]
    return pa.schema(
        [("id", id_type), ("output", pa.string())]
        + [(c, pa.int64()) for c in ints]
        + [("finish_reason", pa.string()), ("latency_s", pa.float64()), ("error", pa.string())]
    )


def _drop_done(batch: pa.Table, done: pa.Array, id_column: str) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch[id_column], value_set=done)))


# ----------------------------------------------------------------------------------------------------------------
# Output commit
# ----------------------------------------------------------------------------------------------------------------
def _list_files(fs: pafs.FileSystem, root: str, recursive: bool = False) -> list[pafs.FileInfo]:
    info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=recursive))
    return [f for f in info if f.type == pafs.FileType.File]


def committed_parts(fs: pafs.FileSystem, out: str) -> list[str]:
    return sorted(
        f.path for f in _list_files(fs, out) if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")
    )


def _readable_part(fs: pafs.FileSystem, path: str) -> bool:
    """A whole parquet file with the output's columns (an interrupted write leaves no footer)."""
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowInvalid):
        return False
    return set(OUTPUT_COLUMNS) <= set(schema.names)


def promote_staging(fs: pafs.FileSystem, out: str) -> int:
    """Move every readable staged part into the output; drop unreadable ones. Returns the parts promoted."""
    staging = f"{out}/{STAGING}"
    promoted = 0
    for info in _list_files(fs, staging, recursive=True):
        rel = info.path[len(staging) + 1 :]
        run = rel.split("/")[0]
        if not info.base_name.endswith(".parquet") or not _readable_part(fs, info.path):
            logger.warning("dropping incomplete staged file %s", info.path)
            fs.delete_file(info.path)
            continue
        fs.move(info.path, f"{out}/part-{run}-{info.base_name}")
        promoted += 1
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir(staging)
    return promoted


def read_committed(fs: pafs.FileSystem, out: str, columns: list[str] | None = None) -> pa.Table | None:
    parts = committed_parts(fs, out)
    if not parts:
        return None
    return pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=columns)


def _write_json(fs: pafs.FileSystem, path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(data, indent=2, default=str).encode())
    fs.move(tmp, path)


def is_complete(output: str) -> bool:
    """Whether a labeling output has its _SUCCESS marker."""
    fs, out = resolve_filesystem(output)
    return fs.get_file_info(f"{out}/{SUCCESS}").type == pafs.FileType.File


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------
def label_parquet(
    input: str,
    output: str,
    engine: EngineConfig,
    *,
    prompt_template: str = "{prompt}",
    id_column: str = "id",
    max_new_tokens: int = 64,
    stop: list[str] | None = None,
    speculative: bool = True,
    batch_size: int = 16,
    num_replicas: int = 1,
    num_cpus_per_replica: float | None = None,
    num_gpus_per_replica: float | None = None,
    num_threads: int | None = None,
    limit: int | None = None,
    rows_per_part: int | None = None,
) -> dict[str, Any]:
    """Label a parquet file/directory (local or s3://) into `output`; resumable; returns a summary dict.

    Each row's prompt is `prompt_template.format(**row)`. `limit` labels at most that many new rows this run
    (the output stays incomplete if rows remain). `rows_per_part` (default 8 batches) sizes the blocks the actors
    receive and so the output parts: the unit of parallelism across actors and of progress kept by an interrupted
    run. Uses the running Ray, RAY_ADDRESS, or starts a local one.
    """
    import ray
    from ray.data import ActorPoolStrategy

    t_start = time.perf_counter()
    if max_new_tokens <= 0:
        raise LabelError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size <= 0 or num_replicas <= 0:
        raise LabelError("batch_size and num_replicas must be positive")
    columns = template_columns(prompt_template)
    in_fs, in_path = resolve_filesystem(input)
    out_fs, out_path = resolve_filesystem(output)
    try:
        source = pads.dataset(in_path, filesystem=in_fs, format="parquet", exclude_invalid_files=True)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise LabelError(f"cannot read input {input}: {exc}") from exc
    names = source.schema.names
    for col in [id_column, *columns]:
        if col not in names:
            what = "id column" if col == id_column else "prompt template refers to column"
            raise LabelError(f"{what} {col!r}, which the input {input} lacks; its columns are {names}")
    ids = source.to_table(columns=[id_column]).column(0)
    if ids.null_count:
        raise LabelError(f"id column {id_column!r} has {ids.null_count} null values")
    total = len(ids)
    if len(pc.unique(ids)) != total:
        raise LabelError(f"id column {id_column!r} has duplicate values; resuming needs unique ids")

    out_fs.create_dir(out_path, recursive=True)
    recovered = promote_staging(out_fs, out_path)
    if recovered:
        logger.info("recovered %d parts an interrupted run had written", recovered)
    committed = read_committed(out_fs, out_path, ["id"])
    done = committed.column("id").combine_chunks() if committed is not None else pa.array([], ids.type)
    remaining = total - int(pc.sum(pc.is_in(ids, value_set=done)).as_py() or 0) if len(done) else total
    success_path = f"{out_path}/{SUCCESS}"
    todo = remaining if limit is None else min(limit, remaining)
    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    logger.info(
        "%s: %d rows, %d already labeled, labeling %d now (run %s)", input, total, total - remaining, todo, run_id
    )

    new_parts: list[str] = []
    if todo > 0:
        if out_fs.get_file_info(success_path).type == pafs.FileType.File:
            out_fs.delete_file(success_path)  # the output is about to change: it stops looking complete first
        ensure_ray()
        gpus = num_gpus_per_replica
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and engine.device != "cpu" else 0.0
        cpus = num_cpus_per_replica if num_cpus_per_replica is not None else 0.5
        replicas_per_node = None
        if num_threads is None and not gpus:
            # The fractional CPU reservation leaves room for Ray Data's own tasks, but Ray then pins a fractional
            # actor to one torch thread; decoding is the job's real work, so each replica takes its share of its
            # node's cores. Ray Data spreads actors over the nodes (its default SPREAD strategy).
            cpu_nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
            replicas_per_node = math.ceil(num_replicas / max(1, cpu_nodes))
        sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "stop": list(stop or []),
            "speculative": speculative,
        }
        engine_dict = engine.model_copy(update={"max_batch_size": batch_size}).model_dump(mode="json")
        ds = ray.data.read_parquet(in_path, filesystem=in_fs, columns=list(dict.fromkeys([id_column, *columns])))
        if len(done):
            ds = ds.map_batches(_drop_done, batch_format="pyarrow", fn_kwargs={"done": done, "id_column": id_column})
        if limit is not None:
            ds = ds.limit(todo)
        # Small blocks (streaming, no shuffle): every actor gets work and finished parts are written as they come.
        ds = ds.repartition(target_num_rows_per_block=rows_per_part or 8 * batch_size)
        ds = ds.map_batches(
            LabelActor,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=num_replicas),
            num_cpus=cpus,
            num_gpus=gpus or None,
            fn_constructor_kwargs={
                "engine": engine_dict,
                "template": prompt_template,
                "id_column": id_column,
                "sampling": sampling,
                "num_threads": num_threads,
                "replicas_per_node": replicas_per_node,
            },
        )
        staging = f"{out_path}/{STAGING}/{run_id}"
        t0 = time.perf_counter()
        # Writes are I/O: a small CPU share lets them run while the actors hold the cluster's CPUs, so finished parts
        # land (and survive an interruption) as they come rather than when the pool lets go.
        ds.write_parquet(staging, filesystem=out_fs, ray_remote_args={"num_cpus": 0.1})
        label_s = time.perf_counter() - t0
        before = set(committed_parts(out_fs, out_path))
        promote_staging(out_fs, out_path)
        new_parts = sorted(set(committed_parts(out_fs, out_path)) - before)
    else:
        label_s = 0.0

    run = (
        pads.dataset(new_parts, filesystem=out_fs, format="parquet").to_table()
        if new_parts
        else pa.table({c: [] for c in OUTPUT_COLUMNS})
    )
    all_ids = read_committed(out_fs, out_path, ["id"])
    n_committed = len(all_ids) if all_ids is not None else 0
    n_unique = len(pc.unique(all_ids.column("id"))) if all_ids is not None else 0
    complete = n_unique >= total and n_committed == n_unique
    if n_committed != n_unique:
        logger.error("output %s holds %d rows for %d ids", output, n_committed, n_unique)
    summary = _summary(run, label_s)
    summary.update(
        {
            "input": input,
            "output": output,
            "run_id": run_id,
            "rows_total": total,
            "rows_already_done": total - remaining,
            "rows_committed": n_committed,
            "rows_remaining": total - n_unique,
            "complete": complete,
            "speculative": speculative,
            "num_replicas": num_replicas,
            "batch_size": batch_size,
            "seconds": time.perf_counter() - t_start,
        }
    )
    if complete:
        _write_json(
            out_fs,
            success_path,
            {
                "complete": True,
                "rows": n_committed,
                "columns": OUTPUT_COLUMNS,
                "id_column": id_column,
                "parts": [p[len(out_path) + 1 :] for p in committed_parts(out_fs, out_path)],
                "model": engine.model,
                "index": engine.index,
                "prompt_template": prompt_template,
                "max_new_tokens": max_new_tokens,
                "stop": list(stop or []),
                "speculative": speculative,
                "finished_at": time.time(),
                "last_run": {k: v for k, v in summary.items() if k not in ("input", "output")},
            },
        )
    logger.info(
        "labeled %d rows (%d errors) in %.1f s; output %s is %s",
        summary["rows_labeled"],
        summary["errors"],
        label_s,
        output,
        "complete" if complete else "incomplete",
    )
    return summary


def _summary(run: pa.Table, label_s: float) -> dict[str, Any]:
    n = len(run)
    ok = run.filter(pc.is_null(run["error"])) if n else run
    tokens = int(pc.sum(ok["output_tokens"]).as_py() or 0) if len(ok) else 0
    passes = int(pc.sum(ok["forward_passes"]).as_py() or 0) if len(ok) else 0
    accepted = int(pc.sum(ok["accepted_tokens"]).as_py() or 0) if len(ok) else 0
    drafted = int(pc.sum(ok["drafted_tokens"]).as_py() or 0) if len(ok) else 0
    return {
        "rows_labeled": n,
        "errors": n - len(ok),
        "output_tokens": tokens,
        "forward_passes": passes,
        "accepted_tokens": accepted,
        "drafted_tokens": drafted,
        "label_seconds": label_s,
        "rows_per_s": n / label_s if label_s else 0.0,
        "tokens_per_s": tokens / label_s if label_s else 0.0,
        "accepted_per_pass": accepted / passes if passes else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
    }
