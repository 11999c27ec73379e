"""A replica's logic without Ray: how Work items group into shared decodes, and the request-side prompt checks."""

from __future__ import annotations

import pytest

from tasc_ray.serving.batching import Work, group, group_key, row_stream
from tasc_ray.spec.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.spec.prompts import PromptError, PromptTooLongError, encode_prompt


# ----- batching -----
def test_greedy_rows_share_a_decode_when_limits_stop_and_flag_match():
    a = SamplingParams(max_new_tokens=8, stop=["\n"])
    assert group_key(a) == group_key(SamplingParams(max_new_tokens=8, stop=["\n"], top_k=5, seed=1))
    assert group_key(a) != group_key(SamplingParams(max_new_tokens=9, stop=["\n"]))
    assert group_key(a) != group_key(SamplingParams(max_new_tokens=8, stop=[]))
    assert group_key(a) != group_key(SamplingParams(max_new_tokens=8, stop=["\n"], speculative=False))


def test_sampled_rows_share_only_equal_parameters_and_seeded_rows_decode_alone():
    hot = SamplingParams(temperature=0.8, top_p=0.9)
    assert group_key(hot) == group_key(SamplingParams(temperature=0.8, top_p=0.9))
    assert group_key(hot) != group_key(SamplingParams(temperature=0.8, top_p=0.8))
    assert group_key(hot) != group_key(SamplingParams())  # greedy
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    assert group_key(seeded) != group_key(SamplingParams(temperature=0.8, top_p=0.9, seed=3))


def test_group_keeps_first_appearance_order():
    greedy, short, hot = SamplingParams(), SamplingParams(max_new_tokens=4), SamplingParams(temperature=1.0)
    works = [Work([1], greedy), Work([2], hot), Work([3], greedy), Work([4], short), Work([5], hot)]
    assert group(works) == [[0, 2], [1, 4], [3]]
    seeded = SamplingParams(temperature=1.0, seed=0)
    assert group([Work([1], seeded), Work([2], seeded)]) == [[0], [1]]
    assert group([]) == []


def test_row_stream_forwards_each_rows_tokens_to_its_callback():
    params = SamplingParams()
    assert row_stream([Work([1], params), Work([2], params)]) is None
    got: dict[str, list[list[int]]] = {"a": [], "c": []}
    works = [Work([1], params, got["a"].append), Work([2], params), Work([3], params, got["c"].append)]
    stream = row_stream(works)
    stream(0, [7, 8])
    stream(1, [9])  # a row without a callback: dropped
    stream(2, [10])
    stream(0, [11])
    assert got == {"a": [[7, 8], [11]], "c": [[10]]}


# ----- request-side prompt checks -----
@pytest.fixture(scope="module")
def engine(tiny_model, tiny_tokenizer) -> SpeculativeGenerator:
    return SpeculativeGenerator(tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def request_tokenizer(tiny_model_dir):
    from tasc_ray.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))  # a second tokenizer, as a replica's event loop has


def test_request_side_encoding_matches_the_generator(request_tokenizer, engine, task_rows):
    assert request_tokenizer is not engine.tokenizer
    chat = [{"role": "user", "content": "Blue Spice is a pub."}]
    for prompt in (task_rows[0]["prompt"], chat, [5, 17, 42]):
        assert encode_prompt(request_tokenizer, prompt, engine.max_context) == engine.encode(prompt)


@pytest.mark.parametrize(
    "prompt,error,code",
    [
        ("", PromptError, "invalid_value"),
        ([], PromptError, "invalid_value"),
        ([100000], PromptError, "invalid_value"),
        ([-1], PromptError, "invalid_value"),
        ([7] * 1100, PromptTooLongError, "context_length_exceeded"),
        ("Blue Spice " * 900, PromptTooLongError, "context_length_exceeded"),
    ],
)
def test_request_side_encoding_refuses_what_the_generator_refuses(request_tokenizer, engine, prompt, error, code):
    with pytest.raises(error) as mine:
        encode_prompt(request_tokenizer, prompt, engine.max_context)
    with pytest.raises(error) as theirs:
        engine.encode(prompt)
    assert str(mine.value) == str(theirs.value) and mine.value.code == code
