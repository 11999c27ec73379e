"""Continuous batching: which requests decode together at each step.

The scheduler owns a queue of waiting requests and the running batch. Each `step()` drops cancelled rows,
admits waiting requests (first come, first served) while the batch has fewer than `max_rows` rows and the
admitted prompts fit the prefill token budget, runs one decoding pass over the batch, and retires the rows that
finished. New rows are prefilled on their own and joined to the running batch's cache, so a short request
never waits for a long one and a finished row's place is taken at the next step. Rows carry their own
sampling parameters, stops, limits and speculation switch, and each row's output is what it would be alone
(greedy exactly; sampling with per-position seeds, sampling.py).

`static=True` admits only into an empty batch: the batches of the engine before continuous batching, kept
for comparison in the benchmarks. The scheduler is single-threaded: `EngineLoop` runs it on a decode thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from tasc_ray.spec.request import Request, RequestCancelled

if TYPE_CHECKING:
    from tasc_ray.spec.generator import SpeculativeGenerator, _Batch

logger = logging.getLogger(__name__)


class Scheduler:
    """The waiting queue and the running batch of one generator."""

    def __init__(
        self,
        generator: SpeculativeGenerator,
        max_rows: int | None = None,
        max_prefill_tokens: int = 8192,
        static: bool = False,
    ) -> None:
        """`max_rows`: rows decoding at once (default: the generator's max_batch_size); `max_prefill_tokens`:
        the padded prompt tokens admitted in one step (one request is always admitted, whatever its length)."""
        self.generator = generator
        self.max_rows = max_rows or generator.max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.static = static
        self.waiting: deque[Request] = deque()
        self.batch: _Batch | None = None

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def running(self) -> int:
        return len(self.batch.rows) if self.batch is not None else 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def run(self) -> None:
        """Step until every queued request has finished."""
        while self.has_work:
            self.step()

    def step(self) -> list[Request]:
        """Admit, decode one pass, retire. Returns the requests that left the engine during this step."""
        left = self._drop_cancelled()
        admitted = self._take_admissible()
        if admitted:
            left += self._admit(admitted)
        if self.batch is not None:
            try:
                done = self.generator.step(self.batch)
            except Exception as exc:  # the batch's state is unknown: its rows fail, the engine goes on
                logger.exception("a decoding step over %d rows failed", len(self.batch.rows))
                rows, self.batch = self.batch.rows, None
                return left + [self._fail(row, exc) for row in rows]
            left += self._retire(done)
        return left

    def _drop_cancelled(self) -> list[Request]:
        left = [self._finish(r) for r in self.waiting if r.cancelled]
        if left:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        if self.batch is not None:
            left += self._retire([row.cancelled for row in self.batch.rows])
        return left

    def _take_admissible(self) -> list[Request]:
        if self.static and self.running:
            return []
        admitted: list[Request] = []
        width = 0
        while self.waiting and self.running + len(admitted) < self.max_rows:
            candidate = self.waiting[0]
            new_width = max(width, candidate.prompt_len)
            if admitted and new_width * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            admitted.append(self.waiting.popleft())
            width = new_width
        return admitted

    def _admit(self, requests: list[Request]) -> list[Request]:
        """Prefill the requests and join them to the running batch; a failing prefill is retried row by row so
        that only the failing rows fail. Returns the rows that already finished (and failed)."""
        now = time.perf_counter()
        for r in requests:
            r.stats.queued_s = now - r.submitted_at
        try:
            new, done = self.generator.prefill(requests)
        except Exception as exc:
            if len(requests) == 1:
                logger.warning("prefill of a %d-token prompt failed: %s", requests[0].prompt_len, exc)
                return [self._fail(requests[0], exc)]
            return [left for r in requests for left in self._admit([r])]
        left = [self._finish(r) for r, d in zip(new.rows, done) if d]
        new.keep([i for i, d in enumerate(done) if not d])
        if new.rows:
            if self.batch is None:
                self.batch = new
            else:
                self.batch.extend(new)
        return left

    def _retire(self, done: list[bool]) -> list[Request]:
        assert self.batch is not None
        left = [self._finish(row) for row, d in zip(self.batch.rows, done) if d]
        if left:
            self.batch.keep([i for i, d in enumerate(done) if not d])
            if not self.batch.rows:
                self.batch = None
        return left

    def _finish(self, request: Request) -> Request:
        if request.cancelled and request.finish_reason is None:
            request.finish_reason = "cancelled"
        try:
            request.result = self.generator.result(request)
        except Exception as exc:  # decoding the text failed: the row's error
            request.error = exc
        return self._notify(request)

    def _fail(self, request: Request, exc: Exception) -> Request:
        request.error = exc
        return self._notify(request)

    def _notify(self, request: Request) -> Request:
        if request.on_finish is not None:
            try:
                request.on_finish(request)
            except Exception:
                logger.exception("a request's on_finish callback failed")
        return request

    def cancel_all(self, reason: str = "the engine is shutting down") -> list[Request]:
        """Fail every waiting and running request (RequestCancelled)."""
        rows = list(self.waiting) + (self.batch.rows if self.batch is not None else [])
        self.waiting.clear()
        self.batch = None
        return [self._fail(r, RequestCancelled(reason)) for r in rows]
