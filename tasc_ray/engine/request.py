"""A request's row while the engine decodes it: its prompt and sampling parameters, the callbacks that see its
tokens and its end, its decoding state, and its result.

A `Request` is created by `SpeculativeGenerator.request()` (or `generate()`), queued in a `Scheduler`, admitted
into the running batch between steps, and leaves it when it finishes, fails or is cancelled. `cancel()` may be
called from any thread: the row leaves at the next step and its cache slots are freed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tasc_ray.engine.drafts.drafter import DraftContext
from tasc_ray.engine.sampling import RowSampler, SamplingParams, TokenLogprob, row_sampler

TokenCallback = Callable[[list[int]], None]  # newly emitted token ids of one row (called on the decode thread)

# Admission priority (lower is admitted first; first come, first served within one): online requests keep their
# place ahead of batch rows sent to the same engine, which fill the rows online traffic leaves.
ONLINE = 0
BATCH = 1


@dataclass
class RowStats:
    """What speculation did for one output: passes, drafted and accepted tokens, time."""

    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_hist: list[int] = field(default_factory=list)  # accepted_hist[n]: passes that accepted n drafts
    draft_s: float = 0.0  # time of the batch steps this row took part in
    verify_s: float = 0.0
    queued_s: float = 0.0  # from submission to admission into the running batch
    first_token_s: float | None = None  # from submission to the first emitted token

    def record(self, drafted: int, accepted: int) -> None:
        self.forward_passes += 1
        self.drafted += drafted
        self.accepted += accepted
        if len(self.accepted_hist) <= accepted:
            self.accepted_hist.extend([0] * (accepted + 1 - len(self.accepted_hist)))
        self.accepted_hist[accepted] += 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, EOS or the token completing a stop string included
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length" or "cancelled"
    stats: RowStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for (SamplingParams.logprobs)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


class RequestCancelled(Exception):
    """The request was cancelled before it finished."""


@dataclass(eq=False)
class Request:
    """One prompt to decode. The fields after `priority` are the engine's state of the row."""

    prompt_ids: list[int]
    params: SamplingParams
    on_tokens: TokenCallback | None = None
    on_finish: Callable[[Request], None] | None = None  # called once, on the decode thread, when it leaves
    priority: int = ONLINE  # admission order among waiting requests (ONLINE before BATCH)
    max_new: int = 0  # max_new_tokens, capped by the model's context
    sampler: RowSampler | None = None  # None: greedy
    draft_context: DraftContext | None = None  # what the drafter knows of this row (None: no speculation)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_end: int | None = None  # where the text ends when a stop string cut it
    logprobs: list[TokenLogprob] | None = None
    stats: RowStats = field(default_factory=RowStats)
    result: GenerationResult | None = None
    error: Exception | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    @classmethod
    def new(
        cls,
        prompt_ids: list[int],
        params: SamplingParams,
        row: int = 0,
        on_tokens: TokenCallback | None = None,
        on_finish: Callable[[Request], None] | None = None,
        priority: int = ONLINE,
    ) -> Request:
        """A request for already checked token ids; `row` tells apart the sampling seeds of a call's rows."""
        if params.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {params.max_new_tokens}")
        request = cls(list(prompt_ids), params, on_tokens, on_finish, priority)
        request.sampler = row_sampler(params, row)
        return request

    def cancel(self) -> None:
        """Ask the engine to drop this row at its next step (thread-safe: a flag the decode thread reads)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        """Whether the row has stopped decoding (it ended, or was cancelled), before it leaves the batch."""
        return self.finish_reason is not None or self.cancelled

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def outcome(self) -> GenerationResult:
        """The result, or the row's error raised."""
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("the request has not finished")
        return self.result
