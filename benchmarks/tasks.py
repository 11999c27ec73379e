"""Benchmark tasks: few-shot completion prompts with references, and a disjoint corpus of outputs to index.

Built-in tasks read ../shared/datasets (or $TASC_RAY_DATASETS): E2E text -> MR (structured extraction),
E2E MR -> text (data-to-text) and WikiSQL question -> SQL. The index corpus and the few-shot examples come
from a split disjoint from the timed prompts (E2E: devset vs testset; WikiSQL: train vs test questions).
Any parquet with `prompt` and `reference` columns is a task too, with a corpus from any parquet/jsonl column.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from tasc_ray.io import CorpusError, read_texts

BUILTIN_TASKS = ("e2e_text2mr", "e2e_mr2text", "wikisql")
N_SHOTS = 3


@dataclass
class Task:
    name: str
    prompts: list[str]  # timed prompts
    references: list[str]
    corpus: list[str]  # reference outputs of a disjoint split, to index
    corpus_prompts: list[str] = field(default_factory=list)  # prompts of that split (to log the model's outputs)
    stop: list[str] = field(default_factory=lambda: ["\n"])


def datasets_dir() -> Path:
    """$TASC_RAY_DATASETS, else ../shared/datasets next to the project root (or the current directory)."""
    if os.environ.get("TASC_RAY_DATASETS"):
        return Path(os.environ["TASC_RAY_DATASETS"])
    for base in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = base.parent / "shared" / "datasets"
        if candidate.is_dir():
            return candidate
    raise CorpusError("cannot find the shared datasets; set TASC_RAY_DATASETS to the folder holding e2e/ and wikisql/")


def _prompt(shots: list[tuple[str, str]], source: str, in_label: str, out_label: str, instruction: str) -> str:
    examples = "".join(f"{in_label}: {s}\n{out_label}: {t}\n\n" for s, t in shots)
    return f"{instruction}\n\n{examples}{in_label}: {source}\n{out_label}:"


def _read_e2e(name: str) -> list[tuple[str, str]]:
    with open(datasets_dir() / "e2e" / name, newline="", encoding="utf-8") as f:
        return [(row["mr"], row["ref"]) for row in csv.DictReader(f)]


def _wikisql() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(question, SQL with its variables filled in) pairs of the train and test question splits."""
    with bz2.open(datasets_dir() / "wikisql" / "wikisql.json.bz2", "rt", encoding="utf-8") as f:
        entries = json.load(f)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for entry in entries:
        for sentence in entry["sentences"]:
            if sentence["question-split"] not in splits:
                continue
            sql, question = entry["sql"][0], sentence["text"]
            for var, value in sentence["variables"].items():
                sql, question = sql.replace(var, value), question.replace(var, value)
            splits[sentence["question-split"]].append((question, sql))
    return splits["train"], splits["test"]


def load_task(name: str, n: int, seed: int = 0, corpus_limit: int | None = None) -> Task:
    """A built-in task with n timed prompts drawn with `seed` (and at most corpus_limit corpus rows)."""
    rng = random.Random(seed)
    if name in ("e2e_text2mr", "e2e_mr2text"):
        train, test = _read_e2e("devset.csv"), _read_e2e("testset_w_refs.csv")
        if name == "e2e_text2mr":  # one row per distinct sentence
            train, test = [(ref, mr) for mr, ref in train], list({ref: (ref, mr) for mr, ref in test}.values())
            labels = ("Sentence", "MR", "Extract the restaurant's attributes from each sentence.")
        else:  # one row per distinct MR; its first reference
            test = list({mr: (mr, ref) for mr, ref in reversed(test)}.values())
            labels = ("MR", "Sentence", "Write one sentence describing the restaurant from its attributes.")
    elif name == "wikisql":
        train, test = _wikisql()
        labels = ("Question", "SQL", "Translate each question into SQL.")
    else:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} (or a parquet path)")
    shots = rng.sample(train, N_SHOTS)
    rest = [pair for pair in train if pair not in shots]
    if corpus_limit:
        rest = rng.sample(rest, min(corpus_limit, len(rest)))
    picked = rng.sample(test, min(n, len(test)))
    return Task(
        name=name,
        prompts=[_prompt(shots, source, *labels) for source, _ in picked],
        references=[target for _, target in picked],
        corpus=[target for _, target in rest],
        corpus_prompts=[_prompt(shots, source, *labels) for source, _ in rest],
    )


def load_task_file(path: str, n: int, corpus_path: str | None, corpus_column: str = "output") -> Task:
    """A task from a parquet with `prompt` and `reference` columns; the corpus from another file's column."""
    table = pq.read_table(path)
    missing = {"prompt", "reference"} - set(table.column_names)
    if missing:
        raise CorpusError(f"{path} lacks column(s) {sorted(missing)}; a task parquet needs prompt and reference")
    rows = table.slice(0, n).to_pylist()
    corpus = read_texts(corpus_path, corpus_column).texts if corpus_path else []
    return Task(Path(path).stem, [r["prompt"] for r in rows], [r["reference"] for r in rows], corpus)
