"""`python -m benchmarks label` and `python -m benchmarks serve`: the Ray paths (batch labeling, the OpenAI
endpoint) timed with and without TASC-spec on E2E text -> MR.

Task: E2E test-set sentences (testset_w_refs.csv 'ref') -> their meaning representation ('mr'), as plain
few-shot completion prompts (shots from devset.csv; `benchmarks.common.tasks.load_e2e_labeling`) stopped at a
newline.
The n-gram index is built from devset.csv's 'mr' column (human references, disjoint from the timed rows) with
the model's own tokenizer.

- `label` writes the prompts to parquet and runs `label_parquet` (Ray Data, actor pool) twice on the same
  rows, plainly and with TASC-spec: rows/s, output tokens/s, their ratio, exact match against the references,
  and whether both runs produced the same outputs (they must: greedy TASC-spec is lossless).
- `serve` deploys the Serve app on a local Ray and drives it over loopback HTTP with a bounded async load
  generator (httpx) at each concurrency level, with `speculative` true and false on the same replica:
  requests/s, tokens/s, p50/p99 latency.

Both write `<out-dir>/<name>.json` and `.md` with the command line, the commit and the machine (its load).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common.metrics import exact_match, slot_f1
from benchmarks.common.report import provenance, write_report
from benchmarks.common.tasks import load_e2e_labeling, locate_datasets

logger = logging.getLogger(__name__)

E2E_DIR = locate_datasets() / "e2e"


def register(subparsers: argparse._SubParsersAction) -> None:
    label = subparsers.add_parser(
        "label",
        help="batch labeling (Ray Data) with and without TASC-spec on E2E",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(label, rows=500)
    label.add_argument("--batch-size", type=int, default=8)
    label.add_argument("--num-replicas", type=int, default=1)
    label.add_argument(
        "--concurrent-modes",
        action="store_true",
        help="run the plain and the TASC-spec job at the same time (same machine load for both)",
    )
    label.set_defaults(handler=run_label_bench)

    serve = subparsers.add_parser(
        "serve",
        help="the OpenAI endpoint under load with and without TASC-spec",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(serve, rows=64)
    serve.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    serve.add_argument(
        "--requests", type=int, nargs="+", default=None, help="requests per level (default: max(12, 2 x concurrency))"
    )
    serve.add_argument("--max-batch-size", type=int, default=32)
    serve.set_defaults(handler=run_serve_bench)


def _common(p: argparse.ArgumentParser, rows: int) -> None:
    p.add_argument("--json", action="store_true", help="print the JSON summary on stdout")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=str(E2E_DIR), help="folder with devset.csv and testset_w_refs.csv")
    p.add_argument("--rows", type=int, default=rows, help="test-set rows to decode")
    p.add_argument("--shots", type=int, default=2, help="few-shot examples (from the devset)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the generator actor / replica")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs of the generator actor / replica")
    p.add_argument("--work-dir", default=None, help="where the index and parquet files go (default: a temp dir)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default=None, help="result file name (default: label_e2e / serve_e2e)")
    p.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------------------------------------------
# Shared by both
# ----------------------------------------------------------------------------------------------------------------
def build_index(model: str, corpus: list[str], path: Path) -> str:
    from tasc_ray.engine.drafts.index import NgramIndex
    from tasc_ray.models import load_tokenizer

    if (path / "manifest.json").exists():
        return str(path)
    index = NgramIndex.from_texts(corpus, load_tokenizer(model))
    return index.save(str(path))


# ----------------------------------------------------------------------------------------------------------------
# label
# ----------------------------------------------------------------------------------------------------------------
LABEL_KEYS = (
    "rows_labeled",
    "errors",
    "label_seconds",
    "rows_per_s",
    "output_tokens",
    "tokens_per_s",
    "forward_passes",
    "drafted_tokens",
    "accepted_tokens",
    "accepted_per_pass",
    "acceptance_rate",
)
LABEL_TITLE = "Batch labeling (Ray Data actor pool): E2E text -> MR, with and without TASC-spec"


def _label_mode(args: argparse.Namespace, src: Path, engine: Any, work: Path, mode: str) -> tuple[dict, dict]:
    """One labeling job over the prompts parquet ("plain" or "tasc"): its summary and its outputs by row id."""
    import pyarrow.parquet as pq

    from tasc_ray.io import arrow_filesystem
    from tasc_ray.stages.labeling import label_parquet

    out = work / f"labels-{mode}-{int(time.time())}"
    summary = label_parquet(
        str(src),
        str(out),
        engine,
        prompt_template="{prompt}",
        id_column="id",
        max_new_tokens=args.max_new_tokens,
        stop=["\n"],
        speculative=mode == "tasc",
        batch_size=args.batch_size,
        num_replicas=args.num_replicas,
        num_cpus_per_replica=args.num_cpus,
        num_threads=args.threads,
    )
    fs, root = arrow_filesystem(str(out))
    table = pq.read_table(root, filesystem=fs)
    return summary, dict(zip(table.column("id").to_pylist(), table.column("output").to_pylist()))


def _label_both(args: argparse.Namespace, src: Path, engine: Any, work: Path) -> tuple[dict, dict]:
    """The plain and the TASC-spec job, one after the other or (--concurrent-modes) at the same time."""
    modes = ("plain", "tasc")
    if args.concurrent_modes:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(_label_mode, args, src, engine, work, m) for m in modes]
            done = [f.result() for f in futures]
    else:
        done = [_label_mode(args, src, engine, work, m) for m in modes]
    return {m: d[0] for m, d in zip(modes, done)}, {m: d[1] for m, d in zip(modes, done)}


def _label_setup(args: argparse.Namespace, n_rows: int, n_corpus: int) -> dict[str, Any]:
    return {
        "model": args.model,
        "rows": n_rows,
        "shots": args.shots,
        "max_new_tokens": args.max_new_tokens,
        "stop": "\\n",
        "batch_size": args.batch_size,
        "num_replicas": args.num_replicas,
        "threads": args.threads,
        "num_cpus": args.num_cpus,
        "concurrent_modes": args.concurrent_modes,
        "index_corpus": f"devset.csv 'mr' ({n_corpus} human references)",
        "timed_rows": "testset_w_refs.csv (disjoint from the index corpus)",
    }


def _label_notes(report: dict[str, Any], concurrent: bool) -> list[str]:
    rows_x, tokens_x = report["speedup_rows_per_s"], report["speedup_tokens_per_s"]
    notes = [
        f"TASC-spec / plain: {rows_x:.2f}x rows/s, {tokens_x:.2f}x tokens/s "
        f"(target >= 1.5x: {'met' if rows_x >= 1.5 else 'missed'}).",
        f"Outputs identical between the two runs for {report['identical_outputs']} rows (greedy TASC-spec is "
        "lossless).",
        "Wall time covers the whole Ray Data job (actor start and model load included, the same in both runs).",
    ]
    if concurrent:
        notes.append(
            "Both jobs ran at the same time (one actor each): they saw the same machine load; "
            "once the faster one finished the other had the CPU share to itself, which favours "
            "the slower run, so the ratio is if anything understated."
        )
    return notes


def run_label_bench(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasc_ray.engine.load import EngineConfig
    from tasc_ray.stages.runtime import ensure_ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tasc-bench-label-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, corpus = load_e2e_labeling(args.data_dir, args.rows, args.shots, args.seed)
    index = build_index(args.model, corpus, work / "index")
    src = work / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    header = provenance("label")
    ensure_ray()
    runs, outputs = _label_both(args, src, EngineConfig(model=args.model, index=index), work)
    refs = {r["id"]: r["reference"] for r in rows}
    preds = {m: [outputs[m][i] or "" for i in refs] for m in outputs}
    same = sum(outputs["plain"][i] == outputs["tasc"][i] for i in refs)
    speedup_rows = runs["tasc"]["rows_per_s"] / runs["plain"]["rows_per_s"]
    report = {
        "title": LABEL_TITLE,
        **header,
        "setup": _label_setup(args, len(rows), len(corpus)),
        "runs": {m: {k: runs[m][k] for k in LABEL_KEYS} for m in runs},
        "speedup_rows_per_s": speedup_rows,
        "speedup_tokens_per_s": runs["tasc"]["tokens_per_s"] / runs["plain"]["tokens_per_s"],
        "identical_outputs": f"{same}/{len(refs)}",
        "exact_match": {m: exact_match(preds[m], list(refs.values())) for m in preds},
        "slot_f1": {m: slot_f1(preds[m], list(refs.values())) for m in preds},
        "target": ">= 1.5x",
        "target_met": speedup_rows >= 1.5,
    }
    report["notes"] = _label_notes(report, args.concurrent_modes)
    body = _label_table(report) + "\n\n" + "\n".join(f"- {line}" for line in report["notes"])
    report["files"] = write_report(report, Path(args.out_dir) / f"{args.name or 'label_e2e'}.json", LABEL_TITLE, body)
    return report


def _label_table(report: dict[str, Any]) -> str:
    lines = [
        "| mode | rows | errors | seconds | rows/s | tokens/s | accepted/pass | acceptance | exact match | slot F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in report["runs"].items():
        lines.append(
            f"| {mode} | {r['rows_labeled']} | {r['errors']} | {r['label_seconds']:.1f} | "
            f"{r['rows_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['accepted_per_pass']:.2f} | "
            f"{r['acceptance_rate']:.2f} | {report['exact_match'][mode]:.3f} | "
            f"{report['slot_f1'][mode]:.3f} |"
        )
    lines += [
        "",
        f"Speedup (TASC-spec / plain): **{report['speedup_rows_per_s']:.2f}x rows/s**, "
        f"{report['speedup_tokens_per_s']:.2f}x tokens/s; identical outputs {report['identical_outputs']}.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# serve
# ----------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(
    base: str, prompts: list[str], concurrency: int, speculative: bool, max_tokens: int, model: str
) -> dict[str, Any]:
    """Send every prompt with at most `concurrency` in flight; per-request latency and totals."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    usage = {"completion_tokens": 0, "drafted_tokens": 0, "accepted_tokens": 0, "forward_passes": 0}
    errors = 0
    texts: list[str | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def one(i: int, prompt: str) -> None:
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/completions",
                    json={
                        "model": model,
                        "prompt": prompt,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "stop": ["\n"],
                        "speculative": speculative,
                    },
                )
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                    return
                body = r.json()
                texts[i] = body["choices"][0]["text"]
                for k in usage:
                    usage[k] += body["usage"][k]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    return {
        "requests": len(prompts),
        "errors": errors,
        "seconds": wall,
        "requests_per_s": len(prompts) / wall,
        "latencies": lat,
        "tokens_per_s": usage["completion_tokens"] / wall,
        "p50_s": _percentile(lat, 0.5),
        "p99_s": _percentile(lat, 0.99),
        "mean_s": sum(lat) / len(lat),
        **usage,
        "accepted_per_pass": usage["accepted_tokens"] / max(1, usage["forward_passes"]),
        "texts": texts,
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def _merge(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of several drive() segments of one mode: throughput over their summed wall time, pooled latencies."""
    lat = sorted(x for s in segments for x in s.pop("latencies"))
    wall = sum(s["seconds"] for s in segments)
    n = sum(s["requests"] for s in segments)
    keys = ("completion_tokens", "drafted_tokens", "accepted_tokens", "forward_passes", "errors")
    out: dict[str, Any] = {k: sum(s[k] for s in segments) for k in keys}

    out.update(
        {
            "requests": n,
            "seconds": wall,
            "requests_per_s": n / wall,
            "tokens_per_s": out["completion_tokens"] / wall,
            "p50_s": _percentile(lat, 0.5),
            "p99_s": _percentile(lat, 0.99),
            "mean_s": sum(lat) / len(lat),
            "accepted_per_pass": out["accepted_tokens"] / max(1, out["forward_passes"]),
            "texts": [t for s in segments for t in s["texts"]],
        }
    )
    return out


SERVE_TITLE = "OpenAI endpoint (Ray Serve, continuous batching): E2E text -> MR completions, with and without TASC-spec"


def _start_serve(args: argparse.Namespace, index: str) -> str:
    """A local Ray (or $RAY_ADDRESS) with the Serve app on a free loopback port; returns its base URL."""
    import ray
    from ray import serve

    from serve_apps.openai_app import build_app
    from tasc_ray.serving.config import ServeConfig

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig.model_validate(
        {
            "model": args.model,
            "index": index,
            "model_name": "bench",
            "max_batch_size": args.max_batch_size,
            "num_cpus": args.num_cpus,
            "num_threads": args.threads,
            "max_ongoing_requests": max(64, 2 * max(args.concurrency)),
            "max_tokens_limit": args.max_new_tokens,
        }
    )
    serve.run(build_app(config), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def _serve_level(base: str, prompts: list[str], j: int, c: int, args: argparse.Namespace) -> dict[str, Any]:
    """One concurrency level: the same requests plainly and with TASC-spec, in ABBA order (plain, tasc, tasc,
    plain; each on half of the requests), so that a load drifting during the level weighs on both modes alike."""
    n = args.requests[j] if args.requests else max(12, 2 * c)
    batch = [prompts[(j * 7 + i) % len(prompts)] for i in range(n)]
    level: dict[str, Any] = {"concurrency": c, "requests": n}
    half = max(c, n // 2)
    parts: dict[str, list[dict[str, Any]]] = {"plain": [], "tasc": []}
    for k, mode in enumerate(("plain", "tasc", "tasc", "plain")):
        chunk = batch[:half] if k in (0, 1) else batch[half:] or batch[:half]
        logger.info("concurrency %d, %s: %d requests", c, mode, len(chunk))
        parts[mode].append(asyncio.run(drive(base, chunk, c, mode == "tasc", args.max_new_tokens, "bench")))
    for mode, segs in parts.items():
        level[mode] = _merge(segs)
    plain, tasc = level["plain"].pop("texts"), level["tasc"].pop("texts")
    # out of the requests each mode sent (more than n when n < 2 x concurrency: both halves are then the first half)
    level["identical_outputs"] = f"{sum(a == b for a, b in zip(plain, tasc))}/{len(plain)}"
    level["throughput_ratio"] = level["tasc"]["requests_per_s"] / level["plain"]["requests_per_s"]
    level["p99_ratio"] = level["tasc"]["p99_s"] / level["plain"]["p99_s"]
    return level


def _serve_setup(args: argparse.Namespace, n_corpus: int) -> dict[str, Any]:
    return {
        "model": args.model,
        "shots": args.shots,
        "max_tokens": args.max_new_tokens,
        "stop": "\\n",
        "max_batch_size": args.max_batch_size,
        "replicas": 1,
        "threads": args.threads,
        "num_cpus": args.num_cpus,
        "index_corpus": f"devset.csv 'mr' ({n_corpus} human references)",
        "client": "httpx.AsyncClient on loopback, bounded by a semaphore; greedy; same replica for both; "
        "ABBA order per level (plain, tasc, tasc, plain, each on half of the requests)",
    }


def _serve_table(levels: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | mode | requests | req/s | tokens/s | p50 s | p99 s | accepted/pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        for mode in ("plain", "tasc"):
            r = lv[mode]
            lines.append(
                f"| {lv['concurrency']} | {mode} | {r['requests']} | {r['requests_per_s']:.2f} | "
                f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                f"{r['accepted_per_pass']:.2f} |"
            )
    return "\n".join(lines)


def run_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from ray import serve

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tasc-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, corpus = load_e2e_labeling(args.data_dir, args.rows, args.shots, args.seed)
    index = build_index(args.model, corpus, work / "index")
    header = provenance("serve")
    base = _start_serve(args, index)
    prompts = [r["prompt"] for r in rows]
    try:
        httpx.post(base + "/v1/completions", json={"prompt": prompts[0], "max_tokens": 8}, timeout=600)  # warm up
        levels = [_serve_level(base, prompts, j, c, args) for j, c in enumerate(args.concurrency)]
    finally:
        serve.shutdown()
    at8 = next((lv for lv in levels if lv["concurrency"] == 8), None)
    met = at8 is not None and at8["throughput_ratio"] >= 1.3 and at8["p99_ratio"] <= 1.0
    report = {
        "title": SERVE_TITLE,
        **header,
        "setup": _serve_setup(args, len(corpus)),
        "levels": levels,
        "target": ">= 1.3x throughput at concurrency 8 with p99 no worse",
        "target_met": met,
    }
    report["notes"] = [
        f"concurrency {lv['concurrency']}: {lv['throughput_ratio']:.2f}x throughput, p99 ratio "
        f"{lv['p99_ratio']:.2f}, identical outputs {lv['identical_outputs']}"
        for lv in levels
    ] + [f"Target at concurrency 8: {'met' if met else 'missed'}."]
    body = _serve_table(levels) + "\n\n" + "\n".join(f"- {line}" for line in report["notes"])
    report["files"] = write_report(report, Path(args.out_dir) / f"{args.name or 'serve_e2e'}.json", SERVE_TITLE, body)
    return report
