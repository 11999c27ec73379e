"""Prompt grounding: the corpus's continuations ranked by how much of each token's text the row's prompt holds."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.drafter import Drafter, build_drafter
from tasc_ray.spec.grounding import FLOOR, NO_PIECES, PromptGrounding
from tasc_ray.spec.index import NgramIndex
from tasc_ray.spec.simulate import simulate_acceptance

WORDS = ["<unk>", "Sentence:", "Cotto", "Zizzi", "serves", "English", "Italian", "food", "in", "riverside", "3", "MR:"]
MERGED = ["name[Cotto],", "name[Zizzi],", "food[English],", "food[Italian],", "area[riverside]", "rating[3]", "],"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Whole words and TASC-ft-like merged slot tokens, one id each."""
    vocab = {w: i for i, w in enumerate(WORDS + MERGED)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_weight_counts_the_token_pieces_found_in_the_prompt(tokenizer):
    grounding = PromptGrounding(tokenizer)
    text = grounding.prompt_text(ids(tokenizer, "Sentence: Cotto serves English food MR:"))
    assert text == "sentence: cotto serves english food mr:"
    (english,), (italian,), (bracket,) = (ids(tokenizer, t) for t in ("food[English],", "food[Italian],", "],"))
    assert grounding.pieces(english) == ("food", "english") and grounding.pieces(bracket) == ()
    assert grounding.weight(english, text) == pytest.approx((FLOOR + 1.0) ** 2)
    assert grounding.weight(italian, text) == pytest.approx((FLOOR + 0.5) ** 2)  # "food" is there, "italian" not
    assert grounding.weight(bracket, text) == pytest.approx((FLOOR + NO_PIECES) ** 2)
    (rating,) = ids(tokenizer, "rating[3]")
    assert grounding.pieces(rating) == ("rating", "3")  # numbers count whatever their length


def test_rerank_keeps_the_total_share_and_orders_by_weighted_share(tokenizer):
    from tasc_ray.spec.drafter import _Candidate

    grounding = PromptGrounding(tokenizer)
    text = "sentence: cotto serves english food mr:"
    (english,), (italian,) = ids(tokenizer, "food[English],"), ids(tokenizer, "food[Italian],")
    cands = [_Candidate("corpus", 2, italian, 0.6), _Candidate("corpus", 2, english, 0.3)]
    cache: dict[int, float] = {}
    ranked = grounding.rerank(cands, text, cache)
    assert [c.token for c in ranked] == [english, italian]
    assert sum(c.share for c in ranked) == pytest.approx(0.9)
    assert ranked[0].share / ranked[1].share == pytest.approx((0.3 * 1.1**2) / (0.6 * 0.6**2))
    assert set(cache) == {english, italian}


def test_a_grounded_drafter_drafts_the_value_the_prompt_states(tokenizer):
    """The corpus continues name[Cotto], with food[Italian], three times and food[English], twice; a prompt that
    says English gets food[English], from a grounded drafter and food[Italian], from one without the tokenizer."""
    corpus = [ids(tokenizer, "name[Cotto], food[Italian], area[riverside]")] * 3
    corpus += [ids(tokenizer, "name[Cotto], food[English], area[riverside]")] * 2
    index = NgramIndex.build(corpus, max_order=3)
    config = DrafterConfig(mode=DraftMode.CORPUS, max_draft=2, min_path_prob=0.0, live_outputs=0, prompt_grounding=True)
    prompt = ids(tokenizer, "Sentence: Cotto serves English food in riverside MR: name[Cotto],")
    grounded, plain = Drafter(index, config, tokenizer), Drafter(index, config)
    assert grounded.propose([grounded.new_row(prompt)]) == [ids(tokenizer, "food[English], area[riverside]")]
    assert plain.propose([plain.new_row(prompt)]) == [ids(tokenizer, "food[Italian], area[riverside]")]
    (tree,) = grounded.propose_trees([grounded.new_row(prompt)], [2])
    assert tree.tokens[0] == ids(tokenizer, "food[English],")[0]  # trees take the reranked order too
    off = build_drafter(index, config.model_copy(update={"prompt_grounding": False}), tokenizer)
    assert off.grounding is None and off.propose([off.new_row(prompt)]) == plain.propose([plain.new_row(prompt)])


def test_grounding_raises_simulated_tokens_per_pass_on_copied_values(tokenizer):
    names, foods = ["Cotto", "Zizzi"], ["English", "Italian"]
    outputs, prompts = [], []
    for i in range(40):
        name, food = names[i % 2], foods[(i // 2) % 2]
        outputs.append(ids(tokenizer, f"name[{name}], food[{food}], area[riverside]"))
        prompts.append(ids(tokenizer, f"Sentence: {name} serves {food} food in riverside MR:"))
    index = NgramIndex.build(outputs[:20], max_order=3)
    config = DrafterConfig(
        mode=DraftMode.CORPUS, tree_nodes=0, live_outputs=0, min_path_prob=0.0, prompt_grounding=True
    )
    runs = {
        grounded: simulate_acceptance(
            index, outputs[20:], config, prompts[20:], batch_size=1, tokenizer=tokenizer if grounded else None
        )
        for grounded in (False, True)
    }
    assert runs[True]["tokens_per_pass"] > runs[False]["tokens_per_pass"]


def test_pieces_the_task_does_not_copy_stop_counting(tokenizer):
    """Once four finished rows held "food" in their outputs but not in their prompts, a token's "food" no longer
    counts against it: food[Italian], then weighs by "italian" alone."""
    grounding = PromptGrounding(tokenizer)
    (italian,) = ids(tokenizer, "food[Italian],")
    text = "sentence: zizzi serves italian mr:"
    assert grounding.weight(italian, text) == pytest.approx((FLOOR + 0.5) ** 2)  # "food" is not in the prompt
    for _ in range(4):
        grounding.learn(ids(tokenizer, "name[Zizzi], food[Italian],"), text)
    assert not grounding.copied("food") and grounding.copied("italian") and grounding.copied("zizzi")
    assert grounding.weight(italian, text) == pytest.approx((FLOOR + 1.0) ** 2)
    drafter = Drafter(None, DrafterConfig(live_outputs=10, prompt_grounding=True), tokenizer)
    row = drafter.new_row(ids(tokenizer, "Sentence: Cotto serves English food MR:"))
    drafter.learn(ids(tokenizer, "name[Cotto], food[English],"), row)  # the engine's call when a row finishes
    assert drafter.grounding is not None and drafter.grounding._copies["english"] == [1, 1]
