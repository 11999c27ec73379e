"""EngineLoop: one generator's scheduler stepping on its own decode thread, fed by other threads.

A Serve replica (or any server) owns one loop: request handlers `submit()` requests and return at once, the
decode thread admits them at its next step, streams their tokens through each request's `on_tokens` and calls
its `on_finish` when it leaves (finished, failed or cancelled). `Request.cancel()` from any thread frees the
row at the next step. `call_soon(fn)` runs a function on the decode thread between two steps (e.g. swapping
the drafter for a new index), so nothing else ever touches the generator while it decodes. `submit_async`
awaits a request from asyncio code and cancels it when the awaiting task is cancelled (a client that left).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from tasc_ray.engine.generator import GenerationResult, SpeculativeGenerator
from tasc_ray.engine.request import Request, RequestCancelled

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class LoopStats:
    """Counters of the loop, read by metrics and /health (plain ints: a torn read is harmless)."""

    submitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    steps: int = 0  # scheduler steps (admission and one decoding pass)
    busy_s: float = 0.0  # time spent in steps: busy_s / steps is the mean step time
    generated_tokens: int = 0  # tokens of the rows that left
    forward_passes: int = 0  # their decoding passes (after the prefill's first token)
    waiting: int = 0
    running: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineLoop:
    """A decode thread running `generator`'s scheduler; thread-safe `submit`, `call_soon` and `stop`."""

    def __init__(self, generator: SpeculativeGenerator, max_rows: int | None = None, name: str = "tasc-decode"):
        self.generator = generator
        self.scheduler = generator.scheduler(max_rows)
        self.stats = LoopStats()
        self._inbox: list[Request] = []
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ----- any thread -----
    def submit(self, request: Request) -> Request:
        """Queue a request for the next step."""
        with self._wake:
            if self._stopping:
                raise RequestCancelled("the engine loop has stopped")
            self._inbox.append(request)
            self.stats.submitted += 1
            self._wake.notify()
        return request

    def call_soon(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn() on the decode thread before its next step; its result or exception comes back in the future."""
        future: Future[T] = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    async def submit_async(self, request: Request) -> GenerationResult:
        """Submit and await the request's result from asyncio code; if the awaiting task is cancelled (the client
        went away), the row is cancelled too and leaves at the next step."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Request] = loop.create_future()
        chained = request.on_finish

        def on_finish(r: Request) -> None:  # decode thread
            try:
                if chained is not None:
                    chained(r)
            finally:  # a failing callback must not leave the awaiting caller waiting forever
                loop.call_soon_threadsafe(_resolve, done, r)

        request.on_finish = on_finish
        self.submit(request)
        try:
            finished = await asyncio.shield(done)
        except asyncio.CancelledError:
            request.cancel()
            raise
        return finished.outcome()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Fail every queued and running request (RequestCancelled) and end the decode thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # ----- the decode thread -----
    def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._wake:
                while not (self._inbox or self._calls or self._stopping or scheduler.has_work):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                calls, self._calls = self._calls, []
                stopping = self._stopping
            for fn, future in calls:
                _run_call(fn, future)
            for request in inbox:
                scheduler.add(request)
            if stopping:
                self._count(scheduler.cancel_all())
                return
            try:
                t0 = time.perf_counter()
                self._count(scheduler.step())
                self.stats.busy_s += time.perf_counter() - t0
                self.stats.steps += 1
            except Exception:  # the scheduler isolates row failures; this is a bug, keep the thread alive
                logger.exception("engine loop step failed")
                time.sleep(0.1)
            self.stats.waiting, self.stats.running = len(scheduler.waiting), scheduler.running

    def _count(self, left: list[Request]) -> None:
        for r in left:
            self.stats.generated_tokens += len(r.generated)
            self.stats.forward_passes += r.stats.forward_passes
            if r.error is not None:
                self.stats.failed += 1
            elif r.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.finished += 1


def _resolve(future: asyncio.Future[Request], request: Request) -> None:
    if not future.done():
        future.set_result(request)


def _run_call(fn: Callable[[], Any], future: Future[Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
