"""`tasc-ray label`: batch labeling of a dataset (parquet, jsonl or csv; local or s3://) on a Ray Data actor pool
(tasc_ray.stages.labeling), or through a running tasc_ray Serve app's engine replicas (`--serve-app`,
tasc_ray.stages.serve_labeling)."""

from __future__ import annotations

import argparse
from typing import Any

from tasc_ray.cli.args import add_engine_arguments, add_model_argument, engine_config
from tasc_ray.cli.main import CommandIncomplete, add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "label",
        run_label,
        "label a dataset (parquet, jsonl or csv; local or s3://) with TASC-spec on Ray Data; resumable",
        description="Read INPUT, format each row's prompt with TEMPLATE, generate with an actor "
        "pool of TASC generators (or, with --serve-app NAME, with the engine replicas of the running "
        "tasc_ray Serve app NAME, whose online requests keep priority) and write OUTPUT (parts + "
        "_SUCCESS manifest). A rerun skips ids already written. Starts a local Ray unless RAY_ADDRESS is set.",
    )
    add_label_arguments(parser)


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """The label job's arguments (shared by `tasc-ray label` and jobs/batch_label.py)."""
    parser.add_argument(
        "--input", required=True, help="parquet (or jsonl, csv) file, directory or glob, local or s3://"
    )
    parser.add_argument("--output", required=True, help="output directory, local or s3://")
    add_model_argument(parser)
    add_engine_arguments(parser)
    parser.add_argument(
        "--prompt-template",
        default="{prompt}",
        help='Python format string over the input columns, e.g. "Sentence: {text}\\nMR:"',
    )
    parser.add_argument("--id-column", default="id", help="column with unique row ids (used to resume)")
    parser.add_argument(
        "--keep-columns",
        default="",
        help="input columns to copy into the output, comma-separated (e.g. prompt,label: the output can then "
        "train `finetune --train OUTPUT` or sit beside the source)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable), e.g. $'\\n'")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per actor call = rows per batched decode")
    parser.add_argument("--num-replicas", type=int, default=1, help="generator actors in the pool")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per actor (default 0.5)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default 1 if the cluster has)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per actor (default on CPU: its node's CPUs shared by the replicas there)",
    )
    parser.add_argument("--limit", type=int, default=None, help="label at most this many new rows in this run")
    parser.add_argument(
        "--rows-per-part",
        type=int,
        default=None,
        help="rows per block/output part (default 8 batches): parallelism and resume granularity",
    )
    parser.add_argument("--no-spec", action="store_true", help="plain decoding (no drafts), same code path")
    parser.add_argument(
        "--serve-app",
        default=None,
        metavar="NAME",
        help="decode through the running tasc_ray Serve app NAME (its model, index and settings; the engine flags "
        "are unused): --num-replicas stage workers (--num-cpus each, default 0.1) each keep --batch-size rows in "
        "its engine replicas, admitted after online requests; a replica that dies costs retries, not rows",
    )


def _unescape(text: str) -> str:
    """Let a shell argument spell a newline or tab as \\n or \\t."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def run_label(args: argparse.Namespace) -> dict[str, Any]:
    from tasc_ray.stages.labeling import label_parquet

    template, stops = _unescape(args.prompt_template), [_unescape(s) for s in args.stop]
    summary = label_parquet(
        args.input,
        args.output,
        None if args.serve_app else engine_config(args),
        prompt_template=template,
        id_column=args.id_column,
        max_new_tokens=args.max_new_tokens,
        stop=stops,
        speculative=not args.no_spec,
        batch_size=args.batch_size,
        num_replicas=args.num_replicas,
        num_cpus_per_replica=args.num_cpus,
        num_gpus_per_replica=args.num_gpus,
        num_threads=args.threads,
        limit=args.limit,
        rows_per_part=args.rows_per_part,
        keep_columns=[c.strip() for c in args.keep_columns.split(",") if c.strip()],
        serve_app=args.serve_app,
    )
    if summary["rows_remaining"] and args.limit is None:
        raise CommandIncomplete(f"{summary['rows_remaining']} rows are not labeled yet; rerun to resume", summary)
    return summary
