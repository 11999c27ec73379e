"""TASC-ft fine-tuning on Ray Train: two gloo workers with LoRA and trainable new-token rows resuming after an
injected failure, full fine-tuning restarted by the failure config, checkpoints on S3 (slow)."""

from __future__ import annotations

import sys

import pytest
import torch
from ray import cloudpickle
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasc_ray.ft.train import FinetuneConfig, new_token_ids
from tasc_ray.stages.finetune import finetune

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the failure hook travels by value to the workers


def fail_once_after_epoch_1(epoch: int, resumed_from: int | None) -> None:
    """The injected failure: after epoch 1's checkpoint, in a run (or worker group) that did not resume."""
    if epoch == 1 and resumed_from is None:
        raise RuntimeError(f"injected failure after epoch {epoch}")


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
        finetune(FinetuneConfig(**cfg), after_epoch=fail_once_after_epoch_1)
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
            storage_path=str(tmp_path / "storage"),
        ),
        after_epoch=fail_once_after_epoch_1,
    )
    assert summary["recipe"] == "full" and summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 2
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    base = AutoModelForCausalLM.from_pretrained(enriched_dir)
    assert not torch.allclose(tuned.get_input_embeddings().weight[:10], base.get_input_embeddings().weight[:10])


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
