"""`tasc-ray demo`: the README's main job, the full flow on the embedded default.

1. writes a generated sample task (default: order messages -> JSON): a corpus of outputs and disjoint prompts;
2. indexes the corpus with the Ray Data job (tokenise, count n-grams, aggregate, top-K, manifest last);
3. labels the prompts parquet through the Ray Data actor pool, plainly and with TASC-spec;
4. prints sample outputs, the speedup against plain decoding, the acceptance, and where everything is.

It runs on a local Ray started for it (2 CPUs), or on the cluster named by RAY_ADDRESS.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tasc_ray.cli.args import add_config_arguments, add_model_argument
from tasc_ray.cli.main import add_command
from tasc_ray.engine.config import EngineConfig
from tasc_ray.models import load_tokenizer, resolve_model
from tasc_ray.sample_task import TASKS, write_sample_task
from tasc_ray.stages.index_job import index_corpus
from tasc_ray.stages.labeling import label_parquet
from tasc_ray.stages.runtime import ensure_ray

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = add_command(
        subparsers,
        "demo",
        run_demo,
        "full flow on a sample task: Ray Data index job, then labeling with and without TASC-spec",
    )
    add_model_argument(demo)
    demo.add_argument("--workdir", default="outputs/demo", help="where the task, index and labels are written")
    demo.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="orders",
        help="sample task (tasc_ray.sample_task): orders -> JSON, "
        "or restaurant sentences -> slot strings (harder for a 135M model)",
    )
    demo.add_argument("--n", type=int, default=48, help="prompts to label")
    demo.add_argument("--corpus-rows", type=int, default=2000, help="outputs in the sample task's corpus")
    demo.add_argument("--batch-size", type=int, default=8, help="rows per batched decode")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    add_config_arguments(demo, EngineConfig, exclude=set(EngineConfig.model_fields) - {"precision"})


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    paths = write_sample_task(workdir / "task", n_corpus=args.corpus_rows, n_prompts=args.n, task=args.task)
    resolve_model(args.model)  # convert the embedded model once, before the Ray workers need it
    ensure_ray()
    index_dir = str(workdir / "index")
    index_summary = index_corpus(str(paths["corpus"]), index_dir, load_tokenizer(args.model), column="output")
    runs = {}
    for name, index, speculative in (("plain", None, False), ("tasc", index_dir, True)):
        out = workdir / f"labels-{name}"
        shutil.rmtree(out, ignore_errors=True)  # the demo's own output from an earlier run; a fresh run each time
        runs[name] = label_parquet(
            str(paths["prompts"]),
            str(out),
            EngineConfig(model=args.model, index=index, precision=args.precision),
            prompt_template="{prompt}",
            id_column="id",
            max_new_tokens=args.max_new_tokens,
            stop=["\n"],
            speculative=speculative,
            batch_size=args.batch_size,
        )
    plain = pq.read_table(workdir / "labels-plain").sort_by("id").to_pylist()
    tasc = pq.read_table(workdir / "labels-tasc").sort_by("id").to_pylist()
    prompts = {r["id"]: r for r in pq.read_table(paths["prompts"]).to_pylist()}
    summary = {
        "rows": len(tasc),
        "index": index_dir,
        "index_tokens": index_summary.get("corpus_tokens"),
        "outputs": {"plain": runs["plain"]["output"], "tasc": runs["tasc"]["output"]},
        "plain_s": runs["plain"]["label_seconds"],
        "tasc_s": runs["tasc"]["label_seconds"],
        "speedup": runs["plain"]["label_seconds"] / runs["tasc"]["label_seconds"],
        # decoding alone, inside the actors: the per-row latencies, without actor start and model load
        "decode_speedup": sum(r["latency_s"] for r in plain) / max(sum(r["latency_s"] for r in tasc), 1e-9),
        "tokens_per_pass": runs["tasc"]["output_tokens"] / max(runs["tasc"]["forward_passes"], 1),
        "outputs_identical_to_plain": sum(a["output"] == b["output"] for a, b in zip(plain, tasc)) / len(tasc),
        "exact_match_vs_reference": sum(r["output"].strip() == prompts[r["id"]]["reference"] for r in tasc) / len(tasc),
        "errors": runs["plain"]["errors"] + runs["tasc"]["errors"],
    }
    if not args.json:
        for row in tasc[:5]:
            print(f"{prompts[row['id']]['text']}\n  -> {row['output'].strip()}")
        print(
            f"\nLabeled {summary['rows']} rows through the Ray Data actor pool (batch {args.batch_size}):\n"
            f"  plain greedy: {summary['plain_s']:.1f} s   TASC-spec: {summary['tasc_s']:.1f} s   "
            f"speedup {summary['speedup']:.2f}x end to end (actor start and model load included), "
            f"{summary['decode_speedup']:.2f}x decoding alone\n"
            f"  {summary['tokens_per_pass']:.2f} tokens per forward pass; outputs identical to plain decoding: "
            f"{summary['outputs_identical_to_plain']:.0%}; exact match with the reference: "
            f"{summary['exact_match_vs_reference']:.0%}\n"
            f"  index: {index_dir}\n  outputs: {summary['outputs']['tasc']} (plain: {summary['outputs']['plain']})"
        )
    return summary
