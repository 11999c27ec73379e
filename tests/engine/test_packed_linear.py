"""Linear layers on oneDNN-packed weights: same parameters, logits within float rounding, greedy output unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.engine.model.packed_linear import PackedLinear, pack_linear_layers

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture(scope="module")
def packed_model(tiny_model):
    model = copy.deepcopy(tiny_model)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linear_layers(model) == linears > 0
    return model


def test_parameters_and_keys_are_unchanged(tiny_model, packed_model):
    assert isinstance(packed_model.lm_head, PackedLinear)
    assert packed_model.state_dict().keys() == tiny_model.state_dict().keys()
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(packed_model.state_dict()[key], value)


def test_logits_within_rounding_and_greedy_unchanged(tiny_model, packed_model, tiny_tokenizer, task_rows):
    ids = torch.tensor([tiny_tokenizer(task_rows[0]["prompt"])["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(packed_model(ids).logits, tiny_model(ids).logits, atol=1e-4, rtol=1e-4)
    prompts = [r["prompt"] for r in task_rows[:6]]
    params = SamplingParams(max_new_tokens=24)
    ours = SpeculativeGenerator(packed_model, tiny_tokenizer, None, max_batch_size=3, speculation_gate=False).generate(
        prompts, params
    )
    for prompt, result in zip(prompts, ours):
        enc = tiny_tokenizer(prompt, return_tensors="pt")
        ref = tiny_model.generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1] :]
        assert result.token_ids == ref.tolist()[: len(result.token_ids)]


def test_other_dtypes_keep_eager_layers(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert pack_linear_layers(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
