"""`python -m benchmarks ft-eval RESULT.json --eval-rows N`: decode a finished `bench ft` run's two fine-tuned
models again on a larger draw of evaluation prompts, without training anything.

A run's quality deltas on 48 prompts move by several points from one draw of prompts to another. Fine-tuning costs
the run most of its time and decoding little, so this re-decodes the run's saved models (its work dir must still
hold them) on up to N prompts per split, plainly and with TASC-spec as `bench ft` does, and writes a result of the
same shape: compression on the new prompts' references, speedups, quality, and each quality delta's 95%
paired-bootstrap interval. The run's training rows are drawn again from its settings and checked against the rows
its models were trained on; the E2E presets draw the evaluation prompts after the training rows, so a larger N
keeps the same training rows (and uses every held-out MR once N exceeds their number).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common.report import provenance


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ft-eval",
        help="decode a finished bench ft run's fine-tuned models again on more evaluation prompts (no training)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("result", help="a bench ft result (ft_*.json) whose work dir still holds its models")
    p.add_argument("--eval-rows", type=int, required=True, help="prompts per evaluation split")
    p.add_argument("--tag", default=None, help="suffix of the result files (default: the run's tag + _eval<N>)")
    p.add_argument("--out-dir", default=None, help="where to write (default: the result's folder)")
    p.add_argument("--device", default=None, help="decode device (default: the run's)")
    p.add_argument("--gen-batch-size", type=int, default=None, help="decoding batch size (default: the run's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def trained_models(result: dict[str, Any]) -> dict[str, Path]:
    """The fine-tuned model folders of a run: its own, or for a reused original model the run that trained it."""
    work = Path(result["work_dir"])
    models = {}
    for name, run_ in result["runs"].items():
        home = Path(run_["train"].get("reused_from") or work)
        models[name] = home / f"ft_{name}"
        if not (models[name] / "finetune.json").is_file():
            raise ValueError(f"{models[name]}: the run's fine-tuned {name} model is gone (no finetune.json)")
    return models


def run_settings(result: dict[str, Any], args: argparse.Namespace, source: Path) -> argparse.Namespace:
    """The run's own settings, with this command's evaluation size, tag, output folder and decoding overrides."""
    config = dict(result["config"])
    config.update(
        eval_rows=args.eval_rows,
        tag=args.tag or f"{config['tag']}_eval{args.eval_rows}",
        out_dir=args.out_dir or str(source.parent),
    )
    config.pop("prompt_grounding", None)  # runs before the drafter's prompt grounding was removed
    for key in ("device", "gen_batch_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return argparse.Namespace(**config)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd

    from benchmarks.ft import build_result, evaluate, load_task, measure_compression, write_result
    from tasc_ray.models import load_tokenizer

    source = Path(args.result)
    if not source.is_file():
        raise ValueError(f"{source}: no such bench ft result")
    try:
        result = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: not a bench ft result (not JSON: {exc})") from exc
    if not isinstance(result, dict) or result.get("benchmark") != "ft" or "work_dir" not in result:
        raise ValueError(f"{source}: not a bench ft result")
    header = provenance("ft-eval")
    t_start = time.perf_counter()
    settings = run_settings(result, args, source)
    models = trained_models(result)
    work = Path(result["work_dir"])
    task = load_task(settings)
    if pd.read_parquet(work / "train.parquet").to_dict("records") != task.train:
        raise ValueError(f"{work}: its training rows differ from the ones the run's settings draw now")
    outputs, prompts = [r["output"] for r in task.train], [r["prompt"] for r in task.train]
    compression = {k: result["compression"][k] for k in ("new_tokens", "iterations", "stop_reason", "enrich_seconds")}
    compression |= measure_compression(settings, work, outputs, task.splits, prompts)
    base_vocab = len(load_tokenizer(settings.model))
    runs = {
        name: {"train": result["runs"][name]["train"], "decode": evaluate(str(path), task, settings, base_vocab)}
        for name, path in models.items()
    }
    rescored = build_result(settings, header, task, compression, runs, work, t_start)
    rescored["added_tokens_head"] = result["added_tokens_head"]
    rescored["rescored_from"] = {k: result.get(k) for k in ("command", "git_commit")} | {"result": str(source)}
    rescored["notes"] = [
        f"models fine-tuned by `{result['command']}` at commit {str(result.get('git_commit'))[:12]}; decoded again "
        "here on the evaluation prompts above (no training in this run)"
    ]
    return write_result(rescored, settings, task)
