"""A replica's logic without Ray: the request-side prompt checks."""

from __future__ import annotations

import pytest

from tasc_ray.engine.generator import SpeculativeGenerator
from tasc_ray.engine.prompts import PromptError, PromptTooLongError, encode_prompt


# ----- request-side prompt checks -----
@pytest.fixture(scope="module")
def engine(tiny_model, tiny_tokenizer) -> SpeculativeGenerator:
    return SpeculativeGenerator(tiny_model, tiny_tokenizer, speculation_gate=False)


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
