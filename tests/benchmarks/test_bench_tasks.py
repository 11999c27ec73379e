"""benchmarks.common.tasks on the real datasets in ../shared/datasets (skipped when they are absent)."""

from __future__ import annotations

import pytest

from benchmarks.common.metrics import parse_slots
from benchmarks.common.tasks import (
    BUILTIN_TASKS,
    datasets_dir,
    load_e2e_labeling,
    load_e2e_splits,
    load_index_corpus,
    load_task,
    locate_datasets,
    read_e2e,
    wikisql_pairs,
)

DATA = locate_datasets()
E2E = DATA / "e2e"
needs_e2e = pytest.mark.skipif(not (E2E / "devset.csv").is_file(), reason=f"E2E data not present in {E2E}")
needs_wikisql = pytest.mark.skipif(
    not (DATA / "wikisql" / "wikisql.json.bz2").is_file(), reason=f"WikiSQL data not present in {DATA}"
)


def test_datasets_dir_refuses_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TASC_RAY_DATASETS", str(tmp_path / "nowhere"))
    assert locate_datasets() == tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="TASC_RAY_DATASETS"):
        datasets_dir()
    monkeypatch.setenv("TASC_RAY_DATASETS", str(tmp_path))
    assert datasets_dir() == tmp_path


@needs_e2e
def test_read_e2e():
    dev, test = read_e2e("devset.csv"), read_e2e("testset_w_refs.csv", E2E)
    assert (len(dev), len(test)) == (4672, 4693)
    assert dev[0] == (
        "name[Alimentum], area[city centre], familyFriendly[no]",
        "There is a place in the city centre, Alimentum, that is not family-friendly.",
    )
    assert all(parse_slots(mr) for mr, _ in dev + test)


@needs_e2e
@needs_wikisql
@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_spec_tasks_are_few_shot_and_drawn_by_seed(name):
    task = load_task(name, 8, seed=0, corpus_limit=200)
    assert len(task.prompts) == len(task.references) == 8 and len(task.corpus) == len(task.corpus_prompts) == 200
    in_label, out_label = {"e2e_text2mr": ("Sentence", "MR"), "e2e_mr2text": ("MR", "Sentence")}.get(
        name, ("Question", "SQL")
    )
    for prompt in task.prompts:
        assert prompt.count(f"\n{in_label}: ") == 3 + 1 and prompt.endswith(f"\n{out_label}:")  # 3 shots + the input
    assert load_task(name, 8, seed=0, corpus_limit=200) == task
    assert load_task(name, 8, seed=1, corpus_limit=200).prompts != task.prompts
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope", 1)


@needs_e2e
def test_ft_splits_are_disjoint():
    """The `heldout` split's MRs never appear among the training rows; `test` comes from the test set."""
    dev_mrs = {mr for mr, _ in read_e2e("devset.csv", E2E)}
    test_mrs = {mr for mr, _ in read_e2e("testset_w_refs.csv", E2E)}
    for direction in ("text2mr", "mr2text"):
        train, splits = load_e2e_splits(E2E, direction, 200, 20, seed=0)
        assert len(train) == 200 and {k: len(v) for k, v in splits.items()} == {"heldout": 20, "test": 20}
        if direction == "text2mr":
            train_mrs = {r["output"] for r in train}
            held, tested = [h["refs"][0] for h in splits["heldout"]], [h["refs"][0] for h in splits["test"]]
            assert train[0]["prompt"].startswith("Sentence: ") and train[0]["prompt"].endswith("\nMR:\n")
        else:
            train_mrs = {r["prompt"].removeprefix("MR: ").removesuffix("\nSentence:\n") for r in train}
            held = [h["prompt"].removeprefix("MR: ").removesuffix("\nSentence:\n") for h in splits["heldout"]]
            tested = [h["prompt"].removeprefix("MR: ").removesuffix("\nSentence:\n") for h in splits["test"]]
            assert all(len(h["refs"]) >= 1 for h in splits["heldout"])  # every sentence of the MR
        assert train_mrs <= dev_mrs and set(held) <= dev_mrs and not set(held) & train_mrs
        assert set(tested) <= test_mrs
    assert load_e2e_splits(E2E, "text2mr", 50, 5, seed=3) == load_e2e_splits(E2E, "text2mr", 50, 5, seed=3)


@needs_e2e
def test_labeling_rows_and_index_corpus():
    rows, corpus = load_e2e_labeling(E2E, 30, 2, seed=0)
    assert len(rows) == len({r["id"] for r in rows}) == 30 and len(corpus) == 4672  # every devset MR, repeats kept
    test = dict(read_e2e("testset_w_refs.csv", E2E)[int(r["id"].removeprefix("e2e-test-"))][::-1] for r in rows)
    for r in rows:
        assert test[r["text"]].strip() == r["reference"] and parse_slots(r["reference"])
        assert r["prompt"].count("\nSentence: ") == 2 + 1 and r["prompt"].endswith(f"Sentence: {r['text']}\nMR:")
        assert r["prompt"].startswith("Extract the restaurant's attributes from each sentence.\n\n")


@needs_wikisql
def test_wikisql_pairs_fill_the_variables():
    train, test = wikisql_pairs()
    assert len(train) > 50_000 and len(test) > 15_000
    assert all(sql.startswith("SELECT") for _, sql in test[:200])
    unfilled = [sql for _, sql in test if '"var0"' in sql]  # a few questions in the data lack their variables
    assert len(unfilled) < len(test) / 1000


@needs_e2e
@needs_wikisql
def test_index_corpus():
    sources = load_index_corpus(DATA)
    assert len(sources["e2e_ref"]) == len(sources["e2e_mr"]) == 4672 + 4693
    assert len(sources["wikisql_sql"]) >= 51_159 and all(isinstance(s, str) for s in sources["wikisql_sql"])
