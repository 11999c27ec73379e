"""The replica's Prometheus metrics (through `ray.serve.metrics`, exported on each node's metrics port).

`tasc_requests{route,status}`, `tasc_request_errors{route,code}`, `tasc_request_latency_s{route}`; token totals
(`tasc_prompt_tokens`, `tasc_generated_tokens`, `tasc_drafted_tokens`, `tasc_accepted_tokens`,
`tasc_forward_passes`); `tasc_batch_rows` (rows per batched decode).
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.serve import metrics

from tasc_ray.serving.protocol import usage
from tasc_ray.spec.generator import GenerationResult

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
BATCH_ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


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
        self.batch_rows = metrics.Histogram("tasc_batch_rows", "rows per batched decode", boundaries=BATCH_ROW_BUCKETS)
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

    def batch(self, rows: int) -> None:
        """One batched decode of `rows` rows."""
        self.batch_rows.observe(rows)

    def results(self, results: Sequence[GenerationResult]) -> None:
        """Token totals of decoded rows."""
        for key, value in usage(results).items():
            if key in self.tokens and value > 0:  # a Counter refuses inc(0)
                self.tokens[key].inc(value)
