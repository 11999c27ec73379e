"""`python -m benchmarks ft-vocab`: what each enrichment setting does to the vocabulary, with no training (seconds).

For the task of `bench ft` (an E2E preset or --train/--eval files, the same rows), each variant
(`--variant NAME:key=value,key=value`, keys of `EnrichConfig`; the defaults below when none is given) enriches
the original tokenizer on the training outputs, and the harness reports: new tokens, their mean length in original
tokens, the share of them that carry a value copied from the prompt (`CopiedValues`, share > 0.5), and the tokens
per reference on every evaluation split with the reduction against the original vocabulary. It tells which
settings can still meet a compression target before any fine-tuning is paid for.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common.report import provenance, write_report

DEFAULT_VARIANTS = (
    "default:",
    "min_count_10:min_count=10",
    "budget_50:budget=50",
    "copied_out:max_copied=0.5",
    "copied_out_min_count_10:max_copied=0.5,min_count=10",
)


def register(subparsers: argparse._SubParsersAction, add_task_arguments: Any) -> None:
    p = subparsers.add_parser(
        "ft-vocab",
        help="TASC-ft enrichment settings compared on compression alone (no training)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME:KEY=VALUE,...",
        help=f"an enrichment setting (EnrichConfig keys); repeatable; default {', '.join(DEFAULT_VARIANTS)}",
    )
    p.add_argument("--budget", type=int, default=500)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--no-cross", action="append", default=[], metavar="SEP")
    p.add_argument("--key-end", action="append", default=[], metavar="END")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """`NAME:key=value,...` -> (NAME, {key: value}) with ints, floats and bools parsed; unknown keys refused."""
    from dataclasses import fields

    from tasc_ray.ft.enrich import EnrichConfig

    name, _, rest = spec.partition(":")
    known = {f.name: f.type for f in fields(EnrichConfig)}
    settings: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in known:
            raise ValueError(f"variant {name!r}: unknown setting {key!r}; EnrichConfig has {', '.join(known)}")
        for cast in (int, float):
            try:
                settings[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            settings[key] = {"true": True, "false": False}.get(value.lower(), value)
    if not name:
        raise ValueError(f"variant {spec!r} has no name (NAME:key=value,...)")
    return name, settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ft import load_task
    from tasc_ray.ft.enrich import CopiedValues, EnrichConfig, count_tokens, enrich_tokenizer
    from tasc_ray.models import load_tokenizer

    header = provenance("ft-vocab")
    task = load_task(args)
    base = load_tokenizer(args.model)
    outputs, prompts = [r["output"] for r in task.train], [r["prompt"] for r in task.train]
    copied = CopiedValues(outputs, prompts)
    refs = {split: [r for h in held for r in h["refs"]] for split, held in task.splits.items()}
    before = {split: count_tokens(base, texts) / len(texts) for split, texts in refs.items()}
    common = {
        "budget": args.budget,
        "min_count": args.min_count,
        "no_cross": tuple(args.no_cross),
        "key_end": tuple(args.key_end),
        "holdout": 0.0,
    }
    variants = []
    for spec in args.variant or DEFAULT_VARIANTS:
        name, settings = parse_variant(spec)
        t0 = time.perf_counter()
        result = enrich_tokenizer(base, outputs, EnrichConfig(**(common | settings)), progress=False, prompts=prompts)
        tokens = result.new_tokens
        entry: dict[str, Any] = {
            "name": name,
            "settings": settings,
            "new_tokens": len(tokens),
            "mean_original_tokens_per_new_token": statistics.mean(len(t.base_ids) for t in tokens) if tokens else 0,
            "copied_value_share": sum(copied.share(t.token) > 0.5 for t in tokens) / max(1, len(tokens)),
            "stop_reason": result.stop_reason,
            "seconds": time.perf_counter() - t0,
            "first_tokens": [t.token for t in tokens[:15]],
        }
        for split, texts in refs.items():
            after = count_tokens(result.tokenizer, texts) / len(texts)
            entry[split] = {"tokens_per_reference": after, "reduction": 1 - after / before[split]}
        variants.append(entry)
    report = {
        "benchmark": "ft-vocab",
        "task": task.name,
        **header,
        "model": args.model,
        "train_rows": len(task.train),
        "references": {s: len(t) for s, t in refs.items()},
        "tokens_per_reference_original": before,
        "common_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in common.items()},
        "variants": variants,
    }
    stem = Path(args.out_dir) / f"ft_vocab_{task.name}_{args.tag}"
    write_report(
        report, stem.with_suffix(".json"), f"TASC-ft vocabularies on {task.name} ({args.model})", markdown(report)
    )
    return report


def markdown(r: dict[str, Any]) -> str:
    splits = list(r["references"])
    lines = [
        f"{r['train_rows']} training outputs; references: "
        + ", ".join(f"{n} `{s}`" for s, n in r["references"].items())
        + f". Common settings: {r['common_settings']}. Original vocabulary: "
        + ", ".join(f"{r['tokens_per_reference_original'][s]:.2f} tokens per `{s}` reference" for s in splits)
        + ".",
        "",
        "| variant | settings | new tokens | original tokens per new token | copied-value tokens | "
        + " | ".join(f"reduction `{s}`" for s in splits)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(splits),
    ]
    for v in r["variants"]:
        settings = ", ".join(f"{k}={val}" for k, val in v["settings"].items()) or "-"
        lines.append(
            f"| {v['name']} | {settings} | {v['new_tokens']} | {v['mean_original_tokens_per_new_token']:.2f} | "
            f"{100 * v['copied_value_share']:.0f}% | "
            + " | ".join(f"{100 * v[s]['reduction']:.1f}%" for s in splits)
            + " |"
        )
    lines.append("")
    for v in r["variants"]:
        lines.append(f"- {v['name']}: " + ", ".join(f"`{t}`" for t in v["first_tokens"]))
    lines.append("")
    return "\n".join(lines)
