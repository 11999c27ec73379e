"""Core CLI commands: `models prepare`, `build-index` (in-process) and `generate`."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from tasc_ray.cli.args import (
    add_engine_arguments,
    add_model_argument,
    add_sampling_arguments,
    engine_config,
    sampling_params,
)
from tasc_ray.cli.main import add_command
from tasc_ray.engine.drafts.index import DEFAULT_MAX_ORDER, DEFAULT_TOP_K, NgramIndex
from tasc_ray.engine.load import load_engine
from tasc_ray.io import read_texts, storage_options_for
from tasc_ray.models import load_tokenizer, resolve_model

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    models = add_command(
        subparsers,
        "models",
        _models,
        "prepare a model: convert the embedded GGUF once to a cached Hugging Face directory",
    )
    models.add_argument("action", choices=["prepare"], help="what to do")
    models.add_argument("name", nargs="?", default="smollm2-135m", help="model name or directory")

    build = add_command(
        subparsers,
        "build-index",
        _build_index,
        "build an n-gram index in-process from a corpus of outputs (parquet, jsonl, csv or text; local or s3://)",
    )
    build.add_argument(
        "--input",
        required=True,
        action="append",
        help="corpus: .parquet, .jsonl, .csv or text (one output a line) file, directory, glob or s3:// (repeatable)",
    )
    build.add_argument("--column", default="output", help="column (parquet, csv) or field (jsonl) holding the outputs")
    add_model_argument(build)
    build.add_argument("--out", required=True, help="index directory or s3:// prefix")
    build.add_argument("--max-order", type=int, default=DEFAULT_MAX_ORDER, help="n-gram order N (contexts 1..N-1)")
    build.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="continuations kept per context")
    build.add_argument("--min-count", type=int, default=1, help="drop continuations seen fewer times")
    build.add_argument(
        "--no-suffix", action="store_true", help="do not keep the corpus's tokens (for matches longer than the orders)"
    )

    gen = add_command(subparsers, "generate", _generate, "generate from a prompt or chat messages with TASC-spec")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a plain-text prompt (completion)")
    source.add_argument("--messages", help='chat messages as JSON: [{"role": "user", "content": "..."}]')
    add_model_argument(gen)
    add_engine_arguments(gen)
    gen.add_argument("--no-spec", action="store_true", help="plain decoding (no drafts), same code path")
    add_sampling_arguments(gen)


def _models(args: argparse.Namespace) -> dict[str, Any]:
    path = resolve_model(args.name)
    logger.info("model %s is ready at %s", args.name, path)
    return {"model": args.name, "path": path}


def _build_index(args: argparse.Namespace) -> dict[str, Any]:
    corpus = read_texts(args.input, args.column)
    tokenizer = load_tokenizer(args.model)
    t0 = time.perf_counter()
    index = NgramIndex.from_texts(
        corpus.texts, tokenizer, args.max_order, args.top_k, args.min_count, suffix=not args.no_suffix
    )
    index.save(args.out, storage_options_for(args.out))
    elapsed = time.perf_counter() - t0
    logger.info(
        "indexed %d outputs (%d tokens, %d skipped) in %.1f s -> %s",
        len(corpus.texts),
        index.n_tokens,
        corpus.skipped,
        elapsed,
        args.out,
    )
    return {
        "out": args.out,
        "rows": len(corpus.texts),
        "skipped_rows": corpus.skipped,
        "seconds": elapsed,
        **index.stats(),
    }


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    if args.messages is not None:
        try:
            prompt = json.loads(args.messages)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--messages is not valid JSON: {exc}") from exc
        if not isinstance(prompt, list) or not all(isinstance(m, dict) and "content" in m for m in prompt):
            raise ValueError('--messages must be a JSON list of {"role": ..., "content": ...} objects')
    else:
        prompt = args.prompt
    generator = load_engine(engine_config(args))
    t0 = time.perf_counter()
    result = generator.generate([prompt], sampling_params(args, speculative=not args.no_spec))[0]
    elapsed = time.perf_counter() - t0
    if not args.json:
        print(result.text)
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "seconds": elapsed,
        "tokens_per_s": result.new_tokens / elapsed,
        "speculative": not args.no_spec,
        **result.stats.to_dict(),
    }
