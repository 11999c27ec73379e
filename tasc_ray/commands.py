"""Core CLI commands: `models prepare`, `build-index` (in-process) and `generate`."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from tasc_ray.cli import add_command, add_model_argument
from tasc_ray.corpus import read_texts
from tasc_ray.drafter import DEFAULT_LAMBDA, DEFAULT_MAX_DRAFT, DEFAULT_MIN_PATH_PROB, DraftMode
from tasc_ray.engine import EngineConfig, load_engine
from tasc_ray.generator import SamplingParams
from tasc_ray.models import load_tokenizer, resolve_model
from tasc_ray.ngram_index import DEFAULT_MAX_ORDER, DEFAULT_TOP_K, NgramIndex

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    models = add_command(subparsers, "models", _models,
                         "prepare a model: convert the embedded GGUF once to a cached Hugging Face directory")
    models.add_argument("action", choices=["prepare"], help="what to do")
    models.add_argument("name", nargs="?", default="smollm2-135m", help="model name or directory")

    build = add_command(subparsers, "build-index", _build_index,
                        "build an n-gram index in-process from a corpus of outputs (parquet, jsonl or text)")
    build.add_argument("--input", required=True, help="corpus file: .parquet, .jsonl, or text (one output a line)")
    build.add_argument("--column", default="output", help="column (parquet) or field (jsonl) holding the outputs")
    add_model_argument(build)
    build.add_argument("--out", required=True, help="index directory or s3:// prefix")
    build.add_argument("--max-order", type=int, default=DEFAULT_MAX_ORDER, help="n-gram order N (contexts 1..N-1)")
    build.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="continuations kept per context")
    build.add_argument("--min-count", type=int, default=1, help="drop continuations seen fewer times")

    gen = add_command(subparsers, "generate", _generate, "generate from a prompt or chat messages with TASC-spec")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a plain-text prompt (completion)")
    source.add_argument("--messages", help='chat messages as JSON: [{"role": "user", "content": "..."}]')
    add_model_argument(gen)
    add_engine_arguments(gen)
    gen.add_argument("--no-spec", action="store_true", help="plain decoding (no drafts), same code path")
    add_sampling_arguments(gen)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="n-gram index directory or s3:// prefix (without: prompt lookup only)")
    parser.add_argument("--mode", choices=[m.value for m in DraftMode], default=DraftMode.MIXED.value,
                        help="draft from the row's context, the corpus index, or both mixed")
    parser.add_argument("--lam", type=float, default=DEFAULT_LAMBDA, help="weight of the corpus distribution")
    parser.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT, help="most tokens drafted per step")
    parser.add_argument("--min-path-prob", type=float, default=DEFAULT_MIN_PATH_PROB,
                        help="stop drafting when the drafted path's estimated probability falls below this")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, index=args.index, dtype=args.dtype, device=args.device,
                        mode=DraftMode(args.mode), lam=args.lam, max_draft=args.max_draft,
                        min_path_prob=args.min_path_prob)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace, speculative: bool = True) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=list(args.stop), speculative=speculative)


def _models(args: argparse.Namespace) -> dict[str, Any]:
    path = resolve_model(args.name)
    logger.info("model %s is ready at %s", args.name, path)
    return {"model": args.name, "path": path}


def _build_index(args: argparse.Namespace) -> dict[str, Any]:
    corpus = read_texts(args.input, args.column)
    tokenizer = load_tokenizer(args.model)
    t0 = time.perf_counter()
    index = NgramIndex.from_texts(corpus.texts, tokenizer, args.max_order, args.top_k, args.min_count)
    index.save(args.out)
    elapsed = time.perf_counter() - t0
    logger.info("indexed %d outputs (%d tokens, %d skipped) in %.1f s -> %s",
                len(corpus.texts), index.n_tokens, corpus.skipped, elapsed, args.out)
    return {"out": args.out, "rows": len(corpus.texts), "skipped_rows": corpus.skipped, "seconds": elapsed,
            **index.stats()}


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
    return {"text": result.text, "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "new_tokens": result.new_tokens, "seconds": elapsed, "tokens_per_s": result.new_tokens / elapsed,
            "speculative": not args.no_spec, **result.stats.to_dict()}
