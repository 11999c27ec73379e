"""A replica's logic without Ray: the request-side prompt checks, and reading its live overlay."""

from __future__ import annotations

import pytest

from tasc_ray.engine.drafts.index import tokenizer_fingerprint
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


# ----- the live overlay, read on the decode thread -----
class _NoMetrics:
    def finished(self, request, loop_stats) -> None:
        pass

    def prefix_cache(self, timings) -> None:
        pass


def _replica(tiny_model_dir, **drafter):
    from tasc_ray.serving.config import ServeConfig
    from tasc_ray.serving.replica import Replica

    config = ServeConfig.model_validate(
        {
            "engine": {
                "model": str(tiny_model_dir),
                "max_batch_size": 4,
                "experimental": {"profile_step_costs": False},
                "drafter": drafter,
            }
        }
    )
    return Replica(config, _NoMetrics())


def test_replica_overlay_returns_the_outputs_it_learned(tiny_model_dir, task_rows):
    import asyncio

    from tasc_ray.engine.sampling import SamplingParams
    from tasc_ray.models import load_tokenizer

    replica = _replica(tiny_model_dir)
    try:
        assert replica.overlay()["outputs"] == [] and replica.overlay()["live"] is True
        tokenizer = load_tokenizer(str(tiny_model_dir))
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in task_rows[:4]]

        async def go():
            params = SamplingParams(max_new_tokens=12, temperature=0.0)
            return [await replica.generate(ids, params) for ids in prompts]

        results = asyncio.run(go())
        overlay = replica.overlay()
        learned = [r.token_ids for r in results if len(r.token_ids) >= 2]  # the overlay skips 1-token outputs
        assert learned and overlay["outputs"] == learned  # oldest first, every one of them
        assert overlay["texts"] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in learned]
        assert overlay["texts"] == [r.text for r in results if len(r.token_ids) >= 2]
        assert overlay["replica"] == replica.replica_id and overlay["capacity"] == 1000
        assert overlay["tokenizer"]["vocab_size"] == len(tokenizer)
        assert overlay["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
        # the decode thread still serves after the read
        assert asyncio.run(go())[0].token_ids == results[0].token_ids
        assert replica.overlay()["outputs"] == learned + learned  # repeats count
    finally:
        replica.shutdown()


def test_replica_without_an_overlay_returns_empty_lists(tiny_model_dir):
    replica = _replica(tiny_model_dir, live_outputs=0)
    try:
        overlay = replica.overlay()
        assert overlay["live"] is False and overlay["outputs"] == [] and overlay["texts"] == []
    finally:
        replica.shutdown()
