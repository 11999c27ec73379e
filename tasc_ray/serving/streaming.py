"""A streamed request: every prompt's row joins the engine loop, its tokens come back as server-sent events.

Each row's token callback (fed by the engine deployment's stream) hands the tokens to the event loop through an
asyncio queue, where `TextStream` turns them into text no later token can change. The stream ends with a usage
chunk (when asked for) and `data: [DONE]`; a failed prompt sends an error event in its place. When the client
goes away the generator is closed, and its rows are cancelled: they leave the engine at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

from transformers import PreTrainedTokenizerBase

from tasc_ray.engine.generator import GenerationResult, SamplingParams
from tasc_ray.engine.request import TokenCallback
from tasc_ray.serving.protocol import APIError, ChunkRenderer, TextStream, sse

# (row index, prompt ids, token callback) -> the row's result; decodes one row of the request or raises
Submit = Callable[[int, list[int], TokenCallback], Awaitable[GenerationResult]]
Event = tuple[Literal["tokens"], int, list[int]] | tuple[Literal["done"], int, GenerationResult | Exception]


def _start(submit: Submit, prompts: list[list[int]], events: asyncio.Queue[Event]) -> list[asyncio.Future[None]]:
    """Submit every prompt; its tokens and then its result (or exception) arrive in `events`."""
    loop = asyncio.get_running_loop()

    def on_tokens(i: int) -> Callable[[list[int]], None]:  # may be called from another thread
        return lambda ids: loop.call_soon_threadsafe(events.put_nowait, ("tokens", i, list(ids)))

    async def run(i: int, ids: list[int]) -> None:
        try:
            result: GenerationResult | Exception = await submit(i, ids, on_tokens(i))
        except Exception as exc:  # reported in the stream
            result = exc
        events.put_nowait(("done", i, result))

    return [asyncio.ensure_future(run(i, ids)) for i, ids in enumerate(prompts)]


async def stream_events(
    render: ChunkRenderer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    params: SamplingParams,
    submit: Submit,
    include_usage: bool,
    to_error: Callable[[BaseException], APIError],
) -> AsyncIterator[str]:
    """Start every prompt's decode and yield OpenAI stream chunks as tokens arrive, then `data: [DONE]`; a row
    that fails sends an error event in its place (`to_error` turns its exception into the OpenAI error)."""
    events: asyncio.Queue[Event] = asyncio.Queue()
    tasks = _start(submit, prompts, events)
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    if render.chat:
        for i in range(len(prompts)):
            yield sse(render.role(i))
    pending, results = len(prompts), []
    try:
        while pending:
            kind, i, payload = await events.get()
            if kind == "tokens":
                piece = streams[i].push(payload)
                if piece:
                    yield sse(render.text(i, piece))
                continue
            pending -= 1
            if isinstance(payload, Exception):
                yield sse(to_error(payload).body())
                continue
            results.append(payload)
            yield sse(render.final(i, streams[i].finish(payload.text), payload.finish_reason))
        if include_usage and results:
            yield sse(render.usage(results))
        yield sse("[DONE]")
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
