"""bench ft (benchmarks/ft.py): its quality metrics and targets, reusing an original model, disjoint splits."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmarks.common.metrics import parse_slots, slot_scores, text_scores
from benchmarks.common.tasks import load_e2e_splits
from benchmarks.ft import E2E_DIR, finalize
from tasc_ray.ft.train import FinetuneConfig


def test_bench_quality_metrics():
    mr = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5]"
    assert parse_slots(mr) == {("name", "The Eagle"), ("eatType", "coffee shop"), ("customer rating", "5 out of 5")}
    assert slot_scores([mr], [mr]) == {"exact_match": 100.0, "slot_f1": 100.0}
    partial = slot_scores(["name[The Eagle], eatType[pub]"], [mr])
    assert partial["exact_match"] == 0.0 and partial["slot_f1"] == pytest.approx(40.0)
    sentence = "the cat sat on the mat today"
    assert text_scores([sentence], [[sentence]])["bleu"] == pytest.approx(100.0)
    runs = {
        n: {
            "decode": {
                split: {
                    m: {"seconds": s * scale, "tokens_per_output": t, "exact_match": 50.0, "slot_f1": f - drop}
                    for m in ("plain", "tasc_spec")
                }
                for split, scale, drop in (("heldout", 1.0, 0.0), ("test", 2.0, 5.0 * (n == "enriched")))
            }
        }
        for n, s, t, f in (("original", 2.0, 40.0, 90.0), ("enriched", 1.0, 20.0, 89.0))
    }
    compression = {"new_tokens": 300, "heldout": {"reduction_enriched": 0.5}, "test": {"reduction_enriched": 0.1}}
    r = finalize({"direction": "text2mr", "runs": runs, "compression": compression})
    assert r["targets"]["decode_speedup>=1.3x"] == {"value": 2.0, "met": True}
    assert r["targets"]["reference_output_token_reduction>=25%_with<=500_new_tokens"]["value"] == 0.5
    assert r["targets"]["slot_f1_within_2_points (heldout)"] == {"value": -1.0, "met": True}
    assert r["targets"]["slot_f1_within_2_points (test)"] == {"value": -6.0, "met": False}
    assert r["comparisons"]["test"]["enriched+plain"]["speedup"] == 2.0


def test_delta_intervals_bracket_the_difference_on_the_same_prompts():
    from benchmarks.common.ft_tasks import delta_intervals, metrics_for, score

    held = [
        {"prompt": f"MR: name[Place {i}], food[Thai]\nSentence:\n", "refs": [f"Place {i} serves Thai food ."]}
        for i in range(30)
    ]
    metrics = metrics_for({"s": held})
    assert metrics == ("exact_match", "bleu", "chrf", "slot_coverage")
    refs = [h["refs"][0] for h in held]
    worse = [f"Place {i} is a restaurant ." if i % 3 == 0 else r for i, r in enumerate(refs)]
    assert score(refs, held, metrics)["slot_coverage"] == 100.0
    assert score(worse, held, metrics)["slot_coverage"] == pytest.approx(100 * (60 - 10) / 60)
    same = delta_intervals(refs, refs, held, metrics)
    assert all(lo == hi == 0.0 for lo, hi in same.values())
    intervals = delta_intervals(refs, worse, held, metrics)
    scores = {k: score(worse, held, metrics)[k] - score(refs, held, metrics)[k] for k in metrics}
    for k, (lo, hi) in intervals.items():
        assert lo <= scores[k] <= hi < 0  # worse on a third of the prompts, better on none
    assert intervals == delta_intervals(refs, worse, held, metrics)  # seeded


def test_bench_reuses_an_original_model_only_for_the_same_rows_and_recipe(tmp_path):
    from benchmarks.ft import RECIPE_KEYS, reused_original

    rows = [{"prompt": "p1", "output": "o1"}, {"prompt": "p2", "output": "o2"}]
    (tmp_path / "ft_original").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    cfg = FinetuneConfig(model="smollm2-135m", train="t.parquet", out=str(tmp_path / "new"), full=True, lr=1e-4)
    with pytest.raises(ValueError, match="no fine-tuned original model"):
        reused_original(tmp_path, cfg, rows)
    summary = {"out": "old", "final_loss": 0.1, "config": {k: getattr(cfg, k) for k in RECIPE_KEYS}}
    (tmp_path / "ft_original" / "finetune.json").write_text(json.dumps(summary))
    reused = reused_original(tmp_path, cfg, rows)
    assert reused["out"] == str(tmp_path / "ft_original") and reused["reused_from"] == str(tmp_path)
    with pytest.raises(ValueError, match="training rows differ"):
        reused_original(tmp_path, cfg, rows[:1])
    cfg.epochs = 5
    with pytest.raises(ValueError, match="recipe differs in epochs"):
        reused_original(tmp_path, cfg, rows)


def test_bench_splits_are_disjoint():
    """The `heldout` split's MRs never appear among the training outputs; `test` comes from the test set."""
    if not (E2E_DIR / "devset.csv").is_file():
        pytest.skip("E2E data not present")
    for direction in ("text2mr", "mr2text"):
        train, splits = load_e2e_splits(E2E_DIR, direction, 200, 20, seed=0)
        assert len(train) == 200 and all(len(v) == 20 for v in splits.values())
        key = "output" if direction == "text2mr" else "prompt"
        train_mrs = {r[key].removeprefix("MR: ").removesuffix("\nSentence:\n") for r in train}
        held_mrs = {(h["refs"][0] if direction == "text2mr" else h["prompt"][4:-11]) for h in splits["heldout"]}
        assert held_mrs and not held_mrs & train_mrs


def _task_files(tmp_path, task_rows, eval_refs_as_lists=False):
    rows = [{"prompt": r["text"] + "\nMR:\n", "reference": r["output"]} for r in task_rows]
    train, evals = rows[:32], rows[300:306]
    if eval_refs_as_lists:
        evals = [{"prompt": r["prompt"], "reference": [r["reference"], "name[Other]"]} for r in evals]
    pd.DataFrame(train).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(evals).to_parquet(tmp_path / "eval.parquet")
    return tmp_path / "train.parquet", tmp_path / "eval.parquet"


def test_task_files_are_read_checked_and_scored(tmp_path, task_rows):
    from benchmarks.common.ft_tasks import TaskFileError, is_mr, load_task_files, metrics_for, score

    train, evals = _task_files(tmp_path, task_rows, eval_refs_as_lists=True)
    task = load_task_files(str(train), [f"dev={evals}"], 20, 4, seed=0)
    assert len(task.train) == 20 and set(task.train[0]) == {"prompt", "output"}
    assert list(task.splits) == ["dev"] and len(task.splits["dev"]) == 4 and len(task.splits["dev"][0]["refs"]) == 2
    assert task.metrics == ("exact_match", "slot_f1", "chrf")  # the sample task's outputs are MRs
    assert is_mr("name[The Eagle], food[Thai]") and not is_mr("The Eagle serves Thai food.")
    assert metrics_for({"s": [{"refs": ["SELECT a FROM t ;"]}]}) == ("exact_match", "bleu", "chrf")
    held = [{"prompt": "p", "refs": ["SELECT a FROM t ;", "SELECT b FROM t ;"]}, {"prompt": "q", "refs": ["x y z"]}]
    scores = score(["SELECT b FROM t ;", "x y"], held, ("exact_match", "bleu", "chrf"))
    assert scores["exact_match"] == 50.0 and 0 < scores["chrf"] < 100 and set(scores) == {"exact_match", "bleu", "chrf"}
    pd.DataFrame([{"prompt": "p", "output": "o"}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(TaskFileError, match="reference"):
        load_task_files(str(tmp_path / "bad.parquet"), [str(evals)], 2, 2, seed=0)
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "reference": pd.Series([], dtype=str)}).to_parquet(
        tmp_path / "empty.parquet"
    )
    with pytest.raises(TaskFileError, match="empty"):
        load_task_files(str(train), [str(tmp_path / "empty.parquet")], 2, 2, seed=0)
    with pytest.raises(TaskFileError, match="at least one --eval"):
        load_task_files(str(train), [], 2, 2, seed=0)


def test_wikisql_task_files_keep_train_and_test_questions_apart(tmp_path):
    from benchmarks.common.ft_tasks import write_task_files
    from benchmarks.common.tasks import locate_datasets

    if not (locate_datasets() / "wikisql" / "wikisql.json.bz2").is_file():
        pytest.skip("WikiSQL data not present")
    paths = write_task_files("wikisql", tmp_path, 50, 20, seed=0)
    train, test = pd.read_parquet(paths["train"]), pd.read_parquet(paths["test"])
    assert len(train) == 50 and len(test) == 20 and list(train.columns) == ["prompt", "reference"]
    assert train.prompt.iloc[0].startswith("Question: ") and test.reference.str.startswith("SELECT").all()
    assert not set(train.prompt) & set(test.prompt)


def test_generic_bench_ft_end_to_end(tmp_path, task_rows, tiny_model_dir):
    """--train/--eval on a tiny model: both vocabularies fine-tuned and decoded, comparisons and composition."""
    from tasc_ray.cli.main import build_parser

    (tmp_path / "data").mkdir()
    train, evals = _task_files(tmp_path / "data", task_rows)
    parser = build_parser("bench", ["benchmarks.ft"], "test")
    args = parser.parse_args(
        ["ft", "--model", str(tiny_model_dir), "--train", str(train), "--eval", str(evals), "--train-rows", "16",
         "--eval-rows", "4", "--budget", "10", "--per-iteration", "10", "--max-steps", "1", "--trainer", "local",
         "--gen-batch-size", "2", "--max-new-tokens", "8", "--work-dir", str(tmp_path / "w"),
         "--out-dir", str(tmp_path / "out"), "--tag", "t", "--untie-embeddings", "--new-token-align-steps", "1",
         "--train-seed", "3", "--distill"]
    )  # fmt: skip
    result = args.handler(args)
    assert result["task"] == "data" and result["metrics"] == ["exact_match", "slot_f1", "chrf"]
    train = {name: run["train"] for name, run in result["runs"].items()}
    assert train["enriched"]["new_token_alignment"]["steps"] == 1 and train["original"]["new_token_alignment"] is None
    work = next((tmp_path / "w").iterdir())
    assert json.loads((work / "ft_enriched" / "finetune.json").read_text())["config"]["seed"] == 3
    assert not json.loads((work / "ft_enriched" / "config.json").read_text())["tie_word_embeddings"]
    # --distill: the enriched model trained on the original fine-tuned model's outputs for the training prompts
    distilled = train["enriched"]["distilled"]
    assert distilled["train"] == str(work / "train_distilled.parquet") and "distilled" not in train["original"]
    teacher_rows, references = pd.read_parquet(distilled["train"]), pd.read_parquet(work / "train.parquet")
    assert list(teacher_rows.prompt) == list(references.prompt)
    assert teacher_rows.output.str.len().min() > 0
    # an output the length limit cut (or an empty one) is no target: the row keeps its reference
    assert distilled["kept_reference"] >= distilled["hit_length_limit"]
    assert (teacher_rows.output == references.output).sum() >= distilled["kept_reference"]
    assert json.loads((work / "ft_enriched" / "finetune.json").read_text())["config"]["train"] == distilled["train"]
    c = result["comparisons"]["eval"]
    assert set(c["enriched+plain"]) == {
        "speedup",
        "token_reduction",
        *(f"{m}_delta{ci}" for m in ("exact_match", "slot_f1", "chrf") for ci in ("", "_ci95")),
    }
    lo, hi = c["enriched+plain"]["chrf_delta_ci95"]
    assert lo <= c["enriched+plain"]["chrf_delta"] <= hi
    assert len(result["runs"]["enriched"]["decode"]["eval"]["plain"]["outputs"]) == 4
    comp = c["composition"]
    assert comp["combined_speedup"] == pytest.approx(comp["tasc_ft_speedup"] * comp["tasc_spec_speedup_on_tasc_ft"])
    assert "tasc_ft+tasc_spec>=1.3x_tasc_ft_alone (eval)" in result["targets"]
    md = (tmp_path / "out" / "ft_data_t.md").read_text()
    assert "TASC-ft + TASC-spec vs original plain" in md and "| eval | original | plain |" in md
    # ft-compare: the run beside a variant of it, the variant's differing setting named, the deltas from comparisons
    variant = json.loads((tmp_path / "out" / "ft_data_t.json").read_text())
    variant["config"].update(tag="drop", new_token_dropout=0.2)
    (tmp_path / "out" / "ft_data_drop.json").write_text(json.dumps(variant))
    compare = parser.parse_args(["ft-compare", str(tmp_path / "out")])
    table = compare.handler(compare)
    by_tag = {r["tag"]: r for r in table["runs"]}
    assert {t: r["differs"] for t, r in by_tag.items()} == {
        "t": {"new_token_dropout": 0.0},
        "drop": {"new_token_dropout": 0.2},
    }
    assert table["common"]["untie_embeddings"] is True and table["common"]["train_seed"] == 3
    assert table["common"]["distill"] is True
    assert by_tag["t"]["splits"]["eval"]["chrf"] == pytest.approx(c["enriched+plain"]["chrf_delta"])
    assert "| drop (" in (tmp_path / "out" / "README.md").read_text()
    assert table["seed_groups"] == []
    # another fine-tuning seed of the same recipe: grouped, each delta's mean and range over the seeds
    variant["config"].update(tag="seed4", new_token_dropout=0.0, train_seed=4)
    variant["comparisons"]["eval"]["enriched+plain"]["chrf_delta"] += 2.0
    (tmp_path / "out" / "ft_data_seed4.json").write_text(json.dumps(variant))
    groups = compare.handler(compare)["seed_groups"]
    assert [g["tags"] for g in groups] == [["seed4", "t"]]  # in file order
    chrf = c["enriched+plain"]["chrf_delta"]
    assert groups[0]["splits"]["eval"]["chrf"] == {
        "mean": pytest.approx(chrf + 1.0),
        "min": pytest.approx(chrf),
        "max": pytest.approx(chrf + 2.0),
    }
    assert "## One recipe, several fine-tuning seeds" in (tmp_path / "out" / "README.md").read_text()
    # ft-eval: the run's saved models decoded again on more prompts, the same training rows, no training
    again = parser.parse_args(["ft-eval", str(tmp_path / "out" / "ft_data_t.json"), "--eval-rows", "6",
                               "--out-dir", str(tmp_path / "again"), "--gen-batch-size", "2"])  # fmt: skip
    rescored = again.handler(again)
    assert rescored["eval_rows"] == {"eval": 6} and rescored["runs"]["enriched"]["train"] == train["enriched"]
    assert rescored["config"]["gen_batch_size"] == 2
    assert rescored["rescored_from"]["result"] == str(tmp_path / "out" / "ft_data_t.json")
    assert rescored["compression"]["new_tokens"] == result["compression"]["new_tokens"]
    assert rescored["compression"]["eval"]["references"] == 6
    assert "chrf_delta_ci95" in rescored["comparisons"]["eval"]["enriched+plain"]
    md = (tmp_path / "again" / "ft_data_t_eval6.md").read_text()
    assert md.startswith("Command: `") and "decoded again" in md and "95% paired-bootstrap" in md
    with pytest.raises(ValueError, match="not a bench ft result"):
        again.handler(parser.parse_args(["ft-eval", str(tmp_path / "data" / "train.parquet"), "--eval-rows", "2"]))
    with pytest.raises(ValueError, match="no bench ft results"):
        compare.handler(parser.parse_args(["ft-compare", str(tmp_path / "data")]))
    with pytest.raises(ValueError, match="not both"):
        args.direction = "text2mr"
        args.handler(args)


def test_ft_vocab_compares_enrichment_settings(tmp_path, task_rows, tiny_model_dir):
    from benchmarks.ft_vocab import parse_variant
    from tasc_ray.cli.main import build_parser

    assert parse_variant("a:min_count=10,max_copied=0.5,prefix_filter=false") == (
        "a",
        {"min_count": 10, "max_copied": 0.5, "prefix_filter": False},
    )
    with pytest.raises(ValueError, match="unknown setting 'mincount'"):
        parse_variant("a:mincount=3")
    (tmp_path / "d").mkdir()
    train, evals = _task_files(tmp_path / "d", task_rows)
    args = build_parser("bench", ["benchmarks.ft"], "test").parse_args(
        ["ft-vocab", "--model", str(tiny_model_dir), "--train", str(train), "--eval", str(evals), "--budget", "20",
         "--min-count", "2", "--variant", "all:", "--variant", "out:max_copied=0.5", "--out-dir", str(tmp_path)]
    )  # fmt: skip
    r = args.handler(args)
    full, out = r["variants"]
    assert full["new_tokens"] == 20 and full["eval"]["reduction"] > out["eval"]["reduction"] > 0
    assert full["copied_value_share"] > 0 and out["copied_value_share"] == 0
    assert "| out | max_copied=0.5 |" in (tmp_path / "ft_vocab_d_cpu.md").read_text()


def test_ft_nll_aligns_spans_and_scores_both_models(tmp_path, task_rows, tiny_model_dir, enriched_dir):
    """Every original token's cost lands on exactly one enriched span; a model scored against itself has no excess,
    and an enriched model against the original puts its new tokens in the `new` kind."""
    from benchmarks.ft_nll import compare
    from tasc_ray.cli.main import build_parser

    original = [(0, 2, 5, 1.0), (2, 4, 6, 2.0), (4, 5, 7, 0.5), (4, 5, 8, 0.25), (5, 5, -1, 0.1)]
    enriched = [(0, 4, 100, 2.5), (4, 5, 7, 0.5), (4, 5, 8, 0.5), (5, 5, -1, 0.2)]
    totals = compare(original, enriched, base_vocab=50)
    assert totals["new"] == [1, 2.5, 3.0] and totals["after_new"] == [1, 0.5, 0.0]
    assert totals["other"] == [1, 0.5, 0.75] and totals["eos"] == [1, 0.2, 0.1]
    assert sum(v[2] for v in totals.values()) == pytest.approx(sum(n for *_, n in original))
    (tmp_path / "d").mkdir()
    train, evals = _task_files(tmp_path / "d", task_rows)
    parser = build_parser("bench", ["benchmarks.ft"], "test")
    common = ["--train", str(train), "--eval", str(evals), "--eval-rows", "3", "--out-dir", str(tmp_path)]
    same = parser.parse_args(["ft-nll", "--original", str(tiny_model_dir), "--enriched", str(tiny_model_dir), *common])
    r = same.handler(same)["splits"]["eval"]
    assert r["references"] == 3 and r["enriched_nats"] == pytest.approx(r["original_nats"], rel=1e-5)
    assert r["by_kind"]["new"]["tokens"] == 0
    args = parser.parse_args(["ft-nll", "--original", str(tiny_model_dir), "--enriched", str(enriched_dir), *common])
    r = args.handler(args)["splits"]["eval"]
    assert r["by_kind"]["new"]["tokens"] > 0 and r["by_kind"]["eos"]["tokens"] == 1
    assert "| eval | 3 | new |" in (tmp_path / "ft_nll_d_cpu.md").read_text()
