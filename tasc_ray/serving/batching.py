"""How the requests of one @serve.batch share decodes: `Work` items, grouped by `group_key`.

Each prompt of each request is one `Work`. A batch of them is split into groups whose sampling parameters can
share one batched `generate` call; a streamed Work carries the callback that receives its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from tasc_ray.spec.generator import SamplingParams, StreamCallback


@dataclass
class Work:
    """One prompt of one request, as it waits in the batch queue."""

    prompt_ids: list[int]
    params: SamplingParams
    on_tokens: Callable[[list[int]], None] | None = None


def group_key(params: SamplingParams) -> tuple[Hashable, ...]:
    """Requests with equal keys share one batched generate call.

    Greedy rows need only equal limits, stop strings and speculative flag. A seeded sampled request decodes
    alone, so that its output does not depend on what else was in the batch; unseeded sampled requests with
    equal parameters share a decode.
    """
    base = (params.max_new_tokens, tuple(params.stop), params.speculative)
    if params.greedy:
        return ("greedy", *base)
    if params.seed is not None:
        return ("seeded", object())  # unique
    return ("sample", *base, params.temperature, params.top_p, params.top_k)


def group(works: Sequence[Work]) -> list[list[int]]:
    """The positions of `works`, grouped by group_key (groups and members in order of first appearance)."""
    groups: dict[tuple[Hashable, ...], list[int]] = {}
    for i, work in enumerate(works):
        groups.setdefault(group_key(work.params), []).append(i)
    return list(groups.values())


def row_stream(works: Sequence[Work]) -> StreamCallback | None:
    """generate()'s stream callback for a group: row i's tokens go to works[i].on_tokens (None: nothing streams)."""
    callbacks = [w.on_tokens for w in works]
    if all(cb is None for cb in callbacks):
        return None

    def stream(i: int, ids: list[int]) -> None:
        callback = callbacks[i]
        if callback is not None:
            callback(ids)

    return stream
