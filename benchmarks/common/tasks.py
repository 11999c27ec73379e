"""The benchmarks' task data: one reader per dataset and one loader per way a harness draws from it.

The datasets live in ../shared/datasets (or $TASC_RAY_DATASETS): E2E (`e2e/devset.csv`, `e2e/testset_w_refs.csv`,
columns `mr` and `ref`) and WikiSQL (`wikisql/wikisql.json.bz2`). Every loader keeps what is indexed or trained on
disjoint from what is timed or scored (E2E: devset vs test set, or held-out devset MRs; WikiSQL: train vs test
questions).

- `load_task`: few-shot completion prompts with references and a corpus to index (`spec`); built-in tasks
  E2E text -> MR (structured extraction), E2E MR -> text (data-to-text) and WikiSQL question -> SQL. Any parquet
  with `prompt` and `reference` columns is a task too (`load_task_file`), with a corpus from any parquet/jsonl column.
- `load_e2e_splits`: E2E training rows and two evaluation splits for fine-tuning, with plain prompts (`ft`).
- `load_e2e_labeling`: E2E text -> MR few-shot rows with ids and the devset MRs to index (`label`, `serve`).
- `load_index_corpus`: every E2E `ref` and `mr` and WikiSQL's canonical SQL, as outputs to index (`index`).
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_TASKS = ("e2e_text2mr", "e2e_mr2text", "wikisql")
N_SHOTS = 3
E2E_TEXT2MR = ("Sentence", "MR", "Extract the restaurant's attributes from each sentence.")
E2E_MR2TEXT = ("MR", "Sentence", "Write one sentence describing the restaurant from its attributes.")
WIKISQL = ("Question", "SQL", "Translate each question into SQL.")


# ----- where the data is -----
def locate_datasets() -> Path:
    """$TASC_RAY_DATASETS, else the first existing ../shared/datasets next to the project root or the current
    directory, else the project root's one (which may not exist: a default to show, not a check)."""
    if os.environ.get("TASC_RAY_DATASETS"):
        return Path(os.environ["TASC_RAY_DATASETS"])
    candidates = [base.parent / "shared" / "datasets" for base in (Path(__file__).resolve().parents[2], Path.cwd())]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def datasets_dir() -> Path:
    """The shared datasets folder; refuses one that is not there."""
    path = locate_datasets()
    if not path.is_dir():
        raise FileNotFoundError(
            f"cannot find the shared datasets at {path}; set TASC_RAY_DATASETS to the folder holding e2e/ and wikisql/"
        )
    return path


# ----- readers -----
def read_e2e(name: str, e2e_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(mr, ref) rows of one E2E CSV (`devset.csv` or `testset_w_refs.csv`), in file order."""
    folder = Path(e2e_dir) if e2e_dir is not None else datasets_dir() / "e2e"
    with open(folder / name, newline="", encoding="utf-8") as f:
        return [(row["mr"], row["ref"]) for row in csv.DictReader(f)]


def read_wikisql(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """WikiSQL's entries: canonical `sql` strings, and `sentences` with their split and variables."""
    folder = Path(data_dir) if data_dir is not None else datasets_dir()
    with bz2.open(folder / "wikisql" / "wikisql.json.bz2", "rt", encoding="utf-8") as f:
        return json.load(f)


def wikisql_pairs(data_dir: str | Path | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(question, SQL with its variables filled in) pairs of the train and test question splits."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for entry in read_wikisql(data_dir):
        for sentence in entry["sentences"]:
            if sentence["question-split"] not in splits:
                continue
            sql, question = entry["sql"][0], sentence["text"]
            for var, value in sentence["variables"].items():
                sql, question = sql.replace(var, value), question.replace(var, value)
            splits[sentence["question-split"]].append((question, sql))
    return splits["train"], splits["test"]


def few_shot_prompt(shots: list[tuple[str, str]], source: str, in_label: str, out_label: str, instruction: str) -> str:
    """A plain completion prompt: the instruction, the (input, output) examples, then the input to complete."""
    examples = "".join(f"{in_label}: {s}\n{out_label}: {t}\n\n" for s, t in shots)
    return f"{instruction}\n\n{examples}{in_label}: {source}\n{out_label}:"


# ----- spec: few-shot tasks with a corpus to index -----
@dataclass
class Task:
    name: str
    prompts: list[str]  # timed prompts
    references: list[str]
    corpus: list[str]  # reference outputs of a disjoint split, to index
    corpus_prompts: list[str] = field(default_factory=list)  # prompts of that split (to log the model's outputs)
    stop: list[str] = field(default_factory=lambda: ["\n"])


def _task_pairs(name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], tuple[str, str, str]]:
    """(source, target) pairs of the split to draw shots and the corpus from, of the timed split, and the labels."""
    if name in ("e2e_text2mr", "e2e_mr2text"):
        train, test = read_e2e("devset.csv"), read_e2e("testset_w_refs.csv")
        if name == "e2e_text2mr":  # one row per distinct sentence
            return [(ref, mr) for mr, ref in train], list({ref: (ref, mr) for mr, ref in test}.values()), E2E_TEXT2MR
        # one row per distinct MR; its first reference
        return train, list({mr: (mr, ref) for mr, ref in reversed(test)}.values()), E2E_MR2TEXT
    if name == "wikisql":
        return (*wikisql_pairs(), WIKISQL)
    raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} (or a parquet path)")


def load_task(name: str, n: int, seed: int = 0, corpus_limit: int | None = None) -> Task:
    """A built-in task with n timed prompts drawn with `seed` (and at most corpus_limit corpus rows)."""
    rng = random.Random(seed)
    train, test, labels = _task_pairs(name)
    shots = rng.sample(train, N_SHOTS)
    rest = [pair for pair in train if pair not in shots]
    if corpus_limit:
        rest = rng.sample(rest, min(corpus_limit, len(rest)))
    picked = rng.sample(test, min(n, len(test)))
    return Task(
        name=name,
        prompts=[few_shot_prompt(shots, source, *labels) for source, _ in picked],
        references=[target for _, target in picked],
        corpus=[target for _, target in rest],
        corpus_prompts=[few_shot_prompt(shots, source, *labels) for source, _ in rest],
    )


def load_task_file(path: str, n: int, corpus_path: str | None, corpus_column: str = "output") -> Task:
    """A task from a parquet with `prompt` and `reference` columns; the corpus from another file's column."""
    import pyarrow.parquet as pq

    from tasc_ray.io import CorpusError, read_texts

    table = pq.read_table(path)
    missing = {"prompt", "reference"} - set(table.column_names)
    if missing:
        raise CorpusError(f"{path} lacks column(s) {sorted(missing)}; a task parquet needs prompt and reference")
    rows = table.slice(0, n).to_pylist()
    corpus = read_texts(corpus_path, corpus_column).texts if corpus_path else []
    return Task(Path(path).stem, [r["prompt"] for r in rows], [r["reference"] for r in rows], corpus)


# ----- ft: training rows and evaluation splits -----
def ft_prompt(direction: str, source: str) -> str:
    """The fine-tuned models' prompt (no few-shot examples)."""
    return f"Sentence: {source}\nMR:\n" if direction == "text2mr" else f"MR: {source}\nSentence:\n"


def _eval_rows(rows: list[tuple[str, str]], direction: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """`n` prompts with their references: one (mr, ref) row per prompt for text -> MR; one MR (in sorted order of
    the distinct MRs) with all its sentences for MR -> text."""
    if direction == "text2mr":
        idx = rng.sample(range(len(rows)), min(n, len(rows)))
        return [{"prompt": ft_prompt(direction, rows[i][1]), "refs": [rows[i][0]]} for i in idx]
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    mrs = rng.sample(sorted(groups), min(n, len(groups)))
    return [{"prompt": ft_prompt(direction, mr), "refs": groups[mr]} for mr in mrs]


def load_e2e_splits(
    e2e_dir: str | Path, direction: str, n_train: int, n_eval: int, seed: int, holdout_fraction: float = 0.2
) -> tuple[list[dict[str, str]], dict[str, list[dict[str, Any]]]]:
    """Training rows {prompt, output} from the devset MRs not held out; evaluation splits `heldout` (devset rows
    of the held-out MRs) and `test` (testset_w_refs.csv), each a list of {prompt, refs}."""
    dev, test = read_e2e("devset.csv", e2e_dir), read_e2e("testset_w_refs.csv", e2e_dir)
    rng = random.Random(seed)
    mrs = sorted({mr for mr, _ in dev})
    rng.shuffle(mrs)
    held_mrs = set(mrs[: max(1, round(holdout_fraction * len(mrs)))])
    train_rows = [row for row in dev if row[0] not in held_mrs]
    held_rows = [row for row in dev if row[0] in held_mrs]
    source, target = (1, 0) if direction == "text2mr" else (0, 1)
    idx = rng.sample(range(len(train_rows)), min(n_train, len(train_rows)))
    train = [{"prompt": ft_prompt(direction, train_rows[i][source]), "output": train_rows[i][target]} for i in idx]
    splits = {
        "heldout": _eval_rows(held_rows, direction, n_eval, rng),
        "test": _eval_rows(test, direction, n_eval, rng),
    }
    return train, splits


# ----- label and serve: few-shot text -> MR rows -----
def load_e2e_labeling(
    e2e_dir: str | Path, n_rows: int, n_shots: int, seed: int
) -> tuple[list[dict[str, str]], list[str]]:
    """Timed rows {id, text, prompt, reference} from the test set (few-shot text -> MR prompts, shots from the
    devset) and the index corpus: every devset MR (repeats kept: counts matter)."""
    dev, test = read_e2e("devset.csv", e2e_dir), read_e2e("testset_w_refs.csv", e2e_dir)
    rng = random.Random(seed)
    shots = [(ref, mr) for mr, ref in rng.sample(dev, n_shots)]
    picked = rng.sample(range(len(test)), min(n_rows, len(test)))
    rows = [
        {
            "id": f"e2e-test-{i}",
            "text": test[i][1].strip(),
            "reference": test[i][0].strip(),
            "prompt": few_shot_prompt(shots, test[i][1].strip(), *E2E_TEXT2MR),
        }
        for i in picked
    ]
    return rows, [mr for mr, _ in dev]


# ----- index: outputs to index -----
def load_index_corpus(data_dir: str | Path | None = None) -> dict[str, list[str]]:
    """E2E references and MRs (devset + test set) and WikiSQL canonical SQL, as output texts by source."""
    folder = Path(data_dir) if data_dir is not None else datasets_dir()
    out: dict[str, list[str]] = {"e2e_ref": [], "e2e_mr": [], "wikisql_sql": []}
    for name in ("devset.csv", "testset_w_refs.csv"):
        for mr, ref in read_e2e(name, folder / "e2e"):
            out["e2e_ref"].append(ref)
            out["e2e_mr"].append(mr)
    for entry in read_wikisql(folder):
        out["wikisql_sql"].extend(s for s in entry["sql"] if isinstance(s, str))
    return out
