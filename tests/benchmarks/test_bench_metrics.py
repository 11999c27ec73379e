"""benchmarks.common.metrics on small hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import pytest

from benchmarks.common.metrics import (
    exact_match,
    parse_slots,
    share_identical,
    slot_f1,
    slot_scores,
    text_scores,
)

MR = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5]"


def test_parse_slots_strips_attributes_and_values():
    assert parse_slots(MR) == {("name", "The Eagle"), ("eatType", "coffee shop"), ("customer rating", "5 out of 5")}
    assert parse_slots(" name[ Zizzi ] ,area[riverside]") == {("name", "Zizzi"), ("area", "riverside")}
    assert parse_slots("no slots here") == set()


def test_slot_f1_and_exact_match_by_hand():
    assert slot_scores([MR], [MR]) == {"exact_match": 100.0, "slot_f1": 100.0}
    # 1 of 2 predicted slots right, 1 of 3 reference slots found: P = 1/2, R = 1/3, F1 = 2PR / (P + R) = 0.4
    partial = slot_scores(["name[The Eagle], eatType[pub]"], [MR])
    assert partial["exact_match"] == 0.0 and partial["slot_f1"] == pytest.approx(40.0)
    assert slot_f1(["name[The Eagle], eatType[pub]"], [MR]) == pytest.approx(0.4)
    # micro F1 pools the slots of every output: tp 3 + 0, predicted 3 + 1, reference 3 + 1 -> 2*3/8
    pooled = [MR, "area[riverside]"], [MR, "area[city centre]"]
    assert slot_f1(*pooled) == pytest.approx(0.75)
    assert slot_scores(*pooled) == {"exact_match": 50.0, "slot_f1": pytest.approx(75.0)}
    # the same slots in another order and spacing are an exact match
    reordered = "customer rating[5 out of 5],name[The Eagle], eatType[coffee shop]"
    assert slot_scores([reordered], [MR])["exact_match"] == 100.0


def test_slot_metrics_with_no_slots():
    assert slot_f1(["nothing"], ["none either"]) == 0.0
    # an output without slots never counts as an exact match, even against a reference without slots
    assert slot_scores(["nothing"], ["none either"]) == {"exact_match": 0.0, "slot_f1": 0.0}
    assert slot_scores([], []) == {"exact_match": 0.0, "slot_f1": 0.0}


def test_exact_match_and_share_identical():
    assert exact_match([" SELECT 1 ", "a"], ["SELECT 1", "b"]) == 0.5
    assert exact_match(["x"], ["x\n"]) == 1.0
    assert exact_match([], []) == 0.0
    assert share_identical([[1, 2], [3]], [[1, 2], [3, 4]]) == 0.5
    assert share_identical(["a", "b", "c", "d"], ["a", "b", "c", "d"]) == 1.0


def test_text_scores_bleu_and_chrf():
    sentence = "the cat sat on the mat today"
    assert text_scores([sentence], [[sentence]]) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    # outputs with different numbers of references: each is scored against any of its own
    scores = text_scores([sentence, "a dog ran"], [["a different sentence", sentence], ["a dog ran"]])
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert text_scores(["completely unrelated words"], [[sentence]])["bleu"] < 10
