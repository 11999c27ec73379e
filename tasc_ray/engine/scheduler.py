"""Scheduler: owns the running batch. Admission, per-row limits, cancellation, and one decoding step at a time.

Each `step()` drops cancelled rows, admits waiting requests (by `Request.priority`, online before batch rows; first
come, first served within a priority) while the batch has fewer than `max_rows` rows and the admitted prompts fit
the prefill token budget, runs one decoding pass over the batch, and retires the rows that finished. A pass is four
short steps: the proposer drafts a token tree per row, the runner runs [pending token + nodes] of every row through
the model in one forward, `verify` takes the longest path the target agrees with, and the output processor emits it.
New rows are prefilled on their own and joined to the running batch's cache, so a short request never waits for a
long one and a finished row's place is taken at the next step. Rows carry their own sampling parameters, stops,
limits and speculation switch, and each row's output is what it would be alone (greedy exactly; sampling with
per-position seeds, sampling.py).

The scheduler is single-threaded: `EngineLoop` runs it on a decode thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tasc_ray.engine.config import SchedulerConfig
from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.kv_cache import BatchState
from tasc_ray.engine.outputs import OutputProcessor
from tasc_ray.engine.proposer import Proposer
from tasc_ray.engine.request import Request, RequestCancelled
from tasc_ray.engine.runner import ModelRunner
from tasc_ray.engine.verify import verify

logger = logging.getLogger(__name__)


@dataclass
class EngineTimings:
    """Totals across an engine's life: wall time of drafting, verifying, prefilling and generate() calls."""

    draft_s: float = 0.0
    verify_s: float = 0.0
    generate_s: float = 0.0
    prefill_s: float = 0.0
    steps: int = 0  # batched forward passes after prefill
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the shared-prefix cache instead of prefilled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scheduler:
    """The waiting queue and the running batch over one model runner."""

    def __init__(
        self,
        runner: ModelRunner,
        proposer: Proposer,
        outputs: OutputProcessor,
        max_rows: int,
        config: SchedulerConfig | None = None,
        timings: EngineTimings | None = None,
    ) -> None:
        """`max_rows`: rows decoding at once; `config`: the prefill budget and compaction (one request is always
        admitted, whatever its length)."""
        self.runner, self.proposer, self.outputs = runner, proposer, outputs
        self.max_rows = max_rows
        self.config = config or SchedulerConfig()
        self.timings = timings or EngineTimings()
        self.waiting: deque[Request] = deque()
        self.batch: BatchState | None = None

    def add(self, request: Request) -> None:
        """Queue a request behind the waiting ones of its priority or a lower number, ahead of the others: a batch
        row never holds an online request back from the next free row."""
        waiting = self.waiting
        if not waiting or waiting[-1].priority <= request.priority:
            waiting.append(request)
            return
        ahead = next(i for i, r in enumerate(waiting) if r.priority > request.priority)
        waiting.insert(ahead, request)

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
                done = self._decode(self.batch)
            except Exception as exc:  # the batch's state is unknown: its rows fail, the engine goes on
                logger.exception("a decoding step over %d rows failed", len(self.batch.rows))
                rows, self.batch = self.batch.rows, None
                return left + [self._fail(row, exc) for row in rows]
            left += self._retire(done)
        return left

    @torch.inference_mode()
    def _decode(self, batch: BatchState) -> list[bool]:
        """One pass over the batch: propose, verify in one forward, emit. Returns which rows are done."""
        self.runner.compact(batch, self.config.compact_waste)
        t0 = time.perf_counter()
        trees = self.proposer.propose(batch.rows)
        t1 = time.perf_counter()
        verdict = verify(self.runner.verify_pass(batch, trees), trees, batch.rows)
        self.runner.accept(batch, trees, verdict)
        t2 = time.perf_counter()
        self.proposer.observe(batch.rows, trees, verdict, t2 - t0)
        self.proposer.observe_cost(trees, t2 - t1)
        self.timings.draft_s += t1 - t0
        self.timings.verify_s += t2 - t1
        self.timings.steps += 1
        for i, (row, tree, path) in enumerate(zip(batch.rows, trees, verdict.paths)):
            row.stats.record(len(tree), len(path))
            row.stats.draft_s += t1 - t0
            row.stats.verify_s += t2 - t1
            self._emit(row, verdict.tokens[i], verdict.logprobs.get(i))
        return [row.done for row in batch.rows]

    def _emit(self, row: Request, tokens: list[int], logprobs: Any) -> None:
        emitted = self.outputs.emit(row, tokens, logprobs)
        if row.draft_context is not None:
            row.draft_context.extend(emitted)

    def _drop_cancelled(self) -> list[Request]:
        left = [self._finish(r) for r in self.waiting if r.cancelled]
        if left:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        if self.batch is not None:
            left += self._retire([row.cancelled for row in self.batch.rows])
        return left

    def _take_admissible(self) -> list[Request]:
        admitted: list[Request] = []
        width = 0
        while self.waiting and self.running + len(admitted) < self.max_rows:
            candidate = self.waiting[0]
            new_width = max(width, candidate.prompt_len)
            if admitted and new_width * (len(admitted) + 1) > self.config.max_prefill_tokens:
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
            new = self._prefill(requests)
        except Exception as exc:
            if len(requests) == 1:
                logger.warning("prefill of a %d-token prompt failed: %s", requests[0].prompt_len, exc)
                return [self._fail(requests[0], exc)]
            return [left for r in requests for left in self._admit([r])]
        done = [r.done for r in new.rows]
        left = [self._finish(r) for r, d in zip(new.rows, done) if d]
        new.keep([i for i, d in enumerate(done) if not d])
        if new.rows:
            if self.batch is None:
                self.batch = new
            else:
                self.batch.extend(new)
        return left

    @torch.inference_mode()
    def _prefill(self, requests: list[Request]) -> BatchState:
        """Start the requests: each row's token budget and draft state, its prompt in the cache, and its first
        token (from its prompt's last position, by the same acceptance rule as every pass) emitted."""
        t0 = time.perf_counter()
        for r in requests:
            r.max_new = min(r.params.max_new_tokens, self.runner.max_context - r.prompt_len)
            r.draft_context = self.proposer.new_row(r)
        batch, logits, n_cached = self.runner.prefill(requests, self.batch)
        no_drafts = [DraftTree() for _ in requests]
        verdict = verify(logits, no_drafts, requests)
        self.runner.set_pending(batch, verdict)
        self.timings.prompt_tokens += sum(r.prompt_len for r in requests)
        self.timings.cached_prompt_tokens += n_cached
        self.timings.prefill_s += time.perf_counter() - t0
        for i, r in enumerate(requests):
            self._emit(r, verdict.tokens[i], verdict.logprobs.get(i))
        return batch

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
        elif not request.cancelled:
            self.proposer.learn(request)
        try:
            request.result = self.outputs.result(request)
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
