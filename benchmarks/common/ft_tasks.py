"""The tasks of `bench ft`: training rows, evaluation splits and the quality metrics that apply to them.

A task is any pair of parquet files (local or s3://) with `prompt` and `reference` columns: a training file and one
or more evaluation files (`reference` a string, or a list of strings for several references). The E2E directions
are presets built from the shared datasets (`benchmarks.common.tasks.load_e2e_splits`); `write_task_files` writes
any preset (and WikiSQL question -> SQL) as such files (`python -m benchmarks.ft_data`).

Quality: exact match and chrF always; slot F1 where every reference is an E2E-style meaning representation
(`key[value], ...`), where exact match is then the same slot set; BLEU where it is not (free text, code); and slot
coverage (the share of the prompt's MR values the output states) where every prompt carries an MR and the
references are sentences. `delta_intervals` gives each metric's difference between two systems on the same prompts
with its 95% paired-bootstrap interval.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.metrics import (
    corpus_text_score,
    micro_f1,
    prompt_slots,
    slot_counts,
    stated_values,
    text_segment_stats,
)

ALL_METRICS = ("exact_match", "slot_f1", "bleu", "chrf", "slot_coverage")
BOOTSTRAP_RESAMPLES = 1000
MR = re.compile(r"\s*[^,\[\]]+\[[^\]]*\](\s*,\s*[^,\[\]]+\[[^\]]*\])*\s*")
PROMPT, REFERENCE = "prompt", "reference"


class TaskFileError(ValueError):
    """A task file that cannot serve: missing, empty, without the prompt or reference column."""


@dataclass
class FtTask:
    """Training rows {prompt, output}, evaluation splits of {prompt, refs}, and how outputs end and are scored."""

    name: str
    train: list[dict[str, str]]
    splits: dict[str, list[dict[str, Any]]]
    metrics: tuple[str, ...]
    stop: list[str] = field(default_factory=lambda: ["\n"])
    description: str = ""


def is_mr(text: str) -> bool:
    """An E2E-style meaning representation: `key[value]` slots separated by commas, and nothing else."""
    return MR.fullmatch(text) is not None


def metrics_for(splits: dict[str, list[dict[str, Any]]]) -> tuple[str, ...]:
    """exact_match and chrf, plus slot_f1 when every reference is an MR, else bleu (and slot_coverage when every
    prompt carries an MR)."""
    held = [h for rows in splits.values() for h in rows]
    refs = [r for h in held for r in h["refs"]]
    if refs and all(is_mr(r) for r in refs):
        return ("exact_match", "slot_f1", "chrf")
    coverage = ("slot_coverage",) if held and all(prompt_slots(h.get("prompt", "")) for h in held) else ()
    return ("exact_match", "bleu", "chrf", *coverage)


def segment_stats(texts: list[str], held: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per output, each metric's statistics (one row per output): any subset's rows, summed, give that subset's
    score through `score_from_stats`. With slot F1, exact match is the same slot set as the first reference;
    otherwise the output equals one of its references once both are stripped."""
    slots = [slot_counts([t], [h["refs"][0]]) for t, h in zip(texts, held)] if "slot_f1" in metrics else None
    out: dict[str, np.ndarray] = {}
    for m in metrics:
        if m == "exact_match" and slots:
            rows = [[exact, 1] for *_, exact in slots]
        elif m == "exact_match":
            rows = [[t.strip() in {r.strip() for r in h["refs"]}, 1] for t, h in zip(texts, held)]
        elif m == "slot_f1" and slots:
            rows = [[tp, n_pred, n_ref] for tp, n_pred, n_ref, _ in slots]
        elif m == "slot_coverage":
            rows = [list(stated_values(h["prompt"], t)) for t, h in zip(texts, held)]
        else:  # bleu, chrf
            out[m] = text_segment_stats(m, texts, [h["refs"] for h in held])
            continue
        out[m] = np.asarray(rows, dtype=np.int64).reshape(len(texts), -1)
    return out


def score_from_stats(metric: str, total: np.ndarray) -> float:
    """A metric's score (0-100) from its summed per-output statistics."""
    if metric in ("exact_match", "slot_coverage"):  # (hits, out of)
        return 100 * float(total[0]) / max(1, int(total[1]))
    if metric == "slot_f1":  # micro F1 over (attribute, value) pairs
        tp, n_pred, n_ref = (int(x) for x in total)
        return 100 * micro_f1(tp, n_pred, n_ref)
    return corpus_text_score(metric, total)


def score(texts: list[str], held: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, float]:
    """The task's metrics (0-100) of the outputs against their references."""
    if not texts:
        return {m: 0.0 for m in metrics}
    return {m: score_from_stats(m, s.sum(0)) for m, s in segment_stats(texts, held, metrics).items()}


def delta_intervals(
    base: list[str],
    other: list[str],
    held: list[dict[str, Any]],
    metrics: tuple[str, ...],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per metric, the 95% paired-bootstrap interval of `other`'s score minus `base`'s on the same prompts, in
    points: both systems are scored on each resample of the prompts (drawn with replacement), and the interval is
    the 2.5th to 97.5th percentile of the differences (Koehn, 2004)."""
    a, b = segment_stats(base, held, metrics), segment_stats(other, held, metrics)
    draws = np.random.default_rng(seed).integers(0, len(held), size=(resamples, len(held)))
    intervals = {}
    for m in metrics:
        deltas = [score_from_stats(m, b[m][i].sum(0)) - score_from_stats(m, a[m][i].sum(0)) for i in draws]
        lo, hi = np.percentile(deltas, [2.5, 97.5])
        intervals[m] = [float(lo), float(hi)]
    return intervals


def _read_table(path: str, what: str) -> list[dict[str, Any]]:
    from tasc_ray.io import CorpusError
    from tasc_ray.io.readers import read_columns

    try:
        table = read_columns(path, [PROMPT, REFERENCE], what=what)
    except CorpusError as exc:  # not found, no such column: the message names the file and column
        raise TaskFileError(f"{exc} (a bench ft task file needs `prompt` and `reference` columns)") from exc
    rows = table.to_pylist()
    if not rows:
        raise TaskFileError(f"{path}: no rows (empty {what} file)")
    return rows


def _refs(value: Any) -> list[str]:
    refs = [value] if isinstance(value, str) else list(value or [])
    return [r for r in refs if isinstance(r, str) and r.strip()]


def read_eval_file(path: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Up to n rows {prompt, refs} (drawn with `seed` when the file has more) with a prompt and a reference."""
    rows = [
        {"prompt": r[PROMPT], "refs": _refs(r[REFERENCE])}
        for r in _read_table(path, "evaluation")
        if isinstance(r[PROMPT], str) and r[PROMPT]
    ]
    rows = [r for r in rows if r["refs"]]
    if not rows:
        raise TaskFileError(f"{path}: no row with a non-empty prompt and reference (empty evaluation data)")
    return _draw(rows, n, seed)


def read_train_file(path: str, n: int, seed: int) -> list[dict[str, str]]:
    """Up to n training rows {prompt, output} (output: the first reference)."""
    rows = [
        {"prompt": r["prompt"], "output": r["refs"][0]}
        for r in read_eval_file(path, 1 << 62, seed)  # the same checks; every row
    ]
    return _draw(rows, n, seed)


def _draw(rows: list[Any], n: int, seed: int) -> list[Any]:
    return rows if len(rows) <= n else random.Random(seed).sample(rows, n)


def split_name(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (the name is the file's stem)."""
    if "=" in spec and not spec.split("=", 1)[0].count("/"):
        name, path = spec.split("=", 1)
        return name, path
    return Path(spec.rstrip("/")).stem, spec


def load_task_files(
    train: str, evals: list[str], n_train: int, n_eval: int, seed: int, name: str | None = None
) -> FtTask:
    """A task from a training file and evaluation files (`NAME=PATH` or `PATH`), the metrics chosen from them."""
    if not evals:
        raise TaskFileError("--train needs at least one --eval file")
    splits: dict[str, list[dict[str, Any]]] = {}
    for spec in evals:
        split, path = split_name(spec)
        if split in splits:
            raise TaskFileError(f"two evaluation splits are named {split!r}; name them with NAME=PATH")
        splits[split] = read_eval_file(path, n_eval, seed)
    rows = read_train_file(train, n_train, seed)
    task_name = name or Path(train.rstrip("/")).stem
    return FtTask(task_name, rows, splits, metrics_for(splits), description=f"train {train}; eval {', '.join(evals)}")


# ----- presets as files -----
def wikisql_ft_rows(
    n_train: int, n_eval: int, seed: int, data_dir: str | Path | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """WikiSQL question -> SQL (variables filled in) as {prompt, reference} rows: training rows from the train
    questions, evaluation rows from the test questions (disjoint by WikiSQL's question split)."""
    from benchmarks.common.tasks import wikisql_pairs

    train, test = wikisql_pairs(data_dir)
    rng = random.Random(seed)

    def rows(pairs: list[tuple[str, str]], n: int) -> list[dict[str, str]]:
        picked = rng.sample(pairs, min(n, len(pairs)))
        return [{PROMPT: f"Question: {q}\nSQL:\n", REFERENCE: sql} for q, sql in picked]

    return rows(train, n_train), rows(test, n_eval)


def write_task_files(task: str, out_dir: str | Path, n_train: int, n_eval: int, seed: int) -> dict[str, str]:
    """Write a preset as `train.parquet` and evaluation parquet files with prompt and reference columns (E2E:
    `heldout.parquet` and `test.parquet`, references as lists; WikiSQL: `test.parquet`). Returns name -> path."""
    import pandas as pd

    from benchmarks.common.tasks import locate_datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if task == "wikisql":
        train, test = wikisql_ft_rows(n_train, n_eval, seed)
        tables: dict[str, list[dict[str, Any]]] = {"train": train, "test": test}
    elif task in ("e2e_text2mr", "e2e_mr2text"):
        from benchmarks.common.tasks import load_e2e_splits

        rows, splits = load_e2e_splits(locate_datasets() / "e2e", task[4:], n_train, n_eval, seed)
        tables = {"train": [{PROMPT: r["prompt"], REFERENCE: r["output"]} for r in rows]}
        tables |= {s: [{PROMPT: h["prompt"], REFERENCE: h["refs"]} for h in held] for s, held in splits.items()}
    else:
        raise ValueError(f"unknown task {task!r}; presets: wikisql, e2e_text2mr, e2e_mr2text")
    paths = {}
    for name, table in tables.items():
        paths[name] = str(out / f"{name}.parquet")
        pd.DataFrame(table).to_parquet(paths[name])
    return paths
