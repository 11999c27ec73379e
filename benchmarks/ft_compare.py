"""`python -m benchmarks ft-compare DIR`: the `bench ft` results in a folder side by side (an ablation's table).

Each `ft_*.json` under DIR is one run. The table gives, per run: the settings in which it differs from the runs'
common recipe (enrichment and fine-tuning keys of the command), the new tokens, the reduction of the reference
tokens, both models' final training loss, and per evaluation split the TASC-ft model's speedup and its quality
against the original-vocabulary model fine-tuned alike (`<metric>_delta` in points, from the run's `comparisons`).
Where a run has them (`bench ft` and `ft-eval` results written since they record them), each delta comes with its
95% paired-bootstrap interval over the evaluation prompts. Runs that differ only in `train_seed` are one recipe
fine-tuned several times: below the table, each such group gets the mean of every delta and its range over the
seeds (the run-to-run noise the intervals leave out). It reads only what the runs recorded; it trains and decodes
nothing. Written to `DIR/README.md` (and `--json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean
from typing import Any

RECIPE_KEYS = (
    "train_rows",
    "budget",
    "min_count",
    "max_copied",
    "no_cross",
    "key_end",
    "epochs",
    "lr",
    "full",
    "lora_r",
    "new_token_lr_mult",
    "new_token_warmup_steps",
    "new_token_dropout",
    "new_token_align_steps",
    "untie_embeddings",
    "train_seed",
    "distill",
)
DEFAULTS = {  # keys older runs lack
    "max_copied": 1.0,
    "new_token_warmup_steps": 0,
    "new_token_dropout": 0.0,
    "new_token_align_steps": 0,
    "untie_embeddings": False,
    "train_seed": None,
    "distill": False,
    "key_end": [],
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ft-compare",
        help="bench ft results in a folder side by side (recipe differences, compression, quality deltas)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dir", help="a folder of bench ft results (ft_*.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def load_runs(folder: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(folder.glob("ft_*.json")):
        result = json.loads(path.read_text())
        if result.get("benchmark") == "ft" and "comparisons" in result:
            runs.append(result)
    if not runs:
        raise ValueError(f"{folder}: no bench ft results (ft_*.json) to compare")
    return runs


def recipe(result: dict[str, Any]) -> dict[str, Any]:
    config = result["config"]
    return {k: config.get(k, DEFAULTS.get(k)) for k in RECIPE_KEYS}


def rows(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the recipe settings every run shares, one row per run with the settings it differs in)."""
    recipes = [recipe(r) for r in runs]
    common = {k: v for k, v in recipes[0].items() if all(rec[k] == v for rec in recipes)}
    out = []
    for result, rec in zip(runs, recipes):
        metrics = result["metrics"]
        splits = {}
        for split, comparison in result["comparisons"].items():
            enriched = comparison["enriched+plain"]
            splits[split] = {
                "speedup": enriched["speedup"],
                "with_tasc_spec": comparison["enriched+tasc_spec"]["speedup"],
                **{m: enriched[f"{m}_delta"] for m in metrics if f"{m}_delta" in enriched},
                "ci95": {m: enriched[f"{m}_delta_ci95"] for m in metrics if f"{m}_delta_ci95" in enriched},
            }
        out.append(
            {
                "tag": result["config"]["tag"],
                "commit": (result.get("git_commit") or "")[:7],
                "differs": {k: v for k, v in rec.items() if k not in common},
                "new_tokens": result["compression"]["new_tokens"],
                "reduction": {s: result["compression"][s]["reduction_enriched"] for s in result["comparisons"]},
                "final_loss": {name: run["train"]["final_loss"] for name, run in result["runs"].items()},
                "splits": splits,
                "shared_cpu": result["machine"].get("cpu_was_shared", False),
                # the rows' seed too: runs grouped as seeds of one recipe train on the same rows
                "recipe_but_seed": {k: v for k, v in rec.items() if k != "train_seed"}
                | {"seed": result["config"].get("seed")},
                "eval_rows": result.get("eval_rows"),
            }
        )
    return common, out


def seed_groups(runs: list[dict[str, Any]], metrics: tuple[str, ...], splits: list[str]) -> list[dict[str, Any]]:
    """Runs with the same recipe and evaluation prompts but another fine-tuning seed: per group of two or more,
    each split's delta per metric as the mean over the seeds and its range."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        key = json.dumps([r["recipe_but_seed"], r["eval_rows"]], sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        deltas = {
            s: {m: [r["splits"][s][m] for r in members] for m in metrics if all(m in r["splits"][s] for r in members)}
            for s in splits
        }
        out.append(
            {
                "tags": [r["tag"] for r in members],
                "seeds": len(members),
                "splits": {
                    s: {m: {"mean": mean(v), "min": min(v), "max": max(v)} for m, v in per.items()}
                    for s, per in deltas.items()
                },
            }
        )
    return out


def _delta_cell(split: dict[str, Any], metric: str) -> str:
    if metric not in split:
        return "-"
    interval = split["ci95"].get(metric)
    return f"{split[metric]:+.1f}" + (f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "")


def markdown(
    common: dict[str, Any],
    runs: list[dict[str, Any]],
    metrics: tuple[str, ...],
    splits: list[str],
    groups: list[dict[str, Any]] | None = None,
) -> str:
    quality = [f"{s} {m}" for s in splits for m in metrics]
    head = ["run", "differs", "new tokens", *(f"{s} reduction" for s in splits), "final loss (orig / TASC-ft)"]
    head += [*(f"{s} speedup (+spec)" for s in splits), *quality]
    lines = [
        "# TASC-ft runs side by side",
        "",
        "Written by `python -m benchmarks ft-compare` from the `ft_*.json` results in this folder (each with its",
        "own command and commit). Quality columns: the TASC-ft model minus the original-vocabulary model fine-tuned",
        "with the same recipe, in points; speedup: its plain decoding against the original model's, in the same run.",
        "",
        "Common recipe: " + ", ".join(f"`{k}={v}`" for k, v in common.items()),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in runs:
        differs = ", ".join(f"`{k}={v}`" for k, v in r["differs"].items()) or "-"
        cells = [f"{r['tag']} ({r['commit']})" + (" *" if r["shared_cpu"] else ""), differs, str(r["new_tokens"])]
        cells += [f"{100 * r['reduction'][s]:.1f}%" for s in splits]
        cells.append(f"{r['final_loss']['original']:.3f} / {r['final_loss']['enriched']:.3f}")
        cells += [f"{r['splits'][s]['speedup']:.2f}x ({r['splits'][s]['with_tasc_spec']:.2f}x)" for s in splits]
        cells += [_delta_cell(r["splits"][s], m) for s in splits for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["shared_cpu"] for r in runs):
        lines += ["", "\\* the CPU was busy when the run started: its speedups are noisy (quality is not affected)."]
    if any(r["splits"][s]["ci95"] for r in runs for s in splits):
        lines += ["", "In brackets: the 95% paired-bootstrap interval of the delta over the run's evaluation prompts."]
    if groups:
        lines += [
            "",
            "## One recipe, several fine-tuning seeds",
            "",
            "Mean of each delta over the seeds (in brackets: the lowest and highest run).",
            "",
            "| runs | seeds | " + " | ".join(quality) + " |",
            "|---|---|" + "---|" * len(quality),
        ]
        for g in groups:
            cells = [", ".join(g["tags"]), str(g["seeds"])]
            for s in splits:
                for m in metrics:
                    d = g["splits"][s].get(m)
                    cells.append(f"{d['mean']:+.1f} [{d['min']:+.1f}, {d['max']:+.1f}]" if d else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dir)
    runs = load_runs(folder)
    # free text: a sentence rarely equals a reference, so exact match says nothing where BLEU is measured
    metrics = tuple(m for m in runs[0]["metrics"] if not (m == "exact_match" and "bleu" in runs[0]["metrics"]))
    splits = list(runs[0]["comparisons"])
    common, table = rows(runs)
    groups = seed_groups(table, metrics, splits)
    (folder / "README.md").write_text(markdown(common, table, metrics, splits, groups), encoding="utf-8")
    return {"runs": table, "common": common, "seed_groups": groups, "written": str(folder / "README.md")}
