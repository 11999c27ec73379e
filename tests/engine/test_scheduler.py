"""Continuous batching: rows joining and leaving at any step decode exactly what they would alone."""

from __future__ import annotations

import random

import pytest
from test_generator import reference_greedy  # tests/engine is on sys.path under pytest

from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.drafts.drafter import Drafter
from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.engine.request import BATCH, ONLINE, Request


class RepeatDrafter(Drafter):
    """Drafts the row's last three tokens again: often wrong, never empty (the verification path always runs)."""

    def propose(self, rows, limits=None, branching=False):
        return [
            DraftTree.chain([] if row is None else row.tokens[-3:][: max(0, lim)]) for row, lim in zip(rows, limits)
        ]


def context_generator(model, tokenizer, max_batch_size: int = 4) -> SpeculativeGenerator:
    drafter = Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT, max_draft=4))
    return SpeculativeGenerator(
        model, tokenizer, drafter, max_batch_size=max_batch_size, prefix_cache_min_tokens=4, speculation_gate=False
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_joining_at_random_steps_match_generate(tiny_model, tiny_tokenizer, seed):
    """Requests with their own limits, stops and speculation switch arrive while others decode; each output is
    model.generate's greedy output (cut at its own stop)."""
    rng = random.Random(seed)
    vocab = len(tiny_tokenizer)
    shared = [rng.randrange(3, vocab) for _ in range(12)]  # some prompts share a prefix (the prefix cache)
    generator = context_generator(tiny_model, tiny_tokenizer)
    scheduler = generator.scheduler()
    requests: list[Request] = []
    expected: list[list[int]] = []
    for i in range(14):
        body = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        prompt = (shared + body) if i % 2 else body
        max_new = rng.choice([1, 3, 9, 24])
        params = SamplingParams(max_new_tokens=max_new, speculative=rng.random() < 0.7)
        requests.append(generator.request(prompt, params))
        expected.append(reference_greedy(tiny_model, prompt, max_new))
    arrivals = sorted(rng.randrange(0, 25) for _ in requests)
    step = 0
    pending = list(zip(arrivals, requests))
    while pending or scheduler.has_work:
        while pending and pending[0][0] <= step:
            scheduler.add(pending.pop(0)[1])
        scheduler.step()
        assert scheduler.running <= 4
        step += 1
    for request, tokens in zip(requests, expected):
        result = request.outcome()
        assert result.token_ids == tokens, (request.prompt_ids, request.params)
        assert result.finish_reason == ("stop" if tokens[-1] == 2 else "length")


def test_outputs_do_not_depend_on_the_batch_size(tiny_model, tiny_tokenizer):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, len(tiny_tokenizer)) for _ in range(rng.randint(2, 20))] for _ in range(9)]
    params = SamplingParams(max_new_tokens=20)
    batched = context_generator(tiny_model, tiny_tokenizer, max_batch_size=3).generate(prompts, params)
    alone = context_generator(tiny_model, tiny_tokenizer, max_batch_size=1).generate(prompts, params)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_seeded_sampling_is_the_same_alone_batched_and_speculative(tiny_model, tiny_tokenizer):
    """A seeded row's draws depend on its seed and output position only: the same tokens with or without drafts
    and whatever shares its batch."""
    drafter = RepeatDrafter(None, DrafterConfig(mode=DraftMode.CONTEXT))
    generator = SpeculativeGenerator(tiny_model, tiny_tokenizer, drafter, max_batch_size=4, speculation_gate=False)
    prompt = [10, 11, 12, 13, 10, 11, 12]
    params = SamplingParams(max_new_tokens=16, temperature=1.2, top_p=0.95, seed=11)
    alone = generator.generate([prompt], params)[0]
    plain = generator.generate([prompt], SamplingParams(**{**params.__dict__, "speculative": False}))[0]
    others = [[5, 6, 7], [8, 9, 10, 11, 12]]
    scheduler = generator.scheduler()
    mixed = [generator.request(p, SamplingParams(max_new_tokens=16)) for p in others]
    row = generator.request(prompt, params)
    for r in mixed:
        scheduler.add(r)
    scheduler.step()
    scheduler.add(row)  # joins a running batch
    scheduler.run()
    assert alone.token_ids == plain.token_ids == row.outcome().token_ids
    assert alone.stats.drafted > 0 and row.outcome().stats.drafted > 0  # speculation really ran


def test_cancelled_rows_leave_at_the_next_step(tiny_model, tiny_tokenizer):
    generator = context_generator(tiny_model, tiny_tokenizer)
    scheduler = generator.scheduler()
    streamed: list[int] = []
    finished: list[Request] = []
    long = generator.request([4, 5, 6], SamplingParams(max_new_tokens=200), on_tokens=streamed.extend)
    long.on_finish = finished.append
    other = generator.request([7, 8, 9], SamplingParams(max_new_tokens=12))
    queued = generator.request([9, 9], SamplingParams(max_new_tokens=5))
    for r in (long, other):
        scheduler.add(r)
    for _ in range(3):
        scheduler.step()
    long.cancel()
    scheduler.add(queued)
    queued.cancel()  # cancelled while waiting: never admitted
    left = scheduler.step()
    assert long in left and queued in left and finished == [long]
    assert long.outcome().finish_reason == "cancelled" and long.outcome().token_ids == streamed
    assert 0 < len(streamed) < 200
    assert queued.outcome().finish_reason == "cancelled" and queued.outcome().token_ids == []
    assert scheduler.running == (0 if other.finished else 1)
    scheduler.run()
    assert other.outcome().token_ids == reference_greedy(tiny_model, [7, 8, 9], 12)


def test_a_failing_row_does_not_fail_the_others(tiny_model, tiny_tokenizer):
    """A row whose prefill fails (here: a token id outside the vocabulary) gets its error; the rows admitted
    with it decode normally."""
    generator = context_generator(tiny_model, tiny_tokenizer)
    bad_id = tiny_model.config.vocab_size + 5
    out = generator.generate_each([[4, 5, 6], [4, bad_id], [7, 8]], SamplingParams(max_new_tokens=6))
    assert isinstance(out[1], Exception)
    assert out[0].token_ids == reference_greedy(tiny_model, [4, 5, 6], 6)
    assert out[2].token_ids == reference_greedy(tiny_model, [7, 8], 6)


def test_prefill_budget_and_row_limit(tiny_model, tiny_tokenizer):
    generator = context_generator(tiny_model, tiny_tokenizer, max_batch_size=2)
    scheduler = generator.scheduler()
    scheduler.config = scheduler.config.model_copy(update={"max_prefill_tokens": 20})
    for n in (15, 15, 3):
        scheduler.add(generator.request([5] * n, SamplingParams(max_new_tokens=50)))
    scheduler.step()  # 2 x 15 padded tokens exceed 20: one admitted
    assert scheduler.running == 1
    scheduler.step()
    assert scheduler.running == 2 and len(scheduler.waiting) == 1  # the row limit holds the third


def test_online_requests_are_admitted_before_waiting_batch_rows(tiny_model, tiny_tokenizer):
    """Batch rows fill the rows online traffic leaves: online requests that arrive behind a queue of batch rows take
    the next free rows (first come, first served within a priority), and every row decodes what it would alone."""
    rng = random.Random(7)
    vocab = len(tiny_tokenizer)
    generator = context_generator(tiny_model, tiny_tokenizer, max_batch_size=2)
    scheduler = generator.scheduler()

    def request(priority: int, max_new: int) -> Request:
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))]
        return Request.new(prompt, SamplingParams(max_new_tokens=max_new), priority=priority)

    batch = [request(BATCH, 8) for _ in range(6)]
    for row in batch:
        scheduler.add(row)
    scheduler.step()  # two batch rows decode, four wait
    online = [request(ONLINE, 4), request(ONLINE, 4)]
    for row in online:
        scheduler.add(row)
    assert list(scheduler.waiting) == online + batch[2:]
    admitted: list[Request] = []
    while scheduler.has_work:
        before = list(scheduler.waiting)
        scheduler.step()
        admitted += [r for r in before if r not in scheduler.waiting]
    assert admitted == online + batch[2:]
    for row in batch + online:
        assert row.outcome().token_ids == reference_greedy(tiny_model, row.prompt_ids, row.params.max_new_tokens)


def test_a_shared_prefix_is_stored_once_and_changes_no_output(tiny_model, tiny_tokenizer):
    """Rows of a few-shot template read the template's keys and values from one place (the prefix cache's entry),
    their own caches holding only what follows it; rows joining later read it too, as far as their prompts agree
    with it (a row of another prompt not at all), and every output is what each row decodes with the prefix
    copied into its own cache."""
    rng = random.Random(3)
    vocab = len(tiny_tokenizer)
    template = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [template + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(6)]
    prompts.insert(3, template[:25] + [rng.randrange(3, vocab) for _ in range(5)])  # agrees with 25 of it
    prompts.insert(5, [rng.randrange(3, vocab) for _ in range(12)])  # agrees with none of it
    params = SamplingParams(max_new_tokens=12)
    shared = context_generator(tiny_model, tiny_tokenizer, max_batch_size=3)
    if not shared.runner.shares_prefix:
        pytest.skip("the batch-invariant CPU kernels are not available here")
    scheduler = shared.scheduler()
    requests = [shared.request(p, params) for p in prompts]
    for r in requests[:3]:
        scheduler.add(r)
    scheduler.step()
    batch = scheduler.batch
    assert batch is not None and batch.prefix is not None and len(batch.prefix.tokens) == 40
    assert batch.prefix_seen.tolist() == [40, 40, 40]
    assert batch.cache.layers[0].keys.shape[2] < min(len(p) for p in prompts[:3])  # no row holds the template
    for r in requests[3:]:
        scheduler.add(r)
    seen: set[int] = set()
    while scheduler.has_work:
        scheduler.step()
        if scheduler.batch is not None and scheduler.batch.prefix_seen is not None:
            seen |= set(scheduler.batch.prefix_seen.tolist())
    assert {0, 25, 40} <= seen
    copied = SpeculativeGenerator(
        tiny_model, tiny_tokenizer, shared.drafter, max_batch_size=3, prefix_cache_min_tokens=0, speculation_gate=False
    )
    assert [r.outcome().token_ids for r in requests] == [r.token_ids for r in copied.generate(prompts, params)]
