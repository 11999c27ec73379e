"""The engine deployment: each replica holds one `Replica` (model, index, engine loop, request log) and decodes the
rows the OpenAI ingress (app.py) sends it through a DeploymentHandle, and the rows a batch labeling job sends it
(`generate_batch_row`, from `tasc-ray label --serve-app`: tasc_ray/stages/serve_labeling.py) at a lower admission
priority, so that they only fill the rows online requests leave.

Splitting the engine from the HTTP ingress is what lets a client get an OpenAI error body when an engine replica
dies mid-request (the ingress survives and answers 503, or an SSE error event and `[DONE]`), and lets `/health`
answer from a process that never decodes. A caller that goes away cancels its handle call; Serve passes the
cancellation on, and the row leaves the engine at its next step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from tasc_ray.engine.generator import GenerationResult
from tasc_ray.engine.request import BATCH
from tasc_ray.engine.sampling import SamplingParams
from tasc_ray.serving.config import ENGINE_DEPLOYMENT, IndexUpdate, ServeConfig
from tasc_ray.serving.metrics import ServeMetrics
from tasc_ray.serving.replica import Replica

logger = logging.getLogger(__name__)


@serve.deployment(name=ENGINE_DEPLOYMENT)
class TascEngine:
    """One engine replica: `generate` (a row's result), `stream` (its token ids as they come, then its result),
    `generate_batch_row` (a batch job's row, admitted after waiting online rows), `info` (its state) and `overlay`
    (the outputs its live overlay learned from)."""

    def __init__(self, config: dict) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config = ServeConfig.model_validate(config)
        self.replica = Replica(self.config, ServeMetrics())

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's user_config: reload the index, change drafter settings or the
        rows decoding at once."""
        update = IndexUpdate.model_validate(user_config or {})
        if update.max_batch_size:
            self.replica.set_max_rows(update.max_batch_size)
        logger.info("reconfigure: %s", self.replica.apply(update))

    def check_health(self) -> None:
        self.replica.check_health()

    def __del__(self) -> None:  # Serve stops a replica by ending its actor: stop the loop, flush the request log
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()

    async def generate(self, ids: list[int], params: SamplingParams, row: int, request_id: str) -> GenerationResult:
        return await self.replica.generate(ids, params, row, request_id=request_id)

    async def generate_batch_row(
        self, ids: list[int], params: SamplingParams, row: int, request_id: str
    ) -> GenerationResult:
        """`generate` for a batch job's row: the same engine, overlay and request log, but admitted only when no
        online request waits (Request.priority BATCH)."""
        return await self.replica.generate(ids, params, row, request_id=request_id, priority=BATCH)

    async def stream(
        self, ids: list[int], params: SamplingParams, row: int, request_id: str
    ) -> AsyncIterator[list[int] | GenerationResult]:
        """The row's newly emitted token ids as they come, then its GenerationResult (or its error raised)."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[list[int] | None] = asyncio.Queue()

        def on_tokens(new: list[int]) -> None:  # decode thread; queued before the row's end is (same thread, FIFO)
            loop.call_soon_threadsafe(tokens.put_nowait, list(new))

        task = asyncio.ensure_future(self.replica.generate(ids, params, row, on_tokens, request_id))
        task.add_done_callback(lambda _: tokens.put_nowait(None))
        try:
            while (item := await tokens.get()) is not None:
                yield item
            yield task.result()
        finally:
            if not task.done():
                task.cancel()

    def info(self) -> dict[str, Any]:
        return self.replica.info()

    async def overlay(self) -> dict[str, Any]:
        """This replica's live overlay (`Replica.overlay`: outputs as token ids and texts). It waits for the decode
        thread's next step, so it runs in a worker thread: the event loop goes on serving rows meanwhile."""
        return await asyncio.to_thread(self.replica.overlay)
