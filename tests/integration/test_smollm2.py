"""Integration: the real SmolLM2-135M (fp32) decodes identically with and without TASC-spec, and to HF generate."""

from __future__ import annotations

import pytest
import torch

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.models import load_model
from tasc_ray.sample_task import sample_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="float32", device="cpu")


def test_real_model_greedy_identical(smollm2):
    model, tokenizer = smollm2
    rows = sample_task(400, seed=1)
    index = NgramIndex.from_texts([r["output"] for r in rows[:396]], tokenizer)
    prompts = [r["prompt"] for r in rows[396:]]
    generator = SpeculativeGenerator(
        model, tokenizer, Drafter(index, DrafterConfig(mode=DraftMode.MIXED)), max_batch_size=4, speculation_gate=False
    )
    params = SamplingParams(max_new_tokens=24)
    spec = generator.generate(prompts, params)
    assert sum(r.stats.accepted for r in spec) > 0  # the drafts were really used
    for prompt, result in zip(prompts[:2], spec):
        enc = tokenizer(prompt, return_tensors="pt")
        expected = model.generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1] :]
        assert result.token_ids == expected.tolist()
    plain = generator.generate(prompts, SamplingParams(max_new_tokens=24, speculative=False))
    assert [r.token_ids for r in plain] == [r.token_ids for r in spec]
    assert spec[0].text.strip().startswith("name[")  # the few-shot format is followed


def test_real_model_chat_and_index_tokenizer_check(smollm2, tiny_tokenizer):
    model, tokenizer = smollm2
    generator = SpeculativeGenerator(model, tokenizer, None, speculation_gate=False)
    result = generator.generate([[{"role": "user", "content": "Say hello."}]], SamplingParams(max_new_tokens=8))[0]
    assert result.prompt_tokens > 10 and result.new_tokens >= 1
    foreign = NgramIndex.build([[1, 2, 3]], tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="rebuild the index"):
        SpeculativeGenerator(model, tokenizer, Drafter(foreign, DrafterConfig()), speculation_gate=False)
    assert torch.get_default_dtype() == torch.float32
