"""benchmarks.common.metrics on small hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import pytest

from benchmarks.common.metrics import (
    corpus_text_score,
    exact_match,
    parse_slots,
    share_identical,
    slot_f1,
    slot_scores,
    stated_values,
    text_scores,
    text_segment_stats,
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


def test_per_output_text_statistics_sum_to_sacrebleu_corpus_scores():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog ran in the park today", "nothing alike"]
    refs = [["the cat sat on a mat"], ["a dog ran in the park", "the dog ran"], ["entirely different words here"]]
    streams = [[r[0] for r in refs], [r[-1] for r in refs]]  # the second stream repeats a single reference
    for name, corpus in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        stats = text_segment_stats(name, preds, refs)
        assert stats.shape[0] == 3
        assert corpus_text_score(name, stats.sum(0)) == pytest.approx(corpus(preds, streams).score)
        # a subset's rows give that subset's corpus score (what the bootstrap resamples)
        sub = corpus(preds[:2], [s[:2] for s in streams]).score
        assert corpus_text_score(name, stats[:2].sum(0)) == pytest.approx(sub)


def test_stated_values_counts_the_mr_values_a_sentence_states():
    mr = "name[The Eagle], eatType[coffee shop], food[English], area[riverside], near[Burger King], priceRange[cheap]"
    # priceRange is not counted (paraphrased freely); "coffee", "British" and "river" are the values' other wordings
    assert stated_values(mr, "The Eagle is a British coffee place by the river near Burger King.") == (5, 5)
    assert stated_values(mr, "The Eagle serves Italian food.") == (1, 5)
    assert stated_values("familyFriendly[yes], customer rating[low]", "Kids welcome.") == (0, 0)
    # in a prompt, the first attribute is the words right before `[`, not the prompt's text before them
    assert stated_values("MR: familyFriendly[yes], name[Zizzi]\nSentence:\n", "Zizzi.") == (1, 1)
