"""The recipe choice (tasc_ray.ft.recipe): field syntax detection, the candidates and their vocabulary statistics,
the bound, the no-op, the teacher-forced reading and a whole choice with pilot fine-tunes on the tiny Llama."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch

from tasc_ray.ft.enrich import EnrichConfig
from tasc_ray.ft.recipe import (
    CandidateEvidence,
    CorpusStats,
    LikelihoodProbe,
    PilotSettings,
    Recipe,
    RecipeChoice,
    RecipeError,
    VocabProbe,
    candidate_recipes,
    choose_recipe,
    decide,
    detect_field_syntax,
    split_rows,
    teacher_forced,
    verdict,
)


@pytest.fixture(scope="module")
def rows(task_rows) -> list[dict[str, str]]:
    return [{"prompt": f"Sentence: {r['text']}\nMR:\n", "output": r["output"]} for r in task_rows]


def test_detect_field_syntax():
    mrs = ["name[The Eagle], eatType[pub], food[French]", "name[Zizzi], area[riverside]"]
    assert detect_field_syntax(mrs)[:2] == ("[", ", ")
    assert detect_field_syntax(['{"name": "Eagle", "food": "French"}'] * 3)[0] == '":'
    assert detect_field_syntax(["a=1, b=2", "x=3, y=4, z=5"])[0] == "="
    end, separator, share = detect_field_syntax(["The Eagle is a pub.", "Zizzi serves French food near the river."])
    assert end is None and separator is None and share == 0.0
    # one field per output is not field syntax (a SQL query's single `x = "v"`)
    assert detect_field_syntax(['SELECT a FROM t WHERE b = "v" ;'] * 4)[0] is None


def test_candidates_follow_the_syntax():
    fields = CorpusStats(10, 1.0, 0.5, 20.0, "[", ", ", 1.0)
    free = CorpusStats(10, 1.0, 0.5, 20.0, None, None, 0.0)
    assert [r.kind for r in candidate_recipes(fields, 100, True, True)] == ["default", "key-end", "key-end-copied"]
    assert [r.kind for r in candidate_recipes(fields, 100, False, True)] == ["default", "key-end"]
    assert [r.kind for r in candidate_recipes(free, 100, True, True)] == ["default", "distill"]
    assert [r.kind for r in candidate_recipes(free, 100, True, False)] == ["default"]
    recipe = Recipe("key-end-copied", 40, key_end=("[",), max_copied=0.5)
    assert recipe.flags() == ["--budget", "40", "--key-end", "[", "--max-copied", "0.5"]
    config = recipe.enrich_config(EnrichConfig(min_count=7, per_iteration=50))
    assert (config.budget, config.per_iteration, config.key_end, config.max_copied, config.min_count) == (
        40, 40, ("[",), 0.5, 7,
    )  # fmt: skip
    assert Recipe("distill", 500, distill=True).flags() == ["--budget", "500", "--distill"]


def test_split_rows_holds_out_whole_outputs():
    outputs = [f"out {i % 20}" for i in range(100)]
    train, held = split_rows(outputs, 4, seed=0)
    held_outputs = {outputs[i] for i in held}
    assert len(held) == 4 == len(held_outputs)  # one row per held-out output
    assert not held_outputs & {outputs[i] for i in train} and len(train) == 80


def test_field_syntax_corpus_picks_key_end(tiny_tokenizer, rows):
    """Vocabulary statistics alone (no pilot): the plain vocabulary joins field names to their values and carries
    values copied from the prompt, so it is rejected as risky; a key-end recipe is chosen."""
    choice = choose_recipe(
        [r["output"] for r in rows], [r["prompt"] for r in rows], "slot_f1", 1.0,
        model=None, tokenizer=tiny_tokenizer, likelihood=False, probe_rows=32,
    )  # fmt: skip
    assert choice.corpus.key_end == "[" and choice.corpus.separator == ", "
    by_name = {c.recipe.name: c for c in choice.candidates}
    default = by_name["default-500"]
    assert default.status == "rejected" and default.vocab.name_value_share > 0.25 and "field's name" in default.reason
    assert default.vocab.crossing_share >= default.vocab.name_value_share
    assert choice.chosen is not None and choice.chosen.kind.startswith("key-end")
    chosen = by_name[choice.chosen.name]
    assert chosen.status == "chosen" and not chosen.vocab.risky and chosen.vocab.heldout_reduction > 0.05
    eligible = [c for c in choice.candidates if c.status in ("chosen", "eligible")]
    assert chosen.reduction == max(c.reduction for c in eligible)
    table = choice.table()
    assert "| default-500 |" in table and "rejected" in table and choice.message.startswith("chosen: key-end")
    json.dumps(choice.to_dict())


def test_too_small_or_varied_corpus_is_a_no_op(tiny_tokenizer):
    rng = random.Random(0)
    varied = ["".join(rng.choice(string.ascii_letters + string.digits) for _ in range(8)) for _ in range(40)]
    choice = choose_recipe(varied, None, "exact_match", 1.0, model=None, tokenizer=tiny_tokenizer, probe_rows=8)
    assert choice.no_op and choice.chosen is None
    assert "too small or too varied" in choice.message and "keep the original vocabulary" in choice.message
    assert all(c.status == "rejected" and c.vocab.new_tokens == 0 for c in choice.candidates)
    tiny = choose_recipe(["a b c"] * 3, None, model=None, tokenizer=tiny_tokenizer)
    assert tiny.no_op and "too few" in tiny.message
    with pytest.raises(RecipeError, match="empty corpus"):
        choose_recipe(["", " "], None, model=None, tokenizer=tiny_tokenizer)
    with pytest.raises(RecipeError, match="unknown metric"):
        choose_recipe(varied, None, "rouge", model=None, tokenizer=tiny_tokenizer)
    with pytest.raises(RecipeError, match="prompts"):
        choose_recipe(varied, varied[:3], model=None, tokenizer=tiny_tokenizer)


def _evidence(name: str, reduction: float, delta: float) -> CandidateEvidence:
    vocab = VocabProbe(10, "budget", reduction, reduction, 1.0, 0.0, 0.0, 0.0)
    likelihood = LikelihoodProbe(8, 16, 10.0, 9.0, 50.0 + delta, 50.0)
    c = CandidateEvidence(Recipe(name, 100), vocab=vocab, likelihood=likelihood)
    c.predicted_delta, c.predicted_by = likelihood.delta, "teacher-forced"
    return c


def test_the_bound_rejects_a_candidate_predicted_beyond_it():
    stats = CorpusStats(100, 1.0, 0.5, 20.0, "[", ", ", 1.0)
    for bound, expected in ((1.0, "key-end"), (5.0, "default")):
        choice = RecipeChoice(None, [], "slot_f1", bound, stats, "")
        cands = [_evidence("default", 0.6, -3.0), _evidence("key-end", 0.3, -0.5)]
        for c in cands:
            verdict(c, bound)
        decide(choice, cands)
        assert choice.chosen is not None and choice.chosen.kind == expected
        if bound == 1.0:
            assert cands[0].status == "rejected" and "-3.00 < -1" in cands[0].reason
            assert cands[1].status == "chosen"
        else:
            assert cands[0].status == "chosen" and cands[1].status == "eligible"
    choice = RecipeChoice(None, [], "slot_f1", 0.5, stats, "")
    cands = [_evidence("default", 0.6, -3.0), _evidence("key-end", 0.3, -0.6)]
    for c in cands:
        verdict(c, 0.5)
    decide(choice, cands)
    assert (
        choice.no_op
        and "no candidate is predicted within 0.5" in choice.message
        and "default-100 -3.00" in (choice.message)
    )


def test_teacher_forced_cost_is_the_models_loss(tiny_model, tiny_tokenizer, rows):
    held = rows[:3]
    nats, preds = teacher_forced(tiny_model, tiny_tokenizer, held, max_length=256, batch_size=2)
    assert len(nats) == len(preds) == 3
    for row, n in zip(held, nats):
        p = tiny_tokenizer(row["prompt"])["input_ids"]
        o = tiny_tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        ids = torch.tensor([p + o])
        labels = torch.tensor([[-100] * len(p) + o])
        with torch.no_grad():
            loss = tiny_model(input_ids=ids, labels=labels).loss.item()
        assert n == pytest.approx(loss * len(o), rel=1e-4)
        # the first predicted token is what greedy decoding emits first
        with torch.no_grad():
            first = tiny_model(input_ids=torch.tensor([p])).logits[0, -1].argmax().item()
    assert preds[-1].startswith(tiny_tokenizer.decode([first], skip_special_tokens=True).strip()[:1])


def test_choice_with_pilot_fine_tunes(tiny_model_dir, tiny_tokenizer, rows):
    """The whole choice on the tiny model: every probed candidate has its likelihood evidence and a prediction in
    the metric's points, probing stops at the first candidate within the bound, and the choice is explained."""
    pilot = PilotSettings(steps=2, batch_size=4, max_new_tokens=40)
    choice = choose_recipe(
        [r["output"] for r in rows[:200]], [r["prompt"] for r in rows[:200]], "slot_f1", 1.0,
        model=str(tiny_model_dir), probe_rows=12, pilot=pilot, max_pilots=2,
    )  # fmt: skip
    probed = [c for c in choice.candidates if c.likelihood is not None]
    assert 1 <= len(probed) <= 2
    for c in probed:
        assert c.likelihood.rows == 12 and c.likelihood.steps == 2 and c.predicted_delta is not None
        assert c.predicted_by in ("teacher-forced", "pilot decoding")
        assert (c.pilot is not None) == (c.predicted_by == "pilot decoding")
        assert c.status in ("chosen", "rejected", "eligible")
    ranked = sorted((c for c in choice.candidates if c.vocab and c.vocab.new_tokens), key=lambda c: -c.reduction)
    assert probed[0] is next(c for c in ranked if c.status != "rejected" or c.likelihood is not None)
    if choice.chosen is not None:
        chosen = next(c for c in choice.candidates if c.status == "chosen")
        assert chosen.predicted_delta >= -1.0 and chosen.likelihood is not None
        assert all(c.likelihood is None for c in choice.candidates if c.reason.startswith("not probed"))
    else:
        assert all(c.status == "rejected" for c in choice.candidates) and choice.message.startswith("no-op")
    assert json.loads(json.dumps(choice.to_dict()))["candidates"][0]["vocab"]["new_tokens"] >= 0
