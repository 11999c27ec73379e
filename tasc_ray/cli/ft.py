"""CLI for TASC-ft: `enrich-vocab` (vocabulary enrichment, tasc_ray.ft.enrich) and `finetune` (Ray Train,
tasc_ray.stages.finetune). Both read parquet, jsonl or csv (enrich-vocab also text, one output a line), local or
s3://, files, directories or globs (tasc_ray.io)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tasc_ray.cli.args import add_model_argument
from tasc_ray.cli.main import add_command
from tasc_ray.ft.enrich import DEFAULT_MIN_COUNT, EnrichConfig, VocabEnrichmentError, enrich_model
from tasc_ray.ft.train import (
    DEFAULT_NEW_TOKEN_ALIGN_LR,
    DEFAULT_NEW_TOKEN_ALIGN_STEPS,
    DEFAULT_NEW_TOKEN_DROPOUT,
    DEFAULT_NEW_TOKEN_LR_MULT,
    FinetuneConfig,
    FinetuneError,
)
from tasc_ray.io import read_texts
from tasc_ray.stages.finetune import finetune

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    enrich = add_command(
        subparsers,
        "enrich-vocab",
        _enrich,
        "TASC-ft: add frequent output n-grams to the tokenizer and save a plain HF model directory",
    )
    add_enrich_arguments(enrich)
    ft = add_command(
        subparsers,
        "finetune",
        _finetune,
        "TASC-ft: fine-tune (LoRA or full) on Ray Train; loss on output tokens only; resumable",
    )
    add_finetune_arguments(ft)


def add_enrich_arguments(enrich: argparse.ArgumentParser) -> None:
    """The arguments of `tasc-ray enrich-vocab`."""
    add_model_argument(enrich)
    enrich.add_argument(
        "--corpus",
        required=True,
        help="outputs: .parquet, .jsonl, .csv or text (one per line); file, directory, glob or s3://",
    )
    enrich.add_argument("--column", default="output", help="column (parquet/csv) or field (jsonl) of the outputs")
    add_enrich_recipe_arguments(enrich)
    enrich.add_argument(
        "--prompt-column",
        default=None,
        help="column (parquet/csv) or field (jsonl) of each output's prompt; --max-copied reads it",
    )
    enrich.add_argument("--seed", type=int, default=0)
    enrich.add_argument("--out", required=True, help="output model directory (must not exist or be empty)")


def add_enrich_recipe_arguments(enrich: argparse._ActionsContainer) -> None:
    """The enrichment recipe's arguments (`EnrichConfig`, `--untie-embeddings`), shared by `enrich-vocab` and
    `ft-pipeline`; `enrich_config` reads them back."""
    enrich.add_argument("--budget", type=int, default=500, help="most new tokens")
    enrich.add_argument("--max-n", type=int, default=8, help="longest token n-gram considered per iteration")
    enrich.add_argument("--per-iteration", type=int, default=50, help="new tokens added per iteration")
    enrich.add_argument(
        "--min-count", type=int, default=DEFAULT_MIN_COUNT, help="least occurrences of a candidate n-gram"
    )
    enrich.add_argument(
        "--min-gain",
        type=float,
        default=0.002,
        help="stop when an iteration saves less than this share of the corpus' tokens",
    )
    enrich.add_argument(
        "--max-conflict",
        type=float,
        default=0.1,
        help="prefix-conflict score above which a "
        "candidate is dropped (share of its occurrences not aligned with the current tokens)",
    )
    enrich.add_argument("--no-prefix-filter", action="store_true", help="keep prefix-conflicting candidates")
    enrich.add_argument(
        "--no-cross",
        action="append",
        default=[],
        metavar="SEP",
        help="a field separator new tokens may not span (repeatable), e.g. --no-cross ', '",
    )
    enrich.add_argument(
        "--key-end",
        action="append",
        default=[],
        metavar="END",
        help="a string that ends a field's name (repeatable), e.g. --key-end '[': a new token may end with it but "
        "not go on past it, so no token holds a field's name and its value",
    )
    enrich.add_argument(
        "--untie-embeddings",
        action="store_true",
        help="give a tied LM head its own copy of the embedding matrix, so that the new tokens' input rows (reading) "
        "and output rows (emitting) learn apart",
    )
    enrich.add_argument(
        "--max-copied",
        type=float,
        default=1.0,
        help="drop candidates that carry a value copied from the prompt in more than this share of their rows "
        "(1: off; needs --prompt-column)",
    )
    enrich.add_argument(
        "--holdout", type=float, default=0.1, help="share of distinct outputs held out to measure compression"
    )


def enrich_config(args: argparse.Namespace) -> EnrichConfig:
    """The EnrichConfig of parsed `add_enrich_recipe_arguments` arguments (and `--seed`)."""
    return EnrichConfig(
        budget=args.budget,
        max_n=args.max_n,
        per_iteration=args.per_iteration,
        min_count=args.min_count,
        min_gain=args.min_gain,
        prefix_filter=not args.no_prefix_filter,
        no_cross=tuple(args.no_cross),
        key_end=tuple(args.key_end),
        max_conflict=args.max_conflict,
        max_copied=args.max_copied,
        holdout=args.holdout,
        seed=args.seed,
    )


def add_finetune_arguments(ft: argparse.ArgumentParser) -> None:
    """The arguments of `tasc-ray finetune` and jobs/finetune.py."""
    ft.add_argument("--model", required=True, help="model directory (e.g. from enrich-vocab) or 'smollm2-135m'")
    ft.add_argument(
        "--train", required=True, help="training data: .parquet, .jsonl or .csv; file, directory, glob or s3://"
    )
    ft.add_argument("--prompt-column", default="prompt")
    ft.add_argument("--output-column", default="output")
    ft.add_argument("--out", required=True, help="where the merged model is saved (must not exist or be empty)")
    add_finetune_recipe_arguments(ft)
    ft.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train storage (local dir or s3://...); default <out>.ray; rerun to resume",
    )
    ft.add_argument("--name", default=None, help="Ray Train run name (default finetune-<out name>)")
    ft.add_argument("--seed", type=int, default=0)


def add_finetune_recipe_arguments(ft: argparse._ActionsContainer) -> None:
    """The fine-tuning recipe's and the workers' arguments, shared by `finetune` and `ft-pipeline`;
    `finetune_options` reads them back."""
    ft.add_argument("--epochs", type=int, default=3)
    ft.add_argument("--lr", type=float, default=None, help="default 2e-4 (LoRA) or 5e-5 (full)")
    ft.add_argument("--lora-r", type=int, default=16)
    ft.add_argument(
        "--new-token-lr-mult",
        type=float,
        default=DEFAULT_NEW_TOKEN_LR_MULT,
        help="learning-rate multiplier for the new tokens' embedding rows (LoRA and full)",
    )
    ft.add_argument(
        "--new-token-warmup-steps",
        type=int,
        default=0,
        help="steps that train the new tokens' embedding rows alone, before the schedule",
    )
    ft.add_argument(
        "--new-token-align-steps",
        type=int,
        default=DEFAULT_NEW_TOKEN_ALIGN_STEPS,
        help="steps that first teach the new tokens' rows to be read like their original spelling (label-free "
        "distillation from the model itself)",
    )
    ft.add_argument(
        "--new-token-align-lr",
        type=float,
        default=DEFAULT_NEW_TOKEN_ALIGN_LR,
        help="Adam learning rate of the alignment steps",
    )
    ft.add_argument(
        "--new-token-dropout",
        type=float,
        default=DEFAULT_NEW_TOKEN_DROPOUT,
        help="chance, at each step, that a new token of an output is spelled in its original tokens instead",
    )
    ft.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ft.add_argument("--num-workers", type=int, default=1)
    ft.add_argument("--cpus-per-worker", type=float, default=None)
    ft.add_argument("--use-gpu", action="store_true")
    ft.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ft.add_argument("--max-steps", type=int, default=None)
    ft.add_argument("--batch-size", type=int, default=8, help="global batch size")
    ft.add_argument("--max-length", type=int, default=512)
    ft.add_argument("--max-failures", type=int, default=0, help="worker failures retried from the last checkpoint")
    ft.add_argument(
        "--trainer",
        choices=["ray", "local"],
        default="ray",
        help="Ray Train (default) or one in-process worker (machines without Ray)",
    )


def _enrich(args: argparse.Namespace) -> dict[str, Any]:
    if args.max_copied < 1.0 and not args.prompt_column:
        raise VocabEnrichmentError("--max-copied below 1 needs --prompt-column (the prompts the values come from)")
    extra = [args.prompt_column] if args.prompt_column else []
    corpus = read_texts(args.corpus, args.column, extra)
    texts, prompts = corpus.texts, corpus.extras.get(args.prompt_column) if args.prompt_column else None
    config = enrich_config(args)
    report = enrich_model(args.model, texts, args.out, config, prompts=prompts, untie=args.untie_embeddings)
    summary = {k: v for k, v in report.items() if k != "new_tokens"}
    summary["out"] = args.out
    summary["first_new_tokens"] = [t["token"] for t in report["new_tokens"][:20]]
    return summary


def finetune_options(args: argparse.Namespace) -> dict[str, Any]:
    """FinetuneConfig's fields from parsed `add_finetune_recipe_arguments` arguments (and `--seed`, `--json`)."""
    return dict(
        epochs=args.epochs,
        lr=args.lr,
        lora_r=args.lora_r,
        new_token_lr_mult=args.new_token_lr_mult,
        new_token_warmup_steps=args.new_token_warmup_steps,
        new_token_align_steps=args.new_token_align_steps,
        new_token_align_lr=args.new_token_align_lr,
        new_token_dropout=args.new_token_dropout,
        full=args.full,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu,
        bf16=args.bf16,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_failures=args.max_failures,
        seed=args.seed,
        trainer=args.trainer,
        progress=not args.json,
    )


def _finetune(args: argparse.Namespace) -> dict[str, Any]:
    cfg = FinetuneConfig(
        model=args.model,
        train=args.train,
        out=args.out,
        prompt_column=args.prompt_column,
        output_column=args.output_column,
        storage_path=args.storage_path,
        name=args.name,
        **finetune_options(args),
    )
    return finetune(cfg)


__all__ = ["register", "FinetuneError", "VocabEnrichmentError"]
