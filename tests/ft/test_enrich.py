"""TASC-ft vocabulary enrichment: round-trip, compression, the prefix-conflict filter, field boundaries, the
overlap rule, embedding init, the plain HF output and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tasc_ray.cli.main import main
from tasc_ray.ft.enrich import (
    REPORT_FILE,
    EnrichConfig,
    NewToken,
    VocabEnrichmentError,
    _overlaps,
    count_tokens,
    crosses,
    enrich_model,
    enrich_tokenizer,
    goes_past,
    init_new_embeddings,
    is_field_name,
    roundtrip_failures,
    split_corpus,
)
from tasc_ray.ft.train import new_token_ids
from tests.conftest import build_tiny_tokenizer


@pytest.fixture(scope="module")
def outputs(task_rows) -> list[str]:
    return [r["output"] for r in task_rows]


@pytest.fixture(scope="module")
def enriched(tiny_tokenizer, outputs):
    return enrich_tokenizer(tiny_tokenizer, outputs, EnrichConfig(budget=60, per_iteration=20), progress=False)


@pytest.fixture(scope="module")
def enriched_dir(tmp_path_factory, tiny_model_dir, outputs) -> Path:
    out = tmp_path_factory.mktemp("enriched") / "model"
    enrich_model(str(tiny_model_dir), outputs, out, EnrichConfig(budget=40, per_iteration=20), progress=False)
    return out


def test_enrichment_round_trips_and_compresses(tiny_tokenizer, outputs, enriched):
    tok = enriched.tokenizer
    assert 0 < len(enriched.new_tokens) <= 60
    assert len(tiny_tokenizer) == 400, "the input tokenizer must be left unchanged"
    assert [t.id for t in enriched.new_tokens] == list(range(400, 400 + len(enriched.new_tokens)))
    assert roundtrip_failures(tok, outputs, limit=len(outputs)) == []
    for t in enriched.new_tokens:
        assert tok.decode([t.id]) == t.token and t.score == t.count * (t.n - 1) and t.n >= 2
        assert tok(t.token, add_special_tokens=False)["input_ids"] == [t.id]
    # iterations build on earlier tokens: some later token contains an earlier one
    first = {t.token for t in enriched.new_tokens if t.iteration == 1}
    assert any(any(f in t.token and f != t.token for f in first) for t in enriched.new_tokens if t.iteration > 1)
    held = enriched.tokens_per_output["heldout"]
    assert held["after"] < 0.75 * held["before"]
    _, held_texts = split_corpus(outputs, 0.1, 0)
    assert held["after"] == pytest.approx(count_tokens(tok, held_texts) / len(held_texts), abs=1e-3)
    assert not set(held_texts) & set(split_corpus(outputs, 0.1, 0)[0]), "held-out texts never appear in training"


def test_prefix_conflict_filter(tiny_tokenizer, outputs, enriched):
    assert all(t.conflict <= 0.1 for t in enriched.new_tokens)
    assert sum(it.dropped_conflict for it in enriched.iterations) > 0
    off = enrich_tokenizer(
        tiny_tokenizer, outputs, EnrichConfig(budget=60, per_iteration=20, prefix_filter=False), progress=False
    )
    assert sum(it.dropped_conflict for it in off.iterations) == 0
    assert max(t.conflict for t in off.new_tokens) > 0.1
    assert roundtrip_failures(off.tokenizer, outputs, limit=len(outputs)) == []


def test_field_boundaries(tiny_tokenizer, outputs, enriched):
    assert crosses("], food[English", ", ") and crosses("a, b, c", ", ")
    assert not crosses(", food[English]", ", ") and not crosses("food[English], ", ", ") and not crosses(", ", ", ")
    assert any(crosses(t.token, ", ") for t in enriched.new_tokens), "the default spans fields"
    kept = enrich_tokenizer(
        tiny_tokenizer, outputs, EnrichConfig(budget=60, per_iteration=20, no_cross=(", ",)), progress=False
    )
    assert kept.new_tokens and not any(crosses(t.token, ", ") for t in kept.new_tokens)
    assert sum(it.dropped_crossing for it in kept.iterations) > 0
    assert roundtrip_failures(kept.tokenizer, outputs, limit=len(outputs)) == []
    with pytest.raises(VocabEnrichmentError, match="no_cross"):
        EnrichConfig(no_cross=("",)).validate()


def test_field_names_apart_from_values(tiny_tokenizer, outputs, task_rows):
    """With key_end, a new token may end a field's name but never holds the value after it."""
    assert goes_past(" food[English],", "[") and goes_past("[English]", "[") and goes_past("a[b[", "[")
    assert not goes_past(" food[", "[") and not goes_past("English],", "[") and not goes_past("[", "[")
    assert any(
        goes_past(t.token, "[")
        for t in enrich_tokenizer(
            tiny_tokenizer, outputs, EnrichConfig(budget=60, per_iteration=20, no_cross=(", ",)), progress=False
        ).new_tokens
    ), "without key_end a field's name and value share tokens"
    config = EnrichConfig(budget=60, per_iteration=20, no_cross=(", ",), key_end=("[",))
    kept = enrich_tokenizer(tiny_tokenizer, outputs, config, progress=False)
    assert kept.new_tokens and not any(goes_past(t.token, "[") for t in kept.new_tokens)
    assert any(t.token.endswith("[") for t in kept.new_tokens), "field names still become tokens"
    assert roundtrip_failures(kept.tokenizer, outputs, limit=len(outputs)) == []
    with pytest.raises(VocabEnrichmentError, match="key_end"):
        EnrichConfig(key_end=("",)).validate()


def test_copied_values_stay_out_of_new_tokens(tiny_tokenizer, task_rows, outputs):
    """With max_copied, no new token carries a piece of a value its rows' prompts hold (names, foods, areas)."""
    from tasc_ray.ft.enrich import CopiedValues

    prompts = [r["text"] for r in task_rows]
    values = CopiedValues(["name[The Eagle], food[Thai]", "name[Zizzi]"], ["The Eagle serves Thai food.", "Zizzi."])
    assert values.share("name[The") == 1.0 and values.share("agle],") == 1.0 and values.share("name[") == 0.0
    assert values.share("], ") == 0.0  # no word piece: nothing to copy
    config = EnrichConfig(budget=60, per_iteration=20, max_copied=0.5)
    kept = enrich_tokenizer(tiny_tokenizer, outputs, config, progress=False, prompts=prompts)
    assert kept.new_tokens and sum(it.dropped_copied for it in kept.iterations) > 0
    rows = CopiedValues(outputs, prompts)
    assert all(rows.share(t.token) <= 0.5 for t in kept.new_tokens)

    default = enrich_tokenizer(tiny_tokenizer, outputs, EnrichConfig(budget=60, per_iteration=20), progress=False)
    assert any(rows.share(t.token) > 0.5 for t in default.new_tokens), "without the filter values become tokens"
    assert roundtrip_failures(kept.tokenizer, outputs, limit=len(outputs)) == []
    with pytest.raises(VocabEnrichmentError, match="needs the rows' prompts"):
        enrich_tokenizer(tiny_tokenizer, outputs, config, progress=False)
    with pytest.raises(VocabEnrichmentError, match="outputs but"):
        enrich_tokenizer(tiny_tokenizer, outputs, config, progress=False, prompts=prompts[:3])


def test_field_names_are_not_copied_values():
    """With key_end, a field's name is spared by the copied-value filter even where the prompts say it."""
    outputs = [f"near[{v}], rating[{r}]" for v in ("The Eagle", "Zizzi", "The Mill") for r in ("high", "low")] * 6
    prompts = [f"It is near {o[5 : o.index(']')]} and its rating is {o[o.rindex('[') + 1 : -1]}." for o in outputs]
    from tasc_ray.ft.enrich import CopiedValues

    assert CopiedValues(outputs, prompts).share(" rating[") == 1.0 and is_field_name(" rating[", ("[",))
    tok = build_tiny_tokenizer(outputs + prompts)
    base = EnrichConfig(budget=20, per_iteration=10, min_count=2, no_cross=(", ",), max_copied=0.5)
    plain = enrich_tokenizer(tok, outputs, base, progress=False, prompts=prompts).new_tokens
    named = enrich_tokenizer(tok, outputs, replace(base, key_end=("[",)), progress=False, prompts=prompts).new_tokens
    assert not any(t.token.endswith("rating[") for t in plain), "without key_end the field's name counts as copied"
    assert any(t.token.endswith("rating[") for t in named)


def test_non_ascii_and_budget_stop(tiny_tokenizer):
    texts = [f"price[less than £20], name[Café {i % 7}], area[riverside]" for i in range(60)]
    result = enrich_tokenizer(
        tiny_tokenizer, texts, EnrichConfig(budget=15, per_iteration=4, holdout=0.0), progress=False
    )
    assert len(result.new_tokens) <= 15 and result.stop_reason
    assert roundtrip_failures(result.tokenizer, texts, limit=100) == []
    assert all(result.tokenizer.decode([t.id]) == t.token for t in result.new_tokens)


def test_overlap_rule():
    assert _overlaps((1, 2), (2, 3))  # suffix of one = prefix of the other
    assert _overlaps((1, 2, 3), (2, 3))  # containment
    assert not _overlaps((1, 2), (1, 3))  # a shared first token only: they diverge, no conflict
    assert not _overlaps((1, 2), (3, 4))


def test_enrich_model_writes_plain_hf_dir(tiny_model_dir, enriched_dir):
    report = json.loads((enriched_dir / REPORT_FILE).read_text())
    tok = AutoTokenizer.from_pretrained(enriched_dir)
    model = AutoModelForCausalLM.from_pretrained(enriched_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert len(tok) == report["vocab_size_after"] == model.get_input_embeddings().weight.shape[0]
    assert [t["token"] for t in report["new_tokens"]] == [tok.decode([i]) for i in new_token_ids(tok)]
    emb, base_emb = model.get_input_embeddings().weight, base.get_input_embeddings().weight
    for t in report["new_tokens"]:
        assert torch.allclose(emb[t["id"]], base_emb[t["base_ids"]].mean(0), atol=1e-6)
    assert torch.equal(emb[:400], base_emb)
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    # the chat template still works and uses the new tokens for an assistant output
    output = report["new_tokens"][0]["token"] + " " + report["new_tokens"][1]["token"]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": output}], tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert report["new_tokens"][0]["id"] in ids
    assert tok.decode(ids).count(output) == 1
    assert report["tokens_per_output"]["heldout"]["reduction"] > 0.25


def test_untied_lm_head_rows_are_means():
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    head = model.get_output_embeddings().weight.detach().clone()
    init_new_embeddings(
        model, [NewToken("ab", 50, 1, 2, 3, 3, 0.0, [4, 7]), NewToken("abc", 51, 2, 2, 3, 3, 0.0, [4, 7, 9])], 50
    )
    assert model.get_output_embeddings().weight.shape[0] == 52
    assert torch.allclose(model.get_output_embeddings().weight[51], head[[4, 7, 9]].mean(0))
    assert torch.allclose(model.get_output_embeddings().weight[:50], head)


def test_untie_embeddings_gives_the_new_tokens_input_and_output_rows_apart(tmp_path, tiny_model_dir, outputs):
    """--untie-embeddings: the saved model has an LM head of its own, the same model before training (same logits on
    every token), both matrices' new rows start as the mean, and they train apart; LoRA makes the head's new rows
    trainable too (a tied head follows the embedding)."""
    from tasc_ray.ft.train import LoopConfig, build_model

    out = tmp_path / "untied"
    report = enrich_model(str(tiny_model_dir), outputs, out, EnrichConfig(budget=20), progress=False, untie=True)
    assert report["untied_embeddings"]
    tied = tmp_path / "tied"
    assert not enrich_model(str(tiny_model_dir), outputs, tied, EnrichConfig(budget=20), progress=False)[
        "untied_embeddings"
    ]
    untied_model = AutoModelForCausalLM.from_pretrained(out)
    tied_model = AutoModelForCausalLM.from_pretrained(tied)
    head, emb = untied_model.get_output_embeddings().weight, untied_model.get_input_embeddings().weight
    assert head.data_ptr() != emb.data_ptr() and not untied_model.config.tie_word_embeddings
    assert torch.equal(head, emb) and torch.equal(emb, tied_model.get_input_embeddings().weight)
    ids = torch.tensor([[1, 5, 9] + [t["id"] for t in report["new_tokens"][:3]]])
    torch.testing.assert_close(untied_model(ids).logits, tied_model(ids).logits)
    new = [t["id"] for t in report["new_tokens"]]
    lora, _ = build_model(LoopConfig(model_path=str(out), rows=[]))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad and "lora_" not in n}
    assert len(trainable) == 2 and any("lm_head" in n for n in trainable)
    lora_tied, _ = build_model(LoopConfig(model_path=str(tied), rows=[]))
    assert len({n for n, p in lora_tied.named_parameters() if p.requires_grad and "lora_" not in n}) == 1
    full, _ = build_model(LoopConfig(model_path=str(out), rows=[], full=True))
    with torch.no_grad():
        full.get_output_embeddings().weight[new[0]] += 1.0
    assert not torch.equal(full.get_output_embeddings().weight[new[0]], full.get_input_embeddings().weight[new[0]])


def test_bad_enrichment_input(tmp_path, tiny_model_dir, tiny_model, outputs, capsys):
    out = tmp_path / "out"
    with pytest.raises(VocabEnrichmentError, match="budget"):
        enrich_model(str(tiny_model_dir), outputs, out, EnrichConfig(budget=0))
    with pytest.raises(VocabEnrichmentError, match="empty corpus"):
        enrich_model(str(tiny_model_dir), ["", ""], out)
    no_tok = tmp_path / "no-tokenizer"
    tiny_model.save_pretrained(no_tok)
    with pytest.raises(VocabEnrichmentError, match="tokenizer"):
        enrich_model(str(no_tok), outputs, out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    corpus = tmp_path / "c.csv"
    pd.DataFrame({"mr": outputs}).to_csv(corpus, index=False)
    capsys.readouterr()
    assert (
        main(
            [
                "enrich-vocab",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus),
                "--column",
                "output",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'output'" in err[0]
    assert (
        main(
            [
                "enrich-vocab",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus),
                "--column",
                "mr",
                "--budget",
                "0",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert not out.exists()
