"""TASC-ft fine-tuning without Ray: reading the pairs (every format, clear errors), encoding with the prompt masked,
the new rows' learning-rate boost, GPU selection, and the local trainer resuming after an injected failure."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasc_ray.ft.train import (
    FinetuneConfig,
    FinetuneError,
    LoopConfig,
    NewRowAlignment,
    NewRowBoost,
    NewTokenDropout,
    _collate,
    base_spellings,
    encode_rows,
    new_token_ids,
    read_pairs,
    select_gpu,
)
from tasc_ray.stages.finetune import finetune


def fail_once_after_epoch_1(epoch: int, resumed_from: int | None) -> None:
    """The injected failure: after epoch 1's checkpoint, in a run that did not resume."""
    if epoch == 1 and resumed_from is None:
        raise RuntimeError(f"injected failure after epoch {epoch}")


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


def test_base_spellings_are_the_enrichment_s_original_tokenisation(enriched_dir):
    tok = AutoTokenizer.from_pretrained(enriched_dir)
    report = json.loads((enriched_dir / "tasc_ft_vocab.json").read_text())
    spellings = base_spellings(tok, new_token_ids(tok))
    assert spellings == {t["id"]: t["base_ids"] for t in report["new_tokens"]}
    assert all(i < report["vocab_size_before"] for ids in spellings.values() for i in ids)


def test_new_token_dropout_spells_output_tokens_in_original_tokens(enriched_dir, task_rows):
    """p=0 changes nothing; at p=0.5 some of the output's new tokens are spelled out, the text is the same, the
    prompt (as inference tokenises it) and the labels' alignment are kept, and the same seed draws the same."""
    import random

    tok = AutoTokenizer.from_pretrained(enriched_dir)
    new = set(new_token_ids(tok))
    rows = [{"prompt": r["output"] + "\nMR:\n", "output": r["output"]} for r in task_rows[:8]]  # new tokens in both
    examples = encode_rows(tok, rows, 512)
    assert not NewTokenDropout(tok, sorted(new), 0.0).active
    dropout = NewTokenDropout(tok, sorted(new), 0.5)
    for (ids, labels), row in zip(examples, rows):
        n_prompt = labels.count(-100)
        out_ids, out_labels = dropout.apply((ids, labels), random.Random(0), 512)
        assert (out_ids, out_labels) == dropout.apply((ids, labels), random.Random(0), 512)
        assert out_ids[:n_prompt] == ids[:n_prompt] and any(i in new for i in ids[:n_prompt])
        assert out_labels[:n_prompt] == [-100] * n_prompt and out_labels[n_prompt:] == out_ids[n_prompt:]
        assert tok.decode(out_ids[n_prompt:-1]) == row["output"]
        kept = sum(i in new for i in out_ids[n_prompt:])
        assert kept < sum(i in new for i in ids[n_prompt:])
    everything = NewTokenDropout(tok, sorted(new), 0.999999)
    ids, labels = everything.apply(examples[0], random.Random(1), 512)
    assert not any(i in new for i in ids[labels.count(-100) :])
    assert everything.apply(examples[0], random.Random(1), 10)[0] == ids[:10]
    with pytest.raises(FinetuneError, match="new_token_dropout"):
        FinetuneConfig(model="m", train="t", out="o", new_token_dropout=1.0).validate()


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
        new_token_dropout=0.3,  # drawn per step: the resumed run trains on the same spellings
        new_token_align_steps=2,  # before the first epoch only; its record survives the resume
        trainer="local",
        storage_path=str(tmp_path / "storage"),
        name="run",
    )
    with pytest.raises(RuntimeError, match="injected failure"):
        finetune(FinetuneConfig(**cfg), after_epoch=fail_once_after_epoch_1)
    assert not (tmp_path / "ft").exists()
    summary = finetune(FinetuneConfig(**cfg))
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 2 and summary["steps"] == 8
    assert summary["new_token_alignment"]["steps"] == 2
    assert (tmp_path / "ft" / "config.json").is_file()


def test_read_pairs_every_format(tmp_path, task_rows, s3_bucket):
    """parquet, jsonl and csv, a directory of them, and S3: the same rows; a row without a prompt is skipped."""
    rows = [{"prompt": r["text"], "output": r["output"]} for r in task_rows[:6]]
    pd.DataFrame(rows[:2]).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:4]))
    pd.DataFrame(rows[4:] + [{"prompt": "", "output": "x"}]).to_csv(tmp_path / "c.csv", index=False)
    assert read_pairs(tmp_path, "prompt", "output") == rows
    assert read_pairs(tmp_path / "b.jsonl", "prompt", "output") == rows[2:4]
    from tasc_ray.io import fsspec_filesystem

    fs, _ = fsspec_filesystem(f"s3://{s3_bucket}")
    with fs.open(f"{s3_bucket}/train/b.jsonl", "wb") as f:
        f.write((tmp_path / "b.jsonl").read_bytes())
    assert read_pairs(f"s3://{s3_bucket}/train/", "prompt", "output") == rows[2:4]
    with pytest.raises(FinetuneError, match="training file not found"):
        read_pairs(tmp_path / "missing.parquet", "prompt", "output")


def test_loop_config_is_typed_and_the_public_config_has_no_test_hook():
    cfg = FinetuneConfig(model="m", train="t.parquet", out="o", full=True, lr=None, new_token_lr_mult=4.0)
    loop = LoopConfig.from_job(cfg, "/models/m", [{"prompt": "p", "output": "o"}])
    assert (loop.model_path, loop.full, loop.lr, loop.new_token_lr_mult) == ("/models/m", True, 5e-5, 4.0)
    assert not hasattr(cfg, "fail_after_epoch")
    with pytest.raises(FinetuneError, match="trainer"):
        FinetuneConfig(model="m", train="t", out="o", trainer="spark").validate()


@pytest.mark.parametrize("full", [True, False])
def test_new_token_warmup_trains_the_new_rows_alone(tmp_path, enriched_dir, task_rows, full):
    """Warm-up steps move the new tokens' rows and nothing else (full fine-tuning and LoRA); none on resume."""
    from tasc_ray.ft.train import LocalSession, _setup, _warm_up_new_rows

    rows = [{"prompt": r["text"] + "\nMR:\n", "output": r["output"]} for r in task_rows[:16]]
    loop = LoopConfig(model_path=str(enriched_dir), rows=rows, full=full, lr=1e-2, batch_size=4)
    loop.new_token_warmup_steps = 3
    t = _setup(loop, LocalSession(tmp_path / "s", use_gpu=False))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    _warm_up_new_rows(t, loop, LocalSession(tmp_path / "s", use_gpu=False))
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}
    new_ids = new_token_ids(AutoTokenizer.from_pretrained(enriched_dir))
    if full:
        assert changed == {"model.embed_tokens.weight"}
        emb = dict(t.model.named_parameters())["model.embed_tokens.weight"]
        moved = (emb != before["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten().tolist()
        assert moved and set(moved) <= set(new_ids)
    else:
        assert changed and all("trainable_tokens_delta" in n for n in changed)
    t.step = 5  # a resumed run does not warm up again
    snapshot = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    _warm_up_new_rows(t, loop, LocalSession(tmp_path / "s", use_gpu=False))
    assert all(torch.equal(p, snapshot[n]) for n, p in t.model.named_parameters())
    with pytest.raises(FinetuneError, match="new_token_warmup_steps"):
        FinetuneConfig(model="m", train="t", out="o", new_token_warmup_steps=-1).validate()


def test_new_row_alignment_spells_and_scores_the_reading_of_new_tokens(enriched_dir, task_rows):
    """The teacher sequence spells every new token in its original tokens and each position maps to the last piece
    of its spelling; a sequence without new tokens reads the same in both (KL 0), one with new tokens does not."""
    tok = AutoTokenizer.from_pretrained(enriched_dir)
    new = new_token_ids(tok)
    model = AutoModelForCausalLM.from_pretrained(enriched_dir, dtype=torch.float32)
    alignment = NewRowAlignment(tok, new, model.get_input_embeddings().weight.shape[0])
    spellings = base_spellings(tok, new)
    ids = tok(task_rows[0]["output"], add_special_tokens=False)["input_ids"]
    assert any(i in spellings for i in ids)
    spelled, last = alignment.spell(ids)
    assert not any(i in spellings for i in spelled) and tok.decode(spelled) == tok.decode(ids)
    assert len(last) == len(ids) and last[-1] == len(spelled) - 1
    for j, i in enumerate(ids):
        start = last[j - 1] + 1 if j else 0
        assert spelled[start : last[j] + 1] == spellings.get(i, [i])
    plain = [i for i in range(len(tok)) if i not in set(new)][100:140]
    with torch.no_grad():
        assert alignment.loss(model, [plain], tok.pad_token_id or 0, torch.device("cpu")).item() < 1e-5
        assert alignment.loss(model, [ids, plain], tok.pad_token_id or 0, torch.device("cpu")).item() > 1e-3


@pytest.mark.parametrize("full", [True, False])
def test_new_row_alignment_trains_the_new_rows_alone(tmp_path, enriched_dir, task_rows, full):
    """Alignment steps move the new tokens' rows and nothing else (full fine-tuning and LoRA), lower the KL on rows
    they did not train on, leave the main optimizer untouched, and do not run again on resume."""
    from tasc_ray.ft.train import LocalSession, _align_new_rows, _setup

    rows = [{"prompt": r["text"] + "\nMR:\n", "output": r["output"]} for r in task_rows[:24]]
    loop = LoopConfig(model_path=str(enriched_dir), rows=rows[:16], full=full, batch_size=4)
    loop.new_token_align_steps, loop.new_token_align_lr = 8, 3e-2
    session = LocalSession(tmp_path / "s", use_gpu=False)
    t = _setup(loop, session)
    held = [ids for ids, _ in encode_rows(AutoTokenizer.from_pretrained(enriched_dir), rows[16:], 512)]
    with torch.no_grad():
        before_kl = t.alignment.loss(t.model, held, t.pad_id, session.device).item()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    _align_new_rows(t, loop, session)
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}
    if full:
        assert changed == {"model.embed_tokens.weight"}
        emb = dict(t.model.named_parameters())["model.embed_tokens.weight"]
        moved = (emb != before["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten().tolist()
        assert moved and set(moved) <= set(new_token_ids(AutoTokenizer.from_pretrained(enriched_dir)))
    else:
        assert changed and all("trainable_tokens_delta" in n for n in changed)
    with torch.no_grad():
        assert t.alignment.loss(t.model, held, t.pad_id, session.device).item() < before_kl
    assert t.aligned["steps"] == 8 and t.aligned["kl_last"] < t.aligned["kl_first"]
    assert not t.optimizer.state  # the alignment has its own optimizer
    t.step = 5  # a resumed run does not align again
    snapshot = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    _align_new_rows(t, loop, session)
    assert all(torch.equal(p, snapshot[n]) for n, p in t.model.named_parameters())
    with pytest.raises(FinetuneError, match="new_token_align"):
        FinetuneConfig(model="m", train="t", out="o", new_token_align_lr=0).validate()
