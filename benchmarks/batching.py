"""`python -m benchmarks batching`: continuous batching against static batches, side by side in one run.

Two parts, each comparing the engine's two schedulers (`EngineConfig.scheduling`) on the same model and rows:

- `engine`: labeling-style offline decoding of N rows whose outputs differ in length (E2E text -> MR and
  MR -> text few-shot prompts interleaved, stopped at a newline), `generate()` with `static=True` (fixed batches
  of max_batch_size rows, each running to its longest row: the engine before continuous batching) and with
  continuous admission, plainly and with TASC-spec (an index of the devset references of both directions).
  Rows/s and whether every output is identical to the static plain run.
- `serve` (unless --skip-serve): two Serve apps on a local Ray, one replica each, one per scheduler, driven one
  at a time over loopback HTTP (ABBA order): (1) 8 long requests (--long-tokens with `ignore_eos`) and, a second
  later, a 4-token request: its latency against the long ones'; (2) --concurrency E2E text -> MR requests in
  flight: requests/s, p50/p99 latency, identical outputs; (3) a streaming client that leaves after 5 chunks: the
  time until the replica reports its row cancelled, against its mean step time; (4) 64 concurrent 8-token
  requests, a third streaming and a tenth of those leaving early: failures, p50/p99, rows left behind.

Writes `<out-dir>/<name>.json` and `.md` (the command first, the commit and the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common.report import provenance, write_report
from benchmarks.common.tasks import load_e2e_labeling, load_task, locate_datasets

logger = logging.getLogger(__name__)

TITLE = "Continuous batching against static batches (engine and Serve endpoint)"
SCHEDULERS = ("static", "continuous")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batching",
        help="continuous batching against static batches (engine labeling rows; Serve latency and throughput)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the JSON summary on stdout")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=500, help="engine part: rows (half per E2E direction)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=8, help="engine part: rows decoding at once")
    p.add_argument(
        "--serve-max-batch-size", type=int, default=16, help="serve part: rows decoding at once (Serve's default)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--long-tokens", type=int, default=200, help="serve part: new tokens of each long request")
    p.add_argument("--concurrency", type=int, default=32, help="serve part: requests in flight")
    p.add_argument("--requests", type=int, default=64, help="serve part: requests at that concurrency per mode")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="batching_cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run)


# ----- engine part -----
def engine_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tasc_ray.engine.config import DrafterConfig, EngineConfig
    from tasc_ray.engine.drafts.drafter import build_drafter
    from tasc_ray.engine.drafts.index import NgramIndex
    from tasc_ray.engine.load import load_engine
    from tasc_ray.engine.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    half = args.rows // 2
    tasks = [load_task(name, half, args.seed) for name in ("e2e_text2mr", "e2e_mr2text")]
    prompts = [p for pair in zip(tasks[0].prompts, tasks[1].prompts) for p in pair]  # interleaved directions
    generator = load_engine(EngineConfig(model=args.model, max_batch_size=args.max_batch_size))
    index = NgramIndex.from_texts(tasks[0].corpus + tasks[1].corpus, generator.tokenizer)
    drafter = build_drafter(index, DrafterConfig(), generator.tokenizer)
    generator.generate(prompts[:4], SamplingParams(max_new_tokens=4))  # warm-up
    runs: list[dict[str, Any]] = []
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    # ABBA over schedulers within each decoding mode, so that drift weighs on both alike
    for mode in ("plain", "tasc"):
        generator.drafter = drafter if mode == "tasc" else None
        params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=["\n"], speculative=mode == "tasc")
        parts: dict[str, list[tuple[float, list]]] = {s: [] for s in SCHEDULERS}
        half_rows = len(prompts) // 2
        for k, scheduling in enumerate(("static", "continuous", "continuous", "static")):
            chunk = prompts[:half_rows] if k in (0, 1) else prompts[half_rows:]
            logger.info("engine: %s, %s, %d rows", mode, scheduling, len(chunk))
            t0 = time.perf_counter()
            results = generator.generate(chunk, params, static=scheduling == "static")
            parts[scheduling].append((time.perf_counter() - t0, results))
        for scheduling in SCHEDULERS:
            seconds = sum(s for s, _ in parts[scheduling])
            results = [r for _, rs in parts[scheduling] for r in rs]  # first half, then second: prompts' order
            outputs[(mode, scheduling)] = [r.token_ids for r in results]
            tokens = sum(r.new_tokens for r in results)
            passes = sum(r.stats.forward_passes for r in results)
            runs.append(
                {
                    "mode": mode,
                    "scheduling": scheduling,
                    "rows": len(results),
                    "seconds": seconds,
                    "rows_per_s": len(results) / seconds,
                    "tokens_per_s": tokens / seconds,
                    "output_tokens": tokens,
                    "tokens_per_pass": tokens / max(1, passes + len(results)),
                }
            )
    reference = outputs[("plain", "static")]
    lengths = sorted(len(t) for t in reference)
    for run in runs:
        same = sum(a == b for a, b in zip(outputs[(run["mode"], run["scheduling"])], reference))
        run["identical_to_static_plain"] = f"{same}/{len(reference)}"
    ratios = {
        mode: next(r for r in runs if r["mode"] == mode and r["scheduling"] == "continuous")["rows_per_s"]
        / next(r for r in runs if r["mode"] == mode and r["scheduling"] == "static")["rows_per_s"]
        for mode in ("plain", "tasc")
    }
    return {
        "rows": len(prompts),
        "output_tokens_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        "runs": runs,
        "continuous_over_static": ratios,
        "target": "continuous >= 1.3x static rows/s, plain and TASC-spec, identical outputs",
        "target_met": all(v >= 1.3 for v in ratios.values())
        and all(r["identical_to_static_plain"].split("/")[0] == str(len(reference)) for r in runs),
    }


# ----- serve part -----
def _start_apps(args: argparse.Namespace, index: str) -> str:
    import os

    import ray
    from ray import serve

    from benchmarks.serve import _free_port
    from tasc_ray.serving.app import build_app
    from tasc_ray.serving.config import ServeConfig

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for scheduling in SCHEDULERS:
        config = ServeConfig.model_validate(
            {
                "model": args.model,
                "index": index,
                "model_name": "bench",
                "max_batch_size": args.serve_max_batch_size,
                "scheduling": scheduling,
                "num_cpus": 0.5,
                "num_threads": args.threads,
                "max_ongoing_requests": 4 * args.concurrency,
                "max_tokens_limit": max(args.long_tokens, args.max_new_tokens),
            }
        )
        serve.run(build_app(config), name=f"bench-{scheduling}", route_prefix=f"/{scheduling}")
    return f"http://127.0.0.1:{port}"


async def short_behind_long(base: str, args: argparse.Namespace) -> dict[str, Any]:
    """8 long requests, then (1 s later) a 4-token one: latencies from each request's own start."""
    import httpx

    long_body = {"prompt": "Write a long story about a restaurant.", "max_tokens": args.long_tokens}
    long_body.update(ignore_eos=True, speculative=False)
    async with httpx.AsyncClient(base_url=base, timeout=900) as client:

        async def timed(body: dict[str, Any]) -> float:
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return time.perf_counter() - t0

        longs = [asyncio.ensure_future(timed(long_body)) for _ in range(8)]
        await asyncio.sleep(1.0)
        short = await timed({"prompt": "Zizzi is a", "max_tokens": 4, "ignore_eos": True})
        long_s = await asyncio.gather(*longs)
    return {"short_s": short, "long_mean_s": sum(long_s) / len(long_s), "short_over_long": short / min(long_s)}


async def stream_disconnect(base: str, max_tokens: int) -> dict[str, Any]:
    """A streaming client leaves after 5 chunks: the time until /health counts its row cancelled."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        before = (await client.get("/health")).json()["engine"]
        body = {"prompt": "Zizzi is a", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"streaming request refused: {r.status_code} {(await r.aread())[:200]!r}")
            chunks = 0
            async for line in r.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 5:
                    break
        left = time.perf_counter()
        while True:
            engine = (await client.get("/health")).json()["engine"]
            if engine["cancelled"] > before["cancelled"] or time.perf_counter() - left > 60:
                break
            await asyncio.sleep(0.005)
        freed_s = time.perf_counter() - left
    return {"freed_after_s": freed_s, "cancelled": engine["cancelled"] - before["cancelled"]}


async def mixed_crowd(base: str, prompts: list[str], n: int = 64) -> dict[str, Any]:
    """n concurrent 8-token requests at once: a third streaming, a tenth of the streams' clients leaving after
    the first chunk. Every other request must succeed; no row may stay behind."""
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:

        async def one(i: int) -> None:
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": 8, "stop": ["\n"]}
            t0 = time.perf_counter()
            if i % 3 == 0:
                leave = i % 10 == 0
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    statuses.append(r.status_code)
                    async for line in r.aiter_lines():
                        if leave and line.startswith("data: "):
                            return  # the client goes away
                if not leave:
                    latencies.append(time.perf_counter() - t0)
                return
            r = await client.post("/v1/completions", json=body)
            statuses.append(r.status_code)
            latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.sleep(1.0)
        engine = (await client.get("/health")).json()["engine"]
    lat = sorted(latencies)
    return {
        "requests": n,
        "non_200": sum(s != 200 for s in statuses),
        "completed": len(lat),
        "p50_s": lat[len(lat) // 2],
        "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
        "rows_left_running": engine["running"] + engine["waiting"],
    }


def serve_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx
    from ray import serve

    from benchmarks.serve import _merge, build_index, drive

    rows, corpus = load_e2e_labeling(str(locate_datasets() / "e2e"), args.requests, 2, args.seed)
    index = build_index(args.model, corpus, work / "index")
    base = _start_apps(args, index)
    prompts = [r["prompt"] for r in rows]
    out: dict[str, Any] = {"schedulers": {}}
    try:
        for s in SCHEDULERS:
            httpx.post(f"{base}/{s}/v1/completions", json={"prompt": prompts[0], "max_tokens": 4}, timeout=600)
        latency = {s: [] for s in SCHEDULERS}
        load = {s: [] for s in SCHEDULERS}
        for s in ("static", "continuous", "continuous", "static"):
            logger.info("serve: %s", s)
            latency[s].append(asyncio.run(short_behind_long(f"{base}/{s}", args)))
            half = prompts[: len(prompts) // 2] if len(load[s]) == 0 else prompts[len(prompts) // 2 :]
            level = drive(f"{base}/{s}", half, args.concurrency, True, args.max_new_tokens, "bench")
            load[s].append(asyncio.run(level))
        for s in SCHEDULERS:
            merged = _merge(load[s])
            texts = merged.pop("texts")
            out["schedulers"][s] = {
                "short_behind_long": latency[s],
                "short_over_long": sum(x["short_over_long"] for x in latency[s]) / len(latency[s]),
                "load": merged,
                "texts": texts,
            }
        crowd = {s: asyncio.run(mixed_crowd(f"{base}/{s}", prompts)) for s in SCHEDULERS}
        for s in SCHEDULERS:
            out["schedulers"][s]["crowd"] = crowd[s]
            tokens = max(args.long_tokens, args.max_new_tokens)
            out["schedulers"][s]["disconnect"] = asyncio.run(stream_disconnect(f"{base}/{s}", tokens))
            health = httpx.get(f"{base}/{s}/health", timeout=60).json()
            out["schedulers"][s]["health"] = health["engine"]
    finally:
        serve.shutdown()
    static, cont = out["schedulers"]["static"], out["schedulers"]["continuous"]
    same = sum(a == b for a, b in zip(static.pop("texts"), cont.pop("texts")))
    out["identical_outputs"] = f"{same}/{len(prompts)}"
    out["throughput_ratio"] = cont["load"]["requests_per_s"] / static["load"]["requests_per_s"]
    out["p99_ratio"] = cont["load"]["p99_s"] / static["load"]["p99_s"]
    crowd = cont["crowd"]
    out["targets"] = {
        "short request <= 25% of the long ones' latency (continuous)": cont["short_over_long"] <= 0.25,
        "64 mixed requests: all 200, no row left behind, p99 of 8-token requests < 5 s (continuous)": (
            crowd["non_200"] == 0 and crowd["rows_left_running"] == 0 and crowd["p99_s"] < 5.0
        ),
        f"concurrency {args.concurrency}: >= 1.3x static throughput, lower p99, identical outputs": (
            out["throughput_ratio"] >= 1.3 and out["p99_ratio"] < 1.0 and same == len(prompts)
        ),
    }
    return out


# ----- report -----
def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    report: dict[str, Any] = {"title": TITLE, **provenance("batching"), "config": _config(args)}
    if not args.skip_engine:
        report["engine"] = engine_part(args)
    if not args.skip_serve:
        report["serve"] = serve_part(args, Path(tempfile.mkdtemp(prefix="tasc-bench-batching-")))
    report["files"] = write_report(report, Path(args.out_dir) / f"{args.name}.json", TITLE, markdown(report))
    return report


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "json")}


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    engine = report.get("engine")
    if engine:
        lo, med, hi = engine["output_tokens_min_median_max"]
        lines += [
            f"## Engine: {engine['rows']} rows, E2E text -> MR and MR -> text interleaved "
            f"(output tokens min/median/max {lo}/{med}/{hi}), max_batch_size {report['config']['max_batch_size']}",
            "",
            "| mode | scheduling | rows/s | tokens/s | tokens/pass | identical to static plain |",
            "|---|---|---|---|---|---|",
        ]
        for r in engine["runs"]:
            lines.append(
                f"| {r['mode']} | {r['scheduling']} | {r['rows_per_s']:.3f} | {r['tokens_per_s']:.1f} | "
                f"{r['tokens_per_pass']:.2f} | {r['identical_to_static_plain']} |"
            )
        ratios = engine["continuous_over_static"]
        lines += [
            "",
            f"Continuous over static: plain {ratios['plain']:.2f}x, TASC-spec {ratios['tasc']:.2f}x. "
            f"Target ({engine['target']}): {'met' if engine['target_met'] else 'missed'}.",
            "",
        ]
    serve = report.get("serve")
    if serve:
        c = report["config"]
        lines += [
            f"## Serve: one replica per scheduler, max_batch_size {c['serve_max_batch_size']}",
            "",
            f"| scheduling | short request s | long requests mean s | short / long | req/s at {c['concurrency']} | "
            "p50 s | p99 s | disconnected row freed after s | mean step s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s, v in serve["schedulers"].items():
            short = sum(x["short_s"] for x in v["short_behind_long"]) / len(v["short_behind_long"])
            long = sum(x["long_mean_s"] for x in v["short_behind_long"]) / len(v["short_behind_long"])
            load = v["load"]
            lines.append(
                f"| {s} | {short:.2f} | {long:.2f} | {v['short_over_long']:.2f} | {load['requests_per_s']:.2f} | "
                f"{load['p50_s']:.2f} | {load['p99_s']:.2f} | {v['disconnect']['freed_after_s']:.3f} | "
                f"{_mean_step(v['health']):.3f} |"
            )
        lines += [
            "",
            "64 concurrent 8-token requests (a third streaming, a tenth of those clients leaving after one chunk):",
            "",
            "| scheduling | non-200 | completed | p50 s | p99 s | rows left running |",
            "|---|---|---|---|---|---|",
        ]
        for s, v in serve["schedulers"].items():
            cr = v["crowd"]
            lines.append(
                f"| {s} | {cr['non_200']} | {cr['completed']} | {cr['p50_s']:.2f} | {cr['p99_s']:.2f} | "
                f"{cr['rows_left_running']} |"
            )
        lines += [
            "",
            f"Continuous over static at concurrency {c['concurrency']}: {serve['throughput_ratio']:.2f}x requests/s, "
            f"p99 ratio {serve['p99_ratio']:.2f}, identical outputs {serve['identical_outputs']}.",
            "",
        ]
        lines += [f"- {name}: {'met' if ok else 'missed'}" for name, ok in serve["targets"].items()]
    return "\n".join(lines)


def _mean_step(engine: dict[str, Any]) -> float:
    return engine.get("busy_s", 0.0) / max(1, engine.get("steps", 1))
