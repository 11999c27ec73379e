"""The roofline figures of `python -m benchmarks spec`: the work counted from a run, and the figures from it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.common.roofline import (
    ModelShape,
    Work,
    compute_ceiling,
    engine_work,
    memory_ceiling,
    roofline,
    sequential_work,
)
from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator


def test_model_shape_counts_every_linear_weight(tiny_model):
    shape = ModelShape.of(tiny_model)
    c = tiny_model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = 2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    assert shape.matmul_params == c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    assert shape.kv_bytes_per_token == 2 * c.num_hidden_layers * kv * 4


def test_sequential_work_runs_each_batch_to_its_longest_output():
    outputs = [[1] * 3, [1] * 5, [1] * 2]  # batch 2: the first batch runs 5 passes, the second 2
    work = sequential_work(outputs, [10, 20, 30], batch_size=2)
    assert work.passes == 5 + 2
    assert work.query_tokens == (10 + 20 + 2 * 5) + (30 + 1 * 2)
    assert work.kv_slots_read == 5 * (10 + 2) + 5 * (20 + 2) + 2 * (30 + 1)
    assert sequential_work(outputs, [10, 20, 30], 2, prefilled=False).query_tokens == 2 * 5 + 2


def test_engine_work_counts_drafts_and_prefill():
    rows = [
        SimpleNamespace(stats=SimpleNamespace(forward_passes=4, drafted=6), token_ids=[0] * 10),
        SimpleNamespace(stats=SimpleNamespace(forward_passes=2, drafted=0), token_ids=[0] * 3),
    ]
    work = engine_work(rows, [7, 9], prefilled_tokens=16, passes=4)
    assert work == Work(query_tokens=16 + 10 + 2, passes=4, kv_slots_read=4 * (7 + 5) + 2 * (9 + 1))


def test_engine_work_of_a_real_run(tiny_model, tiny_tokenizer, task_rows):
    """From a real generate(): one query token a pass per row without drafts, every prompt token prefilled."""
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, None, max_batch_size=2)
    prompts = [r["prompt"] for r in task_rows[:3]]
    timings = generator.timings
    results = generator.generate(prompts, SamplingParams(max_new_tokens=6))
    lengths = [len(tiny_tokenizer(p)["input_ids"]) for p in prompts]
    work = engine_work(results, lengths, timings.prompt_tokens - timings.cached_prompt_tokens, timings.steps)
    decoded = sum(r.stats.forward_passes for r in results)
    assert work.query_tokens == timings.prompt_tokens - timings.cached_prompt_tokens + decoded
    assert timings.prompt_tokens == sum(lengths) and decoded == sum(len(r.token_ids) - 1 for r in results)


def test_roofline_figures_and_shares():
    shape = ModelShape(matmul_params=1_000_000, kv_bytes_per_token=100)
    figures = roofline(Work(500, 10, 1000), 0.005, shape, 2.0, {"gflops": 1000.0, "gbps": 10.0})
    assert figures["gflops"] == pytest.approx(2e6 * 500 / 0.005 / 1e9)  # 200 GFLOP/s
    assert figures["gbps"] == pytest.approx((10 * 2e6 + 1000 * 100) / 0.005 / 1e9)  # 4.02 GB/s
    assert figures["compute_share"] == pytest.approx(0.2) and figures["memory_share"] == pytest.approx(0.402)


def test_ceilings_are_measured():
    assert compute_ceiling("fp32", m=8, n=64, k=64, repeats=2) > 0
    assert memory_ceiling(gib=1 / 64, repeats=2) > 0
