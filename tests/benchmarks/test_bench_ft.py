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
