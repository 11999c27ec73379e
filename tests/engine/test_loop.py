"""EngineLoop: requests from other threads and from asyncio join one decode thread; cancellation frees rows."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.engine.loop import EngineLoop
from tasc_ray.engine.request import RequestCancelled


@pytest.fixture
def loop(tiny_model, tiny_tokenizer):
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT))
    engine = EngineLoop(
        SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, max_batch_size=4, speculation_gate=False)
    )
    yield engine
    engine.stop()


def test_requests_from_many_threads_match_generate(loop):
    generator = loop.generator
    prompts = [[4 + i, 5, 6 + i] for i in range(10)]
    expected = [r.token_ids for r in generator.generate(prompts, SamplingParams(max_new_tokens=12))]
    requests = []

    def submit(i: int) -> None:
        requests.append((i, loop.submit(generator.request(prompts[i], SamplingParams(max_new_tokens=12)))))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.time() + 60
    while not (all(r.finished for _, r in requests) and loop.stats.finished == 10 and not loop.stats.running):
        if time.time() > deadline:
            break
        time.sleep(0.01)  # a row's result is set during the step; the loop counts it when the step returns
    assert {i: r.outcome().token_ids for i, r in requests} == dict(enumerate(expected))
    assert loop.stats.finished == 10 and loop.stats.running == 0


def test_an_abandoned_await_cancels_its_row(loop):
    generator = loop.generator
    generator.eos_ids = set()  # the long row can only end by its limit or by cancellation

    async def scenario():
        long = generator.request([4, 5, 6], SamplingParams(max_new_tokens=1000, temperature=1.0))
        task = asyncio.ensure_future(loop.submit_async(long))
        await asyncio.sleep(0.05)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        short = await loop.submit_async(generator.request([7, 8], SamplingParams(max_new_tokens=3)))
        return long, short

    long, short = asyncio.run(scenario())
    deadline = time.time() + 30
    while not long.finished and time.time() < deadline:
        time.sleep(0.01)
    assert long.outcome().finish_reason == "cancelled" and len(long.generated) < 1000
    assert short.new_tokens >= 1
    assert loop.stats.cancelled == 1


def test_call_soon_runs_between_steps_and_stop_fails_the_rest(tiny_model, tiny_tokenizer):
    engine = EngineLoop(SpeculativeGenerator(tiny_model, tiny_tokenizer, None, speculation_gate=False))
    assert engine.call_soon(lambda: threading.current_thread().name).result(10) == "tasc-decode"
    with pytest.raises(ZeroDivisionError):
        engine.call_soon(lambda: 1 / 0).result(10)
    engine.stop()
    assert not engine.alive
    with pytest.raises(RequestCancelled):
        engine.submit(engine.generator.request([4, 5], SamplingParams(max_new_tokens=4)))


def test_an_awaited_request_resolves_even_when_its_own_on_finish_callback_fails(tiny_model, tiny_tokenizer):
    """submit_async chains the request's on_finish; if that callback raises, the awaiting caller still gets the
    result (the scheduler logs the callback's error) instead of waiting forever."""
    import asyncio

    from tasc_ray.engine.generator import SpeculativeGenerator
    from tasc_ray.engine.loop import EngineLoop
    from tasc_ray.engine.sampling import SamplingParams

    def broken(_request) -> None:
        raise RuntimeError("a metrics callback failed")

    loop = EngineLoop(SpeculativeGenerator(tiny_model, tiny_tokenizer, None, max_batch_size=2))
    try:
        request = loop.generator.request([5, 6, 7], SamplingParams(max_new_tokens=3), on_finish=broken)
        result = asyncio.run(asyncio.wait_for(loop.submit_async(request), timeout=60))
        assert len(result.token_ids) == 3
    finally:
        loop.stop()
