"""`python -m benchmarks live`: live learning (the drafter's overlay of finished outputs) against offline indexes.

For each task the simulator (no model) replays `--warmup` outputs of the disjoint corpus split and then the task's
`--n` held-out references, in lockstep batches of `--batch-size`, each output joining the overlay as it ends; only
the held-out rows are scored. Drafters, all on the same replay: the prompt's own n-grams only; the live overlay
with no index; an offline index of the same warm-up outputs; the offline index of the whole corpus split (what
`bench spec` uses); that index with the overlay on top. The headline is tokens per forward pass.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common.report import provenance, write_report
from benchmarks.common.tasks import BUILTIN_TASKS, load_task
from tasc_ray.cli.args import add_model_argument
from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.index import DEFAULT_MAX_ORDER, NgramIndex
from tasc_ray.engine.simulate import simulate_acceptance
from tasc_ray.models import load_tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "live",
        help="live learning vs offline indexes (simulator, no model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--task", action="append", default=None, help="built-in task (repeatable; default: all)")
    p.add_argument("--n", type=int, default=50, help="held-out references scored per task")
    p.add_argument("--warmup", type=int, default=200, help="corpus outputs replayed (and learned) before them")
    p.add_argument("--live-outputs", type=int, default=1000, help="the overlay's capacity")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-order", type=int, default=DEFAULT_MAX_ORDER)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default="benchmarks/results/live_sim.json", metavar="FILE")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = load_tokenizer(args.model)
    report: dict[str, Any] = {
        **provenance("live"),
        "config": {k: v for k, v in vars(args).items() if k != "handler"},
        "tasks": {},
    }
    for name in args.task or list(BUILTIN_TASKS):
        task = load_task(name, args.n, args.seed, None)

        def encode(texts: list[str], special: bool = False) -> list[list[int]]:
            return [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]

        seqs = encode(task.corpus[: args.warmup]) + encode(task.references)
        prompts = encode(task.corpus_prompts[: args.warmup], True) + encode(task.prompts, True)
        warm_index = NgramIndex.from_texts(task.corpus[: args.warmup], tokenizer, args.max_order)
        full_index = NgramIndex.from_texts(task.corpus, tokenizer, args.max_order)
        live = {"live_outputs": args.live_outputs}
        drafters = {
            "context only": (None, DrafterConfig(mode=DraftMode.CONTEXT, live_outputs=0)),
            "live overlay, no index": (None, DrafterConfig(**live)),
            f"offline index of the {args.warmup} warm-up outputs": (warm_index, DrafterConfig(live_outputs=0)),
            f"offline index of the corpus ({len(task.corpus)} outputs)": (full_index, DrafterConfig(live_outputs=0)),
            "offline index of the corpus + live overlay": (full_index, DrafterConfig(**live)),
        }
        rows = {}
        for label, (index, config) in drafters.items():
            sim = simulate_acceptance(index, seqs, config, prompts, args.batch_size, score_from=args.warmup)
            rows[label] = {k: sim[k] for k in ("tokens_per_pass", "acceptance_rate", "drafted", "sequences")}
        report["tasks"][name] = rows
    body = ["| task | drafter | tokens/pass | acceptance | drafted |", "|---|---|---|---|---|"]
    for name, rows in report["tasks"].items():
        for label, r in rows.items():
            body.append(
                f"| {name} | {label} | {r['tokens_per_pass']:.3f} | {r['acceptance_rate']:.2f} | {r['drafted']} |"
            )
    title = "Live learning against offline indexes (simulator, held-out rows after the warm-up)"
    report["files"] = write_report(report, args.json_path, title, "\n".join(body) + "\n")
    return report
