"""`python -m benchmarks ft-recipe-auto`: validate `choose_recipe` (tasc_ray/ft/recipe.py) on real tasks.

For each task (E2E text -> MR, E2E MR -> text, WikiSQL question -> SQL) and seed, the harness loads the task as
`bench ft` does (its rows drawn with the seed), lets `choose_recipe` pick a recipe from the training outputs and
prompts (the task's metric, `--bound`), then runs `bench ft` with that recipe: the original vocabulary and the
chosen one fine-tuned alike, both decoded on the held-out prompts, the quality delta with its 95% paired-bootstrap
interval, and the output tokens saved. A no-op choice (keep the original vocabulary) is recorded as such, with no
fine-tuning. The summary is written after every run (`<out>.json` / `.md`), so an interrupted validation keeps
what finished; `--deadline` (UTC, HH:MM) starts no run that could not finish before it, at the given estimate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common.report import provenance, write_report

logger = logging.getLogger(__name__)

TASKS = {  # name: (bench ft task flags, metric choose_recipe predicts, the bench ft metric it is read as)
    "text2mr": (["--direction", "text2mr"], "slot_f1"),
    "mr2text": (["--direction", "mr2text"], "bleu"),
    "wikisql": (["--train", "{wikisql}/train.parquet", "--eval", "{wikisql}/test.parquet"], "exact_match"),
}
WIKISQL_DIR = "benchmarks/cache/ft_data/wikisql"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ft-recipe-auto",
        help="validate tasc-ray ft-recipe: the chosen recipe fine-tuned and evaluated against the original "
        "vocabulary, per task and seed",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tasks", default="text2mr,mr2text,wikisql")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--choose-once",
        action="store_true",
        help="choose each task's recipe once, on the rows of the first seed, and vary only the fine-tuning seed "
        "(`bench ft --train-seed`) over --seeds; default: rows, choice and fine-tuning all follow each seed",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bound", type=float, default=1.0, help="quality bound of the choice (metric points)")
    p.add_argument("--train-rows", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=48)
    p.add_argument("--splits", default="heldout,test", help="evaluation splits kept (E2E presets)")
    p.add_argument("--probe-rows", type=int, default=32)
    p.add_argument("--pilot-steps", type=int, default=24)
    p.add_argument("--pilot-batch-size", type=int, default=8)
    p.add_argument("--max-pilots", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--trainer", choices=["ray", "local"], default="local")
    p.add_argument("--deadline", default=None, help="UTC HH:MM after which no run starts that would end later")
    p.add_argument("--run-estimate-min", type=float, default=8.0, help="minutes one run is assumed to take")
    p.add_argument("--work-dir", default="benchmarks/cache/ft_recipe_auto")
    p.add_argument("--out", default="benchmarks/results/ft_recipe_auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def bench_args(args: argparse.Namespace, task: str, seed: int, flags: list[str], tag: str) -> argparse.Namespace:
    """The `bench ft` arguments of one run: the task, the chosen recipe's flags, this harness's sizes."""
    from benchmarks.ft import add_run_arguments, add_task_arguments

    parser = argparse.ArgumentParser()
    add_task_arguments(parser)
    add_run_arguments(parser)
    task_flags = [f.format(wikisql=WIKISQL_DIR) for f in TASKS[task][0]]
    argv = [
        *task_flags,
        "--model", args.model, "--train-rows", str(args.train_rows), "--eval-rows", str(args.eval_rows),
        "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--full",
        "--lr", "1e-4", "--max-new-tokens", str(args.max_new_tokens), "--gen-batch-size", str(args.gen_batch_size),
        "--trainer", args.trainer, "--tag", tag, "--work-dir", args.work_dir, "--out-dir", args.work_dir,
        *flags,
    ]  # fmt: skip
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    return parser.parse_args(argv)


def one_run(
    args: argparse.Namespace, task_name: str, seed: int, chosen: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Choose a recipe on the task's training rows (or take `chosen`, an earlier run's entry, with --choose-once),
    then fine-tune and evaluate it as `bench ft` does."""
    import pandas as pd

    from benchmarks import ft
    from tasc_ray.ft.recipe import PilotSettings, choose_recipe
    from tasc_ray.models import load_tokenizer

    t0 = time.perf_counter()
    metric = TASKS[task_name][1]
    tag = f"recipe_auto_s{seed}"
    row_seed = int(args.seeds.split(",")[0]) if args.choose_once else seed
    seed_flags = ["--train-seed", str(seed)] if args.choose_once else []
    bargs = bench_args(args, task_name, row_seed, seed_flags, tag)
    task = ft.load_task(bargs)
    keep = set(args.splits.split(","))
    task.splits = {k: v for k, v in task.splits.items() if k in keep} or task.splits
    outputs, prompts = [r["output"] for r in task.train], [r["prompt"] for r in task.train]
    pilot = PilotSettings(
        steps=args.pilot_steps,
        batch_size=args.pilot_batch_size,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(task.stop),
        seed=seed,
    )
    entry: dict[str, Any] = {"task": task_name, "seed": seed, "row_seed": row_seed, "metric": metric}
    if chosen is not None:
        entry |= {"choice": chosen["choice"], "choice_from_seed": chosen["seed"]}
    else:
        choice = choose_recipe(
            outputs, prompts, metric, args.bound, model=args.model, probe_rows=args.probe_rows, pilot=pilot,
            max_pilots=args.max_pilots, seed=row_seed,
        )  # fmt: skip
        entry |= {"choice": choice.to_dict(), "choice_table": choice.table()}
        entry["choice_seconds"] = round(choice.seconds, 1)
        logger.info("%s seed %d: %s\n%s", task_name, seed, choice.message, choice.table())
    flags = entry["choice"]["flags"]
    if entry["choice"]["chosen"] is None:
        probed = [c for c in entry["choice"]["candidates"] if c["predicted_delta"] is not None]
        probed.sort(key=lambda c: -c["vocab"]["heldout_reduction"])
        if not probed:
            entry.update(status="no-op", seconds=round(time.perf_counter() - t0, 1))
            return entry
        entry["counterfactual"] = {"name": probed[0]["name"], "predicted_delta": probed[0]["predicted_delta"]}
        flags = probed[0]["flags"]
    bargs = bench_args(args, task_name, row_seed, [*flags, *seed_flags], tag)
    ft._check_args(bargs)
    header = provenance("ft")
    work = Path(bargs.work_dir) / f"{task.name}_{tag}_{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(task.train).to_parquet(work / "train.parquet")
    report, compression = ft.enrich_and_measure(bargs, work, outputs, task.splits, prompts)
    runs = ft.train_and_decode(bargs, work, task, base_vocab=len(load_tokenizer(args.model)))
    result = ft.build_result(bargs, header, task, compression, runs, work, t0)
    result["added_tokens_head"] = [t["token"] for t in report["new_tokens"][:40]]
    ft.finalize(result)
    splits = {}
    for split, cmp in result["comparisons"].items():
        plain = cmp["enriched+plain"]
        splits[split] = {
            "reference_token_reduction": compression[split]["reduction_enriched"],
            "generated_token_reduction": plain["token_reduction"],
            "speedup_plain": plain["speedup"],
            "original": runs["original"]["decode"][split]["plain"].get(metric),
            "tasc_ft": runs["enriched"]["decode"][split]["plain"].get(metric),
            "delta": plain.get(f"{metric}_delta"),
            "delta_ci95": plain.get(f"{metric}_delta_ci95"),
        }
    entry.update(
        status="no-op, counterfactual run" if "counterfactual" in entry else "done",
        new_tokens=compression["new_tokens"],
        splits=splits,
        train={k: v["train"] for k, v in runs.items()},
        work_dir=str(work),
        seconds=round(time.perf_counter() - t0, 1),
    )
    return entry


def _deadline(spec: str | None) -> dt.datetime | None:
    if not spec:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    hour, minute = (int(x) for x in spec.split(":"))
    return now.replace(hour=hour, minute=minute, second=0, microsecond=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    header = provenance("ft-recipe-auto")
    if "wikisql" in args.tasks and not (Path(WIKISQL_DIR) / "train.parquet").is_file():
        from benchmarks.common.ft_tasks import write_task_files

        write_task_files("wikisql", WIKISQL_DIR, 2000, 500, 0)
    deadline = _deadline(args.deadline)
    report: dict[str, Any] = {"benchmark": "ft-recipe-auto", **header, "settings": vars(args) | {"handler": None}}
    report["runs"], report["not_run"] = [], []
    seeds = [int(s) for s in args.seeds.split(",")]
    plan = [(seed, task) for seed in seeds for task in args.tasks.split(",")]  # every task at seed 0 first
    for seed, task in plan:
        now = dt.datetime.now(dt.timezone.utc)
        if deadline and now + dt.timedelta(minutes=args.run_estimate_min) > deadline:
            report["not_run"].append({"task": task, "seed": seed, "why": f"deadline {args.deadline} UTC"})
            continue
        earlier = next((r for r in report["runs"] if r["task"] == task and "choice_table" in r), None)
        try:
            report["runs"].append(one_run(args, task, seed, earlier if args.choose_once else None))
        except Exception as exc:  # one failed run is recorded; the others still run
            logger.exception("%s seed %d failed", task, seed)
            report["runs"].append({"task": task, "seed": seed, "status": "failed", "error": repr(exc)})
        _write(report, args.out)
    _write(report, args.out)
    return report


def _write(report: dict[str, Any], out: str) -> None:
    report["machine"].pop("load_average_end", None)
    write_report(report, Path(out).with_suffix(".json"), "tasc-ray ft-recipe: the automatic choice, validated",
                 markdown(report))  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"Per task and seed: `choose_recipe` on {s['train_rows']} training rows (held-out probe rows "
        f"{s['probe_rows']}, pilot fine-tunes of {s['pilot_steps']} steps of batch {s['pilot_batch_size']}, at most "
        f"{s['max_pilots']} candidates piloted, bound {s['bound']:g} points), then `bench ft` with the chosen "
        f"recipe: both vocabularies fully fine-tuned alike ({s['epochs']} epoch(s), batch {s['batch_size']}, lr 1e-4"
        + (f", at most {s['max_steps']} steps" if s.get("max_steps") else "")
        + f"), {s['eval_rows']} prompts per evaluation split, greedy. Delta: TASC-ft minus the original vocabulary, "
        "both decoded plainly, in the task metric's points, with the 95% paired-bootstrap interval over the prompts.",
        "",
        "**Shrunk to fit about an hour of this shared 2-core CPU**, against the sizes of the committed TASC-ft results "
        "(docs/tasc_ft.md): "
        + (
            "the recipe chosen once per task, on the first seed's rows, and only the fine-tuning seed varied "
            "(`bench ft --train-seed`); "
            if s.get("choose_once")
            else ""
        )
        + f"{s['train_rows']} training rows (the results used 256-1024), {s['epochs']} epoch(s)"
        + f" ({s['train_rows'] // s['batch_size'] * s['epochs']} steps; they used 96-192), pilot fine-tunes of "
        f"{s['pilot_steps']} steps (`ft-recipe` default 24) on {s['probe_rows']} held-out probe rows (default 32), "
        f"at most {s['max_pilots']} candidates piloted (default 4), {s['eval_rows']} evaluation prompts per split "
        f"(they used 96-500), splits `{s['splits']}` (the E2E test set not decoded). At this size a single run's delta "
        "is noisy (see the intervals) and the fine-tuned models are far from trained: what is tested is whether the "
        "choice's prediction holds for a fine-tune of the pilot's length, not the recipes' quality at full size.",
        "",
        "| task | seed | chosen | new tokens | split | reference tokens saved | generated tokens saved | metric | "
        "original | TASC-ft | delta [95% interval] | within bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_ in r["runs"]:
        if run_["status"] == "no-op":
            lines.append(
                f"| {run_['task']} | {run_['seed']} | no-op | 0 | - | 0% | 0% | {run_['metric']} | - | - | 0 (kept) | "
                "yes |"
            )
            continue
        if "splits" not in run_:
            lines.append(f"| {run_['task']} | {run_['seed']} | failed: {run_.get('error', '')[:80]} |" + " |" * 9)
            continue
        for split, v in run_["splits"].items():
            lo, hi = v["delta_ci95"] or (float("nan"), float("nan"))
            within = v["delta"] is not None and v["delta"] >= -s["bound"]
            if "counterfactual" in run_:  # the choice was right if the rejected candidate does lose more
                name = f"no-op (counterfactual: {run_['counterfactual']['name']})"
                ok = "choice right: NO" if within else "choice right: yes"
            else:
                name, ok = run_["choice"]["chosen"], "yes" if within else "NO"
            lines.append(
                f"| {run_['task']} | {run_['seed']} | {name} | {run_['new_tokens']} | {split} | "
                f"{100 * v['reference_token_reduction']:.1f}% | {100 * v['generated_token_reduction']:.1f}% | "
                f"{run_['metric']} | {v['original']:.1f} | {v['tasc_ft']:.1f} | {v['delta']:+.1f} [{lo:+.1f}, "
                f"{hi:+.1f}] | {ok} |"
            )
    for nr in r["not_run"]:
        lines.append(f"| {nr['task']} | {nr['seed']} | not run ({nr['why']}) |" + " |" * 9)
    lines += ["", "## The choices", ""]
    for run_ in r["runs"]:
        if "choice_table" in run_:
            lines += [
                f"### {run_['task']}, seed {run_['seed']} (choice {run_['choice_seconds']:.0f} s, run "
                f"{run_['seconds'] / 60:.1f} min)",
                "",
                run_["choice_table"],
            ]
    return "\n".join(lines) + "\n"


def main_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
