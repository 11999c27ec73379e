"""The generated sample tasks: outputs that follow from their inputs, shots apart from the rows, files on disk."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tasc_ray.sample_task import order_task, write_sample_task


def test_order_outputs_are_the_json_of_their_message():
    rows = order_task(50, seed=3)
    for row in rows:
        record = json.loads(row["output"])
        assert list(record) == ["order", "item", "quantity", "city"]
        assert str(record["order"]) in row["text"] and record["item"] in row["text"] and record["city"] in row["text"]
        assert row["prompt"].endswith(f"Input: {row['text']}\nOutput:")
        assert row["prompt"].count("Output: {") == 3  # the three shots, one per template
    assert len({r["id"] for r in rows}) == 50
    assert order_task(5, seed=3) == rows[:5]  # seeded


def test_write_sample_task_writes_disjoint_corpus_and_prompts(tmp_path):
    paths = write_sample_task(tmp_path, n_corpus=30, n_prompts=10)
    corpus, prompts = pq.read_table(paths["corpus"]).to_pylist(), pq.read_table(paths["prompts"]).to_pylist()
    assert len(corpus) == 30 and len(prompts) == 10
    assert not {r["id"] for r in corpus} & {r["id"] for r in prompts}
    assert set(prompts[0]) == {"id", "text", "prompt", "reference"}
    with pytest.raises(ValueError, match="unknown sample task 'nope'; known: orders, restaurants"):
        write_sample_task(tmp_path, task="nope")
