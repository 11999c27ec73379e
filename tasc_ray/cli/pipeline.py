"""CLI for the TASC-ft pipeline (`tasc-ray ft-pipeline`, tasc_ray.stages.ft_pipeline): from logged outputs (or a
prompt/output corpus) to an enriched, fine-tuned, evaluated and optionally deployed model, one resumable job.

`jobs/ft_pipeline.py` runs the same command on a cluster (`ray job submit -- python jobs/ft_pipeline.py ...`). Exit
codes: 0 when the model is ready or deployed, or when enrichment found nothing to add (a no-op, said on stderr); 1
when the fine-tuned model's quality fell more than --quality-bound below the original's (not deployed; the summary
is still printed with --json); 2 for bad input.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tasc_ray.cli.args import add_model_argument
from tasc_ray.cli.ft import add_enrich_recipe_arguments, add_finetune_recipe_arguments, enrich_config, finetune_options
from tasc_ray.cli.main import CommandIncomplete, add_command
from tasc_ray.metrics import METRICS
from tasc_ray.stages.ft_pipeline import PipelineConfig, run_pipeline

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "ft-pipeline",
        _pipeline,
        "TASC-ft end to end: split, enrich, index, fine-tune, evaluate against the original, deploy; resumable",
        "Read logged outputs (a Serve request log) or a prompt/output corpus, hold out prompts for the evaluation, "
        "enrich the vocabulary, index, fine-tune on Ray Train, index for the new tokenizer, evaluate both models on "
        "the held-out prompts and, when quality held within --quality-bound, point a Serve application at the new "
        "model. Each stage's output under --work-dir is skipped on a rerun once complete.",
    )
    add_pipeline_arguments(parser)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tasc-ray ft-pipeline` and jobs/ft_pipeline.py."""
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--request-log",
        help="a Serve app's log_dir (parquet with prompt, output, finish_reason; local or s3://); rows that stopped",
    )
    source.add_argument(
        "--input",
        help="a corpus with a prompt and an output column (parquet, jsonl, csv; file, directory, glob, s3://)",
    )
    parser.add_argument("--prompt-column", default="prompt", help="the corpus's prompt column (with --input)")
    parser.add_argument("--output-column", default="output", help="the corpus's output column (with --input)")
    parser.add_argument("--work-dir", required=True, help="local directory of every stage's output; rerun to resume")
    parser.add_argument("--eval-size", type=int, default=100, help="distinct prompts held out for the evaluation")
    parser.add_argument("--seed", type=int, default=0, help="the split's, the enrichment's and the training's seed")
    parser.add_argument("--metric", choices=METRICS, default="exact_match", help="the evaluation's quality metric")
    parser.add_argument(
        "--quality-bound",
        type=float,
        default=1.0,
        help="most metric points (0-100) the fine-tuned model may lose against the original and still be deployed",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="output tokens per held-out row at most")
    parser.add_argument("--stop", action="append", default=[], help="stop string of the evaluation (repeatable)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="rows the evaluation decodes at once")
    parser.add_argument("--index-workers", type=int, default=2, help="Ray Data actors of the index stages")
    parser.add_argument(
        "--storage-path", default=None, help="Ray Train checkpoints (local dir or s3://); default <work-dir>/model.ray"
    )
    parser.add_argument("--deploy-app", default=None, help="Serve application to point at the new model")
    parser.add_argument(
        "--serve-address",
        default=None,
        help="the Ray dashboard with Serve's REST API, e.g. http://127.0.0.1:8265 (with --deploy-app)",
    )
    add_enrich_recipe_arguments(parser.add_argument_group("enrichment (as tasc-ray enrich-vocab)"))
    add_finetune_recipe_arguments(parser.add_argument_group("fine-tuning (as tasc-ray finetune)"))


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """The PipelineConfig of parsed `add_pipeline_arguments` arguments."""
    return PipelineConfig(
        model=args.model,
        work_dir=args.work_dir,
        input=args.input,
        request_log=args.request_log,
        prompt_column=args.prompt_column,
        output_column=args.output_column,
        eval_size=args.eval_size,
        seed=args.seed,
        metric=args.metric,
        quality_bound=args.quality_bound,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        eval_batch_size=args.eval_batch_size,
        index_workers=args.index_workers,
        enrich=enrich_config(args),
        untie_embeddings=args.untie_embeddings,
        finetune={k: v for k, v in finetune_options(args).items() if k != "progress"},
        storage_path=args.storage_path,
        deploy_app=args.deploy_app,
        serve_address=args.serve_address,
        progress=not args.json,
    )


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    summary = run_pipeline(pipeline_config(args))
    if summary["status"] == "rejected":
        raise CommandIncomplete(summary["message"], summary)
    logger.info("%s", summary["message"])
    return summary
