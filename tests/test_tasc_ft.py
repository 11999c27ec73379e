"""TASC-ft: vocabulary enrichment (round-trip, compression, prefix-conflict filter, embedding init, plain HF output),
fine-tuning on Ray Train (2 gloo workers, LoRA with trainable new-token rows, resume after failure, GPU selection),
the CLI's errors, and the bench's quality metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.ft import finalize, parse_slots, slot_scores, text_scores
from tasc_ray.cli.main import main
from tasc_ray.ft.enrich import (
    REPORT_FILE,
    EnrichConfig,
    VocabEnrichmentError,
    _overlaps,
    count_tokens,
    crosses,
    enrich_model,
    enrich_tokenizer,
    init_new_embeddings,
    roundtrip_failures,
    split_corpus,
)
from tasc_ray.ft.train import (
    FinetuneConfig,
    FinetuneError,
    NewRowBoost,
    _collate,
    encode_rows,
    finetune,
    new_token_ids,
    read_pairs,
    select_gpu,
)


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


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, task_rows) -> Path:
    path = tmp_path_factory.mktemp("ft-data") / "train.parquet"
    pd.DataFrame([{"prompt": r["text"] + "\nMR:\n", "output": r["output"]} for r in task_rows[:32]]).to_parquet(path)
    return path


# ----- enrichment -----
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
    from tasc_ray.ft.enrich import NewToken

    init_new_embeddings(
        model, [NewToken("ab", 50, 1, 2, 3, 3, 0.0, [4, 7]), NewToken("abc", 51, 2, 2, 3, 3, 0.0, [4, 7, 9])], 50
    )
    assert model.get_output_embeddings().weight.shape[0] == 52
    assert torch.allclose(model.get_output_embeddings().weight[51], head[[4, 7, 9]].mean(0))
    assert torch.allclose(model.get_output_embeddings().weight[:50], head)


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


def test_enrich_vocab_cli(tmp_path, tiny_model_dir, outputs, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"output": o}) + "\n" for o in outputs))
    out = tmp_path / "enriched"
    assert (
        main(
            [
                "enrich-vocab",
                "--model",
                str(tiny_model_dir),
                "--corpus",
                str(corpus),
                "--budget",
                "20",
                "--per-iteration",
                "10",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_new_tokens"] == 20 and (out / REPORT_FILE).is_file() and (out / "config.json").is_file()


# ----- fine-tuning -----
def test_encode_rows_masks_the_prompt(enriched_dir):
    tok = AutoTokenizer.from_pretrained(enriched_dir)
    rows = [{"prompt": "Sentence: x\nMR:\n", "output": "name[The Eagle], area[riverside]"}]
    ((ids, labels),) = encode_rows(tok, rows, 512)
    n_prompt = len(tok(rows[0]["prompt"])["input_ids"])
    out_ids = tok(rows[0]["output"], add_special_tokens=False)["input_ids"]
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == out_ids + [tok.eos_token_id]
    assert ids[n_prompt:] == labels[n_prompt:]


def test_new_token_lr_mult_in_full_finetuning(enriched_dir, task_rows):
    """The boost scales the new rows' AdamW step by `mult` and leaves every other row's step as it was."""
    tok = AutoTokenizer.from_pretrained(enriched_dir)
    new_ids = new_token_ids(tok)
    batch = _collate(encode_rows(tok, task_rows[:4], 512), tok.pad_token_id or 0)
    steps = {}
    for mult in (1.0, 5.0):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(enriched_dir, dtype=torch.float32)
        start = model.get_input_embeddings().weight.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        boost = NewRowBoost(model, new_ids, mult)
        model(**batch).loss.backward()
        boost.before_step()
        optimizer.step()
        boost.after_step()
        steps[mult] = model.get_input_embeddings().weight.detach() - start
    old = [i for i in range(len(tok)) if i not in set(new_ids)]
    assert steps[1.0][new_ids].abs().sum() > 0
    torch.testing.assert_close(steps[5.0][new_ids], 5 * steps[1.0][new_ids], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(steps[5.0][old], steps[1.0][old])


def test_gpu_selection():
    assert select_gpu(False) == (False, "gloo")
    assert select_gpu(True, cluster_gpus=2) == (True, "nccl")
    with pytest.raises(FinetuneError, match="no GPU"):
        select_gpu(True, cluster_gpus=0)
    if not torch.cuda.is_available():
        with pytest.raises(FinetuneError, match="no GPU"):
            select_gpu(True)


def test_read_pairs_errors(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"prompt": ["a"], "answer": ["b"]}).to_csv(path, index=False)
    with pytest.raises(FinetuneError, match="no column 'output'"):
        read_pairs(path, "prompt", "output")
    pd.DataFrame({"prompt": [""], "output": [""]}).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(FinetuneError, match="empty"):
        read_pairs(tmp_path / "e.parquet", "prompt", "output")


def test_local_trainer_resumes_after_failure(tmp_path, enriched_dir, train_file):
    cfg = dict(
        model=str(enriched_dir),
        train=str(train_file),
        out=str(tmp_path / "ft"),
        epochs=2,
        batch_size=8,
        trainer="local",
        storage_path=str(tmp_path / "storage"),
        name="run",
    )
    with pytest.raises(RuntimeError, match="injected failure"):
        finetune(FinetuneConfig(**cfg, fail_after_epoch=1))
    assert not (tmp_path / "ft").exists()
    summary = finetune(FinetuneConfig(**cfg))
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 2 and summary["steps"] == 8
    assert (tmp_path / "ft" / "config.json").is_file()


def test_ray_train_two_workers_lora_resume(ray_cluster, tmp_path, enriched_dir, train_file):
    """Two gloo workers; the first run fails after epoch 1's checkpoint; a rerun resumes and finishes."""
    cfg = dict(
        model=str(enriched_dir),
        train=str(train_file),
        out=str(tmp_path / "ft"),
        epochs=2,
        batch_size=8,
        num_workers=2,
        storage_path=str(tmp_path / "storage"),
        name="resume-test",
        lr=1e-2,
    )
    with pytest.raises(Exception, match="injected failure"):
        finetune(FinetuneConfig(**cfg, fail_after_epoch=1))
    assert not (tmp_path / "ft").exists()
    summary = finetune(FinetuneConfig(**cfg))
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 2 and summary["num_workers"] == 2
    assert summary["backend"] == "gloo" and summary["steps"] == 8
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    base = AutoModelForCausalLM.from_pretrained(enriched_dir)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ft")
    new = new_token_ids(tok)
    emb, base_emb = tuned.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert not torch.allclose(emb[new], base_emb[new]), "the new tokens' rows must be trained"
    assert torch.equal(emb[: new[0]], base_emb[: new[0]]), "LoRA leaves the original rows alone"
    assert tuned.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(tuned.state_dict()[q], base.state_dict()[q]), "LoRA merged into the weights"
    assert not any("lora" in k for k in tuned.state_dict()), "a plain HF model, not an adapter"


def test_ray_train_full_finetune_failure_config(ray_cluster, tmp_path, enriched_dir, train_file):
    """max_failures=1: the worker group is restarted from the latest checkpoint inside one fit()."""
    summary = finetune(
        FinetuneConfig(
            model=str(enriched_dir),
            train=str(train_file),
            out=str(tmp_path / "ft"),
            epochs=2,
            batch_size=8,
            full=True,
            max_failures=1,
            fail_after_epoch=1,
            storage_path=str(tmp_path / "storage"),
        )
    )
    assert summary["recipe"] == "full" and summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 2
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    base = AutoModelForCausalLM.from_pretrained(enriched_dir)
    assert not torch.allclose(tuned.get_input_embeddings().weight[:10], base.get_input_embeddings().weight[:10])


def test_finetune_refuses_use_gpu_without_gpus(ray_cluster, tmp_path, enriched_dir, train_file, capsys):
    if ray_cluster.cluster_resources().get("GPU", 0):
        pytest.skip("this cluster has GPUs")
    out = tmp_path / "ft"
    capsys.readouterr()
    assert (
        main(["finetune", "--model", str(enriched_dir), "--train", str(train_file), "--out", str(out), "--use-gpu"])
        == 2
    )
    assert "no GPU" in capsys.readouterr().err and not out.exists()
    assert (
        main(
            [
                "finetune",
                "--model",
                str(enriched_dir),
                "--train",
                str(train_file),
                "--out",
                str(out),
                "--output-column",
                "mr",
            ]
        )
        == 2
    )
    assert "no column 'mr'" in capsys.readouterr().err and not out.exists()


# ----- bench metrics -----
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
    from benchmarks.ft import E2E_DIR, load_e2e

    if not (E2E_DIR / "devset.csv").is_file():
        pytest.skip("E2E data not present")
    for direction in ("text2mr", "mr2text"):
        train, splits = load_e2e(E2E_DIR, direction, 200, 20, seed=0)
        assert len(train) == 200 and all(len(v) == 20 for v in splits.values())
        key = "output" if direction == "text2mr" else "prompt"
        train_mrs = {r[key].removeprefix("MR: ").removesuffix("\nSentence:\n") for r in train}
        held_mrs = {(h["refs"][0] if direction == "text2mr" else h["prompt"][4:-11]) for h in splits["heldout"]}
        assert held_mrs and not held_mrs & train_mrs


def test_job_entry_point(tmp_path, enriched_dir):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "jobs" / "finetune.py"),
            "--model",
            str(enriched_dir),
            "--train",
            str(tmp_path / "missing.parquet"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "training file not found" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_train_checkpoints_to_s3(ray_cluster, s3_bucket, tmp_path, enriched_dir, train_file):
    """--storage-path s3://...: checkpoints go to S3 (moto over HTTP) and the final state is read back from it."""
    import s3fs

    summary = finetune(
        FinetuneConfig(
            model=str(enriched_dir),
            train=str(train_file),
            out=str(tmp_path / "ft"),
            epochs=1,
            batch_size=8,
            storage_path=f"s3://{s3_bucket}/runs",
            name="s3",
        )
    )
    assert summary["storage_path"] == f"s3://{s3_bucket}/runs" and (tmp_path / "ft" / "config.json").is_file()
    fs = s3fs.S3FileSystem()
    assert any(p.split("/")[-1].startswith("checkpoint_") for p in fs.ls(f"{s3_bucket}/runs/s3", detail=False))
