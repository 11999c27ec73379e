"""The replica's Prometheus metrics (through `ray.serve.metrics`, exported on each node's metrics port).

`tasc_requests{route,status}`, `tasc_request_errors{route,code}`, `tasc_request_latency_s{route}`; token totals
(`tasc_prompt_tokens`, `tasc_generated_tokens`, `tasc_drafted_tokens`, `tasc_accepted_tokens`,
`tasc_forward_passes`, `tasc_cached_prompt_tokens`: prompt tokens the prefix cache served); the engine loop's
`tasc_waiting_rows` and `tasc_running_rows` (gauges, updated as rows leave), `tasc_time_to_first_token_s` and
`tasc_queue_time_s` (histograms), `tasc_rows_finished{reason}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.serve import metrics

from tasc_ray.engine.generator import GenerationResult
from tasc_ray.engine.loop import LoopStats
from tasc_ray.engine.request import Request
from tasc_ray.engine.scheduler import EngineTimings
from tasc_ray.serving.protocol import usage

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
FIRST_TOKEN_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16]


class ServeMetrics:
    """The counters and histograms of one replica; create it inside the replica (it registers with Ray)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter("tasc_requests", "requests received", tag_keys=("route", "status"))
        self.errors = metrics.Counter(
            "tasc_request_errors", "requests answered with an error", tag_keys=("route", "code")
        )
        self.latency = metrics.Histogram(
            "tasc_request_latency_s", "request latency (s)", boundaries=LATENCY_BUCKETS_S, tag_keys=("route",)
        )
        self.waiting_rows = metrics.Gauge("tasc_waiting_rows", "rows queued for the engine loop")
        self.running_rows = metrics.Gauge("tasc_running_rows", "rows in the running batch")
        self.first_token = metrics.Histogram(
            "tasc_time_to_first_token_s", "submission to first token (s)", boundaries=FIRST_TOKEN_BUCKETS_S
        )
        self.queue_time = metrics.Histogram(
            "tasc_queue_time_s", "submission to admission (s)", boundaries=FIRST_TOKEN_BUCKETS_S
        )
        self.rows_finished = metrics.Counter("tasc_rows_finished", "rows that left the engine", tag_keys=("reason",))
        self.cached_prompt_tokens = metrics.Counter(
            "tasc_cached_prompt_tokens", "prompt tokens served from the shared-prefix cache instead of prefilled"
        )
        self._cached_seen = 0
        # usage() key -> its counter
        self.tokens = {
            "prompt_tokens": metrics.Counter("tasc_prompt_tokens", "prompt tokens processed"),
            "completion_tokens": metrics.Counter("tasc_generated_tokens", "tokens generated"),
            "drafted_tokens": metrics.Counter("tasc_drafted_tokens", "draft tokens proposed"),
            "accepted_tokens": metrics.Counter("tasc_accepted_tokens", "draft tokens accepted"),
            "forward_passes": metrics.Counter("tasc_forward_passes", "decode forward passes (per row)"),
        }

    def request(self, route: str, status: int, latency_s: float, code: str | None = None) -> None:
        """One answered request (an error counts under its code, or its status when it has none)."""
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        if status >= 400:
            self.errors.inc(1, tags={"route": route, "code": code or str(status)})
        self.latency.observe(latency_s, tags={"route": route})

    def finished(self, request: Request, loop: LoopStats) -> None:
        """A row left the engine loop (called on the decode thread)."""
        reason = "error" if request.error is not None else (request.finish_reason or "length")
        self.rows_finished.inc(1, tags={"reason": reason})
        self.queue_time.observe(request.stats.queued_s)
        if request.stats.first_token_s is not None:
            self.first_token.observe(request.stats.first_token_s)
        if request.result is not None:
            self.results([request.result])
        self.waiting_rows.set(loop.waiting)
        self.running_rows.set(loop.running)

    def prefix_cache(self, timings: EngineTimings) -> None:
        """The prefix cache's hits since the last call (decode thread)."""
        new = timings.cached_prompt_tokens - self._cached_seen
        if new > 0:
            self.cached_prompt_tokens.inc(new)
            self._cached_seen = timings.cached_prompt_tokens

    def results(self, results: Sequence[GenerationResult]) -> None:
        """Token totals of decoded rows."""
        for key, value in usage(results).items():
            if key in self.tokens and value > 0:  # a Counter refuses inc(0)
                self.tokens[key].inc(value)
