"""`python -m benchmarks index`: corpus indexing throughput, memory, index size and lookup latency.

One run on one machine:

1. builds a corpus of real task outputs (E2E `ref` and `mr` from both CSVs, WikiSQL canonical `sql`), counts its
   tokens with the real tokenizer (smollm2-135m by default), and replicates it (shuffled) until it holds at least
   `--target-tokens` tokens, written as `--files` parquet files; a second corpus at half that size shows how
   memory depends on the corpus size;
2. times, end to end (read parquet -> tokenise -> count -> shuffle/merge -> top-K -> save), the Ray Data job with
   2 workers and with 1 worker on the big corpus (`--repeats` times each, interleaved, after one warm-up job on
   the small corpus that pays the fresh cluster's start-up: Ray Data's own actors and pooled task workers), with
   2 workers on the small one, and the in-process builder (`NgramIndex.from_texts`, in a child process so that
   its peak memory is its own) on both; the targets use the median of the repeats;
3. samples the resident memory (RSS) of the driver and of every Ray worker process of this cluster every 0.2 s;
4. checks the distributed index equals the in-process one, and times `longest_matches` for batches of 8 contexts;
5. writes `<out-dir>/index_<tag>.json` and `.md` with the exact command, the commit and the machine.

Ray's start-up (`ray.init`) is timed separately and not part of the throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common.machine import cpu_was_shared
from benchmarks.common.report import provenance, write_report
from benchmarks.common.tasks import load_index_corpus, locate_datasets

logger = logging.getLogger(__name__)

DATA_DIR = locate_datasets()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="indexing throughput (Ray Data, 1 and 2 workers, in-process), memory, index size, lookup latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder with e2e/ and wikisql/")
    p.add_argument("--target-tokens", type=int, default=5_000_000, help="tokens in the big corpus (at least)")
    p.add_argument("--files", type=int, default=16, help="parquet files per corpus")
    p.add_argument("--max-order", type=int, default=4)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--work-dir", default=None, help="where corpora and indexes go (default: a temp dir)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="e2e_wikisql")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed jobs per (corpus, workers) on the big corpus")
    p.set_defaults(handler=run)


def write_corpus(texts: list[str], copies: int, files: int, root: Path, seed: int) -> list[str]:
    """`copies` of the texts, shuffled, written as `files` parquet files under root (an `output` column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = texts * copies
    random.Random(seed).shuffle(rows)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = root / f"part-{i:03d}.parquet"
        pq.write_table(pa.table({"output": rows[i::files]}), path)
        paths.append(str(path))
    return paths


class MemorySampler:
    """Peak RSS of this process and of every Ray worker process below it (this script's own local cluster)."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.interval, self.me = interval, psutil.Process()
        self.driver_peak = 0
        self.worker_peaks: dict[int, tuple[str, int]] = {}
        self.workers_total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.driver_peak = max(self.driver_peak, self.me.memory_info().rss)
                total = 0
                for child in self.me.children(recursive=True):
                    try:
                        title = " ".join(child.cmdline()[:1])
                        if not title.startswith("ray::"):
                            continue
                        rss = child.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    total += rss
                    name, peak = self.worker_peaks.get(child.pid, (title, 0))
                    self.worker_peaks[child.pid] = (title if "IDLE" not in title else name, max(peak, rss))
                self.workers_total_peak = max(self.workers_total_peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        def peak(word: str) -> int:
            return max((rss for title, rss in self.worker_peaks.values() if word in title), default=0)

        return {
            "driver_peak_rss_mb": self.driver_peak / 2**20,
            "map_worker_peak_rss_mb": peak("CountBatch") / 2**20,
            "reducer_peak_rss_mb": peak("Reducer") / 2**20,
            "all_ray_workers_peak_total_rss_mb": self.workers_total_peak / 2**20,
        }


IN_PROCESS = r"""
import json, resource, sys, time
import pyarrow.parquet as pq
from tasc_ray.models import load_tokenizer
from tasc_ray.engine.drafts.index import NgramIndex
tok = load_tokenizer(sys.argv[1])
files, out, max_order, top_k = json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
texts = [t for f in files for t in pq.read_table(f, columns=["output"]).column("output").to_pylist()
         if isinstance(t, str) and t.strip()]
index = NgramIndex.from_texts(texts, tok, max_order=max_order, top_k=top_k)
index.save(out)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "tokens": index.n_tokens, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_build_mb": base / 1024}))
"""


def in_process(tokenizer: str, files: list[str], out: str, max_order: int, top_k: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, tokenizer, json.dumps(files), out, str(max_order), str(top_k)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def baseline_worker_rss_mb() -> float:
    """RSS of a fresh Python that imports what a worker imports (tasc_ray + transformers), for reference."""
    code = (
        "import resource, tasc_ray.stages.index_job, transformers; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def lookup_latency(index: Any, sequences: list[Any], rng: random.Random, batches: int = 300) -> dict:
    """Latency of one `longest_matches` call for 8 histories (random prefixes of corpus outputs)."""
    import numpy as np

    width = index.max_order - 1
    pool = [s for s in sequences if len(s) > width + 1]
    histories = []
    for _ in range(batches):
        batch = []
        for _ in range(8):
            s = rng.choice(pool)
            end = rng.randrange(width, len(s))
            batch.append(s[max(0, end - 32) : end].tolist())
        histories.append(batch)
    index.longest_matches(histories[0])  # warm up
    times = []
    for batch in histories:
        t0 = time.perf_counter()
        index.longest_matches(batch)
        times.append(time.perf_counter() - t0)
    arr = np.array(times) * 1e6
    return {
        "batch": 8,
        "calls": batches,
        "median_us": float(np.median(arr)),
        "p99_us": float(np.percentile(arr, 99)),
        "mean_us": float(arr.mean()),
    }


@dataclass
class Corpora:
    sources: dict[str, list[str]]  # output texts by source
    texts: list[str]  # the non-empty ones, replicated into the corpora
    ids: list[Any]  # their token ids
    files: dict[str, list[str]]  # "big" / "small": parquet files
    copies: dict[str, int]  # replications of `texts` in each

    @property
    def base_tokens(self) -> int:
        return int(sum(len(s) for s in self.ids))


def build_corpora(args: argparse.Namespace, work: Path, tokenizer: Any) -> Corpora:
    """The real outputs, tokenised once, replicated into a big corpus of >= --target-tokens and one of half."""
    from tasc_ray.engine.drafts.index import tokenize_texts

    sources = load_index_corpus(args.data_dir)
    texts = [t for rows in sources.values() for t in rows if t.strip()]
    t0 = time.perf_counter()
    ids = tokenize_texts(texts, tokenizer)
    base_tokens = int(sum(len(s) for s in ids))
    logger.info(
        "base corpus: %d outputs, %d tokens (tokenised in %.1f s)", len(texts), base_tokens, time.perf_counter() - t0
    )
    big_copies = max(1, -(-args.target_tokens // base_tokens))
    copies = {"big": big_copies, "small": max(1, big_copies // 2)}
    files = {k: write_corpus(texts, n, args.files, work / f"corpus-{k}", args.seed) for k, n in copies.items()}
    return Corpora(sources, texts, ids, files, copies)


def _ray_row(kind: str, workers: int, corpus: str, copies: int, summary: dict, wall: float, mem: dict) -> dict:
    return {
        "builder": "ray_data",
        "kind": kind,
        "workers": workers,
        "corpus": corpus,
        "copies": copies,
        "tokens": summary["tokens"],
        "sequences": summary["sequences"],
        "seconds": wall,
        "tokens_per_s": summary["tokens"] / wall,
        "map_seconds": summary["map_seconds"],
        "first_block_seconds": summary["first_block_seconds"],
        "reduce_seconds": summary["reduce_seconds"],
        "save_seconds": summary["save_seconds"],
        "count_blocks": summary["count_blocks"],
        "full_count_rows": summary["full_count_rows"],
        "index_memory_mb": summary["memory_bytes"] / 2**20,
        **mem,
    }


def ray_runs(args: argparse.Namespace, work: Path, tokenizer: Any, corpora: Corpora) -> tuple[list[dict], float]:
    """A warm-up job on the small corpus, then 2- and 1-worker jobs on the big one alternately (--repeats each),
    then 2 workers on the small one, each with its memory sampled. Returns the rows and ray.init's seconds."""
    import ray

    from tasc_ray.stages.index_job import index_corpus
    from tasc_ray.stages.runtime import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(args.num_cpus)
    ray_init_s = time.perf_counter() - t0
    common = {"max_order": args.max_order, "top_k": args.top_k, "batch_size": args.batch_size}
    plan = [("small", 2, "warm-up"), *[("big", w, "timed") for _ in range(args.repeats) for w in (2, 1)]]
    plan.append(("small", 2, "timed"))
    runs: list[dict[str, Any]] = []
    try:
        for corpus, workers, kind in plan:
            out = str(work / f"index-ray-{corpus}-{workers}w")
            shutil.rmtree(out, ignore_errors=True)
            with MemorySampler() as mem:
                t0 = time.perf_counter()
                summary = index_corpus(corpora.files[corpus], out, tokenizer, num_workers=workers, **common)
                wall = time.perf_counter() - t0
            runs.append(_ray_row(kind, workers, corpus, corpora.copies[corpus], summary, wall, mem.summary()))
            logger.info("%s", runs[-1])
    finally:
        ray.shutdown()
    return runs, ray_init_s


def in_process_runs(args: argparse.Namespace, work: Path, corpora: Corpora) -> list[dict[str, Any]]:
    runs = []
    for corpus in ("big", "small"):
        out = str(work / f"index-inproc-{corpus}")
        r = in_process(args.tokenizer, corpora.files[corpus], out, args.max_order, args.top_k)
        runs.append({"builder": "in_process", "workers": 1, "corpus": corpus, "copies": corpora.copies[corpus], **r})
        logger.info("%s", runs[-1])
    return runs


def same_index(a: Any, b: Any) -> bool:
    """Whether two n-gram indexes hold the same arrays at every order and the same statistics."""
    import numpy as np

    arrays = ("hashes", "totals", "offsets", "next_tokens", "counts")
    same = all(np.array_equal(getattr(a.tables[m], k), getattr(b.tables[m], k)) for m in a.orders for k in arrays)
    return bool(same and a.stats() == b.stats())


def targets_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets (on the medians of the big corpus's timed jobs) and the memory-vs-corpus-size pairs."""
    by = {(r["builder"], r["corpus"], r["workers"]): r for r in runs if r.get("kind", "timed") == "timed"}
    two, one = median_run(runs, "big", 2), median_run(runs, "big", 1)
    inproc = by[("in_process", "big", 1)]
    small2 = by[("ray_data", "small", 2)]
    return {
        "throughput_2_workers_tokens_per_s": two["tokens_per_s"],
        "throughput_target_300k_met": two["tokens_per_s"] >= 300_000,
        "scaling_1_to_2_workers": two["tokens_per_s"] / one["tokens_per_s"],
        "scaling_target_1_5x_met": two["tokens_per_s"] / one["tokens_per_s"] >= 1.5,
        "ray_vs_in_process": two["tokens_per_s"] / inproc["tokens_per_s"],
        # counting once running: tokens over the time from the first counted block to the last
        "after_first_block_tokens_per_s": {
            w: run["tokens"] / (run["map_seconds"] - run["first_block_seconds"]) for w, run in ((2, two), (1, one))
        },
        "reducer_peak_rss_mb_small_vs_big": [small2["reducer_peak_rss_mb"], two["reducer_peak_rss_mb"]],
        "map_worker_peak_rss_mb_small_vs_big": [small2["map_worker_peak_rss_mb"], two["map_worker_peak_rss_mb"]],
        "in_process_peak_rss_mb_small_vs_big": [by[("in_process", "small", 1)]["peak_rss_mb"], inproc["peak_rss_mb"]],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tasc_ray.cli.index import index_stats
    from tasc_ray.engine.drafts.index import NgramIndex
    from tasc_ray.models import load_tokenizer

    header = provenance("index")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-index-"))
    tokenizer = load_tokenizer(args.tokenizer)
    corpora = build_corpora(args, work, tokenizer)
    runs, ray_init_s = ray_runs(args, work, tokenizer, corpora)
    runs += in_process_runs(args, work, corpora)
    big_ray = NgramIndex.load(str(work / "index-ray-big-2w"))
    result = {
        "benchmark": "index",
        "tag": args.tag,
        **header,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tokenizer": args.tokenizer,
        "sources": {k: len(v) for k, v in corpora.sources.items()},
        "base_outputs": len(corpora.texts),
        "base_tokens": corpora.base_tokens,
        "files_per_corpus": args.files,
        "max_order": args.max_order,
        "top_k": args.top_k,
        "batch_size": args.batch_size,
        "ray_init_seconds": ray_init_s,
        "baseline_worker_import_rss_mb": baseline_worker_rss_mb(),
        "runs": runs,
        "distributed_equals_in_process": same_index(big_ray, NgramIndex.load(str(work / "index-inproc-big"))),
        "index": index_stats(str(work / "index-ray-big-2w")),
        "lookup_latency": lookup_latency(big_ray, corpora.ids, random.Random(args.seed)),
        "targets": targets_of(runs),
    }
    write_report(
        result,
        Path(args.out_dir) / f"index_{args.tag}.json",
        f"Corpus indexing benchmark ({args.tag})",
        markdown(result),
    )
    return result


def median_run(runs: list[dict[str, Any]], corpus: str, workers: int) -> dict[str, Any]:
    """The timed Ray Data run of median wall time for (corpus, workers)."""
    timed = sorted(
        (
            r
            for r in runs
            if r["builder"] == "ray_data"
            and r.get("kind") == "timed"
            and r["corpus"] == corpus
            and r["workers"] == workers
        ),
        key=lambda r: r["seconds"],
    )
    return timed[(len(timed) - 1) // 2]


def _runs_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| builder | run | workers | corpus tokens | seconds | first block s | tokens/s | driver peak RSS MB "
        "| map worker peak RSS MB | reducer peak RSS MB | all Ray workers peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        if run["builder"] == "ray_data":
            lines.append(
                f"| Ray Data | {run.get('kind', 'timed')} | {run['workers']} | {run['tokens']:,} | "
                f"{run['seconds']:.1f} | {run['first_block_seconds']:.1f} | "
                f"{run['tokens_per_s']:,.0f} | {run['driver_peak_rss_mb']:.0f} | "
                f"{run['map_worker_peak_rss_mb']:.0f} | {run['reducer_peak_rss_mb']:.0f} | "
                f"{run['all_ray_workers_peak_total_rss_mb']:.0f} |"
            )
        else:
            lines.append(
                f"| in-process | timed | 1 | {run['tokens']:,} | {run['seconds']:.1f} | - | "
                f"{run['tokens_per_s']:,.0f} | {run['peak_rss_mb']:.0f} (whole builder) | - | - | - |"
            )
    return lines


def _index_lines(r: dict[str, Any]) -> list[str]:
    ix, lat = r["index"], r["lookup_latency"]
    return [
        f"A fresh Python that imports what a worker imports (tasc_ray.stages.index_job and transformers) "
        f"already has {r['baseline_worker_import_rss_mb']:.0f} MB resident; worker RSS also counts the object-store "
        "pages it maps.",
        "",
        f"Distributed index identical to the in-process one (every array, stats): "
        f"**{r['distributed_equals_in_process']}**.",
        "",
        f"Index (big corpus): {ix['contexts']:,} contexts, {ix['memory_bytes'] / 2**20:.1f} MB in memory, "
        f"{ix['disk_bytes'] / 2**20:.1f} MB on disk ({ix['memory_bytes_per_million_contexts'] / 2**20:.1f} MB per "
        f"million contexts), H2 = {ix['h2_bits']:.3f} bits over {ix['distinct_tokens']} distinct tokens.",
        "",
        f"Lookup latency (`longest_matches`, batch of {lat['batch']} contexts, {lat['calls']} calls): median "
        f"{lat['median_us']:.0f} us, p99 {lat['p99_us']:.0f} us.",
    ]


def _targets_lines(t: dict[str, Any]) -> list[str]:
    after = {int(k): v for k, v in t["after_first_block_tokens_per_s"].items()}  # int keys, or str from JSON
    reducer, mapper, inproc = (
        t["reducer_peak_rss_mb_small_vs_big"],
        t["map_worker_peak_rss_mb_small_vs_big"],
        t["in_process_peak_rss_mb_small_vs_big"],
    )
    return [
        "## Targets",
        "",
        f"- >= 300k corpus tokens/s end to end with 2 workers: **{t['throughput_2_workers_tokens_per_s']:,.0f}** "
        f"({'met' if t['throughput_target_300k_met'] else 'MISSED'})",
        f"- >= 1.5x from 1 to 2 workers: **{t['scaling_1_to_2_workers']:.2f}x** "
        f"({'met' if t['scaling_target_1_5x_met'] else 'MISSED'})",
        f"- Ray Data (2 workers) vs in-process builder: {t['ray_vs_in_process']:.2f}x",
        f"- counting once the job runs (tokens over the time from the first counted block to the last): "
        f"{after[2]:,.0f} tokens/s with 2 workers, {after[1]:,.0f} with 1 ({after[2] / after[1]:.2f}x)",
        f"- peak memory vs corpus size (small -> big corpus): reducer {reducer[0]:.0f} -> {reducer[1]:.0f} MB, "
        f"map worker {mapper[0]:.0f} -> {mapper[1]:.0f} MB; in-process builder {inproc[0]:.0f} -> {inproc[1]:.0f} MB",
    ]


def _missed_lines(r: dict[str, Any]) -> list[str]:
    """Why the targets were missed (nothing when both were met)."""
    t, m = r["targets"], r["machine"]
    if t["throughput_target_300k_met"] and t["scaling_target_1_5x_met"]:
        return []
    shared = [
        f"- Shared CPU: load average {m['load_average_start'][0]:.1f} at the start and "
        f"{m['load_average_end'][0]:.1f} at the end on {m['cpus']} cores; the runs measure contention "
        "as much as the job."
    ]
    return [
        "## Why targets were missed",
        "",
        *(shared if cpu_was_shared(m["load_average_start"][0], m["cpus"]) else []),
        "- Fixed costs weigh on a few-million-token job on 2 cores: every job starts its own count actors and "
        "reducers (one process each, importing Ray Data, pyarrow and tasc_ray) and Ray Data's listing, read and "
        "repartition tasks, on the same two cores that count; the `first block s` column is the time from the "
        "job's start to its first counted block. More workers means more processes to start, so the start-up "
        "eats into the 1 -> 2 worker gain; the counting itself, once running, is in the targets above.",
    ]


def markdown(r: dict[str, Any]) -> str:
    """The result's body (the common writer adds the command, title and machine above it)."""
    lines = [
        f"Corpus: {r['base_outputs']} real outputs (E2E ref + mr, WikiSQL sql; {r['base_tokens']} tokens with "
        f"{r['tokenizer']}), replicated and shuffled into {r['files_per_corpus']} parquet files. max_order "
        f"{r['max_order']}, top_k {r['top_k']}. Times are end to end (list + read parquet, tokenise, count, "
        f"shuffle and merge, top-K, save); `ray.init` ({r['ray_init_seconds']:.1f} s) is not included. The first "
        "job (warm-up) runs on the fresh cluster and also pays the start of Ray Data's own actors and of the "
        "pooled task workers; the big-corpus jobs then alternate 2 and 1 workers and the targets take each "
        "one's median.",
        "",
        *_runs_table(r),
        "",
        *_index_lines(r),
        "",
        *_targets_lines(r["targets"]),
        "",
        *_missed_lines(r),
    ]
    return "\n".join(lines)
