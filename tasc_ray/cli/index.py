"""CLI commands for corpus indexing: `index` (Ray Data job), `index-stats` and `simulate` (offline acceptance).

Inputs are parquet, jsonl, csv or text files (one output a line), directories or globs, local or s3://
(`tasc_ray.io`).

`jobs/index_corpus.py` reuses `add_index_arguments` and `run_index`, so the job script and `tasc-ray index`
take the same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

import numpy as np

from tasc_ray.cli.args import add_config_arguments, config_from_args
from tasc_ray.cli.main import add_command
from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.index import DEFAULT_MAX_ORDER, DEFAULT_TOP_K, MANIFEST, NgramIndex, read_manifest
from tasc_ray.engine.simulate import simulate_acceptance
from tasc_ray.io import fsspec_filesystem, read_texts, storage_options_for
from tasc_ray.models import DEFAULT_MODEL, load_tokenizer
from tasc_ray.stages.index_job import DEFAULT_BATCH_SIZE, index_corpus, index_truncation
from tasc_ray.stages.runtime import ensure_ray

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    index = add_command(
        subparsers,
        "index",
        _index,
        "index a corpus of outputs (parquet, jsonl, csv or text; local or s3://) with a Ray Data job",
        "Tokenise and count the n-grams of one text column of the input files on Ray Data (a local "
        "Ray, or the cluster at RAY_ADDRESS), keep the top-K continuations per context and write "
        "the index (manifest last).",
    )
    add_index_arguments(index)

    stats = add_command(
        subparsers,
        "index-stats",
        _index_stats,
        "statistics of an index: corpus, contexts per order, size, collision entropy H2",
    )
    stats.add_argument("index", help="index directory or s3:// prefix")
    stats.add_argument(
        "--storage-options", type=_json_dict, default=None, help="fsspec options as JSON (e.g. endpoint_url) for s3://"
    )

    sim = add_command(
        subparsers,
        "simulate",
        _simulate,
        "offline acceptance: replay held-out outputs through the Drafter, teacher-forced, no model",
    )
    sim.add_argument("--index", required=False, help="index directory or s3:// prefix (not needed in context mode)")
    sim.add_argument(
        "--input",
        required=True,
        action="append",
        help="held-out outputs (parquet, jsonl, csv): file, directory, glob or s3:// (repeatable)",
    )
    sim.add_argument("--column", default="reference", help="column with the true outputs")
    sim.add_argument("--prompt-column", default=None, help="optional column of prompts that seed each row")
    sim.add_argument(
        "--tokenizer",
        "--model",
        dest="tokenizer",
        default=DEFAULT_MODEL,
        help=f"{DEFAULT_MODEL!r} or a Hugging Face model/tokenizer directory (the index's tokenizer)",
    )
    sim.add_argument("--limit", type=int, default=None, help="simulate only the first N rows")
    add_config_arguments(sim, DrafterConfig)
    sim.add_argument("--storage-options", type=_json_dict, default=None, help="fsspec options as JSON for s3://")


def _json_dict(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tasc-ray index` and `jobs/index_corpus.py`."""
    parser.add_argument(
        "--input",
        required=True,
        action="append",
        help="parquet, jsonl, csv or text (one output a line) file, directory, glob, or s3:// path/prefix/glob "
        "(repeatable)",
    )
    parser.add_argument("--column", default="output", help="the column (or jsonl field) holding the outputs")
    parser.add_argument(
        "--tokenizer",
        "--model",
        dest="tokenizer",
        default=DEFAULT_MODEL,
        help=f"{DEFAULT_MODEL!r} (embedded SmolLM2-135M-Instruct) or a Hugging Face directory",
    )
    parser.add_argument("--out", required=True, help="index directory or s3:// prefix")
    parser.add_argument("--max-order", type=int, default=DEFAULT_MAX_ORDER, help="n-gram order N (contexts 1..N-1)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="continuations kept per context")
    parser.add_argument("--min-count", type=int, default=1, help="drop continuations seen fewer times")
    parser.add_argument(
        "--no-suffix",
        action="store_true",
        help="do not keep the corpus's tokens (the token store for matches longer than the orders; ~8 bytes a token "
        "in memory)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="tokenise/count actors (Ray Data actor pool)")
    parser.add_argument(
        "--num-reducers", type=int, default=None, help="hash partitions of the count shuffle (default: --num-workers)"
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="logical CPUs per count actor (default: 0.5, less on a small cluster)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per map batch")
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="CPUs of the local Ray this command starts (ignored with RAY_ADDRESS)",
    )
    parser.add_argument("--append-to", default=None, help="existing index to add the new outputs to (may equal --out)")
    parser.add_argument(
        "--storage-options",
        type=_json_dict,
        default=None,
        help='fsspec/s3fs options as JSON (e.g. {"endpoint_url": ...}); default: AWS_* env',
    )


def run_index(args: argparse.Namespace) -> dict[str, Any]:
    """Run the indexing job for parsed `add_index_arguments` arguments; returns the summary."""
    import ray

    tokenizer = load_tokenizer(args.tokenizer)
    started = ensure_ray(args.num_cpus)
    try:
        return index_corpus(
            args.input,
            args.out,
            tokenizer,
            column=args.column,
            max_order=args.max_order,
            top_k=args.top_k,
            min_count=args.min_count,
            num_workers=args.num_workers,
            append_to=args.append_to,
            storage_options=args.storage_options,
            num_reducers=args.num_reducers,
            batch_size=args.batch_size,
            cpus_per_worker=args.cpus_per_worker,
            suffix=not args.no_suffix,
        )
    finally:
        if started:
            ray.shutdown()


def _index(args: argparse.Namespace) -> dict[str, Any]:
    summary = run_index(args)
    if not args.json:
        print(
            f"indexed {summary['sequences']} outputs ({summary['tokens']} tokens, {summary['skipped_rows']} rows "
            f"skipped) in {summary['seconds']:.1f} s -> {summary['out']}"
        )
    return summary


# ----- index-stats -----


def collision_entropy(counts: np.ndarray) -> float:
    """Collision (2-Renyi) entropy in bits, H2 = -log2(sum_x p(x)^2), of a distribution given by counts."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts / total
    return float(-math.log2(float((p * p).sum())))


def index_stats(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Corpus size, contexts and continuations per order, size on disk and in memory, and H2 of the output tokens.

    The unigram distribution is derived from the order-1 context totals: each distinct token that was followed
    by another token is one order-1 context, and its total counts those occurrences. That is every corpus token
    except each output's last one (and, with min_count > 1, tokens whose every continuation was dropped)."""
    opts = storage_options_for(path, storage_options)
    manifest = read_manifest(path, opts)
    index = NgramIndex.load(path, opts)
    fs, root = fsspec_filesystem(path, storage_options)
    disk = sum(int(info["bytes"]) for info in manifest["files"].values())
    try:
        disk += int(fs.size(f"{root}/{MANIFEST}"))
    except (OSError, FileNotFoundError):
        pass
    stats = index.stats()
    truncated = index_truncation(index)
    orders = {}
    for m, t in index.tables.items():
        contexts, continuations = int(len(t.hashes)), int(len(t.next_tokens))
        orders[m] = {
            "contexts": contexts,
            "continuations": continuations,
            "continuations_per_context": continuations / contexts if contexts else 0.0,
            "truncated_contexts": truncated[m],
            "memory_bytes": t.nbytes,
            "file_bytes": next((int(i["bytes"]) for i in manifest["files"].values() if i.get("order") == m), 0),
        }
    unigram = index.tables[1].totals if 1 in index.tables else np.zeros(0, np.int64)
    contexts_total = sum(o["contexts"] for o in orders.values())
    return {
        "index": path,
        "tokenizer": stats["tokenizer"],
        "fingerprint": stats["fingerprint"],
        "vocab_size": stats["vocab_size"],
        "max_order": index.max_order,
        "top_k": index.top_k,
        "min_count": index.min_count,
        "corpus_sequences": index.n_sequences,
        "corpus_tokens": index.n_tokens,
        "tokens_per_sequence": index.n_tokens / index.n_sequences if index.n_sequences else 0.0,
        "orders": orders,
        "suffix_tokens": stats["suffix_tokens"],
        "contexts": contexts_total,
        "disk_bytes": disk,
        "memory_bytes": index.nbytes,
        "memory_bytes_per_million_contexts": index.nbytes / contexts_total * 1e6 if contexts_total else 0.0,
        "distinct_tokens": int(len(unigram)),
        "h2_bits": collision_entropy(unigram),
        "h2_source": "order-1 context totals (every corpus token except each output's last)",
        "exact_for_append": not any(truncated.values()),
        "created_at": manifest.get("created_at"),
    }


def _index_stats(args: argparse.Namespace) -> dict[str, Any]:
    stats = index_stats(args.index, args.storage_options)
    if not args.json:
        print(
            f"index {stats['index']}: {stats['corpus_sequences']} outputs, {stats['corpus_tokens']} tokens, "
            f"tokenizer {stats['tokenizer']}"
        )
        for m, o in stats["orders"].items():
            print(
                f"  order {m}: {o['contexts']} contexts, {o['continuations']} continuations, "
                f"{o['truncated_contexts']} truncated"
            )
        print(
            f"  {stats['disk_bytes'] / 1e6:.2f} MB on disk, {stats['memory_bytes'] / 1e6:.2f} MB in memory; "
            f"H2 = {stats['h2_bits']:.3f} bits over {stats['distinct_tokens']} distinct tokens"
        )
    return stats


# ----- simulate -----


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    config = config_from_args(DrafterConfig, args)
    if args.index is None and config.mode != DraftMode.CONTEXT:
        raise ValueError(f"--mode {config.mode.value} needs --index")
    tokenizer = load_tokenizer(args.tokenizer)
    index = None
    if args.index is not None:
        index = NgramIndex.load(args.index, storage_options_for(args.index, args.storage_options))
        index.check_tokenizer(tokenizer)
    extra = [args.prompt_column] if args.prompt_column else []
    corpus = read_texts(args.input, args.column, extra, args.storage_options)
    texts = corpus.texts
    prompts_text = corpus.extras.get(args.prompt_column) if args.prompt_column else None
    if args.limit is not None:
        texts = texts[: args.limit]
        prompts_text = prompts_text[: args.limit] if prompts_text is not None else None
    sequences = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompts = None
    if prompts_text is not None:
        prompts = tokenizer([p if isinstance(p, str) else "" for p in prompts_text], add_special_tokens=False)[
            "input_ids"
        ]
    result = simulate_acceptance(index, sequences, config, prompts)
    result.update(
        index=args.index,
        input=args.input,
        column=args.column,
        skipped_rows=corpus.skipped,
    )
    if not args.json:
        print(
            f"{result['sequences']} outputs, {result['tokens']} tokens: {result['tokens_per_pass']:.3f} tokens per "
            f"forward pass (acceptance {result['acceptance_rate']:.2%} of {result['drafted']} drafted tokens)"
        )
    return result


__all__ = ["add_index_arguments", "collision_entropy", "index_stats", "register", "run_index"]
