"""CLI for TASC-ft: `enrich-vocab` (vocabulary enrichment, tasc_ray.ft.enrich), `finetune` (Ray Train,
tasc_ray.stages.finetune; `--recipe auto` chooses the enrichment recipe first) and `ft-recipe` (which recipe a task's
outputs want, tasc_ray.ft.recipe). All read parquet, jsonl or csv (enrich-vocab and ft-recipe also text, one output a
line), local or s3://, files, directories or globs (tasc_ray.io)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from tasc_ray.cli.args import add_model_argument
from tasc_ray.cli.main import add_command
from tasc_ray.ft.enrich import DEFAULT_MIN_COUNT, EnrichConfig, VocabEnrichmentError, enrich_model
from tasc_ray.ft.recipe import RecipeChoice, RecipeError, RecipeOptions, label_with_teacher
from tasc_ray.ft.train import (
    DEFAULT_NEW_TOKEN_ALIGN_LR,
    DEFAULT_NEW_TOKEN_ALIGN_STEPS,
    DEFAULT_NEW_TOKEN_DROPOUT,
    DEFAULT_NEW_TOKEN_LR_MULT,
    FinetuneConfig,
    FinetuneError,
)
from tasc_ray.io import is_free_directory, read_texts
from tasc_ray.metrics import METRICS
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
    recipe = add_command(
        subparsers,
        "ft-recipe",
        _ft_recipe,
        "TASC-ft: which recipe a task's outputs want: candidates probed (vocabulary statistics, pilot fine-tunes), "
        "the most compressing one within --quality-bound chosen",
        "Probe the enrichment recipes (plain, --key-end with the outputs' field syntax, --key-end --max-copied 0.5 "
        "with prompts, --distill for free text; each at two sizes) cheapest first: compression on held-out outputs "
        "and field-boundary statistics; then a pilot fine-tune each, read with teacher forcing (the task metric of "
        "the teacher-forced predictions against the original vocabulary's pilot); pilot decoding where the two "
        "disagree. Prints the table of candidates (stderr with --json) and the choice, or a no-op: keep the "
        "original vocabulary.",
    )
    add_model_argument(recipe)
    recipe.add_argument(
        "--corpus",
        required=True,
        help="outputs (and prompts): .parquet, .jsonl, .csv or text (one output per line); file, directory, glob, s3://",
    )
    recipe.add_argument("--column", default="output", help="column (parquet/csv) or field (jsonl) of the outputs")
    recipe.add_argument(
        "--prompt-column",
        default=None,
        help="column of each output's prompt; without it only the vocabulary statistics run (no pilot fine-tune)",
    )
    add_recipe_goal_arguments(recipe)
    recipe.add_argument("--budget", type=int, default=500, help="most new tokens of the full-size candidates")
    recipe.add_argument(
        "--min-count", type=int, default=DEFAULT_MIN_COUNT, help="least occurrences of a candidate n-gram"
    )
    recipe.add_argument("--teacher", default=None, help="a model that does the task; labels the distill probe's rows")
    recipe.add_argument("--seed", type=int, default=0)
    add_recipe_probe_arguments(recipe)


def add_recipe_goal_arguments(parser: argparse._ActionsContainer) -> None:
    """What the recipe choice keeps: the task's metric and how many points of it may be lost (`ft-recipe`,
    `finetune --recipe auto`; ft-pipeline has its own --metric and --quality-bound)."""
    parser.add_argument("--metric", choices=METRICS, default="exact_match", help="the task's quality metric")
    parser.add_argument(
        "--quality-bound",
        type=float,
        default=1.0,
        help="most metric points (0-100) a recipe is predicted to lose against the original vocabulary",
    )
    parser.add_argument("--stop", action="append", default=None, help="stop string of the outputs (default newline)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="output tokens at most when a probe decodes")


def add_recipe_probe_arguments(parser: argparse._ActionsContainer) -> None:
    """The probe sizes of the recipe choice (`RecipeOptions`)."""
    defaults = RecipeOptions()
    parser.add_argument(
        "--probe-rows", type=int, default=defaults.probe_rows, help="distinct outputs held out to measure candidates"
    )
    parser.add_argument("--pilot-steps", type=int, default=defaults.pilot_steps, help="steps of each pilot fine-tune")
    parser.add_argument("--pilot-batch-size", type=int, default=defaults.pilot_batch_size)
    parser.add_argument(
        "--max-pilots", type=int, default=defaults.max_pilots, help="candidates pilot-fine-tuned at most"
    )
    parser.add_argument(
        "--no-likelihood", action="store_true", help="vocabulary statistics only: no pilot fine-tune (seconds)"
    )
    parser.add_argument("--no-pilot-decode", action="store_true", help="never decode, even where the probes disagree")


def recipe_options(args: argparse.Namespace) -> RecipeOptions:
    """The RecipeOptions of parsed `add_recipe_probe_arguments` arguments."""
    return RecipeOptions(
        probe_rows=args.probe_rows,
        pilot_steps=args.pilot_steps,
        pilot_batch_size=args.pilot_batch_size,
        max_pilots=args.max_pilots,
        likelihood=not args.no_likelihood,
        pilot_decode=not args.no_pilot_decode,
    )


def _print_choice(choice: RecipeChoice, as_json: bool) -> None:
    """The table of candidates and the choice: on stdout, or on stderr when stdout carries the JSON summary."""
    print(choice.table(), file=sys.stderr if as_json else sys.stdout, flush=True)


def _ft_recipe(args: argparse.Namespace) -> dict[str, Any]:
    corpus = read_texts(args.corpus, args.column, [args.prompt_column] if args.prompt_column else [])
    prompts = corpus.extras.get(args.prompt_column) if args.prompt_column else None
    base = EnrichConfig(budget=args.budget, min_count=args.min_count, seed=args.seed)
    choice = recipe_options(args).choose(
        corpus.texts,
        prompts,
        args.metric,
        args.quality_bound,
        model=args.model,
        base_config=base,
        stop=args.stop or ["\n"],
        max_new_tokens=args.max_new_tokens,
        teacher=args.teacher,
        seed=args.seed,
    )
    _print_choice(choice, args.json)
    return choice.to_dict()


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
    auto = ft.add_argument_group("--recipe auto (--model is then the original model; enriched here first)")
    add_recipe_goal_arguments(auto)
    auto.add_argument(
        "--enriched-out",
        default=None,
        help="where the chosen recipe's enriched model is saved (default <out>.enriched)",
    )
    auto.add_argument(
        "--teacher",
        default=None,
        help="a model that does the task: makes --distill a candidate (it labels the training prompts)",
    )


def add_finetune_recipe_arguments(ft: argparse._ActionsContainer) -> None:
    """The fine-tuning recipe's and the workers' arguments, shared by `finetune` and `ft-pipeline`;
    `finetune_options` reads them back."""
    ft.add_argument(
        "--recipe",
        choices=["given", "auto"],
        default="given",
        help="given: the model and flags as they are; auto: choose the enrichment recipe from the training rows "
        "(tasc-ray ft-recipe) and enrich with it first",
    )
    add_recipe_probe_arguments(ft)
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
    """FinetuneConfig's fields from parsed `add_finetune_recipe_arguments` arguments (and `--seed`, `--json`), and,
    with `--recipe auto`, the recipe choice's `RecipeOptions` under "recipe" (which `_finetune` and
    `PipelineConfig` take out before building a FinetuneConfig)."""
    recipe = {"recipe": recipe_options(args)} if args.recipe == "auto" else {}
    return recipe | dict(
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
    options = finetune_options(args)
    auto: RecipeOptions | None = options.pop("recipe", None)
    model, train, choice = args.model, args.train, None
    if auto is not None:
        if not is_free_directory(args.out):
            raise FinetuneError(f"output directory {args.out} exists and is not empty")
        choice, model, train = _auto_recipe(args, auto)
        if choice.chosen is None:
            return {"status": "no-op", "message": choice.message, "recipe": choice.to_dict(), "out": None}
    cfg = FinetuneConfig(
        model=model,
        train=train,
        out=args.out,
        prompt_column=args.prompt_column,
        output_column=args.output_column,
        storage_path=args.storage_path,
        name=args.name,
        **options,
    )
    summary = finetune(cfg)
    if choice is not None:
        summary |= {"status": "done", "recipe": choice.to_dict()}
    return summary


def _auto_recipe(args: argparse.Namespace, options: RecipeOptions) -> tuple[RecipeChoice, str, str]:
    """`finetune --recipe auto`: choose on the training rows, enrich the original model with the chosen recipe
    (and, for distill, label the training prompts with --teacher). Returns the choice, the model to fine-tune and
    its training data."""
    import pandas as pd

    from tasc_ray.ft.train import read_pairs

    rows = read_pairs(args.train, args.prompt_column, args.output_column)
    outputs, prompts = [r["output"] for r in rows], [r["prompt"] for r in rows]
    stop = args.stop or ["\n"]
    base = EnrichConfig(seed=args.seed)
    choice = options.choose(
        outputs,
        prompts,
        args.metric,
        args.quality_bound,
        model=args.model,
        base_config=base,
        stop=stop,
        max_new_tokens=args.max_new_tokens,
        teacher=args.teacher,
        distill=args.teacher is not None,
        seed=args.seed,
    )
    _print_choice(choice, args.json)
    if choice.chosen is None:
        return choice, args.model, args.train
    enriched = args.enriched_out or f"{Path(args.out).expanduser().resolve()}.enriched"
    config = choice.chosen.enrich_config(base)
    enrich_model(
        args.model,
        outputs,
        enriched,
        config,
        progress=not args.json,
        prompts=prompts if config.max_copied < 1 else None,
    )
    train = args.train
    if choice.chosen.distill:
        if args.teacher is None:
            raise RecipeError("the distill recipe needs --teacher")
        labeled = label_with_teacher(args.teacher, rows, stop, args.max_new_tokens)
        train = str(Path(enriched) / "train_distilled.parquet")
        pd.DataFrame(labeled).to_parquet(train)
    return choice, enriched, train


__all__ = ["register", "FinetuneError", "RecipeError", "VocabEnrichmentError"]
