"""Batch labeling with TASC-spec on Ray Data: a Dataset -> Dataset stage, and the resumable job that calls it.

    ds = label_dataset(ds, EngineConfig(model=..., index=...), "{prompt}", SamplingParams(max_new_tokens=64))
    label_parquet("prompts.parquet", "out/", EngineConfig(model=..., index=...), prompt_template="{prompt}")

`label_dataset` is the stage (the shape of Ray's `llm/_internal/batch` stages: the caller owns reading and
writing): `map_batches` over an `ActorPoolStrategy` of `LabelActor`s, each loading the shared engine once
(fractional CPUs, one GPU each when the cluster has GPUs), turns rows into (id, output, prompt_tokens,
output_tokens, forward_passes, accepted_tokens, drafted_tokens, finish_reason, latency_s, error), followed by any
input columns asked to be kept (`keep_columns`: the prompt, a source text, a label to compare with). A row that
fails gets its `error` and the others go on (`SpeculativeGenerator.generate_each`); so does a row with a null in
a column the template names.

`label_parquet` is the job: it reads the input (parquet through Ray Data; jsonl and csv through `tasc_ray.io`),
checks up front that the output can be written (not under a file, writable, its bucket exists), leaves out the
ids an earlier run committed, runs the stage and writes parquet parts under the commit protocol
of `tasc_ray.stages.commit` (staging, then parts, then the `_SUCCESS` manifest once every id has a row): a rerun
resumes without duplicating or losing a row. Ids must be unique and non-null.
"""

from __future__ import annotations

import logging
import math
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasc_ray.engine.config import EngineConfig
from tasc_ray.engine.generator import GenerationResult, SamplingParams
from tasc_ray.io import (
    CorpusError,
    FileInfo,
    InputFiles,
    StorageError,
    check_output_location,
    inspect_files,
    list_files,
    read_columns,
)
from tasc_ray.stages.commit import SUCCESS, PartsOutput, is_complete, new_run_id
from tasc_ray.stages.datasets import read_dataset
from tasc_ray.stages.runtime import ensure_ray

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_COLUMNS",
    "SUCCESS",
    "LabelActor",
    "LabelError",
    "is_complete",
    "label_dataset",
    "label_parquet",
    "node_cpu_share",
    "template_columns",
]

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
_INT_COLUMNS = ["prompt_tokens", "output_tokens", "forward_passes", "accepted_tokens", "drafted_tokens"]


class LabelError(ValueError):
    """A labeling request that cannot run as given (missing column, duplicate ids, bad template)."""


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


def output_schema(id_type: pa.DataType, kept: list[pa.Field] | None = None) -> pa.Schema:
    """OUTPUT_COLUMNS, then the kept input columns (with their input types)."""
    return pa.schema(
        [("id", id_type), ("output", pa.string())]
        + [(c, pa.int64()) for c in _INT_COLUMNS]
        + [("finish_reason", pa.string()), ("latency_s", pa.float64()), ("error", pa.string())]
        + list(kept or [])
    )


def check_keep_columns(keep_columns: list[str], id_column: str) -> list[str]:
    """Input columns copied to the output: not an output column's name (the id column is already `id`)."""
    keep = [c for c in dict.fromkeys(keep_columns) if c != id_column]
    clash = [c for c in keep if c in OUTPUT_COLUMNS]
    if clash:
        raise LabelError(f"cannot keep input column(s) {clash}: the output has columns of those names")
    return keep


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def node_cpu_share(replicas_per_node: int) -> int:
    """Torch threads for one replica: the CPUs of the node it runs on (as Ray counts them, so a container's limit
    rather than the host's cores) shared among the replicas placed there."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node_id), 1.0)
    return max(1, int(cpus // replicas_per_node))


class PromptTemplate:
    """A row's prompt, `template.format(**row)`: the one prompt rule of every labeling path (the actor pool and
    `serve_labeling`)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.columns = template_columns(template)

    def render(self, row: dict[str, Any]) -> str:
        """The row's prompt; a null in a column the template names is the row's error (not the text "None")."""
        nulls = [c for c in self.columns if row.get(c) is None]
        if nulls:
            names = ", ".join(repr(c) for c in nulls)
            raise LabelError(f"null value in column {names} (the prompt template {self.template!r} needs it)")
        return self.template.format(**row)


class LabelBatch:
    """One call's output rows as they are filled: the ids and kept columns copied from the input batch, then each
    row's prompt encoded (a row that cannot be gets its error), then each row's result or error."""

    def __init__(self, batch: pa.Table, id_column: str, keep_columns: list[str]) -> None:
        self.rows = batch.to_pylist()
        self.out: dict[str, list[Any]] = {c: [None] * len(self.rows) for c in OUTPUT_COLUMNS}
        self.out["id"] = [r[id_column] for r in self.rows]
        self.out |= {c: batch.column(c).to_pylist() for c in keep_columns}
        kept = [batch.schema.field(c) for c in keep_columns]
        self.schema = output_schema(batch.schema.field(id_column).type, kept)

    def encode(self, template: PromptTemplate, encode: Callable[[str], list[int]]) -> dict[int, list[int]]:
        """{row: prompt token ids} of the rows whose prompt renders and encodes; the others get their error."""
        prompts: dict[int, list[int]] = {}
        for i, row in enumerate(self.rows):
            try:  # encode_prompt refuses an empty prompt and one too long for the model's context (PromptError)
                prompts[i] = encode(template.render(row))
            except Exception as exc:
                self.out["error"][i] = f"{type(exc).__name__}: {exc}"
        return prompts

    def fill(self, i: int, result: GenerationResult | Exception, latency_s: float) -> None:
        """Row i's output columns from its result, or its error."""
        if isinstance(result, Exception):
            self.out["error"][i] = f"{type(result).__name__}: {result}"
            return
        values = {
            "output": result.text,
            "prompt_tokens": result.prompt_tokens,
            "output_tokens": result.new_tokens,
            "forward_passes": result.stats.forward_passes,
            "accepted_tokens": result.stats.accepted,
            "drafted_tokens": result.stats.drafted,
            "finish_reason": result.finish_reason,
            "latency_s": latency_s,
        }
        for column, value in values.items():
            self.out[column][i] = value

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.out, schema=self.schema)


class LabelActor:
    """One pool member: loads the engine once, turns a batch of input rows into output rows."""

    def __init__(
        self,
        engine: EngineConfig,
        template: str,
        id_column: str,
        sampling: SamplingParams,
        num_threads: int | None = None,
        replicas_per_node: int | None = None,
        keep_columns: list[str] | None = None,
    ) -> None:
        import torch

        from tasc_ray.engine.load import load_engine

        if num_threads is None and replicas_per_node:
            num_threads = node_cpu_share(replicas_per_node)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.generator = load_engine(engine)
        self.template, self.id_column, self.params = PromptTemplate(template), id_column, sampling
        self.keep_columns = list(keep_columns or [])

    def __call__(self, batch: pa.Table) -> pa.Table:
        labels = LabelBatch(batch, self.id_column, self.keep_columns)
        prompts = labels.encode(self.template, self.generator.encode)
        order = list(prompts)
        start = time.perf_counter()
        last = {i: start for i in order}

        def stream(k: int, _ids: list[int]) -> None:
            last[order[k]] = time.perf_counter()

        results = self.generator.generate_each([prompts[i] for i in order], self.params, stream=stream)
        for i, result in zip(order, results):  # a row's latency runs from its admission to its last token
            queued = result.stats.queued_s if isinstance(result, GenerationResult) else 0.0
            labels.fill(i, result, last[i] - start - queued)
        return labels.table()


@dataclass
class ReplicaResources:
    """What each LabelActor reserves, and how many replicas share a node's CPUs (to size torch threads)."""

    num_cpus: float
    num_gpus: float
    replicas_per_node: int | None


def replica_resources(
    engine: EngineConfig,
    num_replicas: int,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    num_threads: int | None = None,
) -> ReplicaResources:
    """Defaults: 0.5 CPU, and one GPU per replica when the cluster has GPUs and the engine may use them. On CPU
    without `num_threads`, each replica's torch threads are its share of its node's CPUs: the fractional CPU
    reservation leaves room for Ray Data's own tasks, but Ray pins a fractional actor to one thread."""
    import ray

    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and engine.device != "cpu" else 0.0
    replicas_per_node = None
    if num_threads is None and not num_gpus:  # Ray Data spreads actors over the nodes (its default SPREAD)
        cpu_nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        replicas_per_node = math.ceil(num_replicas / max(1, cpu_nodes))
    return ReplicaResources(num_cpus if num_cpus is not None else 0.5, num_gpus, replicas_per_node)


def label_dataset(
    ds: Any,
    engine: EngineConfig,
    template: str,
    sampling: SamplingParams,
    *,
    id_column: str = "id",
    batch_size: int = 16,
    num_replicas: int = 1,
    num_cpus_per_replica: float | None = None,
    num_gpus_per_replica: float | None = None,
    num_threads: int | None = None,
    rows_per_call: int | None = None,
    keep_columns: list[str] | None = None,
) -> Any:
    """The labeling stage: a Ray Dataset of input rows -> a Dataset of OUTPUT_COLUMNS rows, then `keep_columns`
    copied from the input (Ray must be running).

    Each row's prompt is `template.format(**row)`. Each actor decodes `batch_size` rows at a time out of calls of
    `rows_per_call` rows (default 4 x batch_size): a finished row's place is taken by the call's next row at the
    next step (continuous batching), so short outputs never wait for long ones."""
    from ray.data import ActorPoolStrategy

    resources = replica_resources(engine, num_replicas, num_cpus_per_replica, num_gpus_per_replica, num_threads)
    return ds.map_batches(
        LabelActor,
        batch_size=rows_per_call or 4 * batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=num_replicas),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus or None,
        fn_constructor_kwargs={
            "engine": engine.model_copy(update={"max_batch_size": batch_size}),
            "template": template,
            "id_column": id_column,
            "sampling": sampling,
            "num_threads": num_threads,
            "replicas_per_node": resources.replicas_per_node,
            "keep_columns": check_keep_columns(list(keep_columns or []), id_column),
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LabelInput:
    """The input's files and its ids, checked: the columns exist, ids are unique and non-null."""

    files: InputFiles
    infos: list[FileInfo]
    columns: list[str]  # the id column, then the template's columns and the kept ones
    ids: pa.Array

    def dataset(self, done: pa.Array, limit: int | None, rows_per_block: int) -> Any:
        """A Ray Dataset of (at most `limit` of) the input rows whose ids are not in `done`, in small blocks."""
        ds = read_dataset(self.files, self.columns, self.infos)
        if len(done):
            ds = ds.map_batches(_drop_done, batch_format="pyarrow", fn_kwargs={"done": done, "id": self.columns[0]})
        if limit is not None:
            ds = ds.limit(limit)
        # Small blocks (streaming, no shuffle): every actor gets work and finished parts are written as they come.
        return ds.repartition(target_num_rows_per_block=rows_per_block)


def _drop_done(batch: pa.Table, done: pa.Array, id: str) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch[id], value_set=done)))


def open_input(input: str, id_column: str, template_cols: list[str], keep_columns: Sequence[str] = ()) -> LabelInput:
    """Check the input (files, columns, ids) before anything is written."""
    columns = list(dict.fromkeys([id_column, *template_cols, *keep_columns]))
    try:
        files = list_files(input, what="input")
        infos = inspect_files(files, columns, what="input")
        ids = read_columns(files, [id_column], what="input", infos=infos).column(0).combine_chunks()
    except CorpusError as exc:  # its message names the file, bucket or key
        raise LabelError(f"cannot read input: {exc}") from exc
    if ids.null_count:
        raise LabelError(f"id column {id_column!r} has {ids.null_count} null values")
    if len(pc.unique(ids)) != len(ids):
        raise LabelError(f"id column {id_column!r} has duplicate values; resuming needs unique ids")
    return LabelInput(files, infos, columns, ids)


def label_parquet(
    input: str,
    output: str,
    engine: EngineConfig | None,
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
    keep_columns: list[str] | None = None,
    serve_app: str | None = None,
) -> dict[str, Any]:
    """Label a parquet (or jsonl/csv) file, directory or glob, local or s3://, into `output`; resumable; returns a
    summary dict.

    Each row's prompt is `prompt_template.format(**row)`. `limit` labels at most that many new rows this run
    (the output stays incomplete if rows remain). `keep_columns` copies those input columns into the output (a
    rerun into the same output must keep the same ones). `rows_per_part` (default 8 batches) sizes the blocks the actors
    receive and so the output parts: the unit of parallelism across actors and of progress kept by an interrupted
    run. Uses the running Ray, RAY_ADDRESS, or starts a local one.

    `serve_app` names a running tasc_ray Serve app whose engine replicas decode the rows instead (`engine` is then
    unused and may be None; tasc_ray.stages.serve_labeling): `num_replicas` stage workers each keep `batch_size`
    rows in the app's engine; an unknown app, or one without a tasc_ray engine, is refused before any row is read.
    """
    t_start = time.perf_counter()
    if max_new_tokens <= 0:
        raise LabelError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size <= 0 or num_replicas <= 0:
        raise LabelError("batch_size and num_replicas must be positive")
    try:  # before reading the input, loading a model or decoding a row
        check_output_location(output)
    except StorageError as exc:
        raise LabelError(f"cannot write output: {exc}") from exc
    keep = check_keep_columns(list(keep_columns or []), id_column)
    if serve_app:  # the app's engine decodes: check it before any row is read
        from tasc_ray.stages.serve_labeling import engine_app

        ensure_ray()
        app = engine_app(serve_app)
        model = {"model": app["model_source"], "index": app.get("index"), "serve_app": serve_app}
    elif engine is None:
        raise LabelError("label_parquet needs an engine config, or serve_app naming a running app")
    else:
        model = {"model": engine.model, "index": engine.index}
    source = open_input(input, id_column, template_columns(prompt_template), keep)
    out = PartsOutput(output, OUTPUT_COLUMNS)
    check_committed_columns(out, OUTPUT_COLUMNS + keep)
    plan = plan_run(source, out, limit)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop=list(stop or []), speculative=speculative)
    new_parts, label_s = [], 0.0
    if plan.todo > 0:
        ensure_ray()
        ds = source.dataset(plan.done, None if limit is None else plan.todo, rows_per_part or 8 * batch_size)
        if serve_app:
            from tasc_ray.stages.serve_labeling import label_dataset_through_serve

            ds = label_dataset_through_serve(
                ds,
                serve_app,
                prompt_template,
                sampling,
                id_column=id_column,
                max_in_flight=batch_size,
                num_workers=num_replicas,
                num_cpus_per_worker=num_cpus_per_replica,
                keep_columns=keep,
            )
        else:
            assert engine is not None  # checked above
            ds = label_dataset(
                ds,
                engine,
                prompt_template,
                sampling,
                id_column=id_column,
                batch_size=batch_size,
                num_replicas=num_replicas,
                num_cpus_per_replica=num_cpus_per_replica,
                num_gpus_per_replica=num_gpus_per_replica,
                num_threads=num_threads,
                keep_columns=keep,
            )
        new_parts, label_s = _label_into(out, plan.run_id, ds)
    summary = _job_summary(out, source, new_parts, label_s, plan.remaining)
    summary.update(input=input, output=output, run_id=plan.run_id, speculative=speculative, serve_app=serve_app)
    summary.update(num_replicas=num_replicas, batch_size=batch_size, seconds=time.perf_counter() - t_start)
    if summary["complete"]:
        out.mark_complete(_manifest(summary, model, prompt_template, id_column, sampling, keep))
    logger.info(
        "labeled %d rows (%d errors) in %.1f s; output %s is %s",
        summary["rows_labeled"],
        summary["errors"],
        label_s,
        output,
        "complete" if summary["complete"] else "incomplete",
    )
    return summary


@dataclass
class RunPlan:
    """What this run labels: the committed ids to leave out, the rows remaining and this run's share of them."""

    run_id: str
    done: pa.Array
    remaining: int
    todo: int


def check_committed_columns(out: PartsOutput, columns: list[str]) -> None:
    """A rerun writes the columns the output's committed parts have (the same kept input columns)."""
    parts = out.parts()
    if not parts:
        return
    with out.fs.open_input_file(parts[0]) as f:
        names = pq.read_schema(f).names
    if names != columns:
        kept = [c for c in names if c not in OUTPUT_COLUMNS]
        raise LabelError(
            f"output {out.output} was written with kept input columns {kept}; rerun with the same ones to resume "
            f"(asked: {[c for c in columns if c not in OUTPUT_COLUMNS]}), or write to another output"
        )


def plan_run(source: LabelInput, out: PartsOutput, limit: int | None) -> RunPlan:
    """Recover what an interrupted run left, and plan this run from the committed ids."""
    out.recover()
    done = out.committed_ids("id", source.ids.type)
    total = len(source.ids)
    remaining = total - (int(pc.sum(pc.is_in(source.ids, value_set=done)).as_py() or 0) if len(done) else 0)
    plan = RunPlan(new_run_id(), done, remaining, remaining if limit is None else min(limit, remaining))
    logger.info(
        "%d rows, %d already labeled, labeling %d now (run %s)", total, total - remaining, plan.todo, plan.run_id
    )
    return plan


def _label_into(out: PartsOutput, run_id: str, labeled: Any) -> tuple[list[str], float]:
    """Write the labeled Dataset as this run's staged parts and commit them; (new parts, seconds)."""
    out.begin_run()
    t0 = time.perf_counter()
    # Writes are I/O: a small CPU share lets them run while the actors hold the cluster's CPUs, so finished parts
    # land (and survive an interruption) as they come rather than when the pool lets go.
    labeled.write_parquet(out.staging(run_id), filesystem=out.fs, ray_remote_args={"num_cpus": 0.1})
    label_s = time.perf_counter() - t0
    return out.finish_run(run_id), label_s


def _job_summary(
    out: PartsOutput, source: LabelInput, new_parts: list[str], label_s: float, remaining: int
) -> dict[str, Any]:
    """This run's statistics and the output's state: rows committed, remaining, complete (one row per id)."""
    total = len(source.ids)
    run = out.read(parts=new_parts) if new_parts else pa.table({c: [] for c in OUTPUT_COLUMNS})
    ids = out.committed_ids("id", source.ids.type)
    n_unique = len(pc.unique(ids))
    if len(ids) != n_unique:
        logger.error("output %s holds %d rows for %d ids", out.output, len(ids), n_unique)
    return {
        **run_statistics(run, label_s),
        "rows_total": total,
        "rows_already_done": total - remaining,
        "rows_committed": len(ids),
        "rows_remaining": total - n_unique,
        "complete": n_unique >= total and len(ids) == n_unique,
    }


def _manifest(
    summary: dict[str, Any],
    model: dict[str, Any],
    template: str,
    id_column: str,
    sampling: SamplingParams,
    keep_columns: list[str],
) -> dict[str, Any]:
    return {
        "complete": True,
        "rows": summary["rows_committed"],
        "columns": OUTPUT_COLUMNS + keep_columns,
        "id_column": id_column,
        **model,  # model and index (and serve_app, labeled through a running app)
        "prompt_template": template,
        "max_new_tokens": sampling.max_new_tokens,
        "stop": sampling.stop,
        "speculative": sampling.speculative,
        "finished_at": time.time(),
        "last_run": {k: v for k, v in summary.items() if k not in ("input", "output")},
    }


def run_statistics(run: pa.Table, label_s: float) -> dict[str, Any]:
    """Rows, errors, tokens, passes and acceptance of one run's output rows."""
    n = len(run)
    ok = run.filter(pc.is_null(run["error"])) if n else run

    def total(column: str) -> int:
        return int(pc.sum(ok[column]).as_py() or 0) if len(ok) else 0

    tokens, passes = total("output_tokens"), total("forward_passes")
    accepted, drafted = total("accepted_tokens"), total("drafted_tokens")
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
